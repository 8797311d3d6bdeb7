"""A deadline's clock starts when the request's bytes arrived (the kernel's receive stamp),
not when the conductor got round to reading them (arrival.py, docs/deadlines.md §1)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rtserve import App, Request, Response
from rtserve import arrival as arrival_mod
from rtserve.connection import Connection
from rtserve.parser import RequestParser
from tests.helpers import REVIEW, Client, read_response, server_thread, wait_for

pytestmark = pytest.mark.skipif(not arrival_mod.SO_TIMESTAMPNS,
                                reason="no SO_TIMESTAMPNS on this platform")


HOLD_AFTER_NS = 100_000_000


def _app(entered: threading.Event, sent: threading.Event) -> App:
    app = App()

    @app.get("/hold", inline=True)
    def hold(request: Request) -> Response:
        """Runs on the conductor: nothing is read until the test has sent its request."""
        entered.set()
        sent.wait(10)
        # Hold on a while after the test sent its request, so a clock started at the read
        # would be HOLD_AFTER_NS past `sent_by`, far beyond the error of converting the
        # kernel's wall-clock stamp to the monotonic clock on a loaded machine (~0.1 ms).
        threading.Event().wait(HOLD_AFTER_NS / 1e9)
        return Response.text("held\n")

    @app.get("/start", deadline_ms=10_000, fallback=Response.json(REVIEW))
    def start(request: Request) -> Response:
        return Response.text(str(request.start_ns))

    @app.get("/plain")
    def plain(request: Request) -> Response:
        return Response.text("plain\n")

    return app


def test_a_deadline_clock_starts_when_the_bytes_arrived_not_when_they_were_read() -> None:
    entered, sent = threading.Event(), threading.Event()
    with server_thread(_app(entered, sent), threads=2) as server:
        first = Client(server.address)
        assert first.request("GET", "/start")[0] == 200  # deadlines in use: stamps on
        assert server.reader.arrival.stamps > 0
        c = Client(server.address)  # accepted with stamps on
        assert c.request("GET", "/start")[0] == 200
        # The kernel turns receive stamping on for the whole stack in deferred work (the
        # netstamp static key) when the first socket asks: on a loaded machine that can
        # take longer than the hold below. Wait until a read came stamped (the reader
        # takes the clocks' offset then).
        wait_for(lambda: c.request("GET", "/start")[0] == 200
                 and server.reader.arrival.offset_at >= 0, 10, "a stamped read")
        blocker = Client(server.address)
        blocker.send("GET", "/hold")
        assert entered.wait(10)  # the conductor is busy in /hold and reads nothing
        c.send("GET", "/start")
        sent_by = time.monotonic_ns()  # the bytes are in the server's socket by now
        sent.set()
        status, _, body = c.recv()
        assert blocker.recv()[2] == b"held\n"
        for cl in (first, c, blocker):
            cl.close()
    assert status == 200
    # Read only after /hold returned (HOLD_AFTER_NS after sent_by): the loop's clock would
    # be that much later; the arrival stamp is before sent_by, give or take the clocks'
    # conversion, for which half of HOLD_AFTER_NS is room enough.
    assert int(body) <= sent_by + HOLD_AFTER_NS // 2


def test_no_stamps_without_deadline_traffic_and_they_stop_when_it_does() -> None:
    with server_thread(_app(threading.Event(), threading.Event()), threads=2) as server:
        c = Client(server.address)
        for _ in range(5):
            assert c.request("GET", "/plain")[2] == b"plain\n"
        assert server.reader.arrival.stamps == 0
        assert c.request("GET", "/start")[0] == 200
        assert server.reader.arrival.stamps == arrival_mod.STAMP_SPAN
        for _ in range(arrival_mod.STAMP_SPAN):
            assert c.request("GET", "/plain")[0] == 200
        assert server.reader.arrival.stamps == 0
        c.close()


def _anc(wall_ns: int) -> list[tuple[int, int, bytes]]:
    sec, nsec = divmod(wall_ns, 1_000_000_000)
    return [(socket.SOL_SOCKET, arrival_mod.SO_TIMESTAMPNS, arrival_mod.TIMESPEC.pack(sec, nsec))]


@contextlib.contextmanager
def _connection() -> Iterator[Connection]:
    """A real Connection on one end of a socket pair (the compiled build's reader takes
    nothing else)."""
    a, b = socket.socketpair()
    try:
        yield Connection(a, ("127.0.0.1", 0), RequestParser())
    finally:
        a.close()
        b.close()


def test_a_stamp_is_taken_back_to_the_monotonic_clock_and_bounded_by_now() -> None:
    with server_thread(App()) as server, _connection() as conn:
        r = server.reader
        now = time.monotonic_ns()
        before = now - 5_000_000
        at = r.arrival.arrival(conn.sock, _anc(time.time_ns() - 5_000_000), now)
        assert before - 50_000_000 < at <= now  # about 5 ms before now (clock reads apart)
        later = r.arrival.arrival(conn.sock, _anc(time.time_ns() + 1_000_000_000), now)
        assert later == now  # a stamp after the loop's clock is not believed
        ancient = r.arrival.arrival(conn.sock, _anc(time.time_ns() - 3600 * 1_000_000_000), now)
        assert ancient == now  # an hour back: a wall-clock step, not a waiting request


def test_a_read_without_a_stamp_turns_stamps_on_for_that_socket() -> None:
    with server_thread(App()) as server, socket.create_server(("127.0.0.1", 0)) as ls:
        b = socket.create_connection(ls.getsockname())
        a, _ = ls.accept()
        try:
            assert not a.getsockopt(socket.SOL_SOCKET, arrival_mod.SO_TIMESTAMPNS)
            now = time.monotonic_ns()
            conn = Connection(a, ("127.0.0.1", 0), RequestParser())
            assert server.reader.arrival.arrival(conn.sock, [], now) == now
            assert a.getsockopt(socket.SOL_SOCKET, arrival_mod.SO_TIMESTAMPNS) == 1
        finally:
            a.close()
            b.close()


def test_a_unix_socket_has_no_stamps_and_turns_them_off_for_good(tmp_path: Any) -> None:
    path = str(tmp_path / "rt.sock")
    with server_thread(_app(threading.Event(), threading.Event()), threads=2,
                       bind="unix:" + path) as server:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        try:
            for _ in range(3):  # stamps on after the first; the next read finds none
                s.sendall(b"GET /start HTTP/1.1\r\nHost: x\r\n\r\n")
                status, _, body = read_response(s)
                assert status == 200 and int(body) > 0
        finally:
            s.close()
        assert server.reader.arrival.stamps == 0
