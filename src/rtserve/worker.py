"""Code that runs on worker threads: call the handler, serialise its response.

Nothing here touches a socket. The result handed back to the conductor is either the
complete response as bytes (the common case) or a `StreamReply`/`FileReply` whose head
the conductor sends before pulling the body.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .pool import WorkerPool
from .request import Request
from .response import (
    STATUS_LINES,
    FileBody,
    InvalidResponse,
    Response,
    date_header,
    encode_headers,
    status_line,
)
from .stream import StreamChannel

log = logging.getLogger("rtserve.error")

STREAM_WAKE = object()  # completion payload: a stream has data (not final)
STREAM_DONE = object()  # completion payload: the streaming worker is free (final)

_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CLOSE = b"Connection: close\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})
_CLEN_CACHED = 4096  # Content-Length lines of small bodies, pre-encoded
_CLEN = tuple(b"Content-Length: %d\r\n" % n for n in range(_CLEN_CACHED))
_monotonic_ns = time.monotonic_ns
_thread_time_ns = time.thread_time_ns
_JOIN_MAX = 65536  # bodies from this size on are sent beside the head, not copied into it
CPU_SAMPLE_EVERY = 8  # a power of two: one request in 8 has its CPU time measured

INTERNAL_ERROR = Response(b"Internal Server Error\n", 500, None, "text/plain; charset=utf-8")


class StreamReply:
    """A response head plus a channel the worker keeps filling."""

    __slots__ = ("status", "head", "channel", "close")

    def __init__(self, status: int, head: bytes, channel: StreamChannel, close: bool) -> None:
        self.status = status
        self.head = head
        self.channel = channel
        self.close = close


class FileReply:
    """A response head plus a file the conductor sends with os.sendfile."""

    __slots__ = ("status", "head", "file", "close")

    def __init__(self, status: int, head: bytes, file: FileBody, close: bool) -> None:
        self.status = status
        self.head = head
        self.file = file
        self.close = close


def coerce(result: Any) -> Response:
    """Accept a Response, or bytes / str / dict (JSON) / None as shorthand."""
    if isinstance(result, Response):
        return result
    if isinstance(result, bytes | bytearray):
        return Response(bytes(result), 200, None, "application/octet-stream")
    if isinstance(result, str):
        return Response.text(result)
    if isinstance(result, dict | list):
        return Response.json(result)
    if result is None:
        return Response(b"", 204)
    raise InvalidResponse(f"handler returned {type(result).__name__}, not a Response")


class Worker:
    """The worker-side task: run one request's handler and build its reply.

    One instance is shared by all worker threads; it holds no per-request state.
    """

    def __init__(self, pool: WorkerPool, stream_high_water: int) -> None:
        self.pool = pool
        self.stream_high_water = stream_high_water
        self.draining = False  # set by the conductor when a drain starts

    def __call__(self, conn: Any, req_id: int, request: Request) -> Any:
        route = request.route
        tick = route.cpu_tick = route.cpu_tick + 1
        # The handler's own CPU time, on a sample of requests (the thread clock is a
        # system call, ~1.3 us): the conductor uses it to keep CPU-bound handlers from
        # time-slicing the GIL (see Server._cpu_ok).
        sample = tick <= 8 or not tick & (CPU_SAMPLE_EVERY - 1)
        if sample:
            c0 = _thread_time_ns()
        t0 = _monotonic_ns()
        request.t_start = t0
        try:
            response = route.handler(request)
            if response.__class__ is not Response:
                response = coerce(response)
        except Exception:
            log.exception("handler for %s %s raised", request.method, request.path)
            response = INTERNAL_ERROR
        t1 = _monotonic_ns()
        if sample:
            route.observe_cpu(_thread_time_ns() - c0)
        request.t_end = t1
        elapsed = t1 - t0
        if request.deadline_ns:  # past its budget a handler only says "too slow": cap it,
            elapsed = min(elapsed, request.deadline_ns - request.start_ns)  # or DOA sticks
        route.observe(elapsed)
        try:
            return self.serialize(conn, req_id, request, response)
        except InvalidResponse as exc:
            log.error("invalid response from %s %s: %s", request.method, request.path, exc)
            _close_body(response.body)
            return self.serialize(conn, req_id, request, INTERNAL_ERROR)

    def serialize(self, conn: Any, req_id: int, request: Request, response: Response) -> Any:
        """Build the reply; the chosen status and keep-alive land on `request`."""
        status = response.status
        sline = STATUS_LINES.get(status) or status_line(status)
        extra, length, app_close, has_date = encode_headers(response.headers)
        close = app_close or not request.keep_alive or self.draining
        body = response.body
        head_only = request.method == "HEAD"
        no_body = status < 200 or status in _NO_BODY_STATUSES
        date = b"" if has_date else date_header()
        if body.__class__ is bytes:
            if no_body:
                body = b""
                clen = b""
            elif head_only and length is not None and not body:
                clen = b"Content-Length: %d\r\n" % length  # HEAD: the length a GET would have
            else:
                n = len(body)
                clen = _CLEN[n] if n < _CLEN_CACHED else b"Content-Length: %d\r\n" % n
            request.status = status
            request.keep_alive = not close
            conn_hdr = _CLOSE if close else (_KEEP_ALIVE if request.version == "HTTP/1.0" else b"")
            if head_only:
                body = b""
            elif len(body) >= _JOIN_MAX:
                # (head, body): the conductor sends both with one sendmsg, so a large
                # body is never copied into a joined response.
                return (b"".join((sline, date, clen, conn_hdr, extra, b"\r\n")), body)
            return b"".join((sline, date, clen, conn_hdr, extra, b"\r\n", body))
        if isinstance(body, FileBody):
            count = body.count if length is None else min(length, body.count)
            body.count = count
            request.status = status
            request.keep_alive = not close
            conn_hdr = _CLOSE if close else (_KEEP_ALIVE if request.version == "HTTP/1.0" else b"")
            head = b"".join(
                (sline, date, b"Content-Length: %d\r\n" % count, conn_hdr, extra, b"\r\n")
            )
            if head_only or no_body:
                body.close()
                return head
            return FileReply(status, head, body, close)
        # An iterable body: streamed as the worker produces it.
        if head_only or no_body:
            _close_body(body)
            clen = b"Content-Length: %d\r\n" % length if length is not None else b""
            request.status = status
            request.keep_alive = not close
            conn_hdr = _CLOSE if close else (_KEEP_ALIVE if request.version == "HTTP/1.0" else b"")
            return b"".join((sline, date, clen, conn_hdr, extra, b"\r\n"))
        return self._stream(conn, req_id, request, status, sline, date, extra, length, close, body)

    def _stream(self, conn, req_id, request, status, sline, date, extra, length, close, body):
        if length is not None:
            framing = b"Content-Length: %d\r\n" % length
            chunked = False
        elif request.version == "HTTP/1.1":
            framing = _CHUNKED
            chunked = True
        else:
            framing = b""  # HTTP/1.0: the close delimits the body
            chunked = False
            close = True
        conn_hdr = _CLOSE if close else (_KEEP_ALIVE if request.version == "HTTP/1.0" else b"")
        head = b"".join((sline, date, framing, conn_hdr, extra, b"\r\n"))
        request.status = status
        request.keep_alive = not close
        pool = self.pool
        channel = StreamChannel(
            self.stream_high_water, lambda: pool.post(conn, req_id, STREAM_WAKE, False)
        )
        pool.post(conn, req_id, StreamReply(status, head, channel, close), False)
        ok = True
        sent = 0
        try:
            for chunk in body:
                if not chunk:
                    continue
                if chunk.__class__ is not bytes:
                    if isinstance(chunk, str):
                        raise InvalidResponse("a streamed body must yield bytes, not str")
                    chunk = bytes(chunk)
                if chunked:
                    data = b"%x\r\n%b\r\n" % (len(chunk), chunk)
                elif length is not None:
                    room = length - sent
                    if len(chunk) > room:
                        chunk = chunk[:room]
                        ok = False  # more than its Content-Length: truncate and close
                    data = chunk
                else:
                    data = chunk
                sent += len(chunk)
                if not channel.put(data):
                    break
                if not ok:
                    break
            else:
                if length is not None and sent < length:
                    ok = False  # shorter than its Content-Length: the close tells the client
                elif chunked:
                    channel.put(b"0\r\n\r\n")
        except Exception:
            log.exception("streamed body of %s %s raised", request.method, request.path)
            ok = False
        finally:
            _close_body(body)
            channel.finish(ok)
        return STREAM_DONE


def _close_body(body: Any) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("closing a response body raised")
