"""Per-path estimates for apps that route themselves (WSGI, ASGI). Conductor thread.

Such an app is one Route per configured prefix (prefixes.py, wsgi.py), so every path
under a prefix shared one handler-time and one CPU estimate: a `/healthz` beside a 1 ms
`/score` was never light for the CPU gate nor cheap for the hand-ahead, and waited behind
the CPU-bound requests (WSGI C without a deadline: /hello p90 54 ms). Here each
(method, path) seen again gets a Route of its own: the prefix route's name (so metrics keep
their labels), handler, deadline and fallback, with its own estimates.

A path gets its Route the second time it is seen; the first time it is served by the
prefix's Route, whose estimates then stand for the paths not (yet) tracked one by one. So
an app whose paths carry ids (`/items/8812`) costs a set insert per request and keeps one
measured estimate, not a new unmeasured Route per request (unmeasured: its first
request passes a shut CPU gate to be measured, none is cheap for the hand-ahead, and
each of its first eight requests is CPU-sampled).

Both sets are bounded (`path_estimates` entries each): a full one starts over, so endless
distinct paths cost a fixed amount of memory, and the paths in use are measured again
within a few requests. The prefix's Route still stands for the routes' metrics and
deadlines (`routes()`); a path's Route has its name.
"""

from __future__ import annotations

from .app import Route


class PathRoutes:
    """method -> raw path -> the Route that carries that path's estimates.

    `table` is read by the app's `resolve` directly: two str-keyed dict gets per request,
    about 40 ns over resolving by prefix alone, where a (method, path) tuple key, built
    and hashed per request, cost about 90 ns. `remember` is the miss path.
    """

    __slots__ = ("table", "size", "_seen", "limit", "resets")

    def __init__(self, limit: int) -> None:
        self.table: dict[str, dict[str, Route]] = {}
        self.size = 0  # paths in `table`, over every method
        self._seen: set[tuple[str, str]] = set()  # paths seen once, since the last reset
        self.limit = limit
        self.resets = 0  # times the table was full and started over

    def remember(self, method: str, raw_path: str, prefix_route: Route) -> Route:
        """A path without a Route of its own: the prefix's the first time, its own
        (unmeasured) from the second."""
        key = (method, raw_path)
        seen = self._seen
        if key not in seen:
            if len(seen) >= self.limit:
                seen.clear()
            seen.add(key)
            return prefix_route
        seen.discard(key)
        table = self.table
        if self.size >= self.limit:
            table.clear()  # in-flight requests keep their Route objects
            self.size = 0
            self.resets += 1
        route = table.setdefault(method, {})[raw_path] = prefix_route.for_path()
        self.size += 1
        return route
