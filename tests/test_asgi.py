"""The ASGI adapter with raw ASGI apps: detection, the protocol, errors, backpressure, lifespan."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

from rtserve.asgi import ASGIApp
from rtserve.config import Config
from rtserve.interfaces import detect_interface
from rtserve.server import as_dispatcher
from rtserve.wsgi import WSGIApp
from tests.apps.asgi_apps import make_fastapi
from tests.helpers import (
    Client,
    connect,
    read_response,
    recv_until_closed,
    server_thread,
    wait_for,
)

# ---- detection ----------------------------------------------------------------------


async def plain_asgi(scope: dict, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class ClassBased:
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await plain_asgi(scope, receive, send)


def wsgi_app(environ: dict, start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


def test_detection_of_every_interface():
    from rtserve import App

    assert detect_interface(plain_asgi) == "asgi"
    assert detect_interface(ClassBased()) == "asgi"
    assert detect_interface(make_fastapi()) == "asgi"
    assert detect_interface(ClassBased) == "wsgi"  # the class is a plain callable
    assert detect_interface(wsgi_app) == "wsgi"
    assert detect_interface(App()) == "native"
    import falcon
    import falcon.asgi

    assert detect_interface(falcon.asgi.App()) == "asgi"
    assert detect_interface(falcon.App()) == "wsgi"
    with pytest.raises(TypeError):
        detect_interface(42)
    cfg = Config(_env={})
    assert isinstance(as_dispatcher(plain_asgi, cfg), ASGIApp)
    assert isinstance(as_dispatcher(wsgi_app, cfg), WSGIApp)
    forced = Config(_env={}, interface="wsgi")
    assert isinstance(as_dispatcher(plain_asgi, forced), WSGIApp)
    assert isinstance(as_dispatcher(wsgi_app, Config(_env={}, interface="asgi")), ASGIApp)


# ---- the protocol, message by message ---------------------------------------------------


def serve(app: Any, **settings: Any) -> Any:
    return server_thread(app, **settings)


def request(addr: Any, raw: bytes) -> tuple[int, dict, bytes]:
    s = connect(addr)
    try:
        s.sendall(raw)
        return read_response(s)
    finally:
        s.close()


def test_request_body_in_chunks_then_disconnect_after_the_response():
    seen: list[tuple[int, bool]] = []
    after: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        more = True
        while more:
            msg = await receive()
            seen.append((len(msg["body"]), msg["more_body"]))
            more = msg["more_body"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"%d" % sum(n for n, _ in seen)})
        after.append((await receive())["type"])  # complete: disconnect at once

    body = os.urandom(150_000)
    with serve(app) as srv:
        c = Client(srv.address)
        status, _, got = c.request("POST", "/", body=body)
        c.close()
    assert status == 200 and got == b"150000"
    assert seen == [(65536, True), (65536, True), (18928, False)]
    assert after == ["http.disconnect"]


def test_streamed_response_is_chunked_and_a_length_is_honoured():
    async def app(scope: dict, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"6")] if scope["path"] == "/len" else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for part in (b"abc", b"def"):
            await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with serve(app) as srv:
        c = Client(srv.address)
        status, h, body = c.request("GET", "/")
        assert h["transfer-encoding"] == "chunked" and body == b"abcdef"
        status, h, body = c.request("GET", "/len")
        assert "transfer-encoding" not in h and h["content-length"] == "6" and body == b"abcdef"
        c.close()
        # HTTP/1.0 without a length: close-delimited
        status, h, body = request(srv.address, b"GET / HTTP/1.0\r\n\r\n")
        assert status == 200 and body == b"abcdef"


def test_streamed_body_off_its_content_length_raises_in_the_app_and_closes():
    """Longer: the piece that passes the length is not sent, the app's `send` raises (as on
    uvicorn) and the connection closes. Shorter: what came is sent, then the close."""
    raised: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"6")]})
        await send({"type": "http.response.body", "body": b"abcd", "more_body": True})
        await asyncio.sleep(0)
        tail = b"efgh" if scope["path"] == "/long" else b"e"
        try:
            await send({"type": "http.response.body", "body": tail})
        except RuntimeError as exc:
            raised.append(str(exc))
            raise

    with serve(app) as srv:
        for path in ("/long", "/short"):
            s = connect(srv.address)
            s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
            data = recv_until_closed(s)  # the close: the client sees a short body
            s.close()
            assert data.startswith(b"HTTP/1.1 200") and b"content-length: 6" in data.lower()
            body = data.split(b"\r\n\r\n", 1)[1]
            assert body == (b"abcd" if path == "/long" else b"abcde")
    assert raised == ["ASGI response body longer than its Content-Length",
                      "ASGI response body shorter than its Content-Length"]


@pytest.mark.parametrize("case", ["body-first", "start-twice", "no-response", "raise",
                                  "bad-header", "str-body", "returns-value", "trailers"])
def test_out_of_order_messages_before_the_head_are_a_500(case):
    async def app(scope: dict, receive: Any, send: Any) -> Any:
        start = {"type": "http.response.start", "status": 200, "headers": []}
        if case == "body-first":
            await send({"type": "http.response.body", "body": b"x"})
        elif case == "start-twice":
            await send(start)
            await send(start)
        elif case == "raise":
            raise RuntimeError("app bug")
        elif case == "bad-header":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"x-bad", b"a\r\nSet-Cookie: evil=1")]})
            await send({"type": "http.response.body", "body": b"x"})
        elif case == "str-body":
            await send(start)
            await send({"type": "http.response.body", "body": "text"})
        elif case == "returns-value":
            return 42
        elif case == "trailers":
            await send({**start, "trailers": True})
        # "no-response": return without sending anything

    with serve(app) as srv:
        c = Client(srv.address)
        status, h, body = c.request("GET", "/")
        assert status == 500, case
        assert b"evil" not in body and "set-cookie" not in h
        c.close()


def test_a_stream_cut_short_closes_the_connection():
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("failed midway")

    with serve(app) as srv:
        s = connect(srv.address)
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        data = recv_until_closed(s)  # never a hang: the connection closes
        s.close()
    assert data.startswith(b"HTTP/1.1 200 ") and b"partial" in data
    assert not data.endswith(b"0\r\n\r\n")  # no terminating chunk: it must not look whole


def test_a_message_after_the_response_raises_in_the_app():
    errors: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        try:
            await send({"type": "http.response.body", "body": b"more"})
        except RuntimeError as exc:
            errors.append(str(exc))

    with serve(app) as srv:
        status, _, body = request(srv.address, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 204 and body == b""
    assert errors and "after the response completed" in errors[0]


def test_websocket_upgrade_is_refused_with_501_and_the_app_never_sees_it():
    calls: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        calls.append(scope["type"])
        await plain_asgi(scope, receive, send)

    with serve(app) as srv:
        status, h, body = request(
            srv.address,
            b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        assert status == 501 and b"WebSocket" in body
        assert "http" not in calls and "websocket" not in calls
        assert request(srv.address, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200


def test_send_awaits_at_the_high_water_mark_for_a_slow_reader():
    """A producer far faster than its reader: the server buffers about the high-water
    mark, not the whole response, and the loop thread stays free for other requests."""
    produced: list[int] = []
    total = 256 * 65536  # far more than the kernel's socket buffers on loopback take

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["path"] == "/ping":
            await plain_asgi(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"x" * 65536
        for _ in range(total // 65536):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            produced.append(1)
        await send({"type": "http.response.body", "body": b""})

    with serve(app, stream_high_water=131072) as srv:
        s = connect(srv.address)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        first = s.recv(1024)
        assert first.startswith(b"HTTP/1.1 200 ")
        from rtserve.stream import StreamChannel

        def parked() -> bool:  # the producer awaits: the channel is above the high-water mark
            bodies = [c.body for c in list(srv.conns.values())]
            return any(b.__class__ is StreamChannel and b._producer_waiting for b in bodies)

        wait_for(parked, what="the producer to wait at the high-water mark")
        assert len(produced) < total // 65536  # held back: not all produced
        # While the big reader stalls, the loop still answers others.
        assert request(srv.address, b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")[2] == b"ok"
        got = len(first)
        s.settimeout(10)
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got += len(data)
            if data.endswith(b"0\r\n\r\n"):
                break
        s.close()
    assert got > total and len(produced) == total // 65536  # all of it, framed


# ---- lifespan -------------------------------------------------------------------------


def test_lifespan_unsupported_app_is_served_anyway():
    async def app(scope: dict, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"  # raises for the lifespan scope
        await plain_asgi(scope, receive, send)

    with serve(app) as srv:
        assert request(srv.address, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")[2] == b"ok"


def test_lifespan_failure_exits_3_with_the_apps_message(tmp_path):
    (tmp_path / "failing.py").write_text(textwrap.dedent("""
        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                await receive()
                await send({"type": "lifespan.startup.failed",
                            "message": "model file missing: /models/v3.bin"})
    """))
    proc = subprocess.run(
        [sys.executable, "-m", "rtserve", "failing:app", "--bind", "127.0.0.1:0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 3
    assert "model file missing: /models/v3.bin" in proc.stderr


def test_lifespan_on_makes_an_exception_a_failed_startup():
    async def app(scope: dict, receive: Any, send: Any) -> None:
        raise RuntimeError("no lifespan here")

    from rtserve.server import Server

    cfg = Config(_env={}, bind="127.0.0.1:0", lifespan="on")
    srv = Server(app, cfg)
    done = threading.Event()
    codes: list[int] = []
    t = threading.Thread(target=lambda: (codes.append(srv.serve()), done.set()))
    t.start()
    assert done.wait(20)
    assert codes == [3] and srv.address is None  # never listened


def test_a_drain_lets_the_running_request_finish_and_runs_lifespan_shutdown():
    entered = threading.Event()
    release = threading.Event()
    shutdown = threading.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            shutdown.set()
            await send({"type": "lifespan.shutdown.complete"})
            return
        entered.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        await plain_asgi(scope, receive, send)

    with serve(app) as srv:
        s = connect(srv.address)
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert entered.wait(10)
        srv.stop()  # graceful: the listener closes, the request in flight finishes
        wait_for(lambda: srv.draining, what="the drain to begin")
        release.set()
        status, h, body = read_response(s)
        s.close()
        assert (status, body) == (200, b"ok") and h["connection"] == "close"
        assert srv.stopped.wait(10)
    assert shutdown.is_set()


def test_several_loops_each_run_their_own_lifespan_and_serve():
    startups: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            startups.append(threading.current_thread().name)
            scope["state"]["loop"] = threading.current_thread().name
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        here = threading.current_thread().name
        assert scope["state"]["loop"] == here  # the state made on this very loop
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": here.encode()})

    with serve(app, asgi_loops=2, asgi_loop="asyncio") as srv:
        c = Client(srv.address)
        names = {c.request("GET", "/")[2] for _ in range(6)}
        c.close()
    assert sorted(startups) == ["rtserve-asgi-0", "rtserve-asgi-1"]
    assert names == {b"rtserve-asgi-0", b"rtserve-asgi-1"}  # round-robin over both


# ---- the channel's event-loop side ------------------------------------------------------


def test_stream_channel_offer_and_producer_wake():
    from rtserve.stream import OFFER_ABORTED, OFFER_FULL, OFFER_OK, StreamChannel

    reader_wakes: list[int] = []
    producer_wakes: list[int] = []
    ch = StreamChannel(10, lambda: reader_wakes.append(1), lambda: producer_wakes.append(1))
    assert ch.take() == b""  # the conductor asked and found nothing: it wants a wake-up
    assert ch.offer(b"12345") == OFFER_OK and reader_wakes == [1]
    assert ch.offer(b"678901") == OFFER_FULL  # queued, but above the mark: wait
    assert producer_wakes == []
    assert ch.take() == b"12345678901" and producer_wakes == [1]  # room: the producer goes on
    assert ch.take() == b"" and producer_wakes == [1]  # no second wake without a wait
    ch.abort()
    assert producer_wakes == [1, 1]  # told even when not waiting (it may be idle)
    assert ch.offer(b"x") == OFFER_ABORTED
    threaded = StreamChannel(10, lambda: None)  # a worker's channel: no producer_wake
    threaded.put(b"abc")
    assert threaded.take() == b"abc"
    threaded.abort()
