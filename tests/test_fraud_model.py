"""The shipped model and the simulator it was trained on."""

from __future__ import annotations

import json

from examples.fraud.features import FEATURE_NAMES
from examples.fraud.model import HERE, LatencyEstimate, Model
from examples.fraud.simulate import Simulator


def test_the_shipped_model_is_small_and_documents_its_quality() -> None:
    assert (HERE / "model.onnx").stat().st_size < 400 * 1024
    meta = json.loads((HERE / "model.json").read_text())
    assert meta["features"] == list(FEATURE_NAMES)
    assert 0 < meta["thresholds"]["review"] <= meta["thresholds"]["decline"] < 1
    held_out = meta["held_out"]
    assert held_out["decline"]["precision"] >= 0.8 and held_out["decline"]["recall"] >= 0.7
    assert held_out["review_or_decline"]["recall"] >= held_out["decline"]["recall"]


def test_the_model_ranks_a_card_testing_burst_above_a_grocery_purchase() -> None:
    m = Model(warmup=5)
    base = dict.fromkeys(FEATURE_NAMES, 0.0)
    grocery = base | {"amount": 42.0, "cnt_24h": 2, "amt_24h": 80.0, "seconds_since_last":
                      20000.0, "seconds_since_last_present": 20000.0, "amount_vs_avg_24h": 1.0,
                      "merchant_decline_rate": 0.01}
    testing = base | {"amount": 1.2, "channel": 1.0, "mcc_risk": 2.0, "cnt_1m": 2, "amt_1m": 2.5,
                      "cnt_1h": 7, "amt_1h": 9.0, "cnt_24h": 7, "amt_24h": 9.0,
                      "distinct_merchants_24h": 4, "seconds_since_last": 20.0,
                      "seconds_since_last_present": 86400.0, "new_merchant": 1.0,
                      "amount_vs_avg_24h": 0.9, "merchant_decline_rate": 0.3}
    p_grocery = m.score_row([grocery[n] for n in FEATURE_NAMES])
    p_testing = m.score_row([testing[n] for n in FEATURE_NAMES])
    assert m.decision(p_grocery) == "approve"
    assert m.decision(p_testing) == "decline" and p_testing > p_grocery
    assert m.latency.value > 0


def test_the_simulator_is_reproducible() -> None:
    a = Simulator(7, cards=40, days=3).transactions()
    b = Simulator(7, cards=40, days=3).transactions()
    assert a == b and len(a) > 100
    assert a != Simulator(8, cards=40, days=3).transactions()
    ts = [s.tx.timestamp for s in a]
    assert ts == sorted(ts)


def test_the_latency_estimate_is_a_high_quantile_of_recent_samples() -> None:
    est = LatencyEstimate(window=100, every=10)
    for i in range(100):
        est.add(0.001 if i != 50 else 0.5)
    assert est.value == 0.5  # the p99 of 100 samples is their largest
    for _ in range(100):
        est.add(0.002)
    assert est.value == 0.002  # the old samples left the window
