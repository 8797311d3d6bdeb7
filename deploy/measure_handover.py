"""Measure what docs/deploy.md states about handing a port over between processes.

1. `naive`: what a process that closes its own SO_REUSEPORT listener does to connections
   already queued on it (the kernel resets them), the reason the supervisor owns the
   listeners.
2. `reload` / `recycle`: rtserve --processes 2 under C client threads (sequential requests,
   one new connection each): R rolling restarts (SIGHUP), or --max-requests recycling;
   counts failed requests, in each listener mode.

Run from the repository root: `.venv/bin/python deploy/measure_handover.py`. Loopback
only, bounded (a few thousand requests), every process killed by pid at the end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def naive(n: int = 64) -> tuple[int, int]:
    """Two SO_REUSEPORT listeners; connect n clients; close one listener unaccepted."""
    a = socket.socket()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    a.bind(("127.0.0.1", 0))
    a.listen(1024)
    port = a.getsockname()[1]
    b = socket.socket()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    b.bind(("127.0.0.1", port))
    b.listen(1024)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    b.setblocking(False)
    accepted = []
    while True:
        try:
            accepted.append(b.accept()[0])
        except BlockingIOError:
            break
    a.close()  # the "draining process" closes its listener with connections queued
    resets = 0
    for c in clients:
        c.settimeout(0.5)
        try:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            if c.recv(1) == b"":
                resets += 1
        except (ConnectionResetError, BrokenPipeError):
            resets += 1
        except TimeoutError:
            pass  # queued on b, never answered here: alive
    for s in clients + accepted:
        s.close()
    b.close()
    return n - len(accepted), resets


def rtserve_under_traffic(extra: list[str], reloads: int, clients: int,
                          seconds: float) -> tuple[int, int, int]:
    """(requests ok, requests failed, distinct pids) while reloading `reloads` times."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTSERVE_")}
    sup = subprocess.Popen(
        [sys.executable, "-m", "rtserve", "tests.apps.pidapp:app", "--bind", "127.0.0.1:0",
         "--processes", "2", *extra], env=env, stderr=subprocess.PIPE, text=True,
        stdout=subprocess.DEVNULL,
    )
    lines: list[str] = []
    cond = threading.Condition()

    def read() -> None:
        for line in sup.stderr:
            with cond:
                lines.append(line)
                cond.notify_all()

    threading.Thread(target=read, daemon=True).start()

    def wait(pattern: str, start: int = 0) -> re.Match:
        rx = re.compile(pattern)
        with cond:
            while True:
                for line in lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                if not cond.wait(30):
                    raise RuntimeError(pattern)

    try:
        port = int(wait(r"supervisor listening on 127\.0\.0\.1:(\d+)").group(1))
        wait(r"all 2 processes ready")
        ok = [0]
        failed: list[str] = []
        pids: set[int] = set()
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        data = b""
                        while chunk := s.recv(4096):
                            data += chunk
                    if not data.startswith(b"HTTP/1.1 200"):
                        failed.append(data[:40].decode("latin-1"))
                    else:
                        ok[0] += 1
                        pids.add(int(re.search(rb"X-Pid: (\d+)", data).group(1)))
                except OSError as exc:
                    failed.append(repr(exc))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        t_end = time.monotonic() + seconds
        for _ in range(reloads):
            with cond:
                mark = len(lines)
            sup.send_signal(signal.SIGHUP)
            wait(r"reload complete", mark)
        while time.monotonic() < t_end:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(20)
        return ok[0], len(failed), len(pids)
    finally:
        with cond:
            children = [int(p) for p in re.findall(r"started process (\d+)", "".join(lines))]
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sup.kill()
        sup.wait()


def main() -> None:
    queued, resets = naive()
    print(f"naive: {queued} connections queued on a closed SO_REUSEPORT listener, "
          f"{resets} reset")
    for mode, extra in (("reuseport", []), ("shared", ["--share-listener"])):
        ok, failed, pids = rtserve_under_traffic(extra, reloads=10, clients=4, seconds=1)
        print(f"reload {mode}: 10 SIGHUPs, 4 clients: {ok} ok, {failed} failed, {pids} pids")
        ok, failed, pids = rtserve_under_traffic(
            [*extra, "--max-requests", "100", "--max-requests-jitter", "20"],
            reloads=0, clients=4, seconds=8,
        )
        print(f"recycle {mode}: --max-requests 100, 4 clients, 8 s: {ok} ok, {failed} failed, "
              f"{pids} pids")


if __name__ == "__main__":
    main()
