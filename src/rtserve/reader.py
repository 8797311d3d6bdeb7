"""Reading side of HTTP/1 connections: accept into a Connection, recv (with the kernel's
arrival stamp while requests with a deadline come in), parse, route, admit.

Conductor thread only. A request's way through this module reads top to bottom: `open`
(a new connection), `on_readable` (one recv), `advance` (the parse loop: one request at a
time, serial pipelining), `_request` (health endpoints, routing, then admission), and the
read-side timers. What admission does not answer at once goes to a worker; the answer
comes back through writer.py, which calls `resume` when the connection may read again.
"""

from __future__ import annotations

import _socket
import select
from collections.abc import Callable
from functools import partial
from typing import Any

from .admission import Admission
from .answers import Answers
from .arrival import ANC_SPACE, STAMP_SPAN, ArrivalClock
from .connection import (
    CLOSING,
    QUEUED,
    READING_BODY,
    READING_HEAD,
    RUNNING,
    T_BODY,
    T_HEADER,
    T_IDLE,
    Connection,
)
from .errors import HTTPError, ParseError
from .head_cache import HEAD_CACHE_BYTES, HeadCache, cached_request
from .lifecycle import Lifecycle
from .limits import Limits
from .metrics import Metrics
from .parser import NEED_DATA, UNFED_PARSER, RequestParser
from .protocols import Dispatcher
from .request import Request
from .response import Response
from .timers import Timers

EPOLLIN = select.EPOLLIN
READ_MASK = select.EPOLLIN | select.EPOLLRDHUP
RECV_SIZE = 65536
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEALTH_METHODS = frozenset({"GET", "HEAD"})

class Reader:
    """Turns bytes from clients into admitted requests."""

    def __init__(self, limits: Limits, conns: dict[int, Connection], ep: Any,
                 set_mask: Callable[[Connection, int], None], timers: Timers,
                 metrics: Metrics, app: Dispatcher, answers: Answers, admission: Admission,
                 life: Lifecycle) -> None:
        self._limits = limits
        self._conns = conns
        self._ep = ep
        self._set_mask = set_mask
        self._timers = timers
        self._arm = timers.arm
        self._metrics = metrics
        self._resolve = app.resolve
        self._answers = answers
        self._admit = admission.admit
        self._life = life
        self._header_ns = limits.header_ns
        self._body_ns = limits.body_ns
        self._idle_ns = limits.idle_ns
        self._readahead = limits.readahead
        # Every recv lands in this one buffer and the parser copies out what arrived:
        # `recv(65536)` allocated 64 KiB per read and shrank it to the bytes received,
        # which left the main heap fragmented (docs/reliability.md, Soak).
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rbufs = (self._rbuf,)  # recvmsg_into's buffer list
        # When a read's bytes arrived, while requests with a deadline come in (arrival.py).
        self.arrival = ArrivalClock()
        self._health = limits.health
        self._health_paths = answers.health_paths
        self._max_requests = limits.max_requests
        # A connection's parser, made at its first read that is not one whole cached head
        # (`received`; until then it holds UNFED_PARSER), its limits given by position: a
        # partial that passes keywords costs ~1.2k instructions more per connection
        # (RequestParser.__init__: max_request_line, max_header_block, max_header_count,
        # max_body_size, head_cache).
        head_cache = HeadCache()  # one for every connection: they share these limits
        self._heads = head_cache.heads
        self._new_parser = partial(
            RequestParser,
            limits.max_request_line,
            limits.max_header_block,
            limits.max_header_count,
            limits.max_body_size,
            head_cache,
        )
        self.requests_seen = 0  # routed requests (max_requests counts these)
        self.writer: Any = None  # writer.Writer, wired by the server (the two call each other)
        # Set by the server for an interface whose work can be stopped (ASGI): the client's
        # EOF while its request waits or runs means it left (as uvicorn and nginx take it).
        self.abort_on_eof = False
        # Set by the server when the listener defers accepts until a request's bytes came
        # (TCP_DEFER_ACCEPT, listener.py): open() then reads at once.
        self.read_first = False

    # ---- a new connection -----------------------------------------------------------------

    def open(self, sock: _socket.socket, addr: Any, now: int) -> int:
        """Adopt an accepted socket; returns how many connections are open.

        With `read_first` (the listener defers accepts until bytes came: listener.py) the
        request is read now, not on the next loop turn, and a request that came whole
        needs no header timer. The connection is watched from the start all the same:
        a client that leaves while its request waits or streams is noticed at once.
        """
        arrival = self.arrival
        if arrival.stamps:
            arrival.enable(sock)
        conn = Connection(sock, addr, UNFED_PARSER)
        if not self.read_first:
            return self._adopt(conn, now + self._header_ns, T_HEADER)
        try:
            if arrival.stamps:
                n, anc, _flags, _addr = sock.recvmsg_into(self._rbufs, ANC_SPACE)
                if n:
                    conn.req_start = arrival.arrival(sock, anc, now)
            else:
                n = sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):  # the defer ran out before any bytes
            return self._adopt(conn, now + self._header_ns, T_HEADER)
        except OSError:  # reset already
            n = -1
        conns = self._conns
        conns[conn.fd] = conn
        self._ep.register(conn.fd, READ_MASK)
        conn.mask = READ_MASK
        self._metrics.connections_accepted += 1
        try:
            if n < 0:
                self.writer.abort(conn)
            else:
                self.received(conn, n, now)
        except Exception:  # as the loop does for a read event: drop this connection alone
            self.writer.fault(conn, "handling an event")
        return len(conns)

    def _adopt(self, conn: Connection, timer_at: int, timer_kind: int) -> int:
        """Register a new connection for reading with its first timer; returns the count."""
        conns = self._conns
        conns[conn.fd] = conn
        self._ep.register(conn.fd, READ_MASK)
        conn.mask = READ_MASK
        self._arm(conn, timer_at, timer_kind)
        self._metrics.connections_accepted += 1
        return len(conns)

    # ---- bytes in -------------------------------------------------------------------------

    def on_readable(self, conn: Connection, now: int) -> None:
        if conn.state is CLOSING:
            self.writer.linger_read(conn)
            return
        try:
            arrival = self.arrival
            if arrival.stamps:
                # While requests with a deadline come in, each read also asks the kernel
                # when its bytes arrived: a request's clock starts then, not when the
                # conductor got to read them (arrival.py).
                n, anc, _flags, _addr = conn.sock.recvmsg_into(self._rbufs, ANC_SPACE)
                if n and not conn.req_start:
                    conn.req_start = arrival.arrival(conn.sock, anc, now)
            else:
                n = conn.sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.writer.abort(conn)
            return
        self.received(conn, n, now)

    def received(self, conn: Connection, n: int, now: int) -> None:
        """`n` bytes arrived in the read buffer (0: the client shut its side): parse them.
        The TLS reader calls this after its own decrypting read."""
        if not n:
            self._on_eof(conn, now)
            return
        if not conn.req_start:
            conn.req_start = now  # the request clock starts at the recv of its first byte
        parser = conn.parser
        if parser is UNFED_PARSER:
            # No bytes held: a read that is exactly one head the parser cached (without a
            # body) is that head's Request (head_cache.cached_request, as the parser's
            # hits make it), with no parser made, fed or asked (B: 89.8k -> 83.0k
            # instructions per connection, docs/parser.md). Anything else goes to the
            # connection's own parser, made now.
            if (conn.state is READING_HEAD and n <= HEAD_CACHE_BYTES
                    and self._rbuf[n - 1] == 10):
                known = self._heads.get(bytes(self._rview[:n]))
                if known is not None and not known[6]:
                    self._request(conn, cached_request(known), now)
                    if conn.state is READING_HEAD:  # answered at once: wait for the next
                        self._await_more(conn, now)
                    return
            parser = conn.parser = self._new_parser()
        parser.feed(self._rview[:n])
        if conn.state <= READING_BODY:
            self.advance(conn, now)
        elif parser.buffered > self._readahead:
            self._set_mask(conn, conn.mask & ~READ_MASK)  # pipelining backpressure

    def _on_eof(self, conn: Connection, now: int) -> None:
        """The client shut its write side: finish what is in flight, then close."""
        conn.eof = True
        st = conn.state
        if st is READING_HEAD and not conn.parser.buf:
            # An idle keep-alive connection the client closed, the usual end of one: close
            # at once (the close takes it out of epoll; a mask change first is a wasted
            # system call).
            self.writer.close(conn)
            return
        self._set_mask(conn, conn.mask & ~READ_MASK)  # no busy loop on a half-closed socket
        if st is READING_HEAD or st is READING_BODY:
            self.advance(conn, now)  # a complete request may still be buffered
        elif st is CLOSING:
            self.writer.close(conn)
        elif self.abort_on_eof and (st is RUNNING or st is QUEUED):
            self.writer.abort(conn)

    # ---- the parse loop -------------------------------------------------------------------

    def advance(self, conn: Connection, now: int) -> None:
        """Parse and admit buffered requests, one at a time (serial pipelining).

        A request answered at once (health, 404, dead on arrival ...) that went out whole
        leaves the connection in READING_HEAD, and the loop takes the next one.
        """
        parser = conn.parser
        while conn.state is READING_HEAD or conn.state is READING_BODY:
            try:
                req = parser.next_event()
            except ParseError as exc:
                self.reject(conn, exc.status, now)
                return
            if req is NEED_DATA:
                self._await_more(conn, now)
                return
            self._request(conn, req, now)  # type: ignore[arg-type]  # not NEED_DATA: a Request

    def resume(self, conn: Connection, now: int) -> None:
        """A response finished outside the parse loop and the connection stays open."""
        if conn.parser.buf or conn.eof:
            self.advance(conn, now)  # a pipelined request is waiting (or the client left)
            return
        # The common keep-alive case: nothing buffered, wait idle for the next request.
        # Timers.arm, inlined: usually the connection's heap entry (the header timer's, or
        # an earlier idle one's) is due sooner, and re-arming is two stores (timers.py).
        at = now + self._idle_ns
        heap_at = conn.heap_at
        if heap_at and at >= heap_at:
            conn.timer_at = at
            conn.timer_kind = T_IDLE
        else:
            self._arm(conn, at, T_IDLE)
        if not conn.mask & EPOLLIN:
            self._set_mask(conn, conn.mask | READ_MASK)

    def _await_more(self, conn: Connection, now: int) -> None:
        parser = conn.parser
        if conn.eof:
            if parser.has_partial():
                self._metrics.client_aborts += 1
            self.writer.close(conn)
            return
        pending = parser.pending
        if pending is not None:
            if conn.state is READING_HEAD:
                conn.body_pending()
                self._arm(conn, now + self._body_ns, T_BODY)
            if pending.expect_continue and not conn.continue_sent:
                conn.continue_sent = True
                self.writer.send_interim(conn, CONTINUE, now)
        elif parser.has_partial():
            if conn.timer_kind != T_HEADER or not conn.timer_at:
                self._arm(conn, (conn.req_start or now) + self._header_ns, T_HEADER)
        elif self._life.draining:
            self.writer.close(conn)
            return
        else:
            self._arm(conn, now + self._idle_ns, T_IDLE)
        if not conn.mask & EPOLLIN:
            self._set_mask(conn, conn.mask | READ_MASK)

    def reject(self, conn: Connection, status: int, now: int, parse_error: bool = True) -> None:
        """A request refused before it became one (parser, timeouts): answer, then close.

        Bytes that followed are never answered: the framing is in doubt.
        """
        if parse_error:
            self._metrics.count_parse_error(status)
        self._set_mask(conn, conn.mask & ~READ_MASK)
        self.writer.respond(conn, self._answers.error(status), now)

    # ---- one complete request -------------------------------------------------------------

    def _request(self, conn: Connection, req: Request, now: int) -> None:
        """Stamp the request, answer health and unrouted paths, else hand it to admission."""
        rid = conn.begin(req)
        req.client = conn.addr
        req.start_ns = conn.req_start or now
        conn.req_start = now if conn.parser.buf else 0  # a pipelined request began
        if self._health and req.path in self._health_paths and req.method in _HEALTH_METHODS:
            self.writer.respond(conn, self._answers.health(req), now)
            return
        self.requests_seen += 1  # health checks are not counted: they would recycle idlers
        if self.requests_seen == self._max_requests:
            self._life.recycle(now)  # drain (honouring drain_seconds); a supervisor replaces us
        target = self._resolve(req)
        if isinstance(target, Response):
            self.writer.respond(conn, self._answers.response(req, target), now)
            return
        req.route = target
        try:
            reply = self._admit(conn, rid, req, target, now)
        except HTTPError as exc:  # a malformed budget header
            reply = self._answers.response(req, Response.text(exc.reason + "\n", exc.status))
        arrival = self.arrival
        if req.deadline_ns:
            if arrival.ok:
                arrival.stamps = STAMP_SPAN  # deadlines in use: their clocks need the arrival
        elif arrival.stamps:
            arrival.stamps -= 1
        if reply is not None:
            self.writer.respond(conn, reply, now)

    # ---- read-side timers -----------------------------------------------------------------

    def on_timer(self, conn: Connection, kind: int, now: int) -> None:
        """A header, body or idle timer expired."""
        st = conn.state
        m = self._metrics
        if kind == T_HEADER and st is READING_HEAD:
            if conn.parser.has_partial():
                m.count_timeout("header")
                self.reject(conn, 408, now, parse_error=False)
            else:
                m.count_timeout("idle")
                self.writer.close(conn)
        elif kind == T_BODY and st is READING_BODY:
            m.count_timeout("body")
            self.reject(conn, 408, now, parse_error=False)
        elif kind == T_IDLE and st is READING_HEAD:
            m.count_timeout("idle")
            self.writer.close(conn)
