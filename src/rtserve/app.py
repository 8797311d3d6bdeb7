"""The native API: `App` with routes by method and path.

Routing runs on the conductor (one dict lookup) because the route carries what the
conductor enforces: the deadline, the fallback and the service-time estimate used for
admission. Handlers run on workers.

Routes match the percent-decoded path (`request.path`: `/%65cho` is `/echo`), segment by
segment: an encoded slash `%2F` is data inside a segment, not a separator, so `/a%2Fb`
matches no route `/a/b` (RFC 3986 2.2: a percent-encoded reserved character is not the
delimiter). Methods are case-sensitive tokens (RFC 9110 9.1): a method no route
implements is 501, a method another route implements is 405 with Allow on a known path,
404 on an unknown one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .request import Request
from .response import Response

Handler = Callable[[Request], Any]


class Route:
    """One routed endpoint: handler, deadline and fallback, and its measured service time.

    Thread ownership: `ewma_ns`, `cpu_ns` and `cpu_tick` are written by the threads that
    run handlers only (workers; for ASGI, `ewma_ns` by the loop threads), and a lost
    `cpu_tick` increment only shifts which request is sampled; `doa_scale` and `tried` by
    the conductor only. Each side reads the other's without a lock (a float or int read
    is atomic under the GIL).
    """

    __slots__ = ("name", "handler", "deadline_ns", "fallback", "ewma_ns", "doa_scale", "cpu_ns",
                 "cpu_tick", "inline", "streams", "tried")

    def __init__(
        self,
        name: str,
        handler: Handler,
        deadline_ms: float | None = None,
        fallback: Response | None = None,
        inline: bool = False,
    ) -> None:
        if deadline_ms is not None and deadline_ms <= 0:
            raise ValueError("deadline_ms must be > 0")
        if fallback is not None and not isinstance(fallback.body, bytes):
            raise ValueError("a fallback must have a bytes body (it is sent by the conductor)")
        self.name = name
        self.handler = handler
        self.deadline_ns = int(deadline_ms * 1_000_000) if deadline_ms else 0
        self.fallback = fallback
        self.ewma_ns = 0.0  # typical handler time: written by workers only (observe)
        # The conductor's own discount on ewma_ns for dead-on-arrival decisions: each DOA
        # answer shrinks it, so a probe gets through; a completed request resets it.
        self.doa_scale = 1.0
        self.cpu_ns = 0  # typical CPU time of the handler (sampled), for CPU-aware dispatch
        self.cpu_tick = 0  # requests seen, to sample one in CPU_SAMPLE_EVERY
        # Run on the conductor itself, never on a worker (opt-in: see docs/deadlines.md,
        # "Inline handlers"); such a route's statistics are then written by the conductor.
        self.inline = inline
        # Set by a worker once a handler of the route returned a streamed body: its
        # estimate covers the handler's return, not the stream, so it is never "cheap"
        # for the hand-ahead or a batch (handoff.py).
        self.streams = False
        # Set by the conductor when a request of the route first starts: until then an
        # unmeasured route counts as light, so one request passes a shut CPU gate and is
        # measured (handoff.py, Handoff.light); after it, unmeasured means not light.
        self.tried = False

    def for_path(self) -> Route:
        """A Route that answers as this one (name, handler, deadline, fallback) with
        estimates of its own: one path of an app that routes itself (path_routes.py)."""
        route = Route(self.name, self.handler, None, self.fallback, self.inline)
        route.deadline_ns = self.deadline_ns
        return route

    def observe_cpu(self, cpu_ns: int) -> None:
        """Fold one sampled handler CPU time into its EWMA (alpha 0.25)."""
        c = self.cpu_ns
        self.cpu_ns = cpu_ns if c == 0 else int(c + 0.25 * (cpu_ns - c))

    def observe(self, elapsed_ns: int) -> None:
        """Fold one measured handler time into the EWMA (alpha 0.1)."""
        e = self.ewma_ns
        self.ewma_ns = elapsed_ns if e == 0.0 else e + 0.1 * (elapsed_ns - e)

    def __repr__(self) -> str:
        return f"<Route {self.name}>"


class App:
    """A native rtserve application.

    ```
    app = App()

    @app.post("/score", deadline_ms=20, fallback=Response.json({"decision": "review"}))
    def score(request): ...
    ```
    """

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Route]] = {}
        self._exact: dict[tuple[str, str], Route] = {}
        self._methods: set[str] = set()  # every method some route implements (HEAD too)

    def route(
        self,
        path: str,
        methods: tuple[str, ...] | list[str] = ("GET",),
        *,
        deadline_ms: float | None = None,
        fallback: Response | None = None,
        inline: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Register a handler for `path` and `methods` (GET also answers HEAD).

        `inline=True` runs the handler on the conductor thread instead of a worker: no
        hand-off, for handlers that never block and take microseconds (a cache lookup, a
        constant). While it runs nothing else is served, so it must not do I/O.
        """
        if not path.startswith("/"):
            raise ValueError("route paths start with '/'")

        def register(handler: Handler) -> Handler:
            by_method = self._routes.setdefault(path, {})
            route = Route(path, handler, deadline_ms, fallback, inline)
            for m in methods:
                m = m.upper()
                by_method[m] = route
                self._exact[(m, path)] = route
                self._methods.add(m)
                if m == "GET" and "HEAD" not in by_method:
                    by_method["HEAD"] = route
                    self._exact[("HEAD", path)] = route
                    self._methods.add("HEAD")
            return handler

        return register

    def get(self, path: str, **kw: Any):
        return self.route(path, ("GET",), **kw)

    def post(self, path: str, **kw: Any):
        return self.route(path, ("POST",), **kw)

    def put(self, path: str, **kw: Any):
        return self.route(path, ("PUT",), **kw)

    def patch(self, path: str, **kw: Any):
        return self.route(path, ("PATCH",), **kw)

    def delete(self, path: str, **kw: Any):
        return self.route(path, ("DELETE",), **kw)

    # ---- conductor side -------------------------------------------------------------

    def resolve(self, request: Request) -> Route | Response:
        """The route for a request, or the 404/405/501 response to send without a worker."""
        path = request.path
        raw = request.raw_path
        if path is not raw and path.count("/") != raw.count("/"):
            # Decoding turned a %2F into "/": that segment holds a slash, and no route
            # (split on "/") has such a segment. Checked only when something was decoded.
            by_method = None
        else:
            route = self._exact.get((request.method, path))
            if route is not None:
                return route
            by_method = self._routes.get(path)
        if request.method not in self._methods:
            return Response.text("Not Implemented\n", 501)
        if by_method is None:
            return Response.text("Not Found\n", 404)
        allow = ", ".join(sorted(by_method))
        return Response.text("Method Not Allowed\n", 405, [("Allow", allow)])

    def routes(self) -> list[Route]:
        """Every Route once (the dashboard and /metrics list route deadlines from it)."""
        return list({id(r): r for r in self._exact.values()}.values())
