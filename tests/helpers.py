"""Test helpers: a real server on 127.0.0.1 in a background thread, and raw-socket clients."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from rtserve.config import Config
from rtserve.server import Server, as_dispatcher


@contextlib.contextmanager
def running_server(app: Any, **settings: Any) -> Iterator[tuple[str, int]]:
    """Serve `app` on an ephemeral 127.0.0.1 port; yields (host, port); drains on exit."""
    with server_thread(app, **settings) as server:
        yield server.address[0], server.address[1]


@contextlib.contextmanager
def server_thread(app: Any, **settings: Any) -> Iterator[Server]:
    """Like running_server, but yields the Server (for metrics and internals)."""
    settings.setdefault("bind", "127.0.0.1:0")
    settings.setdefault("graceful_timeout", 5.0)
    cfg = Config(_env={}, **settings)
    server = Server(as_dispatcher(app, cfg), cfg)
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
