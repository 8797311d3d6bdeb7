"""The first demo's `POST /score`: a toy logistic model, kept for its clients and tests.

    curl -s -X POST localhost:8080/score -H 'X-Request-Deadline-Ms: 15' \\
         -d '{"amount": 129.5, "country": "FR", "card_country": "US", "hour": 3}'

`?stall_ms=N` makes the model stall, to watch the route's fallback `{"decision":
"review"}` go out at its 20 ms deadline. The reference service is `POST /authorize`.
"""

from __future__ import annotations

import math
import time

from rtserve import Request, Response

REVIEW = Response.json({"decision": "review"})

# A toy logistic model: weights for a handful of features.
WEIGHTS = {
    "bias": -4.0,
    "log_amount": 0.55,
    "foreign_card": 1.6,
    "night": 0.9,
    "velocity": 0.35,
}
# Optional, costlier features: only computed when the budget allows.
SLOW_FEATURE_COST_S = 0.004


def _features(tx: dict) -> dict[str, float]:
    amount = float(tx.get("amount", 0.0))
    return {
        "bias": 1.0,
        "log_amount": math.log1p(max(amount, 0.0)),
        "foreign_card": float(tx.get("country") != tx.get("card_country")),
        "night": float(int(tx.get("hour", 12)) < 6),
        "velocity": 0.0,
    }


def _velocity(tx: dict) -> float:
    """Stands in for a feature-store lookup (a few ms of I/O)."""
    time.sleep(SLOW_FEATURE_COST_S)
    return float(tx.get("recent_tx", 0))


def score_tx(tx: dict, remaining_s: float) -> tuple[float, bool]:
    """The fraud probability, and whether the slow features were used."""
    feats = _features(tx)
    full = remaining_s > 2 * SLOW_FEATURE_COST_S  # cut our own work short when late
    if full:
        feats["velocity"] = _velocity(tx)
    z = sum(WEIGHTS[k] * v for k, v in feats.items())
    return 1.0 / (1.0 + math.exp(-z)), full


def score(request: Request) -> Response:
    try:
        tx = request.json()
        if not isinstance(tx, dict):
            raise ValueError("a JSON object is expected")
    except ValueError as exc:
        return Response.json({"error": str(exc)}, 400)
    stall = request.query_param("stall_ms")
    if stall:
        time.sleep(min(float(stall), 1000.0) / 1000)
    p, full = score_tx(tx, request.remaining())
    decision = "decline" if p > 0.9 else "review" if p > 0.5 else "approve"
    return Response.json({"decision": decision, "score": round(p, 4), "full_model": full})
