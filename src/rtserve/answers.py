"""The answers the conductor makes itself: errors, 503 sheds, 504s, fallbacks and health.

Conductor thread only. Each method returns a Reply (framing.py) and sends nothing: the
caller hands it to the writer. Framing is framing.py's, the same as for handlers' answers,
so the Connection header and whether the socket stays open always agree.
"""

from __future__ import annotations

from typing import Any

from . import dashboard
from .app import Route
from .framing import Reply, prebuilt, serialize, simple
from .request import Request
from .response import Response, encode_headers, status_line

HEALTH_PATHS = frozenset({"/livez", "/readyz", "/metrics"})
_LIVE = Response.text("ok\n")
_READY = Response.text("ready\n")
_METRICS_TYPE = "text/plain; version=0.0.4"


class Answers:
    """Builds the conductor's own replies; reads the draining flag and health facts."""

    __slots__ = ("_life", "_metrics", "_pool", "admission", "livestats", "_fallbacks",
                 "health_paths")

    def __init__(self, life: Any, metrics: Any, pool: Any, dashboard_on: bool = False) -> None:
        self._life = life  # lifecycle.Lifecycle: draining, not_ready_reason
        self._metrics = metrics
        self._pool = pool
        self.admission: Any = None  # set by the server once admission exists (stuck count)
        self.livestats: Any = None  # set by the server with --dashboard (livestats.py)
        self._fallbacks: dict[int, tuple[bytes, bytes]] = {}  # id(route) -> (head, body)
        # The paths the reader answers with `health` (the dashboard's with --dashboard).
        self.health_paths = HEALTH_PATHS | dashboard.PATHS if dashboard_on else HEALTH_PATHS

    def error(self, status: int, request: Request | None = None, extra: bytes = b"") -> Reply:
        """A 4xx/5xx with a short text body. No request (the parser refused it): close."""
        return simple(status, request, self._life.draining, extra=extra, close=request is None)

    def internal_error(self, request: Request | None) -> Reply:
        """500 for a handler that raised outside its guard: closes, the state is in doubt."""
        return simple(500, request, self._life.draining, close=True)

    def response(self, request: Request, response: Response) -> Reply:
        """A Response the conductor answers with (the app's 404/405, health)."""
        return serialize(request, response, self._life.draining)

    def shed(self, request: Request, retry_after: int) -> Reply:
        return simple(503, request, self._life.draining, extra=b"Retry-After: %d\r\n" % retry_after)

    def draining_shed(self, request: Request) -> Reply:
        """The graceful timeout ran out before this request got a worker."""
        return simple(503, request, True, extra=b"Retry-After: 1\r\n", close=True)

    def late(self, request: Request, why: bytes) -> Reply:
        """The route's fallback, marked `X-Rtserve-Fallback: <why>`, or 504 without one."""
        route: Route | None = request.route
        if route is None or route.fallback is None:
            return simple(504, request, self._life.draining)
        self._metrics.count_fallback(route.name)
        cached = self._fallbacks.get(id(route))
        if cached is None:
            fb = route.fallback
            extra, _, _, _ = encode_headers(fb.headers)
            assert isinstance(fb.body, bytes)  # Route refuses any other fallback body
            cached = (status_line(fb.status) + extra, fb.body)
            self._fallbacks[id(route)] = cached
        head, body = cached
        return prebuilt(
            route.fallback.status, head, body, request, self._life.draining,
            b"X-Rtserve-Fallback: " + why + b"\r\n",
        )

    def health(self, request: Request) -> Reply:
        """/livez, /readyz, /metrics or the dashboard's (the caller checked `health_paths`)."""
        path = request.path
        if path in dashboard.PATHS:
            status, ctype, body = dashboard.answer(self.livestats, path)
            return self.response(request, Response(body, status, dashboard.headers(), ctype))
        if path == "/livez":
            return self.response(request, _LIVE)
        if path == "/readyz":
            life = self._life
            reason = life.not_ready_reason or ("draining" if life.draining else "")
            adm = self.admission
            if not reason and adm is not None and adm.stuck_count >= adm.threads:
                reason = "all workers stuck"
            if reason:
                return self.response(request, Response.text(f"not ready: {reason}\n", 503))
            return self.response(request, _READY)
        self._metrics.worker_deaths = self._pool.deaths  # counted on the dying worker thread
        return self.response(request, Response(self._metrics.render(), 200, None, _METRICS_TYPE))
