"""The training data: the simulator replayed through the in-process feature store.

Replaying through the store the service runs (not a separate pandas pipeline) means the
model is trained on exactly the features it is served. The merchants' decline counts need
past decisions: a stand-in for the system that ran before this model declines a fraud with
probability PAST_RECALL and a legitimate purchase with probability PAST_FALSE_DECLINE.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .memstore import InProcessStore
from .simulate import Simulator

PAST_RECALL = 0.6
PAST_FALSE_DECLINE = 0.005


@dataclass
class Dataset:
    """Feature rows in time order with their labels, fraud patterns and timestamps."""

    rows: list[list[float]]
    labels: list[int]
    patterns: list[str]
    timestamps: list[float]

    def split(self, *fractions: float) -> list[Dataset]:
        """Consecutive slices by time: split(0.7, 0.1) -> first 70%, next 10%, the rest."""
        n = len(self.rows)
        cuts = [0]
        for f in fractions:
            cuts.append(cuts[-1] + int(f * n))
        cuts.append(n)
        return [Dataset(self.rows[a:b], self.labels[a:b], self.patterns[a:b],
                        self.timestamps[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]


def build(seed: int = 13, cards: int = 4000, days: float = 30.0) -> Dataset:
    """Simulate, then compute every transaction's features as the service would."""
    sim = Simulator(seed, cards=cards, days=days)
    past = random.Random(seed + 1)
    store = InProcessStore(max_cards=cards + 1, max_events=cards * 256)
    ds = Dataset([], [], [], [])
    for s in sim.transactions():
        feats = store.fetch(s.tx, 1.0)
        declined = past.random() < (PAST_RECALL if s.fraud else PAST_FALSE_DECLINE)
        store.record_outcome(s.tx, declined, 1.0)
        ds.rows.append(feats.row())
        ds.labels.append(int(s.fraud))
        ds.patterns.append(s.pattern)
        ds.timestamps.append(s.tx.timestamp)
    return ds
