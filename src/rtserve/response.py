"""Response, what a handler returns, and the encoding pieces framing.py builds answers from.

Any thread: workers serialise handlers' responses with these, the conductor its own
answers. Pre-encoded status lines, a per-second Date cache and encoded-header caches keep
the common case to a few dict lookups and concatenations. Header names and values from
handlers are validated: CR, LF or NUL in either is header injection (CVE-2018-1000164,
CVE-2020-7695 class) and becomes a 500.
"""

from __future__ import annotations

import json as _json
import os
import re
import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

HeaderList = list[tuple[str, str]]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def reason_phrase(status: int) -> str:
    """The standard reason phrase of a status, or `Unknown`."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1")) for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    """The pre-encoded `HTTP/1.1 NNN Reason` line for a status."""
    line = STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise InvalidResponse(f"invalid status {status!r}")
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status).encode("latin-1"))
        STATUS_LINES[status] = line
    return line


_time = time.time
# (start, end, line): the `Date` line for the second [start, end) of the time.time() clock.
# Replaced whole, so a reader on any thread sees a matching triple; framing.serialize
# reads it inline (the usual case, same second: no call).
DATE: tuple[float, float, bytes] = (0.0, 0.0, b"")


def date_header() -> bytes:
    """`Date: ...\\r\\n`, recomputed at most once per second (and when the clock steps)."""
    global DATE
    t = _time()
    d = DATE
    if d[0] <= t < d[1]:
        return d[2]
    now = int(t)
    line = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
    DATE = (float(now), now + 1.0, line)
    return line


class InvalidResponse(ValueError):
    """A handler produced a response that cannot be sent (bad header, bad status)."""


def validate_header(name: str, value: str) -> None:
    """Reject header names that are not tokens and values with CR, LF, NUL or other CTLs."""
    if not _TOKEN.fullmatch(name):
        raise InvalidResponse(f"invalid response header name {name!r}")
    if not _FIELD_VALUE.fullmatch(value):
        raise InvalidResponse(f"invalid response header value for {name!r}")


class FileBody:
    """A file to be sent with `os.sendfile` by the conductor (e.g. wsgi.file_wrapper)."""

    __slots__ = ("file", "offset", "count")

    def __init__(self, file: Any, offset: int = 0, count: int | None = None) -> None:
        self.file = file
        self.offset = offset
        if count is None:
            count = os.fstat(file.fileno()).st_size - offset
        self.count = count

    def close(self) -> None:
        close = getattr(self.file, "close", None)
        if close is not None:
            close()


class Response:
    """What a handler returns: status, headers, and a body of bytes, str, an iterable of
    bytes (streamed) or a `FileBody` (sent with sendfile)."""

    __slots__ = ("status", "headers", "body")

    def __init__(
        self,
        body: bytes | str | Iterable[bytes] | FileBody = b"",
        status: int = 200,
        headers: HeaderList | dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        if isinstance(body, str):
            body = body.encode("utf-8")
            if content_type is None:
                content_type = "text/plain; charset=utf-8"
        self.status = status
        if headers is None:
            hl: HeaderList = []
        elif isinstance(headers, dict):
            hl = list(headers.items())
        else:
            hl = list(headers)
        if content_type is not None:
            hl.insert(0, ("Content-Type", content_type))
        self.headers = hl
        self.body = body

    @classmethod
    def text(cls, text: str, status: int = 200, headers: HeaderList | dict | None = None):
        return cls(text.encode("utf-8"), status, headers, "text/plain; charset=utf-8")

    @classmethod
    def html(cls, html: str, status: int = 200, headers: HeaderList | dict | None = None):
        return cls(html.encode("utf-8"), status, headers, "text/html; charset=utf-8")

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: HeaderList | dict | None = None):
        data = _json.dumps(obj, separators=(",", ":")).encode("utf-8")
        return cls(data, status, headers, "application/json")

    def header(self, name: str) -> str | None:
        """The first value of a response header (case-insensitive), or None."""
        lname = name.lower()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return None

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


# Validated, encoded ordinary header lines by (name, value): handlers repeat the same few
# headers (Content-Type above all), so most lines cost one dict lookup instead of two regex
# matches and an encode. Bounded; read and written by workers under the GIL.
_ENCODED: dict[tuple[str, str], bytes] = {}
_ENCODED_MAX = 4096
# Validated Content-Length headers by (name, value) -> the length: WSGI apps send one with
# every response, and validating it (two regex matches, lower(), int()) cost ~0.5 us.
_LENGTHS: dict[tuple[str, str], int] = {}
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "date"})


# Whole header lists -> encode_headers' answer: most responses of a handler carry the very
# same list, so one tuple() and one lookup replace the per-pair loop. Bounded like _ENCODED.
_LISTS: dict[tuple, tuple[bytes, int | None, bool, bool]] = {}
_NO_HEADERS = (b"", None, False, False)


def encode_headers(headers: HeaderList) -> tuple[bytes, int | None, bool, bool]:
    """Validate and encode handler headers.

    Returns (encoded lines, Content-Length if given, Connection: close given, has Date).
    Transfer-Encoding from a handler is dropped: framing is the server's job.
    """
    if not headers:
        return _NO_HEADERS
    key = tuple(headers)
    try:
        hit = _LISTS.get(key)
    except TypeError:  # an unhashable pair (a list, a non-str value): not cached
        return _encode_headers(key)
    if hit is not None:
        return hit
    result = _encode_headers(key)
    if len(_LISTS) < _ENCODED_MAX:
        _LISTS[key] = result
    return result


def _encode_headers(headers: Iterable) -> tuple[bytes, int | None, bool, bool]:
    """encode_headers without the whole-list cache."""
    out = []
    length: int | None = None
    close = False
    has_date = False
    cache = _ENCODED
    lengths = _LENGTHS
    for pair in headers:
        if pair.__class__ is not tuple:
            pair = tuple(pair)
        try:
            line = cache.get(pair)
            if line is None:
                n = lengths.get(pair)
                if n is not None:  # a Content-Length seen (and validated) before
                    length = n
                    continue
        except TypeError:  # an unhashable name or value: not a str, rejected below
            line = None
        if line is not None:
            out.append(line)
            continue
        name, value = pair
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidResponse(f"header {name!r} must be str: str")
        validate_header(name, value)
        lname = name.lower()
        if lname in _FRAMING:
            if lname == "content-length":
                if not value.isdigit() or not value.isascii():
                    raise InvalidResponse(f"invalid Content-Length {value!r}")
                length = int(value)
                if len(lengths) < _ENCODED_MAX:
                    lengths[pair] = length
                continue
            if lname == "transfer-encoding":
                continue
            if lname == "connection":
                if "close" in value.lower():
                    close = True
                continue
            has_date = True
            out.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
            continue
        line = b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
        if len(cache) < _ENCODED_MAX:
            cache[pair] = line
        out.append(line)
    return b"".join(out), length, close, has_date
