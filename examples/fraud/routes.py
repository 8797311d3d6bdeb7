"""The rtserve app: routes, request parsing, response headers; the logic is service.py.

Routes:

- `POST /authorize` (deadline FRAUD_DEADLINE_MS, 20 ms; precomputed fallback);
- `GET|POST /admin/stall` (loopback clients only): read or set the stall switch;
- `GET /hello`, `GET /slow`, `POST /echo`: the original demo (examples/hello.py);
- `POST /score`: the first demo's toy scorer (examples/fraud/legacy.py).

Each decision carries `X-Fraud-Path` (model, rules) and `Server-Timing` (ms): `wait`
(first byte to handler start: read, parse, queue), `features`, `model`, and `handler`
(first byte to the response built), which bench/fraud_bench.py splits a request's time by.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from examples import hello
from rtserve import App, Request, Response

from . import legacy
from .admin import is_local_client, parse_stall
from .memstore import InProcessStore
from .model import Model
from .service import FraudService, Settings
from .stall import StallingStore, StallSwitch
from .store import FeatureStore
from .transaction import InvalidField, NotJSON, parse_body


def store_from_env(env: Mapping[str, str]) -> FeatureStore:
    """Redis when FRAUD_REDIS_URL is set, else the in-process store (FRAUD_MAX_CARDS)."""
    url = env.get("FRAUD_REDIS_URL")
    if url:
        from .redisstore import RedisStore

        return RedisStore(url, env.get("FRAUD_REDIS_PREFIX", "fraud:"))
    return InProcessStore(max_cards=int(env.get("FRAUD_MAX_CARDS", "100000")))


def create_app(store: FeatureStore | None = None, model: Model | None = None,
               settings: Settings | None = None, stall: StallSwitch | None = None,
               env: Mapping[str, str] | None = None) -> App:
    """The reference service; what is not given is built from `env` (os.environ)."""
    env = os.environ if env is None else env
    settings = settings or Settings.from_env(env)
    stall = stall or StallSwitch.from_env(env)
    if store is None:
        store = store_from_env(env)
    service = FraudService(StallingStore(store, stall), model or Model(), settings)
    app = App()
    app.service = service  # type: ignore[attr-defined]  # for tests and tools
    app.stall = stall  # type: ignore[attr-defined]
    fallback = Response.json(service.fallback_body())

    @app.post("/authorize", deadline_ms=settings.deadline_ms, fallback=fallback)
    def authorize(request: Request) -> Response:
        try:
            tx = parse_body(request.body)
        except NotJSON as exc:
            return Response.json({"error": str(exc)}, 400)
        except InvalidField as exc:
            return Response.json({"error": str(exc), "field": exc.field}, 422)
        out = service.decide(tx, request.remaining)
        resp = Response.json(out.body())
        wait_ms = (request.t_start - request.start_ns) / 1e6
        handler_ms = (time.monotonic_ns() - request.start_ns) / 1e6
        resp.headers.append(("X-Fraud-Path", out.path))
        resp.headers.append(("Server-Timing", f"wait;dur={wait_ms:.3f}, features;dur="
                             f"{out.features_s * 1e3:.3f}, model;dur={out.model_s * 1e3:.3f}, "
                             f"handler;dur={handler_ms:.3f}"))
        return resp

    @app.route("/admin/stall", ("GET", "POST"))
    def admin_stall(request: Request) -> Response:
        if not is_local_client(request.client, request.headers):
            return Response.json({"error": "admin endpoints answer loopback clients only"},
                                 403)
        if request.method == "POST":
            try:
                stall.set(*parse_stall(request.body))
            except ValueError as exc:
                return Response.json({"error": str(exc)}, 422)
        return Response.json(stall.state())

    app.get("/hello")(hello.hello)
    app.get("/slow")(hello.slow)
    app.post("/echo")(hello.echo)
    app.post("/score", deadline_ms=20, fallback=legacy.REVIEW)(legacy.score)

    @app.get("/")
    def index(request: Request) -> Response:
        return Response.text("POST /authorize with a JSON transaction (examples/fraud/"
                             "README.md); /hello, /slow, /echo; /metrics, /readyz, /livez\n")

    return app

