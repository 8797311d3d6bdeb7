"""The feature-store interface: what the service asks of a store, and how a store fails.

A store does two things per transaction: `fetch` returns the features of a transaction
from the history before it and adds the transaction to that history (one round trip), and
`record_outcome` counts the decision against the merchant. Each call takes a timeout in
seconds, the caller's remaining budget; a call that cannot finish in it raises
StoreTimeout and leaves nothing half-done that a later call would misread.
"""

from __future__ import annotations

from typing import Protocol

from .features import Features
from .transaction import Transaction


class StoreError(Exception):
    """The store could not answer (down, refused, protocol error)."""


class StoreTimeout(StoreError):
    """The store did not answer within the caller's timeout; the call was abandoned."""


class FeatureStore(Protocol):
    """What the scoring service needs from a feature store."""

    def fetch(self, tx: Transaction, timeout: float) -> Features:
        """Features of `tx` from the history before it; records `tx` in that history."""
        ...

    def record_outcome(self, tx: Transaction, declined: bool, timeout: float) -> None:
        """Count the decision on `tx` in its merchant's recent decline rate."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...
