"""The conductor's timers: slow heads and bodies get 408, idle keep-alive and stalled
writes are closed, and the connection cap pauses accepting."""

from __future__ import annotations

import socket

import requests

from tests.conftest import make_app
from tests.helpers import connect, read_response_file, recv_until_closed, server_thread


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
