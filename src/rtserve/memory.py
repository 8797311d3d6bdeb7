"""glibc heap hygiene: give free heap memory back to the kernel when idle (conductor thread).

Memory the process frees stays in glibc's heaps until the allocator can give it back, and
it can only shrink a heap from its top: under the soak's mix the main (brk) heap holds
two to three times its live bytes as free chunks between live ones (docs/reliability.md,
"Soak", has the figures: fragmentation, not a leak). `malloc_trim(0)` returns the whole
free pages inside the heaps too (madvise), so RSS falls back towards the live heap.

`--malloc-trim-idle S` (default 10) calls it from the conductor's housekeeping tick once
the server has had no request in flight and none routed for S seconds: once per idle
period, never under load. A trim took 0.4-1.9 ms on the soak's heaps and runs while
nothing waits for the conductor; a request that arrives during it waits that long.

A no-op where the C library is not glibc (musl and macOS have no malloc_trim): `glibc()`
is None there and the trim is off.
"""

from __future__ import annotations

import ctypes
import platform
import time
from collections.abc import Callable
from typing import Any


def glibc() -> Any:
    """The process's glibc through ctypes, or None (another C library, or no ctypes)."""
    global _GLIBC
    if _GLIBC is _UNSET:
        lib: Any = None
        try:
            if platform.libc_ver()[0] == "glibc":
                lib = ctypes.CDLL(None)
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            lib = None
        _GLIBC = lib
    return _GLIBC


_UNSET: Any = object()
_GLIBC: Any = _UNSET


class IdleTrim:
    """Returns free heap memory to the kernel once per idle period (conductor thread).

    `on_tick(now, in_flight, seen)` is called from the housekeeping tick with the number
    of requests queued or running and the count of requests routed so far. The server is
    idle from the first tick that saw neither; `idle_ns` later the trim runs, once, and the
    next request starts a new period. `trim` is `malloc_trim`, or a stand-in in tests.
    """

    __slots__ = ("idle_ns", "trim", "trims", "last_ns", "max_ns", "ticks",
                 "_seen", "_idle_since", "_done")

    def __init__(self, idle_s: float, trim: Callable[[int], Any] | None = None) -> None:
        self.idle_ns = int(idle_s * 1e9)
        if trim is None:
            lib = glibc()
            trim = lib.malloc_trim if lib is not None and self.idle_ns > 0 else None
        self.trim = trim  # None: off (setting 0, or not glibc)
        self.trims = 0  # trims done (rtserve_malloc_trims_total)
        self.last_ns = 0  # how long the last one took
        self.max_ns = 0
        self.ticks = 0  # ticks seen (tests wait on this, not on time)
        self._seen = -1
        self._idle_since = 0
        self._done = False

    def on_tick(self, now: int, in_flight: int, seen: int) -> None:
        self.ticks += 1
        if self.trim is None:
            return
        if in_flight or seen != self._seen:
            self._seen = seen
            self._idle_since = 0
            self._done = False
            return
        if self._idle_since == 0:
            self._idle_since = now
        if not self._done and now - self._idle_since >= self.idle_ns:
            self._done = True
            t0 = time.perf_counter_ns()
            self.trim(0)
            took = time.perf_counter_ns() - t0
            self.trims += 1
            self.last_ns = took
            if took > self.max_ns:
                self.max_ns = took
