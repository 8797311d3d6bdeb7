"""The shapes the conductor's parts agree on, as Protocols for the type checker (any thread).

Nothing here runs: these name what an application dispatcher must offer, so the parts do
not pass `Any` around where a shape is known.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .app import Route
    from .request import Request
    from .response import Response


class Dispatcher(Protocol):
    """What the reader routes with: a native `App`, or the WSGI or ASGI adapter
    (`WSGIApp`, `ASGIApp`).

    `resolve` runs on the conductor: a dict lookup or a few prefix checks, never I/O.
    """

    def resolve(self, request: Request) -> Route | Response: ...
