"""Entry points: `serve(app, **settings)` runs a server in the calling (main) thread."""

from __future__ import annotations

from typing import Any

from .conductor import Server
from .config import Config


def serve(app: Any, config: Config | None = None, **settings: Any) -> int:
    """Serve `app` until drained (SIGINT/SIGTERM); returns the exit code.

    `app` may be a native `App`, or any WSGI callable (wrapped automatically).
    """
    cfg = config if config is not None else Config()
    if settings:
        cfg = cfg.replace(**settings)
    return Server(as_dispatcher(app, cfg), cfg).serve()


def as_dispatcher(app: Any, cfg: Config) -> Any:
    """A native App is used as is; any other callable is treated as a WSGI application."""
    from .app import App

    # A WSGI application object may well have a `resolve` method of its own: only a
    # non-callable object with `resolve` (or an App) is taken as a native dispatcher.
    if isinstance(app, App) or (hasattr(app, "resolve") and not callable(app)):
        return app
    if callable(app):
        from .wsgi import WSGIApp

        return WSGIApp(app, cfg)
    raise TypeError(f"{app!r} is neither an rtserve App nor a WSGI callable")


__all__ = ["Server", "serve", "as_dispatcher"]
