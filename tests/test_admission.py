"""Admission and shedding: CoDel + adaptive LIFO, --max-inflight, expired-in-queue,
health endpoints never shed, readiness with stuck workers, AIMD/Gradient2 units.

The pool is driven deterministically: threads=1 and a handler blocked on a threading.Event,
so every later request waits in the conductor's queue until the test releases it.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest

from rtserve import App, Request, Response
from rtserve.deadlines import (
    RETRY_AFTER_MAX,
    CoDelQueue,
    ConcurrencyLimit,
    retry_after_seconds,
)
from tests.helpers import REVIEW, Client, Gate, server_thread, wait_for

MS = 1_000_000
LONG_BUDGET = {"X-Request-Deadline-Ms": "60000"}  # CoDel sheds only requests with a deadline


def _queue_app(gate: Gate, order: list[str], lock: threading.Lock) -> App:
    app = App()

    @app.get("/block")
    def block(request: Request) -> Response:
        gate.hold("block")
        return Response.text("unblocked\n")

    @app.get("/rec")
    def rec(request: Request) -> Response:
        with lock:
            order.append(request.query_param("i", "?"))
        return Response.text("ran\n")

    @app.get("/q", deadline_ms=30, fallback=Response.json(REVIEW))
    def queued(request: Request) -> Response:
        with lock:
            order.append("q")
        return Response.text("ran\n")

    @app.get("/stall", deadline_ms=20)
    def stall(request: Request) -> Response:
        gate.hold("stall")
        return Response.text("LATE RESULT\n")

    return app


def _block_one(server, gate: Gate) -> Client:
    """Occupy the single worker with /block; returns the blocked client."""
    a = Client(server.address)
    a.send("GET", "/block")
    gate.wait_entered()
    return a


def _enqueue(server, tags: list[str], already: int = 0, headers: dict | None = None,
             ) -> list[Client]:
    clients = []
    for tag in tags:
        c = Client(server.address)
        c.send("GET", f"/rec?i={tag}", headers)
        clients.append(c)
    wait_for(lambda: server.admission.queue_depth == already + len(tags))
    return clients


# ---- CoDel and adaptive LIFO -------------------------------------------------------------


def test_codel_sheds_old_requests_and_serves_lifo_under_a_standing_queue(gate: Gate) -> None:
    order: list[str] = []
    with server_thread(_queue_app(gate, order, threading.Lock()), threads=1,
                       codel_interval_ms=20, codel_target_ms=250, codel_budget_share=0,
                       ) as server:
        a = _block_one(server, gate)
        old = _enqueue(server, ["B1", "B2", "B3"], headers=LONG_BUDGET)
        # The queue stands (> interval) and B waits past the target: B is shed when its
        # timeout runs out, while the only worker is still busy (not at the next dequeue).
        for c in old:
            status, headers, _ = c.recv()
            assert status == 503
            assert int(headers["retry-after"]) >= 1
        assert server.metrics.shed == {"codel": 3}
        assert server.admission.busy == 1 and not gate.release.is_set()
        new = _enqueue(server, ["C1", "C2", "C3"], headers=LONG_BUDGET)
        wait_for(lambda: server.admission.queue.standing(time.monotonic_ns()))
        gate.release.set()
        assert a.recv()[0] == 200
        for c in new:
            status, _, body = c.recv()
            assert (status, body) == (200, b"ran\n")
        assert order == ["C3", "C2", "C1"]  # newest first while the queue stands
        assert server.metrics.shed == {"codel": 3}
        for c in [a, *old, *new]:
            c.close()


def test_fifo_without_a_standing_queue(gate: Gate) -> None:
    order: list[str] = []
    with server_thread(_queue_app(gate, order, threading.Lock()), threads=1,
                       codel_interval_ms=10_000, codel_target_ms=5) as server:
        a = _block_one(server, gate)
        clients = _enqueue(server, ["B1", "B2", "B3"])
        gate.release.set()
        for c in [a, *clients]:
            assert c.recv()[0] == 200
            c.close()
        assert order == ["B1", "B2", "B3"]
        assert server.metrics.shed == {}


def test_codel_spares_requests_without_a_deadline(gate: Gate) -> None:
    """Without a deadline a long wait costs no late answer: such requests are not shed."""
    order: list[str] = []
    with server_thread(_queue_app(gate, order, threading.Lock()), threads=1,
                       codel_interval_ms=1, codel_target_ms=1) as server:
        a = _block_one(server, gate)
        clients = _enqueue(server, ["B1", "B2"])
        time.sleep(0.05)
        gate.release.set()
        for c in [a, *clients]:
            assert c.recv()[0] == 200
            c.close()
        assert sorted(order) == ["B1", "B2"]
        assert server.metrics.shed == {}


def test_codel_off_never_sheds_from_the_queue(gate: Gate) -> None:
    order: list[str] = []
    with server_thread(_queue_app(gate, order, threading.Lock()), threads=1,
                       codel_target_ms=0, codel_interval_ms=1) as server:
        a = _block_one(server, gate)
        clients = _enqueue(server, ["B1", "B2"], headers=LONG_BUDGET)
        time.sleep(0.05)
        gate.release.set()
        for c in [a, *clients]:
            assert c.recv()[0] == 200
            c.close()
        assert order == ["B1", "B2"]


def _standing_queue_with_a_budget(server, gate: Gate) -> tuple[Client, Client, Client]:
    """The worker blocked, a request without a deadline keeping the queue non-empty until
    it stands, then one with a 400 ms budget; returns (blocked, filler, budgeted)."""
    a = _block_one(server, gate)
    (filler,) = _enqueue(server, ["F"])
    wait_for(lambda: server.admission.queue.standing(time.monotonic_ns()), what="standing")
    budgeted = Client(server.address)
    budgeted.send("GET", "/rec?i=S", {"X-Request-Deadline-Ms": "400"})
    return a, filler, budgeted


def test_a_request_without_a_deadline_is_not_passed_over_forever(gate: Gate) -> None:
    """Under a standing queue requests with a deadline go newest first, but one without
    a deadline, passed over for ten intervals, is served next (it used to wait until the
    queue emptied)."""
    order: list[str] = []
    with server_thread(_queue_app(gate, order, threading.Lock()), threads=1,
                       codel_interval_ms=20, codel_target_ms=1) as server:
        a = _block_one(server, gate)
        (plain,) = _enqueue(server, ["P"])
        budget = {"X-Request-Deadline-Ms": "10000"}  # may wait 5 s: never shed here
        first = _enqueue(server, ["D1"], already=1, headers=budget)
        passed_over = server.admission.queue.items[0][2].t_queued
        wait_for(lambda: time.monotonic_ns() - passed_over > 250 * MS,
                 what="the plain request passed over for more than ten intervals")
        last = _enqueue(server, ["D2"], already=2, headers=budget)
        assert server.admission.queue.standing(time.monotonic_ns())
        gate.release.set()
        assert a.recv()[0] == 200
        for c in (plain, *first, *last):
            assert c.recv()[2] == b"ran\n"
        assert order == ["P", "D2", "D1"]  # its turn first, then LIFO again
        for c in (a, plain, *first, *last):
            c.close()


def test_under_a_standing_queue_a_request_may_wait_its_budget_share(gate: Gate) -> None:
    """--codel-budget-share 0.5 (the default): a request with a 400 ms budget may wait
    200 ms though CoDel's target is 1 ms; served when the worker frees within that."""
    order: list[str] = []
    with server_thread(_queue_app(gate, order, threading.Lock()), threads=1,
                       codel_interval_ms=50, codel_target_ms=1) as server:
        a, filler, budgeted = _standing_queue_with_a_budget(server, gate)
        wait_for(lambda: server.admission.queue_depth == 2, what="both to queue")
        queued = server.admission.queue.items[-1][2].t_queued
        wait_for(lambda: time.monotonic_ns() - queued > 20 * MS, what="20 x the target")
        server.admission.expire_queued(time.monotonic_ns())  # not shed even when asked
        assert server.metrics.shed == {}
        gate.release.set()
        assert a.recv()[0] == 200
        assert budgeted.recv()[2] == b"ran\n" and filler.recv()[2] == b"ran\n"
        assert order == ["S", "F"]  # still LIFO for the one with a deadline
        assert server.metrics.shed == {}
        for c in (a, filler, budgeted):
            c.close()


def test_past_its_budget_share_a_request_is_shed_with_503_while_it_waits(gate: Gate
                                                                       ) -> None:
    """At its share (200 ms of 400), not before, and not when the worker frees: at once,
    while the worker is still blocked. The oldest request, without a deadline, is passed
    over (CoDel never sheds it), not waited behind."""
    order: list[str] = []
    with server_thread(_queue_app(gate, order, threading.Lock()), threads=1,
                       codel_interval_ms=50, codel_target_ms=1) as server:
        t0 = time.monotonic()
        a, filler, budgeted = _standing_queue_with_a_budget(server, gate)
        status, headers, _ = budgeted.recv()
        assert time.monotonic() - t0 >= 0.2  # a lower bound: never shed before its share
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert server.metrics.shed == {"codel": 1}
        gate.release.set()
        assert a.recv()[0] == 200 and filler.recv()[2] == b"ran\n"
        assert order == ["F"]
        for c in (a, filler, budgeted):
            c.close()


def test_codel_budget_share_zero_sheds_at_the_target(gate: Gate) -> None:
    """0: CoDel's target alone, whatever the budget (a fleet behind a balancer that
    retries elsewhere wants the 503 at once)."""
    order: list[str] = []
    with server_thread(_queue_app(gate, order, threading.Lock()), threads=1,
                       codel_interval_ms=50, codel_target_ms=1, codel_budget_share=0,
                       ) as server:
        a, filler, budgeted = _standing_queue_with_a_budget(server, gate)
        status, _, _ = budgeted.recv()  # while the worker is still blocked
        assert status == 503
        assert server.admission.busy == 1 and not gate.release.is_set()
        assert server.metrics.shed == {"codel": 1}
        gate.release.set()
        assert a.recv()[0] == 200 and filler.recv()[2] == b"ran\n"
        for c in (a, filler, budgeted):
            c.close()


# ---- concurrency limit ---------------------------------------------------------------------


def test_max_inflight_sheds_503_with_retry_after_and_health_is_never_shed(gate: Gate) -> None:
    order: list[str] = []
    with server_thread(_queue_app(gate, order, threading.Lock()), threads=1,
                       max_inflight=2) as server:
        a = _block_one(server, gate)
        (b,) = _enqueue(server, ["B"])
        c = Client(server.address)
        status, headers, body = c.request("GET", "/rec?i=C")
        assert status == 503
        assert headers["retry-after"].isdigit() and int(headers["retry-after"]) >= 1
        assert server.metrics.shed == {"limit": 1}
        # Every worker blocked and the admission limit reached: the conductor still answers.
        for path in ("/livez", "/readyz", "/metrics"):
            status, _, body = c.request("GET", path)
            assert status == 200, (path, body)
        assert c.request("HEAD", "/livez")[0] == 200
        assert server.metrics.shed == {"limit": 1}
        gate.release.set()
        assert a.recv()[0] == 200
        assert b.recv()[0] == 200
        assert order == ["B"]  # C never ran
        assert c.request("GET", "/rec?i=D")[0] == 200  # admitted again once below the limit
        for x in (a, b, c):
            x.close()


def test_health_answered_when_the_queue_is_full_of_waiting_requests(gate: Gate) -> None:
    with server_thread(_queue_app(gate, [], threading.Lock()), threads=1,
                       codel_interval_ms=1, codel_target_ms=1) as server:
        a = _block_one(server, gate)
        waiting = _enqueue(server, [f"W{i}" for i in range(5)])
        h = Client(server.address)
        for path in ("/livez", "/readyz", "/metrics"):
            assert h.request("GET", path)[0] == 200
        assert server.admission.queue_depth == 5  # answered around the queue, not through it
        gate.release.set()
        for c in [a, *waiting, h]:
            c.close()


# ---- deadlines while queued --------------------------------------------------------------


def test_a_request_whose_deadline_passed_while_queued_never_runs(gate: Gate) -> None:
    order: list[str] = []
    with server_thread(_queue_app(gate, order, threading.Lock()), threads=1,
                       codel_interval_ms=10_000) as server:
        a = _block_one(server, gate)
        b = Client(server.address)
        status, headers, body = b.request("GET", "/q")  # queued behind /block; 30 ms budget
        assert status == 200 and headers["x-rtserve-fallback"] == "deadline"
        assert json.loads(body) == REVIEW
        assert server.admission.queue_depth == 0  # taken out of the queue when it was answered
        assert server.metrics.shed == {"deadline": 1}
        assert server.metrics.deadline_misses == 1
        assert not server.admission.stuck_count  # it never ran, so no worker is stuck for it
        gate.release.set()
        assert a.recv()[0] == 200
        assert b.request("GET", "/rec?i=after")[0] == 200
        assert order == ["after"]  # /q's handler never ran
        assert b.pending() == b""
        for c in (a, b):
            c.close()


def test_a_queued_request_whose_client_reset_is_dropped_from_the_queue(gate: Gate) -> None:
    order: list[str] = []
    with server_thread(_queue_app(gate, order, threading.Lock()), threads=1) as server:
        a = _block_one(server, gate)
        (b,) = _enqueue(server, ["gone"])
        b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()  # RST
        wait_for(lambda: server.admission.queue_depth == 0)
        assert server.metrics.client_aborts == 1
        gate.release.set()
        assert a.recv()[0] == 200
        assert a.request("GET", "/rec?i=next")[0] == 200
        assert order == ["next"]
        a.close()


# ---- stuck workers and readiness ------------------------------------------------------------


def test_readyz_reports_not_ready_while_all_workers_are_stuck(gate: Gate) -> None:
    with server_thread(_queue_app(gate, [], threading.Lock()), threads=2) as server:
        h = Client(server.address)
        assert h.request("GET", "/readyz")[0] == 200
        c1, c2 = Client(server.address), Client(server.address)
        c1.send("GET", "/stall")
        c2.send("GET", "/stall")
        assert c1.recv()[0] == 504
        assert c2.recv()[0] == 504
        gate.wait_entered(2)
        wait_for(lambda: server.admission.stuck_count == 2)
        status, _, body = h.request("GET", "/readyz")
        assert status == 503 and b"stuck" in body
        assert h.request("GET", "/livez")[0] == 200  # alive, just not ready
        gate.release.set()
        wait_for(lambda: server.metrics.late_dropped == 2)
        status, _, body = h.request("GET", "/readyz")
        assert status == 200, body
        assert server.admission.busy == 0
        for c in (h, c1, c2):
            c.close()


def test_one_stuck_worker_of_two_keeps_ready(gate: Gate) -> None:
    with server_thread(_queue_app(gate, [], threading.Lock()), threads=2) as server:
        c = Client(server.address)
        assert c.request("GET", "/stall")[0] == 504
        gate.wait_entered()
        assert server.admission.stuck_count == 1
        assert c.request("GET", "/readyz")[0] == 200
        assert c.request("GET", "/rec?i=x")[0] == 200  # the free worker still serves
        c.close()


# ---- unit: CoDelQueue ------------------------------------------------------------------------


def test_codel_queue_standing_lifo_and_discard() -> None:
    q = CoDelQueue(target_ms=5, interval_ms=100)
    t0 = 1_000 * MS
    q.push("a", t0)
    q.push("b", t0 + 1 * MS)
    assert not q.standing(t0 + 50 * MS)
    assert q.timeout_ns(t0 + 50 * MS) == 100 * MS  # not standing: the interval N
    assert q.pop(t0 + 50 * MS) == "a"  # FIFO
    q.push("c", t0 + 60 * MS)
    q.push("d", t0 + 70 * MS)
    later = t0 + 150 * MS  # never empty since t0: a standing queue
    assert q.standing(later)
    assert q.timeout_ns(later) == 5 * MS  # standing: the target M
    assert q.pop(later) == "d"  # LIFO
    assert q.discard("b", later) and not q.discard("zzz", later)
    assert len(q) == 1
    assert q.pop(later) == "c"
    assert not q.standing(later + 1)  # emptied: the clock restarts
    q.push("e", later + 2)
    assert not q.standing(later + 50 * MS)


def test_codel_queue_lifo_only_for_items_lifo_ok_accepts() -> None:
    q = CoDelQueue(target_ms=5, interval_ms=100, lifo_ok=lambda item: item.startswith("dl"))
    t0 = 1_000 * MS
    for i, tag in enumerate(["dl-1", "plain", "dl-2"]):
        q.push(tag, t0 + i * MS)
    later = t0 + 150 * MS
    assert q.standing(later)
    assert q.peek(later) == "dl-2" and q.pop(later) == "dl-2"  # newest has a deadline: LIFO
    assert q.peek(later) == "dl-1" and q.pop(later) == "dl-1"  # newest has none: FIFO
    assert q.pop(later) == "plain"


def test_codel_queue_serves_an_item_that_may_not_jump_once_passed_over_long() -> None:
    """Under LIFO the newest with a deadline goes first, but not forever: the oldest
    without one gets its turn once it has waited ten intervals."""
    pushed: dict[str, int] = {}
    q = CoDelQueue(target_ms=5, interval_ms=100, lifo_ok=lambda item: item.startswith("dl"),
                   queued_at=pushed.__getitem__)
    t0 = 1_000 * MS
    for tag, at_ms in (("dl-0", 0), ("plain", 60), ("dl-1", 900), ("dl-2", 1000)):
        pushed[tag] = t0 + at_ms * MS
        q.push(tag, pushed[tag])
    at = t0 + 1050 * MS  # standing; "plain" has waited 990 ms, but "dl-0" is the oldest
    assert q.peek(at) == "dl-2" and q.pop(at) == "dl-2"  # LIFO
    q.discard("dl-0", at)  # say its deadline answered it
    assert q.peek(at) == "dl-1"  # "plain", the oldest now, was passed over 990 ms
    later = t0 + 1070 * MS  # 1010 ms: its turn
    assert q.peek(later) == "plain" and q.pop(later) == "plain"
    assert q.pop(later) == "dl-1"


def test_codel_off_is_fifo_and_unbounded() -> None:
    q = CoDelQueue(target_ms=0, interval_ms=100)
    for i in range(3):
        q.push(i, 0)
    assert q.timeout_ns(10**12) == 0
    assert [q.pop(10**12) for _ in range(3)] == [0, 1, 2]


def test_retry_after_is_whole_seconds_between_1_and_the_cap() -> None:
    assert retry_after_seconds(0, 5 * MS, 8) == 1
    assert retry_after_seconds(10, 0, 8) == 1
    assert retry_after_seconds(100, 5 * MS, 8) == 1
    assert retry_after_seconds(400, 50 * MS, 4) == 5
    assert retry_after_seconds(10**6, 1e9, 1) == RETRY_AFTER_MAX


# ---- unit: concurrency limits ------------------------------------------------------------------


def test_fixed_limit() -> None:
    lim = ConcurrencyLimit("off", 3, 8)
    assert lim.enabled and lim.admits(2) and not lim.admits(3)
    lim.on_sample(10 * MS, 3, True)  # fixed: never moves
    assert lim.limit == 3
    assert not ConcurrencyLimit("off", 0, 8).enabled


def test_aimd_backs_off_on_drops_and_grows_when_used() -> None:
    lim = ConcurrencyLimit("aimd", 0, 4)
    start = lim.limit
    lim.on_sample(1 * MS, int(start), True)
    assert lim.limit == pytest.approx(start * 0.9)
    before = lim.limit
    lim.on_sample(1 * MS, int(before), False)  # busy: additive increase
    assert lim.limit == before + 1
    lim.on_sample(1 * MS, 1, False)  # mostly idle: no reason to grow
    assert lim.limit == before + 1
    for _ in range(200):
        lim.on_sample(1 * MS, 1, True)
    assert lim.limit == 4  # never below the floor (the pool size)


def test_gradient2_grows_at_steady_latency_and_shrinks_when_latency_rises() -> None:
    lim = ConcurrencyLimit("gradient2", 50, 4)
    for _ in range(100):
        lim.on_sample(1 * MS, int(lim.limit), False)
    grown = lim.limit
    assert grown > 50  # gradient 1: L + queue allowance
    for _ in range(30):
        lim.on_sample(10 * MS, int(lim.limit), False)
    assert lim.limit < grown * 0.7  # latency x10: gradient 0.5 pulls the limit down
    shrunk = lim.limit
    for _ in range(30):
        lim.on_sample(1 * MS, int(lim.limit), False)
    assert lim.limit > shrunk  # recovers once latency falls back
    assert lim.floor <= lim.limit <= lim.ceiling


def test_gradient2_ignores_samples_while_underused() -> None:
    lim = ConcurrencyLimit("gradient2", 50, 4)
    for _ in range(50):
        lim.on_sample(1 * MS, int(lim.limit), False)
    before = lim.limit
    for _ in range(30):
        lim.on_sample(10 * MS, 1, False)  # app-limited: inflight well below limit / 2
    assert lim.limit == before


def test_adaptive_limit_sheds_over_the_wire(gate: Gate) -> None:
    with server_thread(_queue_app(gate, [], threading.Lock()), threads=1,
                       adaptive_limit="aimd", max_inflight=2) as server:
        a = _block_one(server, gate)
        (b,) = _enqueue(server, ["B"])
        c = Client(server.address)
        status, headers, _ = c.request("GET", "/rec?i=C")
        assert status == 503 and "retry-after" in headers
        assert server.metrics.shed == {"limit": 1}
        gate.release.set()
        for x in (a, b):
            assert x.recv()[0] == 200
            x.close()
        c.close()


def test_recent_timer_lateness_is_sent_as_extra_margin(gate: Gate) -> None:
    """A conductor whose deadline timers fired late answers the next ones earlier."""
    app = App()

    @app.get("/held", deadline_ms=10_000, fallback=Response.json(REVIEW))
    def held(request: Request) -> Response:
        gate.hold("held")
        return Response.text("ran\n")

    with server_thread(app, threads=1, deadline_margin_ms=1) as server:
        server.admission.lag_ns = 3_000_000  # as if the last fallback fired 3 ms late
        server.admission._timer_fired = True  # ...just now: the next tick keeps the mark
        c = Client(server.address)
        c.send("GET", "/held")
        gate.wait_entered()
        respond_by, conn, _ = server.timers.next_deadline()
        req = conn.request
        assert req.deadline_ns - respond_by == 1_000_000 + 3_000_000
        metrics = Client(server.address)
        metrics.send("GET", "/metrics")
        assert b"rtserve_deadline_extra_margin_seconds 0.003" in metrics.recv()[2]
        gate.release.set()
        assert c.recv()[0] == 200
        c.close()
        metrics.close()


def test_the_extra_margin_halves_each_second_no_deadline_timer_fires() -> None:
    """After a burst of late timers the margin must not stay: a quiet tick halves it."""
    with server_thread(App(), threads=1) as server:
        adm = server.admission
        adm.lag_ns = 4_000_000
        wait_for(lambda: 0 < adm.lag_ns <= 2_000_000, what="a tick to halve the margin")
        wait_for(lambda: adm.lag_ns <= 1_000_000, what="the next tick to halve it again")


def test_shed_with_fallback_answers_a_shed_request_with_its_routes_decision(gate: Gate) -> None:
    """--shed-with-fallback: a request shed by the limit gets the route's fallback (a
    decision in time) instead of 503; a route without a fallback still gets 503."""
    from rtserve import App, Response

    app = App()

    @app.post("/decide", deadline_ms=10_000, fallback=Response.json(REVIEW))
    def decide(request: Request) -> Response:
        gate.hold("decide")
        return Response.text("ran\n")

    @app.get("/plain")
    def plain(request: Request) -> Response:
        return Response.text("plain\n")

    with server_thread(app, threads=1, max_inflight=1, shed_with_fallback=True) as server:
        held = Client(server.address)
        held.send("POST", "/decide")
        gate.wait_entered()
        shed = Client(server.address)
        status, headers, body = shed.request("POST", "/decide")
        assert (status, headers.get("x-rtserve-fallback")) == (200, "shed")
        assert body == b'{"decision":"review"}'
        other = Client(server.address)
        assert other.request("GET", "/plain")[0] == 503  # no fallback: the usual shed
        assert server.metrics.shed == {"limit": 2}
        gate.release.set()
        assert held.recv()[0] == 200
        for c in (held, shed, other):
            c.close()
