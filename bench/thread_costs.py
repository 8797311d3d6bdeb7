"""Where a server's CPU goes per request, thread by thread, during one workload.

Why: a throughput figure on a shared VM moves by 10-40% between runs, and says nothing of
which thread pays. The costs per request of each thread do not need a quiet machine to
tell two variants apart as often: the conductor's CPU and context switches per request,
and the system calls it makes, show what a change does to the thread every request
passes through. Here one workload of bench/run.py (A, B or C) runs against rtserve, or
variants of it alternated round by round, and from /proc, before and after the load:

  - the conductor (the process's main thread) and the workers (every other thread):
    CPU microseconds per request (user + system, and the system part), voluntary and
    involuntary context switches per request;
  - with ``--syscalls``, a separate run of the same with ``strace -c`` attached to the
    conductor: its system calls per request, by name (strace slows every call, so this
    run's rps is not the others').

Usage:
  bench/thread_costs.py                                 rtserve-wsgi-nodl on C, 3 rounds
  bench/thread_costs.py --variant "" --variant "--cpu-inflight-ms 0"
                                                        the same server with other options
  bench/thread_costs.py --ref HEAD~1 --rounds 5         this tree and REF, alternated
  bench/thread_costs.py --workload A --server rtserve --syscalls

Servers pinned to CPU 0 and wrk to CPU 1, as in bench/run.py. Compare variants of one run
only: the VM's speed drifts within minutes, so a pair is two runs seconds apart, and only
a difference that holds in most pairs is one.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import select
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import run

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ThreadTimes:
    """One thread's CPU ticks and context switches, as /proc last counted them."""

    user: int
    system: int
    voluntary: int
    involuntary: int


def snapshot(pid: int) -> dict[int, ThreadTimes]:
    """Every thread of `pid` now: tid -> its counters (a thread that ended meanwhile is
    left out)."""
    out: dict[int, ThreadTimes] = {}
    task = Path(f"/proc/{pid}/task")
    for entry in task.iterdir():
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the name, which may hold spaces
        switches = dict(re.findall(r"^(voluntary|nonvoluntary)_ctxt_switches:\s+(\d+)",
                                   status, re.M))
        out[int(entry.name)] = ThreadTimes(int(fields[11]), int(fields[12]),
                                           int(switches["voluntary"]),
                                           int(switches["nonvoluntary"]))
    return out


def per_request(pid: int, before: dict[int, ThreadTimes], after: dict[int, ThreadTimes],
                requests: int) -> dict[str, dict[str, float]]:
    """The conductor's (`pid` itself) and the workers' (the rest, summed) costs per
    request between two snapshots; a thread started between them counts from zero."""
    zero = ThreadTimes(0, 0, 0, 0)
    sums = {"conductor": [0, 0, 0, 0], "workers": [0, 0, 0, 0]}
    for tid, now in after.items():
        was = before.get(tid, zero)
        acc = sums["conductor" if tid == pid else "workers"]
        acc[0] += now.user - was.user
        acc[1] += now.system - was.system
        acc[2] += now.voluntary - was.voluntary
        acc[3] += now.involuntary - was.involuntary
    n = max(requests, 1)
    us = 1e6 / _CLOCK_TICKS / n
    return {who: {"cpu_us": round((u + s) * us, 1), "sys_us": round(s * us, 1),
                  "voluntary": round(v / n, 3), "involuntary": round(i / n, 3)}
            for who, (u, s, v, i) in sums.items()}


def parse_strace_summary(text: str) -> dict[str, int]:
    """The call counts of an ``strace -c`` table: syscall name -> calls (the total row
    left out)."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
            try:
                float(parts[0])
            except ValueError:
                continue
            calls[parts[-1]] = int(parts[3])
    return calls


def _strace() -> str:
    """strace's path (main installed it with the other tools when missing)."""
    tool = run.which("strace")
    if tool is None:
        sys.exit("--syscalls needs strace (apt-get install -y strace)")
    return tool


def _wait_attached(trace: subprocess.Popen) -> None:
    """Block until strace says it is attached ("Process N attached" on its stderr), so
    the load it counts starts after it; then let its stderr drain in the background."""
    assert trace.stderr is not None
    ready, _, _ = select.select([trace.stderr], [], [], 30)
    line = trace.stderr.readline() if ready else ""
    if "attached" not in line:
        trace.kill()
        sys.exit(f"strace did not attach: {line.strip() or 'no word in 30 s'}")
    threading.Thread(target=trace.stderr.read, daemon=True).start()


def one_round(server: run.Server, workload: run.Workload, ctx: run.Ctx, duration: float,
              syscalls: bool) -> dict[str, Any]:
    """Start `server`, warm it up, run the workload once and return its costs."""
    threads = server.threads or 8
    with run.running(server, workload.key, ctx, threads=threads) as (pid, port):
        run.run_wrk(workload, port, 1, ctx, record=False)  # warm-up: estimates measured
        trace = None
        if syscalls:
            out = ctx.tmp / f"strace-{time.monotonic_ns()}.txt"
            trace = subprocess.Popen([_strace(), "-c", "-p", str(pid), "-o", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
            _wait_attached(trace)
        before = snapshot(pid)
        r = run.run_wrk(workload, port, duration, ctx, record=False)
        after = snapshot(pid)
        if trace is not None:
            trace.send_signal(2)  # strace writes its table on SIGINT and detaches
            trace.wait(30)
    n = int(r["requests"])
    result: dict[str, Any] = {"server": server.name, "rps": round(r["rps"]), "requests": n,
                              **per_request(pid, before, after, n)}
    if trace is not None:
        calls = parse_strace_summary(out.read_text())
        result["syscalls"] = {k: round(v / max(n, 1), 3) for k, v in
                              sorted(calls.items(), key=lambda kv: -kv[1])}
    return result


def _line(r: dict[str, Any]) -> str:
    """One round as a line."""
    c, w = r["conductor"], r["workers"]
    text = (f"{r['server']}: {r['rps']} rps; conductor {c['cpu_us']} us/req (sys "
            f"{c['sys_us']}), {c['voluntary']} vol + {c['involuntary']} invol switches/req; "
            f"workers {w['cpu_us']} us/req, {w['voluntary']} + {w['involuntary']}")
    if "syscalls" in r:
        top = ", ".join(f"{k} {v:g}" for k, v in list(r["syscalls"].items())[:8])
        text += f"; conductor syscalls/req (under strace): {top}"
    return text


def _summary(results: list[dict[str, Any]]) -> list[str]:
    """Per server: the median of each figure over its rounds."""
    lines = []
    for name in dict.fromkeys(r["server"] for r in results):
        mine = [r for r in results if r["server"] == name and "syscalls" not in r]
        if not mine:
            continue
        med = statistics.median
        lines.append(
            f"median {name} ({len(mine)} rounds): {med(r['rps'] for r in mine):.0f} rps, "
            f"conductor {med(r['conductor']['cpu_us'] for r in mine):.1f} us/req, "
            f"{med(r['conductor']['voluntary'] for r in mine):.2f} vol switches/req; "
            f"workers {med(r['workers']['cpu_us'] for r in mine):.1f} us/req")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the rounds, print one line per round and the medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("Usage:")[1])
    ap.add_argument("--server", default="rtserve-wsgi-nodl",
                    help="an rtserve server of bench/run.py's table")
    ap.add_argument("--workload", default="C", choices=("A", "B", "C"))
    ap.add_argument("--variant", action="append", default=None, metavar="ARGS",
                    help="server options appended to the server's command line; repeat "
                    "for several variants, alternated in every round ('' = as it is)")
    ap.add_argument("--ref", default=None, help="also run the rtserve of this git ref")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of load per round")
    ap.add_argument("--syscalls", action="store_true",
                    help="one more round per server with strace -c on the conductor")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    by_name = {s.name: s for s in run.SERVERS}
    base = by_name.get(a.server)
    if base is None or base.kind != "rtserve":
        sys.exit(f"--server must be an rtserve row of bench/run.py: {sorted(by_name)}")
    workload = run.WORKLOADS[a.workload]
    run.ensure_tools(("strace",) if a.syscalls else (), set(base.needs))
    atexit.register(run.stop_all)  # no server outlives the run
    with contextlib.ExitStack() as stack:
        servers = [base if not v else replace(base, name=f"{base.name} [{v}]",
                                              cmd=[*base.cmd, *v.split()])
                   for v in (a.variant or [""])]
        servers = run.with_baselines(stack, servers, a.ref)
        ctx, iters = run.tool_ctx(stack, "rtserve-costs-", a.duration, 1.0,
                                  calibrate=a.workload == "C")
        results = []
        for i in range(a.rounds):
            for s in servers:
                r = one_round(s, workload, ctx, a.duration, False)
                results.append(r)
                print(f"round {i + 1}/{a.rounds} {_line(r)}", flush=True)
        if a.syscalls:
            for s in servers:
                r = one_round(s, workload, ctx, a.duration, True)
                results.append(r)
                print(f"strace {_line(r)}", flush=True)
        for line in _summary(results):
            print(line)
        if a.json:
            print(json.dumps({"burn_iters": iters, "commands": ctx.commands,
                              "rounds": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
