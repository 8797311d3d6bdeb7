"""The Connection state machine on its own: no server, a socketpair for the socket and a
real RequestParser for the requests.

Three parts: the legal paths a request takes (as reader.py and writer.py drive them), the
side effects of each event, and every refused move. For the refusals the table of
allowed moves is written out here once more, from the diagram in connection.py's
docstring: a change to `TRANSITIONS` must be a deliberate change to this test too.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterator

import pytest

from rtserve.connection import (
    TRANSITIONS,
    Connection,
    InvalidTransition,
    State,
)
from rtserve.errors import ParseError
from rtserve.parser import CLOSED_PARSER, NEED_DATA, RequestParser
from rtserve.request import Request

S = State
ALL = list(State)

# connection.py's diagram, edge by edge.
EXPECTED = {
    (S.HANDSHAKE, S.READING_HEAD),
    (S.HANDSHAKE, S.CLOSING),
    (S.HANDSHAKE, S.CLOSED),
    (S.READING_HEAD, S.READING_BODY),
    (S.READING_HEAD, S.QUEUED),
    (S.READING_HEAD, S.RUNNING),
    (S.READING_HEAD, S.WRITING),
    (S.READING_HEAD, S.CLOSED),
    (S.READING_BODY, S.QUEUED),
    (S.READING_BODY, S.RUNNING),
    (S.READING_BODY, S.WRITING),
    (S.READING_BODY, S.CLOSED),
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.WRITING),
    (S.QUEUED, S.CLOSED),
    (S.RUNNING, S.WRITING),
    (S.RUNNING, S.CLOSED),
    (S.WRITING, S.READING_HEAD),
    (S.WRITING, S.CLOSING),
    (S.WRITING, S.CLOSED),
    (S.CLOSING, S.CLOSED),
}
REFUSED = [(a, b) for a, b in itertools.product(ALL, ALL) if (a, b) not in EXPECTED]

# The event that makes each move, by the state it moves to.
EVENTS: dict[State, Callable[[Connection], None]] = {
    S.READING_BODY: lambda c: c.body_pending(),
    S.QUEUED: lambda c: c.queue(),
    S.RUNNING: lambda c: c.run(),
    S.WRITING: lambda c: c.respond(200, True),
    S.READING_HEAD: lambda c: c.reset(),
    S.CLOSING: lambda c: c.linger(),
    S.CLOSED: lambda c: c.closed(),
}
# An event that is a no-op rather than a move: body_pending while the body is pending.
NO_OP = {(S.READING_BODY, S.READING_BODY)}
# The one target reached by two events: READING_HEAD by reset() (after a response) and by
# handshake_done() (after a TLS handshake); each refuses the other's source.
INFO = object()  # stands for the tls.TLSInfo a handshake gives


def event(old: State, new: State) -> Callable[[Connection], None]:
    if new is S.READING_HEAD and old is S.HANDSHAKE:
        return lambda c: c.handshake_done(INFO)
    return EVENTS[new]

GET = b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
GET10 = b"GET /old HTTP/1.0\r\n\r\n"


@pytest.fixture
def conn() -> Iterator[Connection]:
    a, b = socket.socketpair()
    c = Connection(a, ("client", 1), RequestParser())
    try:
        yield c
    finally:
        a.close()
        b.close()


def parse(c: Connection, data: bytes) -> Request:
    """Feed bytes to the connection's parser and return the complete request."""
    c.parser.feed(data)
    req = c.parser.next_event()
    assert isinstance(req, Request), req
    return req


def forced(c: Connection, state: State) -> Connection:
    """The connection put straight into `state` (as if the moves before had happened)."""
    c.state = state
    return c


# ---- the table ----------------------------------------------------------------------------


def test_the_table_is_the_diagram() -> None:
    assert set(TRANSITIONS) == EXPECTED
    assert len(REFUSED) == 64 - 21


def test_a_new_connection_reads_a_head(conn: Connection) -> None:
    assert conn.state is S.READING_HEAD
    assert conn.fd == conn.sock.fileno()
    assert (conn.req_id, conn.request, conn.status) == (0, None, 0)
    assert conn.keep_alive and not conn.eof and not conn.continue_sent
    assert conn.out is None and conn.body is None and conn.timer_at == 0


# ---- legal paths ------------------------------------------------------------------------


def test_keep_alive_cycle_with_a_pipelined_request(conn: Connection) -> None:
    conn.parser.feed(GET + GET)
    for want_id in (1, 2):
        req = conn.parser.next_event()
        assert isinstance(req, Request)
        assert conn.begin(req) == want_id
        assert conn.state is S.READING_HEAD  # admission decides the next state
        conn.run()
        assert conn.state is S.RUNNING and conn.awaits(want_id)
        conn.respond(200, True)
        assert conn.state is S.WRITING and conn.keep_alive
        conn.reset()
        assert conn.state is S.READING_HEAD and conn.request is None
    assert conn.parser.next_event() is NEED_DATA


def test_queued_then_running_then_answered(conn: Connection) -> None:
    rid = conn.begin(parse(conn, GET))
    conn.queue()
    assert conn.state is S.QUEUED and conn.awaits(rid)
    conn.run()
    assert conn.state is S.RUNNING and conn.awaits(rid)
    conn.respond(200, True)
    assert conn.state is S.WRITING and not conn.awaits(rid)


def test_answered_while_queued_never_runs(conn: Connection) -> None:
    """A shed or a deadline answer goes out from QUEUED; the result is then not wanted."""
    rid = conn.begin(parse(conn, GET))
    conn.queue()
    conn.respond(503, True)
    assert conn.state is S.WRITING and conn.status == 503
    assert not conn.awaits(rid)
    with pytest.raises(InvalidTransition):
        conn.run()  # a worker freeing up later can't start it


def test_body_pending_then_complete(conn: Connection) -> None:
    conn.parser.feed(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nab")
    assert conn.parser.next_event() is NEED_DATA and conn.parser.pending is not None
    conn.body_pending()
    assert conn.state is S.READING_BODY
    conn.body_pending()  # more bytes, still pending: no move, no error
    assert conn.state is S.READING_BODY
    req = parse(conn, b"cd")
    assert req.body == b"abcd"
    conn.begin(req)
    assert conn.state is S.READING_BODY
    conn.queue()
    assert conn.state is S.QUEUED


def test_parse_error_answered_from_reading_head(conn: Connection) -> None:
    conn.parser.feed(b"GET / HTTP/1.1\r\nBad Header: v\r\n\r\n")
    with pytest.raises(ParseError) as exc:
        conn.parser.next_event()
    assert conn.state is S.READING_HEAD and conn.request is None
    conn.respond(exc.value.status, False)
    assert conn.state is S.WRITING and conn.status == 400 and not conn.keep_alive


def test_parse_error_answered_from_reading_body(conn: Connection) -> None:
    conn.parser.feed(b"POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert conn.parser.next_event() is NEED_DATA
    conn.body_pending()
    conn.parser.feed(b"zz\r\n")  # not a chunk size
    with pytest.raises(ParseError) as exc:
        conn.parser.next_event()
    conn.respond(exc.value.status, False)
    assert conn.state is S.WRITING and conn.status == 400 and not conn.keep_alive


def test_tls_handshake_then_a_request() -> None:
    a, b = socket.socketpair()
    try:
        c = Connection(a, ("client", 1), RequestParser(), handshake=True)
        assert c.state is S.HANDSHAKE and c.tls is None
        c.timer_at = 77  # the handshake timer
        c.handshake_done(INFO)
        assert c.state is S.READING_HEAD and c.tls is INFO and c.timer_at == 0
        c.begin(parse(c, GET))
        c.run()
        c.respond(200, True)
        c.reset()
        assert c.state is S.READING_HEAD and c.tls is INFO  # kept for the next request
    finally:
        a.close()
        b.close()


def test_refused_handshake_lingers_then_closes() -> None:
    a, b = socket.socketpair()
    try:
        c = Connection(a, ("client", 1), RequestParser(), handshake=True)
        c.linger()  # a plain-HTTP 400 or an alert went out
        assert c.state is S.CLOSING
        c.closed()
        assert c.state is S.CLOSED
    finally:
        a.close()
        b.close()


def test_linger_then_closed(conn: Connection) -> None:
    conn.begin(parse(conn, GET10))
    conn.run()
    conn.respond(200, conn.keep_alive)
    assert not conn.keep_alive  # HTTP/1.0 without keep-alive
    conn.linger()
    assert conn.state is S.CLOSING and conn.request is None
    conn.closed()
    assert conn.state is S.CLOSED


@pytest.mark.parametrize("state", [s for s in ALL if s is not S.CLOSED], ids=lambda s: s.name)
def test_every_open_state_can_close(conn: Connection, state: State) -> None:
    forced(conn, state)
    conn.request = parse(conn, GET)
    conn.out = memoryview(b"pending")
    conn.body = object()
    conn.closed()
    assert conn.state is S.CLOSED
    assert conn.request is None and conn.out is None and conn.body is None


def test_a_closed_connection_lets_its_parser_and_address_go(conn: Connection) -> None:
    """Stale timer entries may keep a closed connection for seconds; its parser, and the
    bytes still buffered in it, must not stay with it."""
    own = conn.parser
    own.feed(b"GET /partial HTTP/1.1\r\nHo")  # a partial head, as a client that left
    conn.closed()
    assert conn.addr is None  # the address tuple goes too
    assert conn.parser is CLOSED_PARSER and conn.parser is not own
    assert not conn.parser.buf and not conn.parser.has_partial()
    conn.parser.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # takes nothing
    assert not conn.parser.buf
    with pytest.raises(ParseError):
        conn.parser.next_event()


# ---- side effects ---------------------------------------------------------------------------


def test_begin_side_effects(conn: Connection) -> None:
    first = parse(conn, GET10)  # HTTP/1.0 without keep-alive
    assert conn.begin(first) == 1
    assert conn.request is first and not conn.keep_alive
    conn.continue_sent = True
    conn.status = 400
    conn.timer_at = 12345
    conn.run()
    conn.respond(200, False)
    conn.reset()
    second = parse(conn, GET)
    assert conn.begin(second) == 2
    assert conn.request is second
    assert conn.keep_alive  # decided afresh by the new request
    assert not conn.continue_sent and conn.status == 0 and conn.timer_at == 0


@pytest.mark.parametrize("state", [S.READING_HEAD, S.READING_BODY], ids=lambda s: s.name)
def test_begin_keeps_the_reading_state(conn: Connection, state: State) -> None:
    forced(conn, state)
    conn.begin(parse(conn, GET))
    assert conn.state is state


def test_respond_never_turns_keep_alive_back_on(conn: Connection) -> None:
    conn.begin(parse(conn, GET))
    conn.keep_alive = False  # e.g. a body that broke, or Connection: close
    conn.timer_at = 99
    conn.respond(200, True)
    assert not conn.keep_alive and conn.status == 200 and conn.timer_at == 0


def test_respond_with_close_clears_keep_alive(conn: Connection) -> None:
    conn.begin(parse(conn, GET))
    assert conn.keep_alive
    conn.respond(503, False)
    assert not conn.keep_alive


def test_reset_disarms_the_timer_and_drops_the_request(conn: Connection) -> None:
    conn.begin(parse(conn, GET))
    conn.respond(200, True)
    conn.timer_at = 42
    conn.reset()
    assert conn.timer_at == 0 and conn.request is None


def test_awaits(conn: Connection) -> None:
    assert not conn.awaits(0)  # nothing in flight
    rid = conn.begin(parse(conn, GET))
    assert not conn.awaits(rid)  # parsed, not yet admitted
    for state in ALL:
        forced(conn, state)
        want = state in (S.QUEUED, S.RUNNING)
        assert conn.awaits(rid) is want, state
        assert not conn.awaits(rid - 1) and not conn.awaits(rid + 1), state


def test_a_late_result_for_the_previous_request_is_not_awaited(conn: Connection) -> None:
    conn.parser.feed(GET + GET)
    first = conn.begin(conn.parser.next_event())
    conn.run()
    conn.respond(504, True)  # answered at its deadline; the worker is still on it
    conn.reset()
    second = conn.begin(conn.parser.next_event())
    conn.run()
    assert conn.awaits(second) and not conn.awaits(first)


# ---- refused moves --------------------------------------------------------------------------


def _id(pair: tuple[State, State]) -> str:
    return f"{pair[0].name}->{pair[1].name}"


@pytest.mark.parametrize("pair", REFUSED, ids=_id)
def test_to_refuses_every_move_outside_the_table(conn: Connection,
                                                 pair: tuple[State, State]) -> None:
    old, new = pair
    forced(conn, old)
    with pytest.raises(InvalidTransition, match=f"{old.name} -> {new.name}"):
        conn._to(new)
    assert conn.state is old


@pytest.mark.parametrize("pair", sorted(EXPECTED), ids=_id)
def test_to_allows_every_move_in_the_table(conn: Connection, pair: tuple[State, State]) -> None:
    old, new = pair
    forced(conn, old)
    conn._to(new)
    assert conn.state is new


# HANDSHAKE is only ever a connection's first state (Connection(..., handshake=True)): no
# event moves into it, so the refusals into it are the table's alone (tested above).
@pytest.mark.parametrize("pair", [p for p in REFUSED if p not in NO_OP and p[1] is not S.HANDSHAKE],
                         ids=_id)
def test_the_event_for_a_refused_move_raises(conn: Connection, pair: tuple[State, State]) -> None:
    """Each event method refuses every state it must not move from, and leaves it alone."""
    old, new = pair
    forced(conn, old)
    conn.request = request = parse(conn, GET)
    with pytest.raises(InvalidTransition):
        event(old, new)(conn)
    assert conn.state is old and conn.request is request


@pytest.mark.parametrize("pair", sorted(EXPECTED), ids=_id)
def test_the_event_for_an_allowed_move_makes_it(conn: Connection,
                                                pair: tuple[State, State]) -> None:
    old, new = pair
    forced(conn, old)
    event(old, new)(conn)
    assert conn.state is new


@pytest.mark.parametrize("state", [s for s in ALL if s is not S.HANDSHAKE], ids=lambda s: s.name)
def test_handshake_done_only_ends_a_handshake(conn: Connection, state: State) -> None:
    forced(conn, state)
    with pytest.raises(InvalidTransition, match=f"handshake_done in {state.name}"):
        conn.handshake_done(INFO)
    assert conn.state is state and conn.tls is None


def test_reset_cannot_end_a_handshake(conn: Connection) -> None:
    """The table allows HANDSHAKE -> READING_HEAD, but only as handshake_done's move."""
    forced(conn, S.HANDSHAKE)
    with pytest.raises(InvalidTransition, match="HANDSHAKE -> READING_HEAD"):
        conn.reset()
    assert conn.state is S.HANDSHAKE


def test_body_pending_while_pending_is_no_move(conn: Connection) -> None:
    forced(conn, S.READING_BODY)
    conn.body_pending()
    assert conn.state is S.READING_BODY


@pytest.mark.parametrize("state", [s for s in ALL if s not in (S.READING_HEAD, S.READING_BODY)],
                         ids=lambda s: s.name)
def test_begin_refused_outside_reading(conn: Connection, state: State) -> None:
    """A request can only begin while one is being read (begin moves no state itself)."""
    forced(conn, state)
    req = parse(conn, GET)
    with pytest.raises(InvalidTransition, match=f"begin in {state.name}"):
        conn.begin(req)
    assert conn.state is state and conn.req_id == 0 and conn.request is None
