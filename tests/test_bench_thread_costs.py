"""bench/thread_costs.py's counting: a real process's threads read from /proc, each cost
put on the thread that spent it, and a real `strace -c` table read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.system_tools import require

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import thread_costs  # noqa: E402

# A process whose main thread waits on stdin while a second thread spends ~0.3 s of CPU
# and sleeps 5 times when told to: the costs must land on the workers, not on the main
# thread.
_CHILD = r"""
import sys, threading, time
go, done, leave = threading.Event(), threading.Event(), threading.Event()
def burn():
    go.wait()
    end = time.thread_time() + 0.3
    while time.thread_time() < end:
        pass
    for _ in range(5):
        time.sleep(0.001)  # each a voluntary context switch, before "done"
    done.set()
    leave.wait()  # alive for the second snapshot: an ended thread leaves /proc
threading.Thread(target=burn, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
go.set()
done.wait()
print("done", flush=True)
sys.stdin.readline()
"""


def test_a_workers_cpu_is_counted_on_the_workers_not_on_the_conductor() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        before = thread_costs.snapshot(child.pid)
        assert child.pid in before and len(before) == 2
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        after = thread_costs.snapshot(child.pid)
        costs = thread_costs.per_request(child.pid, before, after, requests=10)
        # 0.3 s of CPU over 10 "requests" is 30,000 us each; clock ticks are 10 ms.
        assert costs["workers"]["cpu_us"] >= 20_000
        assert costs["conductor"]["cpu_us"] < costs["workers"]["cpu_us"] / 5
        assert costs["workers"]["voluntary"] >= 0.5  # its 5 sleeps over 10 requests
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(10)


def test_a_thread_born_between_the_snapshots_counts_from_zero() -> None:
    before = thread_costs.snapshot(os.getpid())
    after = {**before, 99_999_999: thread_costs.ThreadTimes(5, 5, 3, 1)}
    costs = thread_costs.per_request(os.getpid(), before, after, requests=1)
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    assert costs["workers"]["cpu_us"] >= 10 * tick_us - 1  # the new thread's 10 ticks
    assert costs["workers"]["voluntary"] >= 3


def test_a_real_strace_table_is_read_back_by_call_name(tmp_path: Path) -> None:
    strace = require("strace", "strace")  # installed with apt-get, or skipped with why
    out = tmp_path / "strace.txt"
    subprocess.run([strace, "-c", "-o", str(out), sys.executable, "-c",
                    "import os\nfor _ in range(137): os.getppid()"], check=True)
    calls = thread_costs.parse_strace_summary(out.read_text())
    assert calls["getppid"] == 137
    assert "total" not in calls and all(n > 0 for n in calls.values())
