"""The server: wires the conductor's parts together and runs them; `serve()` is the entry.

Built on the main thread; `serve()` then runs on the thread that becomes the conductor
(the main thread in production, so signals reach it). The parts, in the order a request
meets them: loop.py (epoll) -> listener.py (accept) -> reader.py (recv, parse, route) ->
admission.py (budget, queue, gates) -> pool.py + worker.py (the handler, on a worker) ->
completions.py (results in, late ones dropped) -> writer.py (send, keep-alive or close);
timers.py, answers.py and lifecycle.py serve them. Config is converted once into
`Limits`. With `--certfile` the reader and the writer are tlsio.py's TLSReader and
TLSWriter (handshake, SSL reads and writes), chosen here once, and tls.py's context is
built before serving (a bad file fails the start).

The server is wired once for the app's interface (interfaces.py): a native App or a WSGI
app runs on the worker pool; an ASGI app (asgi.py) runs on the event-loop threads of an
ASGI executor (asgi_executor.py), which takes the pool's place in admission's hand-off and
posts its results on the pool's completion queue. Only then are the cancellation hooks
set (admission.cancel, writer.on_gone, reader.abort_on_eof): no per-request branch.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
import threading
import time
from typing import Any

from . import memory, slo
from .admission import Admission
from .answers import Answers
from .completions import Completions
from .config import Config
from .connection import Connection
from .errors import StartupFailed
from .interfaces import detect_interface
from .lifecycle import Lifecycle
from .limits import Limits
from .listener import Listener, format_address, make_listener
from .livestats import LiveStats
from .loop import EventLoop
from .metrics import Metrics
from .pool import WorkerPool
from .reader import Reader
from .timers import TICK_NS, Timers
from .tls import TLSContexts, requested
from .tlsio import TLSReader, TLSWriter
from .worker import Worker
from .writer import Writer

log = logging.getLogger("rtserve.error")


def as_dispatcher(app: Any, cfg: Config) -> Any:
    """What the conductor routes with: a native App as is, an ASGI app in `ASGIApp`, any
    other callable in `WSGIApp` (`cfg.interface` overrides the detection)."""
    from .asgi import ASGIApp
    from .wsgi import WSGIApp

    if isinstance(app, ASGIApp | WSGIApp):
        return app  # already adapted (tests, run_child)
    interface = cfg.interface if cfg.interface != "auto" else detect_interface(app)
    if interface == "native":
        if not hasattr(app, "resolve"):
            raise TypeError(f"{app!r} is not an rtserve App (no resolve method)")
        return app
    if not callable(app):
        raise TypeError(f"{app!r} is neither an rtserve App, an ASGI app nor a WSGI callable")
    if interface == "asgi":
        return ASGIApp(app, cfg)
    return WSGIApp(app, cfg)


class Server:
    """An rtserve server: a conductor (the thread that calls `serve`) and a worker pool.

    `app` is a native `App`, a WSGI callable, or anything with `resolve(request) -> Route
    | Response` (such as `WSGIApp`). `sock` is an already-bound listening socket to use
    instead of `bind` (the supervisor passes one).
    """

    def __init__(self, app: Any, config: Config | None = None,
                 sock: socket.socket | None = None, **settings: Any) -> None:
        cfg = config if config is not None else Config()
        if settings:
            cfg = cfg.replace(**settings)
        self.cfg = cfg
        self.app = as_dispatcher(app, cfg)
        max_requests = cfg.max_requests
        if max_requests and cfg.max_requests_jitter:
            max_requests += random.randint(0, cfg.max_requests_jitter)
        self.limits = limits = Limits(cfg, max_requests)
        self.metrics = Metrics()
        self.idle_trim = memory.IdleTrim(cfg.malloc_trim_idle)
        self.pool = WorkerPool(cfg.threads)
        # The hand-off: the pool's queue and a Worker, or an ASGI executor's inbox and its
        # runner token (its loops post completions on the pool's queue all the same).
        self.asgi: Any = None
        if getattr(self.app, "interface", "") == "asgi":
            self.asgi = self.app.make_executor(self.pool)
            self.worker: Any = self.asgi.runner
            self._submit = self.asgi.submit
            limits.threads = cfg.asgi_concurrency  # admission's running cap: tasks, not threads
            limits.ahead_ns = 0  # its inbox is not one queue shared by blocked threads
        else:
            self.worker = Worker(self.pool, cfg.stream_high_water)
            self._submit = self.pool.task_put
        self.life = Lifecycle(limits.graceful_ns, limits.drain_ns, cfg.graceful_timeout)
        # Built now, on the calling thread: a bad certificate fails here, before serving.
        self.tls = TLSContexts(cfg) if requested(cfg) else None
        if self.tls is not None:
            self.metrics.tls = True
            self.life.on_hup = self.tls.reload
        self._sock = sock
        self.address: Any = None
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.conns: dict[int, Connection] = {}
        # The parts exist from serve() on (epoll and the timers' clock start there).
        self.loop: Any = None
        self.timers: Any = None
        self.answers: Any = None
        self.admission: Any = None
        self.reader: Any = None
        self.writer: Any = None
        self.completions: Any = None
        self.listener: Any = None
        self.livestats: LiveStats | None = None  # --dashboard only

    # ---- control and the public view (any thread) -----------------------------------------

    def stop(self) -> None:
        """Ask the conductor for a graceful drain (thread-safe)."""
        self.life.stop()

    def stop_now(self) -> None:
        """Ask the conductor to exit at once (thread-safe)."""
        self.life.stop_now()

    @property
    def draining(self) -> bool:
        return self.life.draining

    @property
    def exit_code(self) -> int:
        return self.life.exit_code

    @property
    def heartbeat(self) -> Any:
        return self.life.heartbeat

    @heartbeat.setter
    def heartbeat(self, hook: Any) -> None:
        self.life.heartbeat = hook

    @property
    def not_ready_reason(self) -> str:
        return self.life.not_ready_reason

    @not_ready_reason.setter
    def not_ready_reason(self, reason: str) -> None:
        self.life.not_ready_reason = reason

    @property
    def open_connections(self) -> int:
        return len(self.conns)

    @property
    def requests_seen(self) -> int:
        return self.reader.requests_seen if self.reader is not None else 0

    # ---- the conductor thread -----------------------------------------------------------------

    def serve(self) -> int:
        """Run until drained or stopped; returns the process exit code."""
        try:
            self._setup()
            self.started.set()
            self.loop.run(self)
        except StartupFailed as exc:
            log.error("application startup failed: %s", exc)
            self.life.exit_code = 3  # like an application that cannot be imported
        finally:
            self._teardown()
            self.started.set()
            self.stopped.set()
        return self.life.exit_code

    def _setup(self) -> None:
        cfg = self.cfg
        limits = self.limits
        sys.setswitchinterval(cfg.switch_interval_ms / 1000.0)
        loop = self.loop = EventLoop()
        now = time.monotonic_ns()
        timers = self.timers = Timers(now)
        pool = self.pool
        answers = self.answers = Answers(self.life, self.metrics, pool, cfg.dashboard)
        admission = self.admission = Admission(
            limits, cfg, self.metrics, timers, answers, self._submit, self.worker
        )
        answers.admission = admission
        if limits.ahead_ns and cfg.handoff_batch:  # the loop flushes it every turn
            admission.batch = []
            if cfg.handoff_yield:
                loop.yield_cpu = getattr(os, "sched_yield", None)
        reader_args = (limits, self.conns, loop.ep, loop.set_mask, timers, self.metrics,
                       self.app, answers, admission, self.life)
        writer_args = (limits, self.conns, loop.ep, loop.set_mask, timers, self.metrics,
                       admission, answers, self.life, cfg.access_log_format)
        reader: Reader
        writer: Writer
        if self.tls is not None:
            reader = self.reader = TLSReader(*reader_args, tls=self.tls)
            writer = self.writer = TLSWriter(*writer_args)
        else:
            reader = self.reader = Reader(*reader_args)
            writer = self.writer = Writer(*writer_args)
        reader.writer = writer
        writer.reader = reader
        completions = self.completions = Completions(
            pool.take_completions, admission, answers, self.metrics, writer
        )
        completions.reader = reader
        admission.answer = writer.answer
        asgi = self.asgi
        if asgi is not None:
            asgi.start()  # lifespan startup, before the listener exists (StartupFailed)
            admission.cancel = asgi.cancel  # at respond-by: cancel the task
            # The loops' backlog gate replaces the CPU gate (nothing samples a task's CPU).
            admission.cpu_ok = asgi.ready
            asgi.wire(admission)  # a gate shut on sync threads looks again (gate_wake_ns)
            admission.light_by_time()  # a loop's tasks are not CPU-sampled one by one
            writer.on_gone = asgi.gone  # closed while running: http.disconnect, cancel
            reader.abort_on_eof = True  # a client that leaves cancels its request
            self.metrics.labelled_counter(
                "rtserve_cancelled_total", "ASGI tasks cancelled (deadline: the fallback "
                "went out; disconnect: the client left).", "reason", asgi.cancelled)
            self.metrics.gauge(
                "rtserve_asgi_sync_threads_busy", "anyio threads running an ASGI app's "
                "sync code (FastAPI def endpoints); at the bound, requests queue.",
                asgi.sync_threads_busy)
            self.metrics.gauge("rtserve_asgi_sync_threads", "The bound on those threads "
                               "(--asgi-threads, per loop, summed).", asgi.sync_threads)
        lst = self._sock if self._sock is not None else make_listener(
            cfg.bind, cfg.backlog, cfg.reuse_port
        )
        self.listener = writer.listener = Listener(
            lst, loop.ep, reader.open, limits.max_connections, self.metrics, timers.alarm,
            cfg.defer_accept,
        )
        # The loop dispatches the listener itself, after a turn's other events (loop.py).
        # Read the request at accept when the kernel held the connection until it came
        # (plain HTTP: a TLS connection starts with its handshake, tlsio.py).
        reader.read_first = self.listener.deferred and self.tls is None
        self.address = self.listener.address
        if asgi is not None:
            asgi.set_server_address(self.address)
        else:
            pool.start()  # an ASGI app needs only the pool's completion queue
        loop.watch(pool.wakeup_fd, completions.on_completions)
        for fd, handler in self.life.install(self).items():
            loop.watch(fd, handler)
        self._register_gauges()
        # Route deadlines in /metrics; with --dashboard, the sampler the tick feeds.
        deadlines = slo.export(self.metrics, self.app, cfg.deadline_ms)
        admission.hold_prompt(True)  # the switch interval is process-wide (handoff.py)
        if (cfg.relax_after_s and asgi is None and not cfg.deadline_ms
                and not any(d is not None for d in deadlines.values())):
            # No deadline configured: relax while no client sends one and no light request
            # runs beside CPU-bound ones (Handoff.relax_tick). ASGI's gate is the loops'.
            admission.enable_relax(cfg.relax_after_s, cfg.switch_interval_ms / 1000.0,
                                   cfg.relaxed_switch_interval_ms / 1000.0, now)
        if cfg.dashboard:
            self.livestats = answers.livestats = LiveStats(
                self.metrics, deadlines, now, cfg.cpu_inflight_ms
            )
        log.info("listening on %s%s (%s, pid %d)", format_address(self.address),
                 " (TLS)" if self.tls is not None else "",
                 f"ASGI, {cfg.asgi_loops} event loop(s)" if self.asgi is not None
                 else f"{cfg.threads} threads", os.getpid())

    def _register_gauges(self) -> None:
        m = self.metrics
        adm = self.admission
        m.gauge("rtserve_open_connections", "Open client connections.", lambda: len(self.conns))
        m.gauge("rtserve_queue_depth", "Requests waiting for a worker.", lambda: adm.queue_depth)
        m.gauge("rtserve_busy_workers", "Workers running a handler.", lambda: adm.busy)
        m.gauge("rtserve_stuck_workers", "Workers still running a request answered late.",
                lambda: adm.stuck_count)
        m.gauge("rtserve_workers", "Size of the worker pool.", lambda: adm.threads)
        m.gauge("rtserve_deadline_extra_margin_seconds",
                "Recent deadline-timer lateness, sent earlier as extra margin.",
                lambda: adm.lag_ns / 1e9)
        m.gauge("rtserve_relaxed", "1 while relaxed: nothing at stake for --relax-after-s, "
                "the CPU gate open and the switch interval --relaxed-switch-interval-ms.",
                lambda: 1 if adm.relaxed else 0)
        m.gauge("rtserve_cpu_inflight_seconds",
                "Sampled CPU time of the handlers running now (dispatch waits above the cap).",
                lambda: adm.cpu_inflight_ns / 1e9)
        m.labelled_counter("rtserve_malloc_trims_total", "malloc_trim(0) calls after the "
                           "server was idle (--malloc-trim-idle).", "when",
                           lambda: {"idle": self.idle_trim.trims})
        m.gauge("rtserve_malloc_trim_seconds", "How long the last idle malloc_trim(0) took "
                "(on the conductor, while no request was in flight).",
                lambda: self.idle_trim.last_ns / 1e9)
        m.gauge("rtserve_concurrency_limit", "Current admission limit (0 = none).",
                lambda: round(adm.limit.limit, 2) if adm.limit.enabled else 0)

    def housekeeping(self, now: int) -> None:
        """The coarse tick (at most once a second unless an alarm asks sooner)."""
        self.timers.tick_at = now + TICK_NS
        self.listener.on_tick(now)
        self.life.on_tick(now)
        adm = self.admission
        adm.on_tick(now)
        self.idle_trim.on_tick(now, adm.busy + adm.queue_depth, self.reader.requests_seen)
        stats = self.livestats
        if stats is not None and now >= stats.due:
            stats.tick(now)
        if stats is not None:
            self.timers.alarm(stats.due)

    def _teardown(self) -> None:
        writer = self.writer
        for conn in list(self.conns.values()):
            try:
                writer.close(conn)
            except Exception:
                log.exception("closing %r at teardown failed", conn)
        if self.listener is not None:
            self.listener.close()
        if self.asgi is not None:
            self.asgi.stop(0 if self.life.force_exit else self.cfg.graceful_timeout)
        self.pool.shutdown(timeout=0 if self.life.force_exit else 1.0)
        if self.loop is not None:
            self.loop.ep.close()
        self.pool.close()
        self.life.close()
        if self.admission is not None:
            self.admission.hold_prompt(False)


def freeze_startup_objects() -> None:
    """Move every object alive now (imported modules, the app, the parts) out of the
    collector's reach: the process is about to serve until it exits, and a full collection
    would otherwise walk them all again and again, a pause in some unlucky request's time.
    Called by the command line before serving; not by `Server` (a test process starts many)."""
    import gc

    gc.collect()
    gc.freeze()


def serve(app: Any, config: Config | None = None, **settings: Any) -> int:
    """Serve `app` until drained (SIGINT/SIGTERM); returns the exit code.

    `app` may be a native `App`, or any WSGI callable (wrapped automatically).
    """
    cfg = config if config is not None else Config()
    if settings:
        cfg = cfg.replace(**settings)
    return Server(app, cfg).serve()


__all__ = ["Server", "serve", "as_dispatcher"]
