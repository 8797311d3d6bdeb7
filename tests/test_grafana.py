"""deploy/grafana/rtserve.json: importable Grafana dashboard JSON whose every query reads
metrics that rtserve's /metrics really has, with the live page's panels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import Client, server_thread
from tests.promql_names import metric_names
from tests.traffic import SETTINGS, Traffic, parse_metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "rtserve.json"


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs(dash: dict) -> list[str]:
    """Every PromQL expression: panel targets and template variable queries."""
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        q = v.get("query")
        if v["type"] == "query":
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    """Sample names in /metrics after traffic that makes every labelled family appear."""
    traffic = Traffic()
    with server_thread(traffic.app(), **SETTINGS) as server:
        traffic.drive(server)
        c = Client(server.address)
        status, _, body = c.request("GET", "/metrics")
        c.close()
    assert status == 200
    return {name for name, _labels in parse_metrics(body.decode())}


def test_dashboard_json_is_importable() -> None:
    dash = load()
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 36
    assert [i["pluginId"] for i in dash["__inputs"]] == ["prometheus"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance", "route"} <= variables
    used = set(re.findall(r"\$(\w+)", " ".join(exprs(dash))))
    assert used - {"__rate_interval", "1"} <= variables, used  # ($1 is label_replace's)
    assert any(p.get("repeat") == "route" for p in dash["panels"])  # a row per route


def test_every_query_reads_metrics_rtserve_exposes(exposed: set[str]) -> None:
    dash = load()
    for expr in exprs(dash):
        names = metric_names(expr)
        assert names, expr
        assert names <= exposed, (sorted(names - exposed), expr)


def test_it_has_the_live_pages_panels() -> None:
    dash = load()
    text = " ".join(exprs(dash))
    for needle in (
        "rtserve_queue_depth", "rtserve_busy_workers", "rtserve_cpu_inflight_seconds",
        "histogram_quantile(0.5,", "histogram_quantile(0.99,", "histogram_quantile(0.999,",
        "rtserve_route_deadline_seconds", "slo_le",  # the deadline line, the within share
        "rtserve_route_fallbacks_total", 'http_response_status_code="503"',
        'http_response_status_code="504"', "rtserve_deadline_misses_total",
        "rtserve_requests_shed_total", "rate(http_server_request_duration_seconds_count",
    ):
        assert needle in text, needle
