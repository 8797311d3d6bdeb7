"""Closing a client socket and epoll (writer.Writer.close unregisters, then closes): a socket
a handler's forked child still holds keeps its open file alive, and with it an epoll
registration the close alone would not remove.

When its client then closes, epoll would report it readable on every turn (level-triggered,
and nobody reads it), a busy loop for as long as the child lives, and under an fd number a
new connection may reuse. The server runs as a subprocess (test_resource_bounds' ServerProc:
its CPU time is read from /proc), serving the small `app` below.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from rtserve import App, Request, Response
from tests.helpers import read_response
from tests.test_resource_bounds import server

app = App()


@app.get("/hello")
def hello(request: Request) -> Response:
    return Response.text("hello\n")


@app.get("/fork")
def fork(request: Request) -> Response:
    """Fork a child that holds copies of every open socket for `hold` seconds, then exits."""
    hold = float(request.query_param("hold", "5"))
    pid = os.fork()
    if pid == 0:  # the child: only this thread exists here; hold the fds, touch nothing
        try:
            time.sleep(hold)
        finally:
            os._exit(0)
    return Response.text(f"{pid}\n")


def get(sock: socket.socket, path: str, close: bool = False) -> tuple[int, bytes]:
    extra = "Connection: close\r\n" if close else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode())
    status, _, body = read_response(sock)
    return status, body


def test_a_socket_a_forked_child_holds_leaves_epoll_when_closed() -> None:
    """A connection open while a handler forked is closed by the server, then by its client
    (its FIN reaches the child's copy): the server stays idle and keeps serving, on the
    same fd number too."""
    with server("--threads", "2", app="tests.test_close_after_fork:app") as srv:
        addr = srv.addr
        a = socket.create_connection(addr, timeout=10)
        status, body = get(a, "/fork?hold=6")
        assert status == 200
        child = int(body)
        try:
            assert get(a, "/hello", close=True) == (200, b"hello\n")  # the server closes it
            # No EOF comes back: the child's copy keeps the server's socket open. The client's
            # FIN goes to that copy, which epoll would report readable on every turn.
            a.close()
            os.kill(child, 0)  # still there
            cpu0, t0 = srv.cpu_seconds(), time.monotonic()
            time.sleep(1.5)
            share = (srv.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            assert share < 0.25, f"server CPU {share:.0%} while idle: a stale registration spins"
            for _ in range(3):  # new connections, one of them on the reused fd number
                b = socket.create_connection(addr, timeout=10)
                assert get(b, "/hello") == (200, b"hello\n")
                b.close()
        finally:
            os.kill(child, signal.SIGKILL)  # no orphan holding the port after the test
