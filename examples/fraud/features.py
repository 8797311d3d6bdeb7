"""The model's features and the one function that computes them from a card's history.

Both feature stores (in-process and Redis) hand this module the same inputs, the card's
events of the last 24 hours before the transaction and the merchant's recent decision
counts, so the two stores cannot disagree, and the trainer (which replays the simulator
through the in-process store) sees exactly what the service computes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields
from typing import NamedTuple

from .transaction import CHANNELS, Transaction

HISTORY_S = 86_400.0  # the longest card window; also the cap of seconds_since_last
WINDOWS_S = (60.0, 3_600.0, 86_400.0)
MAX_EVENTS_PER_CARD = 256  # counts saturate here: a card past it is anomalous anyway
MERCHANT_BUCKET_S = 600  # merchant decisions are counted in 10-minute buckets ...
MERCHANT_BUCKETS = 6  # ... over the last hour
DECLINE_PRIOR_RATE = 0.01  # a merchant with few decisions is pulled towards this rate
DECLINE_PRIOR_WEIGHT = 5.0

#: Merchant category codes by risk: 2 = high (quasi-cash, betting, wires, digital goods,
#: direct marketing), 1 = elevated (electronics, department stores, misc. retail).
MCC_RISK = {6051: 2, 7995: 2, 4829: 2, 5816: 2, 5967: 2, 5732: 1, 5311: 1, 5999: 1}


class CardEvent(NamedTuple):
    """One past transaction of a card, as both stores keep it."""

    ts: float
    amount: float
    merchant_id: str
    country: str
    present: bool  # card present (pos, atm): where the card physically was


class MerchantStats(NamedTuple):
    """A merchant's decisions and declines over the last hour."""

    decisions: int
    declines: int


@dataclass(frozen=True, slots=True)
class Features:
    """One transaction's feature vector (field order is the model's column order)."""

    amount: float
    mcc_risk: float
    channel: float
    hour: float
    cnt_1m: float
    amt_1m: float
    cnt_1h: float
    amt_1h: float
    cnt_24h: float
    amt_24h: float
    distinct_merchants_24h: float
    distinct_countries_24h: float
    seconds_since_last: float
    country_change: float
    seconds_since_last_present: float
    present_country_change: float
    new_merchant: float
    amount_vs_avg_24h: float
    merchant_decline_rate: float
    merchant_decisions_1h: float

    def row(self) -> list[float]:
        """The values in column order, for the model."""
        return list(astuple(self))


FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Features))


def merchant_buckets(ts: float) -> range:
    """The bucket numbers whose counts make up a merchant's last hour at `ts`."""
    b = int(ts // MERCHANT_BUCKET_S)
    return range(b - MERCHANT_BUCKETS + 1, b + 1)


def compute(tx: Transaction, history: Iterable[CardEvent], merchant: MerchantStats
            ) -> Features:
    """The features of `tx` given the card's events in (ts - 24 h, ts] and merchant counts.

    Events outside that interval are ignored, so a store may pass a little more than it.
    """
    ts = tx.timestamp
    since = ts - HISTORY_S
    c1 = c60 = c24 = 0
    a1 = a60 = a24 = 0.0
    merchants: set[str] = set()
    countries: set[str] = set()
    last: CardEvent | None = None
    last_present: CardEvent | None = None
    m_ago, h_ago = ts - WINDOWS_S[0], ts - WINDOWS_S[1]
    for e in history:
        ets = e.ts
        if not since < ets <= ts:
            continue
        c24 += 1
        a24 += e.amount
        if ets > h_ago:
            c60 += 1
            a60 += e.amount
            if ets > m_ago:
                c1 += 1
                a1 += e.amount
        merchants.add(e.merchant_id)
        countries.add(e.country)
        if last is None or ets >= last.ts:
            last = e
        if e.present and (last_present is None or ets >= last_present.ts):
            last_present = e
    decisions, declines = merchant
    present = tx.channel != "online"
    return Features(
        amount=tx.amount,
        mcc_risk=float(MCC_RISK.get(tx.mcc, 0)),
        channel=float(CHANNELS.index(tx.channel)),
        hour=float(int(ts // 3600) % 24),
        cnt_1m=float(c1),
        amt_1m=a1,
        cnt_1h=float(c60),
        amt_1h=a60,
        cnt_24h=float(c24),
        amt_24h=a24,
        distinct_merchants_24h=float(len(merchants)),
        distinct_countries_24h=float(len(countries)),
        seconds_since_last=HISTORY_S if last is None else ts - last.ts,
        country_change=float(last is not None and last.country != tx.country),
        # Impossible travel: the card was physically in another country shortly before.
        seconds_since_last_present=HISTORY_S if last_present is None else ts - last_present.ts,
        present_country_change=float(present and last_present is not None
                                     and last_present.country != tx.country),
        new_merchant=float(bool(c24) and tx.merchant_id not in merchants),
        amount_vs_avg_24h=tx.amount / (a24 / c24) if c24 else 1.0,
        merchant_decline_rate=(declines + DECLINE_PRIOR_RATE * DECLINE_PRIOR_WEIGHT)
        / (decisions + DECLINE_PRIOR_WEIGHT),
        merchant_decisions_1h=float(decisions),
    )
