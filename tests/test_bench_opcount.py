"""bench/opcount.py, the per-function bytecode count, against a real server on 127.0.0.1.

The tool's claim is a count of what each Python function of the server runs per request,
conductor and workers apart. These tests hold it to that for both workloads: the counted
functions are the server's own on the thread that runs them, and B (a connection per
request) shows the accept that A (keep-alive) never runs. Skipped on the compiled build,
whose hot modules are C code that no tracer sees.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import rtserve.reader

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    (rtserve.reader.__file__ or "").endswith(".so"),
    reason="the compiled build's hot modules are C: no bytecode to count")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def opcount(*args: str) -> dict[tuple[str, str], float]:
    got = subprocess.run([sys.executable, str(ROOT / "bench" / "opcount.py"), "-n", "60",
                          "--port", str(free_port()), *args],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert got.returncode == 0, got.stderr[-2000:]
    rows = {}
    for line in got.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)\s+([\d.]+)\s+(conductor|worker)\s+(\S+)$", line)
        if m:
            rows[(m[3], m[4])] = float(m[1])
    assert rows, got.stdout
    return rows


def test_one_request_per_connection_counts_the_accept_on_the_conductor():
    rows = opcount("-w", "B")
    assert rows[("conductor", "listener.py:on_ready")] > 0
    assert rows[("conductor", "reader.py:open")] > 0
    assert rows[("worker", "framing.py:serialize")] > 0
    assert ("conductor", "framing.py:serialize") not in rows  # a worker's work
    assert not any(func.startswith(("socket.py:", "idna.py:")) for _, func in rows)  # client


def test_keep_alive_runs_no_accept_per_request():
    rows = opcount("-w", "A")
    assert rows[("conductor", "reader.py:received")] > 0
    assert rows.get(("conductor", "listener.py:on_ready"), 0.0) == 0.0
