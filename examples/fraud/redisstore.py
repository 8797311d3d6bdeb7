"""The Redis feature store: card history in sorted sets, merchant counts in hashes.

Layout (PREFIX defaults to `fraud:`):

    PREFIX c:<card_id>                 sorted set, score = timestamp,
                                       member = "ts|amount|merchant|country|present|nonce"
                                       trimmed to 24 h and MAX_EVENTS_PER_CARD; expires
                                       25 h after its last write
    PREFIX m:<merchant_id>:<bucket>    hash {n: decisions, d: declines} per 10 minutes;
                                       expires after 2 h

One transaction costs one round trip: a single pipeline reads the card's last 24 hours and
the merchant's last hour, adds the transaction, trims and sets the expiries. Decisions
(`record_outcome`) are not sent on their own: they wait in a bounded queue and go out at
the head of the next fetch's pipeline, so a decision never costs the request a round trip
and the next fetch already sees it. Every pipeline is bounded by the caller's timeout
(see resp.py); a timeout raises StoreTimeout and the pipeline's effects are unknown.
"""

from __future__ import annotations

import collections
import itertools
import uuid

from .features import (
    HISTORY_S,
    MAX_EVENTS_PER_CARD,
    CardEvent,
    Features,
    MerchantStats,
    compute,
    merchant_buckets,
)
from .resp import Client, RedisError, RedisReplyError, RedisTimeout
from .store import StoreError, StoreTimeout
from .transaction import Transaction

CARD_TTL_S = int(HISTORY_S) + 3600
MERCHANT_TTL_S = 7200
PENDING_MAX = 4096  # decisions waiting for the next pipeline; the oldest drop beyond it


class RedisStore:
    """A FeatureStore on Redis (a URL: redis://host:port/db or unix:///path.sock)."""

    def __init__(self, url: str, prefix: str = "fraud:") -> None:
        self.client = Client(url)
        self.prefix = prefix
        self._nonce = f"{uuid.uuid4().hex[:8]}.%d"
        self._seq = itertools.count()
        self._pending: collections.deque[list] = collections.deque(maxlen=PENDING_MAX)
        self.outcomes_dropped = 0

    def _mkey(self, merchant_id: str, bucket: int) -> str:
        return f"{self.prefix}m:{merchant_id}:{bucket}"

    def fetch(self, tx: Transaction, timeout: float) -> Features:
        key = f"{self.prefix}c:{tx.card_id}"
        ts = tx.timestamp
        member = (f"{ts!r}|{tx.amount!r}|{tx.merchant_id}|{tx.country}|"
                  f"{int(tx.channel != 'online')}|{self._nonce % next(self._seq)}")
        pending: list[list] = []
        while self._pending and len(pending) < 256:
            try:
                pending.append(self._pending.popleft())
            except IndexError:  # another thread took the last one
                break
        card: list[list] = [  # the first reply is the history: (ts - 24 h, ts]
            ["ZRANGEBYSCORE", key, f"({ts - HISTORY_S!r}", repr(ts)],
            ["ZADD", key, repr(ts), member],
            ["ZREMRANGEBYSCORE", key, "-inf", repr(ts - HISTORY_S)],
            ["ZREMRANGEBYRANK", key, 0, -(MAX_EVENTS_PER_CARD + 1)],
            ["EXPIRE", key, CARD_TTL_S],
        ]
        merchant: list[list] = [["HMGET", self._mkey(tx.merchant_id, b), "n", "d"]
                    for b in merchant_buckets(ts)]
        try:
            replies = self.client.execute([*pending, *card, *merchant], timeout)
        except RedisTimeout as exc:
            raise StoreTimeout(str(exc)) from None
        except RedisError as exc:
            raise StoreError(str(exc)) from None
        replies = replies[len(pending):]
        for r in replies:
            if isinstance(r, RedisReplyError):
                raise StoreError(f"redis refused a command: {r}")
        events = replies[0]
        if not isinstance(events, list):
            raise StoreError(f"redis answered ZRANGEBYSCORE with {events!r}")
        history = [_event(m) for m in events]
        n = d = 0
        for counts in replies[len(card):]:
            if not isinstance(counts, list):
                raise StoreError(f"redis answered HMGET with {counts!r}")
            n += int(counts[0] or 0)
            d += int(counts[1] or 0)
        return compute(tx, history, MerchantStats(n, d))

    def record_outcome(self, tx: Transaction, declined: bool, timeout: float) -> None:
        key = self._mkey(tx.merchant_id, merchant_buckets(tx.timestamp)[-1])
        if len(self._pending) + 3 > PENDING_MAX:
            self.outcomes_dropped += 1
        self._pending.append(["HINCRBY", key, "n", 1])
        if declined:
            self._pending.append(["HINCRBY", key, "d", 1])
        self._pending.append(["EXPIRE", key, MERCHANT_TTL_S])

    def flush(self, timeout: float) -> None:
        """Send the decisions still waiting (at shutdown, or in tests)."""
        pending = []
        while self._pending:
            pending.append(self._pending.popleft())
        if pending:
            try:
                self.client.execute(pending, timeout)
            except RedisError as exc:
                raise StoreError(str(exc)) from None

    def close(self) -> None:
        try:
            self.flush(0.5)
        except StoreError:
            pass
        self.client.close()


def _event(member: bytes) -> CardEvent:
    ts, amount, merchant, country, present, _ = member.decode().split("|")
    return CardEvent(float(ts), float(amount), merchant, country, present == "1")
