"""The hand-off: how a request admission started reaches the worker pool. Conductor thread.

Admission (admission.py) decides what starts, waits or is answered when; this module owns
what starting means once that decision asks it: the workers counted busy, the hand-ahead
test (may a cheap request wait in the pool's own queue while every worker is busy), the
batch of a loop turn's cheap tasks (one pool item, one worker wake-up, per turn), and the
CPU gate with the charges of the handlers running now.

`Admission` is a `Handoff` (a subclass), not a holder of one: the decisions read the busy
count and the gates on every request, and the loop reads `batch` every turn, as attributes
of one object, with no forwarding call or property between them (a Python call is ~360
instructions under callgrind, 0.5% of a keep-alive request). The one piece of this state
released elsewhere is a finished worker's: `Admission.finished` gives it back inline (see
there), since the completion's other bookkeeping (stuck, limiter, dead on arrival) is
admission's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .app import Route
from .connection import Connection
from .limits import Limits
from .metrics import Metrics
from .request import Request


class Handoff:
    """The hand-over of started requests to the pool, and the gates a start asks."""

    def __init__(self, limits: Limits, metrics: Metrics, submit: Callable[[Any], None],
                 worker: Any) -> None:
        self.threads = limits.threads
        self._busy = 0  # requests on workers (streams count until their worker is free)
        self._metrics = metrics
        self._submit = submit  # the pool's task queue put (a task, or a batch: a list)
        self._worker = worker
        # The hand-ahead (see _ahead_ok): handler time by the routes' estimates that may
        # wait in the pool's own queue behind busy workers, and the requests running on a
        # route too slow (or not yet measured) for it, which keep it shut while they run.
        self._ahead_ns = limits.ahead_ns
        self._ahead_cap = self._ahead_ns * limits.threads
        self._slow: set[tuple[Connection, int]] = set()
        # Cheap tasks started in one loop turn go to the pool as one batch (flush_batch,
        # called by the loop at the end of its turn): one worker wake-up per turn, not
        # one per request. None: every task is handed over at once (no loop flushes).
        self.batch: list[tuple] | None = None
        self._batch_ns = 0.0
        self._cpu_cap = limits.cpu_cap_ns
        self._cpu_inflight = 0  # sampled CPU ns of the handlers running now (see _cpu_gate)
        self._charges: dict[tuple, int] = {}  # (conn, req_id) -> CPU ns charged at start
        # The gate a hand-off asks last: the CPU gate (_cpu_gate), or what the server puts
        # in its place for an interface whose handlers are not sampled (ASGI: the loops'
        # backlog). An attribute, not a method to patch: the compiled build's classes
        # cannot have their methods replaced (docs/compiled.md).
        self.cpu_ok: Callable[[], bool] = self._cpu_gate

    # ---- the gates a start asks -----------------------------------------------------------

    def _ahead_ok(self, route: Route) -> bool:
        """May a request start while every worker is busy, waiting in the pool's queue?

        Only for cheap work: the pool's queue is shared, so the first worker to finish
        takes it without a round trip through the conductor (one completion and one
        dispatch per request otherwise, which made fewer threads slower on small
        handlers). Allowed while its route's estimate is at most `handoff_ahead_ms`, no
        request of a slower or unmeasured route runs, and the estimated time of what would
        wait ahead of it, spread over the workers, stays within `handoff_ahead_ms`. A
        route of 1 ms handlers never waits there: it stays in the CoDel queue, where the
        deadline and CoDel still choose.
        """
        e = route.ewma_ns
        return (0 < e <= self._ahead_ns and not self._slow and not route.streams
                and (self._busy - self.threads + 1) * e <= self._ahead_cap)

    def _cpu_gate(self) -> bool:
        """May another handler start now without time-slicing the GIL?

        Handlers of one process share one core. Eight 1 ms CPU-bound handlers started
        together each take ~8 ms of wall time, most finish after their deadline's fallback
        went out (wasted work), and the conductor's timers wait for the GIL behind them.
        So a handler starts only while the sampled CPU time of the handlers running is
        under `cpu_inflight_ms` (whatever its own cost, so a heavy route is not starved).
        Handlers that mostly wait (I/O, sleeps) cost little CPU and still use every thread.
        """
        cap = self._cpu_cap
        return not cap or self._cpu_inflight < cap

    # ---- the hand-over ------------------------------------------------------------------

    def _start(self, conn: Connection, rid: int, req: Request) -> None:
        """Hand a request to the pool, charging its route's CPU estimate until it ends."""
        self._busy += 1
        conn.run()
        route = req.route
        assert route is not None  # admission only sees routed requests
        cheap = 0 < route.ewma_ns <= self._ahead_ns and not route.streams
        if self._ahead_ns and not cheap:
            self._slow.add((conn, rid))  # keeps the hand-ahead shut while it runs
        charge = route.cpu_ns
        if charge and self._cpu_cap:
            self._cpu_inflight += charge
            self._charges[(conn, rid)] = charge
        batch = self.batch
        if batch is not None and cheap:
            batch.append((self._worker, conn, rid, req))
            self._batch_ns += route.ewma_ns
            if self._batch_ns >= self._ahead_ns:
                self.flush_batch()
        else:
            self._submit((self._worker, conn, rid, req))

    def flush_batch(self) -> None:
        """Hand the turn's cheap tasks to the pool: a lone one as itself, several as one
        list that one worker runs in turn (pool.py), so a burst wakes one thread."""
        batch = self.batch
        if batch:
            if len(batch) == 1:
                self._submit(batch[0])
            else:
                self._metrics.handoff_batched += len(batch)
                self._submit(batch)
            self.batch = []
            self._batch_ns = 0.0

    def handler_returned(self, conn: Connection, rid: int) -> None:
        """A streamed response's head arrived: its handler returned, and its worker now
        produces the body, mostly waiting for the client at the high-water mark. Its CPU
        charge ends here: a stalled stream must not hold the CPU gate shut for others."""
        if self._charges:
            self._cpu_inflight -= self._charges.pop((conn, rid), 0)

    # ---- public read API (metrics, /readyz, tests) -----------------------------------------

    @property
    def busy(self) -> int:
        """Workers running a handler (or producing a stream)."""
        return self._busy

    @property
    def cpu_inflight_ns(self) -> int:
        return self._cpu_inflight

    @property
    def charged(self) -> int:
        """Requests holding a CPU charge (0 once every charged handler finished)."""
        return len(self._charges)
