"""The conductor: one thread on epoll that owns every socket and every Connection.

It accepts, reads, parses, routes, enforces deadlines and admission, and writes; workers
only run handlers (worker.py). Hand-offs cross the boundary in exactly two places:
`pool.submit` (conductor -> worker) and `pool.drain` (worker -> conductor, woken by an
eventfd). Signals arrive through `signal.set_wakeup_fd` on a socketpair in the same epoll.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from bisect import bisect_left
from typing import Any

from . import dashboard, slo  # issue 13 hook (observability)
from .app import Route
from .config import Config
from .connection import (
    T_BODY,
    T_HEADER,
    T_IDLE,
    T_LINGER,
    T_WRITE,
    Connection,
    State,
)
from .deadlines import (
    DOA_DECAY,
    CoDelQueue,
    ConcurrencyLimit,
    client_budget_ns,
    retry_after_seconds,
)
from .errors import HTTPError, ParseError
from .livestats import LiveStats  # issue 13 hook (observability)
from .metrics import BUCKETS_NS, Metrics
from .parser import NEED_DATA, RequestParser
from .pool import WorkerPool
from .request import Request
from .response import Response, date_header, encode_headers, simple_response, status_line
from .worker import STREAM_DONE, STREAM_WAKE, FileReply, StreamReply, Worker

log = logging.getLogger("rtserve.error")
access_log = logging.getLogger("rtserve.access")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLHUP = select.EPOLLHUP
EPOLLERR = select.EPOLLERR
READ_MASK = EPOLLIN | EPOLLRDHUP

READING_HEAD = State.READING_HEAD
READING_BODY = State.READING_BODY
DISPATCHED = State.DISPATCHED
WRITING = State.WRITING
CLOSING = State.CLOSING
CLOSED = State.CLOSED

RECV_SIZE = 65536
ACCEPT_BATCH = 64
LINGER_NS = 2_000_000_000
ACCEPT_PAUSE_NS = 100_000_000
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_NEVER = 1 << 62  # a monotonic_ns value no timer reaches
HEALTH_PATHS = frozenset({"/livez", "/readyz", "/metrics"})


class Server:
    """An rtserve server: a conductor (the thread that calls `serve`) and a worker pool.

    `app` is anything with `resolve(request) -> Route | Response` (a native `App`, or the
    WSGI adapter). `sock` is an already-bound listening socket to use instead of `bind`.
    """

    def __init__(
        self,
        app: Any,
        config: Config | None = None,
        sock: socket.socket | None = None,
        **settings: Any,
    ) -> None:
        cfg = config if config is not None else Config()
        if settings:
            cfg = cfg.replace(**settings)
        self.cfg = cfg
        self.app = app
        self.metrics = Metrics()
        self._histograms = self.metrics.requests  # (method, route, status) -> Histogram
        self.pool = WorkerPool(cfg.threads)
        self._submit = self.pool.task_put  # the hand-off to workers: one C call
        self.worker = Worker(self.pool, cfg.stream_high_water)
        self._sock = sock
        self.listener: socket.socket | None = None
        self.address: tuple | None = None
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.draining = False
        self.not_ready_reason = ""
        self.exit_code = 0
        self.requests_served = 0
        self._conns: dict[int, Connection] = {}
        self._timers: list = []  # (at_ns, seq, conn)  connection timers, lazily deleted
        self._deadlines: list = []  # (respond_by_ns, seq, conn, req_id)
        self._seq = 0
        self._due = 0  # ns when the nearest timer is due (set by _poll_timeout)
        # Items are (conn, req_id, request); only requests with a deadline jump the line.
        self._queue = CoDelQueue(
            cfg.codel_target_ms, cfg.codel_interval_ms, lambda item: item[2].deadline_ns
        )
        self._limit = ConcurrencyLimit(cfg.adaptive_limit, cfg.max_inflight, cfg.threads)
        self._busy = 0
        self._cpu_cap = int(cfg.cpu_inflight_ms * 1_000_000)
        self._cpu_inflight = 0  # sampled CPU ns of the handlers running now (see _cpu_ok)
        self._charges: dict[tuple, int] = {}  # (conn, req_id) -> CPU ns charged at start
        self._stuck: set = set()  # (conn, req_id) answered late while a worker still runs them
        self._threads = cfg.threads
        self._default_deadline_ns = int(cfg.deadline_ms * 1_000_000)
        self._margin_ns = int(cfg.deadline_margin_ms * 1_000_000)
        self._lag_ns = 0  # recent deadline-timer lateness, ns (see _dispatch)
        self._header_ns = int(cfg.header_timeout * 1e9)
        self._body_ns = int(cfg.body_timeout * 1e9)
        self._idle_ns = int(cfg.keepalive_timeout * 1e9)
        self._write_ns = int(cfg.write_timeout * 1e9)
        self._readahead = cfg.pipeline_readahead
        self._health = cfg.health_endpoints
        self._access_log = cfg.access_log
        self._fallback_cache: dict[int, tuple[bytes, bytes, bytes]] = {}
        self._accept_paused = False
        self._accept_resume_at = 0
        self._drain_at = 0  # when a delayed drain (drain_seconds) begins
        self._drain_deadline = 0
        self._force_exit = False
        self._signals: list[int] = []
        self._in_advance: Connection | None = None
        # Supervisor hook (supervisor.py): called from the loop at most once per second (and
        # at once when a drain is requested) so a stuck conductor is noticed and replaced.
        self.heartbeat: Any = None
        self._beat_at = 0
        self._max_requests = cfg.max_requests
        if cfg.max_requests and cfg.max_requests_jitter:
            import random

            self._max_requests += random.randint(0, cfg.max_requests_jitter)
        self.now = time.monotonic_ns()
        self._ep: Any = None
        self._ctl_r, self._ctl_w = socket.socketpair()
        self._ctl_w.setblocking(False)
        self._sig_r: socket.socket | None = None
        self._sig_w: socket.socket | None = None
        m = self.metrics
        m.gauge("rtserve_open_connections", "Open client connections.", lambda: len(self._conns))
        m.gauge("rtserve_queue_depth", "Requests waiting for a worker.", lambda: len(self._queue))
        m.gauge("rtserve_busy_workers", "Workers running a handler.", lambda: self._busy)
        m.gauge("rtserve_stuck_workers", "Workers still running a request answered late.",
                lambda: len(self._stuck))
        m.gauge("rtserve_workers", "Size of the worker pool.", lambda: self._threads)
        m.gauge("rtserve_deadline_extra_margin_seconds",
                "Recent deadline-timer lateness, sent earlier as extra margin.",
                lambda: self._lag_ns / 1e9)
        m.gauge("rtserve_cpu_inflight_seconds",
                "Sampled CPU time of the handlers running now (dispatch waits above the cap).",
                lambda: self._cpu_inflight / 1e9)
        m.gauge("rtserve_concurrency_limit", "Current admission limit (0 = none).",
                lambda: round(self._limit.limit, 2) if self._limit.enabled else 0)
        # ---- issue 13 hook (observability): route deadlines in /metrics (slo.py); with
        # --dashboard, a sampler ticked from _run_due, answered by _health_response.
        deadlines = slo.export(m, app, cfg.deadline_ms)
        self.livestats = LiveStats(m, deadlines, self.now, cfg.cpu_inflight_ms) \
            if cfg.dashboard else None
        self._health_paths = HEALTH_PATHS | dashboard.PATHS if cfg.dashboard else HEALTH_PATHS
        # ---- end of issue 13 hook

    # ================================================================================
    # Public control (any thread)
    # ================================================================================

    def stop(self) -> None:
        """Ask the conductor for a graceful drain (thread-safe)."""
        try:
            self._ctl_w.send(b"d")
        except OSError:
            pass

    def stop_now(self) -> None:
        """Ask the conductor to exit at once (thread-safe)."""
        try:
            self._ctl_w.send(b"x")
        except OSError:
            pass

    @property
    def ready(self) -> bool:
        return not self.not_ready_reason and not self.draining

    # ================================================================================
    # Conductor thread from here on
    # ================================================================================

    def serve(self) -> int:
        """Run until drained or stopped; returns the process exit code."""
        try:
            self._setup()
            self.started.set()
            self._loop()
        finally:
            self._teardown()
            self.started.set()
            self.stopped.set()
        return self.exit_code

    def _setup(self) -> None:
        cfg = self.cfg
        sys.setswitchinterval(cfg.switch_interval_ms / 1000.0)
        if self._sock is not None:
            lst = self._sock
        else:
            lst = make_listener(cfg.bind, cfg.backlog, cfg.reuse_port)
        lst.setblocking(False)
        self.listener = lst
        self.address = lst.getsockname()
        self._tcp = lst.family in (socket.AF_INET, socket.AF_INET6)
        ep = self._ep = select.epoll()
        ep.register(lst.fileno(), EPOLLIN)
        self.pool.start()
        ep.register(self.pool.wakeup_fd, EPOLLIN)
        ep.register(self._ctl_r.fileno(), EPOLLIN)
        if threading.current_thread() is threading.main_thread():
            self._install_signals()
        log.info(
            "listening on %s (%d threads, pid %d)", format_address(self.address),
            cfg.threads, os.getpid(),
        )

    def _install_signals(self) -> None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._sig_r, self._sig_w = r, w
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._ep.register(r.fileno(), EPOLLIN)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Python-level handler: only record; the loop acts on it after the fd wake-up."""
        self._signals.append(signum)

    def _loop(self) -> None:
        ep = self._ep
        conns = self._conns
        lfd = self.listener.fileno()
        wfd = self.pool.wakeup_fd
        cfd = self._ctl_r.fileno()
        sfd = self._sig_r.fileno() if self._sig_r is not None else -2
        on_readable = self._on_readable
        on_writable = self._on_writable
        monotonic_ns = time.monotonic_ns
        select_select = select.select
        epfd = (ep.fileno(),)
        while not self._force_exit:
            timeout = self._poll_timeout()
            try:
                if 0 < timeout < 0.002:
                    # epoll counts whole milliseconds, rounded up: a timer due in 0.3 ms
                    # would fire up to 1 ms late. select() waits in microseconds.
                    select_select(epfd, (), (), timeout)
                    events = ep.poll(0)
                else:
                    # Wake up to 1 ms early; the select above finishes the wait precisely.
                    events = ep.poll(timeout - 0.001 if timeout >= 0.002 else timeout)
            except InterruptedError:
                events = []
            self.now = monotonic_ns()
            for fd, ev in events:
                conn = conns.get(fd)
                if conn is not None:
                    if ev & (EPOLLIN | EPOLLRDHUP):
                        on_readable(conn)
                    if ev & EPOLLOUT and conn.state is not CLOSED:
                        on_writable(conn)
                    if ev & (EPOLLHUP | EPOLLERR) and conn.state is not CLOSED:
                        self._abort(conn)
                elif fd == wfd:
                    self._on_completions()
                elif fd == lfd:
                    self._accept()
                elif fd == sfd:
                    self._on_signal_fd()
                elif fd == cfd:
                    self._on_control()
            if self._signals:
                self._handle_signals()
            if monotonic_ns() >= self._due:  # the nearest timer _poll_timeout saw is due
                self._run_due()  # (deadlines first: a due fallback beats a CoDel 503)
            if self._queue:
                self._expire_queued()
            if self.draining and self._drained():
                return

    def _run_due(self) -> None:
        """Timers, heartbeat and a delayed drain: run only when the nearest one is due."""
        self._run_timers()
        if self.heartbeat is not None and self.now >= self._beat_at:
            self._beat_at = self.now + 1_000_000_000
            self.heartbeat()
        if self.livestats is not None and self.now >= self.livestats.due:  # issue 13 hook
            self.livestats.tick(self.now)
        if self._drain_at and self.now >= self._drain_at:
            self._drain_at = 0
            self._begin_drain()

    def _poll_timeout(self) -> float:
        nxt = 0
        if self._timers:
            nxt = self._timers[0][0]
        if self._deadlines and (not nxt or self._deadlines[0][0] < nxt):
            nxt = self._deadlines[0][0]
        if self._queue:  # the oldest queued request's CoDel timeout
            limit = self._queue.timeout_ns(self.now)
            if limit:
                at = self._queue.oldest()[2].t_queued + limit + 1
                if not nxt or at < nxt:
                    nxt = at
        beat = (self._beat_at or 1) if self.heartbeat is not None else 0  # 0 = due now
        tick = self.livestats.due if self.livestats is not None else 0  # issue 13 hook
        for t in (self._accept_resume_at, self._drain_deadline, self._drain_at, beat, tick):
            if t and (not nxt or t < nxt):
                nxt = t
        if not nxt:
            self._due = _NEVER
            return -1
        self._due = nxt
        delta = nxt - time.monotonic_ns()
        return delta / 1e9 if delta > 0 else 0

    # ---- accept ---------------------------------------------------------------------

    def _accept(self) -> None:
        lst = self.listener
        if lst is None:
            return
        ep = self._ep
        conns = self._conns
        cfg = self.cfg
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = lst.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _FD_EXHAUSTED:
                    log.warning("accept: %s; pausing the listener for 100 ms", exc.strerror)
                    self._pause_accept(ACCEPT_PAUSE_NS)
                    return
                continue  # ECONNABORTED and friends: that client is gone, try the next
            sock.setblocking(False)
            if self._tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                addr = ("unix", 0)
            conn = Connection(
                sock,
                addr,
                RequestParser(
                    max_request_line=cfg.max_request_line,
                    max_header_block=cfg.max_header_block,
                    max_header_count=cfg.max_header_count,
                    max_body_size=cfg.max_body_size,
                ),
            )
            conns[conn.fd] = conn
            ep.register(conn.fd, READ_MASK)
            conn.mask = READ_MASK
            self._arm(conn, self.now + self._header_ns, T_HEADER)
            self.metrics.connections_accepted += 1
            if len(conns) >= cfg.max_connections:
                self._pause_accept(0)
                return

    def _pause_accept(self, for_ns: int) -> None:
        if not self._accept_paused and self.listener is not None:
            self._ep.unregister(self.listener.fileno())
            self._accept_paused = True
            self.metrics.accept_pauses += 1
        self._accept_resume_at = self.now + for_ns if for_ns else 0

    def _resume_accept(self) -> None:
        if self._accept_paused and self.listener is not None:
            self._ep.register(self.listener.fileno(), EPOLLIN)
        self._accept_paused = False
        self._accept_resume_at = 0

    # ---- reading and parsing ------------------------------------------------------------

    def _on_readable(self, conn: Connection) -> None:
        if conn.state is CLOSING:
            self._linger_read(conn)
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._abort(conn)
            return
        if not data:
            self._on_eof(conn)
            return
        if not conn.req_start:
            conn.req_start = self.now
        parser = conn.parser
        parser.feed(data)
        if conn.state <= READING_BODY:
            self._advance(conn)
        elif parser.buffered > self._readahead:
            self._set_mask(conn, conn.mask & ~READ_MASK)  # pipelining backpressure

    def _on_eof(self, conn: Connection) -> None:
        """The client shut its write side: finish what is in flight, then close."""
        conn.eof = True
        self._set_mask(conn, conn.mask & ~READ_MASK)  # no busy loop on a half-closed socket
        st = conn.state
        if st is READING_HEAD or st is READING_BODY:
            self._advance(conn)  # a complete request may still be buffered
        elif st is CLOSING:
            self._close(conn)

    def _advance(self, conn: Connection) -> None:
        """Parse and dispatch buffered requests, one at a time (serial pipelining)."""
        outer = self._in_advance
        self._in_advance = conn
        try:
            parser = conn.parser
            while conn.state is READING_HEAD or conn.state is READING_BODY:
                try:
                    req = parser.next_event()
                except ParseError as exc:
                    self._reject(conn, exc)
                    return
                if req is NEED_DATA:
                    self._await_more(conn)
                    return
                self._dispatch(conn, req)
        finally:
            self._in_advance = outer

    def _await_more(self, conn: Connection) -> None:
        parser = conn.parser
        if conn.eof:
            if parser.has_partial():
                self.metrics.client_aborts += 1
            self._close(conn)
            return
        pending = parser.pending
        if pending is not None:
            if conn.state is READING_HEAD:
                conn.to(READING_BODY)
                self._arm(conn, self.now + self._body_ns, T_BODY)
            if pending.expect_continue and not conn.sent_continue:
                conn.sent_continue = True
                self._send_interim(conn, _CONTINUE)
        elif parser.has_partial():
            if conn.timer_kind != T_HEADER or not conn.timer_at:
                self._arm(conn, (conn.req_start or self.now) + self._header_ns, T_HEADER)
        elif self.draining:
            self._close(conn)
            return
        else:
            self._arm(conn, self.now + self._idle_ns, T_IDLE)
        if not conn.mask & EPOLLIN:
            self._set_mask(conn, conn.mask | READ_MASK)

    def _reject(self, conn: Connection, exc: HTTPError) -> None:
        """A request the parser refused: answer its status, close; ignore what followed."""
        self.metrics.count_parse_error(exc.status)
        self._set_mask(conn, conn.mask & ~READ_MASK)
        conn.close_after = True
        conn.request = None
        self._start_response(conn, simple_response(exc.status, close=True))

    # ---- dispatch and admission -----------------------------------------------------

    def _dispatch(self, conn: Connection, req: Request) -> None:
        now = self.now
        conn.req_id += 1
        rid = conn.req_id
        conn.sent_continue = False
        req.client = conn.addr
        start = conn.req_start or now
        req.start_ns = start
        conn.req_start = now if conn.parser.buffered else 0  # a pipelined request began
        conn.request = req
        conn.to(DISPATCHED)
        conn.timer_at = 0
        self.requests_served += 1
        if self._max_requests and self.requests_served == self._max_requests:
            self._drain_at = now  # recycle: the supervisor starts a fresh process
        if self._health and req.path in self._health_paths and req.method in ("GET", "HEAD"):
            self._answer_now(conn, req, self._health_response(req.path))
            return
        target = self.app.resolve(req)
        if target.__class__ is not Route:
            self._answer_now(conn, req, target)
            return
        req.route = target
        budget = target.deadline_ns or self._default_deadline_ns
        try:
            cb = client_budget_ns(req.raw_headers)
        except HTTPError as exc:
            self._answer_now(conn, req, Response.text(exc.reason + "\n", exc.status))
            return
        if cb is not None and (not budget or cb < budget):
            budget = cb
        if budget:
            req.deadline_ns = start + budget
            # The configured margin, plus how late this conductor's deadline timers have
            # been firing lately (CPU-bound handlers keep the GIL from it), up to a quarter
            # of the budget: the fallback must land before the deadline, not at it.
            lag = self._lag_ns
            respond_by = req.deadline_ns - self._margin_ns - (
                lag if lag < budget >> 2 else budget >> 2
            )
            if respond_by - now <= target.ewma_ns:
                self.metrics.dead_on_arrival += 1
                target.ewma_ns *= DOA_DECAY  # a probe gets through now and then
                self._answer_late(conn, req, b"dead-on-arrival")
                return
            self._seq += 1
            heapq.heappush(self._deadlines, (respond_by, self._seq, conn, rid))
        if self._limit.enabled and not self._limit.admits(self._busy + len(self._queue)):
            self._shed(conn, req, "limit")
            return
        req.t_queued = now
        if self._busy < self._threads and not self._queue and self._cpu_ok():
            qw = self.metrics.queue_wait  # a zero wait: the first bucket, no bisect
            qw.counts[0] += 1
            qw.count += 1
            self._start_task(conn, rid, req)
        else:
            self._queue.push((conn, rid, req), now)

    def _dispatch_queued(self) -> None:
        """Hand queued requests to free workers: CoDel sheds, LIFO under a standing queue.

        LIFO serves the newest request first only when it has a deadline (requests without
        one keep their order: see the queue's `lifo_ok`), and a request starts only while
        the CPU budget allows it.
        """
        q = self._queue
        now = self.now
        while q and self._busy < self._threads:
            limit = q.timeout_ns(now)
            conn, rid, req = q.peek(now)
            if conn.req_id != rid or conn.state is not DISPATCHED:
                q.pop(now)
                continue  # answered by its deadline, or the client left
            if not self._cpu_ok():
                return  # the CPU budget is spent: the next completion frees some
            q.pop(now)
            waited = now - req.t_queued
            # CoDel sheds only requests that carry a deadline: for them a long wait means a
            # late answer anyway. Requests without one wait, bounded by --max-inflight.
            if limit and waited > limit and req.deadline_ns:
                self._shed(conn, req, "codel")
                continue
            if req.deadline_ns and req.deadline_ns - self._margin_ns - now <= req.route.ewma_ns:
                # Late already, or too late to finish: never run it; answer it now rather
                # than leave it for the timer (it is out of the queue, so nothing else would).
                self.metrics.count_shed("deadline")
                self.metrics.deadline_misses += 1
                self._answer_late(conn, req, b"deadline")
                continue
            self.metrics.queue_wait.observe(waited)
            self._start_task(conn, rid, req)

    def _cpu_ok(self) -> bool:
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

    def _start_task(self, conn: Connection, rid: int, req: Request) -> None:
        """Hand a request to the pool, charging its route's CPU estimate until it ends."""
        self._busy += 1
        conn.running = True
        charge = req.route.cpu_ns
        if charge and self._cpu_cap:
            self._cpu_inflight += charge
            self._charges[(conn, rid)] = charge
        self._submit((self.worker, conn, rid, req))

    def _expire_queued(self) -> None:
        """Shed queued requests whose CoDel timeout ran out, when it runs out.

        Checking only at dequeue is not enough: under LIFO the oldest requests sit at the
        bottom until their deadline. Facebook's queue sheds a request at its timeout, so its
        client hears 503 at once (and can retry elsewhere) instead of a late fallback.
        """
        q = self._queue
        now = self.now = time.monotonic_ns()
        limit = q.timeout_ns(now)
        if not limit:
            return
        while q:
            conn, rid, req = q.oldest()
            if conn.req_id != rid or conn.state is not DISPATCHED:
                q.pop_oldest(now)  # answered by its deadline, or the client left
                continue
            if not req.deadline_ns or now - req.t_queued <= limit:
                return  # CoDel sheds only requests with a deadline (see _dispatch_queued)
            q.pop_oldest(now)
            self._shed(conn, req, "codel")

    def _shed(self, conn: Connection, req: Request, reason: str) -> None:
        self.metrics.count_shed(reason)
        route = req.route
        if reason == "codel" and self._limit.mode != "off":
            self._limit.on_sample(self.now - req.start_ns, self._busy + len(self._queue), True)
        retry = retry_after_seconds(len(self._queue), route.ewma_ns if route else 0, self._threads)
        req.status = 503
        data = simple_response(
            503, close=not req.keep_alive, extra=b"Retry-After: %d\r\n" % retry
        )
        if req.method == "HEAD":
            data = _head_only(data)
        self._start_response(conn, data)

    def _answer_now(self, conn: Connection, req: Request, response: Response) -> None:
        """A response built on the conductor (404, 405, health, 400): no worker needed."""
        data = self.worker.serialize(conn, conn.req_id, req, response)
        self._start_response(conn, data)

    def _answer_late(self, conn: Connection, req: Request, why: bytes) -> None:
        """The route's fallback (marked) or 504, sent by the conductor for a late request."""
        route = req.route
        fb = route.fallback if route is not None else None
        close = not req.keep_alive or self.draining
        if fb is None:
            req.status = 504
            data = simple_response(504, close=close)
            if req.method == "HEAD":
                data = _head_only(data)
        else:
            self.metrics.count_fallback(route.name)  # issue 13 hook: counted per route
            req.status = fb.status
            data = self._fallback_bytes(route, req, why, close)
        conn.running = False
        req.keep_alive = not close
        self._start_response(conn, data)

    def _fallback_bytes(self, route: Route, req: Request, why: bytes, close: bool) -> bytes:
        cached = self._fallback_cache.get(id(route))
        if cached is None:
            fb = route.fallback
            extra, _, _, _ = encode_headers(fb.headers)
            cached = (status_line(fb.status), extra, fb.body)
            self._fallback_cache[id(route)] = cached
        sline, extra, body = cached
        return b"".join(
            (
                sline,
                date_header(),
                b"Content-Length: %d\r\n" % len(body),
                extra,
                b"X-Rtserve-Fallback: ",
                why,
                b"\r\n",
                b"Connection: close\r\n" if close else b"",
                b"\r\n",
                b"" if req.method == "HEAD" else body,
            )
        )

    def _health_response(self, path: str) -> Response:
        if path in dashboard.PATHS:  # issue 13 hook: only routed here with --dashboard
            status, ctype, body = dashboard.answer(self.livestats, path)
            return Response(body, status, dashboard.headers(), ctype)
        if path == "/livez":
            return Response.text("ok\n")
        if path == "/readyz":
            reason = self.not_ready_reason or ("draining" if self.draining else "")
            if not reason and len(self._stuck) >= self._threads:
                reason = "all workers stuck"
            if reason:
                return Response.text(f"not ready: {reason}\n", 503)
            return Response.text("ready\n")
        self.metrics.worker_deaths = self.pool.deaths  # counted on the dying worker thread
        return Response(self.metrics.render(), 200, None, "text/plain; version=0.0.4")

    # ---- completions from workers ---------------------------------------------------------

    def _on_completions(self) -> None:
        for conn, rid, result, final in self.pool.drain():
            if final:
                self._busy -= 1
                if self._charges:
                    self._cpu_inflight -= self._charges.pop((conn, rid), 0)
                if conn.stuck:
                    self._stuck.discard((conn, rid))
                    conn.stuck = bool(self._stuck) and any(c is conn for c, _ in self._stuck)
            if result is STREAM_WAKE:
                if conn.req_id == rid and conn.stream is not None and conn.out is None:
                    self._pump(conn)
                continue
            if result is STREAM_DONE:
                continue
            if conn.req_id != rid or conn.state is not DISPATCHED:
                self.metrics.late_dropped += 1
                if result.__class__ is StreamReply:
                    result.channel.abort()
                elif result.__class__ is FileReply:
                    result.file.close()
                continue
            conn.running = False
            req = conn.request
            if isinstance(result, BaseException):
                self.metrics.handler_errors += 1
                req.keep_alive = False
                req.status = 500
                result = simple_response(500, close=True)
            elif req.status >= 500:
                self.metrics.handler_errors += 1
            if self._limit.mode != "off":
                self._limit.on_sample(self.now - req.start_ns, self._busy + len(self._queue),
                                      False)
            self._start_response(conn, result)
        if self._queue:
            self._dispatch_queued()

    # ---- writing --------------------------------------------------------------------------

    def _start_response(self, conn: Connection, reply: Any) -> None:
        """Begin sending a reply; bytes are sent at once, EPOLLOUT only after a partial send."""
        conn.to(WRITING)
        conn.timer_at = 0
        req = conn.request
        if req is not None and not req.keep_alive:
            conn.close_after = True
        if reply.__class__ is bytes:
            if self._send(conn, reply):
                self._finish_response(conn)
            return
        if reply.__class__ is tuple:  # (head, large body)
            if self._send_pair(conn, reply):
                self._finish_response(conn)
            return
        if reply.__class__ is StreamReply:
            conn.stream = reply.channel
            if reply.close:
                conn.close_after = True
        else:  # FileReply
            conn.file = reply.file
            if reply.close:
                conn.close_after = True
        if self._send(conn, reply.head):
            self._pump(conn)

    def _send(self, conn: Connection, data: bytes) -> bool:
        """Send now; keep the rest and watch EPOLLOUT on a partial send. True if all sent."""
        if conn.out is not None:  # an interim 100 Continue is still going out
            conn.out = memoryview(bytes(conn.out) + data)
            return False
        try:
            n = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._abort(conn)
            return False
        if n == len(data):
            return True
        conn.out = memoryview(data)[n:]
        self._set_mask(conn, conn.mask | EPOLLOUT)
        self._arm(conn, self.now + self._write_ns, T_WRITE)
        return False

    def _send_pair(self, conn: Connection, pair: tuple[bytes, bytes]) -> bool:
        """Send a head and a large body with one sendmsg (no joined copy of the body)."""
        head, body = pair
        if conn.out is not None:
            return self._send(conn, head + body)
        try:
            n = conn.sock.sendmsg(pair)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._abort(conn)
            return False
        hlen = len(head)
        if n == hlen + len(body):
            return True
        conn.out = memoryview(body)[n - hlen:] if n >= hlen else memoryview(head[n:] + body)
        self._set_mask(conn, conn.mask | EPOLLOUT)
        self._arm(conn, self.now + self._write_ns, T_WRITE)
        return False

    def _send_interim(self, conn: Connection, data: bytes) -> None:
        """A 1xx line: tiny, sent before any response, so a short send is queued like any."""
        if conn.out is None:
            self._send(conn, data)

    def _on_writable(self, conn: Connection) -> None:
        out = conn.out
        if out is not None:
            try:
                n = conn.sock.send(out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._abort(conn)
                return
            if n < len(out):
                conn.out = out[n:]
                self._arm(conn, self.now + self._write_ns, T_WRITE)
                return
            conn.out = None
        if conn.state is WRITING:
            self._pump(conn)
        else:  # an interim 100 Continue went out while the body is still being read
            self._set_mask(conn, conn.mask & ~EPOLLOUT)
            conn.timer_at = 0

    def _pump(self, conn: Connection) -> None:
        """Move the body on once the socket took everything handed to it."""
        stream = conn.stream
        if stream is not None:
            while True:
                data = stream.take()
                if data:
                    if not self._send(conn, data):
                        return
                    continue
                if stream.done:
                    conn.stream = None
                    if stream.failed:
                        conn.close_after = True  # the body broke: never look complete
                        self.metrics.handler_errors += 1
                    break
                # Nothing buffered: the worker wakes us when it has more.
                if conn.mask & EPOLLOUT:
                    self._set_mask(conn, conn.mask & ~EPOLLOUT)
                conn.timer_at = 0
                return
        f = conn.file
        if f is not None:
            fileno = f.file.fileno()
            while f.count > 0:
                try:
                    n = os.sendfile(conn.fd, fileno, f.offset, min(f.count, 1 << 20))
                except (BlockingIOError, InterruptedError):
                    self._set_mask(conn, conn.mask | EPOLLOUT)
                    self._arm(conn, self.now + self._write_ns, T_WRITE)
                    return
                except OSError:
                    self._abort(conn)
                    return
                if n == 0:
                    conn.close_after = True  # the file is shorter than announced
                    break
                f.offset += n
                f.count -= n
            f.close()
            conn.file = None
        self._finish_response(conn)

    def _finish_response(self, conn: Connection) -> None:
        """The last byte is out: record it, then keep the connection alive or close it."""
        req = conn.request
        if req is not None:
            done = time.monotonic_ns()
            route = req.route
            name = route.name if route is not None else _unrouted(req)
            # Metrics.observe_request, inlined: this runs once per request.
            h = self._histograms.get((req.method, name, req.status))
            if h is None:
                h = self.metrics.request_histogram(req.method, name, req.status)
            ns = done - req.start_ns
            h.counts[bisect_left(BUCKETS_NS, ns)] += 1
            h.sum_ns += ns
            h.count += 1
            if self._access_log:
                self._log_access(req, done)
            conn.request = None
        if conn.mask & EPOLLOUT:
            self._set_mask(conn, conn.mask & ~EPOLLOUT)
        if conn.close_after or self.draining:
            self._close_after_response(conn)
            return
        conn.to(READING_HEAD)
        conn.timer_at = 0
        if self._in_advance is conn:
            return  # the parse loop that sent this answer goes on by itself
        if conn.parser.buffered or conn.eof:
            self._advance(conn)  # a pipelined request is waiting (or the client left)
            return
        # The common keep-alive case: nothing buffered, wait idle for the next request.
        self._arm(conn, self.now + self._idle_ns, T_IDLE)
        if not conn.mask & EPOLLIN:
            self._set_mask(conn, conn.mask | READ_MASK)

    def _close_after_response(self, conn: Connection) -> None:
        """Shut our write side and discard input until EOF (lingering close), so unread
        pipelined bytes can't turn our FIN into an RST that destroys the response."""
        if conn.eof:
            self._close(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.to(CLOSING)
        self._set_mask(conn, READ_MASK)
        self._arm(conn, self.now + LINGER_NS, T_LINGER)
        self._linger_read(conn)

    def _linger_read(self, conn: Connection) -> None:
        for _ in range(16):
            try:
                data = conn.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return

    # ---- closing ----------------------------------------------------------------------

    def _abort(self, conn: Connection) -> None:
        """The client reset or vanished: close; an unanswered request counts as an abort."""
        st = conn.state
        if st is DISPATCHED or st is WRITING or st is READING_BODY or (
            st is READING_HEAD and conn.parser.has_partial()
        ):
            self.metrics.client_aborts += 1
        self._close(conn)

    def _close(self, conn: Connection) -> None:
        """The only place a client socket is closed: unregister, then close."""
        if conn.state is CLOSED:
            return
        if conn.state is DISPATCHED and not conn.running and conn.request is not None:
            self._queue.discard((conn, conn.req_id, conn.request), self.now)  # client left
        conn.to(CLOSED)
        fd = conn.fd
        self._conns.pop(fd, None)
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass
        try:
            conn.sock.close()
        except OSError:
            pass
        if conn.stream is not None:
            conn.stream.abort()
            conn.stream = None
        if conn.file is not None:
            conn.file.close()
            conn.file = None
        conn.out = None
        conn.request = None
        if (
            self._accept_paused
            and not self._accept_resume_at
            and len(self._conns) < self.cfg.max_connections
            and not self.draining
        ):
            self._resume_accept()

    def _set_mask(self, conn: Connection, mask: int) -> None:
        if mask != conn.mask and conn.state is not CLOSED:
            conn.mask = mask
            self._ep.modify(conn.fd, mask)

    # ---- timers ---------------------------------------------------------------------------

    def _arm(self, conn: Connection, at: int, kind: int) -> None:
        """Set the connection's one timer; the heap gets an entry only if it must fire sooner."""
        conn.timer_at = at
        conn.timer_kind = kind
        if not conn.heap_at or at < conn.heap_at:
            self._seq += 1
            heapq.heappush(self._timers, (at, self._seq, conn))
            conn.heap_at = at

    def _run_timers(self) -> None:
        now = self.now = time.monotonic_ns()
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            at, _, conn, rid = heapq.heappop(dl)
            if conn.req_id != rid or conn.state is not DISPATCHED:
                continue
            req = conn.request
            lag = now - at
            self.metrics.timer_lag.observe(lag)
            # A decaying high-water mark of the lateness, used as extra margin.
            decayed = self._lag_ns * 19 // 20
            self._lag_ns = lag if lag > decayed else decayed
            self.metrics.deadline_misses += 1
            if conn.running:
                self._stuck.add((conn, rid))
                conn.stuck = True
                if self._limit.mode != "off":
                    self._limit.on_sample(now - req.start_ns, self._busy + len(self._queue), True)
            else:  # still queued: it never ran
                self._queue.discard((conn, rid, req), now)
                self.metrics.count_shed("deadline")
            self._answer_late(conn, req, b"deadline")
        th = self._timers
        while th and th[0][0] <= now:
            at, _, conn = heapq.heappop(th)
            if conn.heap_at != at or conn.state is CLOSED:
                continue
            conn.heap_at = 0
            t = conn.timer_at
            if not t:
                continue
            if t > now:
                self._seq += 1
                heapq.heappush(th, (t, self._seq, conn))
                conn.heap_at = t
                continue
            conn.timer_at = 0
            self._expire(conn, conn.timer_kind)
        if self._accept_resume_at and now >= self._accept_resume_at:
            if self.draining:
                self._accept_resume_at = 0
            else:
                self._resume_accept()
        if self._drain_deadline and now >= self._drain_deadline:
            self._drain_expired()

    def _expire(self, conn: Connection, kind: int) -> None:
        st = conn.state
        if kind == T_HEADER and st is READING_HEAD:
            if conn.parser.has_partial():
                self.metrics.count_timeout("header")
                self._reject(conn, HTTPError("request head timeout", 408))
            else:
                self.metrics.count_timeout("idle")
                self._close(conn)
        elif kind == T_BODY and st is READING_BODY:
            self.metrics.count_timeout("body")
            self._reject(conn, HTTPError("request body timeout", 408))
        elif kind == T_IDLE and st is READING_HEAD:
            self.metrics.count_timeout("idle")
            self._close(conn)
        elif kind == T_WRITE and (st is WRITING or conn.out is not None):
            self.metrics.count_timeout("write")
            self._abort(conn)
        elif kind == T_LINGER and st is CLOSING:
            self._close(conn)

    # ---- signals, control, drain ----------------------------------------------------------

    def _on_signal_fd(self) -> None:
        try:
            while self._sig_r.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _handle_signals(self) -> None:
        sigs, self._signals = self._signals, []
        for signum in sigs:
            if signum == signal.SIGQUIT:
                log.warning("SIGQUIT: exiting at once")
                self.exit_code = 1
                self._force_exit = True
            elif signum == signal.SIGINT and self.draining:
                log.warning("second SIGINT: exiting at once")
                self.exit_code = 1
                self._force_exit = True
            elif signum in (signal.SIGINT, signal.SIGTERM):
                log.info("%s: draining (up to %.0f s)", signal.Signals(signum).name,
                         self.cfg.graceful_timeout)
                self.request_drain()
            elif signum == signal.SIGHUP:
                log.info("SIGHUP ignored in a single process (the supervisor reloads)")

    def request_drain(self) -> None:
        """Drain now, or after `drain_seconds` of reporting not ready (load balancers)."""
        if self.draining or self._drain_at:
            return
        self._beat_at = 0  # tell a supervisor now, so it starts a replacement at once
        if self.cfg.drain_seconds > 0:
            self.not_ready_reason = "draining"
            self._drain_at = self.now + int(self.cfg.drain_seconds * 1e9)
        else:
            self._begin_drain()

    def _on_control(self) -> None:
        try:
            data = self._ctl_r.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        if b"x" in data:
            self._force_exit = True
        elif b"d" in data:
            self.request_drain()

    def _begin_drain(self) -> None:
        """Stop accepting, close idle connections, let in-flight requests finish."""
        if self.draining:
            return
        self.draining = True
        self.worker.draining = True  # responses from now on say Connection: close
        self._beat_at = 0  # a max_requests recycle lands here: tell the supervisor at once
        self._drain_deadline = self.now + int(self.cfg.graceful_timeout * 1e9)
        if self.listener is not None:
            if not self._accept_paused:
                try:
                    self._ep.unregister(self.listener.fileno())
                except (OSError, ValueError):
                    pass
            self.listener.close()
            self.listener = None
        # Close idle keep-alive connections. A connection accepted but whose first request
        # has not arrived yet (req_id 0) is left to its header timer: closing it would fail
        # a request the client already sent (its response goes out with Connection: close).
        for conn in list(self._conns.values()):
            if conn.state is READING_HEAD and conn.req_id and not conn.parser.has_partial():
                self._close(conn)

    def _drained(self) -> bool:
        return not self._conns

    def _drain_expired(self) -> None:
        """graceful_timeout is over: 503 for what is still waiting, then close everything."""
        self._drain_deadline = 0
        for conn in list(self._conns.values()):
            if conn.state is DISPATCHED:
                req = conn.request
                self.metrics.count_shed("draining")
                req.keep_alive = False
                req.status = 503
                conn.running = False
                self._start_response(
                    conn, simple_response(503, close=True, extra=b"Retry-After: 1\r\n")
                )
        for conn in list(self._conns.values()):
            if conn.state is not CLOSED and conn.out is None:
                self._close(conn)
        self._force_exit = True

    def _teardown(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.pool.shutdown(timeout=0 if self._force_exit else 1.0)
        if self._ep is not None:
            self._ep.close()
        self.pool.close()
        if self._sig_w is not None:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
            self._sig_w.close()
            self._sig_r.close()
        self._ctl_r.close()
        self._ctl_w.close()

    # ---- access log -------------------------------------------------------------------------

    def _log_access(self, req: Request, done: int) -> None:
        from .accesslog import format_line

        access_log.info(format_line(req, done, self.cfg.access_log_format))


def format_address(address: Any) -> str:
    """`host:port`, `[v6]:port` or the unix socket path, as logs and tests read it."""
    if isinstance(address, tuple):
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return f"unix:{address}"


def _head_only(data: bytes) -> bytes:
    """A server-built response without its body, for HEAD (the framing headers stay)."""
    return data[: data.index(b"\r\n\r\n") + 4]


def _unrouted(req: Request) -> str:
    if req.path in dashboard.PATHS:  # issue 13 hook: its own label, not <unrouted>
        return req.path
    return req.path if req.path in HEALTH_PATHS else "<unrouted>"


def make_listener(bind: str, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening socket for HOST:PORT (IPv6 in brackets) or unix:PATH."""
    if bind.startswith("unix:"):
        path = bind[5:]
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    else:
        host, _, port = bind.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
