"""An ASGI app's sync code (anyio's threads: FastAPI's `def` endpoints and dependencies).

rtserve bounds anyio's thread limiter on each loop to `--asgi-threads` (default
`--threads`), and the loops' gate stays shut while every one of those threads is taken, so
further requests wait in the conductor's CoDel queue rather than in anyio's queue
(asgi_executor.py, `bound_sync_threads` and `LoopThread.ready`). Real FastAPI apps over
real sockets.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
from typing import Any

import pytest
from fastapi import Depends, FastAPI

from tests.helpers import Client, server_thread, wait_for

EVENT_WAIT = 10.0


class Held:
    """Sync handlers that block until released, and how many are blocked now."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0

    def hold(self) -> None:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            self.go.wait(EVENT_WAIT)
        finally:
            with self.lock:
                self.inside -= 1


def make_app(held: Held, dep_go: threading.Event, after_dep: threading.Event) -> FastAPI:
    app = FastAPI()

    @app.get("/block")
    def block() -> dict[str, int]:
        held.hold()
        return {"tid": threading.get_native_id()}

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    def slow_dependency() -> str:  # sync: runs in anyio's threads
        dep_go.wait(EVENT_WAIT)
        return "dep"

    @app.get("/dep-then-wait")
    async def dep_then_wait(dep: str = Depends(slow_dependency)) -> dict[str, str]:
        after_dep.set()  # the dependency returned its thread; the request goes on
        while not held.go.is_set():
            await asyncio.sleep(0.005)
        return {"dep": dep}

    return app


@pytest.fixture
def scene() -> Any:
    held, dep_go, after_dep = Held(), threading.Event(), threading.Event()
    yield held, dep_go, after_dep, make_app(held, dep_go, after_dep)
    held.go.set()
    dep_go.set()


def test_sync_threads_are_bounded_and_the_rest_wait_in_the_conductors_queue(scene):
    held, _, _, app = scene
    with server_thread(app, asgi_threads=2, asgi_concurrency=100) as srv:
        loop = srv.asgi.loops[0]
        assert loop.sync_limiter is not None and loop.sync_limiter.total_tokens == 2
        warm = Client(srv.address)
        for _ in range(3):  # /hello measured (its own route from its second sight): light
            assert warm.request("GET", "/hello")[0] == 200
        clients = [Client(srv.address) for _ in range(5)]
        for n, c in enumerate(clients[:2], 1):  # one by one: each takes its thread
            c.send("GET", "/block")
            wait_for(lambda n=n: held.inside == n, what=f"{n} sync handlers running")
        for c in clients[2:]:
            c.send("GET", "/block")
        # The other three wait in the CoDel queue, not in anyio's: none has begun a task.
        wait_for(lambda: len(srv.admission.queue) == 3, what="three requests queued")
        assert loop.running() == 2
        # A light async path is not held back by the sync threads being taken.
        for _ in range(3):
            assert warm.request("GET", "/hello")[0] == 200
        body = warm.request("GET", "/metrics")[2].decode()  # what an operator sees
        values = dict(line.split() for line in body.splitlines()
                      if line.startswith("rtserve_asgi_sync_threads"))
        assert float(values["rtserve_asgi_sync_threads_busy"]) == 2  # at the bound
        assert float(values["rtserve_asgi_sync_threads"]) == 2
        held.go.set()
        assert [c.recv()[0] for c in clients] == [200] * 5
        assert held.most == 2


def test_asgi_threads_defaults_to_the_worker_count_and_a_limit_set_by_the_app_holds(scene):
    _, _, _, app = scene
    with server_thread(app, threads=3) as srv:
        assert srv.asgi.loops[0].sync_limiter.total_tokens == 3
    with server_thread(app, threads=3, asgi_threads=7) as srv:
        limiter = srv.asgi.loops[0].sync_limiter
        assert limiter.total_tokens == 7
        limiter.total_tokens = 1  # as an app's lifespan may: the gate reads it live
        held = scene[0]
        clients = [Client(srv.address) for _ in range(3)]
        clients[0].send("GET", "/block")
        wait_for(lambda: held.inside == 1, what="the sync handler running")
        # The path's first own route is unmeasured: one request passes to be measured
        # (Handoff.light), and it waits in anyio's queue for the one thread.
        clients[1].send("GET", "/block")
        wait_for(lambda: limiter.statistics().tasks_waiting == 1, what="the trial waiting")
        clients[2].send("GET", "/block")
        wait_for(lambda: len(srv.admission.queue) == 1, what="the third request queued")
        held.go.set()
        assert [c.recv()[0] for c in clients] == [200] * 3
        assert held.most == 1
        limiter.total_tokens = math.inf  # anyio allows lifting the bound altogether
        body = clients[0].request("GET", "/metrics")[2]
        assert b"\nrtserve_asgi_sync_threads +Inf\n" in body
        assert clients[0].request("GET", "/block")[0] == 200  # the gate stays open


def test_an_async_burst_is_not_held_back_by_the_sync_bound(scene):
    """No sync thread taken: a burst of awaiting `async def` requests all begin at once,
    however small `--asgi-threads` is (the bound is for sync code only)."""
    held = scene[0]
    app = FastAPI()

    @app.get("/await")
    async def wait_async() -> dict[str, bool]:
        while not held.go.is_set():
            await asyncio.sleep(0.005)
        return {"ok": True}

    with server_thread(app, asgi_threads=1) as srv:
        qw = srv.metrics.queue_wait
        queued_before = qw.count - qw.counts[0]  # starts that waited in the queue
        clients = [Client(srv.address) for _ in range(12)]
        for c in clients:
            c.send("GET", "/await")
        wait_for(lambda: srv.asgi.loops[0].running() == 12, what="all twelve running")
        assert qw.count - qw.counts[0] == queued_before  # each began without waiting
        held.go.set()
        assert [c.recv()[0] for c in clients] == [200] * 12


def test_a_thread_freed_mid_request_lets_the_queued_request_start(scene):
    """A sync dependency gives its thread back while its request goes on: no request ends
    to ask the gate again, so its own look (TOKEN_LOOK_NS) starts the queued one."""
    held, dep_go, after_dep, app = scene
    with server_thread(app, asgi_threads=1) as srv:
        first, second = Client(srv.address), Client(srv.address)
        first.send("GET", "/dep-then-wait")
        wait_for(lambda: srv.asgi.loops[0].sync_limiter.borrowed_tokens == 1,
                 what="the dependency holding the one thread")
        second.send("GET", "/block")
        wait_for(lambda: len(srv.admission.queue) == 1, what="the second request queued")
        dep_go.set()
        assert after_dep.wait(EVENT_WAIT)
        # The first request still runs (it waits for held.go); the second starts anyway.
        wait_for(lambda: held.inside == 1, what="the queued sync request started")
        held.go.set()
        assert second.recv()[0] == 200 and first.recv()[0] == 200


def test_an_app_without_anyio_keeps_no_limiter() -> None:
    """An app that never imported anyio has no sync pool to bound: rtserve does not import
    anyio for it (a fresh interpreter, so no other test's import counts)."""
    code = (
        "import asyncio, sys\n"
        "from rtserve.asgi_executor import bound_sync_threads\n"
        "async def main():\n"
        "    print(bound_sync_threads(4), 'anyio' in sys.modules)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.split() == ["None", "False"]
