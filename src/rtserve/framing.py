"""Response framing, decided in this one place for every answer rtserve sends.

Status line, Date, Content-Length vs chunked vs close-delimited, the Connection header for
HTTP/1.0 and 1.1, and HEAD. Pure functions of their arguments, called on any thread: by
workers serialising a handler's Response (worker.py) and by the conductor for the answers
it builds itself (answers.py), so a handler's answer, a 404, a 503, a fallback and /readyz
can never disagree on whether the connection stays open.

The result is a `Reply`, an immutable tuple `(status, keep_alive, data)`; nothing here
writes into the Request. `data` is what the conductor sends:
  bytes            the complete response
  (head, body)     a head and a large body, sent side by side with one sendmsg
  FileReply        a head and a file the conductor sends with os.sendfile
  StreamReply      a head and a channel a worker keeps filling (made by worker.py from
                   the StreamPlan that `serialize` returns for an iterable body)
"""

from __future__ import annotations

import time
from typing import Any

from . import response as _response
from .request import Request
from .response import (
    _LISTS,
    _NO_HEADERS,
    STATUS_LINES,
    FileBody,
    Response,
    date_header,
    encode_headers,
    reason_phrase,
    status_line,
)

CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
NO_BODY_STATUSES = frozenset({204, 304})
_CLEN_CACHED = 4096  # Content-Length lines of small bodies, pre-encoded
_CLEN = tuple(b"Content-Length: %d\r\n" % n for n in range(_CLEN_CACHED))
JOIN_MAX = 65536  # bodies from this size on are sent beside the head, not copied into it
_TEXT = b"Content-Type: text/plain; charset=utf-8\r\n"
_time = time.time


class FileReply:
    """A response head plus a file the conductor sends with os.sendfile."""

    __slots__ = ("head", "file")

    def __init__(self, head: bytes, file: FileBody) -> None:
        self.head = head
        self.file = file


class StreamReply:
    """A response head plus the channel a worker keeps filling (see stream.py)."""

    __slots__ = ("head", "channel")

    def __init__(self, head: bytes, channel: Any) -> None:
        self.head = head
        self.channel = channel


class StreamPlan:
    """How to stream an iterable body: its head and whether chunks are chunk-framed.

    `length` is the handler's Content-Length (the stream is cut there), or None.
    """

    __slots__ = ("head", "iterable", "chunked", "length")

    def __init__(self, head: bytes, iterable: Any, chunked: bool, length: int | None) -> None:
        self.head = head
        self.iterable = iterable
        self.chunked = chunked
        self.length = length


class StreamFraming:
    """One streamed body on the wire, for both of its producers: a worker running a
    handler's iterable (worker.py) and an ASGI app's body messages (asgi_call.py). Each
    piece becomes a chunk, or is counted against the Content-Length the app set.

    What an overflow means is the producer's to say: a worker sends what fits and closes
    (the handler is done with), an ASGI app gets an error from its `send`, as on uvicorn.
    """

    __slots__ = ("chunked", "length", "sent")

    def __init__(self, plan: StreamPlan) -> None:
        self.chunked = plan.chunked
        self.length = plan.length
        self.sent = 0

    def frame(self, data: bytes) -> bytes | None:
        """`data` (not empty) as it goes on the wire, or None when it would pass the
        Content-Length (nothing counted: see `fit`)."""
        n = len(data)
        if self.chunked:
            self.sent += n
            return b"%x\r\n%b\r\n" % (n, data)
        length = self.length
        if length is not None and self.sent + n > length:
            return None
        self.sent += n
        return data

    def fit(self, data: bytes) -> bytes:
        """The part of `data` that `frame` refused which still fits the Content-Length."""
        assert self.length is not None
        room = self.length - self.sent
        self.sent = self.length
        return data[:room]

    def end(self) -> bytes | None:
        """What ends the body on the wire (the last chunk, or nothing), or None when it
        fell short of its Content-Length: then only a close can tell the client."""
        if self.length is not None and self.sent < self.length:
            return None
        return b"0\r\n\r\n" if self.chunked else b""


# What the conductor sends (see the module docstring); StreamPlan never leaves a worker.
ReplyData = bytes | tuple[bytes, bytes] | FileReply | StreamReply | StreamPlan
Reply = tuple[int, bool, ReplyData]


def content_length(n: int) -> bytes:
    return _CLEN[n] if n < _CLEN_CACHED else b"Content-Length: %d\r\n" % n


def connection(request: Request | None, close: bool) -> tuple[bytes, bool]:
    """The Connection line and whether the connection stays open after this response.

    Keep-alive only when the request asked for it (HTTP/1.1 by default, 1.0 with
    `Connection: keep-alive`, decided by the parser) and nothing asked to close; 1.0 needs
    the header said back, 1.1 is persistent without it.
    """
    if close or request is None or not request.keep_alive:
        return CLOSE, False
    return (KEEP_ALIVE if request.version == "HTTP/1.0" else b""), True


def serialize(request: Request, response: Response, draining: bool) -> Reply:
    """A handler's Response as a Reply (raises InvalidResponse for a bad header/status)."""
    status = response.status
    sline = STATUS_LINES.get(status) or status_line(status)
    # encode_headers' whole-list cache and date_header's same-second case, inlined (this
    # runs once per response): no Python call when the handler repeats its header list.
    headers = response.headers
    try:
        encoded = _LISTS.get(tuple(headers)) if headers else _NO_HEADERS
    except TypeError:  # an unhashable pair: encode_headers says what is wrong with it
        encoded = None
    if encoded is None:
        encoded = encode_headers(headers)
    extra, length, app_close, has_date = encoded
    body = response.body
    head_only = request.method == "HEAD"
    no_body = status < 200 or status in NO_BODY_STATUSES
    if has_date:
        date = b""
    else:
        t = _time()
        d = _response.DATE
        date = d[2] if d[0] <= t < d[1] else date_header()
    if body.__class__ is bytes:
        if no_body:
            clen = b""
            body = b""
        elif head_only and length is not None and not body:
            clen = content_length(length)  # HEAD: the length a GET would have
        else:
            n = len(body)
            clen = _CLEN[n] if n < _CLEN_CACHED else b"Content-Length: %d\r\n" % n
        # connection(), inlined for the common case (a complete bytes body).
        if app_close or draining or not request.keep_alive:
            conn_line, keep = CLOSE, False
        else:
            conn_line, keep = (KEEP_ALIVE if request.version == "HTTP/1.0" else b""), True
        if head_only:
            body = b""
        elif len(body) >= JOIN_MAX:
            # (head, body): sent with one sendmsg, so a large body is never copied.
            return status, keep, (b"".join((sline, date, clen, conn_line, extra, b"\r\n")), body)
        return status, keep, b"".join((sline, date, clen, conn_line, extra, b"\r\n", body))
    if isinstance(body, FileBody):
        count = body.count if length is None else min(length, body.count)
        body.count = count
        conn_line, keep = connection(request, app_close or draining)
        clen = b"" if no_body else content_length(count)  # 1xx/204/304 carry no length
        head = b"".join((sline, date, clen, conn_line, extra, b"\r\n"))
        if head_only or no_body:
            body.close()
            return status, keep, head
        return status, keep, FileReply(head, body)
    # An iterable body.
    if head_only or no_body:
        close_body(body)
        clen = content_length(length) if length is not None and not no_body else b""
        conn_line, keep = connection(request, app_close or draining)
        return status, keep, b"".join((sline, date, clen, conn_line, extra, b"\r\n"))
    if length is not None:
        framing, chunked, close = content_length(length), False, app_close or draining
    elif request.version == "HTTP/1.1":
        framing, chunked, close = CHUNKED, True, app_close or draining
    else:
        framing, chunked, close = b"", False, True  # HTTP/1.0: the close delimits the body
    conn_line, keep = connection(request, close)
    head = b"".join((sline, date, framing, conn_line, extra, b"\r\n"))
    return status, keep, StreamPlan(head, body, chunked, length)


def simple(
    status: int,
    request: Request | None,
    draining: bool,
    body: bytes = b"",
    extra: bytes = b"",
    close: bool = False,
) -> Reply:
    """A small answer the server makes itself (errors, 503, 504), framed like any other.

    `request` is None for a request the parser refused: its framing is in doubt, so the
    answer closes. A 4xx/5xx without a body gets `NNN Reason` as one.
    """
    if not body and status >= 400:
        body = b"%d %s\n" % (status, reason_phrase(status).encode("latin-1"))
    conn_line, keep = connection(request, close or draining)
    head = (
        status_line(status), date_header(), _TEXT if body else b"",
        content_length(len(body)), extra, conn_line, b"\r\n",
    )
    if request is not None and request.method == "HEAD":
        return status, keep, b"".join(head)
    return status, keep, b"".join((*head, body))


def prebuilt(
    status: int, head_lines: bytes, body: bytes, request: Request, draining: bool, marker: bytes
) -> Reply:
    """An answer whose status line and headers were encoded once (a route's fallback).

    `head_lines` is the status line plus the handler-chosen headers; `marker` is an extra
    header line (e.g. `X-Rtserve-Fallback: deadline`).
    """
    conn_line, keep = connection(request, draining)
    parts = (head_lines, date_header(), content_length(len(body)), marker, conn_line, b"\r\n")
    if request.method == "HEAD":
        return status, keep, b"".join(parts)
    return status, keep, b"".join((*parts, body))


def close_body(body: Any) -> None:
    """Call a response body's close(), as PEP 3333 and iterators with resources expect."""
    close = getattr(body, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            import logging

            logging.getLogger("rtserve.error").exception("closing a response body raised")
