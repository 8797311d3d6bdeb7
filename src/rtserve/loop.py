"""The event loop: epoll over the listener, the connections and the wake-up fds; precise waits.

Conductor thread only. Each turn: wait until the nearest timer (microsecond waits with
select() when it is under 2 ms away, since epoll counts whole milliseconds rounded up),
hand each ready connection to the reader or the writer, each wake-up fd to its handler
(the pool's completions eventfd, signals, the control socket), accept last (a connection
accepted in the turn may take the fd number of one the turn closed, which must not get
the closed one's events), then run what is due: deadlines first (a due fallback beats a
CoDel 503), connection timers, the housekeeping tick, and the queue's (the CPU gate's next
look, CoDel expiries); last, hand the turn's batch of cheap requests to the pool and, in
a turn that accepted, yield the CPU to the worker it woke. An exception from one
connection's event is that connection's fault alone (writer.fault): it is logged, counted
and the connection closed.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from typing import Any

from .connection import CLOSED, T_IDLE, Connection

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLHUP = select.EPOLLHUP
EPOLLERR = select.EPOLLERR
_READABLE = EPOLLIN | EPOLLRDHUP
_BROKEN = EPOLLHUP | EPOLLERR


class EventLoop:
    """The epoll object, and the fd -> handler table for everything that is not a client."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}  # fd -> handler(now)
        # os.sched_yield when the turn that hands a batch to the pool gives its worker the
        # CPU at once (--handoff-yield, the server sets it; see run); None: it does not.
        self.yield_cpu: Callable[[], None] | None = None

    def watch(self, fd: int, handler: Callable[[int], None]) -> None:
        """Call `handler(now)` whenever `fd` is readable."""
        self.ep.register(fd, EPOLLIN)
        self.handlers[fd] = handler

    def set_mask(self, conn: Connection, mask: int) -> None:
        """Change what epoll reports for a connection (no system call if unchanged)."""
        if mask != conn.mask and conn.state is not CLOSED:
            conn.mask = mask
            self.ep.modify(conn.fd, mask)

    def run(self, server: Any) -> None:
        """Serve until the lifecycle says done."""
        ep = self.ep
        handlers = self.handlers
        conns = server.conns
        reader = server.reader
        writer = server.writer
        timers = server.timers
        admission = server.admission
        life = server.life
        on_readable = reader.on_readable
        on_writable = writer.on_writable
        next_due = timers.next_due
        monotonic_ns = time.monotonic_ns
        select_select = select.select
        epfd = (ep.fileno(),)
        fault = writer.fault
        waiting = admission.waiting
        listener = server.listener
        listen_fd = listener.fd if listener is not None else -1
        yield_cpu = self.yield_cpu
        metrics = server.metrics
        while not life.force_exit:
            due = next_due()
            if waiting:
                expiry = admission.next_expiry(monotonic_ns())
                if expiry and expiry < due:
                    due = expiry
            timeout = (due - monotonic_ns()) / 1e9
            try:
                if timeout <= 0:
                    events = ep.poll(0)
                elif timeout < 0.002:
                    # epoll counts whole milliseconds, rounded up: a timer due in 0.3 ms
                    # would fire up to 1 ms late. select() waits in microseconds.
                    select_select(epfd, (), (), timeout)
                    events = ep.poll(0)
                else:
                    # Wake up to 1 ms early; the select above finishes the wait precisely.
                    events = ep.poll(timeout - 0.001)
            except InterruptedError:
                events = []
            now = monotonic_ns()
            accept = False
            for fd, ev in events:
                conn = conns.get(fd)
                if conn is not None:
                    try:
                        if ev & _READABLE:
                            on_readable(conn, now)
                        if ev & EPOLLOUT and conn.state is not CLOSED:
                            on_writable(conn, now)
                        if ev & _BROKEN and conn.state is not CLOSED:
                            writer.abort(conn)
                    except Exception:
                        fault(conn, "handling an event")
                elif fd == listen_fd and listener.sock is not None:
                    accept = True
                else:
                    handler = handlers.get(fd)
                    if handler is not None:
                        try:
                            handler(now)
                        except Exception:
                            fault(None, "in a wake-up handler")
            if accept:
                # After the batch's other events: a connection closed in this turn frees
                # its fd number, and one accepted now may take it; an event of the closed
                # one later in the batch would reach the new one (a reset would abort it).
                try:
                    listener.on_ready(now)
                except Exception:
                    fault(None, "accepting")
            if life.signals:
                life.handle_signals(now)
            if monotonic_ns() >= due:
                self._run_due(server, monotonic_ns())
            if admission.batch:
                admission.flush_batch()
                if accept and yield_cpu is not None:
                    # Workers run under SCHED_BATCH (pool.batch_policy): woken by the
                    # batch, one waits for the CPU until the conductor blocks in epoll or
                    # its time slice ends. While new connections keep coming that is turns
                    # later, so a turn that accepted gives the worker the CPU now (the GIL
                    # is free during the call). A turn of keep-alive reads does not: its
                    # connections send nothing more until answered, the conductor soon
                    # blocks, and a yield there only adds two switches (A -6%).
                    yield_cpu()
                    metrics.handoff_yields += 1
            if life.draining and not conns:
                return  # drained: every connection is closed

    @staticmethod
    def _run_due(server: Any, now: int) -> None:
        """Deadlines, then connection timers, the tick, and the queue's due work."""
        timers = server.timers
        admission = server.admission
        fault = server.writer.fault
        if timers.deadlines and timers.deadlines[0][0] <= now:
            for at, conn, rid in timers.due_deadlines(now):
                try:
                    if conn.awaits(rid):  # an earlier answer in this batch may have closed it
                        admission.on_deadline(at, conn, rid, now)
                except Exception:
                    fault(conn, "answering at a deadline")
        if timers.heap and timers.heap[0][0] <= now:
            reader_timer = server.reader.on_timer
            writer_timer = server.writer.on_timer
            for conn, kind in timers.due_connections(now):
                try:
                    if kind <= T_IDLE:
                        reader_timer(conn, kind, now)
                    else:
                        writer_timer(conn, kind, now)
                except Exception:
                    fault(conn, "on a timer")
        if now >= timers.tick_at:
            try:
                server.housekeeping(now)
            except Exception:
                fault(None, "in housekeeping")
        if admission.waiting:
            try:
                admission.on_queue_due(now)
            except Exception:
                fault(None, "on the queue's due work")
