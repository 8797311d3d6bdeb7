"""The benchmark logic as an ASGI app, for uvicorn (uvloop + httptools).

``/hello`` and ``/big`` answer on the event loop. ``/score`` runs the blocking logic
(CPU burn, occasional ``time.sleep``) in a pool of 8 threads, the way FastAPI runs a
plain ``def`` endpoint: running it on the loop would block every other connection for the
200 ms stall, which nobody deploys. 8 threads match rtserve's ``--threads 8`` and
gunicorn's ``--threads 8``; ``BENCH_POOL_THREADS`` changes the count (bench/run.py
``--sweep-threads`` sets it, so uvicorn's pool is swept like the other servers' threads).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from apps import logic

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_POOL = ThreadPoolExecutor(max_workers=int(os.environ.get("BENCH_POOL_THREADS", "8")),
                           thread_name_prefix="score")
_HELLO_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"),
                (b"content-length", str(len(logic.HELLO)).encode())],
}
_HELLO_BODY = {"type": "http.response.body", "body": logic.HELLO}
_BIG_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/octet-stream"),
                (b"content-length", str(len(logic.BIG)).encode())],
}
_BIG_BODY = {"type": "http.response.body", "body": logic.BIG}


async def _send_simple(send: Send, status: int, ctype: bytes, body: bytes) -> None:
    """Send a complete response with a Content-Length."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Dispatch on the path to the three benchmark endpoints; 404 otherwise."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/hello":
        await send(_HELLO_START)
        await send(_HELLO_BODY)
        return
    if path == "/score" and scope["method"] == "POST":
        chunks = []
        more = True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(_POOL, logic.score, b"".join(chunks))
        except ValueError:
            await _send_simple(send, 400, b"text/plain", b"bad")
            return
        await _send_simple(send, 200, b"application/json", out)
        return
    if path == "/big":
        await send(_BIG_START)
        await send(_BIG_BODY)
        return
    await _send_simple(send, 404, b"text/plain", b"not found")
