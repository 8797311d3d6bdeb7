"""Deadlines kept by the conductor: fallbacks, 504, client budgets, dead on arrival.

Real server, real sockets. Handlers that must be late block on a threading.Event that the
test sets only after the fallback/504 arrived, so "late" never depends on timing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rtserve import App, Request, Response
from tests.helpers import REVIEW, Client, Gate, server_thread, wait_for

# ---- fallback and 504 at respond_by ------------------------------------------------------


def _late_app(gate: Gate, hold: Gate) -> App:
    app = App()

    @app.post("/score", deadline_ms=20, fallback=Response.json(REVIEW))
    def score(request: Request) -> Response:
        gate.hold("score")
        return Response.json({"decision": "approve", "late": True})

    @app.get("/nofallback", deadline_ms=20)
    def nofallback(request: Request) -> Response:
        gate.hold("nofallback")
        return Response.text("LATE RESULT\n")

    @app.get("/fb", deadline_ms=20, fallback=Response.json(REVIEW))
    def fb(request: Request) -> Response:
        gate.hold("fb")
        return Response.text("LATE RESULT\n")

    @app.get("/hold")
    def held(request: Request) -> Response:
        hold.hold("hold")
        return Response.text("held\n")

    @app.get("/ping")
    def ping(request: Request) -> Response:
        return Response.text("pong\n")

    return app


def test_fallback_sent_and_late_result_never_reaches_any_client(gate: Gate) -> None:
    hold = Gate()
    try:
        with server_thread(_late_app(gate, hold), threads=3) as server:
            addr = server.address
            c1, c2 = Client(addr), Client(addr)
            status, headers, body = c1.request("POST", "/score", body=b'{"amount": 12}')
            assert status == 200
            assert headers["x-rtserve-fallback"] == "deadline"
            assert json.loads(body) == REVIEW
            gate.wait_entered()  # the handler really ran and is still running: a stuck worker
            assert server.metrics.deadline_misses == 1
            assert server.metrics.fallbacks == 1
            wait_for(lambda: server.admission.stuck_count == 1)
            # The next request on the same connection and one on another connection are in
            # flight when the late result comes back.
            c1.send("GET", "/hold")
            c2.send("GET", "/hold")
            hold.wait_entered(2)
            gate.release.set()
            wait_for(lambda: server.metrics.late_dropped == 1)
            assert server.admission.stuck_count == 0
            hold.release.set()
            for c in (c1, c2):
                status, _, body = c.recv()
                assert (status, body) == (200, b"held\n")
                assert c.request("GET", "/ping")[2] == b"pong\n"
            c3 = Client(addr)
            assert c3.request("GET", "/ping")[2] == b"pong\n"
            for c in (c1, c2, c3):
                assert c.pending() == b""  # nothing else ever arrived, late result included
                c.close()
            assert server.metrics.late_dropped == 1
            assert gate.calls == ["score"]
    finally:
        hold.release.set()


def test_no_fallback_gets_504_and_head_keeps_framing(gate: Gate) -> None:
    with server_thread(_late_app(gate, Gate()), threads=4) as server:
        c = Client(server.address)
        status, headers, body = c.request("GET", "/nofallback")
        assert status == 504
        assert "x-rtserve-fallback" not in headers
        assert b"LATE" not in body
        # HEAD: a 504 and a fallback without a body, and the connection stays in sync.
        status, headers, _ = c.request("HEAD", "/nofallback")
        assert status == 504 and int(headers["content-length"]) > 0
        status, _, body = c.request("GET", "/ping")
        assert (status, body) == (200, b"pong\n")  # the 504 sent no body bytes for HEAD
        status, headers, _ = c.request("HEAD", "/fb")
        assert status == 200 and headers["x-rtserve-fallback"] == "deadline"
        assert int(headers["content-length"]) == len(json.dumps(REVIEW, separators=(",", ":")))
        status, _, body = c.request("GET", "/ping")
        assert (status, body) == (200, b"pong\n")  # no stray body bytes were sent for HEAD
        gate.wait_entered(3)
        gate.release.set()
        wait_for(lambda: server.metrics.late_dropped == 3)
        assert c.pending() == b""
        c.close()
        assert server.metrics.deadline_misses == 3


# ---- client budgets --------------------------------------------------------------------


def _budget_app(gate: Gate) -> App:
    app = App()

    def report(request: Request) -> Response:
        return Response.json({
            "budget_ns": request.deadline_ns - request.start_ns if request.deadline_ns else 0,
            "remaining": request.remaining() if request.deadline_ns else None,
            "has_deadline": request.deadline is not None,
        })

    app.get("/route50", deadline_ms=50)(report)
    app.get("/open")(report)

    @app.get("/slow20", deadline_ms=20, fallback=Response.json(REVIEW))
    def slow20(request: Request) -> Response:
        gate.hold("slow20")
        return Response.text("LATE RESULT\n")

    @app.get("/slow-open")
    def slow_open(request: Request) -> Response:
        gate.hold("slow-open")
        return Response.text("LATE RESULT\n")

    return app


MS = 1_000_000


@pytest.mark.parametrize(
    ("path", "headers", "budget"),
    [
        ("/route50", {}, 50 * MS),
        ("/route50", {"X-Request-Deadline-Ms": "30"}, 30 * MS),
        ("/route50", {"X-Request-Deadline-Ms": "5000"}, 50 * MS),  # never extends the route
        ("/route50", {"grpc-timeout": "25m"}, 25 * MS),
        ("/route50", {"grpc-timeout": "30000u"}, 30 * MS),
        ("/route50", {"grpc-timeout": "40000000n"}, 40 * MS),
        ("/route50", {"grpc-timeout": "2S"}, 50 * MS),
        ("/route50", {"grpc-timeout": "1H"}, 50 * MS),
        ("/route50", {"x-envoy-expected-rq-timeout-ms": "40"}, 40 * MS),
        # first present wins: ours, then grpc-timeout, then envoy
        ("/route50", [("grpc-timeout", "10m"), ("X-Request-Deadline-Ms", "30")], 30 * MS),
        ("/route50", [("x-envoy-expected-rq-timeout-ms", "10"), ("grpc-timeout", "35m")],
         35 * MS),
        ("/open", {}, 0),
        ("/open", {"X-Request-Deadline-Ms": "45"}, 45 * MS),
        ("/open", {"grpc-timeout": "3S"}, 3000 * MS),
        ("/open", {"x-envoy-expected-rq-timeout-ms": "250"}, 250 * MS),
    ],
)
def test_client_budget_headers(path: str, headers: Any, budget: int, gate: Gate) -> None:
    with server_thread(_budget_app(gate)) as server:
        c = Client(server.address)
        for _ in range(3):  # the same head again: from the parser's cache the 2nd time on
            status, _, body = c.request("GET", path, headers)
            assert status == 200, body
            got = json.loads(body)
            assert got["budget_ns"] == budget
            assert got["has_deadline"] == bool(budget)
            if budget:
                assert 0 < got["remaining"] <= budget / 1e9
        c.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Request-Deadline-Ms", "abc"),
        ("X-Request-Deadline-Ms", "-5"),
        ("X-Request-Deadline-Ms", "+5"),
        ("X-Request-Deadline-Ms", "5.5"),
        ("X-Request-Deadline-Ms", "1_0"),
        ("X-Request-Deadline-Ms", "\u0661\u0660"),  # Arabic-Indic digits: int() takes them
        ("X-Request-Deadline-Ms", "1234567890"),  # 10 digits
        ("grpc-timeout", "10"),
        ("grpc-timeout", "10x"),
        ("grpc-timeout", "10 m"),
        ("grpc-timeout", "m"),
        ("grpc-timeout", "123456789m"),  # 9 digits: the grammar allows 8
        ("grpc-timeout", "1.5S"),
        ("x-envoy-expected-rq-timeout-ms", "soon"),
        ("x-envoy-expected-rq-timeout-ms", "0x10"),
    ],
)
def test_malformed_budget_header_is_400(name: str, value: str, gate: Gate) -> None:
    with server_thread(_budget_app(gate)) as server:
        c = Client(server.address)
        status, _, body = c.request("GET", "/route50", [(name, value.encode().decode("latin-1"))])
        assert status == 400, body
        # A budget no loaded test machine misses: the point is the connection's sync.
        status, _, _ = c.request("GET", "/route50", {name: "2000" if name != "grpc-timeout"
                                                     else "2S"})
        assert status == 200  # the 400 was a clean answer on a connection still in sync
        c.close()


def test_duplicate_budget_header_is_400(gate: Gate) -> None:
    with server_thread(_budget_app(gate)) as server:
        c = Client(server.address)
        hdrs = [("X-Request-Deadline-Ms", "10"), ("X-Request-Deadline-Ms", "5000")]
        assert c.request("GET", "/route50", hdrs)[0] == 400
        c.close()


def test_longer_client_budget_does_not_extend_the_route(gate: Gate) -> None:
    with server_thread(_budget_app(gate)) as server:
        c = Client(server.address)
        status, headers, body = c.request("GET", "/slow20", {"X-Request-Deadline-Ms": "60000"})
        assert status == 200 and headers["x-rtserve-fallback"] == "deadline"
        assert json.loads(body) == REVIEW
        gate.wait_entered()
        c.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [("X-Request-Deadline-Ms", "30"), ("grpc-timeout", "30m"),
     ("x-envoy-expected-rq-timeout-ms", "30")],
)
def test_client_budget_is_enforced_on_a_route_without_deadline(name: str, value: str,
                                                                 gate: Gate) -> None:
    with server_thread(_budget_app(gate)) as server:
        c = Client(server.address)
        status, _, body = c.request("GET", "/slow-open", {name: value})
        assert status == 504 and b"LATE" not in body
        gate.wait_entered()
        assert server.metrics.deadline_misses == 1
        c.close()


def test_server_default_deadline_applies_to_routes_without_one(gate: Gate) -> None:
    with server_thread(_budget_app(gate), deadline_ms=30) as server:
        c = Client(server.address)
        status, _, _ = c.request("GET", "/slow-open")
        assert status == 504
        status, _, body = c.request("GET", "/open")
        assert json.loads(body)["budget_ns"] == 30 * MS
        status, _, body = c.request("GET", "/route50")
        assert json.loads(body)["budget_ns"] == 50 * MS  # the route's own maximum wins
        c.close()


# ---- dead on arrival -------------------------------------------------------------------


def _doa_app(calls: list[str]) -> App:
    app = App()

    def work(request: Request) -> Response:
        calls.append(request.path)
        time.sleep(float(request.query_param("ms", "0")) / 1000)
        return Response.text("worked\n")

    app.get("/work")(work)
    app.get("/workfb", fallback=Response.json(REVIEW))(work)
    return app


@pytest.mark.parametrize("path", ["/work", "/workfb"])
def test_dead_on_arrival_answers_at_once_without_running_the_handler(path: str) -> None:
    calls: list[str] = []
    with server_thread(_doa_app(calls)) as server:
        c = Client(server.address)
        for _ in range(3):  # warm the route's service-time EWMA to >= 60 ms
            assert c.request("GET", path + "?ms=60")[0] == 200
        assert len(calls) == 3
        status, headers, body = c.request("GET", path, {"X-Request-Deadline-Ms": "20"})
        if path == "/workfb":
            assert status == 200 and headers["x-rtserve-fallback"] == "dead-on-arrival"
            assert json.loads(body) == REVIEW
            assert server.metrics.fallbacks == 1
        else:
            assert status == 504
        assert len(calls) == 3  # the handler never ran
        assert server.metrics.dead_on_arrival == 1
        assert server.metrics.deadline_misses == 0
        # A budget larger than the estimate is served normally.
        assert c.request("GET", path + "?ms=0", {"X-Request-Deadline-Ms": "5000"})[0] == 200
        assert len(calls) == 4
        c.close()


def test_zero_budget_is_dead_on_arrival_even_on_a_cold_route() -> None:
    calls: list[str] = []
    with server_thread(_doa_app(calls)) as server:
        c = Client(server.address)
        for hdr in ({"X-Request-Deadline-Ms": "0"}, {"grpc-timeout": "0m"}):
            assert c.request("GET", "/work", hdr)[0] == 504
        assert calls == []
        assert server.metrics.dead_on_arrival == 2
        c.close()


def test_dead_on_arrival_lets_a_probe_through_so_the_estimate_recovers() -> None:
    """One slow phase must not make a route refuse every later request forever."""
    calls: list[str] = []
    with server_thread(_doa_app(calls)) as server:
        c = Client(server.address)
        for _ in range(3):
            c.request("GET", "/work?ms=60")
        statuses = []
        for _ in range(15):
            statuses.append(c.request("GET", "/work?ms=0", {"X-Request-Deadline-Ms": "20"})[0])
            if statuses[-1] == 200:
                break
        assert statuses[0] == 504
        assert statuses[-1] == 200, statuses  # a probe ran within a few refusals
        assert len(calls) == 4
        c.close()


def test_handler_can_read_its_remaining_budget() -> None:
    app = App()
    seen: dict[str, float] = {}

    @app.get("/cut", deadline_ms=40)
    def cut(request: Request) -> Response:
        seen["before"] = request.remaining()
        time.sleep(0.005)
        seen["after"] = request.remaining()
        seen["deadline"] = request.deadline or 0.0
        return Response.text("ok\n")

    with server_thread(app) as server:
        c = Client(server.address)
        assert c.request("GET", "/cut")[0] == 200
        assert 0 < seen["after"] < seen["before"] <= 0.040
        assert abs(seen["deadline"] - time.monotonic() - seen["after"]) < 5  # same clock
        c.close()


def test_fraud_example_scores_and_falls_back() -> None:
    from examples.fraud import app

    tx = json.dumps({"amount": 42.0, "country": "FR", "card_country": "FR", "hour": 14})
    with server_thread(app) as server:
        c = Client(server.address)
        status, headers, body = c.request("POST", "/score", None, tx.encode())
        assert status == 200 and "x-rtserve-fallback" not in headers
        assert json.loads(body)["decision"] in ("approve", "review", "decline")
        status, headers, body = c.request("POST", "/score?stall_ms=200", None, tx.encode())
        assert status == 200 and headers["x-rtserve-fallback"] == "deadline"
        assert json.loads(body) == REVIEW
        c.close()


def test_a_stream_whose_head_went_out_before_respond_by_is_no_longer_bounded(
    gate: Gate,
) -> None:
    """Documented behaviour: once the head is sent a fallback can't replace the response,
    so the deadline stops applying; the stream finishes whenever the handler does."""
    app = App()

    @app.get("/stream", deadline_ms=20, fallback=Response.json(REVIEW))
    def stream(request: Request) -> Response:
        def body() -> Iterator[bytes]:
            yield b"first;"
            gate.hold("stream")
            yield b"second;"

        return Response(body(), 200, None, "text/plain")

    with server_thread(app) as server:
        c = Client(server.address)
        c.send("GET", "/stream")
        gate.wait_entered()  # head and first chunk are out; the body is now blocked
        time.sleep(0.05)  # well past respond_by
        assert server.metrics.deadline_misses == 0 and server.metrics.fallbacks == 0
        gate.release.set()
        status, headers, body = c.recv()
        assert status == 200 and "x-rtserve-fallback" not in headers
        assert body == b"first;second;"
        c.close()


def test_handler_sees_when_the_conductor_stops_waiting() -> None:
    """request.respond_by is the deadline less the margin: what a handler must beat."""
    from rtserve import App, Response
    from tests.helpers import Client, server_thread

    app = App()

    @app.get("/when", deadline_ms=500)
    def when(request: Request) -> Response:
        assert request.deadline is not None and request.respond_by is not None
        return Response.json({"gap_ms": (request.deadline - request.respond_by) * 1000})

    with server_thread(app, threads=1, deadline_margin_ms=2) as server:
        c = Client(server.address)
        status, _, body = c.request("GET", "/when")
        c.close()
    import json

    assert status == 200 and json.loads(body)["gap_ms"] >= 2.0 - 1e-6
