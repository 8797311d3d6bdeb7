"""Real frameworks on rtserve: a Flask app and a Falcon app, over real sockets."""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import falcon
import pytest
import requests
from flask import Flask, Response, jsonify, request, send_file, stream_with_context, url_for

from tests.helpers import connect, recv_until_closed, running_server


def url(addr: tuple[str, int], path: str) -> str:
    return f"http://{addr[0]}:{addr[1]}{path}"


# ---- Flask -----------------------------------------------------------------------------


def make_flask(data_file: str, closed: threading.Event) -> Flask:
    app = Flask(__name__)

    @app.get("/hello/<name>")
    def hello(name: str):
        return f"Hello, {name}! {url_for('hello', name='x')}\n"

    @app.post("/score")
    def score():
        payload = request.get_json()
        return jsonify(decision="approve" if payload["amount"] < 100 else "review",
                       remote=request.remote_addr, scheme=request.scheme)

    @app.post("/form")
    def form():
        return jsonify(dict(request.form))

    @app.post("/upload")
    def upload():
        f = request.files["file"]
        data = f.read()
        return jsonify(filename=f.filename, size=len(data),
                       sha256=hashlib.sha256(data).hexdigest(), note=request.form["note"])

    @app.get("/stream")
    def stream():
        n = int(request.args.get("n", "3"))

        def gen():
            try:
                for i in range(n):
                    yield f"row {i}\n"
            finally:
                closed.set()

        return Response(stream_with_context(gen()), mimetype="text/plain")

    @app.get("/file")
    def file():
        return send_file(data_file, mimetype="application/octet-stream")

    @app.get("/boom")
    def boom():
        raise RuntimeError("flask handler failed")

    return app


@pytest.fixture
def flask_server(tmp_path):
    data_file = tmp_path / "payload.bin"
    data_file.write_bytes(os.urandom(300_000))
    closed = threading.Event()
    app = make_flask(str(data_file), closed)
    with running_server(app, root_path="/svc") as addr:
        yield addr, data_file, closed


def test_flask_routes_and_url_building_under_root_path(flask_server):
    addr, _, _ = flask_server
    r = requests.get(url(addr, "/svc/hello/world"))
    assert r.status_code == 200
    assert r.text == "Hello, world! /svc/hello/x\n"  # SCRIPT_NAME reaches url_for
    missing = requests.get(url(addr, "/svc/nope"))
    assert missing.status_code == 404
    assert requests.post(url(addr, "/svc/hello/world")).status_code == 405
    head = requests.head(url(addr, "/svc/hello/world"))
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(r.content))
    assert requests.get(url(addr, "/svc/boom")).status_code == 500


def test_flask_json(flask_server):
    addr, _, _ = flask_server
    r = requests.post(url(addr, "/svc/score"), json={"amount": 42},
                      headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert r.json() == {"decision": "approve", "remote": "203.0.113.9", "scheme": "https"}
    assert requests.post(url(addr, "/svc/score"), json={"amount": 500}).json()["decision"] == (
        "review")


def test_flask_form_post(flask_server):
    addr, _, _ = flask_server
    r = requests.post(url(addr, "/svc/form"), data={"name": "Zoë", "amount": "12.50"})
    assert r.json() == {"name": "Zoë", "amount": "12.50"}


def test_flask_multipart_file_upload(flask_server):
    addr, data_file, _ = flask_server
    data = data_file.read_bytes()
    r = requests.post(url(addr, "/svc/upload"), files={"file": ("model.bin", data)},
                      data={"note": "weights"})
    assert r.status_code == 200
    assert r.json() == {"filename": "model.bin", "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "note": "weights"}


def test_flask_streaming_response(flask_server):
    addr, _, closed = flask_server
    r = requests.get(url(addr, "/svc/stream?n=50"))
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert r.text == "".join(f"row {i}\n" for i in range(50))
    assert closed.wait(10)


def test_flask_send_file_uses_sendfile(flask_server, monkeypatch):
    addr, data_file, _ = flask_server
    calls = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        calls.append(count)
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    r = requests.get(url(addr, "/svc/file"))
    assert r.content == data_file.read_bytes()
    assert calls, "send_file did not go through os.sendfile"


# ---- Falcon ------------------------------------------------------------------------------


class Item:
    def __init__(self) -> None:
        self.items: dict[str, Any] = {}

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        if key not in self.items:
            raise falcon.HTTPNotFound(title="no such item")
        resp.media = {"key": key, "value": self.items[key]}

    def on_put(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        self.items[key] = req.get_media()["value"]
        resp.status = falcon.HTTP_201
        resp.media = {"stored": key, "forwarded_host": req.remote_addr}


class Export:
    def __init__(self, path: str) -> None:
        self.path = path

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "application/octet-stream"
        resp.stream = open(self.path, "rb")  # noqa: SIM115 - Falcon/the server close it
        resp.content_length = os.path.getsize(self.path)


class Ticker:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/plain"
        resp.stream = (b"tick %d\n" % i for i in range(int(req.get_param("n", default="3"))))


class Fail:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise ValueError("falcon handler failed")


def test_falcon_app(tmp_path):
    export = tmp_path / "export.csv"
    export.write_bytes(b"id,value\n" + b"".join(b"%d,%d\n" % (i, i * i) for i in range(5000)))
    app = falcon.App()
    app.add_route("/items/{key}", Item())
    app.add_route("/export", Export(str(export)))
    app.add_route("/ticker", Ticker())
    app.add_route("/fail", Fail())
    with running_server(app) as addr:
        put = requests.put(url(addr, "/items/a"), json={"value": [1, 2]})
        got = requests.get(url(addr, "/items/a"))
        missing = requests.get(url(addr, "/items/zzz"))
        exported = requests.get(url(addr, "/export"))
        ticker = requests.get(url(addr, "/ticker?n=4"))
        fail = requests.get(url(addr, "/fail"))
        s = connect(addr)
        s.sendall(b"GET /items/a HTTP/1.0\r\n\r\n")  # no Host: the bound address
        http10 = recv_until_closed(s)
        s.close()
    assert put.status_code == 201 and put.json() == {"stored": "a", "forwarded_host": "127.0.0.1"}
    assert got.json() == {"key": "a", "value": [1, 2]}
    assert missing.status_code == 404 and missing.json()["title"] == "no such item"
    assert exported.content == export.read_bytes()
    assert exported.headers["Content-Length"] == str(export.stat().st_size)
    assert ticker.text == "tick 0\ntick 1\ntick 2\ntick 3\n"
    assert fail.status_code == 500
    assert http10.startswith(b"HTTP/1.1 200 ") and http10.endswith(b'{"key": "a", "value": [1, 2]}')
