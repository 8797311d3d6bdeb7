"""bench/light_probe.py's probe client: it times real answers on one keep-alive
connection, and counts what is not a 200 as a failure, not as a fast answer."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

from rtserve.app import App
from rtserve.response import Response
from tests.helpers import server_thread, wait_for

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import light_probe  # noqa: E402


def _probe_until(app: App, done: Callable[[list[float], list[str]], bool]
                 ) -> tuple[list[float], list[str], int]:
    """Probe a real server until `done(latencies, failures)`; also the connections it
    accepted."""
    with server_thread(app) as server:
        assert server.address is not None
        port = server.address[1]
        latencies: list[float] = []
        failures: list[str] = []
        stop = threading.Event()
        t = threading.Thread(target=light_probe.probe, args=(port, stop, latencies, failures))
        t.start()
        try:
            wait_for(lambda: done(latencies, failures), what="the probes")
        finally:
            stop.set()
            t.join(10)
        accepted = server.metrics.connections_accepted
    return latencies, failures, accepted


def test_probes_are_timed_on_one_keep_alive_connection() -> None:
    app = App()

    @app.get("/hello")
    def hello(request):  # type: ignore[no-untyped-def]
        return Response.text("Hello, world!")

    latencies, failures, accepted = _probe_until(app, lambda lat, fail: len(lat) >= 5)
    assert failures == [] and accepted == 1
    assert len(latencies) >= 5 and all(ms > 0 for ms in latencies)


def test_an_answer_that_is_not_200_is_a_failure() -> None:
    app = App()

    @app.get("/hello")
    def hello(request):  # type: ignore[no-untyped-def]
        return Response.text("no", status=503)

    latencies, failures, _ = _probe_until(app, lambda lat, fail: len(fail) >= 2)
    assert latencies == []
    assert failures
