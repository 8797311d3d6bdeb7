"""Shared fixtures: a demo-like app served on 127.0.0.1, and the handler `gate`.

Helpers that are not fixtures (Gate, Client, wait_for, server_thread ...) live in
tests/helpers.py; `make_app` stays here because several files build on it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from rtserve import App, Request, Response
from tests.helpers import Gate, server_thread


def make_app() -> App:
    app = App()

    @app.get("/hello")
    def hello(request: Request) -> Response:
        return Response.text("Hello, world!\n")

    @app.post("/echo")
    def echo(request: Request) -> Response:
        return Response(request.body, 200, None, "application/octet-stream")

    @app.get("/slow")
    def slow(request: Request) -> Response:
        time.sleep(float(request.query_param("seconds", "0.5")))
        return Response.text("slow\n")

    @app.get("/big")
    def big(request: Request) -> Response:
        size = int(request.query_param("size", str(4 << 20)))
        return Response(bytes(range(256)) * (size // 256), 200, None, "application/octet-stream")

    @app.get("/stream")
    def stream(request: Request) -> Response:
        n = int(request.query_param("n", "5"))
        return Response((b"part%d;" % i for i in range(n)), 200, None, "text/plain")

    @app.get("/boom")
    def boom(request: Request) -> Response:
        raise RuntimeError("secret internal detail")

    @app.get("/inject")
    def inject(request: Request) -> Response:
        return Response.text("x", headers=[("X-Bad", "a\r\nSet-Cookie: evil=1")])

    @app.get("/headers")
    def headers(request: Request) -> Response:
        return Response.json({
            "path": request.path,
            "query": request.query,
            "host": request.headers.get("HOST"),
            "client": list(request.client) if request.client else None,
        })

    return app


@pytest.fixture
def app() -> App:
    return make_app()


@pytest.fixture
def server(app):
    with server_thread(app, threads=8) as srv:
        yield srv


@pytest.fixture
def addr(server):
    return server.address[0], server.address[1]


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()  # never leave a worker blocked behind a failed test
