"""Per-path estimates for apps that route themselves (path_routes.py): each method and path
of a WSGI or ASGI app carries its own handler-time and CPU estimates under its prefix's
name, deadline and fallback, in a bounded table; so a cheap path of a WSGI app passes the
CPU gate that holds its CPU-bound paths back.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable, Iterable
from typing import Any

from rtserve.asgi import ASGIApp
from rtserve.config import Config
from rtserve.request import Request
from rtserve.wsgi import WSGIApp
from tests.helpers import Client, server_thread, wait_for


def _request(method: str, path: str) -> Request:
    return Request(method, path, path, "", "HTTP/1.1", [("host", "h")])


def _wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["PATH_INFO"].encode()]


def _own(app: Any, method: str, path: str) -> Any:
    """The path's own Route: the first sight is served by its prefix's Route."""
    first = app.resolve(_request(method, path))
    own = app.resolve(_request(method, path))
    assert own is not first and own.name == first.name
    return own


def test_each_method_and_path_gets_its_own_estimates_under_its_prefix() -> None:
    cfg = Config(_env={}, route_deadline=["/score=20"], fallback=["/score=200:review"])
    w = WSGIApp(_wsgi_app, cfg)
    score = _own(w, "POST", "/score")
    assert w.resolve(_request("POST", "/score")) is score  # one Route per path, kept
    batch = _own(w, "POST", "/score/batch")
    get_score = _own(w, "GET", "/score")
    hello = _own(w, "GET", "/hello")
    assert len({id(score), id(batch), id(get_score), id(hello)}) == 4
    # Each answers as its prefix's Route: the metrics' name, the deadline, the fallback.
    for route in (score, batch, get_score):
        assert route.name == "wsgi:/score"
        assert route.deadline_ns == 20_000_000
        assert route.fallback is not None and route.fallback.body == b"review"
        assert route.handler == w.handle
    assert hello.name == "wsgi" and hello.deadline_ns == 0 and hello.fallback is None
    # A measurement of one path is not another's.
    score.cpu_ns = 1_000_000
    score.observe(2_000_000)
    assert hello.cpu_ns == 0 and hello.ewma_ns == 0.0 and batch.cpu_ns == 0
    # The routes' metrics and deadlines still list the prefixes, once each.
    assert sorted(r.name for r in w.routes()) == ["wsgi", "wsgi:/score"]


def test_paths_seen_once_share_their_prefix_route() -> None:
    """Paths that carry ids each come once: they keep the prefix's one measured estimate
    and make no Route each (an unmeasured Route is neither light nor cheap)."""
    w = WSGIApp(_wsgi_app, Config(_env={}, path_estimates=8))
    assert w.paths is not None
    prefix = w.default_route
    for i in range(100):
        assert w.resolve(_request("GET", f"/items/{i}")) is prefix
    assert not w.paths.table and len(w.paths._seen) <= 8


def test_the_table_is_bounded_and_starts_over_when_full() -> None:
    w = WSGIApp(_wsgi_app, Config(_env={}, path_estimates=4))
    assert w.paths is not None
    first = _own(w, "GET", "/p0")
    first.cpu_ns = 5
    for i in range(1, 10):
        _own(w, "GET", f"/p{i}")
        assert w.paths.size <= 4 and len(w.paths._seen) <= 4
        assert sum(map(len, w.paths.table.values())) == w.paths.size
    assert w.paths.resets == 2  # full at /p4 and at /p8
    assert w.resolve(_request("GET", "/p0")) is w.default_route  # forgotten
    again = w.resolve(_request("GET", "/p0"))
    assert again is not first and again.cpu_ns == 0  # measured again from scratch


def test_zero_keeps_one_route_per_prefix() -> None:
    w = WSGIApp(_wsgi_app, Config(_env={}, path_estimates=0, route_deadline=["/score=20"]))
    assert w.paths is None
    assert w.resolve(_request("GET", "/a")) is w.resolve(_request("GET", "/b"))
    assert w.resolve(_request("GET", "/a")) is w.default_route
    assert w.resolve(_request("POST", "/score/x")).name == "wsgi:/score"


def test_an_asgi_app_has_estimates_per_path_too() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    a = ASGIApp(app, Config(_env={}, route_deadline=["/score=20"]))
    score = _own(a, "POST", "/score/1")
    assert score is a.resolve(_request("POST", "/score/1"))
    assert score is not _own(a, "POST", "/score/2")
    assert score.name == "asgi:/score" and score.deadline_ns == 20_000_000
    assert a.resolve(_request("GET", "/hello")).name == "asgi"


def _readable(c: Client) -> bool:
    return bool(select.select([c.sock], [], [], 0)[0])


def _gate_scene(path_estimates: int, fast: str = "measured") -> tuple[bool, int]:
    """One CPU-bound WSGI request holds the gate shut with a second queued behind it; then
    a GET /fast comes while a worker is free. Returns whether it was answered while the
    second heavy request still waited, and the queue depth as /fast was sent or answered.

    `fast`: "measured" (its route ran and is light), "new" (its route exists, nothing of
    it ran yet), "tried" (a request of it started, no figure came back)."""
    go = threading.Event()
    entered = threading.Semaphore(0)
    primed = threading.Event()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/heavy" and primed.is_set():
            entered.release()
            go.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode()]

    cfg = Config(_env={}, path_estimates=path_estimates)
    w = WSGIApp(app, cfg)
    try:
        # Seconds of CPU: the held handlers compute nothing and no charge lapses in time.
        with server_thread(w, threads=3, cpu_inflight_ms=3000,
                           path_estimates=path_estimates) as server:
            c = Client(server.address)
            warm = ("/heavy", "/fast") if fast == "measured" else ("/heavy",)
            for path in warm * 2:  # each path's own route, measured once
                assert c.request("GET", path)[0] == 200
            for path, cpu in (("/heavy", 4_000_000_000), ("/fast", 10_000)):
                route = w.resolve(_request("GET", path))
                if path == "/fast" and route is w.resolve(_request("GET", "/heavy")):
                    continue  # one Route for both (path_estimates=0): /heavy's figure
                if path == "/fast" and fast != "measured":
                    route = w.resolve(_request("GET", path))  # its own, from the 2nd sight
                    assert route.cpu_ns == 0 and not route.tried
                    route.tried = fast == "tried"
                    fast_route = route
                    continue
                route.cpu_ns = cpu  # as if sampled
                route.cpu_tick = 1000
            primed.set()
            adm = server.admission
            heavies = [Client(server.address) for _ in range(2)]
            heavies[0].send("GET", "/heavy")  # nothing charged yet: starts, 4 s: shut
            assert entered.acquire(timeout=10)
            heavies[1].send("GET", "/heavy")
            wait_for(lambda: adm.queue_depth == 1, what="the second heavy request queued")
            c.send("GET", "/fast")  # a worker is free: does it pass the shut gate?
            wait_for(lambda: adm.queue_depth == 2 or _readable(c), what="/fast decided")
            passed = adm.queue_depth == 1
            if passed:
                assert c.recv()[2] == b"/fast"
                assert adm.queue_depth == 1  # the heavy one still waits for the gate
                if fast == "new":
                    assert fast_route.tried  # its next request is judged by its figure
            depth = adm.queue_depth
            go.set()
            for h in heavies:
                assert h.recv()[0] == 200
                h.close()
            if not passed:
                assert c.recv()[2] == b"/fast"
            c.close()
            return passed, depth
    finally:
        go.set()


def test_a_cheap_path_of_a_wsgi_app_passes_the_cpu_gate() -> None:
    """The point of per-path estimates: /fast is light on its own figure, so it starts on
    the free worker while the gate holds the CPU-bound /heavy back."""
    assert _gate_scene(path_estimates=256) == (True, 1)


def test_a_path_nothing_of_which_ran_passes_once_to_be_measured() -> None:
    """An unmeasured path has no figure to be judged light by: its first request passes
    the shut gate (and is measured); once one started, unmeasured means wait."""
    assert _gate_scene(path_estimates=256, fast="new") == (True, 1)
    assert _gate_scene(path_estimates=256, fast="tried") == (False, 2)


def test_with_one_estimate_per_prefix_the_cheap_path_waits_behind() -> None:
    """The contrast: one Route for the whole app carries /heavy's CPU figure, so /fast is
    charged as heavy and waits in the queue behind the request the gate holds back."""
    assert _gate_scene(path_estimates=0) == (False, 2)
