"""The in-process feature store: per-card history and per-merchant counts in memory.

The default store, and the one the trainer replays the simulator through. Thread-safe
(one lock held for microseconds: copy or append, never compute under it). Bounded: each
card keeps at most MAX_EVENTS_PER_CARD events and none older than 24 hours before its
newest; at most `max_cards` cards and `max_events` events in all are kept (the least
recently seen card is dropped first), and at most `max_merchants` merchants, each with
an hour of 10-minute buckets. An event costs about 250 bytes, so the defaults bound the
card history near 125 MB.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque

from .features import (
    HISTORY_S,
    MAX_EVENTS_PER_CARD,
    CardEvent,
    Features,
    MerchantStats,
    compute,
    merchant_buckets,
)
from .transaction import Transaction


class InProcessStore:
    """A FeatureStore in this process's memory; `timeout` is never approached."""

    def __init__(self, max_cards: int = 100_000, max_events: int = 500_000,
                 max_merchants: int = 50_000) -> None:
        if min(max_cards, max_events, max_merchants) < 1:
            raise ValueError("max_cards, max_events and max_merchants must be >= 1")
        self.max_cards = max_cards
        self.max_events = max_events
        self.max_merchants = max_merchants
        self._events = 0  # events held over all cards
        self._lock = threading.Lock()
        self._cards: OrderedDict[str, deque[CardEvent]] = OrderedDict()
        self._merchants: OrderedDict[str, dict[int, list[int]]] = OrderedDict()
        self.cards_evicted = 0

    def fetch(self, tx: Transaction, timeout: float) -> Features:
        event = CardEvent(tx.timestamp, tx.amount, tx.merchant_id, tx.country,
                          tx.channel != "online")
        cards = self._cards
        with self._lock:
            events = cards.get(tx.card_id)
            if events is None:
                events = cards[tx.card_id] = deque(maxlen=MAX_EVENTS_PER_CARD)
            else:
                cards.move_to_end(tx.card_id)
            history = list(events)
            newest = max(tx.timestamp, history[-1].ts) if history else tx.timestamp
            if len(events) < MAX_EVENTS_PER_CARD:  # else append drops the oldest
                self._events += 1
            events.append(event)
            while events[0].ts <= newest - HISTORY_S:
                events.popleft()
                self._events -= 1
            while len(cards) > 1 and (len(cards) > self.max_cards
                                      or self._events > self.max_events):
                _, dropped = cards.popitem(last=False)
                self._events -= len(dropped)
                self.cards_evicted += 1
            merchant = self._merchant_stats(tx.merchant_id, tx.timestamp)
        return compute(tx, history, merchant)

    def record_outcome(self, tx: Transaction, declined: bool, timeout: float) -> None:
        bucket = merchant_buckets(tx.timestamp)[-1]
        with self._lock:
            buckets = self._merchants.get(tx.merchant_id)
            if buckets is None:
                buckets = self._merchants[tx.merchant_id] = {}
                if len(self._merchants) > self.max_merchants:
                    self._merchants.popitem(last=False)
            else:
                self._merchants.move_to_end(tx.merchant_id)
            counts = buckets.get(bucket)
            if counts is None:
                counts = buckets[bucket] = [0, 0]
                oldest = bucket - 2 * len(merchant_buckets(0))
                for b in [b for b in buckets if b <= oldest]:
                    del buckets[b]
            counts[0] += 1
            counts[1] += declined

    def _merchant_stats(self, merchant_id: str, ts: float) -> MerchantStats:
        buckets = self._merchants.get(merchant_id)
        if not buckets:
            return MerchantStats(0, 0)
        n = d = 0
        for b in merchant_buckets(ts):
            counts = buckets.get(b)
            if counts is not None:
                n += counts[0]
                d += counts[1]
        return MerchantStats(n, d)

    def sizes(self) -> tuple[int, int, int]:
        """(cards tracked, card events held, merchants tracked): what memory is spent on."""
        with self._lock:
            return len(self._cards), self._events, len(self._merchants)

    def close(self) -> None:
        with self._lock:
            self._cards.clear()
            self._merchants.clear()
            self._events = 0
