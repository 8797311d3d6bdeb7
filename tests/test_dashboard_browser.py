"""The live page in headless Chromium: after known traffic, the figures a person reads on
/dashboard are the ones /metrics gives; the page loads nothing else and throws nothing.
A screenshot is saved (to $RTSERVE_DASHBOARD_PNG as well, when set)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from tests.browser import Browser
from tests.helpers import Client, server_thread
from tests.system_tools import require
from tests.traffic import (
    SETTINGS,
    Traffic,
    histogram_quantile,
    parse_metrics,
    route_buckets,
    route_count,
)

READ_FIGURES = """
Object.fromEntries([...document.querySelectorAll('[data-k]')].map(e => [e.dataset.k, {
  v: e.dataset.v, text: e.textContent,
  extra: e.closest('.tile') ? e.closest('.tile').querySelector('.x').textContent : null}]))
"""


# The tool may be installed by a fixture first (apt-get, a minute or two on a new machine):
# the suite's 120 s timeout applies to the test itself, not to that install.
pytestmark = pytest.mark.timeout(120, func_only=True)

@pytest.fixture(scope="module")
def chromium() -> str:
    return require("chromium", "chromium")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_page_figures_match_metrics_after_known_traffic(chromium: str, tmp_path: Path) -> None:
    traffic = Traffic()
    with server_thread(traffic.app(), **SETTINGS) as server:
        traffic.drive(server)
        c = Client(server.address)
        base = "http://{}:{}".format(*server.address)
        with Browser(chromium) as browser:
            browser.goto(base + "/dashboard")
            # one tick after the traffic ended, and drawn: the page's window holds it all
            seq = server.livestats.seq
            browser.wait_for(f"Number(document.body.dataset.seq) > {seq} && "
                             "document.body.dataset.state === 'live'")
            figures = browser.evaluate(READ_FIGURES)
            status, _, body = c.request("GET", "/metrics")
            shot = tmp_path / "dashboard.png"
            browser.screenshot(str(shot))
            assert browser.errors() == []
            urls = browser.requested_urls()
        c.close()
    samples = parse_metrics(body.decode())

    def fig(route: str, key: str) -> dict:
        return figures[f"{route}|{key}"]

    for route, n in traffic.requests.items():
        assert fig(route, "requests")["text"] == str(n) == str(int(route_count(samples, route)))
        buckets = route_buckets(samples, route)
        for key, q in (("p50_ms", 0.5), ("p99_ms", 0.99), ("p999_ms", 0.999)):
            want = histogram_quantile(q, buckets) * 1000
            assert float(fig(route, key)["v"]) == pytest.approx(want, abs=1e-3), (route, key)
    assert fig("/score", "fallbacks")["extra"] == f"{traffic.fallbacks} in window"
    assert fig("/strict", "timeouts")["extra"] == f"{traffic.timeouts} in window"
    assert fig("/fast", "sheds")["extra"] == f"{traffic.sheds} in window"
    assert route_count(samples, "/fast", "503") == traffic.sheds
    assert route_count(samples, "/strict", "504") == traffic.timeouts
    # within the deadline: the count at the route's slo_le bucket over all its requests
    at_le = dict(route_buckets(samples, "/score"))[0.02]
    assert float(fig("/score", "within")["v"]) == pytest.approx(at_le / traffic.requests["/score"])
    shown = float(fig("/score", "within")["text"])
    # shown with one decimal: within half of its last digit
    assert shown == pytest.approx(100 * at_le / traffic.requests["/score"], abs=0.05)
    assert fig("/fast", "within")["text"] == "–"  # no deadline, nothing to be within
    misses = samples[("rtserve_deadline_misses_total", frozenset())]
    assert fig("server", "deadline_misses")["extra"] == f"{int(misses)} in window"
    assert misses == traffic.fallbacks + traffic.timeouts
    # nothing but the page and its JSON was requested
    assert {u.removeprefix(base) for u in urls} == {"/dashboard", "/dashboard.json"}
    w, h = png_size(shot)
    assert w >= 1000 and h >= 900
    assert shot.stat().st_size > 40_000  # drawn charts and text, not an empty page
    keep = os.environ.get("RTSERVE_DASHBOARD_PNG")
    if keep:
        shutil.copy(shot, keep)
