"""slot_listeners.py: the supervisor's listeners, bound and closed without any child.

Real sockets on 127.0.0.1: one SO_REUSEPORT listener per slot on the port the first one
got (the others reuse it, and a slot's new listener rejoins it), or one listener shared
by every slot; `close` leaves none open.
"""

from __future__ import annotations

import socket

import pytest

from rtserve.config import Config
from rtserve.slot_listeners import SlotListeners, reuseport_available


def listeners(procs: int, **settings) -> SlotListeners:
    return SlotListeners(Config(_env={}, bind="127.0.0.1:0", **settings), procs)


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def accepts(socks: list[socket.socket], port: int) -> bool:
    """A client connection to `port` is queued on one of `socks`."""
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        for sock in socks:
            sock.settimeout(0.5)
        got = []
        for sock in dict.fromkeys(socks):  # each distinct listener once
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            conn.close()
            got.append(sock)
        return len(got) == 1


@pytest.mark.skipif(not reuseport_available(), reason="no SO_REUSEPORT on this platform")
def test_a_listener_per_slot_on_the_port_the_first_one_got_and_a_slot_rejoins_it():
    ls = listeners(3)
    socks = ls.open()
    try:
        assert len(socks) == 3 and len({id(s) for s in socks}) == 3
        port = port_of(socks[0])
        assert port and {port_of(s) for s in socks} == {port}
        assert ls.bind == f"127.0.0.1:{port}" and ls.per_slot and ls.shared is None
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in socks)
        assert accepts(socks, port)
        socks[1].close()  # the slot left the group during a back-off; it comes back
        socks[1] = ls.rejoin(16)
        assert port_of(socks[1]) == port
    finally:
        ls.close(socks)
    assert all(s.fileno() == -1 for s in socks)


def test_a_shared_listener_is_every_slots_and_closes_once():
    ls = listeners(3, share_listener=True)
    socks = ls.open()
    try:
        assert socks[0] is socks[1] is socks[2] is ls.shared
        assert not ls.per_slot
        assert ls.bind == "127.0.0.1:0"  # children inherit the socket, not the address
        assert accepts(socks, port_of(socks[0]))
    finally:
        ls.close(socks)
    assert ls.shared is None and socks[0].fileno() == -1


def test_an_address_in_use_is_an_error_to_the_caller():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ls = SlotListeners(Config(_env={}, bind=f"127.0.0.1:{port_of(taken)}"), 2)
        with pytest.raises(OSError):
            ls.open()
