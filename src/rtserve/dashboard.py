"""Answers GET /dashboard (the live page) and GET /dashboard.json (its data), on the conductor.

The page is package data (`static/dashboard.{html,css,js}`), joined into one HTML document
the first time it is asked for and kept as bytes, so every later answer is a dict lookup
and a send. It makes no request but `dashboard.json` (relative, so it works behind a
path prefix), and its Content-Security-Policy allows nothing else: it works offline, and
a route name that looks like markup stays text. The JSON comes from `LiveStats`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources

from .livestats import LiveStats

PATHS = frozenset({"/dashboard", "/dashboard.json"})
HTML_TYPE = "text/html; charset=utf-8"
JSON_TYPE = "application/json"


@functools.cache
def _page() -> tuple[bytes, str]:
    """The page with its CSS and JS inlined, and a CSP that allows exactly those two."""
    static = resources.files("rtserve") / "static"
    css = (static / "dashboard.css").read_text("utf-8")
    js = (static / "dashboard.js").read_text("utf-8")
    html = (static / "dashboard.html").read_text("utf-8")
    html = html.replace("/*{{css}}*/", css).replace("/*{{js}}*/", js)
    csp = (
        "default-src 'none'; connect-src 'self'; img-src 'self' data:; "
        f"style-src '{_sha256(css)}'; script-src '{_sha256(js)}'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html.encode("utf-8"), csp


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


def answer(stats: LiveStats, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) for one of `PATHS`."""
    if path == "/dashboard":
        return 200, HTML_TYPE, _page()[0]
    if path == "/dashboard.json":
        return 200, JSON_TYPE, stats.json_bytes()
    return 404, "text/plain; charset=utf-8", b"Not Found\n"


def headers() -> list[tuple[str, str]]:
    """Headers for both answers: never cached (the data is live), locked-down page."""
    return [
        ("Cache-Control", "no-store"),
        ("Content-Security-Policy", _page()[1]),
        ("X-Content-Type-Options", "nosniff"),
    ]
