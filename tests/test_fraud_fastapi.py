"""The FastAPI twin on a real uvicorn server: same decisions, same refusals."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.fraud_support import Http, tx_body

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def http() -> Iterator[Http]:
    from examples.fraud.fastapi_app import app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    started = threading.Event()
    while not server.started and t.is_alive():  # uvicorn sets `started`; no event to wait on
        started.wait(0.01)
    client = Http(sock.getsockname())
    yield client
    client.close()
    server.should_exit = True
    t.join(10)
    sock.close()


def test_fastapi_gives_the_same_kind_of_answers(http: Http) -> None:
    status, headers, body, _ = http.call("POST", "/authorize", tx_body(card_id="c-fa"))
    assert status == 200 and body["path"] == "model" == headers["x-fraud-path"]
    assert body["decision"] == "approve"
    assert "handler;dur=" in headers["server-timing"]
    status, _, body, _ = http.call("POST", "/authorize", tx_body(channel="fax"))
    assert status == 422 and body["field"] == "channel"
    assert http.call("POST", "/authorize", b"{")[0] == 400
