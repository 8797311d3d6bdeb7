"""The batched hand-off (handoff.Handoff.flush_batch, pool.WorkerPool._run): cheap
requests started in one loop turn reach the pool as one item that one worker runs in turn,
so a burst of new requests wakes one thread instead of one per request.

To make several requests arrive in one turn, an inline route (`/gate`, run on the
conductor) holds the conductor while the test sends them; when it lets go, the next epoll
turn finds them all readable.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from rtserve import App, Request, Response
from rtserve.pool import WorkerPool
from tests.helpers import Client, server_thread, wait_for


class GateApp:
    """/gate (inline: holds the conductor until released), /cheap and /slow (record the
    worker thread that ran them)."""

    def __init__(self) -> None:
        self.app = App()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: dict[str, int] = {}
        self._lock = threading.Lock()

        @self.app.get("/gate", inline=True)
        def gate(request: Request) -> Response:
            self.entered.set()
            assert self.release.wait(10)
            return Response.text("gate")

        @self.app.get("/cheap")
        def cheap(request: Request) -> Response:
            return self._record(request)

        self.together = threading.Barrier(4, timeout=10)

        @self.app.get("/stream")
        def stream(request: Request) -> Response:
            self._record(request)
            return Response(iter([b"a", b"b"]), content_type="text/plain")

        @self.app.get("/unmeasured")
        def unmeasured(request: Request) -> Response:
            self.together.wait()  # returns only when four run at the same time
            return self._record(request)

    def _record(self, request: Request) -> Response:
        tag = request.query_param("tag", "-")
        with self._lock:
            self.threads[tag] = threading.get_ident()
        return Response.text(tag)


def _burst(s: GateApp, server: Any, paths: list[str]) -> list[Client]:
    """Hold the conductor on /gate, send every path on a connection of its own, let go."""
    gate = Client(server.address)
    gate.send("GET", "/gate")
    assert s.entered.wait(10)
    clients = []
    for path in paths:
        c = Client(server.address)
        c.send("GET", path)
        clients.append(c)
    s.release.set()
    assert gate.recv()[2] == b"gate"
    gate.close()
    return clients


def test_cheap_requests_of_one_turn_run_on_one_worker() -> None:
    """Four requests of a measured cheap route that arrive together are handed over as one
    batch: one worker runs them all, and each gets its own answer."""
    s = GateApp()
    with server_thread(s.app, threads=4, handoff_ahead_ms=50.0) as server:
        warm = Client(server.address)
        for _ in range(5):
            assert warm.request("GET", "/cheap?tag=warm")[0] == 200
        assert server.metrics.handoff_batched == 0  # one at a time: never a batch
        clients = _burst(s, server, [f"/cheap?tag=b{i}" for i in range(4)])
        for i, c in enumerate(clients):
            status, _, body = c.recv()
            assert (status, body) == (200, f"b{i}".encode())
            c.close()
        assert server.metrics.handoff_batched == 4
        ran_on = {s.threads[f"b{i}"] for i in range(4)}
        assert len(ran_on) == 1, "a batch is run by one worker"
        wait_for(lambda: server.admission.busy == 0, what="every worker to be given back")


def test_unmeasured_requests_are_handed_over_one_by_one() -> None:
    """A route without an estimate may be slow: its requests never share a worker's batch.
    Four that arrive together each wait until all four run at once, which only four
    workers can do (batched on one worker, the first would wait for the others forever)."""
    s = GateApp()
    with server_thread(s.app, threads=4, handoff_ahead_ms=50.0) as server:
        clients = _burst(s, server, [f"/unmeasured?tag=u{i}" for i in range(4)])
        for i, c in enumerate(clients):
            assert c.recv()[0:3:2] == (200, f"u{i}".encode())
            c.close()
        assert len({s.threads[f"u{i}"] for i in range(4)}) == 4
        assert server.metrics.handoff_batched == 0


def test_a_route_that_streams_is_never_batched() -> None:
    """A streamed body is produced after the handler returned, beyond its estimate: such a
    route is never cheap, however small its estimate."""
    s = GateApp()
    with server_thread(s.app, threads=4, handoff_ahead_ms=50.0) as server:
        warm = Client(server.address)
        for _ in range(5):
            assert warm.request("GET", "/stream?tag=warm")[2] == b"ab"
        route = s.app._exact[("GET", "/stream")]
        assert route.streams and route.ewma_ns > 0
        for c in _burst(s, server, [f"/stream?tag=s{i}" for i in range(4)]):
            assert c.recv()[2] == b"ab"
            c.close()
        assert server.metrics.handoff_batched == 0


@pytest.mark.parametrize("settings", [{"handoff_batch": False}, {"handoff_ahead_ms": 0.0}])
def test_no_batch_when_turned_off(settings: dict[str, Any]) -> None:
    """`--handoff-batch off`, or `--handoff-ahead-ms 0` (no route counts as cheap): every
    request is handed over by itself."""
    s = GateApp()
    with server_thread(s.app, threads=4, **settings) as server:
        assert server.admission.batch is None
        warm = Client(server.address)
        for _ in range(5):
            assert warm.request("GET", "/cheap?tag=warm")[0] == 200
        for c in _burst(s, server, [f"/cheap?tag=b{i}" for i in range(4)]):
            assert c.recv()[0] == 200
            c.close()
        assert server.metrics.handoff_batched == 0


def test_a_batch_runs_each_task_and_posts_each_result() -> None:
    """The pool's side: a list item is several tasks, each posting its own final result;
    a batch not yet started comes back from shutdown task by task."""
    pool = WorkerPool(1)
    pool.start()
    release = threading.Event()
    try:
        pool.task_put([(lambda c, r, a: a * 2, "c1", 1, 10), (lambda c, r, a: a + 1, "c2", 2, 5)])
        results: list[Any] = []

        def collected() -> bool:
            results.extend(pool.take_completions())
            return len(results) == 2

        wait_for(collected, what="both results of the batch")
        assert results == [("c1", 1, 20, True), ("c2", 2, 6, True)]
        # Hold the one worker, then queue a batch behind it: shutdown returns its tasks.
        pool.task_put((lambda c, r, a: release.wait(10), "h", 3, None))
        wait_for(lambda: pool._tasks.qsize() == 0, what="the worker to take the holding task")
        later = [(lambda c, r, a: a, "c3", 4, 1), (lambda c, r, a: a, "c4", 5, 2)]
        pool.task_put(later)
        assert pool.shutdown(0.05) == later
    finally:
        release.set()
        pool.shutdown(5)
        pool.close()


def test_a_worker_that_dies_within_a_batch_loses_none_of_its_other_tasks() -> None:
    """The task that kills its thread gets its own result; the tasks after it in the batch
    go back on the queue and are run by the replacement worker."""
    pool = WorkerPool(1)
    pool.start()

    def die(conn: Any, rid: int, arg: Any) -> Any:
        raise SystemExit("thread exit")

    try:
        pool.task_put([(lambda c, r, a: a, "c1", 1, "one"), (die, "c2", 2, None),
                       (lambda c, r, a: a, "c3", 3, "three")])
        results: list[Any] = []

        def collected() -> bool:
            results.extend(pool.take_completions())
            return len(results) == 3

        wait_for(collected, what="every task of the batch to post a result")
        assert [(c, r) for c, r, _, _ in results] == [("c1", 1), ("c2", 2), ("c3", 3)]
        assert results[0][2] == "one" and results[2][2] == "three"
        assert isinstance(results[1][2], SystemExit)
        assert pool.deaths == 1
    finally:
        pool.shutdown(5)
        pool.close()
