"""The in-process store's bounds: cards, events and merchants are capped, old events go."""

from __future__ import annotations

import threading
import tracemalloc

from examples.fraud.features import HISTORY_S
from examples.fraud.memstore import InProcessStore
from examples.fraud.transaction import from_mapping

from tests.fraud_support import BASE_TS, tx_body


def tx(**kw):
    return from_mapping(tx_body(**kw))


def test_cards_beyond_the_cap_evict_the_least_recently_seen() -> None:
    store = InProcessStore(max_cards=100)
    for i in range(1000):
        store.fetch(tx(card_id=f"c{i}", timestamp=BASE_TS + i), 1.0)
    store.fetch(tx(card_id="c950", timestamp=BASE_TS + 2000), 1.0)  # seen again: kept
    for i in range(1000, 1099):
        store.fetch(tx(card_id=f"c{i}", timestamp=BASE_TS + 3000 + i), 1.0)
    cards, events, _ = store.sizes()
    assert cards == 100 and store.cards_evicted == 1099 - 100
    assert store.fetch(tx(card_id="c950", timestamp=BASE_TS + 9000), 1.0).cnt_24h == 2
    assert store.fetch(tx(card_id="c951", timestamp=BASE_TS + 9000), 1.0).cnt_24h == 0


def test_events_older_than_a_day_are_dropped_on_the_next_transaction() -> None:
    store = InProcessStore()
    for i in range(50):
        store.fetch(tx(timestamp=BASE_TS + i), 1.0)
    assert store.sizes()[1] == 50
    store.fetch(tx(timestamp=BASE_TS + HISTORY_S + 100), 1.0)
    assert store.sizes()[1] == 1


def test_total_events_are_capped() -> None:
    store = InProcessStore(max_cards=10_000, max_events=300)
    for i in range(2000):
        store.fetch(tx(card_id=f"c{i % 500}", timestamp=BASE_TS + i), 1.0)
    assert store.sizes()[1] <= 300


def test_merchants_are_capped() -> None:
    store = InProcessStore(max_merchants=20)
    for i in range(500):
        store.record_outcome(tx(merchant_id=f"m{i}", timestamp=BASE_TS), True, 1.0)
    assert store.sizes()[2] == 20


def _traced_bytes(n_cards: int) -> int:
    store = InProcessStore(max_cards=100, max_events=1000, max_merchants=50)
    tracemalloc.start()
    try:
        for i in range(n_cards):
            t = tx(card_id=f"card-{i:07d}", merchant_id=f"m{i % 80}", timestamp=BASE_TS + 10 * i)
            store.fetch(t, 1.0)
            store.record_outcome(t, False, 1.0)
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_memory_stops_growing_at_the_caps() -> None:
    """Four times the cards cost about the same memory once every cap is reached (after
    7,200 s of timestamps each merchant also holds its full two hours of buckets)."""
    small, large = _traced_bytes(1_500), _traced_bytes(6_000)
    assert large < small * 1.3, (small, large)


def test_concurrent_fetches_lose_no_event() -> None:
    store = InProcessStore()
    barrier = threading.Barrier(4)

    def run(k: int) -> None:
        barrier.wait()
        for i in range(500):
            store.fetch(tx(card_id="shared", timestamp=BASE_TS + k * 1000 + i), 1.0)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.sizes()[1] == min(2000, 256)
    assert store.fetch(tx(card_id="other", timestamp=BASE_TS), 1.0).cnt_24h == 0
