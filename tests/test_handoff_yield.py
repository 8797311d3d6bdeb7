"""The yield after a batch (loop.EventLoop.run, --handoff-yield): a loop turn that accepted
and hands cheap requests to the pool gives the woken worker the CPU at once.

What a test can see is that the turns that accept and hand a batch yield (the counter),
that keep-alive turns and a route that is not cheap never make a turn yield, that it can
be turned off, and that
under a burst of one-request connections every client gets its own answer. How much it
gains is a measurement (docs/architecture.md, "The hot path, measured").
"""

from __future__ import annotations

import http.client
import threading
from concurrent.futures import ThreadPoolExecutor

from rtserve import App, Request, Response
from tests.helpers import Client, server_thread, wait_for


def _app() -> App:
    app = App()

    @app.get("/cheap")
    def cheap(request: Request) -> Response:
        return Response.text(request.query_param("tag", "-"))

    @app.get("/slow")
    def slow(request: Request) -> Response:
        threading.Event().wait(0.002)  # 2 ms: above --handoff-ahead-ms, never batched
        return Response.text(request.query_param("tag", "-"))

    return app


def _one_request_per_connection(address: tuple[str, int], tag: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", f"/cheap?tag={tag}", headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_turn_that_accepts_and_hands_a_batch_yields() -> None:
    """Once the route is measured cheap, a new connection's request (read in the turn
    that accepted it) goes through the turn's batch, and that turn yields; the first
    request (not yet measured) does not."""
    with server_thread(_app(), threads=4) as server:
        assert server.loop.yield_cpu is not None
        assert _one_request_per_connection(server.address, "first") == (200, b"first")
        assert server.metrics.handoff_yields == 0  # unmeasured: handed over by itself
        for i in range(5):
            assert _one_request_per_connection(server.address, str(i)) == (200, str(i).encode())
        assert server.metrics.handoff_yields >= 1
        c = Client(server.address)
        assert "rtserve_handoff_yields_total" in c.request("GET", "/metrics")[2].decode()
        c.close()


def test_keep_alive_turns_batch_without_yielding() -> None:
    """Requests on open keep-alive connections are batched but their turns accept
    nothing, so they do not yield: those connections send nothing more until answered
    and the conductor soon blocks anyway."""
    with server_thread(_app(), threads=4) as server:
        clients = [Client(server.address) for _ in range(4)]
        for c in clients:  # each connection's first request: its turn accepted it
            assert c.request("GET", "/cheap?tag=w")[2] == b"w"
        # The route is measured cheap now: these go through the turn's batch (as the
        # test above shows for new connections), in turns that accept nothing.
        yields = server.metrics.handoff_yields
        for i in range(10):
            for c in clients:
                assert c.request("GET", f"/cheap?tag={i}")[2] == str(i).encode()
        assert server.metrics.handoff_yields == yields
        for c in clients:
            c.close()


def test_a_route_that_is_not_cheap_never_yields() -> None:
    """A 2 ms handler is not cheap (--handoff-ahead-ms 0.25): it is handed over by itself,
    and its turns do not yield."""
    with server_thread(_app(), threads=4) as server:
        c = Client(server.address)
        for i in range(6):
            assert c.request("GET", f"/slow?tag={i}")[2] == str(i).encode()
        assert server.metrics.handoff_yields == 0
        c.close()


def test_no_yield_when_turned_off() -> None:
    """`--no-handoff-yield`: the batch is still handed over, the CPU is not yielded."""
    with server_thread(_app(), threads=4, handoff_yield=False) as server:
        assert server.loop.yield_cpu is None
        c = Client(server.address)
        for i in range(6):
            assert c.request("GET", f"/cheap?tag={i}")[2] == str(i).encode()
        assert server.metrics.handoff_yields == 0
        c.close()


def test_every_client_of_a_burst_gets_its_own_answer() -> None:
    """200 one-request connections, 32 at a time, to a cheap route: batches are handed
    over and yielded to, and each client's body is its own tag."""
    with server_thread(_app(), threads=4) as server:
        warm = Client(server.address)
        for _ in range(3):
            assert warm.request("GET", "/cheap")[0] == 200
        warm.close()
        with ThreadPoolExecutor(32) as ex:
            results = list(ex.map(lambda i: _one_request_per_connection(server.address,
                                                                       f"t{i}"), range(200)))
        assert results == [(200, f"t{i}".encode()) for i in range(200)]
        assert server.metrics.handoff_yields >= 1
        wait_for(lambda: server.admission.busy == 0, what="every worker to be given back")
