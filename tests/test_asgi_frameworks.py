"""Real FastAPI and Starlette apps on rtserve, over real sockets (requests and raw sockets)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator

import pytest
import requests

from tests.apps.asgi_apps import Probe, make_fastapi, make_starlette
from tests.helpers import Client, connect, read_response, server_thread, wait_for


def url(addr: tuple[str, int], path: str) -> str:
    return f"http://{addr[0]}:{addr[1]}{path}"


@pytest.fixture(scope="module")
def fastapi_server() -> Iterator[tuple[tuple[str, int], Probe, object]]:
    probe = Probe()
    with server_thread(make_fastapi(probe), max_body_size=8 << 20) as srv:
        yield (srv.address[0], srv.address[1]), probe, srv


@pytest.fixture(scope="module")
def starlette_server(tmp_path_factory) -> Iterator[tuple[tuple[str, int], bytes]]:
    data = os.urandom(300_000)
    path = tmp_path_factory.mktemp("asgi") / "payload.bin"
    path.write_bytes(data)
    with server_thread(make_starlette(str(path))) as srv:
        yield (srv.address[0], srv.address[1]), data


# ---- FastAPI ---------------------------------------------------------------------------


def test_fastapi_path_and_query_params(fastapi_server):
    addr, _, _ = fastapi_server
    r = requests.get(url(addr, "/items/42?q=caf%C3%A9&limit=3"))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"item_id": 42, "q": "café", "limit": 3}
    assert r.headers["x-middleware"] == "yes"  # the http middleware ran


def test_fastapi_json_in_and_out(fastapi_server):
    addr, _, _ = fastapi_server
    r = requests.post(url(addr, "/score"), json={"id": 7, "amount": 42.5})
    assert r.status_code == 200
    assert r.json() == {"id": 7, "decision": "approve", "currency": "EUR"}


def test_fastapi_validation_errors_are_422(fastapi_server):
    addr, _, _ = fastapi_server
    r = requests.post(url(addr, "/score"), json={"id": "not a number"})
    assert r.status_code == 422
    locs = {tuple(e["loc"]) for e in r.json()["detail"]}
    assert ("body", "id") in locs and ("body", "amount") in locs
    assert requests.get(url(addr, "/items/abc")).status_code == 422


def test_fastapi_form_and_file_upload(fastapi_server):
    addr, _, _ = fastapi_server
    r = requests.post(url(addr, "/form"), data={"name": "Zoë", "amount": "12.5"})
    assert r.json() == {"name": "Zoë", "amount": 12.5}
    data = os.urandom(2_000_000)  # a large upload: the app reads it in 64 KiB pieces
    r = requests.post(url(addr, "/upload"), files={"file": ("model.bin", data)},
                      data={"note": "weights"})
    assert r.status_code == 200
    assert r.json() == {"filename": "model.bin", "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "note": "weights"}


def test_fastapi_body_arrives_in_bounded_chunks_also_when_chunked(fastapi_server):
    addr, _, _ = fastapi_server
    body = os.urandom(1_000_000)
    r = requests.post(url(addr, "/raw"), data=body)
    assert r.json() == {"total": len(body), "largest": 65536}

    def pieces() -> Iterator[bytes]:  # no length: requests sends Transfer-Encoding: chunked
        for i in range(0, len(body), 100_000):
            yield body[i:i + 100_000]

    r = requests.post(url(addr, "/raw"), data=pieces())
    assert r.json() == {"total": len(body), "largest": 65536}


def test_fastapi_streaming_and_sse(fastapi_server):
    addr, _, _ = fastapi_server
    r = requests.get(url(addr, "/stream?n=4"))
    assert r.status_code == 200 and r.headers["transfer-encoding"] == "chunked"
    assert r.text == "row 0\nrow 1\nrow 2\nrow 3\n"
    with requests.get(url(addr, "/sse?n=3"), stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith(b"data:")]
    assert events == [b'data: {"n": 0}', b'data: {"n": 1}', b'data: {"n": 2}']


def test_fastapi_background_task_runs_after_the_response(fastapi_server):
    addr, probe, _ = fastapi_server
    r = requests.post(url(addr, "/background"))
    assert r.json() == {"queued": "yes"}
    assert probe.background_ran.wait(10)


def test_fastapi_exception_handlers_and_errors(fastapi_server):
    addr, _, _ = fastapi_server
    r = requests.get(url(addr, "/teapot"))
    assert r.status_code == 418 and r.json() == {"error": "teapot"}
    r = requests.get(url(addr, "/missing"))
    assert r.status_code == 404 and r.json() == {"detail": "no such thing"}
    r = requests.get(url(addr, "/crash"))
    assert r.status_code == 500
    assert requests.get(url(addr, "/items/1")).status_code == 200  # still serving


def test_fastapi_404_405_and_head(fastapi_server):
    addr, _, _ = fastapi_server
    r = requests.get(url(addr, "/nope"))
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = requests.delete(url(addr, "/items/1"))
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    c = Client(addr)
    try:
        status, headers, body = c.request("HEAD", "/text")
        assert body == b""
        again = c.request("GET", "/text")  # the connection is still in sync
        assert again[0] == 200 and again[2] == b"plain text\n"
        if status == 200:
            assert headers["content-length"] == "11"
    finally:
        c.close()


def test_fastapi_lifespan_state_reaches_requests(fastapi_server):
    addr, _, _ = fastapi_server
    assert requests.get(url(addr, "/state")).json() == {"model": "fraud-v3"}


def test_fastapi_sync_endpoints_run_in_its_thread_pool(fastapi_server):
    addr, _, _ = fastapi_server
    loop_thread = requests.get(url(addr, "/async-thread")).json()["thread"]
    sync_thread = requests.get(url(addr, "/sync")).json()["thread"]
    assert loop_thread.startswith("rtserve-asgi-")  # coroutines run on the loop thread
    assert sync_thread != loop_thread and sync_thread != "rtserve-conductor"


def test_fastapi_sync_calls_reuse_the_thread_pools_threads(fastapi_server):
    """anyio keeps a worker thread while the root task it found lives: the loop's root
    task (asgi_executor.LoopThread._root), not each request's task, so one after another
    the sync calls of a keep-alive client run on one thread, not on a new one each."""
    addr, _, _ = fastapi_server
    with requests.Session() as s:
        tids = {s.get(url(addr, "/sync")).json()["tid"] for _ in range(30)}
    assert len(tids) <= 2, f"{len(tids)} threads for 30 sequential sync calls"


def test_fastapi_sees_its_deadline(fastapi_server):
    addr, _, _ = fastapi_server
    r = requests.get(url(addr, "/budget"), headers={"X-Request-Deadline-Ms": "5000"})
    got = r.json()
    assert got["has_deadline"] is True and 0 < got["remaining"] <= 5.0
    got = requests.get(url(addr, "/budget")).json()
    assert got["has_deadline"] is False and got["unbounded"] is True


def test_fastapi_keep_alive_and_pipelining(fastapi_server):
    addr, _, _ = fastapi_server
    s = connect(addr)
    try:
        req = b"GET /items/%d HTTP/1.1\r\nHost: t\r\n\r\n"
        s.sendall(req % 1 + req % 2 + req % 3)
        f = s.makefile("rb")
        from tests.helpers import read_response_file

        got = [json.loads(read_response_file(f)[2])["item_id"] for _ in range(3)]
        assert got == [1, 2, 3]  # answered in order on one connection
    finally:
        s.close()


def test_fastapi_client_disconnect_mid_stream_ends_the_generator(fastapi_server):
    addr, probe, srv = fastapi_server
    before = srv.asgi.cancelled()["disconnect"]
    s = connect(addr)
    s.sendall(b"GET /endless HTTP/1.1\r\nHost: t\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    s.close()
    assert probe.stream_finally.wait(10)  # the generator's finally ran: the task ended
    wait_for(lambda: srv.asgi.cancelled()["disconnect"] > before, what="a disconnect cancel")
    wait_for(lambda: srv.admission.busy == 0, what="the slot to free")


# ---- Starlette -------------------------------------------------------------------------


def test_starlette_routes_middleware_and_exception_handler(starlette_server):
    addr, _ = starlette_server
    r = requests.get(url(addr, "/"))
    assert r.text == "home\n" and r.headers["x-pure-asgi"] == "1"
    r = requests.get(url(addr, "/users/zoë?tag=a&tag=b&x=1"))
    assert r.json() == {"user": "zoë", "query": {"tag": "b", "x": "1"}}
    r = requests.get(url(addr, "/boom"))
    assert r.status_code == 400 and r.json() == {"error": "bad value"}


def test_starlette_echo_large_body_and_405(starlette_server):
    addr, _ = starlette_server
    body = os.urandom(900_000)
    r = requests.post(url(addr, "/echo"), data=body,
                      headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and r.content == body
    r = requests.get(url(addr, "/echo"))
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"POST", "PUT"}


def test_starlette_file_response_by_pathsend_and_head(starlette_server):
    addr, data = starlette_server
    r = requests.get(url(addr, "/file"))
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-length"] == str(len(data))
    h = requests.head(url(addr, "/file"))
    assert h.status_code == 200 and h.content == b""
    assert h.headers["content-length"] == str(len(data))
    h = requests.head(url(addr, "/"))
    assert h.status_code == 200 and h.headers["content-length"] == "5"


def test_starlette_scope(starlette_server):
    addr, _ = starlette_server
    s = connect(addr)
    try:
        s.sendall(b"GET /scope?a=%20b HTTP/1.0\r\nHost: example\r\nX-Two: 1\r\n"
                  b"x-two: 2\r\n\r\n")
        status, _, body = read_response(s)
    finally:
        s.close()
    got = json.loads(body)
    assert status == 200
    assert got["http_version"] == "1.0" and got["method"] == "GET" and got["scheme"] == "http"
    assert got["query_string"] == "a=%20b" and got["root_path"] == ""
    assert got["headers"] == [["host", "example"], ["x-two", "1"], ["x-two", "2"]]
    assert got["client_is_tuple"] and got["server_is_tuple"]
    assert got["asgi"] == {"version": "3.0", "spec_version": "2.4"}


def test_both_apps_share_nothing_between_servers():
    """Two servers in one process, each with its own loop thread and lifespan."""
    probes = [Probe(), Probe()]
    with server_thread(make_fastapi(probes[0])) as a, server_thread(make_fastapi(probes[1])) as b:
        for srv in (a, b):
            r = requests.get(url(srv.address, "/state"))
            assert r.json() == {"model": "fraud-v3"}
        names = {t.name for t in threading.enumerate() if t.name.startswith("rtserve-asgi-")}
        assert names  # the loop threads are named
    assert all(p.shutdown.wait(10) for p in probes)  # lifespan shutdown ran on each
