"""A connection closed in a loop turn, whose fd number a connection accepted in the same
turn takes: the closed one's other event of that turn must not reach the new one.

One epoll wait returns a batch of events keyed by fd number. If the listener's readiness
were handled in its place in the batch, a connection the turn had just closed could lend
its number to a connection accepted next, and the closed one's event later in the batch
(a reset: EPOLLHUP|EPOLLERR) would abort the new connection, which never sent a byte
wrong. The loop accepts after the batch's other events (loop.py), so a number is reused
in the next turn at the earliest, with the next wait's fresh events.

The test arranges that batch in order (epoll's ready list is first come, first served):
an inline route holds the conductor while (1) a worker finishes X's request (the
completions eventfd), (2) a new client connects and sends (the listener, deferred accept
hands it over with its bytes), (3) X's client resets (X's event). On release the
completion's send fails on X (reset), X is closed, and the accept takes X's fd number,
the lowest free one: every lower hole is filled first.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct

from rtserve import App, Request, Response
from tests.helpers import Client, Gate, server_thread, wait_for

_queued = struct.Struct("24xI").unpack  # struct tcp_info: tcpi_unacked, the accept queue


class HoldApp:
    """/gate (inline: holds the conductor), /work (holds a worker), /hello."""

    def __init__(self) -> None:
        self.app = App()
        self.conductor = Gate()
        self.worker = Gate()

        @self.app.get("/gate", inline=True)
        def gate(request: Request) -> Response:
            self.conductor.hold("gate")
            return Response.text("gate")

        @self.app.get("/work")
        def work(request: Request) -> Response:
            self.worker.hold("work")
            return Response.text("work")

        @self.app.get("/hello")
        def hello(request: Request) -> Response:
            return Response.text("hello")


def _fill_holes_below(fd: int) -> list[int]:
    """Open /dev/null until the lowest free fd number is above `fd`; returns what to close."""
    held = []
    while True:
        n = os.open(os.devnull, os.O_RDONLY)
        if n > fd:
            os.close(n)
            return held
        held.append(n)


def _reset(c: Client) -> None:
    """Close with an RST (SO_LINGER 0): the server's socket gets EPOLLHUP|EPOLLERR."""
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.f.close()  # the file object holds the fd open too
    c.sock.close()


def test_a_connection_accepted_in_the_turn_that_closed_its_fd_number_is_served() -> None:
    s = HoldApp()
    with server_thread(s.app, threads=2) as server:
        # The gate's connection is accepted and answered first: an fd epoll reported is
        # queued again at the head of its ready list until a wait finds it idle, so the
        # listener must not be the last thing reported before the hold.
        gate = Client(server.address)
        assert gate.request("GET", "/hello")[2] == b"hello"
        x = Client(server.address)
        x.send("GET", "/work")
        s.worker.wait_entered()
        x_conn = next(c for c in server.conns.values() if c.state.name == "RUNNING")
        x_fd = x_conn.fd
        gate.send("GET", "/gate")
        s.conductor.wait_entered()  # the conductor is held from here to its release
        held: list[int] = []
        try:
            # (1) X's completion: the worker posts it and writes the eventfd.
            s.worker.release.set()
            wait_for(lambda: server.pool._completions.qsize() == 1, what="X's completion")
            # (2) a new client, its request in the accept queue.
            fresh = socket.create_connection(server.address, timeout=10)
            fresh.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            lsock = server.listener.sock
            wait_for(lambda: _queued(lsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO,
                                                      28))[0] == 1,
                     what="the new connection to wait for accept")
            # (3) X's client resets: X's socket turns readable with the error.
            _reset(x)
            wait_for(lambda: select.select([x_conn.sock], [], [], 0)[0],
                     what="X's reset to arrive")
            # This process is the client too: fill the holes its closes left below X's
            # number, so the accept takes X's.
            held = _fill_holes_below(x_fd)
            s.conductor.release.set()
            assert gate.recv()[2] == b"gate"
            fresh.settimeout(10)
            data = fresh.recv(4096)
            assert data.startswith(b"HTTP/1.1 200 "), f"the new connection got {data!r}"
            assert data.endswith(b"hello")
            fresh.close()
            gate.close()
        finally:
            s.worker.release.set()
            s.conductor.release.set()
            for n in held:
                with contextlib.suppress(OSError):
                    os.close(n)
