"""Routes by path prefix for apps that route themselves (WSGI, ASGI): deadline and fallback
per prefix, estimates per path.

Built on the main thread from `--route-deadline` and `--fallback`; `resolve` runs on the
conductor for every request: a path seen before is one dict get (its own Route, for its
estimates: path_routes.py), else the longest configured prefix by `startswith` checks.
The handler of every Route is the same (the adapter's), so the Route only carries what
the conductor enforces.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote

from .app import Route
from .config import Config, ConfigError
from .path_routes import PathRoutes
from .request import Request
from .response import Response
from .wsgi_environ import as_path_info


def parse_route_deadlines(entries: Iterable[str]) -> dict[str, float]:
    """`["/score=20", ...]` -> {"/score": 20.0}; ConfigError names the bad entry."""
    out: dict[str, float] = {}
    for entry in entries:
        prefix, sep, ms = entry.partition("=")
        prefix = prefix.strip()
        try:
            value = float(ms)
        except ValueError:
            value = -1.0
        if not sep or not prefix.startswith("/") or not value > 0:
            raise ConfigError(f"invalid value for route_deadline: {entry!r} (want /PREFIX=MS)")
        out[prefix] = value
    return out


def parse_fallbacks(entries: Iterable[str]) -> dict[str, Response]:
    """`['/score=200:{"decision":"review"}']` -> {"/score": Response}. A body that parses
    as JSON is sent as application/json, anything else as text/plain."""
    # An env var value that is not a JSON list is split on commas; a prefix always starts
    # with '/', so a piece that does not is the rest of the previous entry's body.
    joined: list[str] = []
    for entry in entries:
        if joined and not entry.lstrip().startswith("/"):
            joined[-1] += "," + entry
        else:
            joined.append(entry)
    out: dict[str, Response] = {}
    for entry in joined:
        prefix, sep, rest = entry.partition("=")
        prefix = prefix.strip()
        status_s, sep2, body = rest.partition(":")
        status_s = status_s.strip()
        if (
            not sep
            or not sep2
            or not prefix.startswith("/")
            or not (status_s.isdigit() and status_s.isascii() and 100 <= int(status_s) <= 599)
        ):
            raise ConfigError(
                f"invalid value for fallback: {entry!r} (want /PREFIX=STATUS:BODY)"
            )
        try:
            json.loads(body)
        except ValueError:
            ctype = "text/plain; charset=utf-8"
        else:
            ctype = "application/json"
        out[prefix] = Response(body.encode("utf-8"), int(status_s), None, ctype)
    return out


class PrefixRoutes:
    """`resolve(request) -> Route`: the path's own Route, under the longest configured
    prefix, segment-wise, or the default route (the server's `--deadline-ms` applies).

    Prefixes match the path as the app sees it: for ASGI `scope["path"]`, percent-decoded
    UTF-8 text; for WSGI (`wsgi=True`) `PATH_INFO`, the raw path's bytes percent-decoded
    and read as latin-1 (PEP 3333), so a prefix of UTF-8 text is matched in that form too.
    """

    __slots__ = ("default", "_prefixes", "_raw", "_decode", "paths", "_by_path")

    def __init__(self, cfg: Config, name: str, handler: Callable[..., Any],
                 wsgi: bool = False) -> None:
        deadlines = parse_route_deadlines(cfg.route_deadline)
        fallbacks = parse_fallbacks(cfg.fallback)
        self.default = Route(name, handler, deadlines.get("/"), fallbacks.get("/"))
        self._raw = wsgi  # match on the raw path (WSGI) or the decoded one (ASGI)
        self._decode: Callable[[str], str] = as_path_info if wsgi else unquote
        routes = []
        for prefix in (set(deadlines) | set(fallbacks)) - {"/"}:
            route = Route(name + ":" + prefix, handler, deadlines.get(prefix),
                          fallbacks.get(prefix))
            match = (as_path_info(prefix.encode("utf-8").decode("latin-1")) if wsgi
                     else unquote(prefix))
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
        path = request.raw_path if self._raw else request.path
        if "%" in path:
            path = self._decode(path)  # as the app sees it
        for prefix, route in prefixes:
            if path.startswith(prefix):
                n = len(prefix)
                if len(path) == n or path[n] == "/":
                    return route
        return self.default
