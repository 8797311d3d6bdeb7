"""Live per-route statistics for /dashboard, on the conductor: the last 60 per-second deltas.

Owned by the conductor thread: it calls `tick` from its housekeeping once a second and
`json_bytes` when it answers /dashboard.json, so nothing here needs a lock. The sampler
reads only the `Metrics` object (histogram bucket counts, counters, gauge callbacks) and
keeps differences between two reads, so the per-request path is untouched. A tick walks
the request histograms and skips every label set whose count did not move, so an idle
route costs one comparison.

Memory is bounded: 60 entries, each holding one small record per route that had traffic
in that second, and routes are bounded by the app's routes (plus the few paths the
conductor answers itself and `<unrouted>`), as the histogram's labels are.

Quantiles (p50, p99, p99.9) are estimated from bucket counts exactly as Prometheus'
`histogram_quantile` does: find the bucket holding the rank `q * n`, assume its
observations are spread evenly between its bounds, interpolate; a rank in the +Inf bucket
reports the highest finite bound (10 s). So a figure is only as fine as the buckets around
it (e.g. anything in (10, 15] ms), and a p99.9 of one second with fewer than 1000 requests
is the bucket of the slowest request or two.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import add, sub
from typing import Any

from .metrics import DURATION_BUCKETS, Metrics
from .slo import slo_bound

WINDOW = 60  # entries kept: one per tick
TICK_NS = 1_000_000_000
NBUCKETS = len(DURATION_BUCKETS) + 1  # the last one is +Inf
QUANTILES = (("p50_ms", 0.5), ("p99_ms", 0.99), ("p999_ms", 0.999))
# Metrics counters shown per second, server-wide (Metrics attribute names).
COUNTERS = ("deadline_misses", "fallbacks", "dead_on_arrival", "late_dropped",
            "client_aborts", "handler_errors")
SHED_REASONS = ("codel", "limit", "deadline", "draining")
# JSON name -> (gauge registered on Metrics, scale to the JSON unit); read at each tick
# (an instant, not an average over the second) and kept as ints.
GAUGES = {
    "queue_depth": ("rtserve_queue_depth", 1.0),
    "busy_workers": ("rtserve_busy_workers", 1.0),
    "stuck_workers": ("rtserve_stuck_workers", 1.0),
    "workers": ("rtserve_workers", 1.0),
    "open_connections": ("rtserve_open_connections", 1.0),
    "cpu_inflight_us": ("rtserve_cpu_inflight_seconds", 1e6),
    "concurrency_limit": ("rtserve_concurrency_limit", 1.0),
    "relaxed": ("rtserve_relaxed", 1.0),  # 1: the CPU gate open, nothing at stake
}
# Paths the conductor answers itself, and the label of unrouted requests: listed after
# the app's routes and only while they have traffic.
SERVER_ROUTES = frozenset(
    {"/livez", "/readyz", "/metrics", "/dashboard", "/dashboard.json", "<unrouted>"}
)
QUANTILE_METHOD = (
    "histogram_quantile: linear interpolation inside the bucket that holds the rank; "
    "the +Inf bucket reports the highest finite bound"
)


def quantile(q: float, counts: Sequence[int], total: int) -> float | None:
    """The q-quantile in seconds of per-bucket `counts` (Prometheus histogram_quantile)."""
    if total <= 0:
        return None
    rank = q * total
    cum = 0
    for i, c in enumerate(counts):
        before = cum
        cum += c
        if cum >= rank:
            if i >= len(DURATION_BUCKETS):
                return DURATION_BUCKETS[-1]
            lo = DURATION_BUCKETS[i - 1] if i else 0.0
            hi = DURATION_BUCKETS[i]
            return lo + (hi - lo) * (rank - before) / c
    return DURATION_BUCKETS[-1]  # counts summing to less than total: treat as +Inf


@dataclass(slots=True)
class RouteSecond:
    """One route's requests in one tick: bucket deltas (per bucket, not cumulative)."""

    counts: list[int]
    n: int = 0
    n503: int = 0  # sheds (CoDel, limit, draining) answer 503
    n504: int = 0  # a late or dead-on-arrival request with no fallback
    fallbacks: int = 0
    row: tuple = ()  # the JSON figures of this second, set once at the tick (see ROW)


# The per-second figures of a route, computed once when the second is sampled, as ints:
# json.dumps writes ints several times faster than floats, and the conductor is the one
# waiting while it does. Quantiles are in microseconds; `within` is a count (of `requests`).
ROW = ("requests", "within", "fallbacks", "sheds", "timeouts", "p50_us", "p99_us", "p999_us")
_EMPTY_ROW = (0, 0, 0, 0, 0, None, None, None)


@dataclass(slots=True)
class Second:
    """What changed between two ticks, and the gauges read at the second one."""

    seq: int
    wall: float  # time.time() at the tick
    dt: float  # seconds this entry covers
    routes: dict[str, RouteSecond]
    counters: tuple[int, ...]  # deltas, in COUNTERS order
    sheds: tuple[int, ...]  # deltas, in SHED_REASONS order
    gauges: tuple[int, ...]  # values, in GAUGES order


class LiveStats:
    """The sampler and its ring. `routes` maps the app's route names to their deadline
    in seconds (None: no deadline), as `slo.route_deadlines` gives them."""

    def __init__(
        self,
        metrics: Metrics,
        routes: dict[str, float | None],
        now_ns: int,
        cpu_cap_ms: float = 0.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.routes = dict(routes)
        self.cpu_cap_ms = cpu_cap_ms
        self._wall = wall
        self.due = now_ns + TICK_NS  # monotonic ns of the next tick (the conductor's timer)
        self.seq = 0
        self.ring: deque[Second] = deque(maxlen=WINDOW)
        self.started = wall()
        self._last_ns = now_ns
        self._seen: dict[tuple, tuple[int, list[int]]] = {}  # label set -> (count, counts)
        # route -> the ring's sums: bucket counts, then n, n503, n504, fallbacks
        self._window: dict[str, list[int]] = {}
        self._prev_counters = self._counters()
        self._prev_sheds = self._sheds()
        self._prev_fallbacks: dict[str, int] = dict(metrics.route_fallbacks)
        self._json_seq = -1
        self._json = b""
        self._slo_index = {
            name: _bucket_index(slo_bound(d)) for name, d in self.routes.items() if d
        }

    # ---- the tick (conductor, once a second) -----------------------------------------

    def tick(self, now_ns: int) -> None:
        """Take one per-second sample: deltas since the previous tick, gauges now."""
        m = self.metrics
        routes: dict[str, RouteSecond] = {}
        seen = self._seen
        for key, h in m.requests.items():
            n = h.count
            prev = seen.get(key)
            if prev is not None and prev[0] == n:
                continue  # no request of this label set since the last tick
            counts = list(h.counts)
            if prev is None:
                delta, dn = counts, n
            else:
                delta, dn = list(map(sub, counts, prev[1])), n - prev[0]
            seen[key] = (n, counts)
            _method, name, status = key
            rs = routes.get(name)
            if rs is None:
                rs = routes[name] = RouteSecond(delta)
            else:
                rs.counts = list(map(add, rs.counts, delta))
            rs.n += dn
            if status == 503:
                rs.n503 += dn
            elif status == 504:
                rs.n504 += dn
        prev_fb = self._prev_fallbacks
        for name, n in m.route_fallbacks.items():
            d = n - prev_fb.get(name, 0)
            if d:
                prev_fb[name] = n
                rs = routes.get(name)
                if rs is None:  # (a fallback is recorded when its last byte is out)
                    rs = routes[name] = RouteSecond([0] * NBUCKETS)
                rs.fallbacks += d
        for name, rs in routes.items():
            rs.row = self._row(name, rs)
        counters, sheds = self._counters(), self._sheds()
        self.seq += 1
        ring = self.ring
        if len(ring) == WINDOW:
            self._add_window(ring[0], -1)  # about to fall off the window
        sec = Second(
            seq=self.seq,
            wall=self._wall(),
            dt=max(now_ns - self._last_ns, 1) / 1e9,
            routes=routes,
            counters=tuple(a - b for a, b in zip(counters, self._prev_counters, strict=True)),
            sheds=tuple(a - b for a, b in zip(sheds, self._prev_sheds, strict=True)),
            gauges=self._gauges(),
        )
        ring.append(sec)
        self._add_window(sec, 1)
        self._prev_counters, self._prev_sheds = counters, sheds
        self._last_ns = now_ns
        self.due = now_ns + TICK_NS

    def _row(self, name: str, rs: RouteSecond) -> tuple:
        slo_i = self._slo_index.get(name)
        counts, n = rs.counts, rs.n
        within = sum(counts[: slo_i + 1]) if slo_i is not None else 0
        return (n, within, rs.fallbacks, rs.n503, rs.n504,
                *(_us(quantile(q, counts, n)) for _key, q in QUANTILES))

    def _add_window(self, sec: Second, sign: int) -> None:
        win = self._window
        op = add if sign > 0 else sub
        for name, rs in sec.routes.items():
            w = win.get(name) or [0] * (NBUCKETS + 4)
            win[name] = list(map(op, w, (*rs.counts, rs.n, rs.n503, rs.n504, rs.fallbacks)))

    def _counters(self) -> tuple[int, ...]:
        m = self.metrics
        return tuple(getattr(m, name) for name in COUNTERS)

    def _sheds(self) -> tuple[int, ...]:
        shed = self.metrics.shed
        return tuple(shed.get(r, 0) for r in SHED_REASONS)

    def _gauges(self) -> tuple[int, ...]:
        reads = {name: read for name, _help, read in self.metrics.gauges}
        out = []
        for gname, scale in GAUGES.values():
            read = reads.get(gname)
            out.append(round(float(read()) * scale) if read is not None else 0)
        return tuple(out)

    # ---- the JSON (conductor, when /dashboard.json is asked for) -----------------------

    def json_bytes(self) -> bytes:
        """`snapshot()` as JSON, rebuilt at most once per tick however many pages poll."""
        if self._json_seq != self.seq:
            self._json = json.dumps(self.snapshot(), separators=(",", ":"),
                                    allow_nan=False).encode("utf-8")
            self._json_seq = self.seq
        return self._json

    def snapshot(self) -> dict[str, Any]:
        """Everything the page draws: per-second series over the window, and totals.

        Per-second series are counts (divide by `dt` for a rate) and microseconds, one
        value per entry of `t`; `window` figures cover the whole ring (`span_s`).
        """
        secs = list(self.ring)
        span = sum(s.dt for s in secs)
        server: dict[str, Any] = {}
        for i, name in enumerate(GAUGES):
            server[name] = [s.gauges[i] for s in secs]
        for i, name in enumerate(COUNTERS):
            server[name] = [s.counters[i] for s in secs]
            server[name + "_total"] = sum(server[name])
        server["shed"] = {r: [s.sheds[i] for s in secs] for i, r in enumerate(SHED_REASONS)}
        server["shed_total"] = {r: sum(v) for r, v in server["shed"].items()}
        active = {name for name, w in self._window.items() if w[NBUCKETS] or w[NBUCKETS + 3]}
        names = [n for n in self.routes if n not in SERVER_ROUTES]
        names += sorted(n for n in active - set(names) if n not in SERVER_ROUTES)
        names += sorted(n for n in active if n in SERVER_ROUTES)
        return {
            "version": 1,
            "pid": os.getpid(),
            "started": round(self.started, 3),
            "seq": self.seq,
            "interval_s": TICK_NS / 1e9,
            "window": WINDOW,
            "span_s": round(span, 3),
            "t": [round(s.wall, 3) for s in secs],
            "dt": [round(s.dt, 4) for s in secs],
            "cpu_cap_ms": self.cpu_cap_ms,
            "quantiles": QUANTILE_METHOD,
            "server": server,
            "routes": [self._route_json(name, secs, span) for name in names],
        }

    def _route_json(self, name: str, secs: list[Second], span: float) -> dict[str, Any]:
        deadline = self.routes.get(name)
        slo_i = self._slo_index.get(name)
        rows = []
        for s in secs:
            rs = s.routes.get(name)
            rows.append(rs.row if rs is not None else _EMPTY_ROW)
        per_s: dict[str, Any] = {key: [r[i] for r in rows] for i, key in enumerate(ROW)}
        if slo_i is None:
            per_s["within"] = None
        w = self._window.get(name) or [0] * (NBUCKETS + 4)
        counts = w[:NBUCKETS]
        n, n503, n504, fb = w[NBUCKETS:]
        rate = (lambda v: round(v / span, 4)) if span else (lambda v: 0.0)
        within = sum(counts[: slo_i + 1]) if slo_i is not None else None
        window: dict[str, Any] = {
            "requests": n, "rate": rate(n),
            "fallbacks": fb, "fallbacks_per_s": rate(fb),
            "sheds": n503, "sheds_per_s": rate(n503),
            "timeouts": n504, "timeouts_per_s": rate(n504),
            "within_count": within,
            "within": round(within / n, 6) if within is not None and n else None,
        }
        for key, q in QUANTILES:
            window[key] = _ms(quantile(q, counts, n))
        bound = slo_bound(deadline) if deadline else None
        return {
            "route": name,
            "server": name in SERVER_ROUTES,
            "deadline_ms": round(deadline * 1000, 4) if deadline else None,
            "slo_ms": round(bound * 1000, 4) if bound is not None else None,
            "per_s": per_s,
            "window": window,
        }


def _bucket_index(bound: float | None) -> int | None:
    return None if bound is None else DURATION_BUCKETS.index(bound)


def _us(v: float | None) -> int | None:
    return None if v is None else round(v * 1e6)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 4)
