#!/usr/bin/env python3
"""Instructions per request of a whole rtserve process, counted by callgrind.

Why: on a shared 2-core machine wall-clock throughput moves by tens of percent between
runs, while the number of instructions the server executes per request does not depend
on what else runs. This is the harness docs/architecture.md ("The hot path, measured")
describes: it starts ``rtserve APP`` under ``valgrind --tool=callgrind`` (user space,
every thread: the conductor and the workers), sends N and then, in a second server
process, 2N requests from a raw-socket client that is not under valgrind, and reports

    (Ir(2N) - Ir(N)) / N

so that start-up, the readiness probe and shutdown cancel out.

Workloads (the same requests as wrk sends in bench/run.py):

  A  keep-alive: 8 connections, one request in flight on each, ``GET /hello``
  B  one request per connection: connect, ``GET /hello`` with ``Connection: close``,
     read to EOF, close; 8 such clients at a time (connection churn: accept, the
     Connection and parser objects, epoll registration, close)

How the total is obtained: rtserve drains on SIGINT (the client has closed its
connections by then) and exits normally; callgrind writes its profile at exit, one file
per thread (``--separate-threads=yes``). The ``summary:``/``totals:`` lines of all files
are summed (thread 1 is the conductor, the rest are workers). A process that does not
exit within the grace period gets a second SIGINT (rtserve's fast exit, still a normal
exit with a dump), then SIGKILL, which leaves no profile and fails the measurement.

Timers: in B every connection leaves timer entries (header timeout, lingering close) that
pop only when due, 2-10 s later; the server is left idle for ``--settle`` seconds (13 for
B) before it is stopped so that both runs pop all of them (see SETTLE_B).

Repeatability: ``setarch -R`` (no address randomisation: address-keyed hashing is the
same in every run), ``PYTHONHASHSEED=0`` and ``PYTHONDONTWRITEBYTECODE=1`` (both runs
compile or load the same modules). Every response must be a 200, or the figure would
count a shed or a fallback instead of the normal path. Under valgrind the server runs
~50x slower and its threads run one at a time, so timing-driven behaviour (GIL switch
requests, how many events one epoll turn returns) differs from a native run: compare
figures from this harness with each other, not with wall-clock CPU time.

Usage:
  bench/callgrind_server.py                          native app (examples.hello), A
  bench/callgrind_server.py --app wsgi               bench/apps/wsgi_app.py, A
  bench/callgrind_server.py --workload B             one request per connection
  bench/callgrind_server.py --ref HEAD~3             the server of an older commit
  bench/callgrind_server.py --src /work/wt-before    ... or of another source tree
  bench/callgrind_server.py --python .venv-compiled/bin/python
                                                     ... or installed in a venv (the
                                                     compiled build, docs/compiled.md)
  bench/callgrind_server.py --repeat 2 --top 25 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import gitref  # noqa: E402

#: Short names for ``--app``. The apps come from this tree (bench/apps, examples) even when
#: the server comes from ``--src``/``--ref``: only the server differs between two figures.
APPS = {
    "native": "examples.hello:app",
    "wsgi": "apps.wsgi_app:app",
    "bench-native": "apps.native_app:app",
}
#: Idle seconds after a B load before the server is stopped: rtserve's timer heap deletes
#: lazily, so each connection leaves entries (header timeout 10 s, lingering close 2 s)
#: that are popped only when they come due. Without the wait, how many of them a run pops
#: depends on its wall time (valgrind's speed, the machine's load): the long run, lasting
#: longer, pops more, and the figure drifts with the machine. With it, every entry is
#: pushed and popped in both runs, as in a server at steady state.
SETTLE_B = 13.0
#: libc/CPython functions whose call counts per request are reported: the system calls of
#: the hot path and the GIL / queue hand-offs between the conductor and the workers.
CALLS_OF_INTEREST = (
    "epoll_wait", "select", "accept4", "recv", "send", "sendmsg", "close", "shutdown",
    "write", "read", "eventfd_write", "epoll_ctl",
    "take_gil", "drop_gil", "PyThread_acquire_lock_timed", "PyThread_release_lock",
    "sem_clockwait", "sem_timedwait", "sem_wait", "sem_post",
    "pthread_cond_timedwait", "pthread_cond_wait", "pthread_cond_signal",
)


# ---- the client (not under valgrind) --------------------------------------------------------


def _request(path: str, host: str, close: bool) -> bytes:
    """The request wrk sends for ``path`` (only a Host header), plus Connection: close."""
    extra = b"Connection: close\r\n" if close else b""
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path.encode(), host.encode(), extra)


_CL = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)


def _split_response(buf: bytes) -> tuple[int, int] | None:
    """``(status, length)`` of the first complete response in ``buf``, or None if partial.

    Only Content-Length framing is supported: every app measured here sends it.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end + 2]
    m = _CL.search(head)
    if m is None:
        raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
    length = end + 4 + int(m.group(1))
    if len(buf) < length:
        return None
    return int(head[9:12]), length


def drive_keepalive(port: int, n: int, conns: int, path: str, timeout: float) -> Counter[int]:
    """Send ``n`` requests over ``conns`` keep-alive connections, one in flight on each.

    Returns the count of each response status. Closes every connection before returning.
    """
    req = _request(path, f"127.0.0.1:{port}", close=False)
    sel = selectors.DefaultSelector()
    statuses: Counter[int] = Counter()
    bufs: dict[socket.socket, bytes] = {}
    sent = 0
    t_end = time.monotonic() + timeout
    try:
        for _ in range(min(conns, n)):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            bufs[s] = b""
            sel.register(s, selectors.EVENT_READ)
            s.sendall(req)
            sent += 1
        done = 0
        while done < n:
            if time.monotonic() > t_end:
                raise TimeoutError(f"{done} of {n} responses after {timeout:.0f} s")
            for key, _ in sel.select(1.0):
                obj = key.fileobj
                assert isinstance(obj, socket.socket)
                s = obj
                data = s.recv(65536)
                if not data:
                    raise RuntimeError(f"server closed a keep-alive connection after {done}")
                buf = bufs[s] + data
                while (got := _split_response(buf)) is not None:
                    status, length = got
                    buf = buf[length:]
                    statuses[status] += 1
                    done += 1
                    if sent < n:
                        s.sendall(req)
                        sent += 1
                bufs[s] = buf
    finally:
        for s in bufs:
            with contextlib.suppress(OSError):
                sel.unregister(s)
            s.close()
        sel.close()
    return statuses


def drive_close(port: int, n: int, conns: int, path: str, timeout: float) -> Counter[int]:
    """``n`` times: connect, send one request with Connection: close, read to EOF, close.

    ``conns`` clients do this at once. Returns the count of each response status.
    """
    req = _request(path, f"127.0.0.1:{port}", close=True)
    sel = selectors.DefaultSelector()
    statuses: Counter[int] = Counter()
    bufs: dict[socket.socket, bytes] = {}
    started = done = 0
    t_end = time.monotonic() + timeout

    def start() -> None:
        nonlocal started
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        bufs[s] = b""
        sel.register(s, selectors.EVENT_READ)
        s.sendall(req)
        started += 1

    try:
        for _ in range(min(conns, n)):
            start()
        while done < n:
            if time.monotonic() > t_end:
                raise TimeoutError(f"{done} of {n} responses after {timeout:.0f} s")
            for key, _ in sel.select(1.0):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    bufs[s] += data
                    continue
                got = _split_response(bufs.pop(s))  # EOF: the whole response is in
                sel.unregister(s)
                s.close()
                statuses[got[0] if got else 0] += 1  # 0: closed without a full answer
                done += 1
                if started < n:
                    start()
    finally:
        for s in bufs:
            with contextlib.suppress(OSError):
                sel.unregister(s)
            s.close()
        sel.close()
    return statuses


# ---- the server under callgrind -------------------------------------------------------------


@dataclass
class Profile:
    """What one callgrind run of the server counted (all threads, user space)."""

    requests: int
    total: int
    by_thread: dict[int, int]
    self_cost: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(p: subprocess.Popen[bytes], port: int, path: str, log: Path,
               timeout: float) -> None:
    """Wait until one request on the port is answered; fail early if the server died.

    Exactly one connection reaches the server (refused connects never do), and its
    answer is awaited for as long as it takes: a probe that gave up and retried would
    put a different number of connections into the two runs.
    """
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if p.poll() is not None:
            raise RuntimeError(f"server exited with {p.returncode}:\n{log.read_text()[-3000:]}")
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1.0)
        except OSError:
            time.sleep(0.2)
            continue
        with s:
            s.settimeout(max(1.0, t_end - time.monotonic()))
            s.sendall(_request(path, f"127.0.0.1:{port}", close=True))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            if data.startswith(b"HTTP/1.1 200 "):
                return
            raise RuntimeError(f"readiness probe got {data[:200]!r}")
    raise RuntimeError(f"server not answering on {port} after {timeout:.0f} s:\n"
                       f"{log.read_text()[-3000:]}")


def stop(p: subprocess.Popen[bytes], grace: float) -> None:
    """SIGINT the process group (drain, normal exit, callgrind dumps); escalate if stuck."""
    for sig in (signal.SIGINT, signal.SIGINT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        try:
            p.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Setup:
    """How to start the server and what to send: the same for every run of a figure."""

    app: str
    workload: str
    src: Path
    threads: int
    connections: int
    path: str
    server_args: list[str]
    timeout: float
    valgrind_args: list[str] = field(default_factory=list)
    settle: float = 0.0
    keep: Path | None = None
    python: str = sys.executable  # the server's interpreter (--python)


def installed_src(python: str) -> Path:
    """Where ``python`` imports rtserve from without a PYTHONPATH: the directory holding
    its installed package (site-packages), to stand for ``src`` below."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, "-c", "import rtserve; print(rtserve.__file__)"],
                         capture_output=True, text=True, env=env, cwd="/")
    if out.returncode:
        raise RuntimeError(f"{python} cannot import rtserve: {out.stderr.strip()}")
    return Path(out.stdout.strip()).resolve().parent.parent


def server_env(src: Path) -> dict[str, str]:
    """The server's environment: rtserve from ``src``, apps from this tree, fixed seeds."""
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(BENCH), str(ROOT)])
    for k in [k for k in env if k.startswith("RTSERVE_")]:
        del env[k]  # settings come from the command line only
    return env


def check_import(src: Path, python: str = sys.executable) -> None:
    """Fail unless the server's Python, with its environment, imports rtserve from ``src``
    (a venv whose install shadowed PYTHONPATH would measure the wrong server)."""
    out = subprocess.run([python, "-c", "import rtserve; print(rtserve.__file__)"],
                         capture_output=True, text=True, env=server_env(src), cwd=ROOT)
    got = out.stdout.strip()
    if out.returncode or not Path(got).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"rtserve imports from {got or out.stderr.strip()!r}, not {src}")


def server_cmd(setup: Setup, port: int, outfile: Path) -> list[str]:
    """``[setarch -R] valgrind --tool=callgrind ... python -m rtserve APP ...``."""
    norand = ["setarch", "-R"] if shutil.which("setarch") else []
    return [
        *norand, "valgrind", "--tool=callgrind", "--separate-threads=yes",
        f"--callgrind-out-file={outfile}", *setup.valgrind_args,
        setup.python, "-m", "rtserve", setup.app, "--bind", f"127.0.0.1:{port}",
        "--threads", str(setup.threads), "--log-level", "warning", *setup.server_args,
    ]


def run_once(setup: Setup, n: int, tmp: Path, label: str) -> Profile:
    """Start the server under callgrind, serve ``n`` requests, stop it, read the profile."""
    port = free_port()
    outdir = tmp / label
    outdir.mkdir()
    outfile = outdir / "callgrind.out"
    log = outdir / "server.log"
    cmd = server_cmd(setup, port, outfile)
    drive = drive_keepalive if setup.workload == "A" else drive_close
    with open(log, "wb") as logf:
        p = subprocess.Popen(cmd, cwd=ROOT, env=server_env(setup.src), stdout=logf,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(p, port, setup.path, log, setup.timeout)
        t = time.monotonic()
        statuses = drive(port, n, setup.connections, setup.path, setup.timeout)
        wall = time.monotonic() - t
        time.sleep(setup.settle)  # idle: let every timer armed by the load come due
    finally:
        stop(p, grace=60.0)
    if setup.keep is not None:
        dest = setup.keep / label
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(outdir, dest)
    # One file per thread (callgrind.out-01 ...); the plain name stays an empty placeholder.
    files = sorted(f for f in outdir.glob("callgrind.out-*") if f.stat().st_size)
    if not files:
        raise RuntimeError(f"no callgrind profile (exit {p.returncode}):\n"
                           f"{log.read_text()[-3000:]}")
    prof = Profile(requests=n, total=0, by_thread={}, wall_s=wall, statuses=dict(statuses))
    self_cost: defaultdict[str, int] = defaultdict(int)
    calls: defaultdict[str, int] = defaultdict(int)
    for f in files:
        thread, total = parse_profile(f, self_cost, calls)
        prof.by_thread[thread] = prof.by_thread.get(thread, 0) + total
        prof.total += total
    # Cross-check: valgrind's own grand total at exit ("Collected : N") is the sum of the
    # per-thread files; a mismatch means a file is missing or was cut short.
    m = re.search(r"Collected\s*:\s*(\d+)", log.read_text(errors="replace"))
    if m is None or int(m.group(1)) != prof.total:
        raise RuntimeError(f"thread files sum to {prof.total}, valgrind reported "
                           f"{m.group(1) if m else 'nothing'}")
    prof.self_cost = dict(self_cost)
    prof.calls = dict(calls)
    return prof


# ---- reading callgrind's output -------------------------------------------------------------


def parse_profile(path: Path, self_cost: defaultdict[str, int],
                  calls: defaultdict[str, int]) -> tuple[int, int]:
    """Add one callgrind file's self cost per function and call counts per callee.

    Returns ``(thread number, total Ir)``; the total is the file's ``summary:`` (newer
    valgrind) or ``totals:`` line. Functions are keyed ``name [object]``; names are
    compressed in the file (``fn=(12) name`` once, ``fn=(12)`` after), ids shared by
    fn/cfn, ob/cob and fl/fi/fe/cfi/cfl. The cost line after a ``calls=`` line is the
    call's inclusive cost and not the caller's own.
    """
    tables: dict[str, dict[str, str]] = {"fn": {}, "ob": {}, "fl": {}}
    kind_of = {"fn": "fn", "cfn": "fn", "ob": "ob", "cob": "ob"}

    def name(kind: str, val: str) -> str:
        table = tables[kind]
        if val.startswith("("):
            ident, _, rest = val[1:].partition(")")
            rest = rest.strip()
            if rest:
                table[ident] = rest
                return rest
            return table.get(ident, "?")
        return val.strip()

    thread = 1
    total: int | None = None
    ob = fn = cob = cfn = ""
    key = ""
    after_calls = False
    with open(path, errors="replace") as f:
        for line in f:
            c = line[:1]
            if c.isdigit() or c in "+-*":
                if after_calls:
                    after_calls = False
                    continue
                parts = line.split()
                if len(parts) > 1:
                    self_cost[key] += int(parts[1])
                continue
            if c == "\n" or c == "#":
                continue
            head, sep, val = line.partition("=")
            if sep and head in kind_of:
                kind = kind_of[head]
                v = name(kind, val.rstrip("\n"))
                if head == "fn":
                    fn = v.split("'")[0]  # name'2: recursion depth 2 of the same function
                    key = f"{fn} [{os.path.basename(ob)}]"
                    cob = ""
                elif head == "ob":
                    ob = v
                elif head == "cob":
                    cob = v
                else:
                    cfn = v.split("'")[0]
                continue
            if sep and head in ("fl", "fi", "fe", "cfi", "cfl"):
                name("fl", val.rstrip("\n"))
                continue
            if sep and head == "calls":
                count = int(val.split()[0])
                calls[f"{cfn} [{os.path.basename(cob or ob)}]"] += count
                cob = ""
                after_calls = True
                continue
            if line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
            elif line.startswith("thread:"):
                thread = int(line.split()[1])
    if total is None:
        raise RuntimeError(f"no summary/totals line in {path}")
    return thread, total


# ---- the figure ---------------------------------------------------------------------------


def per_request(short: Profile, long: Profile) -> dict[str, Any]:
    """Instructions per request from a run of N and a run of 2N requests."""
    n = long.requests - short.requests
    conductor = (long.by_thread.get(1, 0) - short.by_thread.get(1, 0)) / n
    total = (long.total - short.total) / n
    return {
        "ir_per_request": total,
        "conductor_per_request": conductor,
        "workers_per_request": total - conductor,
        "ir_n": short.total,
        "ir_2n": long.total,
        "wall_s": [round(short.wall_s, 2), round(long.wall_s, 2)],
        "threads_seen": max(len(short.by_thread), len(long.by_thread)),
    }


def diff_per_request(short: dict[str, int], long: dict[str, int], n: int
                     ) -> dict[str, float]:
    """Per-key (long - short) / n, largest first."""
    keys = set(short) | set(long)
    out = {k: (long.get(k, 0) - short.get(k, 0)) / n for k in keys}
    return dict(sorted(out.items(), key=lambda kv: -abs(kv[1])))


def _calls_of_interest(calls: dict[str, float]) -> dict[str, float]:
    """Call counts per request of the functions in CALLS_OF_INTEREST (by bare name)."""
    out: dict[str, float] = defaultdict(float)
    for k, v in calls.items():
        bare = k.split(" [")[0].split("'")[0]
        bare = re.sub(r"^(__libc_|__GI_|__GI___|__)", "", bare)
        if bare in CALLS_OF_INTEREST and abs(v) >= 0.005:
            out[k] += v
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def measure(setup: Setup, n: int, repeat: int, top: int) -> dict[str, Any]:
    """``repeat`` pairs of runs (N, 2N); each pair gives one figure."""
    results: list[dict[str, Any]] = []
    check_import(setup.src, setup.python)
    with tempfile.TemporaryDirectory(prefix="rtserve-cg-") as tmpdir:
        tmp = Path(tmpdir)
        for rep in range(repeat):
            short = run_once(setup, n, tmp, f"r{rep + 1}-n{n}")
            long = run_once(setup, 2 * n, tmp, f"r{rep + 1}-n{2 * n}")
            for prof in (short, long):
                bad = {s: c for s, c in prof.statuses.items() if s != 200}
                if bad:
                    raise RuntimeError(f"non-200 responses {bad} in a run of {prof.requests}: "
                                       "the figure would not be the normal path")
            r = per_request(short, long)
            if top:
                fns = diff_per_request(short.self_cost, long.self_cost, n)
                r["self_per_request"] = dict(list(fns.items())[:top])
                r["calls_per_request"] = _calls_of_interest(
                    diff_per_request(short.calls, long.calls, n))
            results.append(r)
            print(f"# run {rep + 1}/{repeat}: {r['ir_per_request']:,.0f} instructions/request "
                  f"(conductor {r['conductor_per_request']:,.0f}, workers "
                  f"{r['workers_per_request']:,.0f}; wall {r['wall_s'][0]}+{r['wall_s'][1]} s)",
                  file=sys.stderr, flush=True)
    figs = [r["ir_per_request"] for r in results]
    return {
        "src": str(setup.src),
        "python": setup.python,
        "src_commit": gitref.src_commit(setup.src.parent) or "not a git tree",
        "app": setup.app,
        "workload": setup.workload,
        "requests": n,
        "connections": setup.connections,
        "threads": setup.threads,
        "server_args": setup.server_args,
        "valgrind_args": setup.valgrind_args,
        "settle_s": setup.settle,
        "command": " ".join(server_cmd(setup, 0, Path("OUT"))).replace(":0 ", ":$PORT "),
        "pythonpath": server_env(setup.src)["PYTHONPATH"],
        "median": statistics.median(figs),
        "min": min(figs),
        "max": max(figs),
        "runs": results,
    }


def render(res: dict[str, Any], top: int) -> str:
    """Human-readable summary: the figure, its spread, and where the instructions go."""
    where = f"{res['ref']}, " if res.get("ref") else ""
    out = [f"{res['app']} workload {res['workload']}, src {where}{res['src_commit']}: "
           f"{res['median']:,.0f} instructions/request (median of {len(res['runs'])}, "
           f"{res['min']:,.0f}-{res['max']:,.0f}); N={res['requests']}, "
           f"{res['connections']} connections, {res['threads']} threads"]
    for i, r in enumerate(res["runs"], 1):
        out.append(f"  run {i}: {r['ir_per_request']:,.0f} (conductor "
                   f"{r['conductor_per_request']:,.0f}, workers {r['workers_per_request']:,.0f})")
    last = res["runs"][-1]
    if top and "self_per_request" in last:
        out.append(f"top {top} functions by own instructions per request (last run):")
        for k, v in last["self_per_request"].items():
            out.append(f"  {v:10,.0f}  {k}")
        out.append("calls per request (last run):")
        for k, v in last["calls_per_request"].items():
            out.append(f"  {v:10.2f}  {k}")
    return "\n".join(out)


def ensure_valgrind() -> None:
    """Install valgrind with apt-get if it is missing (as root; else say how)."""
    if shutil.which("valgrind") is not None:
        return
    if os.geteuid() != 0:
        sys.exit("valgrind is not installed: apt-get install valgrind")
    print("# installing valgrind with apt-get", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "valgrind"],
                   check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    """Parse options, measure, print the figure (text or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("Usage:")[1])
    ap.add_argument("--requests", "-n", type=int, default=2000,
                    help="N: requests of the short run (the long run sends 2N)")
    aliases = ", ".join(f"{k} ({v})" for k, v in APPS.items())
    ap.add_argument("--app", default="native", help=f"MODULE:ATTR or one of {aliases}")
    ap.add_argument("--workload", "-w", choices=("A", "B"), default="A",
                    help="A: keep-alive; B: one request per connection")
    ap.add_argument("--path", default="/hello", help="request path")
    ap.add_argument("--connections", "-c", type=int, default=8, help="concurrent clients")
    ap.add_argument("--threads", type=int, default=8, help="rtserve --threads")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--src", type=Path, default=None,
                       help="run the server from this source tree (its root or its src/)")
    where.add_argument("--ref", default=None,
                       help="run the server of this git ref (a temporary worktree)")
    where.add_argument("--python", default=None,
                       help="run the server with this interpreter and the rtserve installed "
                       "for it, e.g. .venv-compiled/bin/python (the compiled build)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra rtserve argument (repeatable), e.g. --server-arg=--threads=4")
    ap.add_argument("--valgrind-arg", action="append", default=[], metavar="ARG",
                    help="extra valgrind argument (repeatable), "
                    "e.g. --valgrind-arg=--fair-sched=yes")
    ap.add_argument("--settle", type=float, default=None,
                    help="idle seconds after the load, before stopping the server "
                    f"(default: {SETTLE_B:g} for B, 0 for A; see the module docstring)")
    ap.add_argument("--repeat", type=int, default=1, help="pairs of runs (spread)")
    ap.add_argument("--top", type=int, default=0,
                    help="also show the top K functions by own instructions per request")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per phase")
    ap.add_argument("--keep", type=Path, default=None,
                    help="copy the callgrind files and server logs here (callgrind_annotate)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    a = ap.parse_args(argv)
    ensure_valgrind()
    if a.requests < 1 or a.repeat < 1:
        ap.error("--requests and --repeat must be positive")
    if a.keep is not None:
        a.keep.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C: run_once's finally stops the server's process group and
    # the ExitStack removes a --ref worktree (the server runs in its own session, so it
    # would outlive a harness that just died).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    with contextlib.ExitStack() as stack:
        if a.ref:
            tree, _ = stack.enter_context(gitref.worktree(a.ref))
            src = gitref.src_dir(tree)
        elif a.python:
            a.python = str(Path(a.python).absolute())  # not resolved: a venv's is a link
            src = installed_src(a.python)
        else:
            src = gitref.src_dir(a.src or ROOT)
        setup = Setup(app=APPS.get(a.app, a.app), workload=a.workload, src=src,
                      python=a.python or sys.executable, threads=a.threads,
                      connections=a.connections, path=a.path,
                      server_args=a.server_arg, timeout=a.timeout, keep=a.keep,
                      valgrind_args=a.valgrind_arg,
                      settle=a.settle if a.settle is not None else
                      (SETTLE_B if a.workload == "B" else 0.0))
        res = measure(setup, a.requests, a.repeat, a.top)
        if a.ref:
            res["ref"] = a.ref
            res["src"] = f"{a.ref} (a temporary worktree, removed)"
        if a.python:
            res["src_commit"] = f"the rtserve installed for {a.python} ({src})"
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(render(res, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
