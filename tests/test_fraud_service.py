"""FraudService.decide on its own: which path decides, given the time left.

The clock is a fake one that the fake store advances, so each case is exact: no sleeps,
no timing bounds.
"""

from __future__ import annotations

import pytest
from examples.fraud.memstore import InProcessStore
from examples.fraud.model import Model
from examples.fraud.service import FraudService, Settings
from examples.fraud.store import StoreError, StoreTimeout
from examples.fraud.transaction import from_mapping

from tests.fraud_support import tx_body

SETTINGS = Settings(deadline_ms=20, reserve_ms=2, min_fetch_ms=0.3, fetch_timeout_ms=5)


class Clock:
    def __init__(self, left: float) -> None:
        self.left = left

    def remaining(self) -> float:
        return self.left


class FakeStore:
    """Wraps the in-process store; can spend fake time or fail, and records timeouts."""

    def __init__(self, clock: Clock, spend: float = 0.0, fail: Exception | None = None):
        self.inner = InProcessStore()
        self.clock = clock
        self.spend = spend
        self.fail = fail
        self.timeouts: list[float] = []
        self.outcomes: list[bool] = []

    def fetch(self, tx, timeout):
        self.timeouts.append(timeout)
        self.clock.left -= self.spend
        if self.fail:
            raise self.fail
        return self.inner.fetch(tx, timeout)

    def record_outcome(self, tx, declined, timeout):
        self.outcomes.append(declined)

    def close(self):
        pass


@pytest.fixture(scope="module")
def model() -> Model:
    m = Model()
    m.latency.value = 0.001  # pin the measured p99 to 1 ms for exact budgets
    m.latency.add = lambda s: None  # type: ignore[method-assign]
    return m


def decide(model: Model, left: float, **store_kw):
    clock = Clock(left)
    store = FakeStore(clock, **store_kw)
    out = FraudService(store, model, SETTINGS).decide(from_mapping(tx_body()), clock.remaining)
    return out, store


def test_with_time_to_spare_the_model_decides(model: Model) -> None:
    out, store = decide(model, 0.019)
    assert out.path == "model" and out.decision in ("approve", "review", "decline")
    assert 0.0 <= out.score <= 1.0
    assert store.timeouts == [pytest.approx(0.005)]  # fetch_timeout_ms
    assert store.outcomes == [out.decision == "decline"]


def test_the_fetch_timeout_shrinks_to_the_time_left(model: Model) -> None:
    _, store = decide(model, 0.007)
    # What the model (1 ms) and the reserve (2 ms) leave, under the 5 ms cap.
    assert store.timeouts == [pytest.approx(0.007 - 0.002 - 0.001)]


def test_too_little_time_skips_the_store_and_the_rules_decide(model: Model) -> None:
    out, store = decide(model, 0.0032)  # 3.2 - 2 - 1 = 0.2 ms < min_fetch 0.3 ms
    assert store.timeouts == [] and store.outcomes == []
    assert out.path == "rules" and out.reasons[0] == "no_time_for_features"
    assert out.decision == "approve"  # a 42.50 grocery purchase passes without history


def test_a_fetch_that_times_out_is_abandoned_and_the_rules_decide(model: Model) -> None:
    out, store = decide(model, 0.019, fail=StoreTimeout("paused"))
    assert out.path == "rules" and out.reasons[0] == "feature_timeout"
    assert store.outcomes == []  # nothing is known to have been recorded


def test_a_store_error_is_not_a_failed_request(model: Model) -> None:
    out, _ = decide(model, 0.019, fail=StoreError("connection refused"))
    assert out.path == "rules" and out.reasons[0] == "feature_store_error"


def test_a_slow_fetch_leaves_no_room_for_the_model(model: Model) -> None:
    out, store = decide(model, 0.0075, spend=0.005)  # 2.5 ms left: reserve + 0.5 ms
    assert out.path == "rules" and out.reasons[0] == "no_time_for_model"
    assert store.outcomes == [out.decision == "decline"]


def test_without_history_larger_or_risky_purchases_wait_for_review(model: Model) -> None:
    clock = Clock(0.001)
    svc = FraudService(FakeStore(clock), model, SETTINGS)
    big = svc.decide(from_mapping(tx_body(amount=900.0)), clock.remaining)
    risky = svc.decide(from_mapping(tx_body(mcc=6051, amount=20.0)), clock.remaining)
    assert big.decision == risky.decision == "review"
    assert "risky_mcc" in risky.reasons


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        Settings(fallback_decision="maybe")
    assert Settings.from_env({"FRAUD_DEADLINE_MS": "35"}).deadline_ms == 35
