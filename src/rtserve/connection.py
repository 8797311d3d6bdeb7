r"""One client connection's state machine: every state, every allowed move and its side effects.

Conductor thread only. h11's rule applies: whatever changes a connection's state lives in
this file, as one method per event, so the I/O code (reader.py, writer.py) asks for an event
and never assigns `state` itself.

```
HANDSHAKE (TLS only: a TLS connection starts here)
   | handshake done              \ refused (plain HTTP answered 400, or a TLS alert)
   v                              +--------------------------------------> CLOSING
           head parsed, body pending
READING_HEAD ---------------------> READING_BODY
   |   ^  \ request complete              | request complete
   |   |   +-------------+----------------+
   |   |                 v                v
   |   |              QUEUED ---------> RUNNING        (admission: wait, then a worker)
   |   |                 |  answered      | result      (answered without running: shed,
   |   |                 v  by conductor  v              deadline; a 400/404/health answer
   |   +------------- WRITING <-----------+              goes there from READING_* too)
   |   keep-alive        | close after the response
   |                     v
   +-----------------> CLOSING (lingering close: write side shut, input discarded)
   any state ------------------------------------------------> CLOSED
```

Besides `state`, a connection has two facts that are not steps of the exchange and so are
not states: `eof` (the client shut its write side; what it sent still counts) and
`keep_alive` (whether the exchange in flight ends with the connection open, decided when
its response is framed). Its write buffer (`out`) and body source (`body`: a worker's
`StreamChannel` or a `FileBody`) are data owned by writer.py; "a 100 Continue is still
going out while the body arrives" is READING_BODY with `out` set, and `continue_sent`
says the interim answer for the request in flight was already queued. The timer fields
are timers.py's. `tls` holds what a finished TLS handshake established (tls.TLSInfo) and
`tls_want` which readiness an SSL read or write is waiting for in the other direction
(tlsio.py's).

Workers see a Connection only as an opaque token handed back with their result;
`awaits(req_id)` tells whether a result is still wanted, so a late result never reaches
the next request or a client that reused the fd number.
"""

from __future__ import annotations

from _socket import socket
from enum import IntEnum
from typing import Any, NoReturn

from .errors import InvalidTransition
from .parser import CLOSED_PARSER, RequestParser
from .request import Request


class State(IntEnum):
    READING_HEAD = 0  # idle keep-alive, or part of a request head received
    READING_BODY = 1  # head parsed, body still arriving
    QUEUED = 2  # a complete request waits in admission's queue for a worker
    RUNNING = 3  # the request's handler runs on a worker
    WRITING = 4  # the response is being sent
    CLOSING = 5  # response sent, write side shut, discarding input until EOF (linger)
    CLOSED = 6
    # Last in number, first in life: the `state <= READING_BODY` tests of reader.py must
    # not take a handshake for reading.
    HANDSHAKE = 7  # TLS: the handshake is under way (tlsio.py); no HTTP byte read yet


S = State
TRANSITIONS: frozenset[tuple[State, State]] = frozenset(
    {
        (S.HANDSHAKE, S.READING_HEAD),
        (S.HANDSHAKE, S.CLOSING),  # refused: a plain-HTTP 400 or an alert, then linger
        (S.HANDSHAKE, S.CLOSED),
        (S.READING_HEAD, S.READING_BODY),
        (S.READING_HEAD, S.QUEUED),
        (S.READING_HEAD, S.RUNNING),
        (S.READING_HEAD, S.WRITING),  # answered by the conductor (400, 404, health, shed ...)
        (S.READING_HEAD, S.CLOSED),
        (S.READING_BODY, S.QUEUED),
        (S.READING_BODY, S.RUNNING),
        (S.READING_BODY, S.WRITING),
        (S.READING_BODY, S.CLOSED),
        (S.QUEUED, S.RUNNING),
        (S.QUEUED, S.WRITING),  # shed, or answered at its deadline without running
        (S.QUEUED, S.CLOSED),
        (S.RUNNING, S.WRITING),
        (S.RUNNING, S.CLOSED),
        (S.WRITING, S.READING_HEAD),
        (S.WRITING, S.CLOSING),
        (S.WRITING, S.CLOSED),
        (S.CLOSING, S.CLOSED),
    }
)

# The same table as plain ints (old * 8 + new): Enum members hash through a Python-level
# __hash__, which made every checked transition cost ~2k instructions on the hot path.
_ALLOWED: frozenset[int] = frozenset(int(a) * 8 + int(b) for a, b in TRANSITIONS)

READING_HEAD = State.READING_HEAD
READING_BODY = State.READING_BODY
QUEUED = State.QUEUED
RUNNING = State.RUNNING
WRITING = State.WRITING
CLOSING = State.CLOSING
CLOSED = State.CLOSED
HANDSHAKE = State.HANDSHAKE


# Timer kinds (what expiry means for the connection); see timers.py. The loop hands kinds
# up to T_IDLE to the reader (tlsio.TLSReader for T_HANDSHAKE), the rest to the writer.
T_NONE, T_HANDSHAKE, T_HEADER, T_BODY, T_IDLE, T_WRITE, T_LINGER = range(7)


class Connection:
    """Per-connection state. Every attribute is read and written by the conductor only."""

    __slots__ = (
        "sock",
        "fd",
        "addr",
        "parser",
        "state",
        "mask",
        "req_id",
        "request",
        "status",
        "keep_alive",
        "eof",
        "continue_sent",
        "out",
        "body",
        "req_start",
        "timer_at",
        "timer_kind",
        "heap_at",
        "unsent",
        "tls",
        "tls_want",
    )

    def __init__(self, sock: socket, addr: Any, parser: RequestParser,
                 handshake: bool = False) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.parser = parser
        self.state = HANDSHAKE if handshake else READING_HEAD
        self.mask = 0  # the epoll mask registered for fd
        self.req_id = 0  # id of the newest request; a completion must carry it to be used
        self.request: Request | None = None  # the request being answered
        self.status = 0  # status of the response being sent (the metrics label)
        self.keep_alive = True  # False: close once the response in flight is out
        self.eof = False  # the client shut its write side
        self.continue_sent = False  # a 100 Continue was queued for the request in flight
        self.out: memoryview | None = None  # bytes accepted for sending but not yet sent
        self.body: Any = None  # StreamChannel or FileBody still being sent
        self.req_start = 0  # ns of the recv that brought the current request's first byte
        self.timer_at = 0  # ns; 0 = no timer (timers.py)
        self.timer_kind = T_NONE
        self.heap_at = 0  # time of this connection's live timer-heap entry (timers.py)
        self.unsent = 0  # unacknowledged bytes in the send queue when T_WRITE was armed
        self.tls: Any = None  # tls.TLSInfo once the handshake is done (None: plain HTTP)
        self.tls_want = 0  # tlsio.py: an SSL call waiting for the other readiness (0: none)

    def _to(self, new: State) -> None:
        if self.state * 8 + new not in _ALLOWED:
            self._refuse(new)
        self.state = new

    def _refuse(self, new: State) -> NoReturn:
        raise InvalidTransition(f"{self.state.name} -> {new.name} ({self!r})")

    # ---- events, in the order a request meets them ------------------------------------
    # Those that run for every request (queue, run, respond, linger, closed) test their
    # edge against _ALLOWED inline: `_to`'s check without its call, which cost more.

    def handshake_done(self, tls: Any) -> None:
        """The TLS handshake finished: `tls` (a tls.TLSInfo) is what it established."""
        if self.state is not HANDSHAKE:  # WRITING -> READING_HEAD is reset()'s edge
            raise InvalidTransition(f"handshake_done in {self.state.name} ({self!r})")
        self._to(READING_HEAD)
        self.tls = tls
        self.timer_at = 0  # the handshake timer ends; the header timer takes over

    def body_pending(self) -> None:
        """The head is parsed and its body is still arriving."""
        if self.state is not READING_BODY:
            self._to(READING_BODY)

    def begin(self, request: Request) -> int:
        """A complete request was parsed: it becomes the one in flight. Returns its id.

        The state stays READING_* until admission decides (queue(), run() or respond()).
        """
        st = self.state
        if st is not READING_HEAD and st is not READING_BODY:
            raise InvalidTransition(f"begin in {st.name} ({self!r})")
        self.req_id += 1
        self.request = request
        self.continue_sent = False
        self.status = 0
        self.keep_alive = request.keep_alive
        self.timer_at = 0  # the head/body timer ends here; the deadline (if any) takes over
        return self.req_id

    def queue(self) -> None:
        """Admission parked the request in its queue."""
        if self.state * 8 + QUEUED not in _ALLOWED:
            self._refuse(QUEUED)
        self.state = QUEUED

    def run(self) -> None:
        """The request was handed to a worker."""
        if self.state * 8 + RUNNING not in _ALLOWED:
            self._refuse(RUNNING)
        self.state = RUNNING

    def awaits(self, req_id: int) -> bool:
        """Is request `req_id` still waiting for an answer (queued or on a worker)?"""
        st = self.state
        return self.req_id == req_id and (st is RUNNING or st is QUEUED)

    def respond(self, status: int, keep_alive: bool) -> None:
        """An answer for the request in flight starts going out (or a parse error's)."""
        if self.state * 8 + WRITING not in _ALLOWED:
            self._refuse(WRITING)
        self.state = WRITING
        self.status = status
        if not keep_alive:
            self.keep_alive = False
        self.timer_at = 0

    def reset(self) -> None:
        """The response is out and the connection stays open: wait for the next request."""
        # The table's one edge into READING_HEAD besides handshake_done's, checked inline
        # (this runs per request, and must not let a handshake skip to reading).
        if self.state is not WRITING:
            raise InvalidTransition(f"{self.state.name} -> READING_HEAD ({self!r})")
        self.state = READING_HEAD
        self.request = None
        self.timer_at = 0

    def linger(self) -> None:
        """The response is out (or the handshake refused) and our write side is shut:
        discard input until EOF."""
        if self.state * 8 + CLOSING not in _ALLOWED:
            self._refuse(CLOSING)
        self.state = CLOSING
        self.request = None

    def closed(self) -> None:
        """The socket is closed (by writer.close only)."""
        if self.state * 8 + CLOSED not in _ALLOWED:
            self._refuse(CLOSED)
        self.state = CLOSED
        self.request = None
        self.out = None
        self.body = None
        # Stale timer entries keep a closed connection until they pop or are compacted:
        # let its parser (and the bytes it held) and its address go now, so the cyclic
        # collector does not walk them, nor count them towards its next collection.
        self.parser = CLOSED_PARSER
        self.addr = None

    def __repr__(self) -> str:
        return f"<Connection {self.addr} {self.state.name} req={self.req_id}>"
