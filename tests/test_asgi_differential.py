"""The same FastAPI and Starlette apps under rtserve and under uvicorn (the oracle).

Each case is sent to both servers (fresh app instances, both on 127.0.0.1, uvicorn started
here in a thread on a socket we bound); status, body and the headers that matter (content
type, framing, Allow, the apps' own headers) must agree. Date and Server differ by design.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import uvicorn

from tests.apps.asgi_apps import make_fastapi, make_starlette
from tests.helpers import server_thread

COMPARED_HEADERS = ("content-type", "content-length", "allow", "location", "x-middleware",
                    "x-pure-asgi", "content-disposition", "etag", "last-modified",
                    "accept-ranges")


@contextlib.contextmanager
def uvicorn_server(app: Any) -> Iterator[tuple[str, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        for _ in range(1000):
            if server.started:
                break
            t.join(0.01)
        assert server.started, "uvicorn did not start"
        yield sock.getsockname()
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


PAYLOAD = os.urandom(200_000)
UPLOAD = os.urandom(300_000)

# (app, method, path, kwargs for requests)
CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("fastapi", "GET", "/items/1", {}),
    ("fastapi", "GET", "/items/42?q=caf%C3%A9&limit=3", {}),
    ("fastapi", "GET", "/items/abc", {}),
    ("fastapi", "GET", "/items/1?limit=x", {}),
    ("fastapi", "POST", "/score", {"json": {"id": 7, "amount": 42.5}}),
    ("fastapi", "POST", "/score", {"json": {"id": 8, "amount": 5000, "currency": "USD"}}),
    ("fastapi", "POST", "/score", {"json": {"id": "x"}}),
    ("fastapi", "POST", "/score", {"data": b"{not json", "headers": {
        "Content-Type": "application/json"}}),
    ("fastapi", "POST", "/form", {"data": {"name": "Zoë", "amount": "12.5"}}),
    ("fastapi", "POST", "/form", {"data": {"name": "no amount"}}),
    ("fastapi", "POST", "/upload", {"files": {"file": ("m.bin", UPLOAD)},
                                    "data": {"note": "w"}}),
    ("fastapi", "POST", "/raw", {"data": PAYLOAD}),
    ("fastapi", "POST", "/raw", {"data": iter([PAYLOAD[:70_000], PAYLOAD[70_000:]])}),
    ("fastapi", "GET", "/stream?n=5", {}),
    ("fastapi", "GET", "/sse?n=4", {}),
    ("fastapi", "POST", "/background", {}),
    ("fastapi", "GET", "/teapot", {}),
    ("fastapi", "GET", "/missing", {}),
    ("fastapi", "GET", "/crash", {}),
    ("fastapi", "GET", "/state", {}),
    ("fastapi", "GET", "/text", {}),
    ("fastapi", "HEAD", "/text", {}),
    ("fastapi", "GET", "/nope", {}),
    ("fastapi", "DELETE", "/items/1", {}),
    ("fastapi", "GET", "/openapi.json", {}),
    ("fastapi", "GET", "/docs", {}),
    ("fastapi", "GET", "/items/1/", {"allow_redirects": False}),
    ("starlette", "GET", "/", {}),
    ("starlette", "HEAD", "/", {}),
    ("starlette", "POST", "/echo", {"data": PAYLOAD, "headers": {
        "Content-Type": "application/octet-stream"}}),
    ("starlette", "PUT", "/echo", {"data": b"", "headers": {"Content-Type": "text/plain"}}),
    ("starlette", "GET", "/echo", {}),
    ("starlette", "GET", "/users/zo%C3%AB?tag=a&tag=b", {}),
    ("starlette", "GET", "/file", {}),
    ("starlette", "HEAD", "/file", {}),
    ("starlette", "GET", "/file", {"headers": {"Range": "bytes=0-99"}}),
    ("starlette", "GET", "/boom", {}),
    ("starlette", "GET", "/missing", {}),
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Iterator[dict[str, tuple[tuple[str, int], tuple[str, int]]]]:
    path = tmp_path_factory.mktemp("diff") / "payload.bin"
    path.write_bytes(PAYLOAD)
    with contextlib.ExitStack() as stack:
        out = {}
        for name, make in (("fastapi", make_fastapi),
                           ("starlette", lambda: make_starlette(str(path)))):
            rt = stack.enter_context(server_thread(make()))
            uv = stack.enter_context(uvicorn_server(make()))
            out[name] = ((rt.address[0], rt.address[1]), uv)
        yield out


def fetch(addr: tuple[str, int], method: str, path: str, kw: dict[str, Any]) -> Any:
    kw = dict(kw)
    if isinstance(kw.get("data"), type(iter([]))):
        kw["data"] = iter(list(CHUNKED_SOURCES[id(kw["data"])]))
    return requests.request(method, f"http://{addr[0]}:{addr[1]}{path}", timeout=20, **kw)


# A generator body can be consumed once: keep its pieces to replay it to each server.
CHUNKED_SOURCES: dict[int, list[bytes]] = {}
for _case in CASES:
    _data = _case[3].get("data")
    if isinstance(_data, type(iter([]))):
        _pieces = list(_data)
        _case[3]["data"] = iter(_pieces)
        CHUNKED_SOURCES[id(_case[3]["data"])] = _pieces


# Where the two servers differ by design, and so are not compared:
# - how a request body is cut into http.request messages: uvicorn passes on each socket
#   read as it comes, rtserve (which read the whole body before dispatch) 64 KiB pieces;
#   /raw reports the largest piece, so that field is dropped;
# - the port in an absolute Location (each server listens on its own).
BY_DESIGN_KEYS = {"largest"}


def normalised(r: Any, addr: tuple[str, int]) -> tuple[Any, dict[str, str | None]]:
    headers = {name: r.headers.get(name) for name in COMPARED_HEADERS}
    if r.headers.get("content-type", "").startswith("application/json") and r.content:
        body = json.loads(r.content)
        if isinstance(body, dict) and BY_DESIGN_KEYS & body.keys():
            body = {k: v for k, v in body.items() if k not in BY_DESIGN_KEYS}
            headers["content-length"] = None  # the dropped field's digits count in it
    else:
        body = r.content
    here = f"{addr[0]}:{addr[1]}"
    if headers["location"]:
        headers["location"] = headers["location"].replace(here, "HOST")
    return body, headers


def framing(r: Any) -> str:
    if r.headers.get("transfer-encoding", "").lower() == "chunked":
        return "chunked"
    return "length" if "content-length" in r.headers else "close"


@pytest.mark.parametrize(("app", "method", "path", "kw"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_rtserve_answers_like_uvicorn(pairs, app, method, path, kw):
    rt_addr, uv_addr = pairs[app]
    rt = fetch(rt_addr, method, path, kw)
    uv = fetch(uv_addr, method, path, kw)
    assert rt.status_code == uv.status_code
    rt_body, rt_headers = normalised(rt, rt_addr)
    uv_body, uv_headers = normalised(uv, uv_addr)
    assert rt_body == uv_body
    assert rt_headers == uv_headers
    assert framing(rt) == framing(uv)


def test_the_differential_covers_both_frameworks():
    assert len(CASES) >= 35
    assert {c[0] for c in CASES} == {"fastapi", "starlette"}
