"""Response framing (framing.py): the unit tests of serialize / simple / prebuilt /
connection, and the over-the-wire agreement of every kind of answer.

framing.py is the one place that decides the Connection header and whether the
connection stays open, for a handler's answer and for the answers the conductor makes
(404, 405, 413, 503, 504, a fallback, /readyz). The last part of this file checks that
promise over raw sockets: for each request style (HTTP/1.0 with and without
`Connection: keep-alive`, HTTP/1.1 with and without `Connection: close`) each answer's
Connection header says what the socket then does (a second request is answered, or EOF).
"""

from __future__ import annotations

import socket
import tempfile
import threading
from collections.abc import Iterator

import pytest

from rtserve import App, Request, Response
from rtserve.framing import (
    CHUNKED,
    CLOSE,
    JOIN_MAX,
    KEEP_ALIVE,
    FileReply,
    StreamFraming,
    StreamPlan,
    connection,
    prebuilt,
    serialize,
    simple,
)
from rtserve.parser import RequestParser
from rtserve.response import FileBody, InvalidResponse
from rtserve.server import Server
from tests.helpers import REVIEW, connect, read_response_file, server_thread, wait_for


def req(method: str = "GET", version: str = "HTTP/1.1", *headers: str) -> Request:
    """A request as the real parser makes it."""
    lines = [f"{method} /p {version}", "Host: t", *headers]
    p = RequestParser()
    p.feed(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    r = p.next_event()
    assert isinstance(r, Request)
    return r


GET11 = req()
GET10 = req("GET", "HTTP/1.0")
GET10_KA = req("GET", "HTTP/1.0", "Connection: keep-alive")
GET11_CLOSE = req("GET", "HTTP/1.1", "Connection: close")
HEAD11 = req("HEAD")


def split(data: bytes) -> tuple[bytes, dict[str, list[str]], bytes]:
    """(status line, {lower-case name: [values]}, body) of a serialised response."""
    head, _, body = data.partition(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return first.encode("latin-1"), headers, body


class Closable:
    """An iterable body that records its close() (PEP 3333)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def file_body() -> Iterator[FileBody]:
    with tempfile.TemporaryFile() as f:
        f.write(b"0123456789" * 10)
        f.flush()
        yield FileBody(f)


# ---- connection() ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_, close, want",
    [
        (None, False, (CLOSE, False)),  # the parser refused it: framing in doubt
        (GET11, False, (b"", True)),  # 1.1 is persistent without saying so
        (GET11, True, (CLOSE, False)),
        (GET11_CLOSE, False, (CLOSE, False)),
        (GET10, False, (CLOSE, False)),
        (GET10_KA, False, (KEEP_ALIVE, True)),  # 1.0 needs keep-alive said back
        (GET10_KA, True, (CLOSE, False)),
    ],
    ids=["none", "1.1", "1.1-server-close", "1.1-client-close", "1.0", "1.0-ka",
         "1.0-ka-server-close"],
)
def test_connection_line(request_: Request | None, close: bool, want: tuple) -> None:
    assert connection(request_, close) == want


# ---- serialize(): bytes bodies -----------------------------------------------------------


def test_bytes_body_gets_its_length_date_and_no_connection_header_on_1_1() -> None:
    status, keep, data = serialize(GET11, Response.text("hello"), False)
    assert (status, keep) == (200, True)
    line, headers, body = split(data)
    assert line == b"HTTP/1.1 200 OK"
    assert headers["content-length"] == ["5"] and body == b"hello"
    assert len(headers["date"]) == 1 and "connection" not in headers
    assert headers["content-type"] == ["text/plain; charset=utf-8"]


@pytest.mark.parametrize(
    "request_, want_line, want_keep",
    [(GET10, ["close"], False), (GET10_KA, ["keep-alive"], True),
     (GET11_CLOSE, ["close"], False)],
    ids=["1.0", "1.0-ka", "1.1-close"],
)
def test_bytes_body_connection_header(request_: Request, want_line: list, want_keep: bool
                                      ) -> None:
    _, keep, data = serialize(request_, Response.text("x"), False)
    assert keep is want_keep and split(data)[1]["connection"] == want_line


def test_handler_connection_close_and_draining_close() -> None:
    _, keep, data = serialize(GET11, Response.text("x", headers=[("Connection", "close")]), False)
    assert not keep and split(data)[1]["connection"] == ["close"]
    _, keep, data = serialize(GET11, Response.text("x"), True)
    assert not keep and split(data)[1]["connection"] == ["close"]


def test_framing_headers_from_the_handler_are_the_servers() -> None:
    """Content-Length is the body's, Transfer-Encoding is dropped, a Date is not doubled."""
    resp = Response(b"abc", 200, [("Content-Length", "999"), ("Transfer-Encoding", "chunked"),
                                  ("Date", "Mon, 01 Jan 2024 00:00:00 GMT")])
    _, _, data = serialize(GET11, resp, False)
    _, headers, body = split(data)
    assert headers["content-length"] == ["3"] and body == b"abc"
    assert "transfer-encoding" not in headers
    assert headers["date"] == ["Mon, 01 Jan 2024 00:00:00 GMT"]


def test_head_has_the_get_length_and_no_body() -> None:
    _, keep, data = serialize(HEAD11, Response.text("hello"), False)
    _, headers, body = split(data)
    assert keep and headers["content-length"] == ["5"] and body == b""


def test_head_with_an_empty_body_keeps_the_handlers_length() -> None:
    _, _, data = serialize(HEAD11, Response(b"", 200, [("Content-Length", "42")]), False)
    _, headers, body = split(data)
    assert headers["content-length"] == ["42"] and body == b""


@pytest.mark.parametrize("status", [204, 304, 100, 103])
def test_no_body_statuses_send_neither_body_nor_length(status: int) -> None:
    got, keep, data = serialize(GET11, Response(b"ignored", status), False)
    assert got == status and keep
    _, headers, body = split(data)
    assert "content-length" not in headers and body == b""


def test_a_large_body_is_sent_beside_the_head_uncopied() -> None:
    big = b"x" * JOIN_MAX
    _, keep, data = serialize(GET11, Response(big), False)
    assert keep and isinstance(data, tuple)
    head, body = data
    assert body is big
    assert head.endswith(b"\r\n\r\n") and split(head)[1]["content-length"] == [str(JOIN_MAX)]
    _, _, small = serialize(GET11, Response(big[:-1]), False)
    assert isinstance(small, bytes) and small.endswith(big[:-1])


def test_a_large_body_to_head_is_the_head_alone() -> None:
    _, _, data = serialize(HEAD11, Response(b"x" * (2 * JOIN_MAX)), False)
    assert isinstance(data, bytes)
    _, headers, body = split(data)
    assert headers["content-length"] == [str(2 * JOIN_MAX)] and body == b""


def test_invalid_header_raises() -> None:
    with pytest.raises(InvalidResponse):
        serialize(GET11, Response.text("x", headers=[("X-Bad", "a\r\nSet-Cookie: e=1")]), False)
    with pytest.raises(InvalidResponse):
        serialize(GET11, Response(b"x", 42), False)


# ---- serialize(): iterable bodies -------------------------------------------------------


def test_stream_without_length_on_1_1_is_chunked() -> None:
    body = Closable([b"a", b"b"])
    _, keep, plan = serialize(GET11, Response(body), False)
    assert keep and isinstance(plan, StreamPlan)
    assert plan.chunked and plan.length is None and plan.iterable is body
    assert CHUNKED in plan.head and b"Content-Length" not in plan.head
    assert not body.closed  # the worker streams it, then closes it


def test_stream_with_a_length_is_not_chunked() -> None:
    _, keep, plan = serialize(GET11, Response(Closable([b"ab"]), 200, [("Content-Length", "2")]),
                              False)
    assert keep and isinstance(plan, StreamPlan)
    assert not plan.chunked and plan.length == 2
    assert b"Content-Length: 2\r\n" in plan.head and CHUNKED not in plan.head


@pytest.mark.parametrize("request_", [GET10, GET10_KA], ids=["1.0", "1.0-ka"])
def test_stream_without_length_on_1_0_is_close_delimited(request_: Request) -> None:
    _, keep, plan = serialize(request_, Response(Closable([b"a"])), False)
    assert not keep and isinstance(plan, StreamPlan)
    assert not plan.chunked and plan.length is None
    _, headers, _ = split(plan.head)
    assert headers["connection"] == ["close"]
    assert "content-length" not in headers and "transfer-encoding" not in headers


def test_stream_with_a_length_on_1_0_keep_alive_stays_open() -> None:
    _, keep, plan = serialize(GET10_KA, Response(Closable([b"ab"]), 200,
                                                 [("Content-Length", "2")]), False)
    assert keep and isinstance(plan, StreamPlan)
    assert split(plan.head)[1]["connection"] == ["keep-alive"]


def test_stream_to_head_is_closed_and_not_streamed() -> None:
    body = Closable([b"abc"])
    _, keep, data = serialize(HEAD11, Response(body, 200, [("Content-Length", "3")]), False)
    assert keep and isinstance(data, bytes) and body.closed
    _, headers, rest = split(data)
    assert headers["content-length"] == ["3"] and rest == b""


def test_stream_with_204_is_closed_without_a_length() -> None:
    body = Closable([b"abc"])
    _, _, data = serialize(GET11, Response(body, 204, [("Content-Length", "3")]), False)
    assert isinstance(data, bytes) and body.closed
    assert "content-length" not in split(data)[1]


# ---- serialize(): FileBody ---------------------------------------------------------------


def test_file_body_is_a_file_reply(file_body: FileBody) -> None:
    _, keep, data = serialize(GET11, Response(file_body), False)
    assert keep and isinstance(data, FileReply) and data.file is file_body
    assert split(data.head)[1]["content-length"] == ["100"]


def test_file_body_is_cut_at_the_handlers_length(file_body: FileBody) -> None:
    _, _, data = serialize(GET11, Response(file_body, 200, [("Content-Length", "10")]), False)
    assert isinstance(data, FileReply) and file_body.count == 10
    assert split(data.head)[1]["content-length"] == ["10"]


def test_file_body_to_head_is_closed(file_body: FileBody) -> None:
    _, _, data = serialize(HEAD11, Response(file_body), False)
    assert isinstance(data, bytes) and file_body.file.closed
    _, headers, rest = split(data)
    assert headers["content-length"] == ["100"] and rest == b""


def test_file_body_with_204_sends_no_length(file_body: FileBody) -> None:
    _, _, data = serialize(GET11, Response(file_body, 204), False)
    assert isinstance(data, bytes) and file_body.file.closed
    assert "content-length" not in split(data)[1]


# ---- simple() and prebuilt() -------------------------------------------------------------


def test_simple_without_a_request_closes() -> None:
    status, keep, data = simple(400, None, False)
    assert (status, keep) == (400, False)
    line, headers, body = split(data)
    assert line == b"HTTP/1.1 400 Bad Request" and body == b"400 Bad Request\n"
    assert headers["connection"] == ["close"]
    assert headers["content-length"] == [str(len(body))]
    assert headers["content-type"] == ["text/plain; charset=utf-8"]


@pytest.mark.parametrize(
    "request_, draining, close, want_keep, want_conn",
    [
        (GET11, False, False, True, None),
        (GET11, True, False, False, ["close"]),
        (GET11, False, True, False, ["close"]),
        (GET11_CLOSE, False, False, False, ["close"]),
        (GET10, False, False, False, ["close"]),
        (GET10_KA, False, False, True, ["keep-alive"]),
    ],
    ids=["1.1", "draining", "close", "1.1-close", "1.0", "1.0-ka"],
)
def test_simple_follows_the_request(request_: Request, draining: bool, close: bool,
                                    want_keep: bool, want_conn: list | None) -> None:
    _, keep, data = simple(503, request_, draining, extra=b"Retry-After: 1\r\n", close=close)
    _, headers, body = split(data)
    assert keep is want_keep and headers.get("connection") == want_conn
    assert headers["retry-after"] == ["1"] and body == b"503 Service Unavailable\n"


def test_simple_to_head_has_the_length_and_no_body() -> None:
    _, _, data = simple(504, HEAD11, False)
    _, headers, body = split(data)
    assert headers["content-length"] == [str(len(b"504 Gateway Timeout\n"))] and body == b""


def test_simple_below_400_has_no_default_body() -> None:
    _, _, data = simple(200, GET11, False)
    _, headers, body = split(data)
    assert headers["content-length"] == ["0"] and body == b"" and "content-type" not in headers


@pytest.mark.parametrize(
    "request_, draining, want_keep, want_conn",
    [(GET11, False, True, None), (GET11, True, False, ["close"]),
     (GET10, False, False, ["close"]), (GET10_KA, False, True, ["keep-alive"])],
    ids=["1.1", "draining", "1.0", "1.0-ka"],
)
def test_prebuilt_fallback(request_: Request, draining: bool, want_keep: bool,
                           want_conn: list | None) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    status, keep, data = prebuilt(200, head, b'{"a":1}', request_, draining,
                                  b"X-Rtserve-Fallback: deadline\r\n")
    assert status == 200 and keep is want_keep
    line, headers, body = split(data)
    assert line == b"HTTP/1.1 200 OK" and body == b'{"a":1}'
    assert headers["content-length"] == ["7"] and headers["x-rtserve-fallback"] == ["deadline"]
    assert headers.get("connection") == want_conn and len(headers["date"]) == 1


def test_prebuilt_to_head_has_no_body() -> None:
    _, _, data = prebuilt(200, b"HTTP/1.1 200 OK\r\n", b"body", HEAD11, False, b"")
    _, headers, body = split(data)
    assert headers["content-length"] == ["4"] and body == b""


# ---- over the wire: every answer agrees with its socket ----------------------------------

MODES = {
    # name: (request line version, extra header, stays open, Connection header expected)
    "1.0": ("HTTP/1.0", "", False, "close"),
    "1.0-keep-alive": ("HTTP/1.0", "Connection: keep-alive\r\n", True, "keep-alive"),
    "1.1": ("HTTP/1.1", "", True, None),
    "1.1-close": ("HTTP/1.1", "Connection: close\r\n", False, "close"),
}
MAX_INFLIGHT = 3


class Holds:
    """Per-key events that handlers wait on, so a late answer never depends on timing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}

    def event(self, key: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(key, threading.Event())

    def release_all(self) -> None:
        with self._lock:
            for ev in self._events.values():
                ev.set()


def _agreement_app(holds: Holds) -> App:
    app = App()

    @app.get("/ok")
    def ok(request: Request) -> Response:
        return Response.text("ok\n")

    @app.get("/stream")
    def stream(request: Request) -> Response:
        return Response(iter([b"a;", b"b;"]), 200, None, "text/plain")

    @app.post("/echo")
    def echo(request: Request) -> Response:
        return Response(request.body)

    @app.get("/hold")
    def hold(request: Request) -> Response:
        holds.event(request.query_param("k", "")).wait(10)
        return Response.text("held\n")

    @app.get("/late", deadline_ms=30)
    def late(request: Request) -> Response:
        holds.event(request.query_param("k", "")).wait(10)
        return Response.text("LATE\n")

    @app.get("/late-fallback", deadline_ms=30, fallback=Response.json(REVIEW))
    def late_fallback(request: Request) -> Response:
        holds.event(request.query_param("k", "")).wait(10)
        return Response.text("LATE\n")

    return app


@pytest.fixture(scope="module")
def holds() -> Iterator[Holds]:
    h = Holds()
    yield h
    h.release_all()


@pytest.fixture(scope="module")
def wire(holds: Holds) -> Iterator[Server]:
    with server_thread(_agreement_app(holds), threads=MAX_INFLIGHT + 1,
                       max_inflight=MAX_INFLIGHT, max_body_size=1024) as srv:
        yield srv


def send(s: socket.socket, mode: str, method: str, path: str, extra: str = "") -> None:
    version, conn_line, _, _ = MODES[mode]
    s.sendall(f"{method} {path} {version}\r\nHost: t\r\n{conn_line}{extra}\r\n".encode())


def hold_workers(srv: Server, holds: Holds, key: str) -> list[socket.socket]:
    """Occupy MAX_INFLIGHT workers with held requests: the next request is shed."""
    socks = []
    for i in range(MAX_INFLIGHT):
        s = connect(srv.address)
        s.sendall(f"GET /hold?k={key}-{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        socks.append(s)
    wait_for(lambda: srv.admission.busy == MAX_INFLIGHT, what="the held requests to run")
    return socks


# case: (method, path, extra header lines, status) -- `{k}` is a fresh hold key
CASES: dict[str, tuple[str, str, str, int]] = {
    "handler": ("GET", "/ok", "", 200),
    "handler-stream": ("GET", "/stream", "", 200),
    "404": ("GET", "/missing", "", 404),
    "405": ("POST", "/ok", "Content-Length: 0\r\n", 405),
    "413": ("POST", "/echo", "Content-Length: 4096\r\n", 413),
    "503-shed": ("GET", "/ok", "", 503),
    "504": ("GET", "/late?k={k}", "", 504),
    "fallback": ("GET", "/late-fallback?k={k}", "", 200),
    "readyz": ("GET", "/readyz", "", 200),
}


def expected_open(mode: str, case: str) -> bool:
    if case == "413":
        return False  # the parser refused the request: its framing is in doubt
    if case == "handler-stream" and mode.startswith("1.0"):
        return False  # no length and no chunked in 1.0: the close delimits the body
    return MODES[mode][2]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_answer_agrees_with_its_socket(wire: Server, holds: Holds, mode: str,
                                             case: str) -> None:
    key = f"{mode}-{case}"
    method, path, extra, status = CASES[case]
    path = path.replace("{k}", key)
    wait_for(lambda: wire.admission.busy == 0, what="the workers of earlier cases to be free")
    held: list[socket.socket] = []
    if case == "503-shed":
        held = hold_workers(wire, holds, key)
    s = connect(wire.address)
    f = s.makefile("rb")
    try:
        send(s, mode, method, path, extra)
        got, headers, body = read_response_file(f)
        assert got == status, body
        if case == "fallback":
            # at its deadline, or at once once the route's EWMA says it can't make it
            assert headers["x-rtserve-fallback"] in ("deadline", "dead-on-arrival")
        for i in range(len(held)):  # let the held and the late handlers finish
            holds.event(f"{key}-{i}").set()
        holds.event(key).set()
        for h in held:
            assert read_response_file(h.makefile("rb"))[0] == 200
            h.close()
        stays_open = expected_open(mode, case)
        want_header = MODES[mode][3] if stays_open else "close"
        assert headers.get("connection") == want_header
        if stays_open:  # the socket really is open: a second request is answered on it
            wait_for(lambda: wire.admission.busy == 0, what="the held workers to be free")
            send(s, mode, "GET", "/ok")
            assert read_response_file(f)[::2] == (200, b"ok\n")
        else:  # and closed means closed: EOF, nothing more
            assert f.read() == b""
    finally:
        holds.event(key).set()
        f.close()
        s.close()


def test_the_date_line_follows_the_clock_second_by_second_and_back(monkeypatch) -> None:
    """serialize reads the cached Date line inline; it must change with the second, also
    when the wall clock is stepped back (NTP), and never lag behind date_header()."""
    from email.utils import formatdate

    from rtserve import framing, response

    clock = [1_700_000_000.25]
    monkeypatch.setattr(response, "_time", lambda: clock[0])
    monkeypatch.setattr(framing, "_time", lambda: clock[0])
    req = Request("GET", "/", "/", "", "HTTP/1.1", [("host", "h")])

    def date_sent() -> str:
        data = serialize(req, Response(b"x"), False)[2]
        assert isinstance(data, bytes)
        (line,) = [ln for ln in data.split(b"\r\n") if ln.startswith(b"Date: ")]
        return line[6:].decode()

    for t in (1_700_000_000.25, 1_700_000_000.99, 1_700_000_001.0, 1_700_000_003.5,
              1_699_999_990.0):  # the last: the clock stepped back by 13 s
        clock[0] = t
        assert date_sent() == formatdate(int(t), usegmt=True), t
        assert response.date_header() == f"Date: {formatdate(int(t), usegmt=True)}\r\n".encode()


# ---- StreamFraming: one streamed body's wire form, for workers and ASGI apps ------------


def _framing(chunked: bool, length: int | None) -> StreamFraming:
    return StreamFraming(StreamPlan(b"", iter(()), chunked, length))


def test_stream_framing_chunks_each_piece_and_ends_with_the_last_chunk():
    f = _framing(True, None)
    assert f.frame(b"hello") == b"5\r\nhello\r\n"
    assert f.frame(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert f.end() == b"0\r\n\r\n"


def test_stream_framing_counts_against_content_length():
    f = _framing(False, 8)
    assert f.frame(b"abc") == b"abc"
    assert f.frame(b"defgh") == b"defgh"
    assert f.end() == b""  # exactly its length: nothing more on the wire


def test_stream_framing_refuses_a_piece_past_content_length_and_fits_what_it_can():
    f = _framing(False, 5)
    assert f.frame(b"abc") == b"abc"
    assert f.frame(b"defg") is None  # refused, nothing counted
    assert f.sent == 3
    assert f.fit(b"defg") == b"de"  # the worker sends this much, then closes
    assert f.end() == b""


def test_stream_framing_short_of_content_length_ends_with_none():
    f = _framing(False, 10)
    assert f.frame(b"abc") == b"abc"
    assert f.end() is None  # only a close can tell the client


def test_stream_framing_without_length_or_chunks_is_close_delimited():
    f = _framing(False, None)
    assert f.frame(b"abc") == b"abc" and f.end() == b""
