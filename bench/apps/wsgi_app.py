"""The benchmark logic as a PEP 3333 WSGI app: rtserve-WSGI, waitress, gunicorn, granian."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from apps import logic

StartResponse = Callable[..., Any]

_TEXT = [("Content-Type", "text/plain"), ("Content-Length", str(len(logic.HELLO)))]
_BIG = [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(logic.BIG)))]
_NOT_FOUND = [("Content-Type", "text/plain"), ("Content-Length", "9")]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Dispatch on PATH_INFO to the three benchmark endpoints; 404 otherwise."""
    path = environ.get("PATH_INFO", "")
    if path == "/hello":
        start_response("200 OK", _TEXT)
        return [logic.HELLO]
    if path == "/score" and environ.get("REQUEST_METHOD") == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        try:
            out = logic.score(body)
        except ValueError:
            start_response("400 Bad Request", [("Content-Type", "text/plain"),
                                               ("Content-Length", "3")])
            return [b"bad"]
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(out)))])
        return [out]
    if path == "/big":
        start_response("200 OK", _BIG)
        return [logic.BIG]
    start_response("404 Not Found", _NOT_FOUND)
    return [b"not found"]
