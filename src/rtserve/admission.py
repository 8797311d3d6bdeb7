"""Admission: which request runs, waits, or is answered at once, and when.

Conductor thread only. Between the parser and the pool: the budget and its margin, dead on
arrival, the concurrency limit, the CoDel queue, the deadline timers' answers and the
bookkeeping of workers still running requests that were answered late (stuck). The
algorithms themselves (client budgets, CoDelQueue, ConcurrencyLimit) are in deadlines.py;
the hand-over of a request this module starts (the busy count, the hand-ahead test, the
loop turn's batch, the CPU gate and its charges) is in handoff.py, `Admission`'s base.

`admit` decides synchronously for a request the reader just parsed and returns the reply
to send at once (or None when the request was queued or started). Everything that happens
later (a deadline, a CoDel expiry, a worker freeing up) sends its answer through
`answer(conn, reply, now)`, the writer's entry for replies that do not come from the parse
loop. Read-only properties at the end (and the base's: busy, cpu_inflight_ns, charged) are
the public view /metrics and tests use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .answers import Answers
from .app import Route
from .config import Config
from .connection import QUEUED, RUNNING, Connection
from .deadlines import DOA_DECAY, CoDelQueue, ConcurrencyLimit, client_budget_ns
from .deadlines import retry_after_seconds as _retry_after
from .framing import Reply
from .handoff import Handoff
from .limits import Limits
from .metrics import Metrics
from .request import Request
from .timers import Timers


class Admission(Handoff):
    """The queue and the gates in front of the worker pool (the hand-over itself, the
    hand-ahead test, the batch and the CPU gate are the base class's: handoff.py)."""

    def __init__(self, limits: Limits, cfg: Config, metrics: Metrics, timers: Timers,
                 answers: Answers, submit: Callable[[Any], None], worker: Any) -> None:
        super().__init__(limits, metrics, submit, worker)
        # Items are (conn, req_id, request). Only requests with a deadline jump the line
        # under LIFO; one without is passed over for at most ten intervals
        # (deadlines.PASSED_OVER_INTERVALS).
        self.queue = CoDelQueue(
            cfg.codel_target_ms, cfg.codel_interval_ms, lambda item: item[2].deadline_ns,
            lambda item: item[2].t_queued,
        )
        self.waiting = self.queue.items  # truthy while requests wait (a C-level test)
        # Under a standing queue a request with a deadline may wait the larger of CoDel's
        # target and this share of its own budget (docs/deadlines.md, "CoDel and the
        # request's own budget"): 5 ms of a 50 ms budget shed requests that had time left.
        self._budget_share = cfg.codel_budget_share
        self._light_queued = False  # set when a light request is queued (Handoff.light)
        self.limit = ConcurrencyLimit(cfg.adaptive_limit, cfg.max_inflight, limits.threads)
        self._sampling = self.limit.mode != "off"
        self._margin_ns = limits.margin_ns
        self._default_ns = limits.default_deadline_ns
        self._shed_fallback = cfg.shed_with_fallback
        self._timers = timers
        self._answers = answers
        self.answer: Callable[[Connection, Reply, int], None] = _unset  # writer.answer
        # Set by the server for an interface whose work can be stopped (ASGI): called with
        # (conn, req_id, "deadline") after a running request's fallback went out.
        self.cancel: Callable[[Connection, int, str], None] | None = None
        self._stuck: set[tuple[Connection, int]] = set()  # answered late, worker still on it
        self.lag_ns = 0  # recent deadline-timer lateness, sent as extra margin
        self._timer_fired = False  # a deadline timer fired since the last tick (on_tick)

    # ---- a request the reader just parsed -----------------------------------------------

    def admit(self, conn: Connection, rid: int, req: Request, route: Route, now: int
              ) -> Reply | None:
        """Start, queue, or answer at once (returned). Raises HTTPError for a bad budget."""
        start = req.start_ns
        budget = route.deadline_ns or self._default_ns
        cb = client_budget_ns(req.raw_headers) if req.budget_header else None
        if cb is not None and (not budget or cb < budget):
            budget = cb
        if budget:
            self.staked = True  # a deadline is at stake (Handoff.relax_tick)
            if self.relaxed:
                self.tense()
            req.deadline_ns = start + budget
            respond_by = req.respond_by_ns = self.respond_by(req.deadline_ns, budget)
            if respond_by - now <= route.ewma_ns * route.doa_scale:
                self._metrics.dead_on_arrival += 1
                route.doa_scale *= DOA_DECAY  # a probe gets through now and then
                return self._answers.late(req, b"dead-on-arrival")
            if route.inline:
                return self._run_inline(conn, rid, req, respond_by)
            self._timers.add_deadline(respond_by, conn, rid)
        elif route.inline:
            return self._run_inline(conn, rid, req, 0)
        limit = self.limit
        if limit.enabled and not limit.admits(self._busy + len(self.queue)):
            return self._shed_reply(req, "limit", now)
        req.t_queued = now
        if self.waiting:
            # Requests wait for a worker or for the CPU gate. A light one passes those
            # that wait for the gate alone (a worker is free): see Handoff.light.
            start = self._busy < self.threads and self.light(route)
        else:
            start = ((self._busy < self.threads or self._ahead_ok(route))
                     and (self.cpu_ok() or self.light(route)))
        if start:
            qw = self._metrics.queue_wait  # a zero wait: the first bucket, no bisect
            qw.counts[0] += 1
            qw.count += 1
            self._start(conn, rid, req)
        else:
            conn.queue()
            self.queue.push((conn, rid, req), now)
            if req.deadline_ns and not self._sheddable_queued:
                self._sheddable_queued = True
            if not self._light_queued and self.light(route):
                self._light_queued = True
                self.staked = True  # a light request waits behind others (relax_tick)
                if self.relaxed:
                    self.tense()
        return None

    def _run_inline(self, conn: Connection, rid: int, req: Request, respond_by: int) -> Reply:
        """An inline route: its handler runs here, on the conductor, and its answer is
        returned to send now. The budget and dead on arrival applied before; no deadline
        timer can fire while it runs, so a late finish is counted as a miss."""
        req.t_queued = req.start_ns
        reply = self._worker(conn, rid, req, True)
        if respond_by and req.t_end > respond_by:
            self._metrics.deadline_misses += 1
        return reply  # inline: always a Reply

    def respond_by(self, deadline_ns: int, budget: int) -> int:
        """When the answer must leave: the deadline less the margin and the recent timer
        lateness (CPU-bound handlers keep the GIL from the conductor), at most a quarter
        of the budget: the fallback must land before the deadline, not at it."""
        lag = self.lag_ns
        quarter = budget >> 2
        return deadline_ns - self._margin_ns - (lag if lag < quarter else quarter)

    def _shed_reply(self, req: Request, reason: str, now: int) -> Reply:
        self._metrics.count_shed(reason)
        route = req.route
        if reason == "codel" and self._sampling:
            self.limit.on_sample(now - req.start_ns, self._busy + len(self.queue), True)
        if self._shed_fallback and route is not None and route.fallback is not None:
            # A decision in time beats a retry (a payment must be decided by its deadline):
            # the route's fallback, marked `X-Rtserve-Fallback: shed`, counted as both.
            return self._answers.late(req, b"shed")
        retry = _retry_after(len(self.queue), route.ewma_ns if route else 0, self.threads)
        return self._answers.shed(req, retry)

    # ---- later events ---------------------------------------------------------------------

    def finished(self, conn: Connection, rid: int, req: Request | None, now: int) -> None:
        """A worker is free again (its last completion for request `rid` arrived).

        `req` is the request when its result is used (not late), for the limiter's sample.
        """
        # The hand-off's part (handoff.py's state, given back here inline: a call per
        # completion would cost ~0.5% of a keep-alive request): the worker, its CPU
        # charge, and its hold on the hand-ahead.
        self._busy -= 1
        if self._charges:
            charged = self._charges.pop((conn, rid), None)
            if charged is not None:
                self._cpu_inflight -= charged.charge
        if self._slow:
            self._slow.discard((conn, rid))
        # Admission's part: a stuck worker is free again, and what a run tells the gates.
        if self._stuck:
            self._stuck.discard((conn, rid))
        if req is not None:
            route = req.route
            assert route is not None
            if route.doa_scale != 1.0:
                route.doa_scale = 1.0  # it ran: the workers' estimate is fresh again
            if self._sampling:
                self.limit.on_sample(now - req.start_ns, self._busy + len(self.queue), False)

    def dispatch_queued(self, now: int) -> None:
        """Hand queued requests to free workers: CoDel sheds, LIFO under a standing queue.

        LIFO serves the newest request first only when it has a deadline (requests without
        one keep their order: see the queue's `lifo_ok`), and a request starts only while
        the CPU budget allows it; while it does not, light requests queued behind start
        (`_start_light`).
        """
        q = self.queue
        while q:
            limit = q.timeout_ns(now)
            conn, rid, req = q.peek(now)
            if not conn.awaits(rid):
                q.pop(now)
                continue  # answered by its deadline, or the client left
            if self._busy >= self.threads and not self._ahead_ok(req.route):
                return  # every worker is busy: the next completion starts it
            if not self.cpu_ok() and not self.light(req.route):
                # The CPU budget is spent: the next completion (or the next lapse of a
                # charge, gate_wake_ns) frees some. A worker is free for light ones.
                if self._light_queued:
                    self._start_light(limit, now)
                return
            q.pop(now)
            self._start_queued(conn, rid, req, limit, now)

    def _start_queued(self, conn: Connection, rid: int, req: Request, limit: int, now: int
                      ) -> None:
        """Start a request taken out of the queue, unless its wait or its deadline says
        to answer it now instead (`limit`: CoDel's timeout now)."""
        waited = now - req.t_queued
        # CoDel sheds only requests that carry a deadline: for them a long wait means a
        # late answer anyway. Requests without one wait, bounded by --max-inflight.
        if limit and req.deadline_ns and waited > self._wait_limit(req, limit):
            self.answer(conn, self._shed_reply(req, "codel", now), now)
            return
        route = req.route
        assert route is not None  # admission only queues routed requests
        if req.deadline_ns and self.respond_by(
            req.deadline_ns, req.deadline_ns - req.start_ns
        ) - now <= route.ewma_ns:
            # Late already, or too late to finish: never run it; answer it now rather
            # than leave it for the timer (it is out of the queue, so nothing else would).
            self.skipped(conn, rid, now)
            return
        self._metrics.queue_wait.observe(waited)
        self._start(conn, rid, req)

    def _start_light(self, limit: int, now: int) -> None:
        """The queue's next request waits for the CPU gate, not for a worker: start the
        light requests queued behind it while workers are free (in arrival order; the
        queue holds them only when every worker was busy as they came). Clears the flag
        its push set once none is left."""
        q = self.queue
        for item in list(q.items):
            if self._busy >= self.threads:
                return  # the rest wait for a worker, flag kept
            conn, rid, req = item
            if self.light(req.route) and conn.awaits(rid):
                q.discard(item, now)
                self._start_queued(conn, rid, req, limit, now)
        self._light_queued = False

    def skipped(self, conn: Connection, rid: int, now: int) -> None:
        """The deadline's answer, now, for a request that never ran: its respond-by time
        came while it was queued (`on_deadline`, which took it out of the queue), it was
        too late to finish when a worker freed (`dispatch_queued`), or a worker took it
        after that time and did not run it (its worker is given back already; its timer
        entry then finds it answered)."""
        req = conn.request
        assert req is not None  # awaits(rid) held
        m = self._metrics
        m.deadline_misses += 1
        m.count_shed("deadline")
        self.answer(conn, self._answers.late(req, b"deadline"), now)

    def _wait_limit(self, req: Request, limit: int) -> int:
        """How long `req` (which has a deadline) may wait, given CoDel's timeout now.

        Under a standing queue, CoDel's target or `codel_budget_share` of the request's
        budget, whichever is longer: the target alone is a general service's figure, and
        a request that has waited 5 ms of its 50 ms still has the time to be served. Each
        one shed early is a 503 that a client in a loop answers with a new request at
        once: more work for the conductor, and fewer answers for real. (Outside a standing
        queue the timeout is CoDel's interval, as long as or longer than most budgets.)
        """
        own = int((req.deadline_ns - req.start_ns) * self._budget_share)
        return own if own > limit else limit

    def next_expiry(self, now: int) -> int:
        """When the loop must next run `on_queue_due` (0: not for the queue): the oldest
        queued request with a deadline may wait no longer, or the shut CPU gate looks at
        its charges again (`gate_wake_ns`), whichever is first.

        CoDel's part is 0 when no queued request has a deadline (CoDel sheds no other): a
        time already past would make the loop poll without sleeping while it waits.
        """
        gate = self.gate_wake_ns  # a charge lapses, and the shut CPU gate may open
        if not self._sheddable_queued:
            return gate  # the common case: nothing CoDel sheds is waiting
        limit = self.queue.timeout_ns(now)
        if not limit:
            return gate
        item = self._first_sheddable()
        if item is None:
            return gate
        req = item[2]
        codel = req.t_queued + self._wait_limit(req, limit) + 1
        return gate if gate and gate < codel else codel

    def _first_sheddable(self) -> tuple[Connection, int, Request] | None:
        """The longest-waiting live request with a deadline (items are in arrival order),
        or None, which also clears the flag its push set. Requests of one route share a
        budget, so this is also the one whose wait runs out first."""
        for item in self.queue.items:
            if item[2].deadline_ns and item[0].awaits(item[1]):
                return item
        self._sheddable_queued = False
        return None

    def on_queue_due(self, now: int) -> None:
        """What the queue waits for came (`next_expiry`): the shut CPU gate's next look
        at its charges (what it held may start), then CoDel's timeouts."""
        gate = self.gate_wake_ns
        if gate and gate <= now:
            self.gate_wake_ns = 0
            self.dispatch_queued(now)
        if self.waiting:
            self.expire_queued(now)

    def expire_queued(self, now: int) -> None:
        """Shed queued requests whose CoDel timeout ran out, when it runs out.

        Checking only at dequeue is not enough: under LIFO the oldest requests sit at the
        bottom until their deadline. Facebook's queue sheds a request at its timeout, so its
        client hears 503 at once (and can retry elsewhere) instead of a late fallback.
        Requests without a deadline (never shed by CoDel) are passed over, not waited
        behind.
        """
        q = self.queue
        limit = q.timeout_ns(now)
        if not limit:
            return
        while q:
            conn, rid, req = q.oldest()
            if not conn.awaits(rid):
                q.pop_oldest(now)  # answered by its deadline, or the client left
                continue
            if not self._sheddable_queued:
                return
            item = self._first_sheddable()
            if item is None or now - item[2].t_queued <= self._wait_limit(item[2], limit):
                return
            q.discard(item, now)
            self.answer(item[0], self._shed_reply(item[2], "codel", now), now)

    def on_deadline(self, respond_by: int, conn: Connection, rid: int, now: int) -> None:
        """A request's respond-by time came before its answer: fallback or 504 now."""
        req = conn.request
        assert req is not None  # awaits(rid) held: the request is in flight
        lag = now - respond_by
        m = self._metrics
        m.timer_lag.observe(lag)
        decayed = self.lag_ns * 19 // 20  # a decaying high-water mark of the lateness
        self.lag_ns = lag if lag > decayed else decayed
        self._timer_fired = True
        if conn.state is not RUNNING:  # still queued: it never ran
            self.queue.discard((conn, rid, req), now)
            self.skipped(conn, rid, now)
            return
        m.deadline_misses += 1
        self._stuck.add((conn, rid))
        if self._sampling:
            self.limit.on_sample(now - req.start_ns, self._busy + len(self.queue), True)
        self.answer(conn, self._answers.late(req, b"deadline"), now)
        if self.cancel is not None:
            self.cancel(conn, rid, "deadline")  # the answer is out: now stop the work

    def on_tick(self, now: int) -> None:
        """The housekeeping tick: a second in which no deadline timer fired halves the
        extra margin (without it a burst of lateness would keep every later request's
        respond-by early, more fallbacks than needed, until some timer fired again); and
        the relaxed state's clock (Handoff.relax_tick), which may open the gate."""
        if self._timer_fired:
            self._timer_fired = False
        elif self.lag_ns:
            self.lag_ns >>= 1
        if self.relax_tick(now) and self.waiting:
            self.dispatch_queued(now)

    def forget(self, conn: Connection, now: int) -> None:
        """The connection is closing: take its queued request out of the queue."""
        if conn.state is QUEUED:
            self.queue.discard((conn, conn.req_id, conn.request), now)

    def take_all_queued(self) -> list[tuple[Connection, int, Request]]:
        """Everything still queued, taken out (the graceful timeout ran out)."""
        items = []
        q = self.queue
        while q:
            item = q.pop_oldest(0)
            if item[0].awaits(item[1]):
                items.append(item)
        return items

    # ---- public read API (metrics, /readyz, tests) -----------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def stuck_count(self) -> int:
        """Workers still running a request that was answered at its deadline."""
        return len(self._stuck)


def _unset(conn: Connection, reply: Reply, now: int) -> None:
    raise RuntimeError("Admission.answer is wired by the server")
