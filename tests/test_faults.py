"""Faults (issue 6, part 4): clients that vanish at every stage, handlers that raise, hang
or return garbage, and worker threads that die.

After each fault the server must serve the next client, and the event must show in
/metrics (read over HTTP, as an operator would): client_aborts, handler_errors,
deadline_misses / fallbacks, late results dropped, worker_deaths.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from rtserve import App, Request, Response
from rtserve.server import Server
from tests.conftest import make_app
from tests.helpers import (
    REVIEW,
    Gate,
    connect,
    read_response_file,
    recv_until_closed,
    scrape_metrics,
    server_thread,
    wait_for,
)

THREADS = 4


class Die(BaseException):
    """A BaseException that is not an Exception (like gevent's GreenletExit)."""


def make_fault_app(gate: Gate) -> App:
    app = make_app()  # /hello, /echo ...; the routes below add to or replace its others

    @app.get("/gate")
    def gated(request: Request) -> Response:
        gate.hold(timeout=30)
        return Response.text("released\n")

    @app.get("/gate-deadline", deadline_ms=300)
    def gated_deadline(request: Request) -> Response:
        gate.hold(timeout=30)
        return Response.text("late\n")

    @app.get("/gate-fallback", deadline_ms=300,
             fallback=Response.json(REVIEW))
    def gated_fallback(request: Request) -> Response:
        gate.hold(timeout=30)
        return Response.json({"decision": "approve"})

    @app.get("/big")
    def big(request: Request) -> Response:
        return Response(b"b" * (16 << 20), 200, None, "application/octet-stream")

    @app.get("/stream")
    def stream(request: Request) -> Response:
        def body() -> Iterator[bytes]:
            for _ in range(100_000):  # 6.4 GB if nobody stopped it
                yield b"c" * 65536
        return Response(body(), 200, None, "application/octet-stream")

    @app.get("/boom")
    def boom(request: Request) -> Response:
        raise RuntimeError("secret internal detail")

    @app.get("/bad-status")
    def bad_status(request: Request) -> Response:
        return Response(b"x", 42)

    @app.get("/str-status")
    def str_status(request: Request) -> Response:
        return Response(b"x", "200")  # type: ignore[arg-type]

    @app.get("/not-a-response")
    def not_a_response(request: Request) -> Any:
        return object()

    @app.get("/str-in-stream")
    def str_in_stream(request: Request) -> Response:
        return Response(iter([b"first;", "a str;", b"never"]), 200, None, "text/plain")

    @app.get("/stream-raises")
    def stream_raises(request: Request) -> Response:
        def body() -> Iterator[bytes]:
            yield b"first;"
            raise RuntimeError("broke midway")
        return Response(body(), 200, None, "text/plain")

    @app.get("/bad-header-name")
    def bad_header_name(request: Request) -> Response:
        return Response.text("x", headers=[("Bad Header", "v")])

    @app.get("/bad-header-type")
    def bad_header_type(request: Request) -> Response:
        return Response.text("x", headers=[("X-Count", 5)])  # type: ignore[list-item]

    @app.get("/bad-content-length")
    def bad_content_length(request: Request) -> Response:
        return Response.text("x", headers=[("Content-Length", "-1")])

    @app.get("/exit")
    def exit_(request: Request) -> Response:
        raise SystemExit(3)

    @app.get("/interrupt")
    def interrupt(request: Request) -> Response:
        raise KeyboardInterrupt

    @app.get("/die")
    def die(request: Request) -> Response:
        raise Die()

    return app


@pytest.fixture
def srv(gate: Gate) -> Iterator[Server]:
    with server_thread(make_fault_app(gate), threads=THREADS, header_timeout=5.0,
                       body_timeout=5.0) as server:
        yield server


# ---- helpers ------------------------------------------------------------------------------


def addr_of(server: Server) -> tuple[str, int]:
    return server.address[0], server.address[1]


def request(server: Server, path: str, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    s = connect(addr_of(server), timeout)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        return read_response_file(s.makefile("rb"))
    finally:
        s.close()


def metrics(server: Server) -> dict[str, float]:
    return scrape_metrics(addr_of(server))


def counter(server: Server, name: str) -> float:
    return metrics(server)[name]


def wait_metric(server: Server, name: str, want: float, timeout: float = 10.0) -> None:
    """Scrape /metrics until `name` reaches `want` (the event happens on another thread)."""
    wait_for(lambda: counter(server, name) >= want, timeout, f"{name} to reach {want}", 0.02)


def still_serves(server: Server) -> None:
    """The next client, on a fresh connection, gets a correct answer (keep-alive too)."""
    s = connect(addr_of(server))
    f = s.makefile("rb")
    try:
        for _ in range(2):
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response_file(f)[::2] == (200, b"Hello, world!\n")
    finally:
        s.close()


def rst_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


# ---- clients that disconnect ------------------------------------------------------------

ABORTS = "rtserve_client_aborts_total"


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_disconnect_mid_headers(srv: Server, rst: bool) -> None:
    before = counter(srv, ABORTS)
    s = connect(addr_of(srv))
    s.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Partial: ab")
    rst_close(s) if rst else s.close()
    wait_metric(srv, ABORTS, before + 1)
    still_serves(srv)


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_disconnect_mid_body(srv: Server, rst: bool) -> None:
    before = counter(srv, ABORTS)
    s = connect(addr_of(srv))
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n" + b"x" * 300)
    rst_close(s) if rst else s.close()
    wait_metric(srv, ABORTS, before + 1)
    still_serves(srv)


def test_reset_while_the_handler_runs_drops_the_result(srv: Server, gate: Gate) -> None:
    m0 = metrics(srv)
    s = connect(addr_of(srv))
    s.sendall(b"GET /gate HTTP/1.1\r\nHost: t\r\n\r\n")
    gate.wait_entered()
    rst_close(s)
    wait_metric(srv, ABORTS, m0[ABORTS] + 1)
    # A new client (very likely on the same fd number) must never get the old result.
    c = connect(addr_of(srv))
    c.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
    gate.release.set()
    wait_metric(srv, "rtserve_late_results_dropped_total",
                m0["rtserve_late_results_dropped_total"] + 1)
    f = c.makefile("rb")
    assert read_response_file(f)[::2] == (200, b"Hello, world!\n")
    c.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert read_response_file(f)[::2] == (200, b"Hello, world!\n")
    assert f.read() == b""  # nothing else, in particular not "released"
    c.close()
    assert metrics(srv)["rtserve_busy_workers"] == 0


def test_close_while_the_handler_runs_is_a_half_close_answered_then_closed(
    srv: Server, gate: Gate
) -> None:
    """A FIN can't be told from shutdown(SHUT_WR): the answer is still sent, then closed."""
    s = connect(addr_of(srv))
    s.sendall(b"GET /gate HTTP/1.1\r\nHost: t\r\n\r\n")
    gate.wait_entered()
    s.shutdown(socket.SHUT_WR)
    gate.release.set()
    data = recv_until_closed(s)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"released\n")
    s.close()
    still_serves(srv)
    wait_for(lambda: metrics(srv)["rtserve_open_connections"] <= 1,  # only the scrape itself
             10, "the half-closed connection to be closed", 0.02)


@pytest.mark.parametrize("path", ["/big", "/stream"])
def test_disconnect_mid_response(srv: Server, path: str) -> None:
    before = counter(srv, ABORTS)
    s = connect(addr_of(srv))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    got = b""
    while len(got) < 100_000:
        chunk = s.recv(65536)
        assert chunk
        got += chunk
    assert got.startswith(b"HTTP/1.1 200 ")
    rst_close(s)
    wait_metric(srv, ABORTS, before + 1)
    # The streaming worker was stopped (its put() returned False), not left parked.
    wait_for(lambda: metrics(srv)["rtserve_busy_workers"] == 0, 10,
             "the worker busy with the aborted response to be freed", 0.02)
    still_serves(srv)


# ---- handlers that raise, hang or return garbage ----------------------------------------

ERRORS = "rtserve_handler_errors_total"


@pytest.mark.parametrize("path", [
    "/boom", "/bad-status", "/str-status", "/not-a-response", "/bad-header-name",
    "/bad-header-type", "/bad-content-length", "/die",
])
def test_handler_that_raises_or_returns_an_invalid_response_gets_500(srv: Server,
                                                                        path: str) -> None:
    before = counter(srv, ERRORS)
    status, _, body = request(srv, path)
    assert status == 500
    assert b"secret" not in body and b"Bad Header" not in body
    assert counter(srv, ERRORS) == before + 1
    assert srv.pool.alive() == THREADS  # nothing died
    still_serves(srv)


@pytest.mark.parametrize("path", ["/str-in-stream", "/stream-raises"])
def test_stream_that_breaks_midway_is_cut_short_and_closed(srv: Server, path: str) -> None:
    """The head went out already: the body must not look complete (no last chunk)."""
    before = counter(srv, ERRORS)
    s = connect(addr_of(srv))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    data = recv_until_closed(s)
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
    assert body.startswith(b"6\r\nfirst;\r\n")
    assert not body.endswith(b"0\r\n\r\n") and b"never" not in body
    wait_metric(srv, ERRORS, before + 1)
    still_serves(srv)


def test_hanging_handler_with_a_deadline_gets_504(srv: Server, gate: Gate) -> None:
    m0 = metrics(srv)
    status, _, _ = request(srv, "/gate-deadline")
    assert status == 504
    m1 = metrics(srv)
    assert m1["rtserve_deadline_misses_total"] == m0["rtserve_deadline_misses_total"] + 1
    assert m1["rtserve_stuck_workers"] == 1  # the handler still runs; readiness knows
    still_serves(srv)
    gate.release.set()
    wait_metric(srv, "rtserve_late_results_dropped_total",
                m0["rtserve_late_results_dropped_total"] + 1)
    assert metrics(srv)["rtserve_stuck_workers"] == 0


def test_hanging_handler_with_a_fallback_gets_the_fallback(srv: Server, gate: Gate) -> None:
    m0 = metrics(srv)
    status, headers, body = request(srv, "/gate-fallback")
    assert (status, body) == (200, b'{"decision":"review"}')
    assert headers["x-rtserve-fallback"] == "deadline"
    assert counter(srv, "rtserve_fallbacks_sent_total") == m0["rtserve_fallbacks_sent_total"] + 1
    still_serves(srv)
    gate.release.set()
    wait_metric(srv, "rtserve_late_results_dropped_total",
                m0["rtserve_late_results_dropped_total"] + 1)


def test_hanging_handler_without_a_deadline_times_the_client_out_not_the_server(
    srv: Server, gate: Gate
) -> None:
    s = connect(addr_of(srv), timeout=0.5)
    s.sendall(b"GET /gate HTTP/1.1\r\nHost: t\r\n\r\n")
    gate.wait_entered()
    with pytest.raises(TimeoutError):
        s.recv(100)  # no answer: the handler hangs and nothing bounds it
    still_serves(srv)  # other clients are served by the other workers
    assert metrics(srv)["rtserve_busy_workers"] == 1
    before = counter(srv, ABORTS)
    s.close()  # the client gives up
    s2 = connect(addr_of(srv), timeout=0.5)  # another hangs: each pins one worker
    s2.sendall(b"GET /gate HTTP/1.1\r\nHost: t\r\n\r\n")
    gate.wait_entered()
    rst_close(s2)
    wait_metric(srv, ABORTS, before + 1)
    gate.release.set()
    wait_for(lambda: metrics(srv)["rtserve_busy_workers"] == 0, 10, "the workers to be freed",
             0.02)
    still_serves(srv)


# ---- worker threads that die ------------------------------------------------------------


@pytest.mark.parametrize("path", ["/exit", "/interrupt"])
def test_a_worker_killed_by_its_handler_is_replaced(srv: Server, gate: Gate,
                                                     path: str) -> None:
    m0 = metrics(srv)
    status, _, _ = request(srv, path)
    assert status == 500
    wait_metric(srv, "rtserve_worker_deaths_total", m0["rtserve_worker_deaths_total"] + 1)
    m1 = metrics(srv)
    assert m1[ERRORS] == m0[ERRORS] + 1
    assert m1["rtserve_busy_workers"] == 0  # the dying worker's request was accounted for
    wait_for(lambda: srv.pool.alive() == THREADS, 10, "the dead worker to be replaced")
    # All THREADS workers really run handlers: park THREADS requests at once.
    socks = []
    for _ in range(THREADS):
        s = connect(addr_of(srv))
        s.sendall(b"GET /gate HTTP/1.1\r\nHost: t\r\n\r\n")
        socks.append(s)
    for _ in range(THREADS):
        gate.wait_entered()  # as many live workers as the pool size
    gate.release.set()
    for s in socks:
        assert read_response_file(s.makefile("rb"))[::2] == (200, b"released\n")
        s.close()
    still_serves(srv)


def test_repeated_worker_deaths_keep_the_pool_full(srv: Server) -> None:
    m0 = metrics(srv)
    n = 3 * THREADS
    results: list[int] = []

    def hit() -> None:
        results.append(request(srv, "/exit")[0])

    threads = [threading.Thread(target=hit) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [500] * n
    wait_metric(srv, "rtserve_worker_deaths_total", m0["rtserve_worker_deaths_total"] + n)
    assert counter(srv, ERRORS) == m0[ERRORS] + n
    wait_for(lambda: srv.pool.alive() == THREADS, 10, "the dead workers to be replaced")
    still_serves(srv)
