"""Workers' results coming back: matched to the request in flight, or dropped as late.

Conductor thread only. Woken by the pool's eventfd, `on_completions` takes every result
posted since the last wake-up (one queue operation per burst), gives each finished worker
back to admission, hands a handler's reply for the request still in flight to the writer,
drops and counts a late one, and then lets admission start what was waiting. It sits
between pool.py and writer.py in a request's path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .admission import Admission
from .answers import Answers
from .connection import READING_HEAD, RUNNING, Connection
from .framing import FileReply, StreamReply
from .metrics import Metrics
from .worker import SKIPPED, STREAM_DONE, STREAM_WAKE

log = logging.getLogger("rtserve.error")


class Completions:
    """The intake of workers' results (and of the ASGI loops', which post the same way)."""

    def __init__(self, take_completions: Callable[[], list], admission: Admission,
                 answers: Answers, metrics: Metrics, writer: Any) -> None:
        self._take_completions = take_completions
        self._admission = admission
        self._finished = admission.finished
        self._waiting = admission.waiting
        self._answers = answers
        self._metrics = metrics
        self._writer = writer  # writer.Writer: respond, answer, on_stream_data, fault
        self.reader: Any = None  # reader.Reader, wired by the server (resume)

    def on_completions(self, now: int) -> None:
        """Every result workers posted since the last wake-up, then what may start next."""
        finished = self._finished
        metrics = self._metrics
        respond = self._writer.respond
        for conn, rid, result, final in self._take_completions():
            try:
                if result.__class__ is tuple and conn.req_id == rid and conn.state is RUNNING:
                    # The common case, inlined: a handler's reply for the request in flight
                    # (conn.awaits(rid) with RUNNING, the only state a reply can find).
                    req = conn.request
                    if final:
                        final = False  # given back now: a fault below must not do it again
                        finished(conn, rid, req, now)
                    else:  # a stream's head (see Handoff.handler_returned)
                        self._admission.handler_returned(conn, rid)
                    if result[0] >= 500:
                        metrics.handler_errors += 1
                    if respond(conn, result, now) and conn.state is READING_HEAD:
                        self.reader.resume(conn, now)
                elif conn is None:
                    continue  # an ASGI loop's nudge: it has room; the dispatch below uses it
                else:
                    if final:
                        final = False
                        # The limiter's sample and the DOA reset need the request only when
                        # its result is used: a task that raised is the one such case here.
                        used = result is not SKIPPED and conn.awaits(rid)
                        finished(conn, rid, conn.request if used else None, now)
                    self._complete(conn, rid, result, now)
            except Exception:
                if final:  # the fault came before its worker was given back: give it now
                    try:
                        finished(conn, rid, None, now)
                    except Exception:
                        log.exception("giving back the worker of %r failed", conn)
                self._writer.fault(conn, "handling a completion")
        if self._waiting:
            self._admission.dispatch_queued(now)

    def _complete(self, conn: Connection, rid: int, result: Any, now: int) -> None:
        """Every completion but a reply for the request in flight: streams, late results,
        a task skipped at its respond-by time, a task that raised. (A final one's worker
        was already given back.)"""
        if result is STREAM_WAKE:  # a stream has data: pull it if the socket has room
            self._writer.on_stream_data(conn, rid, now)
            return
        if result is STREAM_DONE:  # the streaming worker is free (given back already)
            return
        if result is SKIPPED:  # taken after its respond-by time: never ran
            if conn.awaits(rid):  # its deadline timer has not fired yet: answer as it would
                self._admission.skipped(conn, rid, now)
            return
        if not conn.awaits(rid):  # answered at its deadline, or the client left
            self._metrics.late_dropped += 1
            if result.__class__ is tuple:
                data = result[2]
                if data.__class__ is StreamReply:
                    data.channel.abort()
                elif data.__class__ is FileReply:
                    data.file.close()
            return
        req = conn.request
        if result.__class__ is not tuple:  # the task raised outside the handler's guard
            self._metrics.handler_errors += 1
            result = self._answers.internal_error(req)
        elif result[0] >= 500:
            self._metrics.handler_errors += 1
        self._writer.answer(conn, result, now)
