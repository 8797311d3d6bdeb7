"""Real FastAPI and Starlette apps for the ASGI tests, one fresh instance per server.

`Probe` carries the threading.Events the apps set from their `finally` blocks and
background tasks, so tests wait on events, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import BackgroundTasks, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import FileResponse, Response
from starlette.routing import Route


class Probe:
    """Events set by the apps (any thread) and waited on by the tests."""

    def __init__(self) -> None:
        self.background_ran = threading.Event()
        self.slow_finally = threading.Event()
        self.stream_finally = threading.Event()
        self.wait_finally = threading.Event()
        self.entered = threading.Event()
        self.shutdown = threading.Event()
        self.loop_threads: set[str] = set()


class Transaction(BaseModel):
    id: int
    amount: float
    currency: str = "EUR"


class Teapot(Exception):
    pass


def make_fastapi(probe: Probe | None = None) -> FastAPI:
    probe = probe or Probe()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"model": "fraud-v3"}
        probe.shutdown.set()

    app = FastAPI(lifespan=lifespan)

    @app.middleware("http")
    async def stamp(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["X-Middleware"] = "yes"
        return response

    @app.exception_handler(Teapot)
    async def teapot(request: Request, exc: Teapot) -> JSONResponse:
        return JSONResponse({"error": "teapot"}, status_code=418)

    @app.get("/items/{item_id}")
    async def item(item_id: int, q: str | None = None, limit: int = 10) -> dict[str, Any]:
        return {"item_id": item_id, "q": q, "limit": limit}

    @app.post("/score")
    async def score(tx: Transaction) -> dict[str, Any]:
        return {"id": tx.id, "decision": "approve" if tx.amount < 100 else "review",
                "currency": tx.currency}

    @app.post("/form")
    async def form(name: str = Form(...), amount: float = Form(...)) -> dict[str, Any]:
        return {"name": name, "amount": amount}

    @app.post("/upload")
    async def upload(file: UploadFile = File(...), note: str = Form(...)) -> dict[str, Any]:
        data = await file.read()
        return {"filename": file.filename, "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "note": note}

    @app.post("/raw")
    async def raw(request: Request) -> dict[str, Any]:
        sizes = [len(chunk) async for chunk in request.stream()]
        return {"total": sum(sizes), "largest": max(sizes) if sizes else 0}

    @app.get("/stream")
    async def stream(n: int = 3) -> StreamingResponse:
        async def rows() -> AsyncIterator[bytes]:
            for i in range(n):
                yield f"row {i}\n".encode()
        return StreamingResponse(rows(), media_type="text/plain")

    @app.get("/sse")
    async def sse(n: int = 3) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            for i in range(n):
                await asyncio.sleep(0)
                yield f"id: {i}\nevent: tick\ndata: {{\"n\": {i}}}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/endless")
    async def endless() -> StreamingResponse:
        async def forever() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"x" * 1024 + b"\n"
                    await asyncio.sleep(0.01)
            finally:
                probe.stream_finally.set()
        return StreamingResponse(forever(), media_type="text/plain")

    @app.post("/background")
    async def background(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(probe.background_ran.set)
        return {"queued": "yes"}

    @app.get("/teapot")
    async def raise_teapot() -> None:
        raise Teapot()

    @app.get("/missing")
    async def missing() -> None:
        raise HTTPException(status_code=404, detail="no such thing")

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("endpoint failed")

    @app.get("/state")
    async def state(request: Request) -> dict[str, Any]:
        return {"model": request.state.model}

    @app.get("/sync")
    def sync_endpoint() -> dict[str, Any]:
        return {"thread": threading.current_thread().name, "tid": threading.get_native_id()}

    @app.get("/async-thread")
    async def async_thread() -> dict[str, str]:
        return {"thread": threading.current_thread().name}

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        probe.entered.set()
        try:
            await asyncio.sleep(30)
        finally:
            probe.slow_finally.set()
        return {"late": "yes"}

    @app.get("/wait")
    async def wait() -> dict[str, str]:
        probe.entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            probe.wait_finally.set()
        return {"never": "reached"}

    @app.get("/budget")
    async def budget(request: Request) -> dict[str, Any]:
        ext = request.scope["extensions"]["rtserve.deadline"]
        left = ext["remaining"]()
        return {"has_deadline": ext["at"] is not None, "unbounded": left == float("inf"),
                "remaining": left if left != float("inf") else -1}

    @app.get("/text", response_class=PlainTextResponse)
    async def text() -> str:
        return "plain text\n"

    return app


# ---- Starlette ------------------------------------------------------------------------


class HeaderMiddleware:
    """A pure ASGI middleware: adds a response header, counts requests."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-pure-asgi", b"1")]
            await send(message)

        await self.app(scope, receive, send_wrapper)


def make_starlette(file_path: str, probe: Probe | None = None) -> Starlette:
    probe = probe or Probe()

    async def homepage(request: Any) -> Response:
        return PlainTextResponse("home\n")

    async def echo(request: Any) -> Response:
        body = await request.body()
        return Response(body, media_type=request.headers.get("content-type", "text/plain"))

    async def user(request: Any) -> Response:
        return JSONResponse({"user": request.path_params["name"],
                             "query": dict(request.query_params)})

    async def download(request: Any) -> Response:
        return FileResponse(file_path, media_type="application/octet-stream")

    async def scope_view(request: Any) -> Response:
        s = request.scope
        return JSONResponse({
            "http_version": s["http_version"], "method": s["method"], "scheme": s["scheme"],
            "path": s["path"], "raw_path": s["raw_path"].decode("latin-1"),
            "query_string": s["query_string"].decode("latin-1"), "root_path": s["root_path"],
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in s["headers"]],
            "client_is_tuple": isinstance(s["client"], list | tuple),
            "server_is_tuple": isinstance(s["server"], list | tuple),
            "asgi": s["asgi"],
        })

    async def boom(request: Any) -> Response:
        raise ValueError("bad value")

    async def value_error(request: Any, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=400)

    return Starlette(
        routes=[
            Route("/", homepage),
            Route("/echo", echo, methods=["POST", "PUT"]),
            Route("/users/{name}", user),
            Route("/file", download),
            Route("/scope", scope_view),
            Route("/boom", boom),
        ],
        middleware=[Middleware(HeaderMiddleware)],
        exception_handlers={ValueError: value_error},
    )
