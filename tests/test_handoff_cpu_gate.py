"""The CPU gate (handoff.Handoff._cpu_gate) and the charges behind it: a handler starts
only while the sampled CPU time of the handlers running is under `cpu_inflight_ms`; the
workers sample each handler's CPU time; a stream's charge ends when its handler returns.
"""

from __future__ import annotations

import socket
import threading
import time

from rtserve import App, Request, Response
from tests.helpers import REVIEW, Client, Gate, server_thread, wait_for


def test_cpu_bound_handlers_start_only_within_the_cpu_budget(gate: Gate) -> None:
    """Handlers whose measured CPU time would time-slice the GIL wait for the budget."""
    app = App()

    @app.get("/cpu", deadline_ms=10_000, fallback=Response.json(REVIEW))
    def cpu(request: Request) -> Response:
        gate.hold("cpu")
        return Response.text("ran\n")

    # In seconds, not milliseconds: the held handlers do not compute, and a charge lapses
    # after twice the cap plus itself (10 s here) of running; the test is over before.
    with server_thread(app, threads=8, cpu_inflight_ms=3000) as server:
        route = app._exact[("GET", "/cpu")]
        route.cpu_ns = 2_000_000_000  # as if sampled: 2 s of CPU per request
        route.cpu_tick = 1000  # past the first samples: no fresh sample overwrites it
        clients = [Client(server.address) for _ in range(5)]
        for c in clients:
            c.send("GET", "/cpu")
        gate.wait_entered(2)  # 0 s running -> start; 2 s running -> start; 4 s: wait
        wait_for(lambda: server.admission.queue_depth == 3)
        assert server.admission.busy == 2 and len(gate.calls) == 2
        assert server.admission.cpu_inflight_ns == 4_000_000_000
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


def _burn_cpu(ns: int) -> None:
    """Spend `ns` of this thread's CPU time (a pure-Python loop: it holds the GIL)."""
    end = time.thread_time_ns() + ns
    while time.thread_time_ns() < end:
        pass


def test_a_handler_that_did_its_work_and_waits_gives_its_charge_back() -> None:
    """A handler that spent its charge of CPU and then waits (a model call, a stall)
    stops holding the gate: the next request starts while it still waits, with no
    completion to wake the conductor (the gate looks again by itself)."""
    app = App()
    waiting = threading.Semaphore(0)
    release = threading.Event()

    @app.get("/work")
    def work(request: Request) -> Response:
        _burn_cpu(3_000_000)  # more than its 2 ms charge
        waiting.release()
        release.wait(10)  # then wait, spending no CPU
        return Response.text("done\n")

    try:
        with server_thread(app, threads=4, cpu_inflight_ms=3) as server:
            route = app._exact[("GET", "/work")]
            route.cpu_ns = 2_000_000  # as if sampled: 2 ms of CPU per request
            route.cpu_tick = 1000
            clients = [Client(server.address) for _ in range(3)]
            clients[0].send("GET", "/work")
            clients[1].send("GET", "/work")  # 2 ms charged: starts; then 4 ms: shut
            wait_for(lambda: server.admission.busy == 2, what="two handlers running")
            clients[2].send("GET", "/work")
            # The third starts only once both charges lapsed (their handlers wait).
            for _ in range(3):
                assert waiting.acquire(timeout=10), "a handler never reached its wait"
            assert server.metrics.cpu_charges_lapsed >= 1
            release.set()
            for c in clients:
                assert c.recv()[0] == 200
                c.close()
            wait_for(lambda: server.admission.cpu_inflight_ns == 0)
    finally:
        release.set()


def test_a_handler_still_computing_keeps_its_charge() -> None:
    """Handlers that keep spending CPU past their estimate keep their charges: the gate
    lets no more CPU work in than it measured, however long they run."""
    app = App()
    release = threading.Event()
    spent: dict[int, int] = {}
    lock = threading.Lock()

    @app.get("/spin")
    def spin(request: Request) -> Response:
        t0 = time.thread_time_ns()
        while not release.is_set():
            _burn_cpu(200_000)
            with lock:
                spent[threading.get_ident()] = time.thread_time_ns() - t0
        return Response.text("done\n")

    try:
        with server_thread(app, threads=4, cpu_inflight_ms=3) as server:
            route = app._exact[("GET", "/spin")]
            route.cpu_ns = 2_000_000
            route.cpu_tick = 1000
            clients = [Client(server.address) for _ in range(3)]
            for c in clients:
                c.send("GET", "/spin")
            wait_for(lambda: server.admission.queue_depth == 1, what="the third queued")
            # Both running handlers spend five times their charge; the gate looks at
            # least every millisecond meanwhile (each refusal and its own wake-ups).
            wait_for(lambda: len(spent) == 2 and min(spent.values()) > 10_000_000,
                     what="the spinners to spend 10 ms of CPU each")
            assert server.admission.queue_depth == 1 and server.admission.busy == 2
            assert server.metrics.cpu_charges_lapsed == 0
            release.set()
            for c in clients:
                assert c.recv()[0] == 200
                c.close()
    finally:
        release.set()


def test_light_requests_pass_a_shut_gate() -> None:
    """A route whose CPU estimate is tiny next to the cap does not wait behind CPU-bound
    requests the gate holds back: at once when it arrives and a worker is free, and
    when it had to queue (every worker busy), as soon as a worker frees up."""
    app = App()
    heavy_go, hold_go = threading.Event(), threading.Event()
    entered = threading.Semaphore(0)

    @app.get("/heavy")
    def heavy(request: Request) -> Response:
        entered.release()
        heavy_go.wait(10)
        return Response.text("heavy\n")

    @app.get("/hold")
    def hold(request: Request) -> Response:
        entered.release()
        hold_go.wait(10)
        return Response.text("hold\n")

    @app.get("/fast")
    def fast(request: Request) -> Response:
        return Response.text("fast\n")

    try:
        # Seconds of CPU, not milliseconds: the held handlers do not compute, and none
        # of them could have used a 2 s charge (so none lapses) before the test is over.
        with server_thread(app, threads=3, cpu_inflight_ms=3000) as server:
            for path, cpu in (("/heavy", 2_000_000_000), ("/fast", 10_000)):
                route = app._exact[("GET", path)]
                route.cpu_ns = cpu  # as if sampled
                route.cpu_tick = 1000
            adm = server.admission
            hold_c = Client(server.address)
            hold_c.send("GET", "/hold")  # unmeasured: not charged, starts
            assert entered.acquire(timeout=10)
            heavies = [Client(server.address) for _ in range(2)]
            for c in heavies:
                c.send("GET", "/heavy")  # 0 s charged -> start; 2 s -> start; 4 s: shut
            for _ in heavies:
                assert entered.acquire(timeout=10)
            queued = Client(server.address)
            queued.send("GET", "/heavy")
            wait_for(lambda: adm.queue_depth == 1, what="the third heavy request queued")
            # Every worker is busy: a light request queues too (behind the heavy one).
            late = Client(server.address)
            late.send("GET", "/fast")
            wait_for(lambda: adm.queue_depth == 2, what="the light request queued")
            hold_go.set()  # a worker frees; the gate stays shut for the heavy one
            assert hold_c.recv()[0] == 200
            assert late.recv()[2] == b"fast\n"
            assert adm.queue_depth == 1 and adm.busy == 2
            # With a worker free, a new light request does not queue at all.
            assert late.request("GET", "/fast")[0] == 200
            assert adm.queue_depth == 1
            heavy_go.set()
            for c in (*heavies, queued):
                assert c.recv()[0] == 200
            for c in (hold_c, *heavies, queued, late):
                c.close()
    finally:
        heavy_go.set()
        hold_go.set()


def test_no_charge_lapses_while_a_deadline_is_at_stake() -> None:
    """With a deadline on the requests, a handler that did its work and waits keeps its
    charge until it ends: one let in early would time-slice the GIL with requests that
    race their deadline. The queued request is answered at its deadline, never run."""
    app = App()
    waiting = threading.Semaphore(0)
    release = threading.Event()
    entered: list[int] = []

    @app.get("/work", deadline_ms=300, fallback=Response.json(REVIEW))
    def work(request: Request) -> Response:
        entered.append(1)
        _burn_cpu(3_000_000)
        waiting.release()
        release.wait(10)
        return Response.text("done\n")

    try:
        # CoDel off: the queued request waits for its deadline (not shed before it).
        with server_thread(app, threads=4, cpu_inflight_ms=3, codel_target_ms=0) as server:
            route = app._exact[("GET", "/work")]
            route.cpu_ns = 2_000_000
            route.cpu_tick = 1000
            route.ewma_ns = 1_000_000  # so the 300 ms budget is not dead on arrival
            clients = [Client(server.address) for _ in range(3)]
            clients[0].send("GET", "/work")
            clients[1].send("GET", "/work")
            wait_for(lambda: server.admission.busy == 2, what="two handlers running")
            clients[2].send("GET", "/work")
            for _ in range(2):
                assert waiting.acquire(timeout=10)
            status, headers, body = clients[2].recv()  # its deadline's answer
            assert status == 200 and headers.get("x-rtserve-fallback") == "deadline"
            assert len(entered) == 2 and server.metrics.cpu_charges_lapsed == 0
            release.set()
            for c in clients[:2]:
                assert c.recv()[0] == 200  # the fallbacks at their deadlines
            for c in clients:
                c.close()
    finally:
        release.set()
