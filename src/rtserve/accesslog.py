"""Access log lines: Apache combined format plus rtserve's time split.

Every field that comes from the client is escaped (control characters, quotes and
backslashes), so a path like `/%1b[31m` cannot inject terminal escapes or fake lines
(CVE-2020-7694 class). Off by default: it costs a format per request.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .request import Request

# C0 controls, DEL and the C1 controls (0x80-0x9f: header values arrive as latin-1, and
# U+009B is a one-byte CSI for many terminals).
_ESCAPES = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7F, 0xA0)]}
_ESCAPES[ord('"')] = '\\"'
_ESCAPES[ord("\\")] = "\\\\"

DEFAULT_FORMAT = (
    '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" '
    "queue=%(queue_ms)s handler=%(handler_ms)s write=%(write_ms)s total=%(total_ms)s"
)


def escape(value: str) -> str:
    """Escape control characters, quotes and backslashes for a log line."""
    return value.translate(_ESCAPES)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}"


def _span(start: int, end: int) -> str:
    """A duration in ms, or "-" when a stage did not happen (no handler ran, 404, DOA)."""
    return _ms(end - start) if start and end >= start else "-"


def fields(req: Request, done_ns: int) -> dict[str, str]:
    """The named fields a format string may use (gunicorn-style atoms)."""
    headers = req.headers
    client = req.client[0] if req.client else "-"
    # Worker threads stamp t_start/t_end; a stuck handler may stamp them after the
    # conductor answered for it, so only a handler that finished first counts here.
    t_queued, t_start, t_end = req.t_queued, req.t_start, req.t_end
    ran = bool(t_start and t_end and t_end <= done_ns)
    total = done_ns - req.start_ns
    return {
        "h": escape(str(client)),
        "l": "-",
        "u": "-",
        "t": time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),  # with brackets, as in gunicorn
        "H": escape(req.version),
        "p": f"<{os.getpid()}>",
        "D": str(total // 1000),
        "M": str(total // 1_000_000),
        "T": str(total // 1_000_000_000),
        "L": f"{total / 1e9:.6f}",
        "r": escape(f"{req.method} {req.target} {req.version}"),
        "m": escape(req.method),
        "U": escape(req.path),
        "q": escape(req.query_string),
        "s": str(req.status),
        "b": "-",
        "f": escape(headers.get("referer", "-")),
        "a": escape(headers.get("user-agent", "-")),
        "queue_ms": _span(t_queued, t_start) if ran else "-",
        "handler_ms": _span(t_start, t_end) if ran else "-",
        "write_ms": _span(t_end, done_ns) if ran else "-",
        "total_ms": _ms(done_ns - req.start_ns),
    }


class _Fields(dict):
    """Unknown names in a user's format print "-" instead of raising on the conductor;
    gunicorn's `%({name}i)s` prints a request header."""

    headers: Any = None  # the request's Headers, for %({name}i)s

    def __missing__(self, key: str) -> str:
        if key.startswith("{") and key.endswith("}i") and self.headers is not None:
            return escape(self.headers.get(key[1:-2], "-"))
        return "-"


def format_line(req: Request, done_ns: int, fmt: str = "") -> str:
    """One access-log line for a finished request (`fmt` uses the names in `fields`).

    Runs on the conductor, so it never raises: a broken format falls back to the default.
    """
    values = _Fields(fields(req, done_ns))
    values.headers = req.headers
    try:
        return (fmt or DEFAULT_FORMAT) % values
    except (TypeError, ValueError):
        return DEFAULT_FORMAT % values
