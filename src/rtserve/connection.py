r"""One client connection: a small state machine owned by the conductor thread.

```
READING_HEAD -> READING_BODY -> DISPATCHED -> WRITING -> READING_HEAD (keep-alive)
      \______________\_______________\___________\-----> CLOSING (linger) -> CLOSED
```
Workers never see a Connection's insides: they get it as an opaque token and hand it
back with their result, and the conductor checks `req_id` before using a result, so a
late result can never reach the next request or a client that reused the fd number.
"""

from __future__ import annotations

import socket
from enum import IntEnum
from typing import Any

from .parser import RequestParser
from .request import Request


class State(IntEnum):
    READING_HEAD = 0  # idle keep-alive, or part of a request head received
    READING_BODY = 1  # head parsed, body still arriving
    DISPATCHED = 2  # a complete request is queued or running on a worker
    WRITING = 3  # the response is being sent
    CLOSING = 4  # response sent, write side shut, discarding input until EOF (linger)
    CLOSED = 5


S = State
TRANSITIONS: frozenset[tuple[State, State]] = frozenset(
    {
        (S.READING_HEAD, S.READING_BODY),
        (S.READING_HEAD, S.DISPATCHED),
        (S.READING_HEAD, S.WRITING),  # an error answer (400, 408, 431 ...)
        (S.READING_HEAD, S.CLOSED),
        (S.READING_BODY, S.DISPATCHED),
        (S.READING_BODY, S.WRITING),
        (S.READING_BODY, S.CLOSED),
        (S.DISPATCHED, S.WRITING),
        (S.DISPATCHED, S.CLOSED),
        (S.WRITING, S.READING_HEAD),
        (S.WRITING, S.CLOSING),
        (S.WRITING, S.CLOSED),
        (S.CLOSING, S.CLOSED),
    }
)


# The same table as plain ints (old * 8 + new): Enum members hash through a Python-level
# __hash__, which made every checked transition cost ~2k instructions on the hot path.
_ALLOWED: frozenset[int] = frozenset(int(a) * 8 + int(b) for a, b in TRANSITIONS)


class InvalidTransition(RuntimeError):
    """A bug: the conductor tried a state change the table does not allow."""


# Timer kinds (what expiry means for the connection).
T_NONE, T_HEADER, T_BODY, T_IDLE, T_WRITE, T_LINGER = range(6)


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
        "out",
        "stream",
        "file",
        "close_after",
        "eof",
        "timer_at",
        "timer_kind",
        "heap_at",
        "req_start",
        "sent_continue",
        "running",
        "stuck",
    )

    def __init__(self, sock: socket.socket, addr: Any, parser: RequestParser) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.parser = parser
        self.state = State.READING_HEAD
        self.mask = 0
        self.req_id = 0  # id of the newest request; a completion must carry it to be used
        self.request: Request | None = None  # the request being answered
        self.out: memoryview | None = None  # bytes accepted for sending but not yet sent
        self.stream = None  # StreamChannel of a streamed response
        self.file = None  # FileBody being sent with sendfile
        self.close_after = False
        self.eof = False  # the client shut its write side
        self.timer_at = 0  # ns; 0 = no timer
        self.timer_kind = T_NONE
        self.heap_at = 0  # time of this connection's live entry in the timer heap
        self.req_start = 0  # ns of the recv that brought the current request's first byte
        self.sent_continue = False
        self.running = False  # the current request is on a worker (not queued)
        self.stuck = False  # a worker still runs this request after its deadline answer

    def to(self, new: State) -> None:
        """Move to `new`, refusing changes the transition table does not allow."""
        if self.state * 8 + new not in _ALLOWED:
            raise InvalidTransition(f"{self.state.name} -> {new.name}")
        self.state = new

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def __repr__(self) -> str:
        return f"<Connection {self.addr} {self.state.name} req={self.req_id}>"
