"""The benchmark logic as a FastAPI app, for rtserve, uvicorn and granian (ASGI).

``/hello`` and ``/big`` as in logic.py. ``/score`` does the same parse and ~1 ms CPU burn
on the event loop, but its 200 ms stall (1 request in 100) is an ``await``, as a model or
feature-store call through an async client would be: that is the work a deadline can
cancel. Under rtserve, ``--route-deadline /score=50`` answers it with the fallback at
50 ms and cancels the task; uvicorn and granian answer it when the stall ends.

With ``BENCH_FASTAPI_SYNC=1`` ``/score`` is a plain ``def`` instead (FastAPI runs it in
anyio's thread pool; its stall a ``time.sleep``): the CPU-bound sync endpoint whose CPU
is not the loop's (docs/asgi.md, "Sync endpoints").
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from apps import logic

app = FastAPI()
_counter = itertools.count(1)


@app.get("/hello", response_class=PlainTextResponse)
async def hello() -> bytes:
    return logic.HELLO


def _decision(tx: dict[str, Any], acc: int) -> Response:
    amount = float(tx.get("amount", 0.0))
    risk = (acc % 1000) / 1000.0 * 0.1 + (0.5 if amount > 5000 else 0.0)
    body = json.dumps({"id": tx.get("id"), "decision": "decline" if risk > 0.5 else "approve",
                       "risk": round(risk, 4)}).encode()
    return Response(body, media_type="application/json")


async def score(request: Request) -> Response:
    tx = json.loads(await request.body())
    acc = logic.burn()
    if logic.STALL_EVERY and next(_counter) % logic.STALL_EVERY == 0:
        await asyncio.sleep(logic.STALL_SECONDS)
    return _decision(tx, acc)


def score_sync(tx: dict[str, Any] = Body(...)) -> Response:
    acc = logic.burn()
    if logic.STALL_EVERY and next(_counter) % logic.STALL_EVERY == 0:
        time.sleep(logic.STALL_SECONDS)
    return _decision(tx, acc)


app.post("/score")(score_sync if os.environ.get("BENCH_FASTAPI_SYNC") == "1" else score)


@app.get("/big")
async def big() -> Response:
    return Response(logic.BIG, media_type="application/octet-stream")
