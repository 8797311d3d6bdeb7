"""HTTP errors that carry the status they map to (h11 style).

Raised by the parser and the conductor; the conductor turns them into a response and,
for every error that puts framing in doubt, closes the connection.
"""

from __future__ import annotations


class HTTPError(Exception):
    """A request-level error with the HTTP status to answer it with."""

    status: int = 400

    def __init__(self, reason: str = "", status: int | None = None) -> None:
        super().__init__(reason)
        if status is not None:
            self.status = status
        self.reason = reason


class ParseError(HTTPError):
    """The request bytes are malformed or beyond a limit; the connection must close."""


class BadRequest(ParseError):
    status = 400


class PayloadTooLarge(ParseError):
    status = 413


class URITooLong(ParseError):
    status = 414


class HeaderFieldsTooLarge(ParseError):
    status = 431


class ExpectationFailed(ParseError):
    status = 417


class NotImplementedFraming(ParseError):
    """A transfer coding or method the server does not implement."""

    status = 501


class VersionNotSupported(ParseError):
    status = 505


class StartupFailed(Exception):
    """The application refused to start (ASGI `lifespan.startup.failed`); the message is
    the app's. The server does not listen, and the CLI exits 3."""


class InvalidTransition(RuntimeError):
    """A bug: the conductor asked for a connection state change the table does not allow.

    Defined here rather than in connection.py, which raises it: mypyc (the compiled build,
    docs/compiled.md) cannot compile a class deriving from RuntimeError, and this module
    stays Python."""
