"""Deadline behaviour on purpose: stalled feature fetches still get an answer in time.

`abandon` stalls give up at the fetch's timeout and the rules decide; `block` stalls
ignore it and the conductor sends the route's fallback. Either way the answer comes long
before the stall would have ended (200 ms against a 20 ms deadline); whether it came
before the deadline is the server's own verdict: a rules answer means the handler
returned before respond_by (else the fallback would have gone out instead).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from examples.fraud.admin import is_local_client, parse_stall
from examples.fraud.memstore import InProcessStore
from examples.fraud.model import Model
from examples.fraud.routes import create_app
from examples.fraud.stall import StallSwitch

from rtserve import App
from tests.fraud_support import Http, tx_body
from tests.helpers import server_thread

STALL_S = 0.2


@pytest.fixture(scope="module")
def model() -> Model:
    return Model()


@pytest.fixture
def app(model: Model) -> App:
    return create_app(store=InProcessStore(), model=model, env={})


@pytest.fixture
def http(app: App) -> Iterator[Http]:
    with server_thread(app, threads=4) as srv:
        client = Http(srv.address)
        yield client
        client.close()


def _in_time(headers: dict, body: dict, elapsed: float) -> str:
    """The path of an answer that kept the deadline; fails for anything else."""
    assert elapsed < STALL_S, "the answer waited for the stall"
    if "x-rtserve-fallback" in headers:
        assert body == {"decision": "review", "score": None, "reasons": ["deadline"],
                        "path": "fallback"}
        return "fallback"
    assert body["path"] == "rules", body
    # The stalled fetch was abandoned, or (a short budget on a busy machine) not tried.
    assert body["reasons"][0] in ("feature_timeout", "no_time_for_features"), body
    return body["reasons"][0]


def test_abandoned_stalls_are_decided_by_the_rules_in_time(app: App, http: Http) -> None:
    app.stall.set(1.0, STALL_S * 1000, "abandon")
    paths = []
    for i in range(5):
        status, headers, body, elapsed = http.call("POST", "/authorize",
                                                   tx_body(card_id=f"c-ab{i}"))
        assert status == 200
        paths.append(_in_time(headers, body, elapsed))
    assert "feature_timeout" in paths


def test_blocking_stalls_get_the_fallback_at_the_deadline(app: App, http: Http) -> None:
    app.stall.set(1.0, STALL_S * 1000, "block")
    for i in range(3):
        status, headers, body, elapsed = http.call("POST", "/authorize",
                                                   tx_body(card_id=f"c-bl{i}"))
        assert status == 200 and elapsed < STALL_S
        assert headers["x-rtserve-fallback"] in ("deadline", "dead-on-arrival")
        assert body["path"] == "fallback" and body["decision"] == "review"


def test_a_client_budget_shorter_than_the_route_is_kept_too(app: App, http: Http) -> None:
    app.stall.set(1.0, STALL_S * 1000, "abandon")
    status, headers, body, elapsed = http.call(
        "POST", "/authorize", tx_body(card_id="c-short"), {"X-Request-Deadline-Ms": "8"})
    assert status == 200 and _in_time(headers, body, elapsed)


def test_the_admin_endpoint_switches_stalls_on_and_off(app: App, http: Http) -> None:
    status, _, state, _ = http.call("POST", "/admin/stall", {"share": 1, "ms": 200})
    assert status == 200 and state == {"share": 1.0, "ms": 200.0, "mode": "abandon"}
    _, headers, body, elapsed = http.call("POST", "/authorize", tx_body(card_id="c-adm"))
    _in_time(headers, body, elapsed)
    assert http.call("POST", "/admin/stall", {"share": 0, "ms": 0})[0] == 200
    _, _, body, _ = http.call("POST", "/authorize", tx_body(card_id="c-adm"))
    assert body["path"] == "model"
    assert http.call("GET", "/admin/stall")[2] == {"share": 0.0, "ms": 0.0, "mode": "abandon"}


@pytest.mark.parametrize("body, field", [({"ms": 5}, "share"), ({"share": 2, "ms": 5}, "share"),
                                         ({"share": 0.1}, "ms"), ({"share": 0.1, "ms": -1}, "ms"),
                                         ({"share": 0.1, "ms": 5, "mode": "x"}, "mode")])
def test_the_admin_endpoint_refuses_bad_settings(app: App, http: Http, body, field) -> None:
    status, _, answer, _ = http.call("POST", "/admin/stall", body)
    assert status == 422 and field in answer["error"]
    assert app.stall.state()["share"] == 0.0


def test_the_admin_endpoint_refuses_proxied_requests(app: App, http: Http) -> None:
    status, _, answer, _ = http.call("POST", "/admin/stall", {"share": 1, "ms": 200},
                                     {"X-Forwarded-For": "203.0.113.9"})
    assert status == 403 and "loopback" in answer["error"]
    assert app.stall.state()["share"] == 0.0


@pytest.mark.parametrize("client, headers, ok", [
    (("127.0.0.1", 5000), {}, True),
    (("127.8.9.10", 5000), {}, True),
    (("::1", 5000, 0, 0), {}, True),
    (("::ffff:127.0.0.1", 5000, 0, 0), {}, True),
    (("10.0.0.7", 5000), {}, False),
    (("192.168.1.2", 5000), {}, False),
    (("::ffff:10.0.0.7", 5000, 0, 0), {}, False),
    (("2001:db8::1", 5000, 0, 0), {}, False),
    (("0.0.0.0", 5000), {}, False),
    (("localhost", 5000), {}, False),  # a name is not an address
    (("", 0), {}, False),
    (None, {}, False),
    (("127.0.0.1", 5000), {"x-forwarded-for": "198.51.100.4"}, False),
    (("127.0.0.1", 5000), {"forwarded": "for=198.51.100.4"}, False),
    (("127.0.0.1", 5000), {"x-real-ip": "198.51.100.4"}, False),
])
def test_only_direct_loopback_clients_are_local(client, headers, ok: bool) -> None:
    assert is_local_client(client, headers) is ok


def test_parse_stall() -> None:
    assert parse_stall(b'{"share": 0.01, "ms": 200}') == (0.01, 200.0, "abandon")
    assert parse_stall(b'{"share": 1, "ms": 5, "mode": "block"}') == (1.0, 5.0, "block")
    for bad in (b"nope", b"[]", b'{"share": true, "ms": 1}'):
        with pytest.raises(ValueError):
            parse_stall(bad)


def test_the_switch_reads_the_environment() -> None:
    s = StallSwitch.from_env({"FRAUD_STALL_SHARE": "0.25", "FRAUD_STALL_MS": "150",
                              "FRAUD_STALL_MODE": "block"})
    assert s.state() == {"share": 0.25, "ms": 150.0, "mode": "block"}
    hits = sum(s.draw()[0] > 0 for _ in range(4000))
    assert 600 < hits < 1400  # 1000 expected; the bounds are > 10 standard deviations
    assert StallSwitch().draw() == (0.0, "abandon")
