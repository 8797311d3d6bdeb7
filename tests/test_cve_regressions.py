"""Regression tests for the bug classes of the peers' public CVEs (reference notes, section 4).

Each test names the advisory whose class it covers; each runs over a real socket.
"""

from __future__ import annotations

import resource
import socket
import struct
import threading

import pytest
import requests

from rtserve import App, Request, Response
from tests.conftest import make_app
from tests.helpers import Gate, connect, read_response_file, recv_until_closed, server_thread

SMUGGLED = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"


def exchange(addr, raw: bytes) -> bytes:
    s = connect(addr)
    s.sendall(raw)
    data = recv_until_closed(s)
    s.close()
    return data


def assert_rejected(data: bytes, status: int) -> None:
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:80]
    assert b"Connection: close\r\n" in data
    assert data.count(b"HTTP/1.1 ") == 1, "a smuggled request was answered"


@pytest.mark.parametrize(
    "raw,status",
    [
        # waitress #464 / RFC 9112 6.1: CL and TE together
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, 400),
        # CVE-2019-16786 / CVE-2024-6827: TE other than a sole "chunked": an unknown coding
        # before chunked is 501, chunked not final is 400 (RFC 9112 6.1, 6.3 item 4)
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
         b"0\r\n\r\n" + SMUGGLED, 501),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
         b"0\r\n\r\n" + SMUGGLED, 400),
        # CVE-2024-1135: two TE headers
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
         b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED, 400),
        # CVE-2021-22959: whitespace before the colon
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n"
         b"0\r\n\r\n" + SMUGGLED, 400),
        # CVE-2019-16789 / gunicorn #3364: non-HTTP whitespace around a TE value
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n"
         b"0\r\n\r\n" + SMUGGLED, 400),
        # CVE-2022-24761: int() leniency in Content-Length
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello" + SMUGGLED, 400),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5_0\r\n\r\nhello" + SMUGGLED, 400),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello" + SMUGGLED, 400),
        # CVE-2019-16792 / cheroot #737: duplicate and list-form Content-Length
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 0\r\n\r\n"
         b"hello" + SMUGGLED, 400),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello" + SMUGGLED, 400),
        # CVE-2022-24761: chunk size leniency
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLED, 400),
        # CVE-2025-43859: no CRLF after chunk data
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"5\r\nhelloXX0\r\n\r\n" + SMUGGLED, 400),
        # CVE-2019-16785: bare LF as a line ending
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nX: y\nContent-Length: 5\r\n\r\nhello" + SMUGGLED,
         400),
        # CVE-2023-30589: CR not followed by LF inside a value
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Abc: \rxTransfer-Encoding: chunked\r\n\r\n"
         + SMUGGLED, 400),
        # CVE-2022-32215: obs-fold continuation of Transfer-Encoding
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n chunked\r\n\r\n"
         b"0\r\n\r\n" + SMUGGLED, 400),
        # h11 / gunicorn: Host missing on HTTP/1.1
        (b"GET /hello HTTP/1.1\r\n\r\n" + SMUGGLED, 400),
    ],
    ids=[
        "cl-plus-te", "te-gzip-chunked", "te-xchunked", "te-duplicate", "space-before-colon",
        "te-vertical-tab", "cl-plus-sign", "cl-underscore", "cl-hex", "cl-duplicate",
        "cl-list", "chunk-size-hex-prefix", "chunk-missing-crlf", "bare-lf", "bare-cr",
        "obs-fold-te", "missing-host",
    ],
)
def test_smuggling_classes_rejected_and_follow_up_ignored(addr, raw, status):
    assert_rejected(exchange(addr, raw), status)
    # The server is unharmed: the next client is served.
    assert requests.get(f"http://{addr[0]}:{addr[1]}/hello", timeout=5).status_code == 200


@pytest.mark.parametrize("value", ["a\r\nSet-Cookie: x=1", "a\nb", "a\x00b"])
def test_response_splitting_refused(value):
    """CVE-2018-1000164, CVE-2020-7695: CR/LF/NUL in a handler's header value."""
    app = App()

    @app.get("/h")
    def h(request: Request) -> Response:
        return Response.text("x", headers=[("X-Value", value)])

    with server_thread(app) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /h HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = read_response_file(s.makefile("rb"))
        assert status == 500 and "x-value" not in headers and "set-cookie" not in headers
        s.close()


def test_half_closed_connection_causes_no_busy_loop(gate: Gate):
    """CVE-2024-49769 class: a dead or half-closed socket must leave the poll set."""
    app = make_app()

    @app.get("/held")
    def held(request: Request) -> Response:
        gate.hold()
        return Response.text("done\n")

    with server_thread(app) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
        gate.wait_entered()
        s.shutdown(socket.SHUT_WR)  # EOF while the request is in flight
        before = resource.getrusage(resource.RUSAGE_SELF)
        threading.Event().wait(0.5)  # a measurement window, not a synchronisation
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert cpu < 0.25, f"{cpu:.2f} s of CPU in a 0.5 s idle window: busy loop"
        gate.release.set()
        data = recv_until_closed(s)
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"done\n")
        s.close()


def test_only_the_conductor_closes_sockets():
    """CVE-2022-31015 class: a worker closing a socket under the poller killed waitress."""
    closers: list[str] = []
    real_close = socket.socket.close

    def recording_close(self):
        closers.append(threading.current_thread().name)
        return real_close(self)

    app = make_app()
    socket.socket.close = recording_close  # type: ignore[method-assign]
    try:
        with server_thread(app) as srv:
            addr = srv.address
            closers.clear()
            for raw in (b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        b"BAD\r\n\r\n"):
                c = socket.create_connection(addr)
                c.sendall(raw)
                recv_until_closed(c)
                real_close(c)
            c = socket.create_connection(addr)
            c.sendall(b"GET /slow?seconds=0.2 HTTP/1.1\r\nHost: x\r\n\r\n")
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            real_close(c)
            requests.get(f"http://{addr[0]}:{addr[1]}/slow?seconds=0.3", timeout=5)
    finally:
        socket.socket.close = real_close  # type: ignore[method-assign]
    assert closers, "no server-side close was observed"
    assert set(closers) <= {"rtserve-conductor", "MainThread"}, set(closers)
    assert "rtserve-worker" not in closers


def test_control_characters_in_target_rejected(addr):
    assert_rejected(exchange(addr, b"GET /a\x1bb HTTP/1.1\r\nHost: x\r\n\r\n"), 400)
    assert_rejected(exchange(addr, b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n"), 400)
