"""`make load`: open-loop load on the fraud service with stalls on, a line every second.

    .venv/bin/python bench/fraud_load.py --rate 500 --duration 10 --stall-share 0.01

Sends simulated transactions (examples/fraud/simulate.py) to `POST /authorize` at a
constant rate with bench/openloop.py, after switching stalls on through
`POST /admin/stall`, and prints each second: the requests answered, the share answered
within the deadline, the fallbacks (conductor answered for a late handler), the sheds
(503) and how many the rules decided. At the end the stall switch is put back as it was
and the run's summary is printed. If nothing answers on --host:--port, the service is
started for the run (in-process store) and stopped after it.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]

import openloop  # noqa: E402
from examples.fraud.simulate import bodies  # noqa: E402


def _call(host: str, port: int, method: str, path: str, body: dict | None = None,
          timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _answers(host: str, port: int) -> bool:
    try:
        return _call(host, port, "GET", "/hello", timeout=1.0)[0] == 200
    except OSError:
        return False


@contextlib.contextmanager
def service(host: str, port: int) -> Iterator[None]:
    """Use the service on host:port, or start one there for the run."""
    if _answers(host, port):
        print(f"using the service already on {host}:{port}", flush=True)
        yield
        return
    cmd = [sys.executable, "-m", "rtserve", "examples.fraud:app", "--bind", f"{host}:{port}",
           "--shed-with-fallback", "--dashboard", "--log-level", "warning"]
    print(f"starting: {' '.join(cmd[1:])}", flush=True)
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        t_end = time.monotonic() + 30
        while not _answers(host, port):
            if p.poll() is not None or time.monotonic() > t_end:
                raise SystemExit(f"the service did not start on {host}:{port}")
            time.sleep(0.1)
        yield
    finally:
        p.terminate()
        p.wait(30)


class Ticker:
    """Prints one line per progress call: the second's answers and how they went."""

    def __init__(self, deadline_ms: float) -> None:
        self.deadline_ns = int(deadline_ms * 1e6)
        self.deadline_ms = deadline_ms
        self.second = 0

    def __call__(self, records: list[openloop.Record]) -> None:
        self.second += 1
        answered = [r for r in records if r.status]
        n = len(answered)
        within = sum(1 for r in answered if r.latency_ns <= self.deadline_ns)
        fallbacks = sum(1 for r in answered if r.fallback)
        sheds = sum(1 for r in answered if r.status == 503)
        rules = sum(1 for r in answered if (r.captured or {}).get("x-fraud-path") == "rules")
        share = f"{within / n:7.2%}" if n else "    -  "
        print(f"{self.second:4d}s  requests {n:6d}  within {self.deadline_ms:g} ms {share}  "
              f"fallbacks {fallbacks:5d}  sheds {sheds:5d}  rules {rules:5d}"
              f"{'  errors ' + str(len(records) - n) if len(records) > n else ''}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--rate", type=float, default=500.0, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--stall-share", type=float, default=0.01)
    p.add_argument("--stall-ms", type=float, default=200.0)
    p.add_argument("--stall-mode", choices=("abandon", "block"), default="abandon")
    p.add_argument("--deadline-ms", type=float, default=20.0, help="what counts as in time")
    p.add_argument("--seed", type=int, default=13)
    a = p.parse_args(argv)
    n = int(a.rate * (a.duration + 1)) + 100
    txs = list(bodies(a.seed, n))
    with service(a.host, a.port):
        status, before = _call(a.host, a.port, "GET", "/admin/stall")
        if status != 200:
            raise SystemExit(f"GET /admin/stall answered {status}: is this the fraud service?")
        stall = {"share": a.stall_share, "ms": a.stall_ms, "mode": a.stall_mode}
        _call(a.host, a.port, "POST", "/admin/stall", stall)
        print(f"stalls on: {stall}; {a.rate:g} requests/s for {a.duration:g} s, "
              f"{len(txs)} simulated transactions", flush=True)
        try:
            res = openloop.run(a.host, a.port, a.rate, a.duration, 0.0, "/authorize", b"",
                               1000, 64, 2.0, a.deadline_ms, bodies=txs,
                               capture=("x-fraud-path",), progress=Ticker(a.deadline_ms))
        finally:
            _call(a.host, a.port, "POST", "/admin/stall", json.loads(before))
    lat = res["latency_us"]
    print(f"total: {res['offered']} offered, {res['share_within_deadline']:.2%} 2xx within "
          f"{a.deadline_ms:g} ms, goodput {res['goodput_rps']:.0f}/s, fallbacks "
          f"{res['fallbacks']}, sheds {res['shed_503']}, unanswered {res['unanswered']}; "
          f"p50 {_ms(lat['p50'])} p99 {_ms(lat['p99'])} p99.9 {_ms(lat['p999'])}")
    return 0


def _ms(us: float | None) -> str:
    return "inf" if us is None else f"{us / 1000:.1f} ms"


if __name__ == "__main__":
    sys.exit(main())
