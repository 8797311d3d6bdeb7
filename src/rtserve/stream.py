"""The hand-off of a streamed response body from a worker to the conductor.

The worker `put`s framed chunks and waits above the high-water mark (backpressure lands
on the worker, never on the conductor); the conductor `take`s everything buffered when the
socket has room. The conductor is woken only when it asked for data and found none.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class StreamChannel:
    """One streamed response body: worker side `put`/`finish`, conductor side `take`/`abort`."""

    __slots__ = (
        "_cond",
        "_chunks",
        "_size",
        "_high_water",
        "_reader_waiting",
        "_wake",
        "done",
        "failed",
        "aborted",
    )

    def __init__(self, high_water: int, wake: Callable[[], None]) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._chunks: list[bytes] = []
        self._size = 0
        self._high_water = high_water
        self._reader_waiting = False
        self._wake = wake
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
                return data
            if not self.done:
                self._reader_waiting = True
            return b""

    def abort(self) -> None:
        """Stop the producer: its next `put` returns False and a blocked `put` wakes."""
        with self._cond:
            self.aborted = True
            self._chunks.clear()
            self._size = 0
            self._cond.notify_all()
