"""A seeded transaction simulator: cards with spending habits, and four fraud patterns.

The model is trained on its output (examples/fraud/train.py) and the load generators send
it (bench/fraud_load.py, bench/fraud_bench.py), so everything here is code, deterministic
for a seed (stdlib `random.Random`, no platform-dependent numerics).

Cards have a home country, a daily rate, a typical amount, favourite local and online
merchants, sometimes a trip abroad (an airline ticket, then shops in another country) or a
betting habit. Legitimate noise that looks like fraud is on purpose: online shops abroad,
trips, betting, a rare big purchase. A share of cards is compromised once, by one of:

- card testing: a burst of tiny online amounts seconds apart, often then a cash-out;
- account takeover: a burst of large online purchases at new merchants;
- impossible travel: card-present purchases in a far country minutes after one at home;
- risky MCC: large amounts at quasi-cash, betting or wire-transfer merchants.

    python -m examples.fraud.simulate --cards 2000 --days 2 --out tx.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from .transaction import Transaction

T0 = 1_704_067_200.0  # 2024-01-01T00:00:00Z
DAY = 86_400.0
HOME_COUNTRIES = {"FR": 5, "DE": 5, "GB": 4, "ES": 3, "IT": 3, "NL": 2, "BE": 1, "PL": 2,
                  "SE": 1, "US": 4}
FAR_COUNTRIES = ("BR", "NG", "TH", "VN", "ID", "MX", "UA", "PH")
CURRENCY = {"GB": "GBP", "US": "USD", "PL": "PLN", "SE": "SEK", "BR": "BRL", "NG": "NGN",
            "TH": "THB", "VN": "VND", "ID": "IDR", "MX": "MXN", "UA": "UAH", "PH": "PHP"}
# Card-present categories with their popularity, and online ones.
POS_MCCS = {5411: 8, 5812: 5, 5814: 4, 5541: 3, 5912: 2, 5311: 1, 5691: 1, 4111: 3,
            4121: 1, 5732: 1}
ONLINE_MCCS = {5999: 4, 5816: 2, 5732: 2, 5311: 2, 4511: 1, 7011: 1, 5967: 1, 4829: 1}
RISKY_MCCS = (6051, 7995, 4829)
HOUR_WEIGHTS = [1, 0.5, 0.3, 0.2, 0.2, 0.4, 1, 2, 3, 4, 4, 5, 6, 5, 4, 4, 5, 6, 6, 5, 4, 3,
                2, 1.5]
PATTERNS = {"card_testing": 3, "account_takeover": 3, "impossible_travel": 2, "risky_mcc": 2}


@dataclass(frozen=True, slots=True)
class Merchant:
    merchant_id: str
    mcc: int
    country: str
    online: bool


@dataclass(slots=True)
class Card:
    card_id: str
    home: str
    per_day: float
    median_amount: float
    local: list[Merchant]
    online: list[Merchant]
    online_share: float
    gambler: bool


@dataclass(frozen=True, slots=True)
class Simulated:
    """One simulated transaction with its ground truth."""

    tx: Transaction
    fraud: bool
    pattern: str  # "legit" or the fraud pattern


_K = TypeVar("_K")


def _pick(rng: random.Random, weights: Mapping[_K, float]) -> _K:
    """One key of `weights`, drawn with the weights as its odds."""
    return rng.choices(list(weights), list(weights.values()))[0]


def _poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


class Simulator:
    """A reproducible world of merchants and cards; `transactions()` plays it."""

    def __init__(self, seed: int = 13, cards: int = 4000, days: float = 30.0,
                 compromised_share: float = 0.12, merchants_per_country: int = 120) -> None:
        self.rng = rng = random.Random(seed)
        self.days = days
        self.compromised_share = compromised_share
        self.local: dict[str, list[Merchant]] = {}
        n = 0
        for country in (*HOME_COUNTRIES, *FAR_COUNTRIES):
            ms = []
            for _ in range(merchants_per_country):
                ms.append(Merchant(f"m{n:05d}", _pick(rng, POS_MCCS), country, False))
                n += 1
            self.local[country] = ms
        self.online: list[Merchant] = []
        for _ in range(600):
            country = rng.choice(list(HOME_COUNTRIES)) if rng.random() < 0.85 else \
                rng.choice(FAR_COUNTRIES)
            self.online.append(Merchant(f"m{n:05d}", _pick(rng, ONLINE_MCCS), country, True))
            n += 1
        self.risky = [Merchant(f"m{n + i:05d}", RISKY_MCCS[i % 3], rng.choice(FAR_COUNTRIES
                      if i % 2 else list(HOME_COUNTRIES)), True) for i in range(30)]
        n += 30
        # Fraudsters' favourites: small digital-goods shops (testing) and resellable goods.
        self.testing = [Merchant(f"m{n + i:05d}", (5816, 5999)[i % 2],
                                 rng.choice(list(HOME_COUNTRIES)), True) for i in range(25)]
        n += 25
        self.resale = [m for m in self.online if m.mcc in (5732, 5311, 5999)][:40]
        self.cards = [self._card(i) for i in range(cards)]

    def _card(self, i: int) -> Card:
        rng = self.rng
        home = _pick(rng, HOME_COUNTRIES)
        return Card(
            card_id=f"c{i:06d}",
            home=home,
            per_day=min(15.0, max(0.2, rng.lognormvariate(math.log(2.0), 0.6))),
            median_amount=min(400.0, max(5.0, rng.lognormvariate(math.log(35.0), 0.5))),
            local=rng.sample(self.local[home], rng.randint(8, 20)),
            online=rng.sample(self.online, rng.randint(3, 8)),
            online_share=rng.uniform(0.1, 0.5),
            gambler=rng.random() < 0.03,
        )

    # ---- one card's story -------------------------------------------------------------

    def _tx(self, card: Card, m: Merchant, amount: float, ts: float, channel: str | None = None
            ) -> Transaction:
        return Transaction(card.card_id, m.merchant_id, m.mcc, round(max(0.5, amount), 2),
                           CURRENCY.get(m.country, "EUR"), m.country,
                           channel or ("online" if m.online else "pos"), round(ts, 3))

    def _legit(self, card: Card) -> list[Simulated]:
        rng = self.rng
        out: list[Simulated] = []
        trip: tuple[float, float, str] | None = None
        if rng.random() < 0.3:  # one trip abroad during the period
            start = T0 + rng.uniform(0, self.days * DAY * 0.8)
            trip = (start, start + rng.uniform(2, 7) * DAY,
                    rng.choice([c for c in HOME_COUNTRIES if c != card.home]))
            ticket = rng.choice([m for m in self.online if m.mcc == 4511] or self.online)
            out.append(Simulated(self._tx(card, ticket, card.median_amount *
                                          rng.uniform(5, 15), start - rng.uniform(4, 48) * 3600),
                                 False, "legit"))
        for day in range(math.ceil(self.days)):
            for _ in range(_poisson(rng, card.per_day)):
                hour = rng.choices(range(24), HOUR_WEIGHTS)[0]
                ts = T0 + day * DAY + hour * 3600 + rng.uniform(0, 3600)
                amount = rng.lognormvariate(math.log(card.median_amount), 0.8)
                if rng.random() < 0.01:
                    amount *= rng.uniform(8, 20)  # the rare big purchase
                if card.gambler and rng.random() < 0.15:
                    m = rng.choice(self.risky)
                elif rng.random() < card.online_share:
                    m = rng.choice(card.online)
                elif trip and trip[0] + 3 * 3600 <= ts <= trip[1]:
                    m = rng.choice(self.local[trip[2]])
                else:
                    m = rng.choice(card.local)
                out.append(Simulated(self._tx(card, m, amount, ts), False, "legit"))
        return out

    def _fraud(self, card: Card, legit: list[Simulated]) -> list[Simulated]:
        rng = self.rng
        pattern = _pick(rng, PATTERNS)
        t = T0 + rng.uniform(DAY, self.days * DAY - 3600)
        out: list[Transaction] = []
        if pattern == "card_testing":
            for _ in range(rng.randint(4, 15)):
                t += rng.uniform(5, 60)
                out.append(self._tx(card, rng.choice(self.testing), rng.uniform(0.5, 4.99), t))
            if rng.random() < 0.6:
                for _ in range(rng.randint(1, 3)):
                    t += rng.uniform(60, 1200)
                    out.append(self._tx(card, rng.choice(self.resale + self.risky),
                                        rng.uniform(150, 2000), t))
        elif pattern == "account_takeover":
            for _ in range(rng.randint(3, 8)):
                t += rng.uniform(60, 600)
                m = rng.choice(self.resale) if rng.random() < 0.7 else rng.choice(self.online)
                out.append(self._tx(card, m, card.median_amount * rng.uniform(3, 15), t))
        elif pattern == "impossible_travel":
            home_pos = [s.tx for s in legit if s.tx.channel == "pos" and s.tx.country == card.home]
            if home_pos:
                t = rng.choice(home_pos).timestamp
            far = rng.choice(FAR_COUNTRIES)
            for _ in range(rng.randint(1, 3)):
                t += rng.uniform(300, 5400)
                m = rng.choice(self.local[far])
                channel = "atm" if rng.random() < 0.3 else "pos"
                out.append(self._tx(card, m, card.median_amount * rng.uniform(2, 8), t,
                                    channel))
        else:  # risky_mcc
            for _ in range(rng.randint(1, 3)):
                t += rng.uniform(120, 1800)
                amount = max(card.median_amount * rng.uniform(4, 20), rng.uniform(300, 3000))
                out.append(self._tx(card, rng.choice(self.risky), amount, t))
        return [Simulated(tx, True, pattern) for tx in out]

    def transactions(self) -> list[Simulated]:
        """Every transaction of every card, in timestamp order."""
        rng = self.rng
        out: list[Simulated] = []
        for card in self.cards:
            legit = self._legit(card)
            out.extend(legit)
            if rng.random() < self.compromised_share:
                out.extend(self._fraud(card, legit))
        out.sort(key=lambda s: (s.tx.timestamp, s.tx.card_id))
        return out


def bodies(seed: int, n: int) -> Iterator[bytes]:
    """At least `n` request bodies from a world sized for them, in timestamp order."""
    cards = max(50, n // 5)
    for s in Simulator(seed, cards=cards, days=2.0).transactions():
        yield json.dumps(s.tx.to_json(), separators=(",", ":")).encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write simulated transactions as JSON lines.")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--cards", type=int, default=2000)
    p.add_argument("--days", type=float, default=2.0)
    p.add_argument("--labels", action="store_true", help="add fraud and pattern fields")
    p.add_argument("--out", default="-")
    a = p.parse_args(argv)
    out = sys.stdout if a.out == "-" else open(a.out, "w")  # noqa: SIM115
    try:
        for s in Simulator(a.seed, cards=a.cards, days=a.days).transactions():
            obj = s.tx.to_json()
            if a.labels:
                obj.update(fraud=s.fraud, pattern=s.pattern)
            out.write(json.dumps(obj, separators=(",", ":")) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
