"""TLS and mutual TLS over real sockets on 127.0.0.1, with certificates made at test time.

trustme makes the CAs and certificates: a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate from that CA, and a second CA with a client certificate
of its own. Clients are the real ones: curl --cacert, requests, http.client, the ssl
module on raw sockets, and `openssl s_client` (TLS 1.3 key updates). Servers run in this
process (`server_thread`) unless a test needs signals or the command line.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from cryptography.hazmat.primitives import serialization

from rtserve import App, FileBody, Request, Response
from rtserve.tls import TLSFileError, format_dn
from rtserve.tlsio import CHUNK
from tests.conftest import make_app
from tests.helpers import read_response_file, server_thread, wait_for
from tests.test_processes import Supervised

ROOT = Path(__file__).resolve().parent.parent
OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
BIG = 4 << 20
PATTERN = bytes(range(256))


class Certs:
    """Files of one test run's PKI."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        ca = trustme.CA(organization_name="rtserve test CA")
        other = trustme.CA(organization_name="another CA")
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("client@example.com", common_name="client one",
                               organization_name="Acme, Inc.")
        stranger = other.issue_cert("stranger@example.com", common_name="stranger")
        self.ca = self._write("ca.pem", ca.cert_pem.bytes())
        self.other_ca = self._write("other-ca.pem", other.cert_pem.bytes())
        self.cert = self._write("cert.pem", server.cert_chain_pems[0].bytes())
        self.key = self._write("key.pem", server.private_key_pem.bytes())
        self.client = self._write("client.pem", client.private_key_and_cert_chain_pem.bytes())
        self.stranger = self._write("stranger.pem",
                                    stranger.private_key_and_cert_chain_pem.bytes())
        # A server certificate from the other CA (a reload swaps to it), its key encrypted.
        second = other.issue_cert("127.0.0.1", "localhost")
        self.cert2 = self._write("cert2.pem", second.cert_chain_pems[0].bytes())
        self.key2 = self._write("key2.pem", second.private_key_pem.bytes())
        key = serialization.load_pem_private_key(server.private_key_pem.bytes(), None)
        self.encrypted_key = self._write("enc-key.pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret pass")))
        self.password_file = self._write("password.txt", b"s3cret pass\n")
        self.garbage = self._write("garbage.pem", b"this is not PEM\n")

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("pki"))


def tls_app(tmp: Path | None = None) -> App:
    """The demo app plus /tls (what the handler sees) and /file (a 4 MiB FileBody)."""
    app = make_app()

    @app.get("/tls")
    def tls_facts(request: Request) -> Response:
        facts = dict(request.tls or {})
        facts.pop("client_cert", None)
        return Response.json({"scheme": request.scheme, "tls": facts})

    if tmp is not None:
        path = tmp / "big.bin"
        path.write_bytes(PATTERN * (BIG // 256))

        @app.get("/file")
        def file(request: Request) -> Response:
            return Response(FileBody(open(path, "rb")), 200, None, "application/octet-stream")

    return app


def tls_settings(certs: Certs, **more: Any) -> dict[str, Any]:
    return {"certfile": certs.cert, "keyfile": certs.key, **more}


def mtls_settings(certs: Certs, mode: str = "required") -> dict[str, Any]:
    return tls_settings(certs, ca_certs=certs.ca, client_cert=mode)


def client_context(certs: Certs, cert: str | None = None, ca: str | None = None
                   ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca or certs.ca)
    if cert:
        ctx.load_cert_chain(cert)
    return ctx


def tls_connect(addr: tuple[str, int], ctx: ssl.SSLContext, rcvbuf: int = 0,
                timeout: float = 10.0) -> ssl.SSLSocket:
    """A TLS client socket. Ragged EOFs are not suppressed: a server that closes without
    close_notify makes a read raise SSLEOFError, so `recv() == b""` means a clean close."""
    raw = socket.socket()
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
    raw.settimeout(timeout)
    raw.connect(addr)
    return ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)


def url(srv: Any, path: str) -> str:
    return f"https://localhost:{srv.address[1]}{path}"


def get_over(sock: ssl.SSLSocket, path: str, close: bool = False) -> tuple[int, dict, bytes]:
    extra = "Connection: close\r\n" if close else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
    f = sock.makefile("rb")
    try:
        return read_response_file(f)
    finally:
        f.detach()


def refused(sock: ssl.SSLSocket) -> bool:
    """The server would not serve this connection: an alert, a reset or EOF, no response."""
    try:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return sock.recv(1024) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def closed_by_server(sock: socket.socket, limit: float = 20.0) -> bytes:
    """Everything the server sends until it closes; fails if it has not closed by `limit`
    seconds (a bound on a hang, not a timing assertion)."""
    sock.settimeout(limit)
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(f"still open after {limit} s; got {bytes(data)[:200]!r}"
                                 ) from None
        if not chunk:
            break
        data += chunk
    return bytes(data)


def client_hello() -> bytes:
    """The bytes of a real ClientHello (an ssl client on memory BIOs, never connected)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# ---- serving HTTPS to real clients ------------------------------------------------------


@pytest.fixture
def tls_server(certs: Certs, tmp_path: Path) -> Iterator[Any]:
    with server_thread(tls_app(tmp_path), **tls_settings(certs)) as srv:
        yield srv


@pytest.mark.skipif(CURL is None, reason="curl is not installed (make test installs it)")
def test_curl_with_cacert(certs: Certs, tls_server: Any) -> None:
    out = subprocess.run(
        [CURL, "-sS", "--cacert", certs.ca, "-w", "\n%{http_code} %{http_version} "
         "%{ssl_verify_result}", url(tls_server, "/hello"), url(tls_server, "/hello")],
        capture_output=True, timeout=30, check=True,
    ).stdout.decode()
    assert out.count("Hello, world!") == 2
    assert out.rstrip().endswith("200 1.1 0")
    assert tls_server.metrics.tls_handshakes == 1  # both requests on one connection
    # The accept is deferred until the ClientHello came, but a TLS connection starts with
    # its handshake, not a read of the request (tests/test_defer_accept.py).
    assert tls_server.listener.deferred and not tls_server.reader.read_first


def test_requests_keep_alive_and_what_a_handler_sees(certs: Certs, tls_server: Any) -> None:
    with requests.Session() as s:
        for _ in range(5):
            r = s.get(url(tls_server, "/tls"), verify=certs.ca, timeout=10)
            assert r.status_code == 200
        facts = r.json()
    assert tls_server.metrics.tls_handshakes == 1
    assert facts["scheme"] == "https"
    tls = facts["tls"]
    assert tls["version"] in ("TLSv1.2", "TLSv1.3")
    assert tls["cipher"] and tls["cipher_bits"] >= 128
    assert tls["alpn"] == "http/1.1"
    assert tls["client_verify"] == "NONE" and tls["client_subject"] is None


def test_http_client_large_upload_and_download(certs: Certs, tls_server: Any) -> None:
    """A 1 MiB body up (many full records: the reader must take them all) and back."""
    body = os.urandom(1 << 20)
    conn = http.client.HTTPSConnection("localhost", tls_server.address[1], timeout=10,
                                       context=client_context(certs))
    conn.request("POST", "/echo", body=body)
    r = conn.getresponse()
    assert r.status == 200 and r.read() == body
    conn.request("GET", f"/big?size={BIG}")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == PATTERN * (BIG // 256)
    conn.request("GET", "/file")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == PATTERN * (BIG // 256)
    conn.close()


def test_pipelining_over_tls(certs: Certs, tls_server: Any) -> None:
    sock = tls_connect(tls_server.address, client_context(certs))
    sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /stream?n=3 HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                 b"Connection: close\r\n\r\nabcde")
    f = sock.makefile("rb")
    assert read_response_file(f)[2] == b"Hello, world!\n"
    assert read_response_file(f)[2] == b"part0;part1;part2;"
    status, headers, body = read_response_file(f)
    assert (status, body, headers["connection"]) == (200, b"abcde", "close")
    assert f.read() == b""  # closed after close_notify, nothing more
    f.close()
    sock.close()


def test_expect_100_continue_over_tls(certs: Certs, tls_server: Any) -> None:
    sock = tls_connect(tls_server.address, client_context(certs))
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    f = sock.makefile("rb")
    assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
    sock.sendall(b"hello")
    status, _, body = read_response_file(f)
    assert (status, body) == (200, b"hello")
    f.close()
    sock.close()


def test_drain_finishes_tls_requests_in_flight_and_closes_idle_ones_cleanly(
        certs: Certs) -> None:
    with server_thread(tls_app(), **tls_settings(certs)) as srv:
        busy = tls_connect(srv.address, client_context(certs))
        busy.sendall(b"GET /slow?seconds=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        idle = tls_connect(srv.address, client_context(certs))
        assert get_over(idle, "/hello")[0] == 200
        wait_for(lambda: srv.admission.busy == 1, what="the slow request to run")
        srv.stop()
        assert idle.recv(10) == b""  # close_notify (a ragged close would raise)
        f = busy.makefile("rb")
        status, headers, body = read_response_file(f)
        assert (status, body, headers["connection"]) == (200, b"slow\n", "close")
        assert f.read() == b""
        f.close()
        busy.close()
        idle.close()
        assert srv.stopped.wait(10)


@pytest.mark.parametrize("path", [f"/big?size={BIG}", "/file"])
def test_4_mib_to_a_slow_tls_reader_with_bounded_buffers(certs: Certs, tls_server: Any,
                                                         path: str) -> None:
    """16 KiB receive buffer, 16 KiB read every 5 ms: the server waits on EPOLLOUT again and
    again (SSLWantWriteError), and never holds more than one CHUNK unsent in Python."""
    sock = tls_connect(tls_server.address, client_context(certs), rcvbuf=16384)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = bytearray()
    most = 0
    while True:
        chunk = sock.recv(16384)
        if not chunk:
            break
        data += chunk
        for conn in list(tls_server.conns.values()):
            out = conn.out
            if out is not None:
                most = max(most, len(out))
        time.sleep(0.005)  # the reader's pace
    sock.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == PATTERN * (BIG // 256)
    assert 0 < most <= CHUNK  # the socket was full at times; the unsent tail stayed small
    assert tls_server.metrics.timeouts.get("write", 0) == 0


def test_close_notify_that_finds_the_send_buffer_full_waits_for_room(certs: Certs) -> None:
    """A response that just fits the socket buffers of a client that is not reading leaves
    no room for the close_notify after it: the server waits for EPOLLOUT (tls_want
    CLOSE_NOTIFY) instead of closing without it. The test finds such a response size with
    tiny buffers (server SO_SNDBUF 4 KiB, client SO_RCVBUF 1 KiB): the largest body that
    still goes out whole, then sizes just below it. Then the client reads: the whole body,
    then a clean TLS close (a ragged one would raise)."""
    from rtserve.connection import T_LINGER
    from rtserve.tlsio import CLOSE_NOTIFY

    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    with server_thread(tls_app(), sock=lst, **tls_settings(certs)) as srv:
        ctx = client_context(certs)

        def probe(size: int) -> tuple[ssl.SSLSocket, Any]:
            """POST a body of `size` to /echo without reading; the server's Connection
            once it has done all it can (response blocked, or closing)."""
            sock = tls_connect(srv.address, ctx, rcvbuf=1024)
            me = sock.getsockname()
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n" % size + b"x" * size)
            found: list[Any] = []

            def settled() -> bool:
                for c in list(srv.conns.values()):
                    # Final states only: blocked mid-response, lingering after the
                    # close_notify went out, or waiting to send it.
                    if tuple(c.addr) == me and (
                            (c.state.name == "WRITING" and c.out is not None) or
                            (c.state.name == "CLOSING" and (
                                c.timer_kind == T_LINGER or c.tls_want == CLOSE_NOTIFY))):
                        found.append(c)
                        return True
                return False

            wait_for(settled, what="the server to finish writing what it can")
            return sock, found[0]

        def search() -> tuple[ssl.SSLSocket, int] | None:
            """The largest body that goes out whole (bisection), then the bytes around it;
            the connection left waiting to send its close_notify, or None."""
            fits, blocks = 1000, 64 << 10
            while blocks - fits > 1:
                mid = (fits + blocks) // 2
                sock, conn = probe(mid)
                if conn.out is not None:
                    blocks = mid
                else:
                    fits = mid
                sock.close()
            for size in range(fits + 16, fits - 112, -1):
                sock, conn = probe(size)
                if conn.tls_want == CLOSE_NOTIFY:
                    return sock, size
                sock.close()
            return None

        # The window is a few bytes wide and where it lies moves between connections by
        # more than that (a few hundred bytes): search again until one connection hits it.
        for _ in range(8):
            hit = search()
            if hit is not None:
                break
        else:
            raise AssertionError("no response size left the close_notify waiting")
        sock, size = hit
        data = closed_by_server(sock)  # reading makes room; then close_notify and FIN
        sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b"x" * size


# ---- openssl s_client ---------------------------------------------------------------------


class SClient:
    """`openssl s_client` with its output read line by line on a thread."""

    def __init__(self, port: int, *args: str) -> None:
        assert OPENSSL is not None
        self.proc = subprocess.Popen(
            [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
             "localhost", "-alpn", "http/1.1", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.seen: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def until(self, needle: bytes, timeout: float = 10.0) -> bytes:
        """Output up to the line containing `needle` (fails on EOF or after timeout)."""
        end = time.monotonic() + timeout
        got: list[bytes] = []
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{needle!r} not seen: {b''.join(got)[-2000:]!r}"
                                     ) from None
            if line is None:
                raise AssertionError(f"EOF before {needle!r}: {b''.join(got)[-2000:]!r}")
            got.append(line)
            self.seen.append(line)
            if needle in line:
                return b"".join(got)

    def close(self) -> int:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
def test_openssl_s_client_verifies_and_gets_alpn(certs: Certs, tls_server: Any) -> None:
    c = SClient(tls_server.address[1], "-CAfile", certs.ca, "-verify_return_error")
    try:
        hello = c.until(b"Verify return code")
        assert b"ALPN protocol: http/1.1" in hello and b"Verify return code: 0 (ok)" in hello
        c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        c.until(b"Hello, world!")
        c.until(b"closed")  # the server's close_notify, then EOF
    finally:
        c.close()


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
def test_tls13_key_update_requested_by_the_client(certs: Certs, tls_server: Any) -> None:
    """s_client's K command sends a KeyUpdate asking for ours too; requests on the same
    connection keep working in both directions afterwards."""
    c = SClient(tls_server.address[1], "-CAfile", certs.ca, "-tls1_3")
    try:
        c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        c.until(b"Hello, world!")
        c.send(b"K\n")  # a line of its own: s_client's command, not sent as data
        c.until(b"KEYUPDATE")
        c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n"
               b"after update\n")  # a whole line: output is read line by line
        c.until(b"after update")
        c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        c.until(b"Hello, world!")
        c.until(b"closed")
    finally:
        c.close()
    assert tls_server.metrics.tls_handshakes == 1
    assert sum(tls_server.metrics.tls_errors.values()) == 0


# ---- mutual TLS ---------------------------------------------------------------------------


def test_mtls_client_certificate_is_verified_and_seen(certs: Certs) -> None:
    with server_thread(tls_app(), **mtls_settings(certs)) as srv:
        r = requests.get(url(srv, "/tls"), verify=certs.ca, cert=certs.client, timeout=10)
        assert r.status_code == 200
        tls = r.json()["tls"]
        assert tls["client_verify"] == "SUCCESS"
        assert tls["client_subject"].startswith("CN=client one,")
        assert r"O=Acme\, Inc." in tls["client_subject"]
        assert "rtserve test CA" in tls["client_issuer"]
        assert tls["client_serial"] and tls["client_not_after"].endswith("GMT")
        if CURL is not None:
            out = subprocess.run(
                [CURL, "-sS", "--cacert", certs.ca, "--cert", certs.client,
                 url(srv, "/hello")], capture_output=True, timeout=30, check=True)
            assert out.stdout == b"Hello, world!\n"


@pytest.mark.parametrize("client", [None, "stranger"], ids=["no-certificate", "another-ca"])
def test_mtls_refuses_a_client_without_a_good_certificate(certs: Certs,
                                                          client: str | None) -> None:
    with server_thread(tls_app(), **mtls_settings(certs)) as srv:
        cert = certs.stranger if client else None
        sock = tls_connect(srv.address, client_context(certs, cert))  # TLS 1.3: the client
        assert refused(sock)  # finishes first; the refusal comes as an alert on reading
        sock.close()
        wait_for(lambda: srv.metrics.tls_errors.get("client_certificate") == 1,
                 what="the refusal to be counted")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url(srv, "/hello"), verify=certs.ca, cert=cert, timeout=10)
        # The server is fine and serves a client that has the right certificate.
        ok = requests.get(url(srv, "/hello"), verify=certs.ca, cert=certs.client, timeout=10)
        assert ok.status_code == 200
        assert srv.metrics.tls_handshakes == 1


def test_mtls_optional_serves_clients_without_a_certificate(certs: Certs) -> None:
    with server_thread(tls_app(), **mtls_settings(certs, "optional")) as srv:
        anon = requests.get(url(srv, "/tls"), verify=certs.ca, timeout=10).json()["tls"]
        assert anon["client_verify"] == "NONE" and anon["client_subject"] is None
        known = requests.get(url(srv, "/tls"), verify=certs.ca, cert=certs.client,
                             timeout=10).json()["tls"]
        assert known["client_verify"] == "SUCCESS"
        sock = tls_connect(srv.address, client_context(certs, certs.stranger))
        assert refused(sock)  # a certificate that is offered must still verify
        sock.close()


def test_wsgi_environ_over_mtls(certs: Certs) -> None:
    keys = ("wsgi.url_scheme", "HTTPS", "SERVER_PORT", "SSL_PROTOCOL", "SSL_CIPHER",
            "SSL_CLIENT_VERIFY", "SSL_CLIENT_S_DN", "SSL_CLIENT_I_DN", "SSL_CLIENT_S_DN_CN",
            "SSL_CLIENT_M_SERIAL", "SSL_CLIENT_V_END", "SSL_CLIENT_CERT")

    def wsgi(environ: dict, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({k: environ.get(k) for k in keys}).encode()]

    with server_thread(wsgi, **mtls_settings(certs, "optional")) as srv:
        env = requests.get(f"https://localhost:{srv.address[1]}/x", verify=certs.ca,
                           cert=certs.client, timeout=10).json()
        anon = requests.get(f"https://localhost:{srv.address[1]}/x", verify=certs.ca,
                            timeout=10).json()
    assert env["wsgi.url_scheme"] == "https" and env["HTTPS"] == "on"
    assert env["SSL_PROTOCOL"].startswith("TLSv1.") and env["SSL_CIPHER"]
    assert env["SSL_CLIENT_VERIFY"] == "SUCCESS"
    assert env["SSL_CLIENT_S_DN"].startswith("CN=client one,")
    assert env["SSL_CLIENT_S_DN_CN"] == "client one"
    assert "rtserve test CA" in env["SSL_CLIENT_I_DN"]
    assert env["SSL_CLIENT_M_SERIAL"] and env["SSL_CLIENT_V_END"].endswith("GMT")
    assert env["SSL_CLIENT_CERT"].startswith("-----BEGIN CERTIFICATE-----")
    assert anon["SSL_CLIENT_VERIFY"] == "NONE" and anon["SSL_CLIENT_S_DN"] is None
    assert anon["wsgi.url_scheme"] == "https"


def test_plain_server_requests_say_http() -> None:
    with server_thread(tls_app()) as srv:
        r = requests.get(f"http://127.0.0.1:{srv.address[1]}/tls", timeout=10).json()
    assert r == {"scheme": "http", "tls": {}}


def test_distinguished_names_are_rfc4514() -> None:
    subject = ((("countryName", "DE"),), (("organizationName", "Acme, Inc."),),
               (("organizationalUnitName", "Pay"), ("commonName", "#1 svc ")))
    assert format_dn(subject) == r"OU=Pay+CN=\#1 svc\ ,O=Acme\, Inc.,C=DE"


# ---- what must not hang or hurt: stalls, floods, garbage, plain HTTP ------------------------


def test_handshake_that_stalls_after_client_hello_is_closed_and_counted(certs: Certs) -> None:
    with server_thread(tls_app(), **tls_settings(certs, tls_handshake_timeout=0.5)) as srv:
        started = time.monotonic()  # before the connect: the timer starts at the accept
        raw = socket.create_connection(srv.address)
        raw.sendall(client_hello())
        answer = closed_by_server(raw)  # the ServerHello flight, then the close
        raw.close()
        assert answer[:1] == b"\x16"  # a handshake record: the server did reply
        assert time.monotonic() - started >= 0.45  # not before the timeout (less slack)
        wait_for(lambda: srv.metrics.timeouts.get("handshake") == 1, what="the count")
        assert srv.open_connections == 0


def test_1000_handshakes_that_never_finish_while_a_real_client_is_served(certs: Certs) -> None:
    """Half send nothing, half a partial ClientHello; a keep-alive client makes a request
    every 10 ms meanwhile. Every stalled connection is closed by the handshake timer."""
    n = 1000
    hello = client_hello()
    with server_thread(tls_app(), **tls_settings(certs, tls_handshake_timeout=1.0)) as srv:
        client = tls_connect(srv.address, client_context(certs))
        assert get_over(client, "/hello")[0] == 200
        sel = selectors.DefaultSelector()
        opened: dict[socket.socket, float] = {}
        for i in range(n):
            s = socket.create_connection(srv.address)
            if i % 2:
                s.sendall(hello[: len(hello) // 2])
            s.setblocking(False)
            opened[s] = time.monotonic()
            sel.register(s, selectors.EVENT_READ)
        lifetimes: list[float] = []
        statuses: list[int] = []
        end = time.monotonic() + 60  # bounds a hang only
        while len(lifetimes) < n and time.monotonic() < end:
            for key, _ in sel.select(0.01):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                assert data == b""  # nothing was answered to an unfinished handshake
                lifetimes.append(time.monotonic() - opened.pop(s))
                sel.unregister(s)
                s.close()
            statuses.append(get_over(client, "/hello")[0])
        sel.close()
        for s in opened:
            s.close()
        assert len(lifetimes) == n, f"{len(opened)} stalled connections still open"
        assert min(lifetimes) >= 0.9  # none closed before its handshake timeout
        assert statuses and set(statuses) == {200}
        wait_for(lambda: srv.metrics.timeouts.get("handshake") == n, what="all counted")
        assert srv.open_connections == 1  # the real client
        client.close()


@pytest.mark.parametrize("garbage", [
    b"\x00" * 64,
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a ClientHello record that is nonsense
    b"\x17\x03\x03\x00\x05hello",  # application data before any handshake
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP OpenSSL does not recognise
], ids=["zeros", "ssh", "bad-hello", "app-data", "plain-options"])
def test_garbage_instead_of_a_client_hello_is_closed_at_once(certs: Certs,
                                                             garbage: bytes) -> None:
    with server_thread(tls_app(), **tls_settings(certs, tls_handshake_timeout=30)) as srv:
        raw = socket.create_connection(srv.address)
        raw.sendall(garbage)
        answer = closed_by_server(raw, limit=10)  # far below the 30 s handshake timeout
        raw.close()
        assert b"HTTP/" not in answer
        wait_for(lambda: sum(srv.metrics.tls_errors.values()) == 1, what="the error count")
        assert srv.metrics.tls_errors.get("protocol", 0) + srv.metrics.tls_errors.get(
            "version", 0) == 1
        assert requests.get(url(srv, "/hello"), verify=certs.ca, timeout=10).status_code == 200


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "PUT"])
def test_plain_http_to_the_tls_port_gets_a_400(certs: Certs, method: str) -> None:
    with server_thread(tls_app(), **tls_settings(certs)) as srv:
        raw = socket.create_connection(srv.address)
        raw.sendall(f"{method} /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                    .encode())
        status, headers, body = read_response_file(raw.makefile("rb"))
        assert status == 400 and headers["connection"] == "close"
        assert body == b"This port speaks HTTPS: plain HTTP is not served\n"
        assert closed_by_server(raw) == b""
        raw.close()
        assert srv.metrics.tls_errors == {"http_request": 1}
        r = requests.get(f"http://127.0.0.1:{srv.address[1]}/hello", timeout=10)
        assert r.status_code == 400


def test_tls_metrics_are_exported(certs: Certs, tls_server: Any) -> None:
    raw = socket.create_connection(tls_server.address)
    raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
    closed_by_server(raw)
    raw.close()
    text = requests.get(url(tls_server, "/metrics"), verify=certs.ca, timeout=10).text
    assert 'rtserve_tls_errors_total{reason="http_request"} 1' in text
    assert 'rtserve_tls_errors_total{reason="client_certificate"} 0' in text
    assert 'rtserve_timeouts_total{kind="handshake"} 0' in text
    assert re.search(r"^rtserve_tls_handshakes_total 1$", text, re.M)


# ---- configuration: refused at start, naming the setting and the file ----------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "rtserve", "tests.conftest:make_app()", "--bind",
         "127.0.0.1:0", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )


@pytest.mark.parametrize("case", ["missing-cert", "cert-is-a-directory", "cert-not-pem",
                                  "key-mismatch", "key-not-pem", "key-missing",
                                  "ca-not-pem", "encrypted-no-password",
                                  "encrypted-wrong-password"])
def test_bad_tls_files_are_refused_at_start_with_exit_3(certs: Certs, tmp_path: Path,
                                                       case: str) -> None:
    missing = str(tmp_path / "nope.pem")
    args, setting, path, words = {
        "missing-cert": (["--certfile", missing], "certfile", missing, "no such file"),
        "cert-is-a-directory": (["--certfile", str(tmp_path)], "certfile", str(tmp_path),
                                "directory"),
        "cert-not-pem": (["--certfile", certs.garbage, "--keyfile", certs.key], "certfile",
                         certs.garbage, "no PEM certificate"),
        "key-mismatch": (["--certfile", certs.cert, "--keyfile", certs.key2], "keyfile",
                         certs.key2, "does not match"),
        "key-not-pem": (["--certfile", certs.cert, "--keyfile", certs.garbage], "keyfile",
                        certs.garbage, "no usable PEM private key"),
        "key-missing": (["--certfile", certs.cert, "--keyfile", missing], "keyfile", missing,
                        "no such file"),
        "ca-not-pem": (["--certfile", certs.cert, "--keyfile", certs.key, "--ca-certs",
                        certs.garbage, "--client-cert", "required"], "ca_certs",
                       certs.garbage, "no PEM CA certificate"),
        "encrypted-no-password": (["--certfile", certs.cert, "--keyfile",
                                   certs.encrypted_key], "keyfile", certs.encrypted_key,
                                  "password"),
        "encrypted-wrong-password": (["--certfile", certs.cert, "--keyfile",
                                      certs.encrypted_key, "--keyfile-password", "nope"],
                                     "keyfile", certs.encrypted_key, "password"),
    }[case]
    r = run_cli(*args)
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("rtserve: error: ") and setting in line and path in line
    assert words in line
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, words", [
    (["--keyfile", "k.pem"], "certfile is not"),
    (["--certfile", "c.pem", "--client-cert", "required"], "needs ca_certs"),
    (["--certfile", "c.pem", "--ca-certs", "ca.pem"], "client_cert is none"),
    (["--certfile", "c.pem", "--ssl-ciphers", "NOPE-NOTHING"], "ssl_ciphers"),
])
def test_inconsistent_tls_settings_are_usage_errors(certs: Certs, args: list[str],
                                                    words: str) -> None:
    subst = {"c.pem": certs.cert, "k.pem": certs.key, "ca.pem": certs.ca}
    r = run_cli(*[subst.get(a, a) for a in args])
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_server_refuses_a_mismatched_key_in_process(certs: Certs) -> None:
    with pytest.raises(TLSFileError, match="keyfile .*key2.pem.* does not match"), \
            server_thread(tls_app(), certfile=certs.cert, keyfile=certs.key2):
        pass


@pytest.mark.parametrize("how", ["file", "setting"])
def test_encrypted_key_with_its_password(certs: Certs, how: str) -> None:
    settings: dict[str, Any] = {"certfile": certs.cert, "keyfile": certs.encrypted_key}
    if how == "file":
        settings["keyfile_password_file"] = certs.password_file
    else:
        settings["keyfile_password"] = "s3cret pass"
    with server_thread(tls_app(), **settings) as srv:
        assert requests.get(url(srv, "/hello"), verify=certs.ca, timeout=10).status_code == 200


def test_minimum_version_13_refuses_a_tls12_client(certs: Certs) -> None:
    with server_thread(tls_app(), **tls_settings(certs, tls_min_version="1.3")) as srv:
        ctx = client_context(certs)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            tls_connect(srv.address, ctx)
        wait_for(lambda: srv.metrics.tls_errors.get("version") == 1, what="the count")
        assert requests.get(url(srv, "/hello"), verify=certs.ca, timeout=10).status_code == 200


def test_tls12_client_with_a_cipher_list(certs: Certs) -> None:
    settings = tls_settings(certs, ssl_ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    with server_thread(tls_app(), **settings) as srv:
        ctx = client_context(certs)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        sock = tls_connect(srv.address, ctx)
        assert sock.version() == "TLSv1.2"
        assert json.loads(get_over(sock, "/tls")[2])["tls"]["cipher"] == (
            "ECDHE-ECDSA-AES128-GCM-SHA256")
        sock.close()
        ctx.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")  # not in the server's list
        with pytest.raises(ssl.SSLError):
            tls_connect(srv.address, ctx)
        wait_for(lambda: srv.metrics.tls_errors.get("cipher") == 1, what="the count")


def test_a_client_that_rejects_our_certificate_is_counted_as_an_alert(certs: Certs) -> None:
    with server_thread(tls_app(), **tls_settings(certs)) as srv:
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_connect(srv.address, client_context(certs, ca=certs.other_ca))
        wait_for(lambda: srv.metrics.tls_errors.get("alert") == 1, what="the count")


def test_a_client_offering_only_h2_gets_http11_without_alpn(certs: Certs) -> None:
    with server_thread(tls_app(), **tls_settings(certs)) as srv:
        ctx = client_context(certs)
        ctx.set_alpn_protocols(["h2"])
        sock = tls_connect(srv.address, ctx)
        assert sock.selected_alpn_protocol() is None
        assert get_over(sock, "/hello")[0] == 200
        sock.close()


# ---- reloading certificates --------------------------------------------------------------


def issuer_org(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert()
    assert cert
    return dict(x[0] for x in cert["issuer"])["organizationName"]


def both_cas(certs: Certs) -> ssl.SSLContext:
    ctx = client_context(certs)
    ctx.load_verify_locations(certs.other_ca)
    return ctx


def test_sighup_reloads_certificates_without_dropping_connections(certs: Certs,
                                                                   tmp_path: Path) -> None:
    """A single process: SIGHUP builds a new SSLContext from the files; an open keep-alive
    connection goes on with the old one, new connections get the new certificate; a bad
    file on a later SIGHUP is logged and the last good certificates stay in use."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(Path(certs.cert).read_bytes())
    key.write_bytes(Path(certs.key).read_bytes())
    s = Supervised("--certfile", str(cert), "--keyfile", str(key), "--threads", "2",
                   app="tests.conftest:make_app()")
    try:
        port = int(s.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)", 20).group(1))
        ctx = both_cas(certs)
        old = tls_connect(("127.0.0.1", port), ctx)
        assert get_over(old, "/hello")[0] == 200 and issuer_org(old) == "rtserve test CA"
        cert.write_bytes(Path(certs.cert2).read_bytes())
        key.write_bytes(Path(certs.key2).read_bytes())
        mark = s.mark()
        s.proc.send_signal(signal.SIGHUP)
        s.wait_for("TLS certificates reloaded", start=mark)
        assert get_over(old, "/hello")[0] == 200  # the same connection, served on
        new = tls_connect(("127.0.0.1", port), ctx)
        assert get_over(new, "/hello")[0] == 200 and issuer_org(new) == "another CA"
        cert.write_bytes(b"broken\n")
        mark = s.mark()
        s.proc.send_signal(signal.SIGHUP)
        s.wait_for(r"TLS reload failed.*certfile", start=mark)
        third = tls_connect(("127.0.0.1", port), ctx)
        assert get_over(third, "/hello")[0] == 200 and issuer_org(third) == "another CA"
        assert get_over(old, "/hello", close=True)[0] == 200
        for c in (old, new, third):
            c.close()
    finally:
        s.cleanup()


def test_supervisor_sighup_serves_new_certificates_and_finishes_old_requests(
        certs: Certs, tmp_path: Path) -> None:
    """--processes 2: SIGHUP is the rolling restart; its children load the new files, and
    a request in flight on an old child's TLS connection still completes."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(Path(certs.cert).read_bytes())
    key.write_bytes(Path(certs.key).read_bytes())
    marker = tmp_path / "running"
    s = Supervised("--processes", "2", "--certfile", str(cert), "--keyfile", str(key),
                   "--threads", "2")
    try:
        port = s.ready(2)
        ctx = both_cas(certs)
        slow = tls_connect(("127.0.0.1", port), ctx, timeout=30)
        assert issuer_org(slow) == "rtserve test CA"
        slow.sendall(f"GET /slow?seconds=2&mark={marker} HTTP/1.1\r\nHost: x\r\n\r\n"
                     .encode())
        wait_for(marker.exists, what="the slow request to start")
        cert.write_bytes(Path(certs.cert2).read_bytes())
        key.write_bytes(Path(certs.key2).read_bytes())
        old = s.started_pids()
        mark = s.mark()
        s.proc.send_signal(signal.SIGHUP)
        s.wait_for("reload complete", start=mark, timeout=40)
        f = slow.makefile("rb")
        status, _, body = read_response_file(f)
        assert (status, body) == (200, b"slept 2\n")
        f.detach()
        slow.close()
        # An old child accepts on its slot until it has seen its SIGTERM: wait until the
        # old ones are gone before asking which certificate new connections get.
        for pid in old:
            s.wait_for(rf"process {pid} exited \(exit code 0\)", start=mark, timeout=30)
        for _ in range(4):  # whichever child the kernel picks, it has the new certificate
            new = tls_connect(("127.0.0.1", port), ctx)
            assert issuer_org(new) == "another CA"
            assert get_over(new, "/", close=True)[0] == 200
            new.close()
    finally:
        s.cleanup()


def test_keyfile_password_never_reaches_a_child_command_line(certs: Certs) -> None:
    from rtserve.child_command import child_args, child_env
    from rtserve.config import Config

    cfg = Config(_env={}, certfile=certs.cert, keyfile=certs.encrypted_key,
                 keyfile_password="s3cret pass")
    assert not any("s3cret" in a for a in child_args("app:app", cfg))
    assert child_env(cfg) == {"RTSERVE_KEYFILE_PASSWORD": "s3cret pass"}


def test_an_asgi_app_over_tls_sees_https(certs: Certs) -> None:
    """The ASGI scope's scheme says https on a TLS server (as wsgi.url_scheme does)."""
    import json as _json

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = _json.dumps({"scheme": scope["scheme"]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    with server_thread(app, interface="asgi", lifespan="off", **tls_settings(certs)) as server:
        sock = tls_connect(server.address, client_context(certs))
        sock.sendall(b"GET /s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        f = sock.makefile("rb")
        status, _, body = read_response_file(f)
        f.close()
        sock.close()
    assert (status, _json.loads(body)) == (200, {"scheme": "https"})
