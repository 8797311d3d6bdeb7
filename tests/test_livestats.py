"""The /dashboard sampler and its JSON: per-second deltas from the Metrics object, the
60-entry window, quantiles as histogram_quantile computes them, and /dashboard.json over
a real socket agreeing with /metrics after known traffic."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from bisect import bisect_left
from pathlib import Path

import pytest

from rtserve import App, Request, Response
from rtserve.config import Config
from rtserve.livestats import WINDOW, LiveStats, quantile
from rtserve.metrics import BUCKETS_NS, DURATION_BUCKETS, Metrics
from rtserve.slo import le_label, route_deadlines, slo_bound
from rtserve.wsgi import WSGIApp
from tests.helpers import Client, Gate, server_thread, wait_for
from tests.traffic import (
    SETTINGS,
    Traffic,
    gauge,
    histogram_quantile,
    parse_metrics,
    route_buckets,
    route_count,
)

ROOT = Path(__file__).resolve().parent.parent
SEC = 1_000_000_000


def observe(m: Metrics, route: str, ms: float, status: int = 200) -> None:
    """Record one request as the conductor does when its last byte is out."""
    h = m.request_histogram("GET", route, status)
    ns = int(ms * 1e6)
    h.counts[bisect_left(BUCKETS_NS, ns)] += 1
    h.sum_ns += ns
    h.count += 1


def cumulative(counts: list[int]) -> list[tuple[float, float]]:
    out, acc = [], 0
    for le, c in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
        acc += c
        out.append((le, float(acc)))
    return out


# ---- the pieces --------------------------------------------------------------------------


def test_quantile_is_prometheus_histogram_quantile() -> None:
    rng = random.Random(13)
    for _ in range(300):
        counts = [rng.choice((0, 0, 1, 3, 50)) for _ in range(len(DURATION_BUCKETS) + 1)]
        n = sum(counts)
        for q in (0.5, 0.9, 0.99, 0.999):
            got = quantile(q, counts, n)
            want = histogram_quantile(q, cumulative(counts))
            if n == 0:
                assert got is None and want is None
            else:
                assert got == pytest.approx(want, rel=1e-9), (q, counts)
    # a rank in +Inf reports the highest finite bound; in the first bucket, from 0
    assert quantile(0.5, [0] * len(DURATION_BUCKETS) + [4], 4) == DURATION_BUCKETS[-1]
    assert quantile(0.5, [4] + [0] * len(DURATION_BUCKETS), 4) == pytest.approx(0.00005)


def test_slo_bound_is_the_largest_bucket_bound_not_above_the_deadline() -> None:
    assert slo_bound(0.020) == 0.02
    assert slo_bound(20 * 1e-3 + 1e-12) == 0.02
    assert slo_bound(0.018) == 0.015
    assert slo_bound(0.05) == 0.05
    assert slo_bound(0.00005) is None
    # the label is written exactly as /metrics writes that bucket's `le`
    m = Metrics()
    observe(m, "/a", 1)
    text = m.render().decode()
    for d in (0.0199, 0.02, 0.033, 0.25, 3.0):
        assert f'le="{le_label(slo_bound(d))}"' in text


def test_route_deadlines_from_native_and_wsgi_apps() -> None:
    app = App()
    app.post("/score", deadline_ms=20)(lambda r: Response.text("x"))
    app.get("/plain")(lambda r: Response.text("x"))
    assert route_deadlines(app, 0) == {"/score": 0.02, "/plain": None}
    assert route_deadlines(app, 50) == {"/score": 0.02, "/plain": 0.05}
    cfg = Config(_env={}, route_deadline=["/api=30"], deadline_ms=100)
    wsgi = WSGIApp(lambda environ, start: [], cfg)
    assert route_deadlines(wsgi, cfg.deadline_ms) == {"wsgi": 0.1, "wsgi:/api": 0.03}
    assert route_deadlines(object(), 10) == {}


def test_ticks_keep_per_second_deltas_and_a_sliding_window() -> None:
    m = Metrics()
    busy = [0]
    m.gauge("rtserve_busy_workers", "", lambda: busy[0])
    now = 10 * SEC
    ls = LiveStats(m, {"/a": 0.02, "/b": None}, now)
    assert ls.due == now + SEC
    for _ in range(3):
        observe(m, "/a", 0.3)
    observe(m, "/a", 19.0)
    observe(m, "/a", 22.0, 504)
    observe(m, "/b", 1.0, 503)
    m.count_fallback("/a")
    m.deadline_misses += 2
    m.count_shed("limit")
    busy[0] = 3
    now += SEC
    ls.tick(now)
    snap = ls.snapshot()
    a = next(r for r in snap["routes"] if r["route"] == "/a")
    b = next(r for r in snap["routes"] if r["route"] == "/b")
    assert a["per_s"]["requests"] == [5] and a["per_s"]["timeouts"] == [1]
    assert a["per_s"]["fallbacks"] == [1] and a["per_s"]["within"] == [4]
    assert a["window"]["within"] == pytest.approx(4 / 5)
    assert a["deadline_ms"] == 20 and a["slo_ms"] == 20
    assert b["per_s"]["sheds"] == [1] and b["per_s"]["within"] is None
    assert snap["server"]["busy_workers"] == [3]
    assert snap["server"]["deadline_misses"] == [2]
    assert snap["server"]["shed"]["limit"] == [1]
    # nothing new: the next second is empty, nothing is counted twice
    now += SEC
    ls.tick(now)
    a = next(r for r in ls.snapshot()["routes"] if r["route"] == "/a")
    assert a["per_s"]["requests"] == [5, 0] and a["per_s"]["p50_us"][1] is None
    assert a["window"]["requests"] == 5
    # one request a second for longer than the window: the oldest fall off
    for _ in range(WINDOW + 5):
        observe(m, "/b", 2.0)
        now += SEC
        ls.tick(now)
    snap = ls.snapshot()
    assert len(snap["t"]) == len(ls.ring) == WINDOW
    b = next(r for r in snap["routes"] if r["route"] == "/b")
    assert b["window"]["requests"] == WINDOW and b["window"]["sheds"] == 0
    a = next(r for r in snap["routes"] if r["route"] == "/a")
    assert a["window"]["requests"] == 0  # an app route stays listed without traffic
    assert snap["seq"] == WINDOW + 7 and snap["span_s"] == pytest.approx(WINDOW)


def test_a_late_tick_covers_the_whole_gap() -> None:
    m = Metrics()
    ls = LiveStats(m, {}, 0)
    for _ in range(30):
        observe(m, "/a", 1.0)
    ls.tick(3 * SEC)  # the conductor was busy for 3 s
    snap = ls.snapshot()
    assert snap["dt"] == [3.0]
    a = snap["routes"][0]
    assert a["per_s"]["requests"] == [30] and a["window"]["rate"] == pytest.approx(10)


def test_memory_is_bounded_by_routes_not_by_requests_or_time() -> None:
    m = Metrics()
    ls = LiveStats(m, {"/a": 0.02}, 0)
    rng = random.Random(1)
    for sec in range(1, 500):
        for _ in range(20):
            observe(m, rng.choice(("/a", "/b", "<unrouted>")), rng.uniform(0.1, 40),
                    rng.choice((200, 200, 503, 504)))
        ls.tick(sec * SEC)
    assert len(ls.ring) == WINDOW
    assert set(ls._window) == {"/a", "/b", "<unrouted>"}
    assert all(len(s.routes) <= 3 for s in ls.ring)


def test_the_json_is_built_once_per_tick() -> None:
    m = Metrics()
    ls = LiveStats(m, {}, 0)
    observe(m, "/a", 1.0)
    ls.tick(SEC)
    first = ls.json_bytes()
    assert ls.json_bytes() is first
    ls.tick(2 * SEC)
    assert ls.json_bytes() is not first
    assert json.loads(ls.json_bytes())["seq"] == 2


# ---- over real sockets ---------------------------------------------------------------------


def dashboard_json(c: Client) -> dict:
    status, headers, body = c.request("GET", "/dashboard.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    return json.loads(body)


def next_tick(c: Client) -> dict:
    """The JSON of the first tick after now (so it includes everything sent before)."""
    seq = dashboard_json(c)["seq"]
    out: dict = {}

    def ticked() -> bool:
        out.update(dashboard_json(c))
        return out["seq"] > seq

    wait_for(ticked, timeout=15)
    return out


def test_dashboard_json_agrees_with_metrics_after_known_traffic() -> None:
    traffic = Traffic()
    with server_thread(traffic.app(), **SETTINGS) as server:
        traffic.drive(server)
        c = Client(server.address)
        d = next_tick(c)
        status, _, body = c.request("GET", "/metrics")
        samples = parse_metrics(body.decode())
        routes = {r["route"]: r for r in d["routes"]}
        assert [r["route"] for r in d["routes"]][:4] == ["/fast", "/score", "/strict", "/hold"]
        for name, n in traffic.requests.items():
            w = routes[name]["window"]
            assert w["requests"] == n == route_count(samples, name), name
            buckets = route_buckets(samples, name)
            for key, q in (("p50_ms", 0.5), ("p99_ms", 0.99), ("p999_ms", 0.999)):
                want = histogram_quantile(q, buckets) * 1000
                assert w[key] == pytest.approx(want, abs=1e-3), (name, key)
            assert sum(routes[name]["per_s"]["requests"]) == n
        fb = samples[("rtserve_route_fallbacks_total", frozenset({("http_route", "/score")}))]
        assert routes["/score"]["window"]["fallbacks"] == traffic.fallbacks == fb
        assert routes["/strict"]["window"]["timeouts"] == traffic.timeouts
        assert routes["/strict"]["window"]["timeouts"] == route_count(samples, "/strict", "504")
        assert routes["/fast"]["window"]["sheds"] == traffic.sheds
        assert routes["/fast"]["window"]["sheds"] == route_count(samples, "/fast", "503")
        # within the deadline: the bucket at the route's slo_le, exactly as Prometheus sees it
        le = [dict(k[1])["slo_le"] for k in samples if k[0] == "rtserve_route_deadline_seconds"
              and dict(k[1])["http_route"] == "/score"][0]
        at_le = dict(route_buckets(samples, "/score"))[float(le)]
        assert routes["/score"]["window"]["within_count"] == at_le
        assert routes["/score"]["deadline_ms"] == 20 and routes["/fast"]["deadline_ms"] is None
        server_part = d["server"]
        assert server_part["deadline_misses_total"] == traffic.fallbacks + traffic.timeouts
        assert server_part["fallbacks_total"] == traffic.fallbacks
        assert server_part["shed_total"]["limit"] == traffic.sheds
        assert server_part["late_dropped_total"] == traffic.fallbacks + traffic.timeouts
        assert max(server_part["busy_workers"]) <= server_part["workers"][-1] == 12
        # the conductor's own paths are listed after the app's, with their own labels
        assert "/dashboard.json" in routes and routes["/dashboard.json"]["server"]
        c.close()


def test_dashboard_is_off_by_default_and_the_app_keeps_the_path() -> None:
    app = App()

    @app.get("/dashboard")
    def mine(request: Request) -> Response:
        return Response.text("the app's own dashboard\n")

    with server_thread(app) as server:
        assert server.livestats is None
        c = Client(server.address)
        status, _, body = c.request("GET", "/dashboard")
        assert (status, body) == (200, b"the app's own dashboard\n")
        assert c.request("GET", "/dashboard.json")[0] == 404
        c.close()


def test_dashboard_answers_while_every_worker_is_blocked(gate: Gate) -> None:
    app = App()

    @app.get("/block")
    def block(request: Request) -> Response:
        gate.hold("block")
        return Response.text("unblocked\n")

    with server_thread(app, threads=2, dashboard=True) as server:
        blockers = [Client(server.address) for _ in range(3)]
        for b in blockers:
            b.send("GET", "/block")
        gate.wait_entered(2)  # both workers held, the third request queued
        wait_for(lambda: gauge(server, "rtserve_queue_depth") == 1)
        c = Client(server.address)
        d = next_tick(c)
        assert d["server"]["busy_workers"][-1] == 2 and d["server"]["queue_depth"][-1] == 1
        status, headers, page = c.request("GET", "/dashboard")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert page.startswith(b"<!doctype html>") and b"<title>rtserve" in page
        status, headers, body = c.request("HEAD", "/dashboard")
        assert status == 200 and body == b"" and int(headers["content-length"]) == len(page)
        gate.release.set()
        for b in blockers:
            assert b.recv()[0] == 200
            b.close()
        c.close()


def test_the_page_makes_no_request_but_its_json() -> None:
    with server_thread(App(), dashboard=True) as server:
        c = Client(server.address)
        status, headers, body = c.request("GET", "/dashboard")
        c.close()
    html = body.decode()
    assert status == 200
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    # inline script and style only (their hashes are in the CSP), nothing loaded
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=\"(?!data:)", html, re.I)
    urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`<>)]*", html))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # the SVG namespace, not a request
    assert re.findall(r"fetch\(([^,)]+)", html) == ['"dashboard.json"']


def test_pyproject_ships_the_page_in_the_wheel(tmp_path: Path) -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "static/*" in cfg["tool"]["setuptools"]["package-data"]["rtserve"]
    try:
        import setuptools
    except ImportError:
        pytest.skip("setuptools is not installed: cannot build the wheel offline")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot read this pyproject "
                    "(pip install -e '.[test]' brings a newer one)")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("*.egg-info",
                                                                     "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    out = tmp_path / "dist"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(out.glob("rtserve-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("dashboard.html", "dashboard.css", "dashboard.js"):
        assert f"rtserve/static/{f}" in names
