"""The ASGI 3 adapter (HTTP and lifespan): FastAPI, Starlette and any ASGI app on rtserve.

`ASGIApp(app, cfg)` is what the conductor routes with, like `WSGIApp`: `resolve(request)`
picks a Route by the longest configured path prefix (`--route-deadline`, `--fallback`), so
an ASGI request gets the same budget, dead-on-arrival check, CoDel queue, limiter and
fallback as any other (main thread builds it; `resolve` runs on the conductor). The app
itself runs on the executor's event-loop threads (asgi_executor.py), one task per request
(asgi_call.py), with the scope of asgi_scope.py and the lifespan of asgi_lifespan.py;
server.py wires the executor in the worker pool's place. At respond-by the conductor sends
the fallback and the task is cancelled. See docs/asgi.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .app import Route
from .asgi_scope import ScopeBuilder
from .config import Config
from .prefixes import PrefixRoutes
from .request import Request


def _not_on_a_worker(request: Request) -> Any:
    raise RuntimeError("an ASGI route runs on the event loop, never on a worker thread")


class ASGIApp:
    """Serve an ASGI 3 callable: routing by path prefix on the conductor, the app on the
    event loops (`make_executor`)."""

    interface = "asgi"

    def __init__(self, app: Any, cfg: Config | None = None) -> None:
        cfg = cfg if cfg is not None else Config()
        if not callable(app):
            raise TypeError(f"{app!r} is not an ASGI callable")
        self.app = app
        self.cfg = cfg
        ScopeBuilder(cfg, {})  # checks root_path and forwarded_allow_ips now (ConfigError)
        self.prefix_routes = PrefixRoutes(cfg, "asgi", _not_on_a_worker)
        # What the conductor calls per request: the router's own method, no wrapper call.
        self.resolve: Callable[[Request], Route] = self.prefix_routes.resolve

    def routes(self) -> list[Route]:
        """Every Route (the route-deadline metrics and the dashboard list them)."""
        return self.prefix_routes.all()

    def make_executor(self, pool: Any) -> Any:
        """The event-loop threads that take the worker pool's place (server.py)."""
        from .asgi_executor import ASGIExecutor

        return ASGIExecutor(self.app, self.cfg, pool)


__all__ = ["ASGIApp"]
