#!/usr/bin/env python3
"""rtserve against its peers on one pinned core: the driver behind ``make bench``.

Each server runs as one process (plus, for gunicorn, granian and nginx, their idle master)
pinned to CPU 0 with ``taskset -c 0``; the load generator runs pinned to CPU 1. Everything
stays on 127.0.0.1, every run is bounded in time, and every process started here is stopped
by its process group id, on success, on error and on Ctrl-C.

Workloads (see docs/benchmarks.md for the why of each):

  A  keep-alive hello world                wrk -t1 -c50
  B  one request per connection            wrk -t1 -c50 -H "Connection: close"
  C  scoring: 1 KiB JSON POST, ~1 ms CPU,  wrk -t1 -c50, Lua counts X-Rtserve-Fallback
     200 ms stall on 1 request in 100,
     rtserve with a 50 ms deadline + fallback
  D  1 MiB responses                       wrk -t1 -c16
  E  overload: open loop at 1x and 2x      bench/openloop.py (constant rate, latency from
     the server's capacity measured in C   the intended send time)
  F  10,000 idle keep-alive connections    bench/idle_conns.py, server VmRSS before/after

A and B also over TLS (opt-in rows rtserve-tls, uvicorn-tls, granian-tls; one self-signed
ECDSA P-256 certificate made with openssl in the run's temp dir): A with wrk over https; B
with bench/tlsconn.c (built at bench time), a full TLS 1.3 handshake per connection, since
wrk resumes its previous session on every reconnect.

Usage:
  bench/run.py                       full run (3 repeats), tables on stdout, JSON in results/
  bench/run.py --quick               1-2 minute smoke: A and C, 1 repeat, short runs
  bench/run.py --servers rtserve,uvicorn --workloads A,C --duration 5
  bench/run.py --servers rtserve-tls,uvicorn-tls,granian-tls --workloads A,B
  bench/run.py --servers rtserve,rtserve-compiled,rtserve-wsgi,rtserve-wsgi-compiled
                                     the compiled build beside pure Python (`make compiled`)
  bench/run.py --write-docs          also rewrite docs/benchmarks.md from this run
  bench/run.py --report results/X.json --write-docs   re-render an earlier run
  bench/run.py --profile             py-spy flame graph of rtserve under workload A
  bench/run.py --baseline main~5     also rtserve@main~5 and rtserve-wsgi@main~5: an older
                                     rtserve (temporary git worktree, PYTHONPATH) measured
                                     in the same run; ratio tables get a column for it
  bench/run.py --sweep-threads 2,4,8 every threaded server at 2, 4 and 8 threads (A-E);
                                     tables show each at rtserve's count (8) and its best

Missing tools are installed: wrk (and nginx, openssl if a selected server needs them) with
apt-get, the Python servers (the project's bench extra) with pip into this venv.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))  # bench/apps and bench/gitref.py
import gitref  # noqa: E402
import tlsconn  # noqa: E402

RESULTS = BENCH / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
FLAMEGRAPH = ROOT / "docs" / "flamegraph-conductor.svg"
BIN = Path(sys.executable).parent
SERVER_CPU = "0"
CLIENT_CPU = "1"
#: Niceness of the servers and load generators (``--nice``). The machine is shared: other
#: people's tests run unpinned on both CPUs, and at nice 0 a CPU-bound job takes half of
#: the server's core. At -10 the benchmark gets ~90% of a core against one such job,
#: while the others still progress.
NICE = -10


def pin(cpu: str) -> list[str]:
    """Command prefix: run on ``cpu`` only, at the benchmark's niceness."""
    prefix = ["nice", "-n", str(NICE)] if NICE else []
    return [*prefix, "taskset", "-c", cpu]
DEADLINE_MS = 50.0

# --------------------------------------------------------------------------------------
# Processes: everything started here is in its own session (process group = pid) and is
# stopped by that id; nothing is ever killed by name.
# --------------------------------------------------------------------------------------

_STARTED: dict[int, subprocess.Popen[bytes]] = {}


def start_process(cmd: list[str], cwd: Path, env: dict[str, str], log: Path,
                  stdin: int | None = None, stdout: int | None = None
                  ) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session, stderr (and stdout unless piped) to ``log``."""
    logf = open(log, "ab")  # noqa: SIM115 - closed when the process is stopped
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=stdin,
                         stdout=stdout if stdout is not None else logf, stderr=logf,
                         start_new_session=True)
    _STARTED[p.pid] = p
    return p


def stop_process(p: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group of ``p``, SIGKILL it after ``grace`` seconds."""
    if p.pid not in _STARTED:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)
    # Children that outlived their leader (a gunicorn/granian worker) are still in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    _STARTED.pop(p.pid, None)


def stop_all() -> None:
    """Stop every process this driver started and has not stopped yet."""
    for p in list(_STARTED.values()):
        stop_process(p, grace=2.0)


def _on_signal(signum: int, frame: Any) -> None:
    stop_all()
    sys.exit(128 + signum)


# --------------------------------------------------------------------------------------
# Tools and machine
# --------------------------------------------------------------------------------------

#: Debian package of each system tool the driver runs. ``nginx`` (not ``nginx-light``, gone
#: from Debian after bookworm) ships /usr/sbin/nginx itself on bookworm and later.
APT_TOOLS = {"wrk": "wrk", "nginx": "nginx", "taskset": "util-linux", "nice": "coreutils",
             "openssl": "openssl", "strace": "strace"}
#: Tools of APT_TOOLS needed only by some servers (nginx; openssl for the TLS rows' cert)
#: or runs (strace: bench/thread_costs.py --syscalls).
OPTIONAL_TOOLS = {"nginx", "openssl", "strace"}
#: The executable each Python server needs in the venv, from ``pip install -e '.[bench]'``.
VENV_TOOLS = {"rtserve": "rtserve", "waitress": "waitress-serve", "gunicorn": "gunicorn",
              "uvicorn": "uvicorn", "granian": "granian", "py-spy": "py-spy"}


def which(tool: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (nginx lives there)."""
    return shutil.which(tool) or shutil.which(
        tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def ensure_tools(need_tools: Collection[str] = (), need_python: Collection[str] = ()) -> None:
    """Install what the selected servers and generators need and is missing.

    System tools (wrk always; nginx, openssl and strace only when named in ``need_tools``:
    the nginx server, the TLS rows' certificate, bench/thread_costs.py) come from
    Debian with ``apt-get`` (one ``apt-get update`` first: a fresh machine may have no
    package lists); the Python servers in ``need_python`` (names of VENV_TOOLS) come from
    the project's ``bench`` extra with pip, into this venv. ``make bench`` installs the
    extra too; this covers ``bench/run.py`` run by hand on a new machine.
    """
    missing = sorted({pkg for tool, pkg in APT_TOOLS.items()
                      if which(tool) is None
                      and (tool not in OPTIONAL_TOOLS or tool in need_tools)})
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"missing tools: install them (apt-get install {' '.join(missing)})")
        print(f"# installing {' '.join(missing)} with apt-get", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        *missing], check=True, env=env)
        still = [t for t, pkg in APT_TOOLS.items() if pkg in missing and which(t) is None]
        if still:
            sys.exit(f"apt-get installed {missing} but {still} is still not on PATH")
    absent = sorted(VENV_TOOLS[n] for n in need_python
                    if n in VENV_TOOLS and not (BIN / VENV_TOOLS[n]).exists())
    if absent:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[bench]"]
        if sys.prefix == sys.base_prefix:  # not a venv: do not touch the system Python
            sys.exit(f"{absent} not in {BIN}: run `make venv` and {shlex.join(cmd)}")
        print(f"# installing the bench extra ({', '.join(absent)} missing) with pip", flush=True)
        subprocess.run(cmd, check=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd_out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    """CPU model, kernel, Python and package versions, for the docs and the JSON."""
    model = ""
    for line in _cmd_out(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    versions: dict[str, str] = {}
    for pkg in ("rtserve", "waitress", "gunicorn", "uvicorn", "uvloop", "httptools", "granian",
                "py-spy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    versions["nginx"] = _cmd_out(["sh", "-c", "nginx -v 2>&1"]).replace("nginx version: ", "")
    versions["wrk"] = _cmd_out(["sh", "-c", "wrk -v 2>&1 | head -1"]).split(" [")[0]
    git = _cmd_out(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "git": git or "no commit",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def calibrate_burn(target_ms: float = 1.0) -> int:
    """Iterations of apps.logic.burn() that take ``target_ms`` on the server CPU."""
    iters = 10000
    return max(1000, round(iters * target_ms / time_burn_ms(iters)))


def time_burn_ms(iters: int) -> float:
    """Milliseconds ``apps.logic.burn(iters)`` takes on the server CPU: pinned to it, the
    best of 200 rounds (other load only slows it). Called at the start (the calibration)
    and again at the end, where a different figure says the VM's speed moved meanwhile."""
    sys.path.insert(0, str(BENCH))
    from apps import logic  # noqa: PLC0415 - needs the bench path first

    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(SERVER_CPU)})
    try:
        best = float("inf")
        for _ in range(200):  # min of many short samples: immune to time slices lost
            t = time.perf_counter()
            logic.burn(iters)
            best = min(best, time.perf_counter() - t)
    finally:
        os.sched_setaffinity(0, old)
    return best * 1000


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (via /proc/*/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(k) for k in
                            Path(f"/proc/{p}/task/{tid}/children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid``'s process tree (all threads).

    Requests per server CPU-second is the figure that survives a shared machine: time the
    server spends preempted by someone else's job lowers its rps but not its CPU cost.
    """
    ticks = 0
    for p in _tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / _CLK_TCK


def tree_status_kib(pid: int, field_name: str) -> int:
    """A ``/proc/PID/status`` field in kB (VmRSS, VmHWM...) summed over ``pid``'s tree."""
    total = 0
    prefix = field_name + ":"
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(prefix):
                    total += int(line.split()[1])
                    break
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, in KiB (a master's share does not move)."""
    return tree_status_kib(pid, "VmRSS")


# --------------------------------------------------------------------------------------
# Servers: one line each. {bin} = the venv's bin dir, {port}, {tmp} = a per-run temp dir,
# {threads} = the server's thread count (its default, or one of --sweep-threads).
# All serve bench/apps (cwd = bench/): the same logic through each server's interface.
# `extra` adds arguments for some workloads (rtserve-WSGI's deadline on C and E).
# --------------------------------------------------------------------------------------

#: Worker threads of every threaded server unless --sweep-threads varies them: rtserve's
#: configured count, and the count of the rows the other servers are compared at.
THREADS = 8


@dataclass
class Server:
    """A server under test: how to start it and which workloads it can serve."""

    name: str
    kind: str  # "rtserve" | "baseline" (rtserve of --baseline REF) | "peer" | "ceiling"
    cmd: list[str]
    workloads: str = "ABCDEFG"
    extra: dict[str, list[str]] = field(default_factory=dict)
    prepare: Callable[[Path, int], None] | None = None
    note: str = ""
    default: bool = True  # False: only when named in --servers
    #: Thread count when not swept; None: the server has no thread count to sweep.
    threads: int | None = None
    #: Environment for the server's command (values formatted like ``cmd``), run as
    #: ``env K=V ... cmd`` so the recorded command is the whole truth.
    env: dict[str, str] = field(default_factory=dict)
    #: Python server executables it needs in the venv (VENV_TOOLS keys).
    needs: tuple[str, ...] = ()
    #: Workloads whose code path uses the threads (only these are swept).
    sweep_workloads: str = "ABCDE"
    #: Serves HTTPS only: wrk and wait_ready speak TLS to it (wrk workloads only).
    tls: bool = False


def nginx_conf(tmp: Path, port: int) -> None:
    """Write a one-worker nginx.conf serving /hello and /big as static answers."""
    (tmp / "big.bin").write_bytes(b"x" * (1 << 20))
    (tmp / "nginx.conf").write_text(f"""\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 12000; }}
http {{
  access_log off;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  keepalive_timeout 60s; keepalive_requests 100000000; sendfile on; tcp_nopush on;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /hello {{ default_type text/plain; return 200 "Hello, world!"; }}
    location = /big {{ default_type application/octet-stream; alias {tmp}/big.bin; }}
  }}
}}
""")


#: The TLS rows' certificate and key, made by tls_cert() in the run's temp dir.
TLS_CERT = "{tmp}/tls-cert.pem"
TLS_KEY = "{tmp}/tls-key.pem"


def tls_cert_cmd(tmp: Path | str) -> list[str]:
    """openssl command of the TLS rows' certificate: self-signed ECDSA P-256 for 127.0.0.1.

    The key is written as PKCS#8 (OpenSSL 3's default), the one format granian reads.
    """
    return ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "7",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", TLS_KEY.format(tmp=tmp), "-out", TLS_CERT.format(tmp=tmp)]


def tls_cert(tmp: Path, port: int) -> None:
    """The TLS rows' ``prepare``: the certificate and key, once per run (one temp dir)."""
    if Path(TLS_CERT.format(tmp=tmp)).exists() and Path(TLS_KEY.format(tmp=tmp)).exists():
        return
    out = subprocess.run(tls_cert_cmd(tmp), capture_output=True, text=True, timeout=30)
    if out.returncode:
        raise RuntimeError(f"openssl could not make the TLS certificate: {out.stderr[-1000:]}")


RT_COMMON = ["--threads", "{threads}", "--backlog", "4096", "--max-connections", "12000",
             "--keepalive-timeout", "30", "--log-level", "warning"]
RT_WSGI_DEADLINE = ["--route-deadline", f"/score={DEADLINE_MS:g}",
                    "--fallback", '/score=200:{{"decision": "review"}}']
UVICORN = ["{bin}/uvicorn", "apps.asgi_app:app", "--host", "127.0.0.1", "--port", "{port}",
           "--loop", "uvloop", "--http", "httptools", "--workers", "1", "--no-access-log",
           "--log-level", "warning", "--timeout-keep-alive", "30", "--backlog", "4096"]
#: granian's WSGI options; the app comes last.
GRANIAN_WSGI = ["{bin}/granian", "--interface", "wsgi", "--host", "127.0.0.1", "--port",
                "{port}", "--workers", "1", "--runtime-threads", "1", "--blocking-threads",
                "{threads}", "--backlog", "4096", "--http1-header-read-timeout", "30000",
                "--no-access-log", "--log-level", "warning"]
#: The compiled build's venv (`make compiled`, docs/compiled.md): the -compiled rows run
#: its rtserve, the same source with the hot modules compiled by mypyc.
COMPILED_BIN = ROOT / ".venv-compiled" / "bin"


def compiled_ready(tmp: Path, port: int) -> None:
    """The compiled rows' ``prepare``: fail clearly when ``make compiled`` has not run."""
    if not (COMPILED_BIN / "rtserve").exists():
        raise RuntimeError(f"{COMPILED_BIN / 'rtserve'} is missing: run `make compiled`")


SERVERS: list[Server] = [
    Server("rtserve", "rtserve", ["{bin}/rtserve", "apps.native_app:app", "--bind",
           "127.0.0.1:{port}", *RT_COMMON], note="native App, {threads} worker threads",
           threads=THREADS, needs=("rtserve",)),
    Server("rtserve-wsgi", "rtserve", ["{bin}/rtserve", "apps.wsgi_app:app", "--bind",
           "127.0.0.1:{port}", *RT_COMMON, *RT_WSGI_DEADLINE],
           note="WSGI app, {threads} worker threads, /score deadline 50 ms + fallback from "
           "the CLI", threads=THREADS, needs=("rtserve",)),
    # The compiled build (opt-in: --servers rtserve-compiled,rtserve-wsgi-compiled, after
    # `make compiled`): the two rows above, run by .venv-compiled's rtserve.
    Server("rtserve-compiled", "rtserve", [f"{COMPILED_BIN}/rtserve", "apps.native_app:app",
           "--bind", "127.0.0.1:{port}", *RT_COMMON], default=False, prepare=compiled_ready,
           note="native App, {threads} worker threads, hot modules compiled (mypyc)",
           threads=THREADS),
    Server("rtserve-wsgi-compiled", "rtserve", [f"{COMPILED_BIN}/rtserve", "apps.wsgi_app:app",
           "--bind", "127.0.0.1:{port}", *RT_COMMON, *RT_WSGI_DEADLINE], default=False,
           prepare=compiled_ready, note="WSGI app, {threads} worker threads, /score deadline "
           "50 ms + fallback from the CLI, hot modules compiled (mypyc)", threads=THREADS),
    # Opt-in variants (run only when named in --servers). C's capacity with no deadline:
    # the WSGI app without --route-deadline (nothing shed; compare with granian's rps).
    Server("rtserve-wsgi-nodl", "rtserve", ["{bin}/rtserve", "apps.wsgi_app:app", "--bind",
           "127.0.0.1:{port}", *RT_COMMON], workloads="C", default=False,
           note="WSGI app, {threads} worker threads, no deadline (C capacity)",
           threads=THREADS, needs=("rtserve",)),
    # The GIL hand-off cost.
    Server("rtserve-t1", "rtserve", ["{bin}/rtserve", "apps.native_app:app", "--bind",
           "127.0.0.1:{port}", *RT_COMMON, "--threads", "1"], default=False,
           note="native App, 1 worker thread", needs=("rtserve",)),
    Server("rtserve-inline", "rtserve", ["{bin}/rtserve", "apps.native_app:app", "--bind",
           "127.0.0.1:{port}", *RT_COMMON], workloads="AB", default=False,
           env={"BENCH_INLINE": "1"},
           note="native App, /hello inline on the conductor (opt-in, never the headline)",
           needs=("rtserve",)),
    Server("waitress", "peer", ["{bin}/waitress-serve", "--listen=127.0.0.1:{port}",
           "--threads={threads}", "--connection-limit=12000", "--asyncore-use-poll",
           "--backlog=4096", "apps.wsgi_app:app"], note="threads={threads}",
           threads=THREADS, needs=("waitress",)),
    Server("gunicorn", "peer", ["{bin}/gunicorn", "-w", "1", "-k", "gthread", "--threads",
           "{threads}", "--worker-connections", "12000", "--keep-alive", "30", "--backlog",
           "4096", "--log-level", "warning", "-b", "127.0.0.1:{port}", "apps.wsgi_app:app"],
           note="gthread, 1 worker, threads={threads}", threads=THREADS, needs=("gunicorn",)),
    Server("uvicorn", "peer", UVICORN, note="uvloop + httptools, ASGI, /score in {threads} "
           "threads", threads=THREADS, env={"BENCH_POOL_THREADS": "{threads}"},
           needs=("uvicorn",), sweep_workloads="CE"),  # /hello, /big answer on the event loop
    Server("granian", "peer", [*GRANIAN_WSGI, "apps.wsgi_app:app"],
           note="WSGI, 1 worker, {threads} blocking threads", threads=THREADS,
           needs=("granian",)),
    # TLS rows (opt-in: --servers rtserve-tls,uvicorn-tls,granian-tls): A and B over HTTPS,
    # each the plain row's command plus its certificate flags; one certificate per run.
    Server("rtserve-tls", "rtserve", ["{bin}/rtserve", "apps.native_app:app", "--bind",
           "127.0.0.1:{port}", *RT_COMMON, "--certfile", TLS_CERT, "--keyfile", TLS_KEY],
           workloads="AB", default=False, prepare=tls_cert, tls=True,
           note="native App, {threads} worker threads, TLS (ssl module)", threads=THREADS,
           needs=("rtserve",)),
    Server("uvicorn-tls", "peer", [*UVICORN, "--ssl-certfile", TLS_CERT, "--ssl-keyfile",
           TLS_KEY], workloads="AB", default=False, prepare=tls_cert, tls=True,
           note="uvloop + httptools, ASGI, TLS (ssl module)", threads=THREADS,
           env={"BENCH_POOL_THREADS": "{threads}"}, needs=("uvicorn",), sweep_workloads="CE"),
    Server("granian-tls", "peer", [*GRANIAN_WSGI, "--ssl-certificate", TLS_CERT,
           "--ssl-keyfile", TLS_KEY, "apps.wsgi_app:app"], workloads="AB", default=False,
           prepare=tls_cert, tls=True,
           note="WSGI, 1 worker, {threads} blocking threads, TLS (rustls)", threads=THREADS,
           needs=("granian",)),
    # FastAPI rows (opt-in: --servers rtserve-fastapi,uvicorn-fastapi,granian-fastapi).
    Server("rtserve-fastapi", "rtserve", ["{bin}/rtserve", "apps.fastapi_app:app", "--bind",
           "127.0.0.1:{port}", *RT_COMMON, *RT_WSGI_DEADLINE], workloads="ACDE", default=False,
           note="FastAPI on 1 event loop, /score deadline 50 ms + fallback, late tasks cancelled"),
    # /score as a sync def (anyio's threads, bounded to --asgi-threads), at the defaults,
    # with --asgi-concurrency bounded, and --asgi-threads 40 and 4 (docs/asgi.md, "Sync
    # endpoints").
    *[Server(f"rtserve-fastapi-sync{suffix}", "rtserve",
             ["{bin}/rtserve", "apps.fastapi_app:app", "--bind", "127.0.0.1:{port}",
              *RT_COMMON, *RT_WSGI_DEADLINE, *extra], workloads="C", default=False,
             env={"BENCH_FASTAPI_SYNC": "1"}, note=note)
      for suffix, extra, note in [
          ("", [], "FastAPI, /score a sync def in anyio's threads, deadline 50 ms + fallback"),
          ("-c4", ["--asgi-concurrency", "4"], "as rtserve-fastapi-sync, --asgi-concurrency 4"),
          ("-t40", ["--asgi-threads", "40"],
           "as rtserve-fastapi-sync, --asgi-threads 40 (anyio's own default)"),
          ("-t4", ["--asgi-threads", "4"], "as rtserve-fastapi-sync, --asgi-threads 4"),
      ]],
    Server("uvicorn-fastapi", "peer", ["{bin}/uvicorn", "apps.fastapi_app:app", "--host",
           "127.0.0.1", "--port", "{port}", "--loop", "uvloop", "--http", "httptools",
           "--workers", "1", "--no-access-log", "--log-level", "warning",
           "--timeout-keep-alive", "30", "--backlog", "4096"], workloads="ACDE", default=False,
           note="FastAPI, uvloop + httptools"),
    Server("granian-fastapi", "peer", ["{bin}/granian", "--interface", "asgi", "--host",
           "127.0.0.1", "--port", "{port}", "--workers", "1", "--runtime-threads", "1",
           "--backlog", "4096", "--no-access-log", "--log-level", "warning",
           "apps.fastapi_app:app"], workloads="ACDE", default=False, note="FastAPI, ASGI"),
    # The peers with /score as a sync def, beside rtserve-fastapi-sync.
    Server("uvicorn-fastapi-sync", "peer", ["{bin}/uvicorn", "apps.fastapi_app:app",
           "--host", "127.0.0.1", "--port", "{port}", "--loop", "uvloop", "--http",
           "httptools", "--workers", "1", "--no-access-log", "--log-level", "warning",
           "--timeout-keep-alive", "30", "--backlog", "4096"], workloads="C", default=False,
           env={"BENCH_FASTAPI_SYNC": "1"},
           note="FastAPI, /score a sync def in anyio's threads, uvloop + httptools"),
    Server("granian-fastapi-sync", "peer", ["{bin}/granian", "--interface", "asgi", "--host",
           "127.0.0.1", "--port", "{port}", "--workers", "1", "--runtime-threads", "1",
           "--backlog", "4096", "--no-access-log", "--log-level", "warning",
           "apps.fastapi_app:app"], workloads="C", default=False,
           env={"BENCH_FASTAPI_SYNC": "1"},
           note="FastAPI, /score a sync def in anyio's threads, ASGI"),
    Server("nginx", "ceiling", ["{nginx}", "-c", "{tmp}/nginx.conf"], workloads="ABDF",
           prepare=nginx_conf, note="static answers, 1 worker: the ceiling"),
]


def baseline_twin(server: Server, ref: str, src: Path) -> Server:
    """``server`` as ``NAME@REF``: the same command and settings, rtserve from ``src``.

    ``PYTHONPATH`` puts the baseline tree's ``src`` before the venv's editable install
    (a plain path entry, so PYTHONPATH wins) and keeps bench/ for the apps: only the
    server's code differs between ``rtserve`` and ``rtserve@REF``.
    """
    return Server(f"{server.name}@{ref}", "baseline", list(server.cmd),
                  workloads=server.workloads, extra=dict(server.extra),
                  prepare=server.prepare, note=f"{server.note}; rtserve of {ref}",
                  default=True, threads=server.threads,
                  env={**server.env, "PYTHONPATH": f"{src}{os.pathsep}{BENCH}"},
                  needs=server.needs, sweep_workloads=server.sweep_workloads,
                  tls=server.tls)


def pair_with_twins(servers: list[Server]) -> list[list[Server]]:
    """The servers in their order, each rtserve server grouped with its baseline twin
    (``NAME@REF``, placed right after it), which the run alternates with it point by
    point; every other server is a group of one."""
    groups: list[list[Server]] = []
    for s in servers:
        if s.kind == "baseline" and groups and s.name.startswith(groups[-1][0].name + "@"):
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def check_baseline_import(src: Path) -> None:
    """Fail early unless the venv's Python, with the twin's PYTHONPATH, imports rtserve
    from ``src`` (and not the editable install of this tree)."""
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{BENCH}")
    out = subprocess.run([str(BIN / "python"), "-c", "import rtserve; print(rtserve.__file__)"],
                         capture_output=True, text=True, env=env, cwd=BENCH)
    got = out.stdout.strip()
    if out.returncode or not Path(got).resolve().is_relative_to(src.resolve()):
        sys.exit(f"baseline: rtserve imports from {got or out.stderr.strip()!r}, not {src}")


def with_baselines(stack: contextlib.ExitStack, servers: list[Server], ref: str | None
                   ) -> list[Server]:
    """`servers`, each rtserve one followed by its twin from git `ref` (a worktree that
    `stack` removes at its exit), for the tools that alternate the two; as they are
    without a ref."""
    if not ref:
        return list(servers)
    tree, _sha = stack.enter_context(gitref.worktree(ref))
    src = gitref.src_dir(tree)
    check_baseline_import(src)
    return [x for s in servers
            for x in ([s, baseline_twin(s, ref, src)] if s.kind == "rtserve" else [s])]


def tool_ctx(stack: contextlib.ExitStack, prefix: str, duration: float, warmup: float,
             calibrate: bool = True) -> tuple[Ctx, int]:
    """The Ctx of a tool that runs this table's servers one round at a time
    (bench/light_probe.py, bench/thread_costs.py): a temporary directory `stack` removes,
    C's request body in it, and the servers' environment with the burn calibrated now
    (printed; with `calibrate` False, logic's default and 0 returned)."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    from apps import logic  # noqa: PLC0415 - bench/apps, on sys.path above

    body = tmp / "tx.json"
    body.write_bytes(logic.sample_transaction())
    iters = calibrate_burn() if calibrate else 0
    if iters:
        print(f"# C's /score burns {iters} iterations (about 1 ms on this CPU now)", flush=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{BENCH}",
               BENCH_BURN_ITERS=str(iters or logic.DEFAULT_BURN_ITERS),
               PYTHONDONTWRITEBYTECODE="1")
    return Ctx(tmp, env, body, 1, duration, warmup, 0, {}), iters


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One workload: what the generator sends and for how long."""

    key: str
    title: str
    path: str
    kind: str  # "wrk" | "openloop" | "idle"
    connections: int = 50
    wrk_args: list[str] = field(default_factory=list)
    #: Environment for bench/lua/bench.lua (e.g. WRK_UNIQUE_ID: a new header per request).
    lua_env: dict[str, str] = field(default_factory=dict)
    post_body: bool = False
    duration: float = 10.0
    warmup: float = 2.0


WORKLOADS: dict[str, Workload] = {w.key: w for w in [
    Workload("A", "keep-alive hello world", "/hello", "wrk"),
    Workload("B", "one request per connection (Connection: close)", "/hello", "wrk",
             wrk_args=["-H", "Connection: close"]),
    Workload("C", "scoring: 1 KiB JSON POST, ~1 ms CPU, 200 ms stall on 1%, 50 ms deadline",
             "/score", "wrk", post_body=True),
    Workload("D", "1 MiB responses", "/big", "wrk", connections=16),
    Workload("E", "overload: open-loop constant rate at 1x and 2x of capacity (from C)",
             "/score", "openloop", post_body=True),
    Workload("F", "10,000 idle keep-alive connections: server RSS per connection", "/hello",
             "idle"),
    # A with heads that never repeat: rtserve's parser caches heads it has seen (docs/
    # parser.md), which wrk's identical requests always hit; real clients often differ.
    Workload("G", "keep-alive hello, every head unique (X-Request-Id per request)", "/hello",
             "wrk", lua_env={"WRK_UNIQUE_ID": "1"}),
]}
IDLE_CONNS = 10000
E_FACTORS: tuple[float, ...] = (1.0, 2.0)


@dataclass
class Ctx:
    """What every measurement needs: env for the servers, temp dir, options, results."""

    tmp: Path
    env: dict[str, str]
    body_file: Path
    repeat: int
    duration: float | None
    warmup: float | None
    idle_conns: int
    results: dict[str, Any]
    e_factors: tuple[float, ...] = E_FACTORS
    commands: dict[str, str] = field(default_factory=dict)
    #: B over TLS: the built bench/tlsconn.c, or why it could not be built.
    tlsconn: Path | str | None = None


NGINX = "nginx"  # resolved by main() after ensure_tools (it may be in /usr/sbin)


def _fmt(cmd: list[str], port: int, tmp: Path, threads: int | None = None) -> list[str]:
    return [c.format(bin=BIN, port=port, tmp=tmp, threads=threads or THREADS, nginx=NGINX)
            for c in cmd]


def server_cmd(server: Server, workload: str, port: int, tmp: Path,
               threads: int | None) -> list[str]:
    """The full command line: pinned, niced, ``env K=V`` for the server's environment."""
    env = [f"{k}={v}" for k, v in server.env.items()]
    cmd = server.cmd + server.extra.get(workload, [])
    return [*pin(SERVER_CPU), *_fmt((["env", *env] if env else []) + cmd, port, tmp, threads)]


def _unverified_tls() -> ssl.SSLContext:
    """A client context that accepts any certificate (the TLS rows' is self-signed)."""
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    return tls


@dataclass
class Hello:
    """What one ``GET /hello`` probe got: an HTTP answer, and over TLS what it negotiated."""

    answered: bool
    negotiated: str = ""  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    session: ssl.SSLSession | None = None
    reused: bool = False


def _hello(port: int, tls: ssl.SSLContext | None = None,
           session: ssl.SSLSession | None = None) -> Hello:
    """One ``GET /hello`` on a new connection (over TLS with ``tls``, offering ``session``)."""
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=1))
        if tls is None:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return Hello(s.recv(64).startswith(b"HTTP/1."))
        # The handshake happens here (an SSLError is an OSError).
        t = stack.enter_context(tls.wrap_socket(s, server_hostname="127.0.0.1",
                                                session=session))
        t.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answered = t.recv(64).startswith(b"HTTP/1.")  # TLS 1.3 tickets are read on the way
        cipher = t.cipher()
        return Hello(answered, f"{t.version()} {cipher[0] if cipher else '?'}", t.session,
                     bool(t.session_reused))


def wait_ready(p: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 30.0,
               tls: bool = False) -> str | None:
    """Wait until ``GET /hello`` on the port gets an HTTP answer; fail if the server died.

    ``tls``: over a real TLS handshake (certificate not verified), then once more offering
    that session; returns what was negotiated and whether the server resumed the session,
    e.g. ``TLSv1.3 TLS_AES_256_GCM_SHA384, resumes sessions`` (None for plain HTTP). wrk
    offers its previous session on each reconnect too (SSL_clear keeps it): in B a
    resuming server does abbreviated handshakes.
    """
    t_end = time.monotonic() + timeout
    ctx = _unverified_tls() if tls else None
    while time.monotonic() < t_end:
        if p.poll() is not None:
            raise RuntimeError(f"server exited with {p.returncode}: {log.read_text()[-2000:]}")
        try:
            first = _hello(port, ctx)
        except OSError:
            first = Hello(False)
        if first.answered:
            if ctx is None:
                return None
            try:
                again = _hello(port, ctx, first.session)
                resumed = "resumes" if again.reused else "does not resume"
            except OSError as e:
                resumed = f"resumption not known ({e})"
            return f"{first.negotiated}, {resumed} sessions"
        time.sleep(0.1)
    raise RuntimeError(f"server not answering on {port} after {timeout}s: "
                       f"{log.read_text()[-2000:]}")


@contextlib.contextmanager
def running(server: Server, workload: str, ctx: Ctx, threads: int | None = None
            ) -> Iterator[tuple[int, int]]:
    """Start ``server`` pinned to the server CPU, yield (pid, port), always stop it.

    ``threads``: its thread count for this run (None: its default).
    """
    port = free_port()
    if server.prepare:
        server.prepare(ctx.tmp, port)
    cmd = server_cmd(server, workload, port, ctx.tmp, threads or server.threads)
    # One command per server and workload in the docs: the one at the reference count.
    if (threads or server.threads) in (server.threads, None):
        ctx.commands.setdefault(f"{server.name} {workload}", shlex.join(cmd))
    log = ctx.tmp / (re.sub(r"[^\w.@+-]", "_", server.name) + ".log")
    p = start_process(cmd, BENCH, ctx.env, log)
    try:
        got = wait_ready(p, port, log, tls=server.tls)
        if got and server.name not in ctx.results.setdefault("tls", {}):
            ctx.results["tls"][server.name] = got
            print(f"# {server.name}: {got} (wait_ready's probe)", flush=True)
        yield p.pid, port
        if p.poll() is not None:
            raise RuntimeError(f"{server.name} died during {workload}: "
                               f"{log.read_text()[-2000:]}")
    finally:
        stop_process(p)


class RssSampler:
    """Samples the VmRSS of a server's process tree in a thread while a run lasts.

    Why: workload B creates and frees a connection per request; its memory cost is the
    peak (a burst of half-open connections, buffers not yet returned) and what stays at
    the end (a leak shows as growth). ``peak`` is the largest sample (every ``interval``
    seconds, the whole tree); ``hwm`` is the kernel's own high-water mark (VmHWM,
    summed over the tree: exact for a single-process server, since the process started).
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss_kib(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, int]:
        """``rss_peak_kib``, ``rss_end_kib`` (now) and ``rss_hwm_kib`` of the tree."""
        end = tree_rss_kib(self.pid)
        return {"rss_peak_kib": max(self.peak, end), "rss_end_kib": end,
                "rss_hwm_kib": tree_status_kib(self.pid, "VmHWM")}


def run_wrk(w: Workload, port: int, seconds: float, ctx: Ctx, record: bool = True,
            tls: bool = False) -> dict[str, Any]:
    """One wrk run pinned to the client CPU; returns the JSON from bench/lua/bench.lua.

    ``tls``: over https (wrk does not verify the certificate; in B every connection is a
    new TLS handshake, resumed when the server accepts wrk's previous session).
    """
    env = dict(os.environ, WRK_DEADLINE_MS=str(DEADLINE_MS), **w.lua_env)
    if w.post_body:
        env["WRK_BODY_FILE"] = str(ctx.body_file)
        env["WRK_COUNT_MARKER"] = "1"
    cmd = [*pin(CLIENT_CPU), "wrk", "-t1", f"-c{w.connections}",
           f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(BENCH / "lua/bench.lua"),
           *w.wrk_args, f"{'https' if tls else 'http'}://127.0.0.1:{port}{w.path}"]
    if record:
        ctx.commands.setdefault(f"wrk {w.key}{' tls' if tls else ''}", shlex.join(cmd))
    cpu0 = _children_cpu_s()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60)
    client_cpu = _children_cpu_s() - cpu0  # wrk's own (nice and taskset exec it)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            r = json.loads(line[len("WRK_JSON "):])
            secs = r["duration_us"] / 1e6
            r["client_cpu_s"] = client_cpu
            r["client_cpu_share"] = client_cpu / secs
            r["rps"] = r["requests"] / secs
            # Real answers: neither a fallback nor a non-2xx (a shed). E's capacity.
            r["real_rps"] = (r["requests"] - r["errors"]["status"] - r["fallbacks"]) / secs
            return r
    raise RuntimeError(f"wrk gave no result: {out.stdout[-1000:]} {out.stderr[-1000:]}")


def _children_cpu_s() -> float:
    """User + system CPU seconds of this driver's waited-for children so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_tlsconn(w: Workload, port: int, seconds: float, ctx: Ctx,
                record: bool = True) -> dict[str, Any]:
    """B over TLS: one bench/tlsconn run pinned to the client CPU (a new connection and a
    full handshake per request; see bench/tlsconn.py). Same result fields as run_wrk."""
    if not isinstance(ctx.tlsconn, Path):
        raise RuntimeError(f"no B-TLS generator: {ctx.tlsconn or 'not built'}")
    cmd = [*pin(CLIENT_CPU), *tlsconn.command(ctx.tlsconn, port, max(1, round(seconds)),
                                               w.connections, w.path, DEADLINE_MS)]
    if record:
        ctx.commands.setdefault(f"tlsconn {w.key} tls", shlex.join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode:
        raise RuntimeError(f"tlsconn failed ({out.returncode}): {out.stderr[-1000:]}")
    return tlsconn.parse(out.stdout)


def run_openloop(w: Workload, port: int, rate: float, seconds: float, warmup: float,
                 ctx: Ctx) -> dict[str, Any]:
    """One open-loop run at ``rate`` requests/s pinned to the client CPU."""
    cmd = [*pin(CLIENT_CPU), sys.executable, str(BENCH / "openloop.py"),
           "--port", str(port), "--rate", f"{rate:.0f}", "--duration", str(seconds),
           "--warmup", str(warmup), "--path", w.path, "--body-file", str(ctx.body_file),
           "--deadline-ms", str(DEADLINE_MS), "--max-conns", "1000"]
    ctx.commands.setdefault("openloop E", shlex.join(cmd).replace(str(BENCH), "bench"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 60)
    if out.returncode:
        raise RuntimeError(f"openloop failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def run_idle(pid: int, port: int, ctx: Ctx) -> dict[str, Any]:
    """Workload F: RSS of the server tree before and with N idle keep-alive connections."""
    time.sleep(0.5)
    before = tree_rss_kib(pid)
    cmd = [*pin(CLIENT_CPU), sys.executable, str(BENCH / "idle_conns.py"),
           "--port", str(port), "-n", str(ctx.idle_conns), "--timeout", "120"]
    ctx.commands.setdefault("idle F", shlex.join(cmd).replace(str(BENCH), "bench"))
    p = start_process(cmd, BENCH, dict(os.environ), ctx.tmp / "idle.log",
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdin is not None
        line = p.stdout.readline().decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"idle client failed: {line!r}")
        ready = json.loads(line[6:])
        time.sleep(1.0)  # let the server settle (lazy buffers, GC)
        after = tree_rss_kib(pid)
        p.stdin.write(b"\n")
        p.stdin.flush()
        done = json.loads(p.stdout.readline().decode()[5:])
        p.wait(30)
    finally:
        stop_process(p)
    n = max(1, ready["established"])
    return {"established": ready["established"], "failed": ready["failed"],
            "alive_after": done["alive"], "seconds": ready["seconds"],
            "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_conn": (after - before) / n}


def measure(server: Server, w: Workload, ctx: Ctx, threads: int | None = None) -> None:
    """One repeat of workload ``w`` on ``server`` at ``threads``; appends to ctx.results.

    Each result records the server's thread count (None: it has none) and the 1-minute
    load average at its end: on a shared 2-CPU machine anything else running shows there,
    and the docs print its range.
    """
    slot = ctx.results["runs"].setdefault(w.key, {}).setdefault(server.name, [])
    n = len(slot)
    _measure(server, w, ctx, threads or server.threads)
    for r in slot[n:]:
        r["threads"] = threads or server.threads
        r["loadavg"] = round(os.getloadavg()[0], 2)


def _measure(server: Server, w: Workload, ctx: Ctx, threads: int | None) -> None:
    seconds = ctx.duration or w.duration
    warmup = ctx.warmup if ctx.warmup is not None else w.warmup
    slot = ctx.results["runs"].setdefault(w.key, {}).setdefault(server.name, [])
    if server.tls and w.kind != "wrk":
        raise RuntimeError(f"{w.key}: its generator speaks plain HTTP only, not TLS")
    if w.kind == "idle":
        with running(server, w.key, ctx, threads) as (pid, port):
            run_wrk(WORKLOADS["A"], port, 1, ctx, record=False)  # touch the code paths
            slot.append(run_idle(pid, port, ctx))
        return
    if w.kind == "openloop":
        cap = _capacity(server.name, ctx, threads)
        if cap is None:
            slot.append({"error": "no capacity measured (run C or A first)"})
            return
        for factor in ctx.e_factors:
            with running(server, w.key, ctx, threads) as (_, port):
                r = run_openloop(w, port, cap * factor, seconds, warmup, ctx)
            r["factor"] = factor
            r["capacity_rps"] = cap
            slot.append(r)
        return
    def generate(seconds: float, record: bool = True) -> dict[str, Any]:
        if server.tls and w.key == "B":  # wrk would resume its sessions
            return run_tlsconn(w, port, seconds, ctx, record)
        return run_wrk(w, port, seconds, ctx, record, tls=server.tls)

    with running(server, w.key, ctx, threads) as (pid, port):
        if warmup > 0:
            generate(warmup, record=False)
        cpu0 = tree_cpu_seconds(pid)
        with RssSampler(pid) as rss:
            r = generate(seconds)
        r["server_cpu_s"] = tree_cpu_seconds(pid) - cpu0
        r.update(rss.result())  # peak and end RSS (shown for B: connection churn)
        # Per CPU-second of the server (None when the clock-tick count is too small).
        r["req_per_cpu_s"] = (r["requests"] / r["server_cpu_s"]
                              if r["server_cpu_s"] >= 0.05 else None)
        r["server_cpu_share"] = r["server_cpu_s"] / (r["duration_us"] / 1e6)
        slot.append(r)


def _capacity(server: str, ctx: Ctx, threads: int | None = None) -> float | None:
    """Median rate of real answers (not fallbacks, not sheds) of the server on C (else A)
    in this run, at the same thread count: the 1x rate of workload E."""
    for key in ("C", "A"):
        runs = [r["real_rps"] for r in ctx.results["runs"].get(key, {}).get(server, [])
                if "real_rps" in r and r.get("threads") == threads]
        if runs:
            return statistics.median(runs)
    return None


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def _ms(us: float | None) -> str:
    if us is None:
        return "timeout"
    return f"{us / 1000:.2f}" if us < 10000 else f"{us / 1000:.0f}"


def _med(runs: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(key(r) for r in runs)


def _ok(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if "error" not in r]


@dataclass
class Row:
    """One row of a table: a server at one thread count (or all its runs, unswept)."""

    label: str
    kind: str
    runs: list[dict[str, Any]]
    tls: bool = False


def _better(key: str) -> Callable[..., Any]:
    """max for throughput figures; min for F (KiB per idle connection, lower is better)."""
    return min if key == "F" else max


def rows_of(key: str, res: dict[str, Any]) -> list[Row]:
    """The rows of workload ``key``: one per server, or two for a swept server.

    A server measured at several thread counts (``--sweep-threads``) shows its row at the
    reference count (rtserve's configured count, ``ref_threads``: the peers are compared
    with rtserve at equal threads) and, when it differs, its best row (by the figure the
    ratios compare), so each peer also meets rtserve at its own best setting.
    """
    kinds = {s["name"]: s["kind"] for s in res["servers"]}
    tls = {s["name"] for s in res["servers"] if s.get("tls")}
    ref = res.get("ref_threads", THREADS)
    out: list[Row] = []
    for name, runs in res["runs"].get(key, {}).items():
        kind = kinds.get(name, "peer")
        counts = sorted({r.get("threads") for r in runs if r.get("threads")})
        if len(counts) <= 1:
            out.append(Row(name, kind, runs, name in tls))
            continue
        at = {t: [r for r in runs if r.get("threads") == t] for t in counts}
        scored = [(m, t) for t in counts if (m := _metric(key, at[t])) is not None]
        best = _better(key)(scored)[1] if scored else None
        if ref in at:
            mark = ", best" if best == ref else ""
            out.append(Row(f"{name} ({ref} threads{mark})", kind, at[ref], name in tls))
        if best is not None and best != ref:
            out.append(Row(f"{name} (best: {best} threads)", kind, at[best], name in tls))
    return out


def sweep_table(key: str, res: dict[str, Any]) -> list[str]:
    """Every swept server's headline figure at each thread count (medians)."""
    by_server = res["runs"].get(key, {})
    counts = sorted({r["threads"] for runs in by_server.values() for r in runs
                     if r.get("threads")})
    swept = {n: runs for n, runs in by_server.items()
             if len({r.get("threads") for r in runs if r.get("threads")}) > 1}
    if not swept:
        return []
    what = {"C": "real answers/s", "E": "goodput rps at the highest load"}.get(key, "rps")
    rows = [f"Thread sweep ({what}, median; best in bold):", "",
            "| server | " + " | ".join(f"{t} threads" for t in counts) + " |",
            "|---|" + "---:|" * len(counts)]
    for name, runs in swept.items():
        vals = {t: _metric(key, [r for r in runs if r.get("threads") == t]) for t in counts}
        known = [v for v in vals.values() if v is not None]
        top = _better(key)(known) if known else None
        cells = []
        for t in counts:
            v = vals[t]
            cell = "-" if v is None else f"{v:,.0f}"
            cells.append(f"**{cell}**" if v is not None and v == top else cell)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def wrk_table(key: str, res: dict[str, Any]) -> list[str]:
    """Markdown rows for a wrk workload: median rps and min-max, latency, errors.

    B also shows the server's RSS during the measured run (median over repeats of the
    peak sample and of the value at its end), since connection churn is what B tests.
    """
    rss = key == "B"
    head = ("| server | rps median | rps min-max | req per server CPU-s | server CPU use "
            "| p50 ms | p99 ms | p99.9 ms | errors | non-2xx | within 50 ms | fallbacks "
            "| real answers rps |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if rss:
        head += " RSS peak MiB | RSS end MiB |"
        rule += "---:|---:|"
    rows = [head, rule]
    for row in rows_of(key, res):
        name, runs = row.label, _ok(row.runs)
        if not runs:
            rows.append(f"| {name} | failed | | | | | | | | | | | |" + (" | |" if rss else ""))
            continue
        rps = [r["rps"] for r in runs]
        lat = {p: statistics.median(r["latency_us"][p] for r in runs)
               for p in ("p50", "p99", "p999")}
        errs = sum(r["errors"]["connect"] + r["errors"]["read"] + r["errors"]["write"]
                   + r["errors"]["timeout"] for r in runs)
        non2xx = sum(r["errors"]["status"] for r in runs)
        within = sum(r["within_deadline"] for r in runs) / max(1, sum(r["requests"]
                                                                     for r in runs))
        fb = sum(r["fallbacks"] for r in runs)
        eff = [r["req_per_cpu_s"] for r in runs if r.get("req_per_cpu_s")]
        use = [r["server_cpu_share"] for r in runs if "server_cpu_share" in r]
        effs = f"{statistics.median(eff):,.0f}" if eff else "-"
        uses = f"{statistics.median(use):.0%}" if use else "-"
        line = (f"| {name} | {statistics.median(rps):,.0f} | {min(rps):,.0f}-{max(rps):,.0f}"
                f" | {effs} | {uses} | {_ms(lat['p50'])} | {_ms(lat['p99'])}"
                f" | {_ms(lat['p999'])} | {errs}"
                f" | {non2xx} | {within:.2%} | {fb if key == 'C' else '-'}"
                f" | {_med(runs, lambda r: r.get('real_rps', r['rps'])):,.0f} |")
        if rss:
            with_rss = [r for r in runs if "rss_peak_kib" in r]
            if with_rss:
                line += (f" {_mib(_med(with_rss, lambda r: r['rss_peak_kib']))} |"
                         f" {_mib(_med(with_rss, lambda r: r['rss_end_kib']))} |")
            else:
                line += " - | - |"
        rows.append(line)
    return rows


def tls_facts_table(key: str, res: dict[str, Any]) -> list[str]:
    """What the TLS rows' generator did (medians over repeats): its own CPU share (near
    100%: it, not the server, set the rate), and for B (bench/tlsconn) the full and resumed
    handshakes it counted, what they negotiated, and the handshake and request latencies."""
    rows_ = [r for r in rows_of(key, res) if r.tls and _ok(r.runs)]
    if not rows_:
        return []
    b = key == "B"
    head = "| TLS row | generator | generator CPU use | server CPU use |"
    rule = "|---|---|---:|---:|"
    if b:
        head += (" full handshakes (all repeats) | resumed | negotiated "
                 "| handshake p50 / p99 ms | request p50 / p99 ms |")
        rule += "---:|---:|---|---:|---:|"
    out = [f"Generator of the TLS rows ({'bench/tlsconn' if b else 'wrk'}):", "", head, rule]
    for row in rows_:
        runs = _ok(row.runs)
        gen = "tlsconn" if "full_handshakes" in runs[0] else "wrk"
        cli = [r["client_cpu_share"] for r in runs if "client_cpu_share" in r]
        srv = [r["server_cpu_share"] for r in runs if "server_cpu_share" in r]
        line = (f"| {row.label} | {gen} | "
                f"{f'{statistics.median(cli):.0%}' if cli else '-'} | "
                f"{f'{statistics.median(srv):.0%}' if srv else '-'} |")
        if b and gen == "tlsconn":
            neg = sorted({r["negotiated"] for r in runs})
            mixed = sum(r["negotiated_mixed"] for r in runs)
            hs = {p: statistics.median(r["handshake_us"][p] for r in runs) for p in ("p50", "p99")}
            rq = {p: statistics.median(r["request_us"][p] for r in runs) for p in ("p50", "p99")}
            line += (f" {sum(r['full_handshakes'] for r in runs):,} |"
                     f" {sum(r['resumed_handshakes'] for r in runs):,} |"
                     f" {'; '.join(neg)}{f' ({mixed} differed)' if mixed else ''} |"
                     f" {_ms(hs['p50'])} / {_ms(hs['p99'])} | {_ms(rq['p50'])} / "
                     f"{_ms(rq['p99'])} |")
        elif b:
            line += " - | - | - | - | - |"
        out.append(line)
    return out


def e_table(res: dict[str, Any]) -> list[str]:
    """Markdown rows for the open-loop overload workload (medians over repeats)."""
    rows = ["| server | load | offered rps | answered within 50 ms (any status) | 2xx within 50 ms"
            " | goodput rps | goodput / capacity | fallbacks | 503 shed | other non-2xx or "
            "unanswered | p50 ms | p99 ms | p99.9 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows_of("E", res):
        name, runs = row.label, _ok(row.runs)
        for factor in sorted({r["factor"] for r in runs}):
            rs = [r for r in runs if r["factor"] == factor]
            kept = _med(rs, lambda r: r.get("share_kept", 0.0))
            share = _med(rs, lambda r: r["share_within_deadline"])
            good = _med(rs, lambda r: r["goodput_rps"])
            cap = rs[0]["capacity_rps"]
            other = _med(rs, lambda r: r["offered"] - r["ok_2xx"] - r["shed_503"])
            lat = {p: [r["latency_us"][p] for r in rs] for p in ("p50", "p99", "p999")}
            med = {p: (None if None in v else statistics.median(v)) for p, v in lat.items()}
            fb = _med(rs, lambda r: r["fallbacks"])
            shed = _med(rs, lambda r: r["shed_503"])
            rows.append(f"| {name} | {factor:g}x | {rs[0]['rate']:,.0f} | {kept:.1%} | "
                        f"{share:.1%} | {good:,.0f} | {good / cap:.0%} | {fb:,.0f} | "
                        f"{shed:,.0f} | {other:,.0f} | {_ms(med['p50'])} | {_ms(med['p99'])} | "
                        f"{_ms(med['p999'])} |")
    return rows


def f_table(res: dict[str, Any]) -> list[str]:
    """Markdown rows for the idle-connection memory workload."""
    rows = ["| server | connections established | still open | RSS before MiB | RSS after MiB "
            "| KiB per connection |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows_of("F", res):
        name, runs = row.label, _ok(row.runs)
        if not runs:
            rows.append(f"| {name} | failed | | | | |")
            continue
        r = runs[0]
        if r["alive_after"] < res["idle_conns"]:
            name += " (incomplete: figure not comparable)"
        rows.append(f"| {name} | {r['established']:,} | {r['alive_after']:,} | "
                    f"{r['rss_before_kib'] / 1024:.1f} | {r['rss_after_kib'] / 1024:.1f} | "
                    f"{r['kib_per_conn']:.1f} |")
    return rows


def _metric(key: str, runs: list[dict[str, Any]]) -> float | None:
    """The figure a ratio compares: rps (A-D), goodput at 2x (E), KiB/conn (F)."""
    runs = _ok(runs)
    if not runs:
        return None
    if key == "E":
        rs = [r for r in runs if r["factor"] == max(r["factor"] for r in runs)]
        return _med(rs, lambda r: r["goodput_rps"]) if rs else None
    if key == "F":
        return runs[0]["kib_per_conn"]
    if key == "C":  # fallbacks and sheds are cheap: compare the real work done
        return _med(runs, lambda r: r["real_rps"])
    return _med(runs, lambda r: r["rps"])


def _eff(runs: list[dict[str, Any]], real: bool = False) -> float | None:
    """Median requests (``real``: real answers only) per server CPU-second."""
    vals = []
    for r in _ok(runs):
        if not r.get("req_per_cpu_s"):
            continue
        if real:
            vals.append(r["real_rps"] * r["duration_us"] / 1e6 / r["server_cpu_s"])
        else:
            vals.append(r["req_per_cpu_s"])
    return statistics.median(vals) if vals else None


def ratio_table(key: str, res: dict[str, Any]) -> list[str]:
    """rtserve / other for the workload's headline figure, from the same run.

    Rows: the rtserve variants; columns: the baseline (``rtserve@REF``: old vs new rtserve
    measured side by side), then the peers and the ceiling. For the wrk workloads a second
    row per rtserve variant compares requests per server CPU-second, the figure least
    disturbed by other load on the machine. TLS rows get a table of their own: an HTTPS
    row is compared only with HTTPS rows.
    """
    out = _ratio_table(key, [r for r in rows_of(key, res) if not r.tls], "")
    over_tls = _ratio_table(key, [r for r in rows_of(key, res) if r.tls], " over TLS")
    return out + ([""] if out and over_tls else []) + over_tls


def _ratio_table(key: str, rows_: list[Row], title: str) -> list[str]:
    ours = [r for r in rows_ if r.kind == "rtserve"]
    others = ([r for r in rows_ if r.kind == "baseline"]
              + [r for r in rows_ if r.kind not in ("rtserve", "baseline")])
    if not ours or not others:
        return []
    what = {"C": "real answers/s: 2xx that are not fallbacks",
            "E": "goodput at the highest load",
            "F": "KiB per idle connection, lower is better"}.get(key, "requests/s")
    rows = [f"Ratio rtserve / other{title} ({what}):", "",
            "| | " + " | ".join(p.label for p in others) + " |",
            "|---|" + "---:|" * len(others)]
    for o in ours:
        mo = _metric(key, o.runs)
        cells = []
        for p in others:
            mp = _metric(key, p.runs)
            if mo is None or mp is None:
                cells.append("n/a")
            elif not mp:
                cells.append("peer 0")
            else:
                cells.append(f"{mo / mp:.2f}x")
        rows.append(f"| {o.label} | " + " | ".join(cells) + " |")
        real = key == "C"
        if WORKLOADS[key].kind == "wrk" and _eff(o.runs, real):
            eo = _eff(o.runs, real)
            cells = []
            for p in others:
                ep = _eff(p.runs, real)
                cells.append(f"{eo / ep:.2f}x" if eo and ep else "n/a")
            rows.append(f"| {o.label}, per CPU-s | " + " | ".join(cells) + " |")
    return rows


def render(res: dict[str, Any]) -> str:
    """All tables of a run as markdown."""
    out: list[str] = []
    short = res["options"].get("short")
    for key, w in WORKLOADS.items():
        if key not in res["runs"]:
            continue
        title = w.title.replace("10,000", f"{res['idle_conns']:,}")
        out.append(f"### {key}: {title}")
        out.append("")
        if short:
            out.append(f"_Short run: {short}._")
            out.append("")
        if w.kind == "wrk":
            out += wrk_table(key, res)
            facts = tls_facts_table(key, res)
            out += ["", *facts] if facts else []
        elif w.kind == "openloop":
            out += e_table(res)
        else:
            out += f_table(res)
        out.append("")
        for extra in (sweep_table(key, res), ratio_table(key, res)):
            if extra:
                out += extra + [""]
    return "\n".join(out)


def _burn_end(res: dict[str, Any]) -> str:
    """The CPU loop re-timed at the end of the run, and whether the VM's speed moved."""
    end = res.get("burn_ms_end")
    if end is None:  # an older results file
        return ""
    start = res.get("burn_ms_start", 1.0)
    drift = end / start
    verdict = ("steady" if 0.85 <= drift <= 1.15 else
               "the VM's speed moved during the run: compare servers within a repeat only")
    return f"; the same loop took {end:.3f} ms at the end ({drift:.2f}x: {verdict})"


def _load_range(res: dict[str, Any]) -> str:
    loads = [r["loadavg"] for by in res["runs"].values() for runs in by.values()
             for r in runs if "loadavg" in r]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded"


def display_commands(commands: dict[str, str]) -> list[str]:
    """The recorded commands, one per server and generator, without this run's paths/ports."""
    subs = [(re.escape(str(BIN)) + "/", ".venv/bin/"), (re.escape(str(BENCH)), "bench"),
            (r"/tmp/rtserve-[0-9a-f]{8}-\w+/tree", "$BASELINE"),
            (r"/tmp/rtserve-bench-\w+", "$TMP"),
            (r"127\.0\.0\.1:\d+", "127.0.0.1:$PORT"), (r"--port \d+", "--port $PORT"),
            (r"--rate \d+", "--rate $RATE"), (r"--pid \d+", "--pid $PID")]
    seen: dict[str, str] = {}
    for key, cmd in sorted(commands.items()):
        for pat, rep in subs:
            cmd = re.sub(pat, rep, cmd)
        who = key.split(" ")[0]
        label = key if who in ("wrk", "openloop", "idle", "tlsconn") else who
        if cmd not in seen.values() or label not in seen:
            seen.setdefault(label, cmd)
    return [f"# {k}\n{v}" for k, v in seen.items()]


def _method_extras(res: dict[str, Any]) -> list[str]:
    """Method bullets for the options a run used (thread sweep, baseline, B's RSS)."""
    out = []
    if "B" in res["runs"]:
        out.append("B also records the server tree's RSS during the measured run: the peak "
                   "of samples\n  every 50 ms and the value at its end (VmRSS, /proc).")
    sweep = res.get("sweep_threads")
    if sweep:
        ref = res.get("ref_threads", THREADS)
        out.append(f"Thread sweep: every threaded server (rtserve's `--threads`, waitress and "
                   f"gunicorn\n  `threads`, granian's blocking threads) ran A-E at "
                   f"{', '.join(map(str, sweep))} threads, uvicorn's\n  /score pool C and E. "
                   f"Tables show each server at {ref} (rtserve's count) and at its\n  own best "
                   f"count; the sweep tables give every count. F ran at {ref} only.")
    tls = [s["name"] for s in res["servers"] if s.get("tls")]
    if tls:
        got = "; ".join(f"{k}: {v}" for k, v in res.get("tls", {}).items())
        cert = " ".join(tls_cert_cmd("$TMP"))  # not shlex: $TMP must stay expandable
        out.append(f"TLS rows ({', '.join(tls)}): the plain row's server with one "
                   f"certificate (ECDSA P-256)\n  made once per run, `{cert}`.\n  "
                   f"A: wrk over https (no verification), one handshake per connection. "
                   f"B: `bench/tlsconn.c`\n  (C, OpenSSL, one epoll thread, built at bench "
                   f"time), a new TCP connection and a full\n  TLS 1.3 handshake per request "
                   f"({tlsconn.SUITE}, {tlsconn.GROUP}, no session offered;\n  wrk would "
                   f"resume its previous session). B-TLS latency is per connection, from "
                   f"connect()\n  to the response's last byte (wrk's B latency starts at the "
                   f"request's write). Negotiated\n  with a Python client at start: "
                   f"{got or 'not recorded'}.\n  TLS rows are compared with TLS rows only.")
    base = res.get("baseline")
    if base:
        out.append(f"Baseline: `NAME@{base['ref']}` is the same server, apps and settings "
                   f"with the rtserve of\n  `{base['ref']}` (commit {base['commit'][:10]}, "
                   f"src/ at {base['src_commit']}), from a temporary\n  `git worktree` put "
                   f"first on `PYTHONPATH`; measured in the same run, interleaved.")
    return out


NOTES_BEGIN = "<!-- notes: kept by bench/run.py --write-docs -->"
NOTES_END = "<!-- /notes -->"


def write_docs(res: dict[str, Any], json_path: Path) -> None:
    """Rewrite docs/benchmarks.md: machine, method, exact commands, tables of this run."""
    m = res["machine"]
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    burn_end = _burn_end(res)
    servers = "\n".join(f"| {s['name']} | {s['kind']} | {s['note']} |" for s in res["servers"])
    cmds = "\n".join(display_commands(res["commands"]))
    opts = res["options"]
    extra_method = "".join(f"\n- {b}" for b in _method_extras(res))
    # The hand-written analysis between the notes markers survives regeneration.
    notes = f"{NOTES_BEGIN}\n## Notes\n\n(analysis of the latest run goes here)\n{NOTES_END}"
    if DOCS.exists():
        old = DOCS.read_text()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN):old.index(NOTES_END) + len(NOTES_END)]
    text = f"""# Benchmarks

Generated by `bench/run.py --write-docs` (raw data: `bench/results/{json_path.name}`, not in
git). Reproduce with `make bench` (3 repeats, about 30 minutes; tables on stdout, JSON in
bench/results/), or `.venv/bin/python bench/run.py --write-docs` to also rewrite this file
(the notes block is kept). `make bench-quick` (A and C only, 1 repeat, short runs) is a
smoke test, not figures to quote. Flame graph: `bench/profile.sh`.

## Machine and software

- CPU: {m['cpu']} ({m['cpus']} CPUs; a KVM guest: absolute numbers are this VM's, compare
  the ratios)
- Kernel {m['kernel']}, Python {m['python']}, rtserve at git {m['git']}, run {m['date']}
- 1-minute load average at the end of the measurements: {_load_range(res)} (2 CPUs: the
  server and the generator make 2; more means something else ran on the machine too)
- {vers}
- `apps.logic.burn` calibrated to {res['burn_iters']} iterations (about 1 ms on CPU 0){burn_end}

## Method

- Each server runs as one process pinned to CPU 0 (`taskset -c 0`); gunicorn, granian and
  nginx also have an idle master process on the same CPU. The load generator is pinned to
  CPU 1. Loopback only. A fresh server is started for every workload and every repeat.
  Servers and generators run at niceness {res.get('nice', 0)} (the machine is shared with
  other jobs; see the load average above). Repeats are interleaved across servers
  (repeat 1 of every server, then repeat 2, ...) so that background noise spreads evenly.
- Every server serves the same logic, `bench/apps/logic.py`: through `apps.native_app`
  (rtserve), `apps.wsgi_app` (rtserve-WSGI, waitress, gunicorn, granian) or `apps.asgi_app`
  (uvicorn; `/score` runs in an 8-thread pool like a FastAPI `def` endpoint). nginx answers
  with static strings and is only a ceiling for the harness and the kernel.
- A-D: `wrk -t1` after a {opts['warmup']} warm-up, {opts['duration']} measured,
  {opts['repeat']} repeat(s); rps is the median, with min-max over the repeats; latency
  percentiles are wrk's (closed loop, from send to answer), medians over the repeats.
  "within 50 ms" is the share of responses faster than 50 ms (bench/lua/bench.lua).
  "req per server CPU-s" divides the requests by the user+system CPU time the server's
  process tree used meanwhile (/proc/PID/stat): on a shared machine it moves far less
  than rps. "server CPU use" is that CPU time over the wall time (100% = saturated core;
  less = the server waited for the generator, or for the CPU someone else had).
- C: every 100th request (a server-side counter) sleeps 200 ms; rtserve's `/score` has
  `deadline_ms=50` and a fallback `{{"decision": "review"}}` sent with
  `X-Rtserve-Fallback: deadline`; wrk's Lua `response()` counts those as fallbacks.
  rtserve-WSGI gets the same deadline and fallback from `--route-deadline` and `--fallback`.
- E: `bench/openloop.py`, an open-loop generator: request k is due at `t0 + k/rate` and its
  latency counts from that due time (no coordinated omission; wrk's closed loop and
  h2load's bursty `--rps` both hide queueing). Rates are 1x and 2x of the server's own
  median C rps in this run (at 1x an open loop is at the edge of stability: any stall
  builds a queue that a closed loop would never see). Shares are over all requests
  offered; unanswered and unsent requests count as misses. "answered within 50 ms" counts
  any answer (a 503 shed or a fallback too: the deadline was kept); "2xx within 50 ms"
  includes fallbacks; goodput counts only real answers (2xx, not a fallback) within 50 ms,
  per second, and "goodput / capacity" divides it by the 1x rate.
- F: `bench/idle_conns.py` opens {res['idle_conns']:,} connections, one answered
  `GET /hello` on each, and holds them idle; RSS (VmRSS of the server's process tree) before
  and after, difference divided by the connections established.{extra_method}

| server | kind | configuration |
|---|---|---|
{servers}

Exact commands of this run ($PORT, $RATE, $TMP, $BASELINE vary per run):

```
{cmds}
```

{notes}

## Results

{render(res)}
"""
    DOCS.write_text(text)
    print(f"# wrote {DOCS}")


# --------------------------------------------------------------------------------------
# Profile mode
# --------------------------------------------------------------------------------------


def profile(ctx: Ctx, seconds: float) -> None:
    """py-spy flame graph of rtserve (native app) under workload A -> docs/.

    A second py-spy writes collapsed stacks, summarised on stdout per thread: where the
    conductor (main thread) and the workers spend their samples.
    """
    server = next(s for s in SERVERS if s.name == "rtserve")
    w = WORKLOADS["A"]
    raw = ctx.tmp / "profile.txt"
    raw_gil = ctx.tmp / "profile-gil.txt"
    # One py-spy at a time (two at once halve wrk's throughput): the flame graph, then
    # collapsed stacks of all active samples, then only of samples holding the GIL.
    phases = [("flamegraph", FLAMEGRAPH, []), ("raw", raw, []), ("raw", raw_gil, ["--gil"])]
    with running(server, "A", ctx) as (pid, port):
        run_wrk(w, port, 2, ctx, record=False)
        base = run_wrk(w, port, seconds, ctx, record=False)
        rps = []
        for fmt, out, extra in phases:
            spy = [*pin(CLIENT_CPU), str(BIN / "py-spy"), "record", "--pid",
                   str(pid), "--duration", str(int(seconds)), "--rate", "100", "--threads",
                   "--nonblocking", "--format", fmt, "-o", str(out), *extra]
            sp = start_process(spy, BENCH, dict(os.environ), ctx.tmp / "py-spy.log")
            try:
                rps.append(run_wrk(w, port, seconds, ctx, record=False)["rps"])
                sp.wait(seconds + 30)
            finally:
                stop_process(sp)
    print(f"# workload A: {base['rps']:,.0f} rps alone, "
          f"{', '.join(f'{x:,.0f}' for x in rps)} rps under py-spy; flame graph {FLAMEGRAPH}")
    for title, path in (("all active samples", raw), ("samples holding the GIL", raw_gil)):
        if path.exists():
            print(f"## {title}")
            print(summarise_profile(path.read_text()))


def summarise_profile(collapsed: str, top: int = 25) -> str:
    """Per-thread totals and the top self-time frames of the main thread (the conductor)."""
    threads: dict[str, int] = {}
    self_main: dict[str, int] = {}
    incl_main: dict[str, int] = {}
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        threads[thread] = threads.get(thread, 0) + n
        if "MainThread" in thread or "main" in thread.lower():
            self_main[frames[-1]] = self_main.get(frames[-1], 0) + n
            for f in set(frames[1:]):
                incl_main[f] = incl_main.get(f, 0) + n
    total_main = sum(self_main.values()) or 1
    out = ["samples per thread:"]
    out += [f"  {n:7d}  {t}" for t, n in sorted(threads.items(), key=lambda x: -x[1])]
    out.append("main thread (conductor), self time:")
    out += [f"  {n / total_main:6.1%}  {f}"
            for f, n in sorted(self_main.items(), key=lambda x: -x[1])[:top]]
    out.append("main thread (conductor), inclusive time:")
    out += [f"  {n / total_main:6.1%}  {f}"
            for f, n in sorted(incl_main.items(), key=lambda x: -x[1])[:top]]
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _threads_note(server: Server, sweep: list[int]) -> str:
    """The thread count a server's note shows: its own, or the swept counts."""
    if sweep and server.threads:
        return "/".join(map(str, sweep)) + " (swept)"
    return str(server.threads or THREADS)


def run_one(s: Server, w: Workload, ctx: Ctx, threads: int | None, what: str) -> None:
    """Measure one server at one thread count; record a failure instead of raising."""
    t = time.monotonic()
    swept = ctx.results["sweep_threads"] and s.threads and w.key in s.sweep_workloads
    label = f"{s.name} ({threads} threads)" if swept else s.name
    res = ctx.results
    try:
        measure(s, w, ctx, threads)
    except Exception as e:  # noqa: BLE001 - one failure must not end the run
        res["runs"].setdefault(w.key, {}).setdefault(s.name, []).append(
            {"error": str(e)[-800:], "threads": threads})
        print(f"# {what} {label}: FAILED {str(e)[-300:]}", flush=True)
        return
    last = res["runs"][w.key][s.name][-1]
    if "rps" in last:
        fig = (f"{last['rps']:,.0f} rps, p99 {_ms(last['latency_us']['p99'])} ms, "
               f"p99.9 {_ms(last['latency_us']['p999'])} ms")
        if w.key == "B" and "rss_peak_kib" in last:
            fig += (f", RSS peak {_mib(last['rss_peak_kib'])} MiB, "
                    f"end {_mib(last['rss_end_kib'])} MiB")
    else:
        fig = f"{last.get('kib_per_conn', last.get('goodput_rps', 0)):,.1f}"
    print(f"# {what} {label}: {fig} ({time.monotonic() - t:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the selected servers x workloads, print and save the tables.

    Whatever the run leaves behind is cleaned up on the way out, however it ends: the
    servers (atexit + signal handlers) and the baseline worktree (the ExitStack).
    """
    with contextlib.ExitStack() as stack:
        return _main(argv, stack)


def _main(argv: list[str] | None, stack: contextlib.ExitStack) -> int:
    global NICE, NGINX
    ap = argparse.ArgumentParser(description="rtserve benchmark driver",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("Usage:")[1])
    ap.add_argument("--quick", action="store_true", help="A and C, 1 repeat, short runs")
    ap.add_argument("--repeat", type=int, default=None, help="repeats per workload (3)")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per run")
    ap.add_argument("--servers", default="", help="comma list, e.g. rtserve,uvicorn")
    ap.add_argument("--workloads", default="", help="comma list of A-G")
    ap.add_argument("--e-factors", default="1,2",
                    help="workload E rates as multiples of the C capacity")
    ap.add_argument("--burn-iters", type=int, default=0,
                    help="CPU loop size of /score (default: calibrated to ~1 ms)")
    ap.add_argument("--nice", type=int, default=NICE,
                    help="niceness of servers and generators (0: do not change)")
    ap.add_argument("--idle-conns", type=int, default=IDLE_CONNS, help="workload F size")
    ap.add_argument("--write-docs", action="store_true", help="rewrite docs/benchmarks.md")
    ap.add_argument("--report", type=Path, help="render an earlier results JSON, no run")
    ap.add_argument("--profile", action="store_true", help="py-spy flame graph under A")
    ap.add_argument("--baseline", metavar="REF", default=None,
                    help="also run each selected rtserve server as NAME@REF: the rtserve of "
                    "git ref REF (a temporary worktree), same apps and settings")
    ap.add_argument("--sweep-threads", metavar="LIST", default="",
                    help=f"run every threaded server at each of these thread counts, e.g. "
                    f"2,4,8 (A-E; {THREADS}, rtserve's count, is always included)")
    a = ap.parse_args(argv)

    NICE = a.nice
    if a.report:
        res = json.loads(a.report.read_text())
        print(render(res))
        if a.write_docs:
            write_docs(res, a.report)
        return 0

    if a.quick:
        a.repeat = a.repeat or 1
        a.duration = a.duration or 3.0
        a.warmup = a.warmup if a.warmup is not None else 1.0
        a.workloads = a.workloads or "A,C"
    repeat = a.repeat or 3
    keys = [k.strip().upper() for k in a.workloads.split(",") if k.strip()] or list(WORKLOADS)
    names = [n.strip() for n in a.servers.split(",") if n.strip()]
    servers = [s for s in SERVERS if s.name in names or (not names and s.default)]
    if names and len(servers) != len(names):
        sys.exit(f"unknown server in {names}; known: {[s.name for s in SERVERS]}")
    try:
        sweep = sorted({int(t) for t in a.sweep_threads.split(",") if t.strip()})
    except ValueError:
        sys.exit(f"--sweep-threads wants a comma list of counts, not {a.sweep_threads!r}")
    if sweep and min(sweep) < 1:
        sys.exit("--sweep-threads: counts must be positive")
    if sweep:
        sweep = sorted({*sweep, THREADS})
    if "E" in keys and "C" not in keys and "A" not in keys:
        keys = ["C", *keys]  # E's rates come from C's capacity
    keys = [k for k in WORKLOADS if k in keys]

    tools = {"nginx"} if any(s.name == "nginx" for s in servers) else set()
    if any(s.tls for s in servers):
        tools.add("openssl")  # the TLS rows' certificate
    ensure_tools(tools,
                 {n for s in servers for n in s.needs} | ({"py-spy"} if a.profile else set()))
    NGINX = which("nginx") or "nginx"
    baseline: dict[str, str] | None = None
    if a.baseline:
        tree, sha = stack.enter_context(gitref.worktree(a.baseline))
        src = gitref.src_dir(tree)
        check_baseline_import(src)
        twins = [baseline_twin(s, a.baseline, src) for s in servers if s.kind == "rtserve"]
        if not twins:
            sys.exit("--baseline: no rtserve server selected to compare with")
        # Each twin right after its original: interleaved, like the repeats.
        servers = [x for s in servers
                   for x in [s, *[t for t in twins if t.name == f"{s.name}@{a.baseline}"]]]
        baseline = {"ref": a.baseline, "commit": sha, "src_commit": gitref.src_commit(tree)}
        print(f"# baseline {a.baseline} = {sha[:10]} in {tree}", flush=True)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # servers inherit it (F)
    atexit.register(stop_all)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    burn_iters = a.burn_iters or calibrate_burn()
    burn_ms_start = time_burn_ms(burn_iters) if a.burn_iters else 1.0
    tmp = Path(tempfile.mkdtemp(prefix="rtserve-bench-"))
    body_file = tmp / "tx.json"
    sys.path.insert(0, str(BENCH))
    from apps import logic  # noqa: PLC0415

    body_file.write_bytes(logic.sample_transaction())
    # This checkout's src first: the venv's editable install may point at another tree
    # (a git worktree measured with the main checkout's venv).
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{BENCH}",
               BENCH_BURN_ITERS=str(burn_iters),
               PYTHONDONTWRITEBYTECODE="1")
    short = None
    if a.quick or (a.duration and a.duration < 10) or repeat < 3:
        short = (f"{repeat} repeat(s), {a.duration or 'default'} s measured, "
                 f"{a.warmup if a.warmup is not None else 'default'} s warm-up")
    res = {
        "nice": NICE,
        "machine": machine_info(),
        "burn_iters": burn_iters,
        "burn_ms_start": round(burn_ms_start, 3),
        "idle_conns": a.idle_conns,
        "options": {"repeat": repeat, "duration": f"{a.duration or 10:g} s",
                    "warmup": f"{a.warmup if a.warmup is not None else 2:g} s",
                    "short": short, "argv": sys.argv[1:]},
        "servers": [{"name": s.name, "kind": s.kind, "tls": s.tls,
                     "note": s.note.format(threads=_threads_note(s, sweep))} for s in servers],
        "ref_threads": THREADS,
        "sweep_threads": sweep,
        "baseline": baseline,
        "runs": {},
    }
    ctx = Ctx(tmp, env, body_file, repeat, a.duration, a.warmup, a.idle_conns, res,
              tuple(float(f) for f in a.e_factors.split(",")))
    res["commands"] = ctx.commands
    if "B" in keys and any(s.tls and "B" in s.workloads for s in servers):
        try:
            ctx.tlsconn = tlsconn.build(tmp)
        except RuntimeError as e:  # B-TLS rows record this; the other rows still run
            ctx.tlsconn = str(e)
            print(f"# B over TLS cannot run: {e}", flush=True)

    if a.profile:
        profile(ctx, a.duration or 10.0)
        return 0

    print(f"# {res['machine']['cpu']}; burn {burn_iters} iterations; servers "
          f"{[s.name for s in servers]}; workloads {keys}; {repeat} repeat(s)", flush=True)
    for key in keys:
        w = WORKLOADS[key]
        reps = 1 if w.kind == "idle" else repeat
        for rep in range(reps):
            # Interleaved: background noise spreads over all servers. A server and its
            # baseline twin alternate at each thread count (rtserve 2, rtserve@REF 2,
            # rtserve 4 ...), so the pair a before/after ratio compares ran seconds apart:
            # this VM's speed has moved 1.6x between runs an hour apart.
            for group in pair_with_twins(servers):
                s = group[0]
                if key not in s.workloads:
                    continue
                # Only where the threads run the workload's code (F's per-connection memory
                # does not depend on the pool; uvicorn's pool runs /score only).
                counts = (sweep if sweep and s.threads and key in s.sweep_workloads
                          else [s.threads])
                for threads in counts:
                    for member in group:
                        run_one(member, w, ctx, threads, f"{key} rep {rep + 1}/{reps}")
        print(render({**res, "runs": {key: res["runs"].get(key, {})}}), flush=True)

    # The CPU loop re-timed: on a VM whose host shares the core, the same loop has taken
    # 1.5x longer an hour after its calibration, which moves every server's figures.
    res["burn_ms_end"] = round(time_burn_ms(burn_iters), 3)
    print(f"# {_burn_end(res).lstrip('; ')}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"run-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"# results in {path}")
    if a.write_docs:
        write_docs(res, path)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
