"""Each route's SLO line, computed once at start-up (main thread): its deadline, and the
duration bucket bound its "answered within the deadline" share is counted at.

The result feeds `rtserve_route_deadline_seconds` in /metrics (so Prometheus rules can
count "answered within the deadline" per route with one join) and the dashboard's
deadline lines and within-deadline figures.

Why a bound and not the deadline itself: a histogram only knows how many requests fell at
or below each bucket bound. The count at the largest bound <= the deadline is exact and
never flatters (a request counted there surely made it); for deadlines on a bound (10, 15,
20, 25, 30, 40, 50 ms ...) it is exactly "answered within the deadline". Interpolating
inside the bucket would be a guess, and a bad one: fallbacks all land just below the
deadline, the worst case for an even-spread assumption.
"""

from __future__ import annotations

from typing import Any

from .metrics import DURATION_BUCKETS


def slo_bound(deadline_s: float) -> float | None:
    """The largest duration bucket bound at or below `deadline_s` (None below the first)."""
    best = None
    for bound in DURATION_BUCKETS:
        if bound <= deadline_s * (1 + 1e-9):  # 20 ms given as 0.020000000000000004
            best = bound
    return best


def le_label(bound: float | None) -> str:
    """A bound formatted exactly as /metrics writes the `le` label of that bucket."""
    return "" if bound is None else str(bound)


def route_deadlines(app: Any, default_deadline_ms: float) -> dict[str, float | None]:
    """Route name -> deadline in seconds (the route's own, else the default; None = none).

    `app` is the dispatcher the Server runs (a native `App`, the WSGI adapter); one without
    a `routes()` method has no named routes to report.
    """
    routes = getattr(app, "routes", None)
    out: dict[str, float | None] = {}
    if routes is None:
        return out
    default_ns = int(default_deadline_ms * 1_000_000)
    for route in routes():
        ns = route.deadline_ns or default_ns
        out[route.name] = ns / 1e9 if ns else None
    return out


def export(metrics: Any, app: Any, default_deadline_ms: float) -> dict[str, float | None]:
    """Put the route deadlines into `metrics` (rtserve_route_deadline_seconds); return them."""
    deadlines = route_deadlines(app, default_deadline_ms)
    metrics.route_deadlines = metrics_table(deadlines)
    return deadlines


def metrics_table(deadlines: dict[str, float | None]) -> dict[str, tuple[float, str]]:
    """The `Metrics.route_deadlines` table: routes with a deadline -> (seconds, slo_le)."""
    return {
        name: (d, le_label(slo_bound(d))) for name, d in deadlines.items() if d is not None
    }
