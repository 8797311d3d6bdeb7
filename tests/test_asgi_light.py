"""Light routes of an ASGI app pass the loops' shut gate (handoff.py, `light_by_time`).

An ASGI app's tasks are not CPU-sampled one by one, so a route is light by its measured
time to the answer. Without this, a `/hello` beside CPU-bound `/score` requests with a
deadline waited in the CoDel queue (passed over under LIFO) for about a second.
"""

from __future__ import annotations

import threading
from typing import Any

from rtserve.request import Request
from tests.helpers import Client, server_thread, wait_for


def _request(method: str, path: str) -> Request:
    return Request(method, path, path, "", "HTTP/1.1", [("host", "h")])


def _scene(fast_ms: float) -> tuple[bool, list[str]]:
    """One /heavy task blocks the loop, two more wait on it, a fourth waits in the CoDel
    queue for the gate; then GET /fast, whose measured time is `fast_ms`. Returns whether
    /fast was handed to the loop past the shut gate, and the order the tasks began in."""
    go = threading.Event()
    blocked = threading.Event()
    primed = threading.Event()
    began: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if primed.is_set():
            began.append(path)
            if path == "/heavy" and not blocked.is_set():
                blocked.set()
                go.wait(10)  # holds the loop thread: nothing else on it begins
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": path.encode()})

    with server_thread(app, interface="asgi", route_deadline=["/heavy=30000"]) as srv:
        try:
            warm = Client(srv.address)
            for path in ("/heavy", "/fast") * 2:  # each path's own route
                assert warm.request("GET", path)[0] == 200
            routes = srv.app.prefix_routes
            routes.resolve(_request("GET", "/heavy")).ewma_ns = 2_000_000  # as if measured
            fast = routes.resolve(_request("GET", "/fast"))
            fast.ewma_ns = fast_ms * 1_000_000
            loop = srv.asgi.loops[0]
            loop.task_cpu_ns = 2_000_000  # the loop's CPU per request, as if sampled
            base = loop.submitted
            primed.set()
            clients = [Client(srv.address) for _ in range(4)]
            clients[0].send("GET", "/heavy")
            assert blocked.wait(10)
            for c in clients[1:]:
                c.send("GET", "/heavy")
            # Two wait on the loop (4 ms of backlog shuts a 3 ms gate), one in the queue.
            wait_for(lambda: len(srv.admission.queue) == 1 and loop.submitted == base + 3,
                     what="the gate to shut with one /heavy queued")
            handed = loop.submitted
            probe = Client(srv.address)
            probe.send("GET", "/fast")
            wait_for(lambda: loop.submitted > handed or len(srv.admission.queue) == 2,
                     what="/fast handed over or queued")
            passed = loop.submitted > handed
        finally:
            go.set()
        for c in [*clients, probe]:
            assert c.recv()[0] == 200
            c.close()
        warm.close()
        return passed, began


def test_a_light_route_passes_the_shut_gate_and_begins_before_the_queued_heavy_one() -> None:
    passed, began = _scene(fast_ms=0.1)
    assert passed
    assert began == ["/heavy"] * 3 + ["/fast", "/heavy"]


def test_a_route_slower_than_a_quarter_of_the_cap_waits_for_the_gate() -> None:
    passed, began = _scene(fast_ms=1.0)  # over 3 ms / 4
    assert not passed
    assert began == ["/heavy"] * 4 + ["/fast"]
