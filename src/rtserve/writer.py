"""Writing side of HTTP/1 connections: bytes out, then keep-alive or close.

Conductor thread only. Top to bottom: `answer`/`respond` (a Reply starts going out; the
replies come from completions.py, admission.py and the reader), the send paths (send,
sendmsg, sendfile, the stream pump, EPOLLOUT only after a partial send), `finish` (the
duration is recorded; keep-alive or a lingering close), and `close`, the only place a
client socket is closed (unregistered from epoll first).
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
import struct
import termios
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from . import dashboard
from .accesslog import format_line
from .admission import Admission
from .answers import HEALTH_PATHS, Answers
from .connection import (
    CLOSED,
    CLOSING,
    QUEUED,
    READING_BODY,
    READING_HEAD,
    RUNNING,
    T_LINGER,
    T_WRITE,
    WRITING,
    Connection,
)
from .framing import FileReply, Reply, StreamReply
from .lifecycle import Lifecycle
from .limits import Limits
from .metrics import BUCKETS_NS, Metrics
from .request import Request
from .stream import StreamChannel

log = logging.getLogger("rtserve.error")
access_log = logging.getLogger("rtserve.access")

EPOLLOUT = select.EPOLLOUT
READ_MASK = select.EPOLLIN | select.EPOLLRDHUP
RECV_SIZE = 65536
LINGER_NS = 2_000_000_000
_monotonic_ns = time.monotonic_ns
_TIOCOUTQ = termios.TIOCOUTQ  # SIOCOUTQ on a socket: bytes sent but not yet acknowledged
_ioctl = fcntl.ioctl
_INT = struct.Struct("i")
_INT_ZERO = bytes(_INT.size)


def unsent_bytes(fd: int) -> int:
    """Bytes in the socket's send queue the peer has not acknowledged yet (-1 if unknown).

    The write-stall timer compares two readings: a client that keeps reading, however
    slowly, makes this fall even while EPOLLOUT stays away (the kernel only reports the
    socket writable once a third of a large send buffer is free).
    """
    try:
        return _INT.unpack(_ioctl(fd, _TIOCOUTQ, _INT_ZERO))[0]
    except OSError:
        return -1


class Writer:
    """Turns replies into bytes on the wire, in request order, one response at a time."""

    def __init__(self, limits: Limits, conns: dict[int, Connection], ep: Any,
                 set_mask: Callable[[Connection, int], None], timers: Any, metrics: Metrics,
                 admission: Admission, answers: Answers, life: Lifecycle,
                 access_log_format: str) -> None:
        self._conns = conns
        self._sink = bytearray(RECV_SIZE)  # linger_read's buffer: bytes read to be dropped
        self._ep = ep
        self._set_mask = set_mask
        self._arm = timers.arm
        self._metrics = metrics
        self._histograms = metrics.requests  # (method, route, status) -> Histogram
        self._admission = admission
        self._answers = answers
        self._life = life
        self._write_ns = limits.write_ns
        self._access_log = limits.access_log
        self._access_format = access_log_format
        self.reader: Any = None  # reader.Reader, wired by the server
        # Set by the server for an interface whose work can be stopped (ASGI): called with
        # (conn, req_id) when a connection closes while its request runs.
        self.on_gone: Callable[[Connection, int], None] | None = None
        self.listener: Any = None  # listener.Listener, wired by the server

    def on_stream_data(self, conn: Connection, rid: int, now: int) -> None:
        """A worker put data in the stream of request `rid`: pull it if the socket has room."""
        if (
            conn.req_id == rid and conn.state is WRITING and conn.out is None
            and conn.body.__class__ is StreamChannel and self._pump(conn, now)
        ):
            self.reader.resume(conn, now)

    # ---- a reply starts going out ---------------------------------------------------------

    def answer(self, conn: Connection, reply: Reply, now: int) -> None:
        """Send a reply that does not come from the parse loop, and read on after it."""
        if self.respond(conn, reply, now) and conn.state is READING_HEAD:
            self.reader.resume(conn, now)

    def respond(self, conn: Connection, reply: Reply, now: int) -> bool:
        """Begin sending; bytes go out at once, EPOLLOUT only after a partial send.

        True when the whole response went out now (the connection is then READING_HEAD
        for keep-alive, or closing).
        """
        status, keep_alive, data = reply
        conn.respond(status, keep_alive)
        req = conn.request
        if req is not None:
            req.status = status  # for the access log (the conductor's copy, never a worker's)
        if isinstance(data, bytes):
            if self._send(conn, data, now):
                self.finish(conn, now)
                return True
            return False
        if isinstance(data, tuple):  # (head, large body)
            if self._send_pair(conn, data, now):
                self.finish(conn, now)
                return True
            return False
        if isinstance(data, StreamReply):
            conn.body = data.channel
        else:
            assert isinstance(data, FileReply)  # a StreamPlan never leaves its worker
            conn.body = data.file
        if self._send(conn, data.head, now):
            return self._pump(conn, now)
        return False

    def send_interim(self, conn: Connection, data: bytes, now: int) -> None:
        """A 1xx line (100 Continue): tiny, sent before any response; a short send is kept
        in `out` like any, and the response that follows waits behind it."""
        if conn.out is None:
            self._send(conn, data, now)

    # ---- the send paths ---------------------------------------------------------------------

    def _send(self, conn: Connection, data: bytes, now: int) -> bool:
        """Send now; keep the rest and watch EPOLLOUT on a partial send. True if all sent."""
        if conn.out is not None:  # an interim 100 Continue is still going out
            conn.out = memoryview(bytes(conn.out) + data)
            return False
        try:
            n = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.abort(conn)
            return False
        if n == len(data):
            return True
        conn.out = memoryview(data)[n:]
        self._wait_writable(conn, now)
        return False

    def _send_pair(self, conn: Connection, pair: tuple[bytes, bytes], now: int) -> bool:
        """Send a head and a large body with one sendmsg (no joined copy of the body)."""
        head, body = pair
        if conn.out is not None:
            return self._send(conn, head + body, now)
        try:
            n = conn.sock.sendmsg(pair)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.abort(conn)
            return False
        hlen = len(head)
        if n == hlen + len(body):
            return True
        conn.out = memoryview(body)[n - hlen:] if n >= hlen else memoryview(head[n:] + body)
        self._wait_writable(conn, now)
        return False

    def _wait_writable(self, conn: Connection, now: int) -> None:
        """A partial send: watch EPOLLOUT and arm the write-stall timer."""
        self._set_mask(conn, conn.mask | EPOLLOUT)
        self._arm_write(conn, now)

    def _arm_write(self, conn: Connection, now: int) -> None:
        """The socket is full: arm the write-stall timer, noting what the kernel holds."""
        conn.unsent = unsent_bytes(conn.fd)
        self._arm(conn, now + self._write_ns, T_WRITE)

    def on_writable(self, conn: Connection, now: int) -> None:
        out = conn.out
        if out is not None:
            try:
                n = conn.sock.send(out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.abort(conn)
                return
            if n < len(out):
                conn.out = out[n:]
                self._arm_write(conn, now)
                return
            conn.out = None
        self._flushed(conn, now)

    def _flushed(self, conn: Connection, now: int) -> None:
        """Everything held back went out: move the body on, or (an interim 100 Continue
        sent while the body is still being read) stop watching EPOLLOUT."""
        if conn.state is WRITING:
            if self._pump(conn, now) and conn.state is READING_HEAD:
                self.reader.resume(conn, now)
        else:
            self._set_mask(conn, conn.mask & ~EPOLLOUT)
            conn.timer_at = 0

    def _pump(self, conn: Connection, now: int) -> bool:
        """Move the body on once the socket took everything; True when the response is done."""
        body = conn.body
        if body.__class__ is StreamChannel:
            while True:
                data = body.take()
                if data:
                    if not self._send(conn, data, now):
                        return False
                    continue
                if body.done:
                    conn.body = None
                    if body.failed:
                        conn.keep_alive = False  # the body broke: never look complete
                        self._metrics.handler_errors += 1
                    break
                # Nothing buffered: the worker wakes us when it has more.
                if conn.mask & EPOLLOUT:
                    self._set_mask(conn, conn.mask & ~EPOLLOUT)
                conn.timer_at = 0
                return False
        elif body is not None:  # a FileBody, sent with sendfile
            fileno = body.file.fileno()
            while body.count > 0:
                try:
                    n = os.sendfile(conn.fd, fileno, body.offset, min(body.count, 1 << 20))
                except (BlockingIOError, InterruptedError):
                    self._set_mask(conn, conn.mask | EPOLLOUT)
                    self._arm_write(conn, now)
                    return False
                except OSError:
                    self.abort(conn)
                    return False
                if n == 0:
                    conn.keep_alive = False  # the file is shorter than announced
                    break
                body.offset += n
                body.count -= n
            body.close()
            conn.body = None
        self.finish(conn, now)
        return True

    # ---- the last byte is out ---------------------------------------------------------------

    def finish(self, conn: Connection, now: int) -> None:
        """Record the request, then keep the connection alive or close it."""
        req = conn.request
        if req is not None:
            done = _monotonic_ns()
            route = req.route
            name = route.name if route is not None else _unrouted(req)
            # Metrics.observe_request, inlined: this runs once per request.
            h = self._histograms.get((req.method, name, conn.status))
            if h is None:
                h = self._metrics.request_histogram(req.method, name, conn.status)
            ns = done - req.start_ns
            h.counts[bisect_left(BUCKETS_NS, ns)] += 1
            h.sum_ns += ns
            h.count += 1
            if self._access_log:
                access_log.info(format_line(req, done, self._access_format))
        if conn.mask & EPOLLOUT:
            self._set_mask(conn, conn.mask & ~EPOLLOUT)
        if not conn.keep_alive or self._life.draining:
            if req is not None and not req.keep_alive and not conn.parser.buf:
                # The client itself asked to close (Connection: close, or HTTP/1.0 without
                # keep-alive) and nothing of it is left unread: it may send no more
                # (RFC 9112 section 9.6), so there is nothing a lingering close would
                # protect the response from. Close now, as nginx does. (Plain HTTP
                # closes without the `_close_asked` call: TLS sends close_notify there.)
                if conn.tls is None:
                    self.close(conn)
                else:
                    self._close_asked(conn, now)
                return
            self._close_after_response(conn, now)
            return
        conn.reset()

    def _close_asked(self, conn: Connection, now: int) -> None:
        """Close after a response the client asked to be the last (see finish)."""
        self.close(conn)

    def _close_after_response(self, conn: Connection, now: int) -> None:
        """Shut our write side and discard input until EOF (lingering close), so unread
        pipelined bytes can't turn our FIN into an RST that destroys the response."""
        if conn.eof:
            self.close(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        conn.linger()
        # No read now: epoll is level-triggered, so bytes or the client's EOF already
        # there are reported on the next turn, and a read that finds nothing (the usual
        # case right after our FIN) raises and catches EAGAIN, ~7k instructions.
        self._set_mask(conn, READ_MASK)
        self._arm(conn, now + LINGER_NS, T_LINGER)

    def linger_read(self, conn: Connection) -> None:
        """Read and drop what a closing client still sends (into one reused buffer)."""
        sink = self._sink
        for _ in range(16):
            try:
                n = conn.sock.recv_into(sink)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close(conn)
                return
            if not n:
                self.close(conn)
                return

    def on_timer(self, conn: Connection, kind: int, now: int) -> None:
        """A write-stall or linger timer expired.

        A write stalls when the kernel delivered nothing since the timer was armed: a
        client that reads slowly through a small receive buffer drains the send queue
        without EPOLLOUT coming back for longer than write_timeout, and is served on.
        """
        st = conn.state
        if kind == T_WRITE and (st is WRITING or conn.out is not None):
            unsent = unsent_bytes(conn.fd)
            if 0 <= unsent < conn.unsent:  # the client took bytes: progress, wait on
                conn.unsent = unsent
                self._arm(conn, now + self._write_ns, T_WRITE)
                return
            self._metrics.count_timeout("write")
            self.abort(conn)
        elif kind == T_LINGER and st is CLOSING:
            self.close(conn)

    # ---- closing ------------------------------------------------------------------------------

    def abort(self, conn: Connection) -> None:
        """The client reset or vanished: close; an unanswered request counts as an abort."""
        st = conn.state
        if st is QUEUED or st is RUNNING or st is WRITING or st is READING_BODY or (
            st is READING_HEAD and conn.parser.has_partial()
        ):
            self._metrics.client_aborts += 1
        self.close(conn)

    def close(self, conn: Connection) -> None:
        """The only place a client socket is closed: unregister, then close."""
        if conn.state is CLOSED:
            return
        if conn.state is QUEUED:
            self._admission.forget(conn, _monotonic_ns())  # the client left while it waited
        elif conn.state is RUNNING and self.on_gone is not None:
            self.on_gone(conn, conn.req_id)  # the client left while it ran: stop the work
        body = conn.body
        conn.closed()
        fd = conn.fd
        conns = self._conns
        conns.pop(fd, None)
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass
        try:
            conn.sock.close()
        except OSError:
            pass
        if body is not None:
            if body.__class__ is StreamChannel:
                body.abort()
            else:
                body.close()
        if not self._life.draining:
            lst = self.listener
            if lst.paused:  # Listener.on_close's first test, without the call
                lst.on_close(len(conns))

    def fault(self, conn: Connection | None, where: str) -> None:
        """A bug in conductor code while handling `conn`: log it, count it, drop that
        connection alone (call from an `except` block: the traceback is logged)."""
        self._metrics.internal_errors += 1
        log.exception("internal error %s for %r; closing that connection", where, conn)
        if conn is None or conn.state is CLOSED:
            return
        try:
            self.abort(conn)
        except Exception:
            log.exception("closing %r after an internal error failed", conn)
            self._conns.pop(conn.fd, None)
            try:
                self._ep.unregister(conn.fd)
            except (OSError, ValueError):
                pass
            try:
                conn.sock.close()
            except OSError:
                pass


def _unrouted(req: Request) -> str:
    """The route label of an answer without a Route: the health or dashboard path itself."""
    return req.path if req.path in _OWN_LABEL else "<unrouted>"


_OWN_LABEL = HEALTH_PATHS | dashboard.PATHS

