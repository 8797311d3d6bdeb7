"""The Worker serialiser on a real WorkerPool, with the test as the conductor.

Each test submits `(worker, token, req_id, request)` the way admission does and reads the
completions the way writer.py does (the pool's eventfd): a Reply for a plain answer; for a
streamed body a StreamReply first (not final), the body in its channel, then STREAM_DONE
(final). The connection token is an opaque string: the worker must only hand it back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rtserve import Request, Response
from rtserve.app import Route
from rtserve.framing import StreamReply
from rtserve.parser import RequestParser
from rtserve.pool import WorkerPool
from rtserve.response import InvalidResponse
from rtserve.stream import StreamChannel
from rtserve.worker import CPU_SAMPLE_EVERY, STREAM_DONE, STREAM_WAKE, Worker, coerce
from tests.helpers import wait_completions


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool(2)
    p.start()
    yield p
    p.shutdown(5)
    p.close()


@pytest.fixture
def worker(pool: WorkerPool) -> Worker:
    return Worker(pool, 1 << 20)


def make_request(handler: Callable[[Request], Any], version: str = "HTTP/1.1",
                 method: str = "GET", route: Route | None = None) -> Request:
    p = RequestParser()
    p.feed(f"{method} /w {version}\r\nHost: t\r\n\r\n".encode())
    req = p.next_event()
    assert isinstance(req, Request)
    req.route = route if route is not None else Route("/w", handler)
    req.start_ns = time.monotonic_ns()
    return req


def run(worker: Worker, req: Request, rid: int = 7) -> list:
    """Submit like admission does; every completion up to the final one."""
    worker.pool.submit(worker, "conn-token", rid, req)
    done = wait_completions(worker.pool, 1, finals=True)
    assert all(c[0] == "conn-token" and c[1] == rid for c in done)
    return done


def reply_of(worker: Worker, handler: Callable[[Request], Any], **kw: Any) -> tuple:
    """The one final Reply a non-streamed answer comes back as."""
    (_, _, result, final), = run(worker, make_request(handler, **kw))
    assert final and result.__class__ is tuple
    return result


def split(data: bytes) -> tuple[bytes, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return first.encode(), headers, body


# ---- coerce: the handler shorthands ------------------------------------------------------


def test_coerce_passes_a_response_through() -> None:
    r = Response.text("x")
    assert coerce(r) is r


@pytest.mark.parametrize(
    "value, status, ctype, body",
    [
        (b"raw", 200, "application/octet-stream", b"raw"),
        (bytearray(b"raw"), 200, "application/octet-stream", b"raw"),
        ("text", 200, "text/plain; charset=utf-8", b"text"),
        ({"a": 1}, 200, "application/json", b'{"a":1}'),
        ([1, 2], 200, "application/json", b"[1,2]"),
        (None, 204, None, b""),
    ],
    ids=["bytes", "bytearray", "str", "dict", "list", "none"],
)
def test_coerce_shorthands(value: Any, status: int, ctype: str | None, body: bytes) -> None:
    r = coerce(value)
    assert r.status == status and r.header("Content-Type") == ctype
    assert r.body == body and r.body.__class__ is bytes


@pytest.mark.parametrize("value", [object(), 5, 1.5, (b"a",)], ids=["object", "int", "float",
                                                                   "tuple"])
def test_coerce_refuses_anything_else(value: Any) -> None:
    with pytest.raises(InvalidResponse, match="not a Response"):
        coerce(value)


def test_a_shorthand_is_served_as_its_response(worker: Worker) -> None:
    status, keep, data = reply_of(worker, lambda r: {"ok": True})
    assert (status, keep) == (200, True)
    _, headers, body = split(data)
    assert headers["content-type"] == "application/json" and json.loads(body) == {"ok": True}


# ---- failures become a 500 ----------------------------------------------------------------


def test_a_handler_exception_is_a_500_and_its_traceback_is_logged(
        worker: Worker, caplog: pytest.LogCaptureFixture) -> None:
    def boom(request: Request) -> Response:
        raise RuntimeError("secret internal detail")

    with caplog.at_level(logging.ERROR, logger="rtserve.error"):
        status, keep, data = reply_of(worker, boom)
    assert status == 500 and keep  # the handler failed, not the connection
    line, _, body = split(data)
    assert line == b"HTTP/1.1 500 Internal Server Error"
    assert body == b"Internal Server Error\n" and b"secret" not in data
    rec = next(r for r in caplog.records if "raised" in r.getMessage())
    assert rec.exc_info and "secret internal detail" in str(rec.exc_info[1])


def test_a_value_that_is_not_a_response_is_a_500(worker: Worker) -> None:
    assert reply_of(worker, lambda r: object())[0] == 500


@pytest.mark.parametrize(
    "headers",
    [[("X-Bad", "a\r\nSet-Cookie: evil=1")], [("Bad Header", "v")], [("X-Count", 5)],
     [("Content-Length", "-1")]],
    ids=["crlf-injection", "bad-name", "non-str", "bad-length"],
)
def test_an_invalid_header_is_a_500(worker: Worker, headers: list,
                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="rtserve.error"):
        status, _, data = reply_of(worker, lambda r: Response(b"x", 200, headers))
    assert status == 500 and b"evil" not in data
    assert any("invalid response" in r.getMessage() for r in caplog.records)


def test_an_invalid_response_with_a_streamed_body_closes_that_body(worker: Worker) -> None:
    closed = threading.Event()

    def body() -> Iterator[bytes]:
        try:
            yield b"never sent"
        finally:
            closed.set()

    gen = body()
    next_chunk: list[bytes] = []

    def handler(request: Request) -> Response:
        next_chunk.append(next(gen))  # started: close() now runs its finally
        return Response(gen, 200, [("Bad Header", "v")])

    assert reply_of(worker, handler)[0] == 500
    assert closed.is_set() and next_chunk == [b"never sent"]


# ---- timing and CPU sampling on the route ----------------------------------------------------


def test_route_ewma_arithmetic() -> None:
    route = Route("/r", lambda r: None)
    route.observe(1000)
    assert route.ewma_ns == 1000  # the first sample is the estimate
    route.observe(2000)
    assert route.ewma_ns == pytest.approx(1100)  # alpha 0.1
    route.observe_cpu(1000)
    assert route.cpu_ns == 1000
    route.observe_cpu(2000)
    assert route.cpu_ns == 1250  # alpha 0.25


def test_the_worker_measures_the_handler_into_the_route(worker: Worker) -> None:
    def spin(request: Request) -> Response:
        end = time.thread_time_ns() + 3_000_000  # 3 ms of this thread's CPU
        while time.thread_time_ns() < end:
            pass
        return Response.text("spun")

    route = Route("/spin", spin)
    req = make_request(spin, route=route)
    run(worker, req)
    assert route.cpu_tick == 1
    assert route.cpu_ns >= 3_000_000  # the first requests are always sampled
    assert route.ewma_ns >= 3_000_000
    assert req.t_start and req.t_end >= req.t_start + 3_000_000


def test_cpu_is_sampled_once_in_cpu_sample_every(worker: Worker) -> None:
    route = Route("/s", lambda r: Response.text("s"))
    route.cpu_tick = 8  # past the always-sampled start
    route.cpu_ns = 123_456_789  # a sentinel a real sample can't give
    for _ in range(CPU_SAMPLE_EVERY - 1):  # ticks 9..15: not sampled
        run(worker, make_request(route.handler, route=route))
        assert route.cpu_ns == 123_456_789
    run(worker, make_request(route.handler, route=route))  # tick 16: sampled
    assert route.cpu_tick == 16 and route.cpu_ns != 123_456_789


def test_a_late_handler_counts_only_its_budget(worker: Worker) -> None:
    """Past its deadline a handler only says "too slow": the EWMA takes the budget, or a
    single very slow request would keep the route dead on arrival for a long time."""

    def slow(request: Request) -> Response:
        time.sleep(0.02)
        return Response.text("slow")

    route = Route("/slow", slow)
    req = make_request(slow, route=route)
    req.deadline_ns = req.start_ns + 1_000_000  # a 1 ms budget
    run(worker, req)
    assert route.ewma_ns == 1_000_000


# ---- streaming ----------------------------------------------------------------------------


def stream_result(done: list) -> tuple[tuple, StreamChannel]:
    """Check the completion sequence of a stream; returns its Reply and channel."""
    first, last = done[0], done[-1]
    assert not first[3] and first[2][2].__class__ is StreamReply
    assert last[2] is STREAM_DONE and last[3]
    assert all(c[2] is STREAM_WAKE and not c[3] for c in done[1:-1])
    channel = first[2][2].channel
    assert channel.done
    return first[2], channel


def test_a_streamed_body_posts_a_stream_reply_then_stream_done(worker: Worker) -> None:
    closed = threading.Event()

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"ab", b"", b"cd"])  # an empty chunk is skipped

        def close(self) -> None:
            closed.set()

    (status, keep, sr), channel = stream_result(run(worker, make_request(
        lambda r: Response(Body(), 200, None, "text/plain"))))
    assert (status, keep) == (200, True)
    assert b"Transfer-Encoding: chunked\r\n" in sr.head
    assert channel.take() == b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
    assert not channel.failed and closed.is_set()


def test_a_stream_to_http_1_0_is_close_delimited(worker: Worker) -> None:
    (_, keep, sr), channel = stream_result(run(worker, make_request(
        lambda r: Response(iter([b"ab", b"cd"])), version="HTTP/1.0")))
    assert not keep and b"Connection: close\r\n" in sr.head
    assert channel.take() == b"abcd"


def test_a_stream_longer_than_its_length_is_cut_and_fails(worker: Worker) -> None:
    (_, _, sr), channel = stream_result(run(worker, make_request(
        lambda r: Response(iter([b"ab", b"cd"]), 200, [("Content-Length", "3")]))))
    assert b"Content-Length: 3\r\n" in sr.head
    assert channel.take() == b"abc" and channel.failed


def test_a_stream_shorter_than_its_length_fails(worker: Worker) -> None:
    _, channel = stream_result(run(worker, make_request(
        lambda r: Response(iter([b"ab"]), 200, [("Content-Length", "3")]))))
    assert channel.take() == b"ab" and channel.failed


@pytest.mark.parametrize("bad", ["str", "raises"])
def test_a_stream_that_breaks_midway_fails_and_is_logged(
        worker: Worker, bad: str, caplog: pytest.LogCaptureFixture) -> None:
    def body() -> Iterator[Any]:
        yield b"first;"
        if bad == "str":
            yield "a str"
        raise RuntimeError("broke midway")

    with caplog.at_level(logging.ERROR, logger="rtserve.error"):
        _, channel = stream_result(run(worker, make_request(lambda r: Response(body()))))
    assert channel.take() == b"6\r\nfirst;\r\n"  # no last chunk: it must not look complete
    assert channel.failed
    assert any("streamed body" in r.getMessage() for r in caplog.records)


def test_an_aborted_stream_stops_its_producer(pool: WorkerPool) -> None:
    """The client left: the conductor aborts the channel and the blocked worker is freed."""
    worker = Worker(pool, 16)
    stopped = threading.Event()

    def endless() -> Iterator[bytes]:
        try:
            while True:
                yield b"x" * 64
        finally:
            stopped.set()

    pool.submit(worker, "conn-token", 1, make_request(lambda r: Response(endless())))
    (_, _, (_, _, sr), final), = wait_completions(pool, 1)
    assert not final
    sr.channel.abort()
    done = wait_completions(pool, 1, finals=True)
    assert done[-1][2] is STREAM_DONE and done[-1][3]
    assert stopped.is_set()


def test_draining_says_connection_close(worker: Worker) -> None:
    worker.draining = True
    status, keep, data = reply_of(worker, lambda r: Response.text("x"))
    assert status == 200 and not keep and split(data)[1]["connection"] == "close"
