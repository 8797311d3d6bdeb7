"""The same service on FastAPI, for the benchmark: `async def` calling the same logic.

    uvicorn examples.fraud.fastapi_app:app --port 8081 --loop uvloop --http httptools

`POST /authorize` parses and validates with the same code, and calls the same
`FraudService.decide` with the same model, store and stall switch (FRAUD_* variables).
This is how such a service is usually written: an `async def` endpoint calling a
synchronous store client and model. Two things differ from rtserve, on purpose, because
they are what FastAPI and uvicorn give:

- the deadline is counted from when the endpoint starts (an ASGI app never learns when
  the request's first byte arrived), and nothing answers for a late handler: there is no
  fallback, the client waits;
- the store call and the model run on the event loop: a stalled fetch blocks every other
  request on the process until its timeout.

Responses carry the same `X-Fraud-Path` and `Server-Timing` (features, model, handler).
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .model import Model
from .routes import store_from_env
from .service import FraudService, Settings
from .stall import StallingStore, StallSwitch
from .transaction import InvalidField, NotJSON, parse_body

settings = Settings.from_env(os.environ)
service = FraudService(StallingStore(store_from_env(os.environ),
                                     StallSwitch.from_env(os.environ)), Model(), settings)
app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@app.post("/authorize")
async def authorize(request: Request):
    t0 = time.monotonic()
    deadline = t0 + settings.deadline_ms / 1000
    body = await request.body()
    try:
        tx = parse_body(body)
    except NotJSON as exc:
        return JSONResponse({"error": str(exc)}, 400)
    except InvalidField as exc:
        return JSONResponse({"error": str(exc), "field": exc.field}, 422)
    out = service.decide(tx, lambda: deadline - time.monotonic())
    handler_ms = (time.monotonic() - t0) * 1e3
    return JSONResponse(out.body(), headers={
        "X-Fraud-Path": out.path,
        "Server-Timing": f"features;dur={out.features_s * 1e3:.3f}, "
                         f"model;dur={out.model_s * 1e3:.3f}, handler;dur={handler_ms:.3f}"})


@app.get("/hello")
async def hello() -> PlainTextResponse:
    return PlainTextResponse("Hello, world!\n")
