"""memory.py: the idle trim runs once per idle period and never while a request is in
flight (observed through its counters and /metrics, not timing); a no-op without glibc."""

from __future__ import annotations

from typing import Any

import pytest

from rtserve import App, Request, Response, memory
from rtserve.config import Config
from tests.helpers import Gate, connect, read_response, server_thread, wait_for

glibc_only = pytest.mark.skipif(memory.glibc() is None, reason="the C library is not glibc")

S = 1_000_000_000


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_without_glibc_the_trim_is_a_no_op(monkeypatch) -> None:
    monkeypatch.setattr(memory, "_GLIBC", None)
    trim = memory.IdleTrim(1.0)
    assert trim.trim is None
    for t in range(10):
        trim.on_tick(t * S, 0, 0)
    assert trim.trims == 0 and trim.ticks == 10


def test_a_negative_idle_time_is_refused() -> None:
    from rtserve.config import ConfigError

    with pytest.raises(ConfigError, match="malloc_trim_idle"):
        Config(_env={}, malloc_trim_idle=-1)


@glibc_only
def test_the_default_trims_with_glibc() -> None:
    cfg = Config(_env={})
    assert cfg.malloc_trim_idle > 0
    assert memory.IdleTrim(cfg.malloc_trim_idle).trim is not None


# ---- the idle trim: its rule ----------------------------------------------------------------


def test_the_trim_waits_for_an_idle_period_and_runs_once_in_it() -> None:
    fake = FakeLibc()
    trim = memory.IdleTrim(3.0, fake.malloc_trim)
    trim.on_tick(0, 0, 0)  # the first look: a new count of requests resets the period
    trim.on_tick(1 * S, 0, 0)  # idle from here
    trim.on_tick(3 * S, 0, 0)
    assert fake.calls == []
    trim.on_tick(4 * S, 0, 0)  # 3 s idle
    assert fake.calls == [("malloc_trim", 0)] and trim.trims == 1
    for t in range(5, 20):
        trim.on_tick(t * S, 0, 0)
    assert trim.trims == 1  # once per idle period


def test_the_trim_never_runs_with_a_request_in_flight_or_while_requests_arrive() -> None:
    fake = FakeLibc()
    trim = memory.IdleTrim(2.0, fake.malloc_trim)
    for t in range(20):
        trim.on_tick(t * S, 1, 5)  # one request running (or queued) for 20 s
    for t in range(20, 40):
        trim.on_tick(t * S, 0, t)  # none in flight at the tick, but new ones each second
    assert fake.calls == []
    for t in range(40, 44):
        trim.on_tick(t * S, 0, 39)  # quiet: the period starts at 40, trims at 42
    assert trim.trims == 1
    trim.on_tick(44 * S, 0, 40)  # a request: a new period
    for t in range(45, 50):
        trim.on_tick(t * S, 0, 40)
    assert trim.trims == 2
    assert trim.last_ns >= 0 and trim.max_ns >= trim.last_ns


def test_a_zero_setting_turns_the_trim_off() -> None:
    trim = memory.IdleTrim(0.0)
    assert trim.trim is None


# ---- the idle trim in a server ------------------------------------------------------------------


def _gated_app(gate: Gate) -> App:
    app = App()

    @app.get("/hold")
    def hold(request: Request) -> Response:
        gate.hold()
        return Response.text("held\n")

    return app


def _trims_metric(addr: tuple[str, int]) -> float:
    s = connect(addr)
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        _, _, body = read_response(s)
    finally:
        s.close()
    for line in body.decode().splitlines():
        if line.startswith('rtserve_malloc_trims_total{when="idle"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no rtserve_malloc_trims_total in /metrics")


@glibc_only
def test_a_server_trims_when_idle_not_while_a_request_runs(gate: Gate) -> None:
    with server_thread(_gated_app(gate), malloc_trim_idle=0.5, threads=2) as server:
        trim = server.idle_trim
        wait_for(lambda: trim.trims == 1, what="the trim of the idle start", interval=0.05)
        s = connect(server.address)
        try:
            s.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
            gate.wait_entered()
            ticks = trim.ticks
            wait_for(lambda: trim.ticks >= ticks + 3, what="3 ticks", interval=0.05)
            assert trim.trims == 1  # 3 s with a request running: no trim
            gate.release.set()
            status, _, body = read_response(s)
            assert (status, body) == (200, b"held\n")
        finally:
            s.close()
        wait_for(lambda: trim.trims == 2, what="the trim after the request", interval=0.05)
        ticks = trim.ticks
        wait_for(lambda: trim.ticks >= ticks + 2, what="2 more ticks", interval=0.05)
        assert trim.trims == 2  # one per idle period; /metrics scrapes are not requests
        assert _trims_metric(server.address) == 2
        assert trim.max_ns < 1_000_000_000  # recorded, and not absurd (docs give the figure)


def test_the_metric_is_there_and_zero_when_the_trim_is_off() -> None:
    with server_thread(App(), malloc_trim_idle=0) as server:
        assert _trims_metric(server.address) == 0
        assert server.idle_trim.trim is None
