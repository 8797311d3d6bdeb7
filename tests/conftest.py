"""Shared fixtures: a demo-like app served on 127.0.0.1, and the handler `gate`.

Helpers that are not fixtures (Gate, Client, wait_for, server_thread ...) live in
tests/helpers.py; `make_app` stays here because several files build on it.
"""

from __future__ import annotations

import ast
import importlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rtserve
from rtserve import App, Request, Response
from tests.helpers import Gate, server_thread

ROOT = Path(__file__).resolve().parent.parent


def compiled_modules() -> list[str]:
    """setup.py's COMPILED: the modules the compiled build (docs/compiled.md) compiles."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "COMPILED":
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no COMPILED list")


def pytest_configure(config: pytest.Config) -> None:
    """`make test`'s second pass sets RTSERVE_EXPECT_COMPILED=1: it must be testing the
    installed compiled build, every module of COMPILED a C extension, not this tree's
    Python (which an editable install or a PYTHONPATH would import instead)."""
    if os.environ.get("RTSERVE_EXPECT_COMPILED") != "1":
        return
    where = Path(rtserve.__file__).resolve().parent
    if where == ROOT / "src" / "rtserve":
        raise pytest.UsageError(f"RTSERVE_EXPECT_COMPILED=1 but rtserve imports from {where}")
    for name in compiled_modules():
        path = importlib.import_module(f"rtserve.{name}").__file__ or ""
        if not path.endswith(".so"):
            raise pytest.UsageError(f"RTSERVE_EXPECT_COMPILED=1 but rtserve.{name} is {path}")


def pytest_report_header(config: pytest.Config) -> str:
    compiled = [n for n in compiled_modules()
                if (importlib.import_module(f"rtserve.{n}").__file__ or "").endswith(".so")]
    kind = f"compiled ({len(compiled)} modules)" if compiled else "pure Python"
    return f"rtserve: {kind}, from {Path(rtserve.__file__).parent}"


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
