"""A connection without a parser of its own (parser.UNFED_PARSER, reader.Reader.received).

A new connection holds the shared UNFED_PARSER; a read that is exactly one cached head
without a body becomes its Request in the reader, and any other read makes the
connection's own parser first. These tests hold that path to what the parser gives: the
same requests and answers, each connection its own bytes, the shared parser never fed,
and a connection that needed a parser keeping it. Real sockets against a server thread.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from rtserve import App, Request, Response
from rtserve.parser import UNFED_PARSER
from tests.helpers import (
    connect,
    read_response,
    read_response_file,
    recv_until_closed,
    server_thread,
    wait_for,
)


def echo_app() -> App:
    """Answers with what the handler saw: the path, a header, the header list's length,
    and (to catch a list shared between requests) appends to the list it was given."""
    app = App()

    @app.get("/show")
    def show(request: Request) -> Response:
        seen = f"{request.path} {request.headers.get('x-tag')} {len(request.raw_headers)}"
        request.raw_headers.append(("x-added", "by the handler"))
        return Response.text(seen)

    @app.post("/echo")
    def echo(request: Request) -> Response:
        return Response(request.body, 200, None, "application/octet-stream")

    return app


def get(path: str, tag: str, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return (b"GET %s HTTP/1.1\r\nHost: t\r\nX-Tag: %s\r\n%s\r\n"
            % (path.encode(), tag.encode(), extra))


def parser_of(server: Any, sock: socket.socket) -> Any:
    """The parser the server holds for the client side `sock` (matched by port)."""
    port = sock.getsockname()[1]
    for conn in list(server.conns.values()):
        if conn.addr[1] == port:
            return conn.parser
    raise AssertionError("no such connection")


@pytest.fixture
def server():
    with server_thread(echo_app(), threads=4) as srv:
        yield srv


def warm(server: Any, data: bytes) -> None:
    """Send the head `data` twice on a connection of its own: the parser caches a head the
    second time it sees it, so from now on a read of exactly `data` is a cache hit."""
    with connect(server.address) as s:
        for _ in range(2):
            s.sendall(data)
            read_response(s)


def assert_unfed_untouched() -> None:
    assert UNFED_PARSER.buf == bytearray() and not UNFED_PARSER.has_partial()
    assert UNFED_PARSER.pending is None


def test_a_repeated_head_is_answered_without_a_parser_and_each_request_owns_its_headers(
        server):
    warm(server, get("/show", "a"))
    with connect(server.address) as s:
        for _ in range(4):
            s.sendall(get("/show", "a"))
            status, _, body = read_response(s)
            assert status == 200
            # Host, X-Tag: a handler's append to its list never reaches the next request.
            assert body == b"/show a 2"
        assert parser_of(server, s) is UNFED_PARSER
    assert_unfed_untouched()


def test_a_read_that_is_not_one_cached_head_gives_the_connection_its_own_parser(server):
    warm(server, get("/show", "b"))
    with connect(server.address) as s:
        for _ in range(3):
            s.sendall(get("/show", "b"))
            assert read_response(s)[2] == b"/show b 2"
        assert parser_of(server, s) is UNFED_PARSER
        s.sendall(get("/show", "p1") + get("/show", "p2"))  # pipelined: two heads, one read
        # One buffered reader for both answers: they may arrive in one segment, and a
        # reader per answer would drop the second with the first one's buffer.
        f = s.makefile("rb")
        assert read_response_file(f)[2] == b"/show p1 2"
        assert read_response_file(f)[2] == b"/show p2 2"
        f.detach()
        own = parser_of(server, s)
        assert own is not UNFED_PARSER
        s.sendall(get("/show", "b"))  # a cached head again: the connection keeps its parser
        assert read_response(s)[2] == b"/show b 2"
        assert parser_of(server, s) is own
        body = b"x" * 100
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + body)
        assert read_response(s)[2] == body
    assert_unfed_untouched()


def test_a_head_with_a_content_length_is_parsed_with_its_body_every_time(server):
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n"
    for i in range(4):  # the head is cached from the second time: its body still counts
        with connect(server.address) as s:
            s.sendall(head)
            wait_for(lambda: len(server.conns) >= 1, what="the connection")
            s.sendall(b"%05d" % i)
            assert read_response(s)[2] == b"%05d" % i
    assert_unfed_untouched()


def test_connections_interleaved_each_get_their_own_answer(server):
    warm = get("/show", "w", close=True)
    for _ in range(2):  # cache the close head
        with connect(server.address) as s:
            s.sendall(warm)
            assert b"/show w 3" in recv_until_closed(s)
    with connect(server.address) as slow, connect(server.address) as quick:
        first = get("/show", "slow")
        slow.sendall(first[:10])  # half a head: this connection needs its parser
        wait_for(lambda: len(server.conns) >= 1, what="the slow connection")
        quick.sendall(warm)
        assert b"/show w 3" in recv_until_closed(quick)
        slow.sendall(first[10:])
        assert read_response(slow)[2] == b"/show slow 2"
    assert_unfed_untouched()


def test_answered_at_once_then_the_next_request_on_the_same_connection(server):
    warm(server, get("/nowhere", "n"))
    with connect(server.address) as s:
        for _ in range(3):  # a 404 goes out within the read: the connection waits idle
            s.sendall(get("/nowhere", "n"))
            assert read_response(s)[0] == 404
        assert parser_of(server, s) is UNFED_PARSER
        s.sendall(get("/show", "after"))
        assert read_response(s)[2] == b"/show after 2"
    assert_unfed_untouched()


def test_a_cached_head_then_the_clients_half_close_still_gets_its_answer(server):
    req = get("/show", "h")
    for _ in range(3):
        with connect(server.address) as s:
            s.sendall(req)
            s.shutdown(socket.SHUT_WR)
            data = recv_until_closed(s)  # answered, then closed: the client said it is done
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"/show h 2")
    wait_for(lambda: not server.conns, what="every connection closed")
    assert_unfed_untouched()
