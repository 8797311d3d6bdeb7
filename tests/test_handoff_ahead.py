"""The hand-ahead (handoff.Handoff._ahead_ok): cheap requests wait in the pool's own
queue while every worker is busy, slow or unmeasured ones in the conductor's CoDel queue.

One worker thread, and a route that is cheap by its estimate but can be told to block on
an event (`/cheap?hold=1`), so the test decides when the worker is busy. The servers run
with a 50 ms `handoff_ahead_ms`, so a warm-up request that a loaded machine preempted
(a few ms of wall time) still leaves /cheap counted cheap.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from rtserve import App, Request, Response
from tests.helpers import REVIEW, Client, server_thread, wait_for

AHEAD_MS = 50.0  # far above /cheap's handler time, however slow the machine


class CheapApp:
    """/cheap (fast unless ?hold=1), /held (never measured before it blocks)."""

    def __init__(self) -> None:
        self.app = App()
        self.release = threading.Event()
        self.ran: list[str] = []
        self._lock = threading.Lock()

        @self.app.get("/cheap", fallback=Response.json(REVIEW))
        def cheap(request: Request) -> Response:
            tag = request.query_param("tag", "-")
            with self._lock:
                self.ran.append(tag)
            if request.query_param("hold", "") == "1":
                assert self.release.wait(10)
            return Response.text(tag)

        @self.app.get("/held")
        def held(request: Request) -> Response:
            with self._lock:
                self.ran.append("held")
            assert self.release.wait(10)
            return Response.text("held")


def _hold_the_worker(s: CheapApp, server: Any) -> Client:
    """Warm /cheap up (a small estimate), then block the one worker on a cheap request."""
    _warm(server.address)
    s.ran.clear()
    first = Client(server.address)
    first.send("GET", "/cheap?tag=first&hold=1")
    wait_for(lambda: s.ran == ["first"], what="the first request to run")
    return first


def _warm(addr: tuple[str, int]) -> None:
    """A few quick requests, so /cheap has a small service-time estimate."""
    c = Client(addr)
    for _ in range(5):
        status, _, _ = c.request("GET", "/cheap?tag=warm")
        assert status == 200
    c.close()


def test_cheap_requests_are_handed_to_the_pool_while_every_worker_is_busy() -> None:
    """Behind a busy worker, cheap requests go to the pool's queue (admission counts them
    busy, the CoDel queue stays empty) and are answered in order once it frees."""
    s = CheapApp()
    with server_thread(s.app, threads=1, handoff_ahead_ms=AHEAD_MS) as server:
        first = _hold_the_worker(s, server)
        others = [Client(server.address) for _ in range(3)]
        for i, c in enumerate(others):
            c.send("GET", f"/cheap?tag=n{i}")
        adm = server.admission
        wait_for(lambda: adm.busy == 4, what="the cheap requests to be handed ahead")
        assert adm.queue_depth == 0
        s.release.set()
        assert first.recv()[2] == b"first"
        for i, c in enumerate(others):
            assert c.recv()[2] == f"n{i}".encode()
        assert s.ran == ["first", "n0", "n1", "n2"]  # the pool's queue keeps their order
        wait_for(lambda: adm.busy == 0, what="every worker to be given back")
        for c in (first, *others):
            c.close()


def test_a_slow_or_unmeasured_request_running_keeps_the_hand_ahead_shut() -> None:
    """While a request of a route with no estimate (or a slow one) runs, cheap requests
    wait in the conductor's queue, where CoDel and the deadlines choose."""
    s = CheapApp()
    with server_thread(s.app, threads=1, handoff_ahead_ms=AHEAD_MS) as server:
        _warm(server.address)
        blocked = Client(server.address)
        blocked.send("GET", "/held")
        wait_for(lambda: "held" in s.ran, what="/held to run")
        waiting = [Client(server.address) for _ in range(2)]
        for c in waiting:
            c.send("GET", "/cheap?tag=w")
        adm = server.admission
        wait_for(lambda: adm.queue_depth == 2, what="the cheap requests to queue")
        assert adm.busy == 1
        s.release.set()
        assert blocked.recv()[0] == 200
        for c in waiting:
            assert c.recv()[0] == 200
        for c in (blocked, *waiting):
            c.close()


def test_handoff_ahead_zero_hands_one_request_per_free_worker() -> None:
    s = CheapApp()
    with server_thread(s.app, threads=1, handoff_ahead_ms=0) as server:
        first = _hold_the_worker(s, server)
        second = Client(server.address)
        second.send("GET", "/cheap?tag=second")
        adm = server.admission
        wait_for(lambda: adm.queue_depth == 1, what="the second request to queue")
        assert adm.busy == 1
        s.release.set()
        assert first.recv()[0] == 200 and second.recv()[2] == b"second"
        for c in (first, second):
            c.close()


def test_a_request_handed_ahead_past_its_respond_by_time_is_answered_and_never_runs() -> None:
    """Its deadline comes while it waits behind a handler that turned slow: the conductor
    sends the fallback on time, and the worker that takes it later does not run it."""
    s = CheapApp()
    with server_thread(s.app, threads=1, handoff_ahead_ms=AHEAD_MS) as server:
        first = _hold_the_worker(s, server)
        late = Client(server.address)
        late.send("GET", "/cheap?tag=late", headers={"X-Request-Deadline-Ms": "100"})
        status, headers, body = late.recv()  # the fallback, while the worker is still held
        assert status == 200 and json.loads(body) == REVIEW
        assert headers.get("x-rtserve-fallback") == "deadline"
        s.release.set()
        assert first.recv()[2] == b"first"
        adm = server.admission
        wait_for(lambda: adm.busy == 0 and adm.stuck_count == 0,
                 what="the skipped task's worker to be given back")
        assert s.ran == ["first"]  # the late one never ran
        assert late.request("GET", "/cheap?tag=again")[2] == b"again"  # the connection goes on
        for c in (first, late):
            c.close()
