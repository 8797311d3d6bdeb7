"""Which interface an application speaks: a native App, WSGI or ASGI (main thread, at load).

`detect_interface` looks at the object only (nothing is called): a native `App` (or an
object with `resolve` that is not callable) is native; an async callable (a coroutine
function, or an instance whose `__call__` is one: FastAPI, Starlette, Django's
ASGIHandler, ASGI middleware) is ASGI 3; any other callable is WSGI. `--interface`
overrides the guess (for an ASGI callable that hides its coroutine behind a plain `def`).
"""

from __future__ import annotations

import inspect
from typing import Any

INTERFACES = ("asgi", "wsgi", "native")


def is_native(app: Any) -> bool:
    from .app import App

    # A WSGI application object may well have a `resolve` method of its own: only a
    # non-callable object with `resolve` (or an App) is taken as a native dispatcher.
    return isinstance(app, App) or (hasattr(app, "resolve") and not callable(app))


def is_asgi(app: Any) -> bool:
    """An ASGI 3 callable: `async def app(scope, receive, send)` or an instance with an
    `async def __call__` (a class itself is not: calling it makes an instance)."""
    if inspect.iscoroutinefunction(app):
        return True
    if inspect.isclass(app):
        return False
    try:
        call = type(app).__call__  # how Python calls the instance
    except AttributeError:
        return False
    return inspect.iscoroutinefunction(call)


def detect_interface(app: Any) -> str:
    """'native', 'asgi' or 'wsgi'; TypeError for an object that is none of them."""
    if is_native(app):
        return "native"
    if is_asgi(app):
        return "asgi"
    if callable(app):
        return "wsgi"
    raise TypeError(f"{app!r} is neither an rtserve App, an ASGI app nor a WSGI callable")
