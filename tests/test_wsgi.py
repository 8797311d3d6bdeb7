"""The WSGI adapter over real sockets, with wsgiref.validate checking both sides of PEP 3333."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import sys
import threading
from typing import Any
from wsgiref.validate import validator

import pytest
import requests

from rtserve.app import Route
from rtserve.config import Config, ConfigError
from rtserve.proxy import ForwardedPolicy, parse_forwarded
from rtserve.request import Request
from rtserve.server import as_dispatcher
from rtserve.wsgi import FileWrapper, WSGIApp, parse_fallbacks
from tests.helpers import (
    connect,
    read_response,
    read_response_file,
    recv_until_closed,
    running_server,
)

# ---- helpers -------------------------------------------------------------------------


class Linted:
    """`wsgiref.validate.validator(app)` that records every assertion it raises (they would
    otherwise turn into a 500 inside the worker) and every iterable it returned, so a test
    can check that close() was called on each."""

    def __init__(self, app: Any) -> None:
        self._inner = validator(app)
        self.errors: list[BaseException] = []
        self.iterators: list[Any] = []
        self._cond = threading.Condition()

    def __call__(self, environ: dict, start_response: Any) -> Any:
        try:
            it = self._inner(environ, start_response)
        except AssertionError as exc:
            self.errors.append(exc)
            raise
        with self._cond:
            self.iterators.append(it)
        return _Recorded(it, self)

    def wait_closed(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until `n` returned iterables exist and all of them were closed."""
        with self._cond:
            return self._cond.wait_for(
                lambda: len(self.iterators) >= n and all(i.closed for i in self.iterators),
                timeout,
            )

    def check(self, n: int = 1) -> None:
        assert self.wait_closed(n), "an app iterable was never closed"
        assert not self.errors, self.errors


class _Recorded:
    """Forwards iteration and close() to the validator's iterator, recording assertions."""

    def __init__(self, it: Any, lint: Linted) -> None:
        self._it = it
        self._lint = lint

    def __iter__(self):
        try:
            yield from self._it
        except AssertionError as exc:
            self._lint.errors.append(exc)
            raise

    def close(self) -> None:
        try:
            self._it.close()
        except AssertionError as exc:
            self._lint.errors.append(exc)
            raise
        finally:
            with self._lint._cond:
                self._lint._cond.notify_all()


def url(addr: tuple[str, int], path: str) -> str:
    return f"http://{addr[0]}:{addr[1]}{path}"


def environ_app(environ: dict, start_response: Any) -> list[bytes]:
    """Answers with the str-valued environ keys as JSON, plus a few wsgi.* facts."""
    out = {k: v for k, v in environ.items() if isinstance(v, str)}
    for k in ("wsgi.version", "wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once",
              "wsgi.url_scheme", "wsgi.input_terminated"):
        out[k] = environ[k]
    out["body"] = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)).decode()
    data = json.dumps(out).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]


def raw(addr: tuple[str, int], data: bytes) -> tuple[int, dict, bytes]:
    s = connect(addr)
    try:
        s.sendall(data)
        return read_response(s)
    finally:
        s.close()


# ---- environ -------------------------------------------------------------------------


def test_get_environ_is_complete_and_valid():
    lint = Linted(environ_app)
    with running_server(lint) as addr:
        s = connect(addr)
        s.sendall(
            b"GET /caf%C3%A9/a%2Fb?x=1&y=%20 HTTP/1.1\r\nHost: example.com:8443\r\n"
            b"X-Custom: one\r\nX-Custom: two\r\nCookie: a=1\r\nCookie: b=2\r\n"
            b"Accept: */*\r\n\r\n"
        )
        status, headers, body = read_response(s)
        local_port = s.getsockname()[1]
        s.close()
    assert status == 200, body
    env = json.loads(body)
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == ""
    # percent-decoded bytes as latin-1 (PEP 3333), %2F decoded too, as every server does
    assert env["PATH_INFO"] == "/café/a/b".encode().decode("latin-1")
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["RAW_URI"] == "/caf%C3%A9/a%2Fb?x=1&y=%20"
    assert env["SERVER_NAME"] == "example.com" and env["SERVER_PORT"] == "8443"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"] == str(local_port)
    assert env["HTTP_HOST"] == "example.com:8443"
    assert env["HTTP_X_CUSTOM"] == "one,two"
    assert env["HTTP_COOKIE"] == "a=1; b=2"  # cookies joined the way cookie parsers expect
    assert env["HTTP_ACCEPT"] == "*/*"
    assert "CONTENT_TYPE" not in env and "CONTENT_LENGTH" not in env
    assert env["wsgi.version"] == [1, 0]
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multithread"] is True
    assert env["wsgi.multiprocess"] is False
    assert env["wsgi.run_once"] is False
    lint.check()


@pytest.mark.parametrize("method", [b"BREW", b"get", b"M-SEARCH", b"PROPFIND", b"X!#$%&'*+.^_`|~1"])
def test_any_token_method_reaches_the_wsgi_app_unchanged(method: bytes):
    """RFC 9110 9.1: a method is a case-sensitive token; the server refuses none but CONNECT
    and leaves what a method means to the application (no 405/501 from the adapter)."""
    with running_server(environ_app) as addr:
        status, _, body = raw(addr, method + b" /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert status == 200
    assert json.loads(body)["REQUEST_METHOD"] == method.decode()


def test_path_info_is_decoded_exactly_once():
    """The parser decodes request.path for the native App; PATH_INFO comes from the raw path,
    so `%2525` is `%25` (not `%`), and `%2F` is `/` as PEP 3333 has it (RAW_URI tells)."""
    with running_server(environ_app) as addr:
        _, _, b1 = raw(addr, b"GET /p%2525/a%2Fb HTTP/1.1\r\nHost: h\r\n\r\n")
        _, _, b2 = raw(addr, b"GET /caf%C3%A9%FF HTTP/1.1\r\nHost: h\r\n\r\n")
    e1, e2 = json.loads(b1), json.loads(b2)
    assert (e1["PATH_INFO"], e1["RAW_URI"]) == ("/p%25/a/b", "/p%2525/a%2Fb")
    assert e2["PATH_INFO"] == b"/caf\xc3\xa9\xff".decode("latin-1")  # bytes, not U+FFFD


def test_route_prefix_matches_the_path_decoded_once():
    """Prefixes match the raw path decoded once (as PATH_INFO), whatever request.path holds:
    `%25C3` is the text `%C3`, not the byte it would give if decoded twice."""
    w = WSGIApp(environ_app, Config(_env={}, route_deadline=["/caf%C3%A9=20"]))
    decoded = Request("GET", "/caf%C3%A9/x", "/caf\u00e9/x", "", "HTTP/1.1", [("host", "h")],
                      raw_path="/caf%C3%A9/x")
    assert w.resolve(decoded).name == "wsgi:/caf%C3%A9"
    assert w.resolve(_request("GET", "/caf%25C3%25A9/x")).name == "wsgi"  # %25: data


def test_higher_minor_version_is_served_as_http_1_1():
    """RFC 9110 6.2: HTTP/1.2 is processed as 1.1, answered as 1.1, and the app is told 1.1."""
    with running_server(environ_app) as addr:
        s = connect(addr)
        try:
            s.sendall(b"GET / HTTP/1.2\r\nHost: h\r\n\r\n")
            f = s.makefile("rb")
            head = [f.readline()]
            while head[-1] not in (b"\r\n", b""):
                head.append(f.readline())
            length = next(int(line.split(b":")[1]) for line in head
                          if line.lower().startswith(b"content-length:"))
            env = json.loads(f.read(length))
        finally:
            s.close()
    assert head[0].startswith(b"HTTP/1.1 200 ")
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"


def test_trailer_fields_never_reach_the_environ():
    """RFC 9110 6.5.1: trailers are discarded, never merged into the header fields."""
    with running_server(environ_app) as addr:
        status, _, body = raw(
            addr,
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Checksum: abc\r\nServer-Timing: db;dur=5\r\n\r\n",
        )
    env = json.loads(body)
    assert status == 200 and env["body"] == "abc"
    assert "HTTP_X_CHECKSUM" not in env and "HTTP_SERVER_TIMING" not in env


def test_multiprocess_flag_follows_processes():
    cfg = Config(_env={}, processes="4")
    env = WSGIApp(environ_app, cfg).environ(_request("GET", "/"))
    assert env["wsgi.multiprocess"] is True


def test_root_path_sets_script_name_and_strips_path_info():
    lint = Linted(environ_app)
    with running_server(lint, root_path="/app/") as addr:
        e1 = requests.get(url(addr, "/app/x/y")).json()
        e2 = requests.get(url(addr, "/app")).json()
        e3 = requests.get(url(addr, "/application")).json()
        e4 = requests.get(url(addr, "/other")).json()
    assert (e1["SCRIPT_NAME"], e1["PATH_INFO"]) == ("/app", "/x/y")
    assert (e2["SCRIPT_NAME"], e2["PATH_INFO"]) == ("/app", "")
    assert (e3["SCRIPT_NAME"], e3["PATH_INFO"]) == ("/app", "/application")  # not a segment
    assert (e4["SCRIPT_NAME"], e4["PATH_INFO"]) == ("/app", "/other")
    lint.check(4)


def test_non_ascii_root_path_matches_the_decoded_path():
    w = WSGIApp(environ_app, Config(_env={}, root_path="/café"))
    env = w.environ(_request("GET", "/caf%C3%A9/x"))
    assert env["SCRIPT_NAME"] == "/café".encode().decode("latin-1")
    assert env["PATH_INFO"] == "/x"


def test_http10_without_host_uses_the_bound_address():
    lint = Linted(environ_app)
    with running_server(lint) as addr:
        status, _, body = raw(addr, b"GET / HTTP/1.0\r\n\r\n")
    env = json.loads(body)
    assert status == 200
    assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert "HTTP_HOST" not in env
    lint.check()


def test_underscore_header_names_are_dropped():
    lint = Linted(environ_app)
    with running_server(lint) as addr:
        status, _, body = raw(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\nX-Auth_User: admin\r\n"
            b"X-Auth-User: alice\r\n\r\n",
        )
    env = json.loads(body)
    assert status == 200
    assert env["HTTP_X_AUTH_USER"] == "alice"  # only the dash spelling reaches the app
    assert "HTTP_X_FORWARDED_FOR" not in env
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    lint.check()


# ---- request bodies ------------------------------------------------------------------


def echo_lines_app(environ: dict, start_response: Any) -> list[bytes]:
    """Reads wsgi.input every way PEP 3333 allows: read(n), readline(n), readline(), iteration."""
    inp = environ["wsgi.input"]
    first = inp.read(3)
    part = inp.readline(2)
    line = inp.readline()
    rest = list(inp)
    out = json.dumps({
        "first": first.decode(), "part": part.decode(), "line": line.decode(),
        "rest": [r.decode() for r in rest],
        "CONTENT_LENGTH": environ.get("CONTENT_LENGTH"),
        "CONTENT_TYPE": environ.get("CONTENT_TYPE"),
        "te": environ.get("HTTP_TRANSFER_ENCODING"),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [out]


def test_post_with_content_length():
    lint = Linted(echo_lines_app)
    with running_server(lint) as addr:
        r = requests.post(url(addr, "/p"), data=b"abcdef\nline2\nline3\n",
                          headers={"Content-Type": "text/x-lines"})
    assert r.status_code == 200
    got = r.json()
    assert got["first"] == "abc" and got["part"] == "de" and got["line"] == "f\n"
    assert got["rest"] == ["line2\n", "line3\n"]
    assert got["CONTENT_LENGTH"] == "19" and got["CONTENT_TYPE"] == "text/x-lines"
    lint.check()


def test_post_with_chunked_body():
    lint = Linted(echo_lines_app)
    with running_server(lint) as addr:
        status, _, body = raw(
            addr,
            b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: text/plain\r\n\r\n"
            b"4\r\nabcd\r\n6\r\nef\nxy\n\r\n0\r\n\r\n",
        )
    got = json.loads(body)
    assert status == 200
    assert got["first"] == "abc" and got["part"] == "de" and got["line"] == "f\n"
    assert got["rest"] == ["xy\n"]
    assert got["CONTENT_LENGTH"] == "10"  # de-chunked by the server before the app runs
    assert got["te"] is None
    lint.check()


# ---- responses -----------------------------------------------------------------------


def test_head_keeps_the_apps_content_length_and_sends_no_body():
    def app(environ, start_response):
        body = b"x" * 1234
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]

    lint = Linted(app)
    with running_server(lint) as addr:
        s = connect(addr)
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        f = s.makefile("rb")
        st1, h1, b1 = read_response_file(f, head_only=True)
        st2, h2, b2 = read_response_file(f)  # would be garbage if HEAD had sent a body
        s.close()
    assert (st1, h1["content-length"], b1) == (200, "1234", b"")
    assert (st2, len(b2)) == (200, 1234)
    lint.check(2)


def test_streaming_iterable_is_sent_as_produced_and_chunked():
    second = threading.Event()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])

        def gen():
            yield b"first;"
            second.wait(10)
            yield b""  # empty chunks must not end the chunked body
            yield b"second;"

        return gen()

    lint = Linted(app)
    with running_server(lint) as addr:
        s = connect(addr)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b"first;" not in got:  # arrives while the generator is still blocked
            chunk = s.recv(4096)
            assert chunk
            got += chunk
        assert b"Transfer-Encoding: chunked" in got and b"second" not in got
        second.set()
        while not got.endswith(b"0\r\n\r\n"):
            chunk = s.recv(4096)
            assert chunk
            got += chunk
        s.close()
    assert b"6\r\nfirst;\r\n" in got and b"7\r\nsecond;\r\n" in got
    lint.check()


def test_streaming_with_content_length_is_not_chunked():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
        return iter([b"01234", b"56789"])

    lint = Linted(app)
    with running_server(lint) as addr:
        r = requests.get(url(addr, "/"))
    assert r.content == b"0123456789" and r.headers["Content-Length"] == "10"
    assert "Transfer-Encoding" not in r.headers
    lint.check()


def test_write_callable_then_iterable():
    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"one;")
        write(b"two;")
        if environ["PATH_INFO"] == "/gen":
            return (c for c in [b"three;", b"four;"])
        return [b"three;"]

    lint = Linted(app)
    with running_server(lint) as addr:
        r1 = requests.get(url(addr, "/list"))
        r2 = requests.get(url(addr, "/gen"))
    assert r1.content == b"one;two;three;"
    assert r2.content == b"one;two;three;four;"
    lint.check(2)


def test_file_wrapper_under_the_validator_is_iterated(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 400)

    def app(environ, start_response):
        f = open(path, "rb")  # noqa: SIM115 - closed by the server through the wrapper
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](f, 4096)

    lint = Linted(app)
    with running_server(lint) as addr:
        r = requests.get(url(addr, "/"))
    assert r.content == path.read_bytes()
    lint.check()


def test_file_wrapper_is_sent_with_sendfile_from_the_current_position(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    opened: list[Any] = []
    calls: list[int] = []
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd, in_fd, offset, count):
        calls.append(count)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting_sendfile)

    def app(environ, start_response):
        f = open(path, "rb")  # noqa: SIM115 - closed by the server through the wrapper
        opened.append(f)
        f.seek(100)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](f)

    with running_server(app) as addr:
        r = requests.get(url(addr, "/"))
        h = requests.head(url(addr, "/"))
    assert r.status_code == 200
    assert r.content == path.read_bytes()[100:]
    assert r.headers["Content-Length"] == str(256_000 - 100)
    assert calls, "os.sendfile was not used"
    assert h.headers["Content-Length"] == str(256_000 - 100)
    assert all(f.closed for f in opened) and len(opened) == 2


def test_file_wrapper_without_fileno_is_iterated_in_blocks():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"abc" * 10_000), 1000)

    lint = Linted(app)
    with running_server(lint) as addr:
        r = requests.get(url(addr, "/"))
    assert r.content == b"abc" * 10_000
    lint.check()


def test_wsgi_errors_go_to_the_error_logger(caplog):
    def app(environ, start_response):
        environ["wsgi.errors"].write("line one\npartial ")
        environ["wsgi.errors"].writelines(["line two\n"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    lint = Linted(app)
    with caplog.at_level(logging.ERROR, logger="rtserve.error"), running_server(lint) as addr:
        assert requests.get(url(addr, "/")).content == b"ok"
    messages = [r.getMessage() for r in caplog.records if r.name == "rtserve.error"]
    assert "line one" in messages and "partial line two" in messages
    lint.check()


# ---- errors --------------------------------------------------------------------------


def test_app_raising_before_start_response_is_a_500_and_the_server_lives_on():
    def app(environ, start_response):
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("secret detail")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"fine"]

    lint = Linted(app)
    with running_server(lint) as addr:
        r = requests.get(url(addr, "/boom"))
        ok = requests.get(url(addr, "/fine"))
    assert r.status_code == 500 and b"secret" not in r.content
    assert ok.content == b"fine"
    assert not lint.errors


def test_app_raising_after_start_response_is_a_500():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])

        def gen():
            raise RuntimeError("before any body")
            yield b"never"

        return gen()

    lint = Linted(app)
    with running_server(lint) as addr:
        r = requests.get(url(addr, "/"))
    assert r.status_code == 500
    lint.check()


def test_exc_info_before_the_headers_went_out_replaces_the_status():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("oops")
        except ValueError:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")],
                           sys.exc_info())
        return [b"sorry"]

    lint = Linted(app)
    with running_server(lint) as addr:
        r = requests.get(url(addr, "/"))
    assert r.status_code == 503 and r.content == b"sorry"
    lint.check()


def test_start_response_twice_without_exc_info_is_an_error():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"x"]

    with running_server(app) as addr:
        assert requests.get(url(addr, "/")).status_code == 500


def test_app_without_start_response_is_a_500():
    def app(environ, start_response):
        return [b"no status"]

    with running_server(app) as addr:
        assert requests.get(url(addr, "/")).status_code == 500


@pytest.mark.parametrize("length", ["4", None])
def test_close_raising_runs_once(length):
    """Closed before the head went out (bytes path): a 500; while streaming: logged only."""
    calls = []
    closed = threading.Event()

    class Body:
        def __iter__(self):
            return iter([b"data"])

        def close(self):
            calls.append(1)
            closed.set()
            raise RuntimeError("close failed")

    def app(environ, start_response):
        headers = [("Content-Type", "text/plain")]
        if length:
            headers.append(("Content-Length", length))
        start_response("200 OK", headers)
        return Body()

    with running_server(app) as addr:
        r = requests.get(url(addr, "/"))
    if length:
        assert r.status_code == 500
    else:
        assert (r.status_code, r.content) == (200, b"data")
    assert closed.wait(10) and calls == [1]


@pytest.mark.parametrize("value", ["a\r\nSet-Cookie: evil=1", "a\nb", "a\x00b"])
def test_header_injection_from_the_app_is_a_500(value):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Bad", value)])
        return [b"x"]

    with running_server(app) as addr:
        status, headers, body = raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 500 and "set-cookie" not in headers and "x-bad" not in headers


def _failing_stream_app(closed: threading.Event, length: str | None, exc_info: bool = False):
    def app(environ, start_response):
        headers = [("Content-Type", "text/plain")]
        if length:
            headers.append(("Content-Length", length))
        start_response("200 OK", headers)

        def gen():
            try:
                yield b"first-part;"
                try:
                    raise RuntimeError("midway")
                except RuntimeError:
                    if not exc_info:
                        raise
                    # after the headers went out, start_response must re-raise
                    start_response("500 Internal Server Error",
                                   [("Content-Type", "text/plain")], sys.exc_info())
                yield b"never"
            finally:
                closed.set()

        return gen()

    return app


@pytest.mark.parametrize("exc_info", [False, True])
def test_iterable_raising_midway_closes_without_the_last_chunk(exc_info):
    closed = threading.Event()
    lint = Linted(_failing_stream_app(closed, None, exc_info))
    with running_server(lint) as addr:
        s = connect(addr)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = recv_until_closed(s)  # returns only because the server closed
        s.close()
    assert data.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in data
    assert b"first-part;" in data and b"never" not in data
    assert not data.endswith(b"0\r\n\r\n"), "a broken stream must not look complete"
    assert closed.wait(10)
    assert lint.wait_closed(1)


def test_iterable_raising_midway_with_content_length_closes_short():
    closed = threading.Event()
    lint = Linted(_failing_stream_app(closed, "100"))
    with running_server(lint) as addr:
        s = connect(addr)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = recv_until_closed(s)
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 100" in head
    assert body == b"first-part;"  # 11 of 100 bytes, then the close: visibly truncated
    assert closed.wait(10)


def test_close_is_called_when_the_client_disconnects_mid_stream():
    closed = threading.Event()
    produced = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])

        def forever():
            try:
                while True:
                    produced.append(1)
                    yield b"z" * 16384
            finally:
                closed.set()

        return forever()

    lint = Linted(app)
    with running_server(lint) as addr:
        s = connect(addr)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # gone mid-stream, with unread data: the server sees a reset
        assert closed.wait(10), "close() of the app iterable was not called"
        assert lint.wait_closed(1)
        # and the server is fine afterwards
        again = requests.get(url(addr, "/"), stream=True)
        assert again.status_code == 200
        again.close()
    assert not lint.errors


def test_keep_alive_across_bytes_and_streamed_responses():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        if environ["PATH_INFO"] == "/s":
            return (b"s%d;" % i for i in range(3))
        return [b"b;"]

    lint = Linted(app)
    with running_server(lint) as addr, requests.Session() as sess:
        bodies = [sess.get(url(addr, p)).content for p in ("/b", "/s", "/b", "/s")]
    assert bodies == [b"b;", b"s0;s1;s2;", b"b;", b"s0;s1;s2;"]
    lint.check(4)


# ---- trusted proxies -------------------------------------------------------------------


def _forwarded_env(addr, headers: dict) -> dict:
    return requests.get(url(addr, "/"), headers=headers).json()


def test_forwarded_headers_honoured_from_an_allowed_peer():
    lint = Linted(environ_app)
    with running_server(lint) as addr:  # default forwarded_allow_ips: 127.0.0.1
        e1 = _forwarded_env(addr, {"X-Forwarded-For": "203.0.113.7",
                                   "X-Forwarded-Proto": "https"})
        e2 = _forwarded_env(addr, {"X-Forwarded-For": "1.1.1.1, 203.0.113.7"})
        e3 = _forwarded_env(addr, {"Forwarded": 'for="[2001:db8::1]:4711";proto=https'})
    assert (e1["REMOTE_ADDR"], e1["wsgi.url_scheme"]) == ("203.0.113.7", "https")
    # the rightmost untrusted hop: what our proxy saw, not what the client claimed
    assert e2["REMOTE_ADDR"] == "203.0.113.7" and e2["wsgi.url_scheme"] == "http"
    assert (e3["REMOTE_ADDR"], e3["REMOTE_PORT"], e3["wsgi.url_scheme"]) == (
        "2001:db8::1", "4711", "https")
    lint.check(3)


def test_forwarded_headers_ignored_from_other_peers():
    lint = Linted(environ_app)
    with running_server(lint, forwarded_allow_ips="10.0.0.1,192.168.0.0/16") as addr:
        e1 = _forwarded_env(addr, {"X-Forwarded-For": "203.0.113.7",
                                   "X-Forwarded-Proto": "https"})
        e2 = _forwarded_env(addr, {"Forwarded": "for=203.0.113.7;proto=https"})
    for env in (e1, e2):
        assert env["REMOTE_ADDR"] == "127.0.0.1" and env["wsgi.url_scheme"] == "http"
    assert e1["HTTP_X_FORWARDED_FOR"] == "203.0.113.7"  # still visible, just not trusted
    lint.check(2)


def test_forwarded_allow_all():
    lint = Linted(environ_app)
    with running_server(lint, forwarded_allow_ips="*") as addr:
        env = _forwarded_env(addr, {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"})
    assert env["REMOTE_ADDR"] == "198.51.100.1"  # every hop trusted: the leftmost
    lint.check()


def test_forwarded_policy_unit():
    p = ForwardedPolicy(["127.0.0.1", "10.0.0.0/8"])
    assert p.trusts("127.0.0.1") and p.trusts("10.1.2.3") and not p.trusts("11.0.0.1")
    assert p.resolve("11.0.0.1", None, "1.2.3.4", "https") == (None, None, None)
    assert p.resolve("127.0.0.1", None, "1.2.3.4, 10.0.0.5", "http, https") == (
        "1.2.3.4", None, "https")
    # garbage or "unknown" never becomes REMOTE_ADDR
    assert p.resolve("127.0.0.1", None, "not-an-ip", None) == (None, None, None)
    assert p.resolve("127.0.0.1", "for=unknown", None, None) == (None, None, None)
    assert p.resolve("127.0.0.1", None, None, "gopher") == (None, None, None)
    hops, proto = parse_forwarded('for=192.0.2.60;proto=http;by=203.0.113.43, '
                                  'For="[2001:db8:cafe::17]:4711", for=198.51.100.17;proto=https')
    assert hops == [("192.0.2.60", None), ("2001:db8:cafe::17", 4711), ("198.51.100.17", None)]
    assert proto == "https"
    with pytest.raises(ValueError):
        ForwardedPolicy(["10.0.0.0/99"])


# ---- deadlines and fallbacks for WSGI routes -------------------------------------------


def test_route_deadline_sends_the_configured_fallback():
    release = threading.Event()
    entered = threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"].startswith("/score"):
            entered.set()
            release.wait(10)  # a model that is far too slow today
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"computed"]

    try:
        with running_server(
            app, route_deadline=["/score=50"], fallback=['/score=200:{"decision":"review"}']
        ) as addr:
            r = requests.get(url(addr, "/score/card"))
            assert entered.is_set()
            other = requests.get(url(addr, "/other"))
            release.set()
    finally:
        release.set()
    assert r.status_code == 200
    assert r.json() == {"decision": "review"}
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["X-Rtserve-Fallback"] == "deadline"
    assert other.content == b"computed" and "X-Rtserve-Fallback" not in other.headers


def test_server_deadline_applies_to_wsgi_routes_without_their_own():
    release = threading.Event()

    def app(environ, start_response):
        release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"late"]

    try:
        with running_server(app, deadline_ms=50) as addr:
            r = requests.get(url(addr, "/anything"))
            release.set()
    finally:
        release.set()
    assert r.status_code == 504


def test_resolve_longest_prefix_segment_wise():
    cfg = Config(_env={}, route_deadline=["/score=20", "/score/batch=500", "/=1000"],
                 fallback=["/score=200:review", "/api/=503:{}"])
    w = WSGIApp(environ_app, cfg)

    def route(path: str) -> Route:
        return w.resolve(_request("GET", path))

    assert route("/score").name == "wsgi:/score"
    assert route("/score/x").deadline_ns == 20_000_000
    assert route("/score/batch/1").deadline_ns == 500_000_000
    assert route("/scoreboard").name == "wsgi"  # not a path segment
    assert w.default_route.deadline_ns == 1_000_000_000
    assert route("/sc%6Fre").name == "wsgi:/score"  # matched on the decoded path
    api = route("/api/v1")
    assert api.deadline_ns == 0 and api.fallback.status == 503
    fb = route("/score").fallback
    assert fb.body == b"review" and fb.header("Content-Type").startswith("text/plain")


def test_fallback_parsing_survives_env_comma_splitting():
    cfg = Config(_env={"RTSERVE_FALLBACK": '/a=200:{"x":1,"y":2},/b=503:busy'})
    fbs = parse_fallbacks(cfg.fallback)
    assert json.loads(fbs["/a"].body) == {"x": 1, "y": 2}
    assert fbs["/b"].status == 503 and fbs["/b"].body == b"busy"


@pytest.mark.parametrize("settings", [
    {"route_deadline": ["score=20"]},
    {"route_deadline": ["/score=abc"]},
    {"route_deadline": ["/score=0"]},
    {"fallback": ["/score=review"]},
    {"fallback": ["/score=99:x"]},
    {"root_path": "app"},
    {"forwarded_allow_ips": "10.0.0.0/40"},
])
def test_bad_wsgi_settings_are_config_errors(settings):
    with pytest.raises(ConfigError):
        WSGIApp(environ_app, Config(_env={}, **settings))


def test_server_port_defaults_to_the_scheme_port():
    w = WSGIApp(environ_app, Config(_env={}))
    req = _request("GET", "/")
    req.raw_headers = [("host", "api.example"), ("x-forwarded-proto", "https")]
    env = w.environ(req)
    assert (env["SERVER_NAME"], env["SERVER_PORT"], env["wsgi.url_scheme"]) == (
        "api.example", "443", "https")
    req.raw_headers = [("host", "[::1]")]
    env = w.environ(req)
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("::1", "80")


def test_as_dispatcher_wraps_plain_callables():
    d = as_dispatcher(environ_app, Config(_env={}))
    assert isinstance(d, WSGIApp) and d.app is environ_app
    assert isinstance(FileWrapper(io.BytesIO(b"")), FileWrapper)


def _request(method: str, path: str) -> Request:
    req = Request(method, path, path, "", "HTTP/1.1", [("host", "h")])
    req.client = ("127.0.0.1", 5555)
    return req


# ---- the command line: module:app, module:factory(), logging ----------------------------

WSGI_MODULE = '''
import threading

release = threading.Event()


def create_app():
    def app(environ, start_response):
        if environ["PATH_INFO"].startswith("/slow"):
            release.wait(5)
        body = ("%s|%s" % (environ["SCRIPT_NAME"], environ["PATH_INFO"])).encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    return app


app = create_app()
'''


@pytest.fixture
def wsgi_module(tmp_path, monkeypatch):
    name = "rtserve_test_wsgi_mod"
    (tmp_path / f"{name}.py").write_text(WSGI_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path
    sys.modules.pop(name, None)


def test_load_app_attribute_and_factory(wsgi_module):
    from rtserve.cli import AppImportError, load_app

    name, _ = wsgi_module
    plain_app = load_app(f"{name}:app")
    made = load_app(f"{name}:create_app()")
    assert callable(plain_app) and callable(made) and made is not plain_app
    assert load_app(name) is plain_app  # MODULE alone means MODULE:app
    with pytest.raises(AppImportError):
        load_app(f"{name}:nope")
    with running_server(made) as addr:  # the factory's product is served as WSGI
        assert requests.get(url(addr, "/x")).text == "|/x"


def test_log_config_dictconfig_file(tmp_path):
    from rtserve.cli import configure_logging

    logfile = tmp_path / "errors.log"
    conf = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(logfile),
                              "formatter": "plain"}},
        "loggers": {"rtserve.error": {"handlers": ["file"], "level": "INFO",
                                      "propagate": False}},
    }
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(conf))
    logger = logging.getLogger("rtserve.error")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        configure_logging(Config(_env={}, log_config=str(path)))
        logger.info("hello from the %s", "config")
        for h in logger.handlers:
            h.flush()
        assert logfile.read_text() == "INFO rtserve.error hello from the config\n"
    finally:
        for h in logger.handlers:
            h.close()
        logger.handlers[:], logger.level, logger.propagate = saved


def test_cli_serves_a_wsgi_factory_with_deadlines_and_an_access_log(wsgi_module):
    import re
    import signal
    import subprocess

    name, cwd = wsgi_module
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtserve", f"{name}:create_app()", "--bind", "127.0.0.1:0",
         "--root-path", "/svc", "--access-log", "--route-deadline", "/svc/slow=50",
         "--fallback", '/svc/slow=200:{"decision":"review"}', "--log-level", "info"],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("RTSERVE_")},
    )
    try:
        addr = None
        for line in proc.stderr:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                addr = ("127.0.0.1", int(m.group(1)))
                break
        assert addr, "the server did not start"
        r = requests.get(url(addr, "/svc/hello?q=1"), headers={"User-Agent": "ua/1",
                                                                "Referer": "http://r/"})
        slow = requests.get(url(addr, "/svc/slow"))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert r.text == "/svc|/hello"
    assert slow.json() == {"decision": "review"}
    assert slow.headers["X-Rtserve-Fallback"] == "deadline"
    assert proc.returncode == 0, err
    lines = out.splitlines()
    combined = re.compile(
        r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
        r'"GET /svc/hello\?q=1 HTTP/1\.1" 200 \S+ "http://r/" "ua/1"'
    )
    assert any(combined.match(line) for line in lines), lines


def test_cli_rejects_a_bad_fallback(wsgi_module):
    import subprocess

    name, cwd = wsgi_module
    proc = subprocess.run(
        [sys.executable, "-m", "rtserve", f"{name}:app", "--bind", "127.0.0.1:0",
         "--fallback", "/x=oops"],
        cwd=cwd, capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("RTSERVE_")},
    )
    assert proc.returncode == 2 and "fallback" in proc.stderr


# ---- environ templates (a head the parser took from its cache) -----------------------


def _parsed(data: bytes, cache: Any, client: tuple[str, int]) -> Request:
    from rtserve.parser import RequestParser

    parser = RequestParser(head_cache=cache)
    parser.feed(data)
    req = parser.next_event()
    assert isinstance(req, Request)
    req.client = client
    return req


def test_requests_with_one_cached_head_get_equal_environs_of_their_own():
    from rtserve.head_cache import HeadCache

    head = (b"GET /p/q%20r?x=1 HTTP/1.1\r\nHost: example.com:8443\r\nCookie: a=1\r\n"
            b"Cookie: b=2\r\nContent-Type: text/x\r\n\r\n")
    wsgi = WSGIApp(environ_app, Config(root_path="/p"))
    cache = HeadCache()
    reqs = [_parsed(head, cache, ("127.0.0.1", 4000 + i)) for i in range(4)]
    assert reqs[0].head is None and reqs[1].head is not None  # cached from the second on
    assert all(r.head is reqs[1].head for r in reqs[2:])
    envs = [wsgi.environ(r) for r in reqs]
    envs[2]["HTTP_COOKIE"] = "changed by the app"  # an app's own copy: never shared
    envs[2]["app.key"] = 1
    envs.append(wsgi.environ(_parsed(head, cache, ("127.0.0.1", 4009))))
    by_hand = Request("GET", "/p/q%20r?x=1", "/p/q r", "x=1", "HTTP/1.1",
                      [("host", "example.com:8443"), ("cookie", "a=1"), ("cookie", "b=2"),
                       ("content-type", "text/x")], raw_path="/p/q%20r")
    by_hand.client = ("127.0.0.1", 4009)
    expected = wsgi.environ(by_hand)  # no head: built key by key
    per_request = {"wsgi.input", "wsgi.errors", "rtserve.request", "REMOTE_PORT"}

    def fixed(env: dict) -> dict:
        return {k: v for k, v in env.items() if k not in per_request}

    for i, (req, env) in enumerate(zip([*reqs, None], envs, strict=True)):
        if i != 2:
            assert fixed(env) == fixed(expected), i
        assert env["REMOTE_PORT"] == str(4000 + i if i < 4 else 4009)
        if req is not None:
            assert env["rtserve.request"] is req
    assert envs[4]["PATH_INFO"] == "/q r" and envs[4]["SCRIPT_NAME"] == "/p"
    assert envs[4]["HTTP_COOKIE"] == "a=1; b=2" and "app.key" not in envs[4]
    assert len({id(e["wsgi.errors"]) for e in envs}) == len(envs)


def test_a_cached_head_with_proxy_headers_is_resolved_per_peer():
    from rtserve.head_cache import HeadCache

    head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"
    wsgi = WSGIApp(environ_app, Config(forwarded_allow_ips="10.0.0.1"))
    cache = HeadCache()
    _parsed(head, cache, ("10.0.0.1", 1))
    trusted = wsgi.environ(_parsed(head, cache, ("10.0.0.1", 1)))
    other = wsgi.environ(_parsed(head, cache, ("10.0.0.2", 2)))
    again = wsgi.environ(_parsed(head, cache, ("10.0.0.1", 3)))
    assert trusted["REMOTE_ADDR"] == again["REMOTE_ADDR"] == "203.0.113.7"
    assert other["REMOTE_ADDR"] == "10.0.0.2"


def test_one_connection_repeating_a_head_sees_the_same_environ():
    seen: list[dict] = []

    def app(environ: dict, start_response: Any) -> list[bytes]:
        seen.append({k: v for k, v in environ.items() if isinstance(v, str)})
        environ["HTTP_HOST"] = "mutated"  # must not reach the next request
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    req = b"GET /x?y HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\n\r\n"
    with running_server(app) as addr:
        socks = [connect(addr), connect(addr)]
        for s in socks:
            for _ in range(3):
                s.sendall(req)
                assert read_response(s)[0] == 200
        ports = [str(s.getsockname()[1]) for s in socks]
        for s in socks:
            s.close()
    assert len(seen) == 6
    for i, env in enumerate(seen):
        assert env["HTTP_HOST"] == "example.com" and env["PATH_INFO"] == "/x"
        assert env["REMOTE_PORT"] == ports[i // 3]
        assert {k: v for k, v in env.items() if k != "REMOTE_PORT"} == {
            k: v for k, v in seen[0].items() if k != "REMOTE_PORT"}


def _echo_body(environ: dict, start_response: Any) -> list[bytes]:
    """Echo wsgi.input with the CONTENT_LENGTH the environ says."""
    body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [environ["CONTENT_LENGTH"].encode() + b":" + body]


def test_posts_with_one_cached_head_each_read_their_own_body():
    """The scoring case over one keep-alive connection: the parser's cached head and the
    environ template made for it, a different body every time (http.client)."""
    import http.client

    with running_server(WSGIApp(_echo_body), threads=2) as (host, port):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        for i in range(6):
            body = b'{"tx":%d}' % i
            conn.request("POST", "/score", body=body,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read() == b"%d:%s" % (len(body), body)
        conn.close()
