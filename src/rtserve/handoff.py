"""The hand-off: how a request admission started reaches the worker pool. Conductor thread.

Admission (admission.py) decides what starts, waits or is answered when; this module owns
what starting means once that decision asks it: the workers counted busy, the hand-ahead
test (may a cheap request wait in the pool's own queue while every worker is busy), the
batch of a loop turn's cheap tasks (one pool item, one worker wake-up, per turn), and the
CPU gate with the charges of the handlers running now (which lapse, while no deadline is
at stake, once a handler has spent its charge and waits) and the light routes it lets
through, and the relaxed state: with nothing at stake for a while, the gate stands open and
the GIL's switch interval is the throughput one (see relax).

`Admission` is a `Handoff` (a subclass), not a holder of one: the decisions read the busy
count and the gates on every request, and the loop reads `batch` every turn, as attributes
of one object, with no forwarding call or property between them (a Python call is ~360
instructions under callgrind, 0.5% of a keep-alive request). The one piece of this state
released elsewhere is a finished worker's: `Admission.finished` gives it back inline (see
there), since the completion's other bookkeeping (stuck, limiter, dead on arrival) is
admission's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from .app import Route
from .connection import Connection
from .limits import Limits
from .metrics import Metrics
from .request import Request

#: A route whose CPU estimate is at most the cap over this is light: never charged, and let
#: through a shut gate while a worker is free (see light).
LIGHT_SHARE = 16
#: Where handlers' CPU is not sampled (ASGI), a route whose time to the answer is at most
#: the cap over this is light (see light_by_time).
LIGHT_SHARE_BY_TIME = 4
#: While the gate stays shut, how soon it looks again at what the charged handlers used.
LAPSE_CHECK_NS = 5_000_000
#: The share of its charge a handler must have spent before its charge may lapse.
LAPSE_USED = 0.75
#: The servers of this process that are not relaxed (Handoff.hold_prompt): the switch
#: interval is process-wide, so it is the relaxed one only while no server needs it short.
_PROMPT: set[int] = set()
_NEVER = 1 << 62  # a CPU estimate no route reaches: the threshold with the gate off
_thread_clock_ns = time.clock_gettime_ns
_thread_clock = time.pthread_getcpuclockid
_monotonic_ns = time.monotonic_ns


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
        cap = self._cpu_cap = limits.cpu_cap_ns
        # Handlers of routes estimated above this are charged (light ones are not; with
        # the gate off, none: one comparison per start either way).
        self._light_ns = cap // LIGHT_SHARE if cap else _NEVER
        self._light_time_ns = 0  # set by light_by_time: light by time, not by CPU
        self._cpu_inflight = 0  # sampled CPU ns of the handlers running now (see _cpu_gate)
        self._charges: dict[tuple, Request] = {}  # (conn, req_id) -> the charged request
        # While the gate is shut with requests waiting: when it looks again at what the
        # charged handlers used, so the loop wakes then (Admission.next_expiry and
        # on_queue_due) even if no handler ends; never sooner (a system call per handler).
        self.gate_wake_ns = 0
        self._next_look_ns = 0
        # Set by Admission when a request with a deadline is queued (cleared lazily).
        self._sheddable_queued = False
        # The gate a hand-off asks last: the CPU gate (_cpu_gate), or what the server puts
        # in its place for an interface whose handlers are not sampled (ASGI: the loops'
        # backlog). An attribute, not a method to patch: the compiled build's classes
        # cannot have their methods replaced (docs/compiled.md).
        self.cpu_ok: Callable[[], bool] = self._cpu_gate
        # Relaxed (see relax): the gate open (cap 0) and the switch interval long, while
        # nothing is at stake. `staked` is set by every stake (a request with a deadline,
        # a light request beside charged handlers) and cleared by the tick (relax_tick).
        self.relaxed = False
        self.staked = False
        self._relax_after_ns = 0  # 0: never relax (enable_relax sets it)
        self._calm_since_ns = 0
        self._prompt_cap = cap
        self._prompt_switch = self._relaxed_switch = 0.0

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
        if not cap or self._cpu_inflight < cap:
            return True
        return self._lapse_charges(cap)

    def _lapse_charges(self, cap: int) -> bool:
        """The gate is shut: end the charges of handlers that did their work and now wait,
        then ask again (and if it stays shut, note when to look next).

        A charge is the route's estimate of one handler's CPU. A handler whose thread has
        spent most of that (`LAPSE_USED`) and spent nothing since the last look (at least
        `LAPSE_CHECK_NS` ago) has done the work the estimate stands for and is waiting: a
        model call, a cache miss, a sleep. Its charge would otherwise keep the gate shut
        for the whole wait with the core idle (a cap of one handler's CPU, with 1% of
        requests stalling 200 ms after their work, served a third of the load). A handler
        time-sliced by others has not used its charge, or is still spending CPU: it keeps
        its charge, so the gate never lets in more CPU work than it measured. A thread's
        CPU clock is a system call: looks are at least `LAPSE_CHECK_NS` apart, and the
        loop is woken for the next only while some handler may be found waiting. No
        charge lapses while a request with a deadline runs or waits: then the gate keeps
        the charges until their handlers end, as the deadlines need.
        """
        charges = self._charges
        if self._sheddable_queued or any(r.deadline_ns for r in charges.values()):
            # A deadline is at stake: a handler let in early would time-slice the GIL
            # with those that race it, and with the conductor's timers (measured: with
            # lapses, C answered 1-2 requests a run after 50 ms, none without).
            return False
        now = _monotonic_ns()
        if now < self._next_look_ns:
            return False
        self._next_look_ns = now + LAPSE_CHECK_NS
        wake = 0  # the soonest a charge may be found used and waiting
        for key, req in list(charges.items()):
            charge = req.charge
            started = req.t_start
            if not started or now - started < charge * LAPSE_USED:
                # Not begun, or too recently to have used its charge: look again when it
                # may have (a stall that follows is seen then, with no completion to wait).
                ready = (started or now) + int(charge * LAPSE_USED)
                if not wake or ready < wake:
                    wake = ready
                continue
            try:
                clock = _thread_clock_ns(_thread_clock(req.cpu_thread))
                used = clock - req.cpu_t0
            except AttributeError:  # its worker is about to record them
                continue
            except OSError:  # its worker thread has ended: nothing computes for it
                clock = used = -1
            if used < 0 or (used >= charge * LAPSE_USED
                            and clock == getattr(req, "cpu_seen", None)):
                del charges[key]  # its work is done and no CPU since the last look: it waits
                self._cpu_inflight -= charge
                self._metrics.cpu_charges_lapsed += 1
                continue
            req.cpu_seen = clock
            # Short of its work (time-sliced), or still spending: look again when it may
            # have used it, or (the work done) one look from now.
            ready = now + max(int(charge * LAPSE_USED) - used, 0)
            if not wake or ready < wake:
                wake = ready
        if self._cpu_inflight < cap:
            return True
        self.gate_wake_ns = max(wake, self._next_look_ns) if wake else 0
        return False

    def light(self, route: Route) -> bool:
        """Does a request of `route` pass a shut CPU gate while a worker is free?

        Yes when its sampled CPU is at most 1/`LIGHT_SHARE` of the cap (0.19 ms at the
        default 3 ms): it ends before it could time-slice anyone, and a fast route must not
        wait behind CPU-bound ones (a `/hello` queued behind 1 ms handlers under a
        standing queue waited 4.5 s: LIFO served those with a deadline first). An
        unmeasured route is light until one of its requests has started (`Route.tried`,
        set by `_start`): that one passes, to be measured, and the rest wait for its
        figure. Else a path of a WSGI app first seen under load waited for the gate with
        nothing to measure it by (a `/hello` probe: 1.0 s, passed over under LIFO).
        """
        if self._light_time_ns:
            e = route.ewma_ns
            if e:
                return e <= self._light_time_ns
        else:
            c = route.cpu_ns
            if c:
                return c <= self._light_ns
        return not route.tried

    def light_by_time(self) -> None:
        """Judge light routes by their measured time to the answer, for an interface whose
        handlers' CPU is not sampled (ASGI: a loop's tasks interleave, so the loop's CPU
        is sampled per request on average, not per route).

        A task's time from its start to its answer is at least its CPU on the loop, so a
        route light by time is light by CPU; one that awaits I/O looks heavier than it is
        and waits for the gate as before. The share is larger than LIGHT_SHARE (0.75 ms
        at the default 3 ms cap): on a loop nothing time-slices a task, a light one only
        delays those behind it by its own time, and a FastAPI `/hello` takes 0.25 ms of
        framework (a `/score` of 1 ms CPU: 1.35 ms). Measured: with a `/score` deadline,
        a `/hello` probe beside workload C waited p50 960 ms in the CoDel queue (requests
        without a deadline are passed over under LIFO); see docs/asgi.md.
        """
        cap = self._cpu_cap
        self._light_time_ns = cap // LIGHT_SHARE_BY_TIME if cap else _NEVER

    # ---- relaxed: nothing at stake --------------------------------------------------------

    def enable_relax(self, after_s: float, prompt_switch_s: float, relaxed_switch_s: float,
                     now: int) -> None:
        """Let the server relax after `after_s` seconds with nothing at stake (the server
        calls this only when no deadline is configured and the gate is the CPU gate)."""
        self._relax_after_ns = int(after_s * 1e9)
        self._calm_since_ns = now
        self._prompt_switch = prompt_switch_s
        self._relaxed_switch = relaxed_switch_s

    def relax_tick(self, now: int) -> bool:
        """The housekeeping tick: relax once nothing was at stake for `relax_after_s`.
        True when it relaxed now (the gate opened: queued requests may start).

        The gate and the short switch interval keep two things: deadlines (timers that
        fire on time, handlers that finish before their fallback) and fast routes beside
        CPU-bound ones (a `/hello` that need not wait for a worker or the GIL behind them).
        With neither, they only cost throughput: on workload C without a deadline, the
        conductor's CPU per request fell from 73.6 to 41.1 us with both set for throughput
        (docs/deadlines.md). A stake is seen on the conductor, where the request arrives,
        and undoes it at once (tense).
        """
        if not self._relax_after_ns:
            return False
        if self.staked:
            self.staked = False
            self._calm_since_ns = now
            return False
        if self.relaxed or now - self._calm_since_ns < self._relax_after_ns:
            return False
        self.relaxed = True
        self._cpu_cap = 0  # _cpu_gate: open; charges are still kept, for tense
        self.gate_wake_ns = 0
        _PROMPT.discard(id(self))
        if not _PROMPT:
            sys.setswitchinterval(self._relaxed_switch)
        self._metrics.relaxations += 1
        return True

    def tense(self) -> None:
        """A stake while relaxed: the gate and the prompt switch interval again, now,
        before the request that brought the stake is started or queued. The charges of the
        handlers already running were kept, so the gate shuts until they are under it."""
        self.relaxed = False
        self._cpu_cap = self._prompt_cap
        _PROMPT.add(id(self))
        sys.setswitchinterval(self._prompt_switch)

    def hold_prompt(self, held: bool) -> None:
        """This server runs (True: it needs the prompt switch interval until it relaxes)
        or has stopped (False): another server of the process may relax it then."""
        if held:
            _PROMPT.add(id(self))
        else:
            _PROMPT.discard(id(self))

    # ---- the hand-over ------------------------------------------------------------------

    def _start(self, conn: Connection, rid: int, req: Request) -> None:
        """Hand a request to the pool, charging its route's CPU estimate (unless light)
        until it ends or the charge lapses."""
        self._busy += 1
        conn.run()
        route = req.route
        assert route is not None  # admission only sees routed requests
        if not route.tried:
            route.tried = True  # unmeasured routes are light no more (see light)
        cheap = 0 < route.ewma_ns <= self._ahead_ns and not route.streams
        if self._ahead_ns and not cheap:
            self._slow.add((conn, rid))  # keeps the hand-ahead shut while it runs
        charge = route.cpu_ns
        if charge > self._light_ns:
            self._cpu_inflight += charge
            req.charge = charge
            self._charges[(conn, rid)] = req
        elif self._charges:  # a light request beside CPU-bound ones: a stake (relax_tick)
            self.staked = True
            if self.relaxed:
                self.tense()
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
            charged = self._charges.pop((conn, rid), None)
            if charged is not None:
                self._cpu_inflight -= charged.charge

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
