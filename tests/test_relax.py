"""Relaxed (handoff.Handoff.relax_tick, tense): a server with no deadline configured opens
the CPU gate and lengthens the GIL's switch interval once nothing was at stake for
`relax_after_s`; a request with a client budget, or a light request beside CPU-charged
handlers, undoes it before that request starts.
"""

from __future__ import annotations

import sys
import threading

import pytest

from rtserve import App, Request, Response
from tests.helpers import REVIEW, Client, scrape_metrics, server_thread, wait_for

PROMPT_S, RELAXED_S = 0.0005, 0.005
RELAX = {"relax_after_s": 0.01, "switch_interval_ms": PROMPT_S * 1000,
         "relaxed_switch_interval_ms": RELAXED_S * 1000}


def _interval_app() -> App:
    app = App()

    @app.get("/interval")
    def interval(request: Request) -> Response:
        return Response.text(repr(sys.getswitchinterval()))

    return app


def test_a_server_without_deadlines_relaxes_and_a_client_budget_tenses_it_first() -> None:
    with server_thread(_interval_app(), **RELAX) as server:
        adm = server.admission
        wait_for(lambda: adm.relaxed, what="the server relaxed")
        c = Client(server.address)
        assert float(c.request("GET", "/interval")[2]) == RELAXED_S
        m = scrape_metrics(server.address)
        assert m["rtserve_relaxed"] == 1 and m["rtserve_relaxations_total"] == 1
        # A client budget is a deadline at stake: the prompt interval before its handler.
        status, _, body = c.request("GET", "/interval", {"X-Request-Deadline-Ms": "5000"})
        assert status == 200 and float(body) == PROMPT_S
        assert not adm.relaxed and scrape_metrics(server.address)["rtserve_relaxed"] == 0
        # Calm again: it relaxes again.
        wait_for(lambda: adm.relaxed, what="the server relaxed again")
        assert float(c.request("GET", "/interval")[2]) == RELAXED_S
        assert scrape_metrics(server.address)["rtserve_relaxations_total"] == 2
        c.close()


def _ticks(server: object, n: int) -> None:
    """Wait until the housekeeping tick has run `n` more times (each moves tick_at)."""
    timers = server.timers  # type: ignore[attr-defined]
    for _ in range(n):
        seen = timers.tick_at
        wait_for(lambda seen=seen: timers.tick_at != seen, what="a housekeeping tick")


@pytest.mark.parametrize("where", ["route", "default"])
def test_a_server_with_a_deadline_configured_never_relaxes(where: str) -> None:
    app = App()
    extra = {"deadline_ms": 5000.0} if where == "default" else {}

    @app.get("/interval", **({"deadline_ms": 5000, "fallback": Response.json(REVIEW)}
                             if where == "route" else {}))
    def interval(request: Request) -> Response:
        return Response.text(repr(sys.getswitchinterval()))

    with server_thread(app, **RELAX, **extra) as server:
        _ticks(server, 3)  # time enough to relax, had it been allowed to
        assert not server.admission.relaxed
        c = Client(server.address)
        assert float(c.request("GET", "/interval")[2]) == PROMPT_S
        assert scrape_metrics(server.address)["rtserve_relaxations_total"] == 0
        c.close()


def test_the_relaxed_gate_is_open_and_a_light_request_beside_charged_ones_shuts_it() -> None:
    """Relaxed, CPU-bound handlers start past the cap; a light request beside them tenses
    the server before its own handler runs, and the gate holds the next heavy one."""
    app = App()
    go = threading.Event()
    entered = threading.Semaphore(0)

    @app.get("/heavy")
    def heavy(request: Request) -> Response:
        entered.release()
        go.wait(10)
        return Response.text("heavy\n")

    @app.get("/fast")
    def fast(request: Request) -> Response:
        return Response.text(repr(sys.getswitchinterval()))

    try:
        # Seconds of CPU, as in test_handoff_cpu_gate: the held handlers compute nothing,
        # so no charge lapses (a lapse needs 3/4 of the charge spent) during the test.
        with server_thread(app, threads=5, cpu_inflight_ms=3000, **RELAX) as server:
            for path, cpu in (("/heavy", 2_000_000_000), ("/fast", 10_000)):
                route = app._exact[("GET", path)]
                route.cpu_ns = cpu  # as if sampled
                route.cpu_tick = 1000
            adm = server.admission
            wait_for(lambda: adm.relaxed, what="the server relaxed")
            heavies = [Client(server.address) for _ in range(3)]
            for c in heavies:
                c.send("GET", "/heavy")  # prompt, the third would wait (4 s charged)
            for _ in heavies:
                assert entered.acquire(timeout=10)
            assert adm.busy == 3 and adm.cpu_inflight_ns == 6_000_000_000
            fast_c = Client(server.address)
            assert float(fast_c.request("GET", "/fast")[2]) == PROMPT_S
            assert not adm.relaxed
            late = Client(server.address)
            late.send("GET", "/heavy")
            wait_for(lambda: adm.queue_depth == 1, what="the next heavy request held")
            assert adm.busy == 3
            go.set()
            for c in (*heavies, late):
                assert c.recv()[0] == 200
                c.close()
            fast_c.close()
    finally:
        go.set()


def test_relaxing_starts_what_the_gate_held() -> None:
    app = App()
    go = threading.Event()
    entered = threading.Semaphore(0)

    @app.get("/heavy")
    def heavy(request: Request) -> Response:
        entered.release()
        go.wait(10)
        return Response.text("heavy\n")

    @app.get("/fast")
    def fast(request: Request) -> Response:
        return Response.text("fast\n")

    try:
        with server_thread(app, threads=4, cpu_inflight_ms=3000, **RELAX) as server:
            route = app._exact[("GET", "/heavy")]
            route.cpu_ns = 2_000_000_000
            route.cpu_tick = 1000
            adm = server.admission
            wait_for(lambda: adm.relaxed, what="the server relaxed")
            # A stake (a client budget) tenses it; the next tick that sees none starts
            # the calm, and the one after relaxes: the heavy requests come long before.
            c = Client(server.address)
            assert c.request("GET", "/fast", {"X-Request-Deadline-Ms": "5000"})[0] == 200
            assert not adm.relaxed
            heavies = [Client(server.address) for _ in range(3)]
            for h in heavies:
                h.send("GET", "/heavy")
            assert entered.acquire(timeout=10) and entered.acquire(timeout=10)
            wait_for(lambda: adm.queue_depth == 1, what="the third heavy request held")
            # Nothing at stake now: relaxing opens the gate and starts the held one.
            assert entered.acquire(timeout=10)
            assert adm.relaxed and adm.queue_depth == 0 and adm.busy == 3
            go.set()
            for h in heavies:
                assert h.recv()[0] == 200
                h.close()
            c.close()
    finally:
        go.set()
