"""The server's life: signals, stop requests, the drain phases, heartbeats and teardown.

Conductor thread (Python runs signal handlers on the main thread, which is the
conductor; the handlers only record the signal). `stop()` and `stop_now()` may be called
from any thread: they write a byte to a control socket the loop watches.

Drain phases: requested (with `--drain-seconds`, /readyz says 503 while still serving, so
a load balancer moves away) -> draining (listener closed, idle keep-alive connections
closed, in-flight requests finish with `Connection: close`) -> at `--graceful-timeout`,
503 for what still waits, then exit. A second SIGINT or a SIGQUIT exits at once.
SIGHUP calls `on_hup` (server.py sets it to reload the TLS context) or is ignored.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from .connection import QUEUED, READING_HEAD, RUNNING
from .timers import TICK_NS

log = logging.getLogger("rtserve.error")


class Lifecycle:
    """Drain and exit state; `draining` and `drain_requested` are the public facts."""

    def __init__(self, graceful_ns: int, drain_ns: int, graceful_timeout_s: float) -> None:
        self.draining = False  # stopped accepting; responses say Connection: close
        self.drain_requested = False  # a drain is coming or under way (heartbeat: "D")
        self.not_ready_reason = ""  # non-empty: /readyz answers 503 with it
        self.force_exit = False
        self.exit_code = 0
        # Supervisor hook (supervisor.py): called at most once per second from the tick,
        # and at once when a drain is requested, so a stuck conductor is noticed.
        self.heartbeat: Callable[[], None] | None = None
        # SIGHUP in this process: reload what can be reloaded in place (the TLS context,
        # set by server.py). The supervisor, which owns SIGHUP, restarts children instead.
        self.on_hup: Callable[[], Any] | None = None
        self._beat_at = 0
        self._graceful_ns = graceful_ns
        self._graceful_s = graceful_timeout_s
        self._drain_ns = drain_ns
        self._drain_at = 0  # when a delayed drain begins
        self._drain_deadline = 0  # when the graceful timeout runs out
        self._recycle = False  # max_requests reached: drain at the next tick
        self.signals: list[int] = []  # recorded by the handler, acted on by the loop
        self._ctl_r, self._ctl_w = socket.socketpair()
        self._ctl_r.setblocking(False)
        self._ctl_w.setblocking(False)
        self._sig_r: socket.socket | None = None
        self._sig_w: socket.socket | None = None
        self._parts: Any = None  # the Server, for its listener, connections and writer

    # ---- any thread ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the conductor for a graceful drain."""
        try:
            self._ctl_w.send(b"d")
        except OSError:
            pass

    def stop_now(self) -> None:
        """Ask the conductor to exit at once."""
        try:
            self._ctl_w.send(b"x")
        except OSError:
            pass

    # ---- conductor thread -------------------------------------------------------------------

    def install(self, server: Any) -> dict[int, Callable[[int], None]]:
        """Watch the control socket (and signals, on the main thread): fd -> handler."""
        self._parts = server
        fds: dict[int, Callable[[int], None]] = {self._ctl_r.fileno(): self._on_control}
        if threading.current_thread() is threading.main_thread():
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            self._sig_r, self._sig_w = r, w
            signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
            fds[r.fileno()] = self._on_signal_fd
        return fds

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Python-level handler: only record; the loop acts on it after the fd wake-up."""
        self.signals.append(signum)

    def _on_signal_fd(self, now: int) -> None:
        try:
            while self._sig_r is not None and self._sig_r.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self.handle_signals(now)

    def handle_signals(self, now: int) -> None:
        sigs, self.signals = self.signals, []
        for signum in sigs:
            if signum == signal.SIGQUIT:
                log.warning("SIGQUIT: exiting at once")
                self.exit_code = 1
                self.force_exit = True
            elif signum == signal.SIGINT and self.draining:
                log.warning("second SIGINT: exiting at once")
                self.exit_code = 1
                self.force_exit = True
            elif signum in (signal.SIGINT, signal.SIGTERM):
                log.info("%s: draining (up to %.0f s)", signal.Signals(signum).name,
                         self._graceful_s)
                self.request_drain(now)
            elif signum == signal.SIGHUP:
                if self.on_hup is not None:
                    self.on_hup()
                else:
                    log.info("SIGHUP ignored in a single process (the supervisor reloads)")

    def _on_control(self, now: int) -> None:
        try:
            data = self._ctl_r.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        if b"x" in data:
            self.force_exit = True
        elif b"d" in data:
            self.request_drain(now)

    def request_drain(self, now: int) -> None:
        """Drain now, or after `drain_seconds` of reporting not ready (load balancers)."""
        if self.drain_requested:
            return
        self.drain_requested = True
        self._beat_at = 0  # tell a supervisor now, so it starts a replacement at once
        timers = self._parts.timers
        timers.alarm(now)
        if self._drain_ns > 0:
            self.not_ready_reason = "draining"
            self._drain_at = now + self._drain_ns
            timers.alarm(self._drain_at)
        else:
            self.begin_drain(now)

    def recycle(self, now: int) -> None:
        """max_requests reached: drain (honouring drain_seconds) from the next tick, not
        from inside the request that counted, whose connection must not be closed under it."""
        self._recycle = True
        self._parts.timers.alarm(now)

    def on_tick(self, now: int) -> None:
        """Housekeeping: heartbeat, and the drain phases whose time came."""
        if self._recycle:
            self._recycle = False
            self.request_drain(now)
        if self.heartbeat is not None and now >= self._beat_at:
            self._beat_at = now + TICK_NS
            self.heartbeat()
        if self._drain_at and now >= self._drain_at:
            self._drain_at = 0
            self.begin_drain(now)
        elif self._drain_at:
            self._parts.timers.alarm(self._drain_at)
        if self._drain_deadline:
            if now >= self._drain_deadline:
                self._drain_expired(now)
            else:
                self._parts.timers.alarm(self._drain_deadline)

    def begin_drain(self, now: int) -> None:
        """Stop accepting, close idle connections, let in-flight requests finish."""
        if self.draining:
            return
        self.draining = True
        self.drain_requested = True
        srv = self._parts
        srv.worker.draining = True  # responses from now on say Connection: close
        self._beat_at = 0  # a max_requests recycle lands here: tell the supervisor at once
        self._drain_deadline = now + self._graceful_ns
        srv.timers.alarm(now)
        srv.listener.close()
        # Close idle keep-alive connections. A connection accepted but whose first request
        # has not arrived yet (req_id 0) is left to its header timer: closing it would fail
        # a request the client already sent (its response goes out with Connection: close).
        for conn in list(srv.conns.values()):
            if conn.state is READING_HEAD and conn.req_id and not conn.parser.has_partial():
                srv.writer.close(conn)

    def _drain_expired(self, now: int) -> None:
        """graceful_timeout is over: 503 for what is still waiting, then close everything."""
        self._drain_deadline = 0
        srv = self._parts
        srv.admission.take_all_queued()
        for conn in list(srv.conns.values()):
            st = conn.state
            if st is QUEUED or st is RUNNING:
                srv.metrics.count_shed("draining")
                srv.writer.answer(conn, srv.answers.draining_shed(conn.request), now)
        for conn in list(srv.conns.values()):
            if conn.out is None:
                srv.writer.close(conn)
        self.force_exit = True

    def close(self) -> None:
        """Teardown: stop watching signals, close the control sockets."""
        if self._sig_w is not None:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
            self._sig_w.close()
            if self._sig_r is not None:
                self._sig_r.close()
        self._ctl_r.close()
        self._ctl_w.close()
