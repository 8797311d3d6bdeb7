"""Routes by path prefix for apps that route themselves (ASGI): deadline and fallback per prefix.

Built on the main thread from `--route-deadline` and `--fallback`; `resolve` runs on the
conductor for every request: with no prefix configured it is one attribute read, else a
few `startswith` checks, longest prefix first. The handler of every Route is the same
(the adapter's), so the Route only carries what the conductor enforces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from .app import Route
from .config import Config
from .request import Request
from .wsgi import parse_fallbacks, parse_route_deadlines


class PrefixRoutes:
    """`resolve(request) -> Route`: the longest configured prefix, segment-wise, or the
    default route (the server's `--deadline-ms` applies to it)."""

    __slots__ = ("default", "_prefixes")

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

    def all(self) -> list[Route]:
        """The default route and every prefix route."""
        return [self.default] + [r for _, r in self._prefixes]

    def resolve(self, request: Request) -> Route:
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
