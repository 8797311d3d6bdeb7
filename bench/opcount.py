"""Bytecodes each Python function of the server runs per request, by thread.

Callgrind (bench/callgrind_server.py) counts instructions per request but sees the
interpreter, not the Python functions it runs: most of it is `_PyEval_EvalFrameDefault`.
This runs an rtserve server in this process under `sys.settrace` with opcode events,
sends N requests from a client thread (B: one per connection; A: keep-alive), and prints
the opcodes and calls per request of every function the server ran, the conductor's and
the workers' apart. Deterministic, unlike a sampling profiler; the tracer makes the
server ~50x slower, so its timings mean nothing.

  .venv/bin/python bench/opcount.py               # B, examples.hello:app
  .venv/bin/python bench/opcount.py -w A -n 5000 --app apps.wsgi_app:app --path /hello
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
WARM = 200  # requests before counting (the head cache, the routes' estimates)
CLIENT = "opcount-client"  # the thread sending the requests: never counted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", "-w", choices=("A", "B"), default="B",
                    help="A: keep-alive; B: one request per connection")
    ap.add_argument("--requests", "-n", type=int, default=2000)
    ap.add_argument("--app", default="examples.hello:app")
    ap.add_argument("--path", default="/hello")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--port", type=int, default=8097)
    a = ap.parse_args()
    sys.path[:0] = [str(ROOT), str(BENCH)]
    from rtserve.cli import main as rtserve_main

    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    calls: collections.Counter[tuple[str, str, str]] = collections.Counter()
    counting = threading.Event()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if not counting.is_set():
            return None
        current = threading.current_thread()
        if current.name == CLIENT:
            return None  # the load, not the server
        code = frame.f_code
        thread = "conductor" if current is threading.main_thread() else "worker"
        key = (thread, Path(code.co_filename).name, code.co_name)
        calls[key] += 1
        frame.f_trace_opcodes = True

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[key] += 1
            return local
        return local

    close = b"" if a.workload == "A" else b"Connection: close\r\n"
    request = b"GET %s HTTP/1.1\r\nHost: bench\r\n%s\r\n" % (a.path.encode(), close)

    def client() -> None:
        addr = ("127.0.0.1", a.port)
        for _ in range(200):  # wait for the server
            try:
                socket.create_connection(addr, timeout=1).close()
                break
            except OSError:
                threading.Event().wait(0.05)
        keep = socket.create_connection(addr) if a.workload == "A" else None

        def one() -> None:
            if keep is not None:
                keep.sendall(request)
                keep.recv(65536)  # a small answer comes in one read
                return
            with socket.create_connection(addr) as s:
                s.sendall(request)
                while s.recv(65536):
                    pass

        for _ in range(WARM):
            one()
        counting.set()
        for _ in range(a.requests):
            one()
        counting.clear()
        os.kill(os.getpid(), signal.SIGINT)

    sys.argv = ["rtserve", a.app, "--bind", f"127.0.0.1:{a.port}", "--threads",
                str(a.threads), "--log-level", "warning"]
    sys.settrace(tracer)
    threading.settrace(tracer)
    threading.Thread(target=client, name=CLIENT, daemon=True).start()
    try:
        rtserve_main()
    except SystemExit:
        pass
    finally:
        sys.settrace(None)
        threading.settrace(None)
    n = a.requests
    by_thread: collections.Counter[str] = collections.Counter()
    for (thread, _, _), v in counts.items():
        by_thread[thread] += v
    print(f"{a.app} workload {a.workload}, {n} requests: opcodes per request "
          + ", ".join(f"{t} {v / n:.0f}" for t, v in sorted(by_thread.items()))
          + " (the conductor's loop function itself is not counted: it began before the"
          " tracer)")
    print(f"{'opcodes':>8} {'calls':>6}  thread     function")
    for (thread, file, func), v in counts.most_common(a.top):
        print(f"{v / n:8.1f} {calls[(thread, file, func)] / n:6.2f}  {thread:10s} "
              f"{file}:{func}")


if __name__ == "__main__":
    main()
