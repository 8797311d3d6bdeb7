"""The fraud reference service on rtserve (1 and 2 processes) against FastAPI on uvicorn.

    .venv/bin/python bench/fraud_bench.py                  # about 4 minutes
    .venv/bin/python bench/fraud_bench.py --quick          # a short check that it works

Every server runs the same logic (examples/fraud: the same validation, in-process feature
store, ONNX model and rules), with 1% of feature fetches stalling 200 ms
(FRAUD_STALL_SHARE=0.01, FRAUD_STALL_MS=200, abandoned at the fetch's timeout) and a
20 ms budget. Servers are pinned to CPU 0 (both rtserve processes too), the generator
(bench/openloop.py, simulated transactions) to CPU 1.

For each server: its capacity (real answers per second, 2xx and not a fallback, from an
overload probe: requests as fast as 32 connections take them), then an open loop at 1x
and 2x that rate on a fresh server. Reported per run: share answered 2xx within 20 ms
(fallbacks included: the client heard in time), goodput (real answers within 20 ms per
second), p99 and p99.9 from the intended send time, fallbacks, 503 sheds, rules
decisions, and the split of a real answer's time from the `Server-Timing` header the
handler sets: `wait` (first byte to handler start: read, parse, queue; rtserve only, an
ASGI app never sees the first byte), `features`, `model`, and `after` = client latency
minus the handler's time (serialise, write, the wire, the client's own wait).

Results go to bench/results/fraud_bench.json; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]

from examples.fraud.simulate import bodies  # noqa: E402
from run import (  # noqa: E402
    BIN,
    CLIENT_CPU,
    SERVER_CPU,
    free_port,
    pin,
    start_process,
    stop_all,
    stop_process,
    wait_ready,
)

DEADLINE_MS = 20.0
FACTORS = (1.0, 2.0)
SERVERS: dict[str, list[str]] = {
    "rtserve": [str(BIN / "rtserve"), "examples.fraud:app", "--bind", "127.0.0.1:{port}",
                "--threads", "8", "--log-level", "warning"],
    # What `make serve` runs: a request CoDel or the limit sheds gets the route's fallback
    # decision instead of a 503 (--shed-with-fallback).
    "rtserve --shed-with-fallback": [str(BIN / "rtserve"), "examples.fraud:app", "--bind",
                                     "127.0.0.1:{port}", "--threads", "8",
                                     "--shed-with-fallback", "--log-level", "warning"],
    "rtserve --processes 2": [str(BIN / "rtserve"), "examples.fraud:app", "--bind",
                              "127.0.0.1:{port}", "--threads", "8", "--processes", "2",
                              "--log-level", "warning"],
    "fastapi + uvicorn": [str(BIN / "uvicorn"), "examples.fraud.fastapi_app:app", "--host",
                          "127.0.0.1", "--port", "{port}", "--loop", "uvloop", "--http",
                          "httptools", "--no-access-log", "--log-level", "warning",
                          "--backlog", "4096"],
}
STALLS = {"FRAUD_STALL_SHARE": "0.01", "FRAUD_STALL_MS": "200", "FRAUD_STALL_MODE": "abandon"}


def openloop(port: int, rate: float, seconds: float, warmup: float, body_file: Path,
             records: Path | None, max_conns: int = 1000) -> dict[str, Any]:
    cmd = [*pin(CLIENT_CPU), sys.executable, str(BENCH / "openloop.py"), "--port", str(port),
           "--rate", f"{rate:.0f}", "--duration", str(seconds), "--warmup", str(warmup),
           "--path", "/authorize", "--body-lines", str(body_file), "--deadline-ms",
           str(DEADLINE_MS), "--max-conns", str(max_conns), "--grace", "2",
           "--capture", "server-timing", "--capture", "x-fraud-path"]
    if records:
        cmd += ["--records", str(records)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 120)
    if out.returncode:
        raise RuntimeError(f"openloop failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def _timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def _q(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))]


def split(records: Path) -> dict[str, Any]:
    """Where a real answer's time went (ms: mean and p99 of each part), and path counts."""
    parts: dict[str, list[float]] = {"wait": [], "features": [], "model": [], "after": []}
    paths: dict[str, int] = {}
    for line in records.read_text().splitlines():
        r = json.loads(line)
        cap = r.get("captured") or {}
        path = cap.get("x-fraud-path", "fallback" if r["fallback"] else "-")
        paths[path] = paths.get(path, 0) + 1
        if not r["status"] or r["fallback"] or "server-timing" not in cap:
            continue
        t = _timing(cap["server-timing"])
        for name in ("wait", "features", "model"):
            if name in t:
                parts[name].append(t[name])
        parts["after"].append(r["latency_ns"] / 1e6 - t.get("handler", 0.0))
    return {"paths": paths, "split_ms": {
        k: {"mean": round(statistics.fmean(v), 3), "p99": round(_q(v, 99) or 0.0, 3)}
        for k, v in parts.items() if v}}


def measure(name: str, cmd: list[str], a: argparse.Namespace, tmp: Path, body_file: Path,
            env: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = {"command": None, "runs": []}
    log = tmp / f"{name.replace(' ', '_')}.log"

    def serve() -> tuple[Any, int]:
        port = free_port()
        full = [*pin(SERVER_CPU), *[c.format(port=port) for c in cmd]]
        result["command"] = shlex.join(full)
        p = start_process(full, ROOT, env, log)
        wait_ready(p, port, log)
        return p, port

    p, port = serve()
    try:  # capacity: as fast as 32 connections take them
        probe = openloop(port, 20000, a.cap_seconds, 1.0, body_file, None, max_conns=32)
    finally:
        stop_process(p)
    cap = probe["real_done_rps"]
    result["capacity_rps"] = round(cap)
    print(f"# {name}: capacity {cap:.0f} real answers/s", file=sys.stderr, flush=True)
    for factor in FACTORS:
        p, port = serve()
        records = tmp / "records.jsonl"
        try:
            r = openloop(port, max(1.0, cap * factor), a.duration, a.warmup, body_file, records)
        finally:
            stop_process(p)
        r.update(split(records), factor=factor, loadavg=round(os.getloadavg()[0], 2))
        result["runs"].append(r)
        print(f"#   {factor:g}x: {r['share_within_deadline']:.1%} within {DEADLINE_MS:g} ms, "
              f"goodput {r['goodput_rps']:.0f}/s, p99 {_ms(r['latency_us']['p99'])}",
              file=sys.stderr, flush=True)
    return result


def _ms(us: float | None) -> str:
    return "inf" if us is None else f"{us / 1000:.1f} ms"


def table(res: dict[str, Any]) -> str:
    head = ("| server | load | rate/s | within 20 ms | goodput/s | p99 | p99.9 | fallbacks "
            "| sheds | rules | wait | features | model | after |")
    lines = [head, "|---|---|" + "---:|" * (head.count("|") - 3)]
    for name, r in res["servers"].items():
        for run in r["runs"]:
            s = run.get("split_ms", {})

            def part(k: str, s: dict = s) -> str:
                return f"{s[k]['mean']:.2f} / {s[k]['p99']:.2f}" if k in s else "-"

            lat = run["latency_us"]
            lines.append(
                f"| {name} | {run['factor']:g}x of {r['capacity_rps']} | {run['rate']:.0f} "
                f"| {run['share_within_deadline']:.1%} | {run['goodput_rps']:.0f} "
                f"| {_ms(lat['p99'])} | {_ms(lat['p999'])} | {run['fallbacks']} "
                f"| {run['shed_503']} | {run['paths'].get('rules', 0)} | {part('wait')} "
                f"| {part('features')} | {part('model')} | {part('after')} |")
    lines.append("")
    lines.append("wait, features, model, after: mean / p99 in ms of real answers.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--cap-seconds", type=float, default=5.0, help="capacity probe seconds")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated names")
    p.add_argument("--quick", action="store_true", help="3 s runs: checks that it works")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "fraud_bench.json")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.warmup, a.cap_seconds = 3.0, 1.0, 2.0
    atexit.register(stop_all)
    env = dict(os.environ, PYTHONPATH=str(ROOT), **STALLS)
    env.pop("FRAUD_REDIS_URL", None)
    res: dict[str, Any] = {"deadline_ms": DEADLINE_MS, "stalls": STALLS, "servers": {},
                           "duration_s": a.duration, "warmup_s": a.warmup}
    with tempfile.TemporaryDirectory(prefix="fraud-bench-") as t:
        tmp = Path(t)
        body_file = tmp / "tx.jsonl"
        with body_file.open("wb") as f:
            for b in bodies(13, 60_000):
                f.write(b + b"\n")
        for name in a.servers.split(","):
            res["servers"][name] = measure(name, SERVERS[name], a, tmp, body_file, env)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
