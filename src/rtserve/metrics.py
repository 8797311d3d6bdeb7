"""Counters, gauges and histograms, rendered as Prometheus text at /metrics.

Written by the conductor only (plain ints and lists, no locks). Names follow the
OpenTelemetry HTTP conventions where one exists (`http_server_request_duration_seconds`),
with sub-millisecond buckets because rtserve's budgets are counted in milliseconds.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import ClassVar

_INF = float("inf")  # a gauge at infinity renders as +Inf (Prometheus text format)

# Seconds. Sub-millisecond resolution where real-time budgets live, and a bound at each
# common deadline between 10 and 50 ms (15, 20, 30, 40), so "answered within the deadline"
# is an exact bucket count, not an interpolation, for those routes (see slo.py).
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02,
    0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BUCKETS_NS = tuple(int(b * 1e9) for b in DURATION_BUCKETS)
_BUCKETS_NS = BUCKETS_NS  # (the conductor inlines Histogram.observe with it)


class Histogram:
    """A fixed-bucket histogram in ns (bucket i counts values <= bound i; last is +Inf)."""

    __slots__ = ("counts", "sum_ns", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS_NS) + 1)
        self.sum_ns = 0
        self.count = 0

    def observe(self, ns: int) -> None:
        self.counts[bisect_left(_BUCKETS_NS, ns)] += 1
        self.sum_ns += ns
        self.count += 1


# Methods kept as a label value; any other token becomes "_OTHER" (OpenTelemetry's rule),
# so a client inventing methods cannot grow the number of series without bound.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """The server's measurements; gauges are read through callbacks at scrape time."""

    # ClassVar: one table of the class. mypyc (the compiled build) takes an unannotated
    # class-level value for an instance attribute's default, and warns on a dict there.
    COUNTERS: ClassVar[dict[str, tuple[str, str]]] = {
        "deadline_misses": ("rtserve_deadline_misses_total",
                            "Requests whose handler had not answered at the respond-by time."),
        "fallbacks": ("rtserve_fallbacks_sent_total",
                      "Fallback responses sent for late or dead-on-arrival requests."),
        "dead_on_arrival": ("rtserve_dead_on_arrival_total",
                            "Requests answered at once: budget below the route's service time."),
        "late_dropped": ("rtserve_late_results_dropped_total",
                         "Handler results that arrived after their request was answered or gone."),
        "client_aborts": ("rtserve_client_aborts_total",
                          "Connections the client closed or reset with a request unanswered."),
        "worker_deaths": ("rtserve_worker_deaths_total",
                          "Worker threads that died and were replaced."),
        "connections_accepted": ("rtserve_connections_accepted_total", "Connections accepted."),
        "accept_pauses": ("rtserve_accept_pauses_total",
                          "Times accepting paused (fd exhaustion or connection cap)."),
        "handoff_batched": ("rtserve_handoff_batched_total",
                            "Requests handed to the worker pool in one batch with others of "
                            "the same loop turn (one worker woken for the batch)."),
        "handoff_yields": ("rtserve_handoff_yields_total",
                           "Loop turns that accepted, handed a batch to the pool and then "
                           "yielded the CPU so that a worker ran it at once (--handoff-yield)."),
        "cpu_charges_lapsed": ("rtserve_cpu_charges_lapsed_total",
                               "CPU gate charges ended before their handler returned: it "
                               "had spent its charge of CPU and then waited "
                               "(--cpu-inflight-ms, no deadline at stake)."),
        "relaxations": ("rtserve_relaxations_total",
                        "Times the server relaxed: nothing at stake for --relax-after-s, "
                        "so the CPU gate opened and the GIL switch interval became "
                        "--relaxed-switch-interval-ms until the next stake."),
        "internal_errors": ("rtserve_internal_errors_total",
                            "Conductor bugs caught while handling one connection (that "
                            "connection was closed, the rest served on)."),
        "handler_errors": ("rtserve_handler_errors_total",
                           "Handlers that raised or returned an invalid response (answered "
                           "500, or a streamed body cut short)."),
    }

    def __init__(self) -> None:
        self.deadline_misses = 0
        self.fallbacks = 0
        self.dead_on_arrival = 0
        self.late_dropped = 0
        self.client_aborts = 0
        self.worker_deaths = 0
        self.connections_accepted = 0
        self.accept_pauses = 0
        self.handoff_batched = 0
        self.handoff_yields = 0
        self.cpu_charges_lapsed = 0
        self.relaxations = 0
        self.handler_errors = 0
        self.internal_errors = 0
        self.tls = False  # serving TLS: the TLS series are rendered (server.py sets it)
        self.tls_handshakes = 0
        self.tls_errors: dict[str, int] = {}
        self.shed: dict[str, int] = {}
        self.parse_errors: dict[int, int] = {}
        self.timeouts: dict[str, int] = {}
        self.route_fallbacks: dict[str, int] = {}  # route name -> fallbacks sent
        # route name -> (deadline in s, the bucket bound its SLO is judged at or ""),
        # filled at start-up from the app's routes (slo.route_deadlines).
        self.route_deadlines: dict[str, tuple[float, str]] = {}
        self.requests: dict[tuple[str, str, int], Histogram] = {}
        self.queue_wait = Histogram()
        self.timer_lag = Histogram()  # how late deadline timers fired after respond_by
        self.gauges: list[tuple[str, str, Callable[[], float]]] = []
        # Counters kept by another part (read at scrape time): name, help, label, read.
        self.families: list[tuple[str, str, str, Callable[[], dict[str, int]]]] = []

    # ---- conductor side (hot path: one dict lookup and a bisect) ---------------------

    def request_histogram(self, method: str, route: str, status: int) -> Histogram:
        """The duration histogram for one label set (unknown methods share `_OTHER`)."""
        if method not in KNOWN_METHODS:
            method = "_OTHER"
        key = (method, route, status)
        h = self.requests.get(key)
        if h is None:
            h = self.requests[key] = Histogram()
        return h

    def observe_request(self, method: str, route: str, status: int, ns: int) -> None:
        self.request_histogram(method, route, status).observe(ns)

    def count_fallback(self, route: str) -> None:
        """A fallback was sent for a request of `route` (the total and the route's count)."""
        self.fallbacks += 1
        self.route_fallbacks[route] = self.route_fallbacks.get(route, 0) + 1

    def count_shed(self, reason: str) -> None:
        self.shed[reason] = self.shed.get(reason, 0) + 1

    def count_parse_error(self, status: int) -> None:
        self.parse_errors[status] = self.parse_errors.get(status, 0) + 1

    def count_timeout(self, kind: str) -> None:
        self.timeouts[kind] = self.timeouts.get(kind, 0) + 1

    def count_tls_error(self, reason: str) -> None:
        self.tls_errors[reason] = self.tls_errors.get(reason, 0) + 1

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges.append((name, help, read))

    def labelled_counter(self, name: str, help: str, label: str,
                         read: Callable[[], dict[str, int]]) -> None:
        """A counter family kept elsewhere (e.g. on the ASGI loops), read at scrape time."""
        self.families.append((name, help, label, read))

    # ---- rendering ------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []
        name = "http_server_request_duration_seconds"
        out.append(f"# HELP {name} Time from the first request byte read to the last "
                   "response byte written.")
        out.append(f"# TYPE {name} histogram")
        for (method, route, status), h in sorted(self.requests.items()):
            labels = (f'http_request_method="{_escape(method)}",http_route="{_escape(route)}",'
                      f'http_response_status_code="{status}"')
            _histogram_lines(out, name, labels, h)
        name = "rtserve_queue_wait_seconds"
        out.append(f"# HELP {name} Time requests waited for a free worker.")
        out.append(f"# TYPE {name} histogram")
        _histogram_lines(out, name, "", self.queue_wait)
        name = "rtserve_deadline_timer_lag_seconds"
        out.append(f"# HELP {name} How late the conductor fired deadline timers after their "
                   "respond-by time (GIL hand-off, epoll rounding, loop work).")
        out.append(f"# TYPE {name} histogram")
        _histogram_lines(out, name, "", self.timer_lag)
        for attr, (mname, help) in self.COUNTERS.items():
            out.append(f"# HELP {mname} {help}")
            out.append(f"# TYPE {mname} counter")
            out.append(f"{mname} {getattr(self, attr)}")
        out.append("# HELP rtserve_route_fallbacks_total Fallback responses sent, by route.")
        out.append("# TYPE rtserve_route_fallbacks_total counter")
        for route, n in sorted(self.route_fallbacks.items()):
            out.append(f'rtserve_route_fallbacks_total{{http_route="{_escape(route)}"}} {n}')
        name = "rtserve_route_deadline_seconds"
        out.append(f"# HELP {name} The route's deadline; slo_le is the duration bucket bound "
                   "its within-deadline share is counted at (the largest bound <= deadline).")
        out.append(f"# TYPE {name} gauge")
        for route, (deadline, le) in sorted(self.route_deadlines.items()):
            out.append(f'{name}{{http_route="{_escape(route)}",slo_le="{le}"}} {deadline}')
        _labelled(out, "rtserve_requests_shed_total", "Requests shed before a handler ran.",
                  "reason", self.shed, ("codel", "limit", "draining", "deadline"))
        _labelled(out, "rtserve_parse_errors_total", "Requests rejected by the parser.",
                  "status", {str(k): v for k, v in self.parse_errors.items()}, ())
        kinds = ("header", "body", "idle", "write") + (("handshake",) if self.tls else ())
        _labelled(out, "rtserve_timeouts_total", "Connections closed by a timer.",
                  "kind", self.timeouts, kinds)
        for fname, help, label, read_family in self.families:
            _labelled(out, fname, help, label, read_family(), ())
        if self.tls:
            from .tls import ERROR_KINDS

            name = "rtserve_tls_handshakes_total"
            out.append(f"# HELP {name} TLS handshakes completed.")
            out.append(f"# TYPE {name} counter")
            out.append(f"{name} {self.tls_handshakes}")
            _labelled(out, "rtserve_tls_errors_total",
                      "TLS connections closed by a TLS error (handshake or record), by kind.",
                      "reason", self.tls_errors, ERROR_KINDS)
        for gname, help, read in self.gauges:
            out.append(f"# HELP {gname} {help}")
            out.append(f"# TYPE {gname} gauge")
            value = read()
            out.append(f"{gname} {'+Inf' if value == _INF else value}")  # the format's name
        out.append("")
        return "\n".join(out).encode("utf-8")


def _histogram_lines(out: list[str], name: str, labels: str, h: Histogram) -> None:
    sep = "," if labels else ""
    cumulative = 0
    for bound, n in zip(DURATION_BUCKETS, h.counts, strict=False):
        cumulative += n
        out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
    cumulative += h.counts[-1]
    out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {cumulative}')
    lab = "{" + labels + "}" if labels else ""
    out.append(f"{name}_sum{lab} {h.sum_ns / 1e9}")
    out.append(f"{name}_count{lab} {h.count}")


def _labelled(out: list[str], name: str, help: str, label: str, values: dict,
              always: tuple[str, ...]) -> None:
    out.append(f"# HELP {name} {help}")
    out.append(f"# TYPE {name} counter")
    keys = sorted(set(values) | set(always))
    for k in keys:
        out.append(f'{name}{{{label}="{_escape(str(k))}"}} {values.get(k, 0)}')
