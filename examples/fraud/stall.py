"""The stall switch: make a chosen share of feature fetches stall for a chosen time.

It wraps any feature store, to rehearse what a slow store does to the deadline. Two modes:

- `abandon` (default): the fetch stalls, but like a client with a socket timeout it gives
  up when the caller's timeout runs out (StoreTimeout) and the rules decide in time;
- `block`: the fetch ignores its timeout (a call with no timeout, a lock, a C library
  that never returns) and sleeps the whole stall; only the server's fallback, sent by the
  conductor at the deadline, answers in time.

Set at start-up from FRAUD_STALL_SHARE, FRAUD_STALL_MS and FRAUD_STALL_MODE, and at run
time by `POST /admin/stall` (from loopback only). With Redis the real stall is
`CLIENT PAUSE <ms>` on the server; this switch needs no server at all.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping

from .features import Features
from .store import FeatureStore, StoreTimeout
from .transaction import Transaction

MODES = ("abandon", "block")
MAX_STALL_MS = 60_000.0


class StallSwitch:
    """Share (0-1), duration and mode of stalls; read by every fetch, set by the admin."""

    def __init__(self, share: float = 0.0, ms: float = 0.0, mode: str = "abandon") -> None:
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.share, self.ms, self.mode = 0.0, 0.0, "abandon"
        self.set(share, ms, mode)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StallSwitch:
        return cls(float(env.get("FRAUD_STALL_SHARE", "0")), float(env.get("FRAUD_STALL_MS", "0")),
                   env.get("FRAUD_STALL_MODE", "abandon"))

    def set(self, share: float, ms: float, mode: str = "abandon") -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError("share must be between 0 and 1")
        if not 0.0 <= ms <= MAX_STALL_MS:
            raise ValueError(f"ms must be between 0 and {MAX_STALL_MS:g}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        with self._lock:
            self.share, self.ms, self.mode = share, ms, mode

    def draw(self) -> tuple[float, str]:
        """(seconds this fetch stalls, mode): (0, mode) for most fetches."""
        share, ms, mode = self.share, self.ms, self.mode
        if share <= 0.0 or ms <= 0.0:
            return 0.0, mode
        with self._lock:
            hit = self._rng.random() < share
        return (ms / 1000.0 if hit else 0.0), mode

    def state(self) -> dict:
        return {"share": self.share, "ms": self.ms, "mode": self.mode}


class StallingStore:
    """A FeatureStore that stalls some fetches as its switch says, then asks `inner`."""

    def __init__(self, inner: FeatureStore, switch: StallSwitch) -> None:
        self.inner = inner
        self.switch = switch

    def fetch(self, tx: Transaction, timeout: float) -> Features:
        stall, mode = self.switch.draw()
        if stall:
            if mode == "abandon" and stall >= timeout:
                time.sleep(max(0.0, timeout))
                raise StoreTimeout(f"stalled {stall * 1000:g} ms (stall switch): abandoned")
            time.sleep(stall)
            timeout -= stall
        return self.inner.fetch(tx, max(timeout, 1e-6))

    def record_outcome(self, tx: Transaction, declined: bool, timeout: float) -> None:
        self.inner.record_outcome(tx, declined, timeout)

    def close(self) -> None:
        self.inner.close()
