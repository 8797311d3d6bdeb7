"""The conductor's timers: slow heads and bodies get 408, idle keep-alive and stalled
writes are closed (a slow reader that keeps reading is not), and the connection cap
pauses accepting."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import requests

from rtserve.connection import T_WRITE
from rtserve.writer import Writer
from tests.conftest import make_app
from tests.helpers import (
    connect,
    read_response_file,
    recv_until_closed,
    server_thread,
    wait_for,
)

BIG = 256 << 10  # the /big body the slow readers ask for


def test_slow_header_gets_408_and_close():
    with server_thread(make_app(), header_timeout=0.3) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /hello HTTP/1.1\r\nHost:")
        data = recv_until_closed(s)
        assert data.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in data
        assert srv.metrics.timeouts["header"] == 1
        s.close()


def test_connection_that_sends_nothing_is_closed_quietly():
    with server_thread(make_app(), header_timeout=0.3) as srv:
        s = connect(srv.address)
        assert recv_until_closed(s) == b""
        s.close()


def test_slow_body_gets_408():
    with server_thread(make_app(), body_timeout=0.3) as srv:
        s = connect(srv.address)
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        data = recv_until_closed(s)
        assert data.startswith(b"HTTP/1.1 408 ")
        assert srv.metrics.timeouts["body"] == 1
        s.close()


def test_idle_keepalive_connection_closed():
    with server_thread(make_app(), keepalive_timeout=0.3) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        f = s.makefile("rb")
        assert read_response_file(f)[0] == 200
        assert f.read() == b""  # closed after the idle timeout, nothing more sent
        s.close()


def test_stalled_reader_closed_at_write_timeout():
    with server_thread(make_app(), write_timeout=0.3) as srv:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(srv.address)
        s.sendall(b"GET /big?size=16777216 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(10)  # the response started; now never read again
        for _ in range(100):
            if srv.metrics.timeouts.get("write"):
                break
            srv.stopped.wait(0.05)
        assert srv.metrics.timeouts.get("write") == 1
        s.close()
        r = requests.get(f"http://{srv.address[0]}:{srv.address[1]}/hello", timeout=5)
        assert r.status_code == 200


def _small_send_buffer_listener() -> socket.socket:
    """A listener whose accepted sockets keep a fixed send buffer (64 KiB asked, the kernel
    doubles it): how long EPOLLOUT stays away then depends on the reader's pace alone, not
    on how far the kernel's autotuning grew the buffer."""
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    return lst


def _count_write_timers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every write-stall timer that fires (the loop looks up writer.on_timer each
    time timers are due, so wrapping the method on the class sees them all, in the
    compiled build too, whose instances refuse a replaced method)."""
    fired: list[int] = []
    on_timer = Writer.on_timer

    def counting(self: Writer, conn: Any, kind: int, now: int) -> None:
        if kind == T_WRITE:
            fired.append(now)
        on_timer(self, conn, kind, now)

    monkeypatch.setattr(Writer, "on_timer", counting)
    return fired


def _slow_client(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    s.connect(addr)
    s.settimeout(10)
    s.sendall(b"GET /big?size=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % BIG)
    return s


def test_slow_reader_that_keeps_reading_gets_the_whole_response(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """4 KiB every 40 ms (~100 KB/s, about 3 s for 256 KiB): the send buffer drains so
    slowly that EPOLLOUT stays away for longer than the 0.3 s write timeout, but the
    kernel keeps delivering, and that counts as progress."""
    with server_thread(make_app(), sock=_small_send_buffer_listener(), write_timeout=0.3) as srv:
        fired = _count_write_timers(monkeypatch)
        s = _slow_client(srv.address)
        data = bytearray()
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
            time.sleep(0.04)  # the client's pace, not a wait for the server
        s.close()
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert body == bytes(range(256)) * (BIG // 256)
        # The scenario really happened: the timer fired mid-response (it would have cut
        # the client off before the change) and was re-armed instead.
        assert fired, "the write timer never fired: the reader was not slow enough to test"
        assert srv.metrics.timeouts.get("write", 0) == 0


def test_reader_that_stops_reading_is_still_cut_off():
    """The same slow reader takes 64 KiB, then nothing: once the kernel has nothing more
    to deliver, the next write-timer expiry closes the connection."""
    with server_thread(make_app(), sock=_small_send_buffer_listener(), write_timeout=0.3) as srv:
        s = _slow_client(srv.address)
        got = 0
        while got < 64 << 10:
            chunk = s.recv(4096)
            assert chunk
            got += len(chunk)
            time.sleep(0.04)
        stopped = time.monotonic()
        wait_for(lambda: srv.metrics.timeouts.get("write", 0) == 1, timeout=10,
                 what="the write timeout")
        assert time.monotonic() - stopped >= 0.3  # not before a whole write timeout
        rest = recv_until_closed(s)  # what the kernel held, then the close
        s.close()
        assert got + len(rest) < BIG  # cut off: the response never completed
        r = requests.get(f"http://{srv.address[0]}:{srv.address[1]}/hello", timeout=5)
        assert r.status_code == 200


def test_max_connections_pauses_accepting_until_a_slot_frees():
    with server_thread(make_app(), max_connections=2, keepalive_timeout=30) as srv:
        a, b = connect(srv.address), connect(srv.address)
        for s in (a, b):
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response_file(s.makefile("rb"))[0] == 200
        c = connect(srv.address)  # sits in the kernel's accept queue
        c.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        c.settimeout(0.3)
        try:
            early = c.recv(100)
        except TimeoutError:
            early = b""
        assert early == b""  # not served while the cap is reached
        assert srv.metrics.accept_pauses >= 1
        a.close()  # a slot frees: c is accepted and answered
        c.settimeout(10)
        assert read_response_file(c.makefile("rb"))[0] == 200
        b.close()
        c.close()
