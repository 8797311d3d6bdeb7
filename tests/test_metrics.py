"""/metrics: valid Prometheus text (checked with prometheus_client's parser), and the
counters and gauges move as the tests drive the server over real sockets."""

from __future__ import annotations

import socket
import struct
import threading

from prometheus_client.parser import text_string_to_metric_families

from rtserve import App, Request, Response
from rtserve.metrics import Histogram, Metrics
from tests.helpers import REVIEW, Client, Gate, server_thread, wait_for

Samples = dict[tuple[str, frozenset], float]


def scrape(c: Client) -> tuple[Samples, dict[str, str]]:
    """GET /metrics and parse it; returns {(sample, labels): value} and {family: type}."""
    status, headers, body = c.request("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(body.decode("utf-8")):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _app(gate: Gate) -> App:
    app = App()

    @app.get("/fb", deadline_ms=20, fallback=Response.json(REVIEW))
    def fb(request: Request) -> Response:
        gate.hold("fb")
        return Response.text("LATE RESULT\n")

    @app.get("/block")
    def block(request: Request) -> Response:
        gate.hold("block")
        return Response.text("unblocked\n")

    @app.get("/fast")
    def fast(request: Request) -> Response:
        return Response.text("fast\n")

    return app


def test_metrics_parse_and_name_every_family(gate: Gate) -> None:
    with server_thread(_app(gate)) as server:
        c = Client(server.address)
        assert c.request("GET", "/fast")[0] == 200
        samples, types = scrape(c)
        expected = {
            "http_server_request_duration_seconds": "histogram",
            "rtserve_queue_wait_seconds": "histogram",
            "rtserve_deadline_timer_lag_seconds": "histogram",
            "rtserve_deadline_misses": "counter",
            "rtserve_fallbacks_sent": "counter",
            "rtserve_dead_on_arrival": "counter",
            "rtserve_late_results_dropped": "counter",
            "rtserve_client_aborts": "counter",
            "rtserve_requests_shed": "counter",
            "rtserve_parse_errors": "counter",
            "rtserve_open_connections": "gauge",
            "rtserve_queue_depth": "gauge",
            "rtserve_busy_workers": "gauge",
            "rtserve_stuck_workers": "gauge",
        }
        for name, kind in expected.items():
            assert types.get(name) == kind, name
        labels = {"http_request_method": "GET", "http_route": "/fast",
                  "http_response_status_code": "200"}
        assert val(samples, "http_server_request_duration_seconds_count", **labels) == 1
        # sub-millisecond buckets exist and are cumulative
        assert val(samples, "http_server_request_duration_seconds_bucket",
                   le="0.0005", **labels) <= val(
            samples, "http_server_request_duration_seconds_bucket", le="+Inf", **labels) == 1
        for reason in ("codel", "limit", "deadline", "draining"):
            assert ("rtserve_requests_shed_total", frozenset({("reason", reason)})) in samples
        c.close()


def test_deadline_counters_and_worker_gauges_move(gate: Gate) -> None:
    with server_thread(_app(gate), threads=2) as server:
        c, m = Client(server.address), Client(server.address)
        before, _ = scrape(m)
        assert val(before, "rtserve_deadline_misses_total") == 0
        status, headers, _ = c.request("GET", "/fb")
        assert status == 200 and headers["x-rtserve-fallback"] == "deadline"
        gate.wait_entered()
        s, _ = scrape(m)
        assert val(s, "rtserve_deadline_misses_total") == 1
        assert val(s, "rtserve_fallbacks_sent_total") == 1
        assert val(s, "rtserve_stuck_workers") == 1
        assert val(s, "rtserve_busy_workers") == 1
        assert val(s, "rtserve_late_results_dropped_total") == 0
        assert val(s, "rtserve_deadline_timer_lag_seconds_count") == 1
        gate.release.set()
        wait_for(lambda: server.metrics.late_dropped == 1)
        s, _ = scrape(m)
        assert val(s, "rtserve_late_results_dropped_total") == 1
        assert val(s, "rtserve_stuck_workers") == 0
        assert val(s, "rtserve_busy_workers") == 0
        assert c.request("GET", "/fast", {"X-Request-Deadline-Ms": "0"})[0] == 504
        s, _ = scrape(m)
        assert val(s, "rtserve_dead_on_arrival_total") == 1
        assert val(s, "http_server_request_duration_seconds_count", http_request_method="GET",
                   http_route="/fast", http_response_status_code="504") == 1
        assert val(s, "http_server_request_duration_seconds_count", http_request_method="GET",
                   http_route="/fb", http_response_status_code="200") == 1
        c.close()
        m.close()


def test_shed_queue_and_connection_gauges_move(gate: Gate) -> None:
    with server_thread(_app(gate), threads=1, max_inflight=3) as server:
        m = Client(server.address)
        a = Client(server.address)
        a.send("GET", "/block")
        gate.wait_entered()
        queued = [Client(server.address) for _ in range(2)]
        for q in queued:
            q.send("GET", "/fast")
        wait_for(lambda: server.admission.queue_depth == 2)
        s, _ = scrape(m)
        assert val(s, "rtserve_queue_depth") == 2
        assert val(s, "rtserve_busy_workers") == 1
        assert val(s, "rtserve_open_connections") == 4
        assert val(s, "rtserve_concurrency_limit") == 3
        d = Client(server.address)
        assert d.request("GET", "/fast")[0] == 503
        s, _ = scrape(m)
        assert val(s, "rtserve_requests_shed_total", reason="limit") == 1
        gate.release.set()
        for x in (a, *queued):
            assert x.recv()[0] == 200
            x.close()
        d.close()
        wait_for(lambda: server.open_connections == 1)
        s, _ = scrape(m)
        assert val(s, "rtserve_queue_depth") == 0
        assert val(s, "rtserve_open_connections") == 1
        assert val(s, "rtserve_queue_wait_seconds_count") == 3  # A at once, two after waiting
        m.close()


def _reset(c: Client) -> None:
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def test_parse_errors_by_status_and_client_aborts(gate: Gate) -> None:
    with server_thread(_app(gate), threads=1, max_header_count=10) as server:
        m = Client(server.address)
        bad = Client(server.address)
        bad.sock.sendall(b"GARBAGE\r\n\r\n")
        assert bad.recv()[0] == 400
        long_line = Client(server.address)
        long_line.sock.sendall(b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        assert long_line.recv()[0] == 414
        many = Client(server.address)
        many.send("GET", "/fast", [(f"X-H{i}", "v") for i in range(20)])
        assert many.recv()[0] == 431
        # an abort while the handler runs, and one while queued behind it
        running = Client(server.address)
        running.send("GET", "/block")
        gate.wait_entered()
        queued = Client(server.address)
        queued.send("GET", "/fast")
        wait_for(lambda: server.admission.queue_depth == 1)
        _reset(running)
        _reset(queued)
        wait_for(lambda: server.metrics.client_aborts == 2)
        s, _ = scrape(m)
        assert val(s, "rtserve_parse_errors_total", status="400") == 1
        assert val(s, "rtserve_parse_errors_total", status="414") == 1
        assert val(s, "rtserve_parse_errors_total", status="431") == 1
        assert val(s, "rtserve_client_aborts_total") == 2
        assert val(s, "rtserve_queue_depth") == 0
        gate.release.set()
        wait_for(lambda: server.metrics.late_dropped == 1)  # the aborted request's result
        for x in (m, bad, long_line, many):
            x.close()


def test_invented_methods_share_one_series(gate: Gate) -> None:
    with server_thread(_app(gate)) as server:
        c = Client(server.address)
        for method in ("FOO", "BAR", "BAZ"):
            assert c.request(method, "/fast")[0] == 501  # no route implements them
        s, _ = scrape(c)
        assert val(s, "http_server_request_duration_seconds_count", http_request_method="_OTHER",
                   http_route="<unrouted>", http_response_status_code="501") == 3
        assert not any(dict(k[1]).get("http_request_method") == "FOO" for k in s)
        c.close()


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.observe_request("GET", 'we"ird\\route\nx', 200, 1000)
    m.count_shed('odd"reason')
    text = m.render().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    routes = {s.labels.get("http_route") for s in fams["http_server_request_duration_seconds"]
              .samples}
    assert 'we"ird\\route\nx' in routes


def test_histogram_bucket_edges() -> None:
    h = Histogram()
    for ns in (0, 100_000, 100_001, 10**12):
        h.observe(ns)
    assert h.counts[0] == 2  # <= 0.1 ms, inclusive upper bound
    assert h.counts[1] == 1
    assert h.counts[-1] == 1  # +Inf
    assert h.count == 4


def test_metrics_scrape_is_not_blocked_by_busy_workers(gate: Gate) -> None:
    with server_thread(_app(gate), threads=1) as server:
        a = Client(server.address)
        a.send("GET", "/block")
        gate.wait_entered()
        done = threading.Event()
        result: list[int] = []

        def scrape_once() -> None:
            c = Client(server.address)
            result.append(c.request("GET", "/metrics")[0])
            c.close()
            done.set()

        threading.Thread(target=scrape_once, daemon=True).start()
        assert done.wait(10) and result == [200]
        gate.release.set()
        assert a.recv()[0] == 200
        a.close()
