"""The reference service over real sockets: decisions, refusals, and the demo's routes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from examples.fraud.memstore import InProcessStore
from examples.fraud.model import Model
from examples.fraud.routes import create_app

from tests.fraud_support import BASE_TS, Http, server_timing, tx_body
from tests.helpers import server_thread


class CountingStore(InProcessStore):
    def __init__(self) -> None:
        super().__init__()
        self.fetches = 0

    def fetch(self, tx, timeout):
        self.fetches += 1
        return super().fetch(tx, timeout)


class CountingModel(Model):
    calls = 0

    def score_row(self, row):
        self.calls += 1
        return super().score_row(row)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Http, CountingStore, CountingModel]]:
    store, model = CountingStore(), CountingModel()
    app = create_app(store=store, model=model, env={})
    with server_thread(app, threads=4) as srv:
        client = Http(srv.address)
        yield client, store, model
        client.close()


def test_a_valid_transaction_gets_a_model_decision(served) -> None:
    http, _, _ = served
    status, headers, body, _ = http.call("POST", "/authorize", tx_body(card_id="c-valid"))
    assert status == 200 and "x-rtserve-fallback" not in headers
    assert body["path"] == "model" == headers["x-fraud-path"]
    assert body["decision"] == "approve" and body["reasons"] == []
    assert 0.0 <= body["score"] < 0.1
    timing = server_timing(headers["server-timing"])
    assert set(timing) == {"wait", "features", "model", "handler"}
    assert 0 < timing["model"] <= timing["handler"]


def test_iso_timestamps_are_accepted(served) -> None:
    http, _, _ = served
    status, _, body, _ = http.call("POST", "/authorize", tx_body(
        card_id="c-iso", timestamp="2024-01-01T10:00:00+01:00"))
    assert status == 200 and body["path"] == "model"


def test_a_card_testing_burst_is_declined(served) -> None:
    http, _, _ = served
    answers = []
    for i in range(8):
        status, _, body, _ = http.call("POST", "/authorize", tx_body(
            card_id="c-burst", merchant_id=f"m-digital-{i % 3}", mcc=5816, channel="online",
            amount=1.0 + i * 0.3, timestamp=BASE_TS + 20 * i))
        assert status == 200
        answers.append(body)
    assert answers[0]["decision"] != "decline" and answers[0]["reasons"] == []
    assert answers[-1]["decision"] == "decline" and "card_testing" in answers[-1]["reasons"]


def test_impossible_travel_is_flagged(served) -> None:
    http, _, _ = served
    http.call("POST", "/authorize", tx_body(card_id="c-trip", country="FR"))
    status, _, body, _ = http.call("POST", "/authorize", tx_body(
        card_id="c-trip", country="BR", currency="BRL", amount=640.0, mcc=5732,
        timestamp=BASE_TS + 900))
    assert status == 200 and body["decision"] in ("review", "decline")
    assert "impossible_travel" in body["reasons"]


@pytest.mark.parametrize("body", [b"not json", b"{\"card_id\": ", b"[1, 2]", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_400(served, body: bytes) -> None:
    http, store, model = served
    before = store.fetches, model.calls
    status, _, answer, _ = http.call("POST", "/authorize", body)
    assert status == 400 and "JSON" in answer["error"]
    assert (store.fetches, model.calls) == before  # never reached the store or the model


@pytest.mark.parametrize("field, value", [
    ("card_id", None), ("card_id", ""), ("card_id", "a b"), ("merchant_id", 7),
    ("mcc", "abc"), ("mcc", 12345), ("mcc", True), ("amount", -1), ("amount", "12"),
    ("amount", 0), ("currency", "eur"), ("country", "FRA"), ("channel", "phone"),
    ("timestamp", 1_704_067_200_000), ("timestamp", "yesterday"),
    ("timestamp", "2024-01-01T10:00:00"),
])
def test_a_bad_field_is_422_naming_it(served, field: str, value) -> None:
    http, store, model = served
    before = store.fetches, model.calls
    body = tx_body(**{field: value})
    if value is None:
        del body[field]
    status, _, answer, _ = http.call("POST", "/authorize", body)
    assert status == 422 and answer["field"] == field and field in answer["error"]
    assert (store.fetches, model.calls) == before


def test_the_demo_routes_still_answer(served) -> None:
    http, _, _ = served
    status, _, body, _ = http.call("GET", "/hello")
    assert status == 200 and b"Hello from rtserve" in body
    status, _, body, _ = http.call("GET", "/slow?seconds=0")
    assert status == 200 and body == b"slept 0 s\n"
    status, _, body, _ = http.call("POST", "/echo", b"ping", {"Content-Type": "text/x"})
    assert status == 200 and body == b"ping"
    status, _, body, _ = http.call("POST", "/score", json.dumps(
        {"amount": 42.0, "country": "FR", "card_country": "FR", "hour": 14}).encode())
    assert status == 200 and body["decision"] in ("approve", "review", "decline")
    assert http.call("GET", "/nowhere")[0] == 404


def test_the_package_exposes_the_app_for_the_cli() -> None:
    import examples.fraud

    from rtserve import App

    assert isinstance(examples.fraud.app, App)
    assert examples.fraud.app is examples.fraud.app  # built once
