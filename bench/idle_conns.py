"""Workload F client: hold N established, idle keep-alive connections to a server.

Opens N sockets (non-blocking connects, a bounded number in flight so the server's accept
backlog never overflows), sends one ``GET /hello`` on each and reads its answer, so every
connection is a real keep-alive connection the server has parsed a request on (not a
half-open socket still in the accept queue). Then it prints ``READY <json>`` and waits for
a line on stdin: the driver measures the server's RSS meanwhile. After that line it checks
how many connections the server still holds open, prints ``DONE <json>`` and exits.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import select
import socket
import sys
import time


def establish(host: str, port: int, n: int, batch: int, timeout: float) -> dict:
    """Open ``n`` connections with one answered request each; returns them and counts."""
    req = f"GET /hello HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    state: dict[int, int] = {}  # 0 connecting, 1 request sent, 2 answered
    bufs: dict[int, bytes] = {}
    done: list[socket.socket] = []
    failed = 0
    opened = 0
    deadline = time.monotonic() + timeout
    while (opened < n or socks) and time.monotonic() < deadline:
        while opened < n and len(socks) < batch:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((host, port))
            opened += 1
            if err not in (0, errno.EINPROGRESS):
                s.close()
                failed += 1
                continue
            socks[s.fileno()] = s
            state[s.fileno()] = 0
            ep.register(s.fileno(), select.EPOLLOUT)
        for fd, ev in ep.poll(0.5):
            s = socks[fd]
            if state[fd] == 0:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or ev & select.EPOLLERR:
                    ep.unregister(fd)
                    del socks[fd], state[fd]
                    s.close()
                    failed += 1
                    continue
                s.send(req)
                state[fd] = 1
                bufs[fd] = b""
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                del socks[fd], state[fd]
                s.close()
                failed += 1
                continue
            bufs[fd] += data
            b = bufs[fd]
            end = b.find(b"\r\n\r\n")
            if end >= 0 and b.endswith(b"Hello, world!"):
                ep.unregister(fd)
                del socks[fd], state[fd], bufs[fd]
                done.append(s)
    for s in socks.values():
        s.close()
        failed += 1
    ep.close()
    return {"sockets": done, "established": len(done), "failed": failed}


def still_open(socks: list[socket.socket]) -> int:
    """How many connections the server has not closed (no EOF, no reset)."""
    alive = 0
    for s in socks:
        try:
            data = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            alive += 1
            continue
        except OSError:
            continue
        if data:
            alive += 1
    return alive


def main(argv: list[str] | None = None) -> int:
    """CLI entry, driven by bench/run.py over stdin/stdout."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("--batch", type=int, default=256, help="connects in flight at once")
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    t0 = time.monotonic()
    res = establish(a.host, a.port, a.n, a.batch, a.timeout)
    socks = res.pop("sockets")
    res["seconds"] = round(time.monotonic() - t0, 3)
    print("READY " + json.dumps(res), flush=True)
    sys.stdin.readline()
    print("DONE " + json.dumps({"alive": still_open(socks)}), flush=True)
    for s in socks:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
