"""How the GIL switch interval trades deadline keeping against CPU throughput.

For each `sys.setswitchinterval` value a fresh server process runs 8 worker threads: 4 run
pure-Python CPU loops for the whole measurement (`/burn`), and a client in *this* process
(so its own timing is not behind the server's GIL) sends requests to `/late`, a 20 ms
deadline route whose handler sleeps 60 ms: the conductor must send the fallback at
respond_by = start + 20 ms - 1 ms margin. Reported per interval:

- the client-measured response time of `/late` (p50 / p99 / max) and how late it was past
  respond_by (19 ms), and the share answered within the 20 ms deadline;
- the server's own view: `rtserve_deadline_timer_lag_seconds` (timer fired vs respond_by);
- the burners' CPU throughput (loop iterations per second, all four summed).

Run (about 4 s per interval; loopback only):

    .venv/bin/python bench/switch_interval.py                  # 0.1 0.5 1 2 5 ms
    .venv/bin/python bench/switch_interval.py --intervals 1 5 --samples 300 --json out.json
    .venv/bin/python bench/switch_interval.py --cpu-cost        # the throughput price alone
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_MS = 20.0
MARGIN_MS = 1.0
BURNERS = 4


# ---- the server process -----------------------------------------------------------------


def child(interval_ms: float, burners: int) -> None:
    """Serve on an ephemeral port; print the port; run until stdin closes."""
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from rtserve import App, Request, Response
    from rtserve.config import Config
    from rtserve.server import Server

    app = App()
    stop = threading.Event()

    @app.get("/burn")
    def burn(request: Request) -> Response:
        n = 0
        t0 = time.perf_counter()
        while not stop.is_set():
            x = 0
            for i in range(2000):  # pure Python: holds the GIL until the switch interval
                x += i * i
            n += 2000
        return Response.json({"iters": n, "secs": time.perf_counter() - t0})

    @app.get("/stop")
    def stop_burn(request: Request) -> Response:
        stop.set()
        return Response.text("stopping\n")

    @app.get("/late", deadline_ms=DEADLINE_MS, fallback=Response.json({"decision": "review"}))
    def late(request: Request) -> Response:
        time.sleep(0.06)
        return Response.json({"decision": "approve"})

    cfg = Config(_env={}, bind="127.0.0.1:0", threads=8, switch_interval_ms=interval_ms,
                 deadline_margin_ms=MARGIN_MS, codel_target_ms=0)
    server = Server(app, cfg)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    server.started.wait(10)
    print(server.address[1], flush=True)
    sys.stdin.read()  # the parent closes stdin when done
    server.stop_now()
    t.join(5)


# ---- the measuring client ---------------------------------------------------------------


def _request(port: int, path: str) -> tuple[bytes, float]:
    """One request on a fresh connection; returns (body, seconds from send to last byte)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        t0 = time.perf_counter()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return bytes(data), time.perf_counter() - t0
    finally:
        s.close()


def _metrics_lag(port: int) -> dict[str, float]:
    """Mean and bucket-bound p99 of the server's deadline-timer lag histogram (ms)."""
    body, _ = _request(port, "/metrics")
    text = body.split(b"\r\n\r\n", 1)[1].decode()
    buckets: list[tuple[float, float]] = []
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("rtserve_deadline_timer_lag_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
        elif line.startswith("rtserve_deadline_timer_lag_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("rtserve_deadline_timer_lag_seconds_count"):
            count = float(line.split()[-1])
    p99 = next((b for b, c in buckets if count and c >= 0.99 * count), float("nan"))
    return {"mean_ms": 1000 * total / count if count else float("nan"), "p99_le_ms": 1000 * p99}


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def measure(interval_ms: float, samples: int, burners: int) -> dict:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", str(interval_ms),
         "--burners", str(burners)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        port = int(proc.stdout.readline())
        results: list[bytes] = []
        burn_threads = [
            threading.Thread(target=lambda: results.append(_request(port, "/burn")[0]))
            for _ in range(burners)
        ]
        for t in burn_threads:
            t.start()
        time.sleep(0.3)  # let the burners get going
        times = []
        fallbacks = 0
        for _ in range(samples):
            body, secs = _request(port, "/late")
            times.append(secs * 1000)
            fallbacks += b"X-Rtserve-Fallback: deadline" in body
            time.sleep(0.015)  # at most ~3 sleeping /late handlers at a time: 4 workers free
        lag = _metrics_lag(port)
        _request(port, "/stop")
        for t in burn_threads:
            t.join(30)
        iters = secs_run = 0.0
        for body in results:
            d = json.loads(body.split(b"\r\n\r\n", 1)[1])
            iters += d["iters"]
            secs_run = max(secs_run, d["secs"])
    finally:
        proc.stdin.close()
        proc.wait(10)
    respond_by = DEADLINE_MS - MARGIN_MS
    return {
        "switch_interval_ms": interval_ms,
        "burners": burners,
        "samples": samples,
        "fallbacks": fallbacks,
        "resp_p50_ms": round(statistics.median(times), 2),
        "resp_p99_ms": round(_pct(times, 99), 2),
        "resp_max_ms": round(max(times), 2),
        "late_p50_ms": round(statistics.median(times) - respond_by, 2),
        "late_p99_ms": round(_pct(times, 99) - respond_by, 2),
        "within_deadline_pct": round(100 * sum(t <= DEADLINE_MS for t in times) / len(times), 1),
        "server_timer_lag_mean_ms": round(lag["mean_ms"], 3),
        "server_timer_lag_p99_le_ms": lag["p99_le_ms"],
        "cpu_iters_per_s": round(iters / secs_run) if secs_run else 0,
    }


def cpu_cost(intervals: list[float], reps: int = 3, secs: float = 1.0, n: int = BURNERS) -> None:
    """The price of a short interval alone: 4 pure-Python threads, loop iterations per
    CPU-second of the process (CPU time, not wall time, because the box is shared), the
    intervals interleaved `reps` times so background load hits them all alike."""
    import resource

    def run(iv: float) -> tuple[float, int]:
        sys.setswitchinterval(iv / 1000)
        stop = threading.Event()
        counts = [0] * n

        def burn(k: int) -> None:
            c = 0
            while not stop.is_set():
                x = 0
                for i in range(2000):
                    x += i * i
                c += 2000
            counts[k] = c

        ts = [threading.Thread(target=burn, args=(k,)) for k in range(n)]
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for t in ts:
            t.start()
        time.sleep(secs)
        stop.set()
        for t in ts:
            t.join()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return sum(counts) / cpu, r1.ru_nvcsw - r0.ru_nvcsw

    res: dict[float, list[tuple[float, int]]] = {iv: [] for iv in intervals}
    for _ in range(reps):
        for iv in intervals:
            res[iv].append(run(iv))
    ref = statistics.mean(r for r, _ in res[max(intervals)])
    print(f"| switch ms | iters per CPU-s (mean of {reps}) | vs {max(intervals):g} ms "
          "| voluntary switches/s |")
    print("|---|---|---|---|")
    for iv in intervals:
        rate = statistics.mean(r for r, _ in res[iv])
        sw = statistics.mean(c for _, c in res[iv]) / secs
        print(f"| {iv:g} | {rate:,.0f} | {rate / ref - 1:+.0%} | {sw:,.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--intervals", type=float, nargs="+", default=[0.1, 0.5, 1, 2, 5])
    ap.add_argument("--samples", type=int, default=150)
    ap.add_argument("--burners", type=int, default=BURNERS)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--cpu-cost", action="store_true",
                    help="only measure the throughput cost of each interval (no server)")
    ap.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.burners)
        return
    if args.cpu_cost:
        cpu_cost(args.intervals)
        return
    rows = [measure(0.0 + iv, args.samples, args.burners) for iv in args.intervals]
    rows.insert(0, {**measure(1.0, args.samples, 0), "note": "baseline: no CPU burners"})
    base = max(r["cpu_iters_per_s"] for r in rows) or 1
    print("| switch ms | burners | resp p50 | resp p99 | resp max | within 20 ms | "
          "timer lag mean | lag p99 <= | CPU iters/s (rel.) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['switch_interval_ms']:g} | {r['burners']} | {r['resp_p50_ms']} | "
              f"{r['resp_p99_ms']} | {r['resp_max_ms']} | {r['within_deadline_pct']}% | "
              f"{r['server_timer_lag_mean_ms']} | {r['server_timer_lag_p99_le_ms']:g} | "
              f"{r['cpu_iters_per_s']:,} ({r['cpu_iters_per_s'] / base:.2f}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
