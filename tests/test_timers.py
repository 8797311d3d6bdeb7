"""The conductor's timers (timers.py): compaction keeps memory bounded by what is open, and
a timeout is counted once.

The heaps are lazy: a connection that closes leaves its entry behind until the entry's
time comes (the header timeout, 10 s by default). Without compaction a server taking
thousands of short connections a second would keep every closed Connection alive that
long. Here thousands of connections each make one request and go, and the heaps (read
through `server.timers.sizes()`) stay under twice what is open plus the floor.
"""

from __future__ import annotations

import gc
import socket
import struct
from collections.abc import Iterator

import pytest

from rtserve import App, Request, Response
from rtserve.connection import T_HEADER, T_IDLE, Connection
from rtserve.parser import RequestParser
from rtserve.timers import Timers
from tests.helpers import (
    connect,
    read_response_file,
    recv_until_closed,
    scrape_metrics,
    server_thread,
)

FLOOR = 1024  # timers.py's compaction floor
SHORT_CONNECTIONS = 5000
BATCH = 50  # connections open at once (bound() allows for them)


def bound(open_connections: int) -> int:
    """What the heaps may hold: twice the live entries (one per open connection at most,
    one deadline per request in flight), the floor, and the entry being pushed."""
    return 2 * open_connections + FLOOR + 1


def live_connections() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Connection))


def rst_close(s: socket.socket) -> None:
    """Close with an RST: no TIME_WAIT left behind by thousands of client sockets."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _app() -> App:
    app = App()

    @app.get("/dl", deadline_ms=60_000)  # every request leaves a deadline entry behind
    def dl(request: Request) -> Response:
        return Response.text("ok\n")

    return app


# ---- over the wire --------------------------------------------------------------------------


@pytest.mark.parametrize("who_closes", ["client", "server"])
def test_short_connections_do_not_pile_up_in_the_timer_heaps(who_closes: str) -> None:
    """Each connection: one request, then gone. The client leaves (RST) after its answer,
    or asks for `Connection: close` and the server closes (a lingering close: a second,
    sooner timer entry for the same connection)."""
    close = "Connection: close\r\n" if who_closes == "server" else ""
    request = f"GET /dl HTTP/1.1\r\nHost: t\r\n{close}\r\n".encode()
    before = live_connections()
    # CoDel off: a burst of BATCH requests with a deadline would be partly shed (503), which
    # is right but not what this test is about.
    with server_thread(_app(), threads=2, codel_target_ms=0) as srv:
        worst: dict[str, int] = {"connection_timers": 0, "deadlines": 0}
        most_open = 0
        for _ in range(SHORT_CONNECTIONS // BATCH):
            socks = [connect(srv.address) for _ in range(BATCH)]
            for s in socks:
                s.sendall(request)
            for s in socks:
                if who_closes == "server":
                    assert recv_until_closed(s).startswith(b"HTTP/1.1 200 ")
                else:
                    assert read_response_file(s.makefile("rb"))[0] == 200
            most_open = max(most_open, srv.open_connections)
            for k, v in srv.timers.sizes().items():
                worst[k] = max(worst[k], v)
            for s in socks:
                rst_close(s)
        limit = bound(most_open)
        assert worst["connection_timers"] <= limit, (worst, most_open)
        assert worst["deadlines"] <= limit, (worst, most_open)
        # And the Connection objects themselves are gone, not kept by their entries.
        kept = live_connections() - before
        assert kept <= limit, f"{kept} Connection objects alive after {SHORT_CONNECTIONS}"


@pytest.mark.parametrize("kind", ["header", "body"])
def test_a_timeout_is_counted_once(kind: str) -> None:
    """A 408 for a slow head or body is a timeout, not also a parse error."""
    partial = {
        "header": b"GET /dl HTTP/1.1\r\nHost: t\r\n",
        "body": b"POST /dl HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab",
    }[kind]
    with server_thread(_app(), header_timeout=0.3, body_timeout=0.3) as srv:
        s = connect(srv.address)
        s.sendall(partial)
        data = recv_until_closed(s)
        s.close()
        assert data.startswith(b"HTTP/1.1 408 ") and b"Connection: close\r\n" in data
        m = scrape_metrics(srv.address)
        assert m.get(f'rtserve_timeouts_total{{kind="{kind}"}}') == 1
        assert not [k for k in m if k.startswith("rtserve_timeouts_total{") and
                    f'kind="{kind}"' not in k and m[k]]
        assert m.get('rtserve_parse_errors_total{status="408"}', 0) == 0


# ---- the Timers part on its own ------------------------------------------------------------


@pytest.fixture
def make_conn() -> Iterator:
    """Connections on one socketpair (Timers only reads their state and timer fields)."""
    a, b = socket.socketpair()
    try:
        yield lambda: Connection(a, ("t", 0), RequestParser())
    finally:
        a.close()
        b.close()


def test_rearming_later_adds_no_entry_and_sooner_does(make_conn) -> None:
    t = Timers(0)
    c = make_conn()
    t.arm(c, 1000, T_HEADER)
    t.arm(c, 5000, T_IDLE)  # later: only the connection's fields change
    assert t.sizes()["connection_timers"] == 1
    t.arm(c, 500, T_IDLE)  # sooner: a new entry (the old one is stale)
    assert t.sizes()["connection_timers"] == 2
    assert t.next_due() == 500
    assert t.due_connections(499) == []
    assert t.due_connections(500) == [(c, T_IDLE)]
    assert t.due_connections(10_000) == []  # the stale entry fires nothing


def test_an_entry_that_pops_early_moves_to_the_new_time(make_conn) -> None:
    t = Timers(0)
    c = make_conn()
    t.arm(c, 1000, T_HEADER)
    t.arm(c, 3000, T_IDLE)
    assert t.due_connections(1000) == []
    assert t.next_due() == 3000 and t.sizes()["connection_timers"] == 1
    assert t.due_connections(3000) == [(c, T_IDLE)]


def test_a_disarmed_or_closed_connection_fires_nothing(make_conn) -> None:
    t = Timers(0)
    disarmed, closed = make_conn(), make_conn()
    t.arm(disarmed, 100, T_HEADER)
    t.arm(closed, 100, T_HEADER)
    disarmed.timer_at = 0
    closed.closed()
    assert t.due_connections(200) == []


def test_the_connection_heap_compacts_at_the_floor(make_conn) -> None:
    t = Timers(0)
    open_ = [make_conn() for _ in range(10)]
    for i, c in enumerate(open_):
        t.arm(c, 10_000 + i, T_HEADER)
    for i in range(3 * FLOOR):
        c = make_conn()
        t.arm(c, 20_000 + i, T_HEADER)
        c.closed()
        assert t.sizes()["connection_timers"] <= bound(len(open_))
    # The open connections' timers survived every compaction, and fire in order.
    assert t.due_connections(10_100) == [(c, T_HEADER) for c in open_]


def test_the_deadline_heap_compacts_at_the_floor(make_conn) -> None:
    t = Timers(0)
    waiting = make_conn()
    rid = waiting.begin(_request())
    waiting.run()
    t.add_deadline(50_000, waiting, rid)
    for i in range(3 * FLOOR):
        c = make_conn()
        t.add_deadline(1000 + i, c, c.req_id)  # answered already: not awaited
        assert t.sizes()["deadlines"] <= bound(1)
    assert t.next_deadline() == (50_000, waiting, rid)


def _request() -> Request:
    p = RequestParser()
    p.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    r = p.next_event()
    assert isinstance(r, Request)
    return r
