"""Access log lines: Apache combined format plus rtserve's time split.

Every field that comes from the client is escaped (control characters, quotes and
backslashes), so a path like `/%1b[31m` cannot inject terminal escapes or fake lines
(CVE-2020-7694 class). Off by default: it costs a format per request.
"""

from __future__ import annotations

import time

from .request import Request

_ESCAPES = {i: f"\\x{i:02x}" for i in list(range(0x20)) + [0x7F]}
_ESCAPES[ord('"')] = '\\"'
_ESCAPES[ord("\\")] = "\\\\"

DEFAULT_FORMAT = (
    '%(h)s - - [%(t)s] "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" '
    "queue=%(queue_ms)s handler=%(handler_ms)s write=%(write_ms)s total=%(total_ms)s"
)


def escape(value: str) -> str:
    """Escape control characters, quotes and backslashes for a log line."""
    return value.translate(_ESCAPES)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}"


def fields(req: Request, done_ns: int) -> dict[str, str]:
    """The named fields a format string may use (gunicorn-style atoms)."""
    headers = req.headers
    client = req.client[0] if req.client else "-"
    queue = req.t_start - req.t_queued if req.t_start and req.t_queued else 0
    handler = req.t_end - req.t_start if req.t_end else 0
    write = done_ns - req.t_end if req.t_end else 0
    return {
        "h": escape(str(client)),
        "t": time.strftime("%d/%b/%Y:%H:%M:%S %z"),
        "r": escape(f"{req.method} {req.target} {req.version}"),
        "m": escape(req.method),
        "U": escape(req.path),
        "q": escape(req.query_string),
        "s": str(req.status),
        "b": "-",
        "f": escape(headers.get("referer", "-")),
        "a": escape(headers.get("user-agent", "-")),
        "queue_ms": _ms(queue),
        "handler_ms": _ms(handler),
        "write_ms": _ms(write),
        "total_ms": _ms(done_ns - req.start_ns),
    }


def format_line(req: Request, done_ns: int, fmt: str = "") -> str:
    return (fmt or DEFAULT_FORMAT) % fields(req, done_ns)
