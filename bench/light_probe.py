"""A light path's latency while CPU-bound requests of the same server hold its pool.

Why: capacity figures say how many CPU-bound requests a server finishes, not what a health
check or a `/hello` beside them waits. Here workload C (wrk -t1 -c50, POST /score: ~1 ms of
CPU, a 200 ms stall on 1 request in 100) runs against one server from bench/run.py's table,
and a keep-alive client in this process sends `GET /hello` every 10 ms for the whole load,
timing each answer. Printed: the probes' p50, p90, p99 and max, how many were answered,
and the C throughput beside them (with its real answers: not fallbacks, not sheds).

Usage:
  bench/light_probe.py                                  rtserve-wsgi-nodl, 2 rounds of 10 s
  bench/light_probe.py --server rtserve --ref HEAD~3    this tree and REF, alternated
  bench/light_probe.py --server rtserve-wsgi-nodl,granian,uvicorn --duration 5
  bench/light_probe.py --every-ms 10,0                  and C alone: what the probes cost

Servers pinned to CPU 0 and wrk to CPU 1, as in bench/run.py; the probe client is not
pinned (it is idle between probes). Each round runs every server once, in the order given;
with ``--ref`` an rtserve server is followed by REF's (a temporary git worktree), so the
pair ran seconds apart. One burn calibration serves the whole run: compare servers of one
run only.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import socket
import statistics
import sys
import threading
import time
from typing import Any

import run

PROBE = b"GET /hello HTTP/1.1\r\nHost: probe\r\n\r\n"


def _read_answer(sock: socket.socket) -> bool:
    """Read one response with a Content-Length body; False if the connection ended."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        body += chunk
    return head.startswith(b"HTTP/1.1 200")


def probe(port: int, stop: threading.Event, latencies: list[float], failures: list[str],
          every_s: float = 0.010) -> None:
    """Until ``stop``: one `GET /hello` every ``every_s`` on one keep-alive connection (a
    new one after a failure), each answer's time appended to ``latencies`` in ms."""
    sock: socket.socket | None = None
    next_at = time.monotonic()
    while not stop.is_set():
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            sock.sendall(PROBE)
            if not _read_answer(sock):
                raise OSError("connection closed or not 200")
            latencies.append((time.perf_counter() - t0) * 1000)
        except OSError as e:
            failures.append(str(e))
            if sock is not None:
                sock.close()
            sock = None
        next_at = max(next_at + every_s, time.monotonic())
        stop.wait(max(0.0, next_at - time.monotonic()))
    if sock is not None:
        sock.close()


def one_round(server: run.Server, ctx: run.Ctx, duration: float, every_ms: float
              ) -> dict[str, Any]:
    """Start ``server``, warm it up for 2 s of C, then C for ``duration`` s with a probe
    every ``every_ms`` (0: none, C alone: what the probes cost C)."""
    w = run.WORKLOADS["C"]
    with run.running(server, "C", ctx) as (_pid, port):
        run.run_wrk(w, port, 2, ctx, record=False)  # warm-up: estimates measured
        latencies: list[float] = []
        failures: list[str] = []
        stop = threading.Event()
        t = threading.Thread(target=probe, args=(port, stop, latencies, failures,
                                                 every_ms / 1000), daemon=True)
        if every_ms:
            t.start()
        try:
            r = run.run_wrk(w, port, duration, ctx)
        finally:
            stop.set()
            if every_ms:
                t.join(10)
    out: dict[str, Any] = {"server": server.name, "every_ms": every_ms, "c_rps": round(r["rps"]),
                           "c_real_rps": round(r["real_rps"]),
                           "answered": len(latencies), "failed": len(failures)}
    if len(latencies) >= 2:
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        out.update(p50=round(q[49], 1), p90=round(q[89], 1), p99=round(q[98], 1),
                   max=round(max(latencies), 1))
    return out


def _line(r: dict[str, Any]) -> str:
    """One round as a line: the probes' percentiles, then C's throughput."""
    if not r["every_ms"]:
        return f"{r['server']}, no probe: C {_c(r)}"
    return (f"{r['server']}, probe every {r['every_ms']:g} ms: /hello p50 {r.get('p50')} "
            f"p90 {r.get('p90')} p99 {r.get('p99')} max {r.get('max')} ms, "
            f"{r['answered']} answered, {r['failed']} failed; C {_c(r)}")


def _c(r: dict[str, Any]) -> str:
    """C's throughput, and its real answers (2xx, not a fallback) when they differ."""
    real = r["c_real_rps"]
    return f"{r['c_rps']} rps" + (f" ({real} real answers/s)" if real != r["c_rps"] else "")


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the rounds, print one line per round (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("Usage:")[1])
    ap.add_argument("--server", default="rtserve-wsgi-nodl",
                    help="a server of bench/run.py's table, or a comma list of them")
    ap.add_argument("--ref", default=None, help="also run the rtserve of this git ref")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of C per round")
    ap.add_argument("--every-ms", default="10",
                    help="probe interval; a comma list runs each in every round, "
                    "0 = no probe (e.g. 10,0: what the probes cost C)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    by_name = {s.name: s for s in run.SERVERS}
    names = [n.strip() for n in a.server.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        sys.exit(f"unknown server in {names}; known: {sorted(by_name)}")
    chosen = [by_name[n] for n in names]
    if a.ref and not any(s.kind == "rtserve" for s in chosen):
        sys.exit("--ref compares rtserve servers: name one")
    run.ensure_tools((), {n for s in chosen for n in s.needs})
    atexit.register(run.stop_all)  # no server outlives the run
    with contextlib.ExitStack() as stack:
        servers = run.with_baselines(stack, chosen, a.ref)
        ctx, iters = run.tool_ctx(stack, "rtserve-probe-", a.duration, 2.0)
        results = []
        intervals = [float(x) for x in a.every_ms.split(",")]
        for i in range(a.rounds):
            for s, every_ms in ((s, e) for s in servers for e in intervals):
                r = one_round(s, ctx, a.duration, every_ms)
                results.append(r)
                print(f"round {i + 1}/{a.rounds} {_line(r)}", flush=True)
        if a.json:
            print(json.dumps({"burn_iters": iters, "commands": ctx.commands,
                              "rounds": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
