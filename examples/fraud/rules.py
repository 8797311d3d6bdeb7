"""Rules: the decision when the model does not fit the budget, and the reasons for any.

The rules are what a fraud team writes by hand: a few thresholds on the same features the
model sees. They decide alone when the model would not finish before the deadline or the
feature store did not answer (then only the transaction's own fields are known), and
their hits are the `reasons` of every answer, whichever path decided.
"""

from __future__ import annotations

from dataclasses import dataclass

from .features import MCC_RISK, Features
from .transaction import Transaction

DECLINE, REVIEW = "decline", "review"


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: str
    score: float
    reasons: list[str]


def reasons(f: Features) -> list[tuple[str, str]]:
    """(reason, what it asks for) for every rule the features trip."""
    hits = []
    if f.cnt_1h >= 4 and f.amt_1h / f.cnt_1h < 5.0:
        hits.append(("card_testing", DECLINE))
    if f.cnt_1m >= 3:
        hits.append(("velocity_1m", REVIEW))
    if f.present_country_change and f.seconds_since_last_present < 4 * 3600:
        hits.append(("impossible_travel", DECLINE))
    if f.mcc_risk >= 2 and f.amount >= 300:
        hits.append(("risky_mcc", REVIEW))
    if f.amount_vs_avg_24h >= 8 and f.amount >= 200:
        hits.append(("amount_spike", REVIEW))
    if f.new_merchant and f.cnt_1h >= 3 and f.amt_1h >= 300:
        hits.append(("burst_new_merchants", REVIEW))
    if f.merchant_decline_rate >= 0.3 and f.merchant_decisions_1h >= 5:
        hits.append(("merchant_declines", REVIEW))
    if f.amount >= 5000:
        hits.append(("high_amount", REVIEW))
    return hits


def decide(f: Features) -> Verdict:
    """The rules' decision on full features; the score is a rough share of rules tripped."""
    hits = reasons(f)
    asks = {a for _, a in hits}
    decision = DECLINE if DECLINE in asks else REVIEW if asks else "approve"
    score = min(0.99, 0.02 + 0.3 * sum(2 if a == DECLINE else 1 for _, a in hits))
    return Verdict(decision, round(score, 2), [r for r, _ in hits])


def decide_without_history(tx: Transaction) -> Verdict:
    """The decision from the transaction alone, when its features could not be fetched:
    small everyday purchases pass, anything larger or in a risky category waits for review."""
    risky = MCC_RISK.get(tx.mcc, 0) >= 2
    why = ["features_unavailable"]
    if risky:
        why.append("risky_mcc")
    if tx.amount >= 5000:
        why.append("high_amount")
    if tx.amount < 150 and not risky:
        return Verdict("approve", 0.05, why)
    return Verdict(REVIEW, 0.5, why)
