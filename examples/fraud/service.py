"""The scoring decision under a deadline, independent of the web framework.

For each transaction, in order, while watching the time left (`remaining()`, seconds to
the deadline):

1. fetch features, with a timeout of `fetch_timeout_ms` (5 ms: a store answers in well
   under 1 ms, so one that has not after 5 is stalled), or less when less is left after
   the model's measured p99 and the reserve (serialising, writing, the server's fallback
   margin); not at all if that is below `min_fetch_ms`. A fetch that times out is
   abandoned, and the rules still have most of the budget;
2. score with the model if its measured p99 still fits; otherwise the rules decide on the
   features; without features, the rules decide on the transaction alone;
3. count the decision in the merchant's decline rate.

The rtserve app and the FastAPI app both call `FraudService.decide`, so only the server
differs between them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from . import rules
from .model import Model
from .store import FeatureStore, StoreError, StoreTimeout
from .transaction import Transaction

_perf = time.perf_counter


@dataclass(frozen=True)
class Settings:
    """The service's knobs; `from_env` reads the FRAUD_* variables."""

    deadline_ms: float = 20.0  # the route's deadline (the client may shorten it)
    reserve_ms: float = 2.0  # left for serialising and writing, and the 1 ms server margin
    min_fetch_ms: float = 0.3  # a fetch with less time than this is not tried
    fetch_timeout_ms: float = 5.0  # the longest a fetch may take, time permitting
    fallback_decision: str = "review"  # what the conductor sends for a late handler

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            deadline_ms=float(env.get("FRAUD_DEADLINE_MS", cls.deadline_ms)),
            reserve_ms=float(env.get("FRAUD_RESERVE_MS", cls.reserve_ms)),
            min_fetch_ms=float(env.get("FRAUD_MIN_FETCH_MS", cls.min_fetch_ms)),
            fetch_timeout_ms=float(env.get("FRAUD_FETCH_TIMEOUT_MS", cls.fetch_timeout_ms)),
            fallback_decision=env.get("FRAUD_FALLBACK_DECISION", cls.fallback_decision),
        )

    def __post_init__(self) -> None:
        if self.deadline_ms <= 0 or self.fetch_timeout_ms <= 0:
            raise ValueError("FRAUD_DEADLINE_MS and FRAUD_FETCH_TIMEOUT_MS must be > 0")
        if self.reserve_ms < 0 or self.min_fetch_ms < 0:
            raise ValueError("FRAUD_RESERVE_MS and FRAUD_MIN_FETCH_MS must be >= 0")
        if self.fallback_decision not in ("approve", "review", "decline"):
            raise ValueError("FRAUD_FALLBACK_DECISION must be approve, review or decline")


@dataclass
class Outcome:
    """A decision and how it was reached (the timings are seconds)."""

    decision: str
    score: float
    reasons: list[str]
    path: str  # "model" | "rules"
    features_s: float = 0.0
    model_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def body(self) -> dict:
        return {"decision": self.decision, "score": self.score, "reasons": self.reasons,
                "path": self.path}


class FraudService:
    """Decides on transactions with a feature store, a model and the rules."""

    def __init__(self, store: FeatureStore, model: Model, settings: Settings | None = None
                 ) -> None:
        self.store = store
        self.model = model
        self.settings = settings or Settings.from_env(os.environ)
        self._reserve = self.settings.reserve_ms / 1000
        self._min_fetch = self.settings.min_fetch_ms / 1000
        self._fetch_timeout = self.settings.fetch_timeout_ms / 1000

    def fallback_body(self) -> dict:
        """The precomputed answer the server sends when the handler is late."""
        return {"decision": self.settings.fallback_decision, "score": None,
                "reasons": ["deadline"], "path": "fallback"}

    def decide(self, tx: Transaction, remaining: Callable[[], float]) -> Outcome:
        model_cost = self.model.latency.value
        t0 = _perf()
        budget = min(self._fetch_timeout, remaining() - self._reserve - model_cost)
        features = None
        why = ""
        if budget < self._min_fetch:
            why = "no_time_for_features"
        else:
            try:
                features = self.store.fetch(tx, budget)
            except StoreTimeout:
                why = "feature_timeout"
            except StoreError:
                why = "feature_store_error"
        t1 = _perf()
        if features is None:
            v = rules.decide_without_history(tx)
            out = Outcome(v.decision, v.score, [why, *v.reasons[1:]], "rules", t1 - t0)
        elif remaining() - self._reserve > self.model.latency.value:
            p = self.model.score(features)
            out = Outcome(self.model.decision(p), round(p, 6),
                          [r for r, _ in rules.reasons(features)], "model", t1 - t0,
                          _perf() - t1)
        else:
            v = rules.decide(features)
            out = Outcome(v.decision, v.score, ["no_time_for_model", *v.reasons], "rules",
                          t1 - t0)
        if features is not None:
            try:
                self.store.record_outcome(tx, out.decision == "decline",
                                          max(0.0, remaining() - self._reserve))
            except StoreError:
                pass  # a lost count costs the merchant rate one sample, not this answer
        return out
