"""The CPU gate (handoff.Handoff._cpu_gate) and the charges behind it: a handler starts
only while the sampled CPU time of the handlers running is under `cpu_inflight_ms`; the
workers sample each handler's CPU time; a stream's charge ends when its handler returns.
"""

from __future__ import annotations

import socket
import threading

from rtserve import App, Request, Response
from tests.helpers import REVIEW, Client, Gate, server_thread, wait_for


def test_cpu_bound_handlers_start_only_within_the_cpu_budget(gate: Gate) -> None:
    """Handlers whose measured CPU time would time-slice the GIL wait for the budget."""
    app = App()

    @app.get("/cpu", deadline_ms=10_000, fallback=Response.json(REVIEW))
    def cpu(request: Request) -> Response:
        gate.hold("cpu")
        return Response.text("ran\n")

    with server_thread(app, threads=8, cpu_inflight_ms=3) as server:
        route = app._exact[("GET", "/cpu")]
        route.cpu_ns = 2_000_000  # as if sampled: 2 ms of CPU per request
        route.cpu_tick = 1000  # past the first samples: no fresh sample overwrites it
        clients = [Client(server.address) for _ in range(5)]
        for c in clients:
            c.send("GET", "/cpu")
        gate.wait_entered(2)  # 0 ms running -> start; 2 ms running -> start; 4 ms: wait
        wait_for(lambda: server.admission.queue_depth == 3)
        assert server.admission.busy == 2 and len(gate.calls) == 2
        assert server.admission.cpu_inflight_ns == 4_000_000
        gate.release.set()
        for c in clients:
            assert c.recv()[0] == 200
            c.close()
        assert len(gate.calls) == 5
        wait_for(lambda: server.admission.cpu_inflight_ns == 0 and not server.admission.charged)


def test_handler_cpu_time_is_sampled() -> None:
    app = App()

    @app.get("/burn")
    def burn(request: Request) -> Response:
        x = 0
        for i in range(200_000):
            x += i
        return Response.text(str(x))

    @app.get("/nap")
    def nap(request: Request) -> Response:
        threading.Event().wait(0.02)  # waits without CPU
        return Response.text("ok")

    with server_thread(app, threads=2) as server:
        for path in ("/burn", "/nap"):
            for _ in range(3):
                c = Client(server.address)
                c.send("GET", path)
                assert c.recv()[0] == 200
                c.close()
        burn_route, nap_route = app._exact[("GET", "/burn")], app._exact[("GET", "/nap")]
        assert burn_route.cpu_ns > 1_000_000  # a 200k-step loop costs milliseconds of CPU
        assert nap_route.cpu_ns < burn_route.cpu_ns / 4  # waiting is not CPU


def test_a_stalled_stream_does_not_hold_the_cpu_gate(gate: Gate) -> None:
    """A streamed response whose client stopped reading keeps its worker, but its CPU
    charge ends when the handler returns: other requests still start."""
    app = App()
    produced = threading.Event()

    @app.get("/stream")
    def stream(request: Request) -> Response:
        def body():
            produced.set()
            while True:
                yield b"x" * 16384

        return Response(body(), 200)

    @app.get("/fast")
    def fast(request: Request) -> Response:
        return Response.text("ok\n")

    # A CPU cap small enough that one charge alone would close the gate.
    with server_thread(app, threads=4, cpu_inflight_ms=0.000001,
                       stream_high_water=65536, write_timeout=60) as server:
        for route in server.app.routes():
            route.cpu_ns = 1_000_000  # as if sampled: 1 ms of CPU per request
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.connect(server.address)
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")  # and never read
        assert produced.wait(10)
        wait_for(lambda: server.admission.busy == 1 and server.admission.cpu_inflight_ns == 0,
                 what="the stream's charge to end")
        c = Client(server.address)
        assert c.request("GET", "/fast")[0] == 200
        c.close()
        s.close()
