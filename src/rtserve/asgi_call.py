"""One ASGI HTTP request on its event loop: `receive`, `send`, and what goes to the conductor.

Event-loop thread only, except the two `*_wake` methods a StreamChannel calls (labelled).
The app's messages become the same completions a worker posts (pool.post), so the writer
serves ASGI answers with no branch of its own:

- `http.response.start` is held; if the first body message comes in the same loop step
  (the usual `Response`) with `more_body` false, the answer is one Reply (framing.py
  `serialize`: one send, Content-Length) posted when the task ends or yields, final when
  it ended (one completion for the common request);
- when the app yields to the loop after `start` (a stream, SSE), the head goes out then,
  as a StreamReply whose channel the body messages fill (chunked for HTTP/1.1 without a
  Content-Length); `send` awaits, never blocks, while the channel is above the high-water
  mark;
- `http.response.pathsend` becomes a FileReply: the conductor sends the file with sendfile;
- when the task ends, a final completion frees its admission slot (STREAM_DONE), so a
  background task that runs after the response counts as running until it ends.

Out-of-order messages raise RuntimeError in the app; what it leaves unanswered is a 500
(nothing sent yet) or a cut stream (the connection closes). Cancellation (the conductor's
deadline, a client that left) goes through `cancel` and `gone`, never through the socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from .framing import Reply, StreamFraming, StreamPlan, StreamReply, serialize
from .response import FileBody, InvalidResponse, Response
from .stream import OFFER_ABORTED, OFFER_OK, StreamChannel
from .worker import INTERNAL_ERROR, STREAM_DONE, STREAM_WAKE

if TYPE_CHECKING:
    from .asgi_executor import LoopThread
    from .request import Request

log = logging.getLogger("rtserve.error")

CHUNK = 65536  # request bodies are handed to the app in pieces of at most this size

# Response states (what the app has sent).
NEW = 0  # nothing yet
STARTED = 1  # http.response.start held, nothing posted
STREAMING = 2  # the head and a channel posted; body messages fill the channel
DISCARDING = 3  # a head-only answer (HEAD, 204, 304) posted; the app's body is dropped
DONE = 4  # the app's response is complete (or the task ended)

_NO_BODY: tuple[bytes, ...] = ()  # the iterable `serialize` frames a stream's head with
# A Response without __init__'s conversions. Response.__new__, not object.__new__: the
# compiled build's Response is a C type that object.__new__ refuses to allocate.
_new_response = Response.__new__


class ClientDisconnected(OSError):
    """`send` on a response whose client is gone (ASGI spec 2.4: an OSError)."""


class HTTPCall:
    """The state of one request's ASGI exchange; the task runs `run`."""

    __slots__ = (
        "lt", "conn", "rid", "req", "task", "body", "pos", "state", "status", "headers",
        "channel", "framing", "reply", "recv_waiter", "send_waiter",
        "disconnected", "cancelled", "failed", "began",
    )

    def __init__(self, lt: LoopThread, conn: Any, rid: int, req: Request) -> None:
        self.lt = lt
        self.conn = conn
        self.rid = rid
        self.req = req
        self.task: asyncio.Task | None = None
        self.body: bytes | None = req.body  # None once the app has had all of it
        self.pos = 0
        self.state = NEW
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.channel: StreamChannel | None = None
        self.framing: StreamFraming | None = None  # the streamed body's, once it opens
        self.reply: Reply | None = None  # a complete answer not posted yet
        self.recv_waiter: asyncio.Future | None = None
        self.send_waiter: asyncio.Future | None = None
        self.disconnected = False
        self.cancelled = ""  # why the task was cancelled ("deadline", "disconnect")
        self.failed = False  # the app raised (already logged)
        self.began = False  # the task's first step ran (else a cancel means it never will)

    # ---- the task ---------------------------------------------------------------------

    async def run(self, app: Any, scope: dict[str, Any]) -> None:
        self.began = True
        self.lt.began()
        req = self.req
        req.t_start = time.monotonic_ns()
        try:
            result = await app(scope, self.receive, self.send)
            if result is not None:
                self.failed = True
                log.error("ASGI callable for %s %s returned %r, not None", req.method,
                          req.path, result)
        except asyncio.CancelledError:
            pass  # the conductor answered (deadline) or nobody listens (client gone)
        except BaseException:  # noqa: BLE001 - the app is the boundary
            self.failed = True
            log.exception("exception in ASGI application (%s %s)", req.method, req.path)
        finally:
            self._end()

    def _end(self) -> None:
        """The task ended: post what is owed, then the final completion."""
        lt = self.lt
        lt.calls.pop((self.conn, self.rid), None)
        st = self.state
        quiet = self.cancelled or self.disconnected
        self.state = DONE
        if st is DONE:
            reply = self.reply
            if reply is not None:  # the common case: the whole answer, in one completion
                self.reply = None
                lt.post(self.conn, self.rid, reply, True)
                return
        elif st is STREAMING:
            if not quiet and not self.failed:
                log.error("ASGI callable for %s %s returned without completing the response",
                          self.req.method, self.req.path)
            assert self.channel is not None
            self.channel.finish(False)  # the connection closes: the body must not look whole
        elif st is not DISCARDING and not quiet:  # NEW or STARTED: nothing went out
            if not self.failed:
                log.error("ASGI callable for %s %s returned without %s the response",
                          self.req.method, self.req.path,
                          "starting" if st is NEW else "completing")
            lt.post(self.conn, self.rid, self._error_reply(), True)
            return
        lt.post(self.conn, self.rid, STREAM_DONE, True)

    # ---- receive ----------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        """The body in pieces of at most CHUNK bytes, then (once the response is complete
        or the client left) `http.disconnect`; until then it waits."""
        if self.disconnected:
            return {"type": "http.disconnect"}
        body = self.body
        if body is not None:
            pos = self.pos
            end = pos + CHUNK
            if end >= len(body):
                self.body = None
                return {"type": "http.request", "body": body[pos:] if pos else body,
                        "more_body": False}
            self.pos = end
            return {"type": "http.request", "body": body[pos:end], "more_body": True}
        if self.state is not DONE:
            fut = self.recv_waiter = self.lt.loop.create_future()
            try:
                await fut
            finally:
                self.recv_waiter = None
        return {"type": "http.disconnect"}

    # ---- send -------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        state = self.state
        if state is DONE:
            raise RuntimeError(f"ASGI message {kind!r} sent after the response completed")
        if self.disconnected:
            raise ClientDisconnected("the client closed the connection")
        if kind == "http.response.body":
            if state is STARTED:
                if not message.get("more_body", False):
                    self._complete(_body_of(message))
                    return
                self._open_stream()
                state = self.state
            if state is STREAMING:
                await self._stream(_body_of(message), message.get("more_body", False))
            elif state is DISCARDING:
                if not message.get("more_body", False):
                    self._finished()
            else:
                raise RuntimeError("ASGI 'http.response.body' sent before 'http.response.start'")
        elif kind == "http.response.start":
            if state is not NEW:
                raise RuntimeError("ASGI 'http.response.start' sent twice")
            self._start(message)
        elif kind == "http.response.pathsend":
            await self._pathsend(message)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} for an HTTP request")

    def _start(self, message: dict[str, Any]) -> None:
        status = message["status"]
        if not isinstance(status, int) or not 100 <= status <= 999:
            raise RuntimeError(f"invalid ASGI response status {status!r}")
        status = int(status)  # an HTTPStatus is an int, but framing keys on plain ints
        if message.get("trailers", False):
            raise RuntimeError("response trailers were not offered (no http.response.trailers "
                               "extension)")
        try:
            self.headers = [(n.decode("latin-1"), v.decode("latin-1"))
                            for n, v in message.get("headers", ())]
        except (AttributeError, TypeError, ValueError):
            raise RuntimeError("ASGI response headers must be (bytes, bytes) pairs") from None
        self.status = status
        self.state = STARTED
        # If the app yields before its first body message, the head goes out then.
        self.lt.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """After the loop step that sent `start`: stream the head if no body came, or post
        a complete answer the task did not end with (it went on: background work)."""
        st = self.state
        if st is STARTED:
            try:
                self._open_stream()
            except RuntimeError:
                log.exception("ASGI response for %s %s", self.req.method, self.req.path)
                self.state = DONE
                self.failed = True
                self.lt.post(self.conn, self.rid, self._error_reply(), False)
        elif st is DONE and self.reply is not None:
            reply = self.reply
            self.reply = None
            self.lt.post(self.conn, self.rid, reply, False)

    def _response(self, body: Any) -> Response:
        response = _new_response(Response)
        response.status = self.status
        response.headers = self.headers
        response.body = body
        return response

    def _serialize(self, body: Any) -> Reply:
        try:
            reply = serialize(self.req, self._response(body), self.lt.shared.draining)
        except InvalidResponse as exc:
            raise RuntimeError(f"invalid ASGI response: {exc}") from None
        self._observe()
        return reply

    def _complete(self, body: bytes) -> None:
        """The whole answer in one message: one Reply."""
        self.reply = self._serialize(body)
        self._finished()

    def _finished(self) -> None:
        """The app's response is complete: a reading app now hears `http.disconnect`."""
        self.state = DONE
        fut = self.recv_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _open_stream(self) -> None:
        status, keep_alive, data = self._serialize(_NO_BODY)
        if data.__class__ is not StreamPlan:  # HEAD, 204, 304: the head is the answer
            self.state = DISCARDING
            self.lt.post(self.conn, self.rid, (status, keep_alive, data), False)
            return
        assert isinstance(data, StreamPlan)
        channel = self.channel = StreamChannel(
            self.lt.high_water, self._stream_wake, self._producer_wake
        )
        self.framing = StreamFraming(data)
        self.state = STREAMING
        self.lt.post(self.conn, self.rid, (status, keep_alive, StreamReply(data.head, channel)),
                     False)

    async def _stream(self, body: bytes, more: bool) -> None:
        channel = self.channel
        framing = self.framing
        assert channel is not None and framing is not None
        data = body
        if body:
            framed = framing.frame(body)
            if framed is None:
                channel.finish(False)
                self.state = DONE
                raise RuntimeError("ASGI response body longer than its Content-Length")
            data = framed
        if not more:
            tail = framing.end()
            if tail is None:
                if data:
                    channel.offer(data)
                channel.finish(False)
                self.state = DONE
                raise RuntimeError("ASGI response body shorter than its Content-Length")
            data += tail
        if data:
            await self._put(channel, data)
        if not more:
            channel.finish(True)
            self._finished()

    async def _put(self, channel: StreamChannel, data: bytes) -> None:
        """Queue a chunk; wait (awaiting, not blocking) while above the high-water mark."""
        verdict = channel.offer(data)
        if verdict == OFFER_OK:
            return
        if verdict == OFFER_ABORTED:
            raise ClientDisconnected("the client closed the connection")
        fut = self.send_waiter = self.lt.loop.create_future()
        try:
            await fut
        finally:
            self.send_waiter = None
        if channel.aborted:
            raise ClientDisconnected("the client closed the connection")

    async def _pathsend(self, message: dict[str, Any]) -> None:
        """`http.response.pathsend`: the conductor sends the file with sendfile."""
        path = message["path"]
        if self.state is STARTED:
            f = open(path, "rb")  # noqa: SIM115 - the FileBody owns it; the conductor closes it
            try:
                self.reply = self._serialize(FileBody(f))
            except BaseException:
                f.close()
                raise
            self._finished()
        elif self.state is STREAMING:  # the head went out already: stream the file
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    await self._stream(chunk, True)
            await self._stream(b"", False)
        elif self.state is DISCARDING:
            self._finished()
        else:
            raise RuntimeError("ASGI 'http.response.pathsend' sent before 'http.response.start'")

    def _observe(self) -> None:
        """The time to the answer feeds the route's estimate (dead on arrival)."""
        req = self.req
        route = req.route
        now = req.t_end = time.monotonic_ns()
        elapsed = now - req.t_start
        if req.deadline_ns:  # past its budget a handler only says "too slow": cap it
            elapsed = min(elapsed, req.deadline_ns - req.start_ns)
        if route is not None:
            route.observe(elapsed)

    def _error_reply(self) -> Reply:
        return serialize(self.req, INTERNAL_ERROR, self.lt.shared.draining)

    # ---- stop the work (from the conductor, through the loop's inbox) --------------------

    def cancel(self, reason: str) -> None:
        """Cancel the task unless its response is complete (background work may go on)."""
        if self.cancelled or self.state is DONE:
            return
        task = self.task
        if task is None or task.done():
            return
        self.cancelled = reason
        task.cancel()
        self.lt.cancelled[reason] += 1
        if not self.began:
            # Cancelled before its first step: the coroutine is closed without running a
            # line, so its `finally` never runs; end it here (the slot must come back).
            self.began = True
            self.lt.began()
            self._end()

    def gone(self) -> None:
        """The client closed the connection: a reading app hears `http.disconnect` first,
        then the task is cancelled (at once if it is not reading)."""
        if self.disconnected:
            return
        self.disconnected = True
        if self.state is DONE:
            return
        fut = self.recv_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)  # its step runs before the cancel scheduled next
            self.lt.loop.call_soon(self.cancel, "disconnect")
        else:
            self.cancel("disconnect")

    def on_channel(self, _a: Any = None, _b: int = 0, _c: Any = None) -> None:
        """The channel woke its producer (loop thread, via the inbox): room, or aborted."""
        channel = self.channel
        if channel is not None and channel.aborted:
            self.gone()
        fut = self.send_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    # ---- called by the StreamChannel -----------------------------------------------------

    def _stream_wake(self) -> None:
        """Loop thread (inside `offer`): the conductor asked for data and found none."""
        self.lt.post(self.conn, self.rid, STREAM_WAKE, False)

    def _producer_wake(self) -> None:
        """Conductor thread (inside `take`/`abort`): hand `on_channel` to the loop."""
        self.lt.put((self.on_channel, None, 0, None))


def _body_of(message: dict[str, Any]) -> bytes:
    body = message.get("body", b"")
    if body.__class__ is bytes:
        return body
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    raise RuntimeError(f"ASGI response body must be bytes, not {type(body).__name__}")
