"""Feature stores on their own: one test set, run against the in-process store and Redis.

The features are computed from what the store keeps, so these tests pin down what both
stores keep: the card's last 24 hours before each transaction (not the transaction
itself), at most MAX_EVENTS_PER_CARD of them, and the merchant's last hour of decisions.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import pytest
from examples.fraud.features import (
    DECLINE_PRIOR_RATE,
    DECLINE_PRIOR_WEIGHT,
    HISTORY_S,
    MAX_EVENTS_PER_CARD,
    Features,
)
from examples.fraud.memstore import InProcessStore
from examples.fraud.redisstore import RedisStore
from examples.fraud.store import FeatureStore
from examples.fraud.transaction import Transaction, from_mapping

from tests.fraud_support import BASE_TS, redis_server, tx_body  # noqa: F401

T = BASE_TS + 10 * 86_400  # "now" in these tests


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[FeatureStore]:
    if request.param == "memory":
        s: FeatureStore = InProcessStore()
    else:
        server = request.getfixturevalue("redis_server")
        s = RedisStore(server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield s
    s.close()


def tx(**kw) -> Transaction:
    return from_mapping(tx_body(**kw))


def fetch(store: FeatureStore, **kw) -> Features:
    return store.fetch(tx(**kw), 2.0)


def test_first_transaction_of_a_card_has_no_history(store: FeatureStore) -> None:
    f = fetch(store, timestamp=T, amount=80.0, mcc=6051, channel="online")
    assert (f.cnt_1m, f.cnt_1h, f.cnt_24h, f.amt_24h) == (0, 0, 0, 0)
    assert f.seconds_since_last == HISTORY_S and f.seconds_since_last_present == HISTORY_S
    assert (f.country_change, f.present_country_change, f.new_merchant) == (0, 0, 0)
    assert (f.amount, f.mcc_risk, f.channel, f.amount_vs_avg_24h) == (80.0, 2, 1, 1.0)
    assert f.hour == 0


def test_velocity_windows_count_and_sum_the_history_before_the_transaction(
    store: FeatureStore,
) -> None:
    # Out of every window (25 h ago), in 24 h only, in 1 h, in 1 min.
    for ago, amount, merchant, country in [(25 * 3600, 1000.0, "m-old", "US"),
                                           (5 * 3600, 10.0, "m-a", "FR"),
                                           (600, 20.0, "m-b", "DE"),
                                           (30, 30.0, "m-b", "DE")]:
        fetch(store, timestamp=T - ago, amount=amount, merchant_id=merchant, country=country)
    f = fetch(store, timestamp=T, amount=120.0, merchant_id="m-new", country="FR")
    assert (f.cnt_1m, f.amt_1m) == (1, 30.0)
    assert (f.cnt_1h, f.amt_1h) == (2, 50.0)
    assert (f.cnt_24h, f.amt_24h) == (3, 60.0)
    assert f.distinct_merchants_24h == 2 and f.distinct_countries_24h == 2
    assert f.seconds_since_last == 30
    assert f.country_change == 1  # last was DE, this is FR
    assert f.new_merchant == 1
    assert f.amount_vs_avg_24h == pytest.approx(120.0 / 20.0)
    # The transaction itself is now history for the next one.
    g = fetch(store, timestamp=T + 1, amount=1.0, merchant_id="m-new", country="FR")
    assert (g.cnt_1m, g.amt_1m, g.seconds_since_last) == (2, 150.0, 1)
    assert g.country_change == 0 and g.new_merchant == 0


def test_impossible_travel_looks_at_the_last_card_present_transaction(
    store: FeatureStore,
) -> None:
    fetch(store, timestamp=T - 1800, country="FR", channel="pos")
    fetch(store, timestamp=T - 600, country="US", channel="online")  # an online shop abroad
    f = fetch(store, timestamp=T, country="BR", channel="atm")
    assert f.present_country_change == 1 and f.seconds_since_last_present == 1800
    assert f.seconds_since_last == 600 and f.country_change == 1
    online = fetch(store, timestamp=T + 60, country="GB", channel="online")
    assert online.present_country_change == 0  # not card-present: not travel


def test_events_stamped_after_the_transaction_are_not_its_history(
    store: FeatureStore,
) -> None:
    fetch(store, timestamp=T + 3600, amount=500.0)
    f = fetch(store, timestamp=T, amount=5.0)  # arrives late, stamped an hour earlier
    assert f.cnt_24h == 0


def test_cards_are_separate(store: FeatureStore) -> None:
    fetch(store, card_id="c-one", timestamp=T - 10)
    assert fetch(store, card_id="c-two", timestamp=T).cnt_24h == 0
    assert fetch(store, card_id="c-one", timestamp=T).cnt_24h == 1


def test_history_is_capped_per_card(store: FeatureStore) -> None:
    n = MAX_EVENTS_PER_CARD + 40
    for i in range(n):
        fetch(store, timestamp=T - n + i, amount=1.0)
    f = fetch(store, timestamp=T, amount=1.0)
    assert f.cnt_24h == MAX_EVENTS_PER_CARD
    assert f.cnt_1m == 59  # the minute window is (T - 60, T]


def test_merchant_decline_rate_counts_the_last_hour_of_decisions(
    store: FeatureStore,
) -> None:
    def rate(n: int, d: int) -> float:
        return (d + DECLINE_PRIOR_RATE * DECLINE_PRIOR_WEIGHT) / (n + DECLINE_PRIOR_WEIGHT)

    assert fetch(store, merchant_id="m-x", timestamp=T).merchant_decline_rate == rate(0, 0)
    old = tx(merchant_id="m-x", timestamp=T - 2 * 3600)  # outside the hour
    for _ in range(5):
        store.record_outcome(old, True, 2.0)
    for i in range(4):
        store.record_outcome(tx(merchant_id="m-x", timestamp=T - 60 * i), i < 3, 2.0)
    store.record_outcome(tx(merchant_id="m-other", timestamp=T), True, 2.0)
    f = fetch(store, merchant_id="m-x", card_id="c-new", timestamp=T)
    assert f.merchant_decisions_1h == 4
    assert f.merchant_decline_rate == pytest.approx(rate(4, 3))


def test_both_stores_agree_on_a_simulated_stream(redis_server) -> None:  # noqa: F811
    """The same 2,000 simulated transactions give identical features in both stores."""
    from examples.fraud.simulate import Simulator

    stream = Simulator(5, cards=60, days=2).transactions()[:2000]
    mem = InProcessStore()
    red = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    try:
        for s in stream:
            a, b = mem.fetch(s.tx, 2.0), red.fetch(s.tx, 2.0)
            assert dataclasses.astuple(a) == pytest.approx(dataclasses.astuple(b)), s.tx
            mem.record_outcome(s.tx, s.fraud, 2.0)
            red.record_outcome(s.tx, s.fraud, 2.0)
    finally:
        red.close()
