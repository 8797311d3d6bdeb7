"""Budgets, the CoDel queue and concurrency limits: admission decided on the conductor.

Everything here is called by the conductor thread only and costs a few attribute reads
per request; nothing blocks.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import BadRequest

BUDGET_HEADERS = frozenset(
    {"x-request-deadline-ms", "grpc-timeout", "x-envoy-expected-rq-timeout-ms"}
)
_PRECEDENCE = ("x-request-deadline-ms", "grpc-timeout", "x-envoy-expected-rq-timeout-ms")
_MS = re.compile(r"[0-9]{1,9}")
_GRPC = re.compile(r"([0-9]{1,8})([HMSmun])")
_GRPC_UNIT_NS = {
    "H": 3600 * 10**9,
    "M": 60 * 10**9,
    "S": 10**9,
    "m": 10**6,
    "u": 10**3,
    "n": 1,
}


def client_budget_ns(raw_headers: list[tuple[str, str]]) -> int | None:
    """The budget a client asked for, in ns, or None; a malformed budget header is a 400.

    Precedence: X-Request-Deadline-Ms, then grpc-timeout, then
    x-envoy-expected-rq-timeout-ms (the first present wins).
    """
    found: dict[str, str] | None = None
    for name, value in raw_headers:
        if name in BUDGET_HEADERS:
            if found is None:
                found = {}
            if name in found:
                raise BadRequest(f"duplicate {name} header")
            found[name] = value
    if found is None:
        return None
    for name in _PRECEDENCE:
        if name not in found:
            continue
        value = found[name]
        if name == "grpc-timeout":
            m = _GRPC.fullmatch(value)
            if m is None:
                raise BadRequest("malformed grpc-timeout header")
            budget = int(m.group(1)) * _GRPC_UNIT_NS[m.group(2)]
        else:
            if _MS.fullmatch(value) is None:
                raise BadRequest(f"malformed {name} header")
            budget = int(value) * 1_000_000
        # A zero budget is already spent: 1 ns keeps it a deadline (0 would mean "none"),
        # so the request is answered as dead on arrival instead of running unbounded.
        return budget or 1
    return None


#: How many CoDel intervals a request that may not jump the line (no deadline) can be
#: passed over under LIFO before it is served first (CoDelQueue).
PASSED_OVER_INTERVALS = 10


class CoDelQueue:
    """The request queue with Facebook's CoDel timeout and adaptive LIFO.

    A request may wait at most `interval` while the queue keeps emptying, but only
    `target` once it has not been empty for a whole interval (a standing queue); while a
    standing queue exists the newest request is served first, if `lifo_ok(newest)` agrees
    (the conductor lets only requests with a deadline jump the line), unless the oldest
    may not jump it and has waited `PASSED_OVER_INTERVALS` intervals (`queued_at(oldest)`;
    1 s at the default 100 ms): without that turn, a request with no deadline among ones
    with a deadline waited until the standing queue ended (4.5 s, the whole load, in one
    measured run). Ten intervals keep LIFO's order for any budget shorter than that.
    """

    __slots__ = ("_items", "items", "target_ns", "interval_ns", "last_empty_ns", "_lifo_ok",
                 "_queued_at")

    def __init__(
        self,
        target_ms: float,
        interval_ms: float,
        lifo_ok: Callable[[Any], Any] = lambda item: True,
        queued_at: Callable[[Any], int] | None = None,
    ) -> None:
        self._items: deque = deque()
        # The same deque, read-only for callers: `if queue.items` is a C-level truth test,
        # where `if queue` runs the Python-level __len__ (~300 instructions per check).
        self.items = self._items
        self.target_ns = int(target_ms * 1_000_000)
        self.interval_ns = int(interval_ms * 1_000_000)
        self.last_empty_ns = 0
        self._lifo_ok = lifo_ok
        self._queued_at = queued_at

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: Any, now: int) -> None:
        if not self._items:
            self.last_empty_ns = now
        self._items.append(item)

    def standing(self, now: int) -> bool:
        """True while the queue has not been empty for a whole interval."""
        return bool(self._items) and now - self.last_empty_ns > self.interval_ns

    def timeout_ns(self, now: int) -> int:
        """How long a request may wait right now (0 = CoDel off: unbounded)."""
        if not self.target_ns:
            return 0
        return self.target_ns if self.standing(now) else self.interval_ns

    def _lifo(self, now: int) -> bool:
        items = self._items
        if not (self.target_ns and now - self.last_empty_ns > self.interval_ns
                and self._lifo_ok(items[-1])):
            return False
        oldest = items[0]
        queued_at = self._queued_at
        # The oldest, if it may not jump the line and has been passed over long enough,
        # goes first.
        return (queued_at is None or bool(self._lifo_ok(oldest))
                or now - queued_at(oldest) <= PASSED_OVER_INTERVALS * self.interval_ns)

    def peek(self, now: int) -> Any:
        """The item `pop(now)` would return (the queue must not be empty)."""
        return self._items[-1] if self._lifo(now) else self._items[0]

    def pop(self, now: int) -> Any:
        """The next item: LIFO under a standing queue, FIFO otherwise."""
        items = self._items
        item = items.pop() if self._lifo(now) else items.popleft()
        if not items:
            self.last_empty_ns = now
        return item

    def oldest(self) -> Any:
        """The item that has waited longest (the left end in both FIFO and LIFO order)."""
        return self._items[0]

    def pop_oldest(self, now: int) -> Any:
        item = self._items.popleft()
        if not self._items:
            self.last_empty_ns = now
        return item

    def discard(self, item: Any, now: int) -> bool:
        """Remove a request answered while it waited (deadline, client gone); O(n).

        Without this, answered requests would linger until dequeued and inflate the queue
        depth, the admission count and CoDel's idea of a standing queue.
        """
        items = self._items
        try:
            items.remove(item)
        except ValueError:
            return False
        if not items:
            self.last_empty_ns = now
        return True


class ConcurrencyLimit:
    """A limit on queued + running requests: fixed, AIMD, or Netflix Gradient2."""

    def __init__(self, mode: str, fixed: int, floor: int) -> None:
        self.mode = mode
        self.floor = max(1, floor)
        self.ceiling = max(fixed, 1000) if fixed else 1000
        self.limit = float(fixed) if mode == "off" else float(max(fixed or 20, self.floor))
        self.enabled = mode != "off" or fixed > 0
        self._long_rtt = 0.0
        self._short_rtt = 0.0
        self._samples = 0

    def admits(self, inflight: int) -> bool:
        return not self.enabled or inflight < self.limit

    def on_sample(self, rtt_ns: int, inflight: int, dropped: bool) -> None:
        """Feed one finished request (its latency, or that it was dropped/late)."""
        if self.mode == "aimd":
            if dropped:
                self.limit = max(self.floor, self.limit * 0.9)
            elif inflight * 2 >= self.limit:
                self.limit = min(self.ceiling, self.limit + 1.0)
        elif self.mode == "gradient2":
            self._gradient2(rtt_ns, inflight, dropped)

    def _gradient2(self, rtt_ns: int, inflight: int, dropped: bool) -> None:
        if rtt_ns < 100_000 and not dropped:
            return
        rtt = float(rtt_ns)
        self._samples += 1
        self._short_rtt = rtt if self._short_rtt == 0 else self._short_rtt * 0.9 + rtt * 0.1
        if self._samples <= 10:
            self._long_rtt = (
                rtt if self._long_rtt == 0 else (self._long_rtt * (self._samples - 1) + rtt)
                / self._samples
            )
            return
        k = 2.0 / (600 + 1)
        self._long_rtt = self._long_rtt * (1 - k) + rtt * k
        if self._long_rtt / self._short_rtt > 2:
            self._long_rtt *= 0.95
        if inflight < self.limit / 2 and not dropped:
            return
        gradient = max(0.5, min(1.0, 1.5 * self._long_rtt / self._short_rtt))
        new = self.limit * gradient + 4
        new = self.limit * 0.8 + new * 0.2
        self.limit = max(self.floor, min(self.ceiling, new))


RETRY_AFTER_MAX = 30

# Each dead-on-arrival decision shrinks the route's service-time estimate by this factor,
# so a route whose EWMA grew past every budget lets a probe request through after a few
# rejections instead of refusing it forever (a handler that never runs never updates it).
DOA_DECAY = 0.8


def retry_after_seconds(queue_len: int, service_ns: float, threads: int) -> int:
    """A Retry-After hint in whole seconds: the time to drain the present queue.

    At least 1 (the header counts whole seconds; 0 would invite an instant retry storm),
    at most RETRY_AFTER_MAX (a hint of minutes only parks clients that could come back).
    """
    if service_ns <= 0 or queue_len <= 0:
        return 1
    secs = math.ceil(queue_len * service_ns / max(1, threads) / 1e9)
    return min(RETRY_AFTER_MAX, max(1, secs))
