"""What a worker thread does with one request: run the handler, frame its answer, stream it.

Worker threads only. Nothing here touches a socket or a Connection's insides (the
connection is an opaque token handed back with the result). The result is a Reply from
framing.py; a streamed body is posted as a StreamReply first and then produced into its
channel, where the worker (never the conductor) waits at the high-water mark.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .framing import Reply, StreamFraming, StreamPlan, StreamReply, close_body, serialize
from .pool import WorkerPool
from .request import Request
from .response import InvalidResponse, Response
from .stream import StreamChannel

log = logging.getLogger("rtserve.error")

STREAM_WAKE = object()  # completion payload: a stream has data (not final)
STREAM_DONE = object()  # completion payload: the streaming worker is free (final)
SKIPPED = object()  # completion payload: taken after its respond-by time, never run (final)

_monotonic_ns = time.monotonic_ns
_thread_time_ns = time.thread_time_ns
_get_ident = threading.get_ident
CPU_SAMPLE_EVERY = 8  # a power of two: one request in 8 has its CPU time measured

INTERNAL_ERROR = Response(b"Internal Server Error\n", 500, None, "text/plain; charset=utf-8")


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
    """The task every worker runs per request; one instance shared by all worker threads.

    It holds no per-request state. `draining` is the one field the conductor writes (once,
    when a drain starts): from then on responses say `Connection: close`.
    """

    def __init__(self, pool: WorkerPool, stream_high_water: int) -> None:
        self.pool = pool
        self.stream_high_water = stream_high_water
        self.draining = False

    def __call__(self, conn: object, req_id: int, request: Request, inline: bool = False
                 ) -> Reply | object:
        """Run the handler and frame its answer (`inline`: on the conductor, see below)."""
        route = request.route
        assert route is not None  # only routed requests reach a worker
        t0 = _monotonic_ns()
        rb = request.respond_by_ns
        if rb and t0 >= rb and not inline:
            # Its answer is due (it waited in the pool's queue behind a handler that turned
            # slow, see Handoff._ahead_ok, or the conductor is late): the deadline's
            # answer goes out without it. Never run it.
            return SKIPPED
        request.t_start = t0
        tick = route.cpu_tick = route.cpu_tick + 1
        # The handler's own CPU time, on a sample of requests (the thread clock is a
        # system call, ~1.3 us): admission uses it to keep CPU-bound handlers from
        # time-slicing the GIL (see handoff.Handoff._cpu_gate).
        sample = tick <= 8 or not tick & (CPU_SAMPLE_EVERY - 1)
        # A charged request without a deadline: the conductor's CPU gate may ask how much
        # of its charge it has used (with a deadline at stake no charge lapses).
        record = request.charge and not request.deadline_ns
        if sample or record:
            c0 = _thread_time_ns()
            if record:
                request.cpu_thread = _get_ident()
                request.cpu_t0 = c0
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
        e = route.ewma_ns  # Route.observe, inlined: once per request
        route.ewma_ns = elapsed if e == 0.0 else e + 0.1 * (elapsed - e)
        try:
            reply = serialize(request, response, self.draining)
        except InvalidResponse as exc:
            log.error("invalid response from %s %s: %s", request.method, request.path, exc)
            close_body(response.body)
            reply = serialize(request, INTERNAL_ERROR, self.draining)
        data = reply[2]
        if data.__class__ is StreamPlan:
            route.streams = True
            if inline:  # streaming would block the conductor at the high-water mark
                log.error("inline handler for %s %s returned a streamed body (not allowed)",
                          request.method, request.path)
                close_body(data.iterable)
                return serialize(request, INTERNAL_ERROR, self.draining)
            return self._stream(conn, req_id, request, reply)  # STREAM_DONE
        return reply

    def _stream(self, conn: object, req_id: int, request: Request, reply: Reply) -> object:
        """Post the head, then produce the body into a channel the conductor drains."""
        status, keep_alive, plan = reply
        assert isinstance(plan, StreamPlan)
        pool = self.pool
        channel = StreamChannel(
            self.stream_high_water, lambda: pool.post(conn, req_id, STREAM_WAKE, False)
        )
        pool.post(conn, req_id, (status, keep_alive, StreamReply(plan.head, channel)), False)
        framing = StreamFraming(plan)
        body = plan.iterable
        ok = True
        try:
            for chunk in body:
                if not chunk:
                    continue
                if chunk.__class__ is not bytes:
                    if isinstance(chunk, str):
                        raise InvalidResponse("a streamed body must yield bytes, not str")
                    chunk = bytes(chunk)
                data = framing.frame(chunk)
                if data is None:  # more than its Content-Length: what fits, then close
                    ok = False
                    rest = framing.fit(chunk)
                    if rest:
                        channel.put(rest)
                    break
                if not channel.put(data):
                    break
            else:
                tail = framing.end()
                if tail is None:
                    ok = False  # shorter than its Content-Length: the close tells the client
                elif tail:
                    channel.put(tail)
        except Exception:
            log.exception("streamed body of %s %s raised", request.method, request.path)
            ok = False
        finally:
            close_body(body)
            channel.finish(ok)
        return STREAM_DONE
