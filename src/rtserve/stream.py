"""The hand-off of a streamed response body from a producer to the conductor.

Both threads, labelled. A worker thread `put`s framed chunks and waits above the
high-water mark (backpressure lands on the worker, never on the conductor); the conductor
`take`s everything buffered when the socket has room. The conductor is woken only when it
asked for data and found none.

An event-loop producer (the ASGI adapter) must never block its thread: it `offer`s a chunk
instead, and when `offer` says the channel is above the high-water mark it awaits until
the channel calls its `producer_wake` (the conductor took the buffered bytes, or gave up).
A channel without `producer_wake` (a worker's) pays one attribute test per `take`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# What `offer` says (event-loop producers).
OFFER_OK = 0  # queued; go on
OFFER_FULL = 1  # queued, above the high-water mark: wait for producer_wake
OFFER_ABORTED = 2  # dropped: the conductor gave up on this response


class StreamChannel:
    """One streamed response body: worker side `put`/`finish`, conductor side `take`/`abort`."""

    __slots__ = (
        "_cond",
        "_chunks",
        "_size",
        "_high_water",
        "_reader_waiting",
        "_wake",
        "_producer_wake",
        "_producer_waiting",
        "done",
        "failed",
        "aborted",
    )

    def __init__(self, high_water: int, wake: Callable[[], None],
                 producer_wake: Callable[[], None] | None = None) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._chunks: list[bytes] = []
        self._size = 0
        self._high_water = high_water
        self._reader_waiting = False
        self._wake = wake
        # Event-loop producers only: called (on the conductor) once the producer may go on.
        self._producer_wake = producer_wake
        self._producer_waiting = False
        self.done = False  # the worker has produced everything (or failed)
        self.failed = False  # the body iterable raised: the response must not look complete
        self.aborted = False  # the conductor gave up (client gone, write stalled, shutdown)

    # ---- worker side ----------------------------------------------------------------

    def put(self, data: bytes) -> bool:
        """Queue a framed chunk; block while above the high-water mark. False once aborted."""
        cond = self._cond
        with cond:
            if self.aborted:
                return False
            self._chunks.append(data)
            self._size += len(data)
            wake = self._reader_waiting
            self._reader_waiting = False
        if wake:
            self._wake()
        if self._size > self._high_water:
            with cond:
                while self._size > self._high_water and not self.aborted:
                    cond.wait()
        return not self.aborted

    def offer(self, data: bytes) -> int:
        """Queue a framed chunk without blocking (event-loop producers).

        Returns OFFER_OK, OFFER_FULL (queued, but above the high-water mark: wait for
        `producer_wake` before the next chunk) or OFFER_ABORTED (dropped: the conductor
        gave up on this response).
        """
        with self._cond:
            if self.aborted:
                return OFFER_ABORTED
            self._chunks.append(data)
            self._size += len(data)
            wake = self._reader_waiting
            self._reader_waiting = False
            full = self._size > self._high_water
            if full:
                self._producer_waiting = True
        if wake:
            self._wake()
        return OFFER_FULL if full else OFFER_OK

    def finish(self, ok: bool = True) -> None:
        """No more chunks; `ok=False` when the body raised midway."""
        with self._cond:
            self.done = True
            self.failed = not ok
            wake = self._reader_waiting
            self._reader_waiting = False
        if wake:
            self._wake()

    # ---- conductor side -------------------------------------------------------------

    def take(self) -> bytes:
        """Everything buffered (b"" if nothing yet: the worker will wake the conductor)."""
        with self._cond:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._size = 0
                self._cond.notify()
                producer = self._producer_waiting
                self._producer_waiting = False
            else:
                if not self.done:
                    self._reader_waiting = True
                return b""
        if producer:
            producer_wake = self._producer_wake
            if producer_wake is not None:  # always set when a producer waits
                producer_wake()
        return data

    def abort(self) -> None:
        """Stop the producer: its next `put` returns False and a blocked `put` wakes; an
        event-loop producer is always told (it may be idle between chunks, not waiting)."""
        with self._cond:
            self.aborted = True
            self._chunks.clear()
            self._size = 0
            self._producer_waiting = False
            self._cond.notify_all()
        if self._producer_wake is not None:
            self._producer_wake()
