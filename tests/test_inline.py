"""Inline routes (`inline=True`): the handler runs on the conductor, no worker hand-off."""

from __future__ import annotations

import threading

import pytest

from rtserve import App, Request, Response
from tests.helpers import REVIEW, Client, scrape_metrics, server_thread


def _app(seen: list[str]) -> App:
    app = App()

    @app.get("/fast", inline=True)
    def fast(request: Request) -> Response:
        seen.append(threading.current_thread().name)
        return Response.text("inline\n")

    @app.get("/worker")
    def worker(request: Request) -> Response:
        seen.append(threading.current_thread().name)
        return Response.text("worker\n")

    @app.get("/stream", inline=True)
    def stream(request: Request) -> Response:
        return Response(iter([b"a", b"b"]), 200)

    @app.get("/boom", inline=True)
    def boom(request: Request) -> Response:
        raise RuntimeError("inline failure")

    @app.get("/budget", inline=True, deadline_ms=1000, fallback=Response.json(REVIEW))
    def budget(request: Request) -> Response:
        return Response.json({"remaining_positive": request.remaining() > 0})

    return app


def test_inline_handler_runs_on_the_conductor_thread_and_keeps_alive() -> None:
    seen: list[str] = []
    with server_thread(_app(seen), threads=2) as server:
        c = Client(server.address)
        for _ in range(3):
            status, headers, body = c.request("GET", "/fast")
            assert (status, body) == (200, b"inline\n")
        assert c.request("GET", "/worker")[2] == b"worker\n"
        c.close()
    # The test's server thread is the conductor here (named by tests/helpers.py).
    assert seen[:3] == ["rtserve-conductor"] * 3
    assert seen[3] != "rtserve-conductor"


@pytest.mark.parametrize("path", ["/stream", "/boom"])
def test_inline_streaming_or_raising_handler_is_a_500_and_the_server_goes_on(
        path: str, caplog: pytest.LogCaptureFixture) -> None:
    with server_thread(_app([]), threads=1) as server:
        c = Client(server.address)
        assert c.request("GET", path)[0] == 500
        assert c.request("GET", "/fast")[0] == 200  # same connection, still served
        c.close()
    assert any(r.levelname == "ERROR" for r in caplog.records)


def test_inline_route_keeps_its_budget_and_dead_on_arrival() -> None:
    with server_thread(_app([]), threads=1) as server:
        c = Client(server.address)
        status, _, body = c.request("GET", "/budget")
        assert (status, body) == (200, b'{"remaining_positive":true}')
        status, headers, body = c.request("GET", "/budget", [("X-Request-Deadline-Ms", "0")])
        assert headers.get("x-rtserve-fallback") == "dead-on-arrival"
        c.close()
        assert scrape_metrics(server.address)["rtserve_dead_on_arrival_total"] == 1
