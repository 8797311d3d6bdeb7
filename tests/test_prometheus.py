"""A real Prometheus scrapes rtserve on loopback: its histogram_quantile and the rate of
deadline misses agree with the traffic the test sent; the alert rules load, evaluate
against real series without error, and pass `promtool check rules` / `test rules`."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Client, server_thread, wait_for
from tests.promql_names import metric_names
from tests.system_tools import require
from tests.test_grafana import exprs as grafana_exprs
from tests.test_grafana import load as load_grafana
from tests.traffic import (
    SETTINGS,
    Traffic,
    histogram_quantile,
    parse_metrics,
    route_buckets,
)

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


# The tool may be installed by a fixture first (apt-get, a minute or two on a new machine):
# the suite's 120 s timeout applies to the test itself, not to that install.
pytestmark = pytest.mark.timeout(120, func_only=True)

@pytest.fixture(scope="module")
def promtool() -> str:
    return require("promtool", "prometheus", recommends=False)


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    return require("prometheus", "prometheus", recommends=False)


def test_promtool_checks_and_unit_tests_the_alert_rules(promtool: str) -> None:
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        res = subprocess.run([promtool, *args], cwd=RULES_DIR, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "SUCCESS" in res.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prom:
    """A Prometheus on 127.0.0.1 with its data in a temporary directory."""

    def __init__(self, exe: str, target: tuple[str, int], tmp: Path) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            "rule_files": [str(RULES_DIR / "alerts.yml")],
            "scrape_configs": [{"job_name": "rtserve",
                                "static_configs": [{"targets": ["{}:{}".format(*target)]}]}],
        }))
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **params: str) -> dict:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list[dict]:
        res = self.get("/api/v1/query", query=expr)
        assert res["status"] == "success", (expr, res)
        return res["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query (None when it has no series)."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError("prometheus exited: " + self.logtext())
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("prometheus not ready: " + self.logtext())

    def logtext(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-2000:]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture
def prom_and_server(prometheus_bin: str, tmp_path: Path) -> Iterator[tuple[Prom, object, Traffic]]:
    traffic = Traffic()
    with server_thread(traffic.app(), **SETTINGS) as server:
        prom = Prom(prometheus_bin, server.address, tmp_path)
        try:
            prom.wait_ready()
            yield prom, server, traffic
        finally:
            prom.close()


def until(pred, timeout: float = 30.0) -> None:
    """Poll Prometheus until `pred()` (it scrapes once a second; this bounds a hang)."""
    wait_for(pred, timeout)


def test_prometheus_sees_the_traffic(prom_and_server) -> None:
    prom, server, traffic = prom_and_server
    # Synchronise on Prometheus itself: a scrape of the idle server first (so the misses
    # counter is seen at 0), then the traffic, then a scrape that has all of it.
    until(lambda: prom.value('up{job="rtserve"}') == 1.0)
    until(lambda: prom.value("rtserve_deadline_misses_total") == 0.0)
    traffic.drive(server)
    total = sum(traffic.requests.values())
    app_routes = "|".join(traffic.requests)
    count = f'sum(http_server_request_duration_seconds_count{{http_route=~"{app_routes}"}})'
    until(lambda: prom.value(count) == total)
    c = Client(server.address)
    samples = parse_metrics(c.request("GET", "/metrics")[2].decode())
    c.close()

    # histogram_quantile over the scraped buckets is what the buckets in /metrics give
    for route, q in (("/fast", 0.5), ("/fast", 0.99), ("/score", 0.5), ("/score", 0.99)):
        got = prom.value(f"histogram_quantile({q}, sum by (le) "
                         f'(http_server_request_duration_seconds_bucket{{http_route="{route}"}}))')
        want = histogram_quantile(q, route_buckets(samples, route))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (route, q)
    # ... and consistent with what was sent: a third of /score requests were held past the
    # deadline, so its p99 is a fallback, sent at respond_by (at least 14 ms: 20 ms less
    # the 1 ms margin and at most a quarter of extra margin), never before; /fast is never
    # held, so its median is below that (no bound of its own: a loaded machine stretches
    # it, as it did to 12.5 ms once with another test run beside this one).
    p50_fast = prom.value("histogram_quantile(0.5, sum by (le) "
                          '(http_server_request_duration_seconds_bucket{http_route="/fast"}))')
    p99_score = prom.value("histogram_quantile(0.99, sum by (le) "
                           '(http_server_request_duration_seconds_bucket{http_route="/score"}))')
    assert 0.01 <= p99_score < 1.0
    assert p50_fast < p99_score
    # the rate of deadline misses: 8 between two scrapes of this minute
    misses = traffic.fallbacks + traffic.timeouts
    assert prom.value("rtserve_deadline_misses_total") == misses
    increase = prom.value("increase(rtserve_deadline_misses_total[1m])")
    assert misses - 1e-9 <= increase <= misses * 1.5  # extrapolated to the window's end
    assert prom.value("rate(rtserve_deadline_misses_total[1m])") > 0
    assert prom.value('rtserve_route_fallbacks_total{http_route="/score"}') == traffic.fallbacks
    assert prom.value('rtserve_requests_shed_total{reason="limit"}') == traffic.sheds
    # the SLO join finds the /score bucket at its slo_le, and only for routes with deadlines
    within = prom.query(
        'http_server_request_duration_seconds_bucket and on (instance, http_route, le) '
        'label_replace(rtserve_route_deadline_seconds, "le", "$1", "slo_le", "(.+)")')
    assert {r["metric"]["http_route"] for r in within} == {"/score", "/strict"}
    assert {r["metric"]["le"] for r in within} == {"0.02"}

    # Every Grafana panel query runs on this Prometheus and finds series for some route
    # (once every
    # series has the two samples in the last minute that rate() needs).
    until(lambda: prom.value(
        'min(count_over_time({__name__=~"http_server_request_duration_seconds_count|'
        'rtserve_route_fallbacks_total"}[1m]))') >= 2)
    dash = load_grafana()
    for expr in grafana_exprs(dash):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        q = (expr.replace("$__rate_interval", "1m").replace('"$job"', '"rtserve"')
             .replace('=~"$instance"', '=~".*"'))
        found = [prom.query(q.replace('"$route"', f'"{route}"')) for route in traffic.requests]
        assert any(found), q  # (the 503 panel has series for /fast, the 504 one for /strict)

    # The alert rules loaded and evaluate against these series without an error.
    def evaluated() -> bool:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == 20 and all(r["health"] == "ok" for r in rules)

    until(evaluated)
    groups = prom.get("/api/v1/rules")["data"]["groups"]
    recorded = {r["name"] for g in groups for r in g["rules"] if r["type"] == "recording"}
    exposed = {name for name, _ in samples}
    for g in groups:
        for r in g["rules"]:
            assert not r.get("lastError"), r
            assert metric_names(r["query"]) <= exposed | recorded, r["query"]
    alerts = prom.get("/api/v1/alerts")["data"]["alerts"]
    assert not [a for a in alerts if a["state"] == "firing"]  # `for:` keeps them pending
