"""The loop's wait with a queue: a queued request CoDel will never shed sets no wake-up.

Found under the ASGI gate (requests without a deadline queued past CoDel's target made the
conductor poll epoll with a zero timeout, every turn, until the queue emptied); the same
held for worker-pool queues.
"""

from __future__ import annotations

import time

from rtserve import App, Request, Response
from tests.helpers import Client, Gate, connect, server_thread, wait_for


def test_a_queued_request_without_deadline_sets_no_past_expiry(gate: Gate):
    app = App()

    @app.get("/block")
    def block(request: Request) -> Response:
        gate.hold("block")
        return Response.text("ok\n")

    with server_thread(app, threads=1, codel_target_ms=1, codel_interval_ms=1) as srv:
        blocked = connect(srv.address)
        blocked.sendall(b"GET /block HTTP/1.1\r\nHost: t\r\n\r\n")
        gate.wait_entered(1)
        c = Client(srv.address)
        c.send("GET", "/block")  # no deadline: waits in the queue, never shed by CoDel
        wait_for(lambda: srv.admission.queue_depth == 1, what="the request to queue")
        later = time.monotonic_ns() + 10**9  # long past its CoDel timeout
        assert srv.admission.next_expiry(later) == 0
        gate.release.set()
        assert c.recv()[0] == 200
        c.close()
        blocked.close()
