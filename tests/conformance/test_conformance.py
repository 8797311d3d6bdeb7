"""Runs every conformance case (a) through the parser and (b) over a socket to a live server.

Over the socket, each rejected case must get exactly its status line with `Connection: close`,
then the server must close; a request smuggled behind it in the same send must get no
response; and a fresh client must be served normally afterwards. Valid cases must get
their statuses in order (and the /echo route must return the decoded body).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from rtserve import App, Response
from rtserve.errors import ParseError
from rtserve.parser import NEED_DATA, RequestParser
from rtserve.request import Request
from tests.conformance.corpus import Case, load_cases
from tests.helpers import connect, read_response_file, recv_until_closed, running_server

INVALID = load_cases("invalid")
VALID = load_cases("valid")
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: example.com\r\n\r\n"


def test_corpus_is_big_enough_and_documented() -> None:
    assert len(INVALID) + len(VALID) >= 80
    assert all(c.expect.get("why") for c in INVALID)
    assert all(c.expect.get("close") == "yes" for c in INVALID)
    assert len({c.name for c in INVALID + VALID}) == len(INVALID) + len(VALID)


# --- (a) the parser alone ------------------------------------------------------------------


def parse(raw: bytes, limits: dict[str, int], bytewise: bool = False) -> list[Request]:
    parser = RequestParser(**limits)
    pieces = [raw[i : i + 1] for i in range(len(raw))] if bytewise else [raw]
    out = []
    for piece in pieces:
        parser.feed(piece)
        while (event := parser.next_event()) is not NEED_DATA:
            out.append(event)
    return out


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", INVALID, ids=str)
def test_parser_rejects(case: Case, bytewise: bool) -> None:
    with pytest.raises(ParseError) as info:
        parse(case.raw, case.limits, bytewise)
    assert info.value.status == case.status, info.value.reason


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", VALID, ids=str)
def test_parser_accepts(case: Case, bytewise: bool) -> None:
    requests = parse(case.raw, case.limits, bytewise)
    assert len(requests) == int(case.expect.get("requests", "1"))
    first = requests[0]
    for key, attr in (
        ("method", "method"),
        ("path", "path"),
        ("raw_path", "raw_path"),
        ("query", "query_string"),
        ("version", "version"),
    ):
        if key in case.expect:
            assert getattr(first, attr) == case.expect[key], key
    if "headers" in case.expect:  # trailers in particular must never show up here
        assert [name for name, _ in first.raw_headers] == case.expect["headers"].split()
    if "body" in case.expect:
        assert first.body == case.text("body")
    if "keep_alive" in case.expect:
        assert first.keep_alive is (case.expect["keep_alive"] == "yes")


# --- (b) a live server ---------------------------------------------------------------------


def make_app() -> App:
    app = App()

    @app.route("/", ("GET", "POST"))
    def root(request: Request) -> Response:
        return Response.text("ok")

    @app.post("/echo")
    def echo(request: Request) -> Response:
        return Response(request.body, content_type="application/octet-stream")

    @app.route("/names", ("GET", "POST"))
    def names(request: Request) -> Response:
        """The header names the handler sees, in order (trailers must not be among them)."""
        return Response.text(" ".join(name for name, _ in request.headers.raw()))

    @app.get("/a/b")
    def a_b(request: Request) -> Response:
        return Response.text("a/b")

    return app


@pytest.fixture(scope="module")
def servers() -> Iterator[Any]:
    """One live server per distinct set of limits, started on first use."""
    with contextlib.ExitStack() as stack:
        cache: dict[tuple, tuple[str, int]] = {}

        def get(limits: dict[str, int]) -> tuple[str, int]:
            key = tuple(sorted(limits.items()))
            if key not in cache:
                cache[key] = stack.enter_context(running_server(make_app(), **limits))
            return cache[key]

        yield get


def split_response(data: bytes) -> tuple[str, dict[str, str], bytes, bytes]:
    """(status line, headers, body, bytes after it) of the first response in `data`."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    return lines[0], headers, rest[:length], rest[length:]


def assert_fresh_client_served(addr: tuple[str, int]) -> None:
    with connect(addr) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        f = sock.makefile("rb")
        status, _, body = read_response_file(f)
        assert (status, body) == (200, b"ok")


@pytest.mark.parametrize("case", INVALID, ids=str)
def test_server_rejects_and_closes(case: Case, servers: Any) -> None:
    addr = servers(case.limits)
    with connect(addr) as sock:
        try:
            sock.sendall(case.raw + SMUGGLED)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may refuse before reading it all; its answer is still there
        data = recv_until_closed(sock)  # times out (fails) if the server keeps it open
    status_line, headers, _body, after = split_response(data)
    assert status_line.startswith(f"HTTP/1.1 {case.status} "), status_line
    assert headers.get("connection", "").lower() == "close"
    assert after == b"", f"more than one response (smuggled request answered?): {after[:100]!r}"
    assert_fresh_client_served(addr)


class StatusLines:
    """A response file that remembers the status line of each response read through it."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.lines: list[bytes] = []
        self._next_is_status = False

    def expect_status(self) -> None:
        self._next_is_status = True

    def readline(self) -> bytes:
        line = self.f.readline()
        if self._next_is_status:
            self.lines.append(line)
            self._next_is_status = False
        return line

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)


@pytest.mark.parametrize("case", VALID, ids=str)
def test_server_serves_valid(case: Case, servers: Any) -> None:
    addr = servers(case.limits)
    with connect(addr) as sock:
        sock.sendall(case.raw)
        f = sock.makefile("rb")
        lines = StatusLines(f)
        statuses, bodies, heads = [], [], []
        while len(statuses) < len(case.statuses):
            lines.expect_status()
            status, headers, body = read_response_file(lines)
            if 100 <= status < 200:
                continue  # an interim 100 Continue may precede the answer
            statuses.append(status)
            bodies.append(body)
            heads.append(headers)
        assert statuses == case.statuses
        # Whatever 1.x minor version the request had, the answer is HTTP/1.1 (RFC 9110 6.2).
        assert all(line.startswith(b"HTTP/1.1 ") for line in lines.lines), lines.lines
        echo = case.text("echo")
        if echo is not None:
            assert bodies[0] == echo
        for key, value in case.expect.items():
            if key.startswith("header_"):
                assert heads[0].get(key[len("header_"):]) == value, key
        if case.expect.get("close") == "yes":
            assert f.read() == b""  # the server closed after the last response
        else:  # still open: the same connection serves another request
            sock.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
            status, _, body = read_response_file(f)
            assert (status, body) == (200, b"ok")


def test_smuggled_request_alone_is_served(servers: Any) -> None:
    """Control for the smuggling assertion: the follow-up is a request the server answers."""
    with connect(servers({})) as sock:
        sock.sendall(SMUGGLED)
        status, _, _ = read_response_file(sock.makefile("rb"))
        assert status == 404  # no route: answered, so silence above means it was dropped
