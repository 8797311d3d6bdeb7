"""Deadlines that stop the work: the fallback goes out and the task is cancelled; a client
that leaves cancels its task; admission (dead on arrival, CoDel, limiter) applies."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from tests.apps.asgi_apps import Probe, make_fastapi
from tests.helpers import REVIEW, Client, connect, read_response, server_thread, wait_for

FALLBACK = '/slow=200:{"decision": "review"}'


def cancelled(srv: Any) -> dict[str, int]:
    return srv.asgi.cancelled()


def test_deadline_sends_the_fallback_and_cancels_the_task():
    probe = Probe()
    with server_thread(make_fastapi(probe), route_deadline=["/slow=150"],
                       fallback=[FALLBACK]) as srv:
        c = Client(srv.address)
        status, h, body = c.request("GET", "/slow")
        assert status == 200 and json.loads(body) == REVIEW
        assert h["x-rtserve-fallback"] == "deadline"
        assert probe.slow_finally.wait(10)  # CancelledError reached it: its finally ran
        wait_for(lambda: cancelled(srv)["deadline"] == 1, what="the cancel count")
        wait_for(lambda: srv.admission.busy == 0 and srv.admission.stuck_count == 0,
                 what="the slot to free")
        # The same keep-alive connection goes on; the cancelled task's result never shows.
        status, _, body = c.request("GET", "/items/5")
        assert status == 200 and json.loads(body)["item_id"] == 5
        status, _, body = c.request("GET", "/metrics")
        assert b'rtserve_cancelled_total{reason="deadline"} 1' in body
        c.close()


def test_client_budget_header_cancels_too_and_504_without_fallback():
    probe = Probe()
    with server_thread(make_fastapi(probe)) as srv:
        c = Client(srv.address)
        status, _, _ = c.request("GET", "/slow", headers={"X-Request-Deadline-Ms": "100"})
        assert status == 504
        assert probe.slow_finally.wait(10)
        wait_for(lambda: cancelled(srv)["deadline"] == 1, what="the cancel count")
        c.close()


def test_a_client_that_disconnects_cancels_its_task():
    probe = Probe()
    with server_thread(make_fastapi(probe)) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n")
        assert probe.entered.wait(10)
        s.close()
        assert probe.wait_finally.wait(10)
        wait_for(lambda: cancelled(srv)["disconnect"] == 1, what="the cancel count")
        wait_for(lambda: srv.admission.busy == 0, what="the slot to free")
        assert cancelled(srv)["deadline"] == 0


def test_a_reading_app_hears_http_disconnect_before_it_is_cancelled():
    heard: list[str] = []
    reading = threading.Event()
    finished = threading.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            await receive()  # the (empty) body
            reading.set()
            heard.append((await receive())["type"])  # waits: the response is not complete
            await asyncio.sleep(30)  # cancelled here
            heard.append("not cancelled")
        finally:
            finished.set()

    with server_thread(app) as srv:
        s = connect(srv.address)
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        # The app itself must be reading: a client gone before the task's first step
        # cancels it before it begins (its finally never runs; see the test above).
        assert reading.wait(10)
        s.close()
        assert finished.wait(10)
        assert heard == ["http.disconnect"]
        wait_for(lambda: cancelled(srv)["disconnect"] == 1, what="the cancel count")


def test_a_complete_response_is_never_cancelled_its_background_work_goes_on():
    done = threading.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"answered"})
        await asyncio.sleep(0.3)  # background work after the response, past the deadline
        done.set()

    with server_thread(app, deadline_ms=100) as srv:
        c = Client(srv.address)
        status, _, body = c.request("GET", "/")
        assert (status, body) == (200, b"answered")
        c.close()  # the client leaves while the background work runs
        assert done.wait(10)
        assert cancelled(srv) == {"deadline": 0, "disconnect": 0}


def test_dead_on_arrival_and_the_limiter_apply_to_asgi_requests():
    probe = Probe()
    with server_thread(make_fastapi(probe), max_inflight=1) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n")
        assert probe.entered.wait(10)
        c = Client(srv.address)
        status, h, _ = c.request("GET", "/items/1")  # one in flight: the limit sheds
        assert status == 503 and "retry-after" in h
        status, _, _ = c.request("GET", "/metrics")
        s.close()
        assert probe.wait_finally.wait(10)
        wait_for(lambda: srv.admission.busy == 0, what="the slot to free")
        status, _, _ = c.request("GET", "/items/1", headers={"X-Request-Deadline-Ms": "0"})
        assert status == 504  # a spent budget: dead on arrival, the app never ran
        assert srv.metrics.dead_on_arrival == 1
        c.close()


def test_requests_wait_in_the_queue_above_asgi_concurrency():
    gate = threading.Event()
    started: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        started.append(scope["path"])
        while not gate.is_set():
            await asyncio.sleep(0.005)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    with server_thread(app, asgi_concurrency=1) as srv:
        a, b = connect(srv.address), connect(srv.address)
        a.sendall(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: started == ["/a"], what="the first request to run")
        b.sendall(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: srv.admission.queue_depth == 1, what="the second to queue")
        assert started == ["/a"]
        gate.set()
        assert read_response(a)[2] == b"/a" and read_response(b)[2] == b"/b"
        a.close()
        b.close()


def test_tasks_cancelled_before_their_first_step_free_their_slots():
    """A loop blocked by one request: the others' deadlines come while their tasks wait to
    begin; cancelled then, they never run a line, and their slots must still come back."""
    import time

    ran: list[str] = []
    entered = threading.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        ran.append(scope["path"])
        if scope["path"] == "/block":
            entered.set()
            time.sleep(0.5)  # blocks the loop (what an async endpoint must not do)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    with server_thread(app, deadline_ms=50) as srv:
        first = connect(srv.address)
        first.sendall(b"GET /block HTTP/1.1\r\nHost: t\r\n\r\n")
        assert entered.wait(10)
        socks = [connect(srv.address) for _ in range(5)]
        for i, s in enumerate(socks):
            s.sendall(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
        statuses = [read_response(s)[0] for s in [first, *socks]]
        for s in [first, *socks]:
            s.close()
        assert statuses == [504] * 6  # every one answered at its deadline
        wait_for(lambda: srv.admission.busy == 0 and srv.admission.stuck_count == 0,
                 what="every slot to come back")
        assert ran == ["/block"]  # the five were cancelled before they began
        assert cancelled(srv)["deadline"] >= 5
