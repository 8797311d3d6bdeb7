"""Routes by path prefix for apps that route themselves (ASGI): deadline and fallback per prefix.

Built on the main thread from `--route-deadline` and `--fallback`; `resolve` runs on the
conductor for every request: a path seen before is one dict get (its own Route, for its
estimates: path_routes.py), else the longest configured prefix by `startswith` checks.
The handler of every Route is the same (the adapter's), so the Route only carries what
the conductor enforces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from .app import Route
from .config import Config
from .path_routes import PathRoutes
from .request import Request
from .wsgi import parse_fallbacks, parse_route_deadlines


class PrefixRoutes:
    """`resolve(request) -> Route`: the longest configured prefix, segment-wise, or the
    default route (the server's `--deadline-ms` applies to it)."""

    __slots__ = ("default", "_prefixes", "paths", "_by_path")

    def __init__(self, cfg: Config, name: str, handler: Callable[..., Any]) -> None:
        deadlines = parse_route_deadlines(cfg.route_deadline)
        fallbacks = parse_fallbacks(cfg.fallback)
        self.default = Route(name, handler, deadlines.get("/"), fallbacks.get("/"))
        routes = []
        for prefix in (set(deadlines) | set(fallbacks)) - {"/"}:
            route = Route(name + ":" + prefix, handler, deadlines.get(prefix),
                          fallbacks.get(prefix))
            match = unquote(prefix)
            routes.append((match.rstrip("/") if match != "/" else match, route))
        routes.sort(key=lambda pr: len(pr[0]), reverse=True)  # longest prefix wins
        self._prefixes: tuple[tuple[str, Route], ...] = tuple(routes)
        # Each path's own estimates (path_routes.py); None: one per prefix.
        self.paths = PathRoutes(cfg.path_estimates) if cfg.path_estimates else None
        self._by_path = self.paths.table if self.paths is not None else None

    def all(self) -> list[Route]:
        """The default route and every prefix route."""
        return [self.default] + [r for _, r in self._prefixes]

    def resolve(self, request: Request) -> Route:
        """The Route that carries this path's estimates, under its prefix's Route."""
        by_method = self._by_path
        if by_method is None:
            return self._prefix_route(request)
        routes = by_method.get(request.method)
        if routes is not None:
            route = routes.get(request.raw_path)
            if route is not None:
                return route
        assert self.paths is not None
        return self.paths.remember(request.method, request.raw_path,
                                   self._prefix_route(request))

    def _prefix_route(self, request: Request) -> Route:
        """The Route of the longest configured prefix of the path, else the default."""
        prefixes = self._prefixes
        if not prefixes:
            return self.default
        path = request.path
        if "%" in path:
            path = unquote(path)  # as the app sees it (scope["path"])
        for prefix, route in prefixes:
            if path.startswith(prefix):
                n = len(prefix)
                if len(path) == n or path[n] == "/":
                    return route
        return self.default
