"""The Listener on its own: real listening sockets on 127.0.0.1 (and a unix socket), a real
epoll, and a recording callback in place of the reader.

What is checked: one readiness event accepts exactly the connections that wait (a TCP
listener sizes its batch by the kernel's queue length, so the batch does not end in a
failing accept), the batch bound, the fallback to accepting until EAGAIN, TCP_NODELAY on
every accepted socket whether or not the kernel copies it from the listener, and the pause
at the connection cap.
"""

from __future__ import annotations

import os
import select
import socket
import tempfile
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from rtserve import listener as listener_mod
from rtserve.listener import Listener, make_listener


class CountingSocket(socket.socket):
    """A listening socket that counts accept calls, and the ones that found nothing."""

    calls = 0
    empty = 0

    def _accept(self) -> Any:  # type: ignore[override]
        self.calls += 1
        try:
            return super()._accept()  # type: ignore[misc]
        except BlockingIOError:
            self.empty += 1
            raise


class Opened:
    """Stands in for Reader.open: keeps each accepted socket, returns the open count."""

    def __init__(self) -> None:
        self.socks: list[Any] = []
        self.addrs: list[Any] = []

    def __call__(self, sock: Any, addr: Any, now: int) -> int:
        self.socks.append(sock)
        self.addrs.append(addr)
        return len(self.socks)

    def close(self) -> None:
        for s in self.socks:
            s.close()


def tcp_listener() -> CountingSocket:
    s = CountingSocket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    s.setblocking(False)
    return s


@pytest.fixture()
def ep() -> Iterator[Any]:
    e = select.epoll()
    yield e
    e.close()


def make(sock: socket.socket, ep: Any, opened: Opened, cap: int = 1000) -> Listener:
    return Listener(sock, ep, opened, cap, SimpleNamespace(accept_pauses=0), lambda at: None)


def connect(address: Any, n: int) -> list[socket.socket]:
    """n connected clients; each is in the listener's accept queue once this returns."""
    return [socket.create_connection(address) for _ in range(n)]


def cleanup(opened: Opened, clients: list[socket.socket], lst: Listener) -> None:
    """Close what a test accepted, its clients and the listener."""
    opened.close()
    for c in clients:
        c.close()
    lst.close()


def wait_readable(ep: Any, fd: int) -> None:
    assert (fd, select.EPOLLIN) in ep.poll(5), "the listener never became readable"


def test_one_event_accepts_exactly_the_waiting_connections(ep: Any) -> None:
    sock = tcp_listener()
    opened = Opened()
    lst = make(sock, ep, opened)
    clients = connect(sock.getsockname(), 5)
    try:
        wait_readable(ep, lst.fd)
        lst.on_ready(0)
        assert len(opened.socks) == 5
        assert sock.calls == 5 and sock.empty == 0  # no failing accept ended the batch
        assert all(a[0] == "127.0.0.1" for a in opened.addrs)
        assert ep.poll(0) == []  # level-triggered: nothing left to report
    finally:
        cleanup(opened, clients, lst)


def test_the_batch_is_bounded_and_the_rest_comes_next_turn(ep: Any,
                                                           monkeypatch: Any) -> None:
    monkeypatch.setattr(listener_mod, "ACCEPT_BATCH", 2)
    sock = tcp_listener()
    opened = Opened()
    lst = make(sock, ep, opened)
    clients = connect(sock.getsockname(), 3)
    try:
        wait_readable(ep, lst.fd)
        lst.on_ready(0)
        assert len(opened.socks) == 2
        wait_readable(ep, lst.fd)  # the third still waits
        lst.on_ready(0)
        assert len(opened.socks) == 3 and sock.empty == 0
    finally:
        cleanup(opened, clients, lst)


def test_no_queue_length_falls_back_to_accepting_until_eagain(ep: Any,
                                                              monkeypatch: Any) -> None:
    """A count of 0 (another process took them, or the kernel does not say) must not
    leave connections unaccepted: accept until the queue is empty."""
    monkeypatch.setattr(listener_mod, "_queued", lambda info: (0,))
    sock = tcp_listener()
    opened = Opened()
    lst = make(sock, ep, opened)
    clients = connect(sock.getsockname(), 3)
    try:
        wait_readable(ep, lst.fd)
        lst.on_ready(0)
        assert len(opened.socks) == 3
        assert sock.calls == 4 and sock.empty == 1
    finally:
        cleanup(opened, clients, lst)


def nodelay(s: Any) -> int:
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_accepted_sockets_have_nodelay_from_the_listener(ep: Any) -> None:
    sock = tcp_listener()
    opened = Opened()
    lst = make(sock, ep, opened)
    assert nodelay(sock)  # set once, on the listening socket
    clients = connect(sock.getsockname(), 3)
    try:
        wait_readable(ep, lst.fd)
        lst.on_ready(0)
        assert len(opened.socks) == 3
        assert all(nodelay(s) for s in opened.socks)
        assert lst.nodelay_each is False  # Linux copies it: no setsockopt per socket
    finally:
        cleanup(opened, clients, lst)


def test_nodelay_set_on_each_socket_when_not_inherited(ep: Any) -> None:
    """A listener whose accepted sockets come without TCP_NODELAY (as on a kernel that
    does not copy it): the first accepted socket shows it, and each gets it set."""
    sock = tcp_listener()
    opened = Opened()
    lst = make(sock, ep, opened)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # nothing to inherit
    clients = connect(sock.getsockname(), 3)
    try:
        wait_readable(ep, lst.fd)
        lst.on_ready(0)
        assert len(opened.socks) == 3
        assert lst.nodelay_each is True
        assert all(nodelay(s) for s in opened.socks)
    finally:
        cleanup(opened, clients, lst)


def test_unix_listener_accepts_until_eagain(ep: Any) -> None:
    path = os.path.join(tempfile.mkdtemp(), "l.sock")
    raw = make_listener("unix:" + path, 16)
    sock = CountingSocket(raw.family, raw.type, raw.proto, raw.detach())
    opened = Opened()
    lst = make(sock, ep, opened)
    clients = []
    try:
        for _ in range(2):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            clients.append(c)
        wait_readable(ep, lst.fd)
        lst.on_ready(0)
        assert opened.addrs == [("unix", 0), ("unix", 0)]
        assert sock.empty == 1  # no queue length for unix sockets: the old way
    finally:
        cleanup(opened, clients, lst)
        os.unlink(path)


def test_the_cap_pauses_and_a_close_below_it_resumes(ep: Any) -> None:
    sock = tcp_listener()
    opened = Opened()
    lst = make(sock, ep, opened, cap=2)
    clients = connect(sock.getsockname(), 3)
    try:
        wait_readable(ep, lst.fd)
        lst.on_ready(0)
        assert len(opened.socks) == 2 and lst.paused
        assert ep.poll(0) == []  # unregistered while paused
        lst.on_close(2)
        assert lst.paused  # still at the cap
        lst.on_close(1)
        assert not lst.paused
        wait_readable(ep, lst.fd)
        lst.on_ready(0)
        assert len(opened.socks) == 3
    finally:
        cleanup(opened, clients, lst)
