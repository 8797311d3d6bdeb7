"""Test helpers: a real server on 127.0.0.1 in a background thread, raw-socket clients, a
keep-alive `Client`, the handler `Gate` and `wait_for` (the `gate` fixture is conftest's)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from rtserve.config import Config
from rtserve.server import Server, as_dispatcher


@contextlib.contextmanager
def running_server(app: Any, **settings: Any) -> Iterator[tuple[str, int]]:
    """Serve `app` on an ephemeral 127.0.0.1 port; yields (host, port); drains on exit."""
    with server_thread(app, **settings) as server:
        yield server.address[0], server.address[1]


@contextlib.contextmanager
def server_thread(app: Any, sock: socket.socket | None = None,
                  **settings: Any) -> Iterator[Server]:
    """Like running_server, but yields the Server (for metrics and internals).

    `sock` is a listening socket to serve on instead of binding one (to set socket
    options that accepted connections inherit, such as SO_SNDBUF).
    """
    settings.setdefault("bind", "127.0.0.1:0")
    settings.setdefault("graceful_timeout", 5.0)
    cfg = Config(_env={}, **settings)
    server = Server(as_dispatcher(app, cfg), cfg, sock=sock)
    t = threading.Thread(target=server.serve, name="rtserve-conductor", daemon=True)
    t.start()
    if not server.started.wait(10) or server.address is None:
        raise RuntimeError("server did not start")
    try:
        yield server
    finally:
        server.stop()
        t.join(15)
        if t.is_alive():
            server.stop_now()
            t.join(5)


REVIEW = {"decision": "review"}  # the fallback body the deadline tests use


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "the condition",
             interval: float = 0.002) -> None:
    """Poll `cond()` until it is true (state changed on another thread or process).

    Not a timing assumption: `timeout` only bounds a hang. `interval` is the pause between
    polls; use a longer one when a poll is costly (/proc, an HTTP scrape).
    """
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Gate:
    """Holds handlers until the test releases them; counts how many entered (and which).

    A handler calls `hold(tag)`; the test calls `wait_entered(n)` to know n handlers are
    parked, then `release.set()`. The `gate` fixture (conftest.py) releases it at teardown
    so a failed test never leaves a worker blocked.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def hold(self, tag: str = "", timeout: float = 10.0) -> None:
        with self.lock:
            self.calls.append(tag)
        self.entered.release()
        self.release.wait(timeout)

    def wait_entered(self, n: int = 1, timeout: float = 10.0) -> None:
        for _ in range(n):
            assert self.entered.acquire(timeout=timeout), "handler never started"


def wait_completions(pool: Any, n: int, timeout: float = 10.0, *, finals: bool = False
                     ) -> list:
    """Block on a WorkerPool's eventfd like the conductor does until `n` completions
    arrived (`finals`: until `n` final ones, the others with them, in order)."""
    ep = select.epoll()
    ep.register(pool.wakeup_fd, select.EPOLLIN)
    got: list = []
    try:
        while (sum(c[3] for c in got) if finals else len(got)) < n:
            if not ep.poll(timeout):
                raise TimeoutError(f"only {len(got)} completions, expected {n}")
            got.extend(pool.take_completions())
    finally:
        ep.close()
    return got


def connect(addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(addr, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(sock: socket.socket, head_only: bool = False) -> tuple[int, dict, bytes]:
    """Read one response (Content-Length, chunked or close-delimited) from a raw socket."""
    f = sock.makefile("rb")
    try:
        return read_response_file(f, head_only)
    finally:
        f.detach() if hasattr(f, "detach") else None


def read_response_file(f: Any, head_only: bool = False) -> tuple[int, dict, bytes]:
    line = f.readline()
    if not line:
        raise ConnectionError("connection closed before a response")
    parts = line.split(b" ", 2)
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        h = f.readline()
        if h in (b"\r\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        key = name.strip().lower()
        headers[key] = (headers[key] + ", " if key in headers else "") + value.strip()
    if head_only or status in (204, 304) or 100 <= status < 200:
        return status, headers, b""
    if "content-length" in headers:
        body = f.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size_line = f.readline()
            if not size_line:
                raise ConnectionError("chunked body truncated")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b""):
                    pass
                break
            chunks.append(f.read(size))
            f.readline()
        body = b"".join(chunks)
    else:
        body = f.read()
    return status, headers, body


def scrape_metrics(addr: tuple[str, int]) -> dict[str, float]:
    """GET /metrics on a fresh connection, as an operator would: {sample with labels: value},
    e.g. `rtserve_timeouts_total{kind="header"}`."""
    s = connect(addr)
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, _, body = read_response(s)
    finally:
        s.close()
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def recv_until_closed(sock: socket.socket, limit: int = 1 << 24) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


class Client:
    """One keep-alive connection; keeps its read buffer, so no byte is lost between calls."""

    def __init__(self, addr: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = connect(addr, timeout)
        self.timeout = timeout
        self.f = self.sock.makefile("rb")

    def send(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> None:
        """Write one request (Host and Content-Length added)."""
        lines = [f"{method} {path} HTTP/1.1", "Host: test"]
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        lines += [f"{k}: {v}" for k, v in items]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def recv(self, head_only: bool = False) -> tuple[int, dict, bytes]:
        """Read one response."""
        return read_response_file(self.f, head_only)

    def request(self, method: str, path: str, headers: Any = None, body: bytes = b"",
                ) -> tuple[int, dict, bytes]:
        self.send(method, path, headers, body)
        return self.recv(head_only=method == "HEAD")

    def pending(self, wait: float = 0.3) -> bytes:
        """Bytes that arrive within `wait` s (b"" if none or EOF): unexpected extra data."""
        self.sock.settimeout(wait)
        try:
            return self.f.peek(1)
        except TimeoutError:
            return b""
        finally:
            self.sock.settimeout(self.timeout)

    def close(self) -> None:
        self.f.close()
        self.sock.close()
