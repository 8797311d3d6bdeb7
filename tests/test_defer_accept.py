"""The deferred accept (TCP_DEFER_ACCEPT, `--defer-accept`) and the read at accept.

Real servers on 127.0.0.1. What is checked: the kernel holds a connection that has sent
nothing back from the server (it is not open there while another client is served), and
hands it over with its first bytes, which are read at accept and answered; one that never
sends is still handed over after the defer time and closed by the header timeout; a head
that came in part is finished by later reads (the header timer then applies); a client
that leaves while its request waits for a worker (a reset) is still noticed at once; pipelined
requests that came with the connection are all answered in order; `--defer-accept 0`, a
unix socket and TLS take the old way (no read at accept).
"""

from __future__ import annotations

import socket
import struct
import tempfile
import threading
from pathlib import Path

from rtserve import Request, Response
from tests.conftest import make_app
from tests.helpers import (
    Gate,
    connect,
    read_response,
    read_response_file,
    recv_until_closed,
    server_thread,
    wait_for,
)

GET = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"


def deferred(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)


def test_on_by_default_and_a_silent_connection_is_not_accepted_until_it_sends() -> None:
    with server_thread(make_app()) as srv:
        assert srv.listener.sock is not None and deferred(srv.listener.sock) > 0
        assert srv.reader.read_first
        silent = connect(srv.address)
        # Another client is served meanwhile: the loop ran its accept turns, and the
        # silent connection is not among the open ones (the kernel holds it).
        other = connect(srv.address)
        other.sendall(GET)
        status, _, body = read_response(other)
        assert status == 200 and body == b"Hello, world!\n"
        assert srv.open_connections == 1
        assert srv.metrics.connections_accepted == 1
        # Its first bytes bring it in: read at accept, answered.
        silent.sendall(GET)
        status, _, body = read_response(silent)
        assert status == 200 and body == b"Hello, world!\n"
        assert srv.metrics.connections_accepted == 2
        silent.close()
        other.close()


def test_a_connection_that_never_sends_is_closed_by_the_header_timeout() -> None:
    with server_thread(make_app(), header_timeout=0.3, defer_accept=1) as srv:
        s = connect(srv.address, timeout=20)
        assert recv_until_closed(s) == b""  # handed over after ~1 s, then timed out
        s.close()
        wait_for(lambda: srv.metrics.connections_accepted == 1, 5, "the accept")
        wait_for(lambda: srv.open_connections == 0, 5, "the close")


def test_a_head_that_came_in_part_is_finished_by_later_reads() -> None:
    with server_thread(make_app()) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /hello HTTP/1.1\r\n")
        wait_for(lambda: srv.open_connections == 1, 5, "the accept of the partial head")
        s.sendall(b"Host: t\r\n\r\n")
        status, _, body = read_response(s)
        assert status == 200 and body == b"Hello, world!\n"
        s.close()


def test_a_partial_head_read_at_accept_gets_the_header_timeout() -> None:
    with server_thread(make_app(), header_timeout=0.3) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /hello HTTP/1.1\r\nHost")
        status, _, _ = read_response(s)
        assert status == 408
        assert recv_until_closed(s) == b""
        s.close()


def test_pipelined_requests_that_came_with_the_connection_are_answered_in_order() -> None:
    with server_thread(make_app()) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        f = s.makefile("rb")
        assert [read_response_file(f)[0] for _ in range(3)] == [200, 404, 200]
        assert f.read() == b""
        s.close()


def test_a_client_that_leaves_while_its_request_waits_is_noticed(gate: Gate) -> None:
    app = make_app()

    @app.get("/held")
    def held(request: Request) -> Response:
        gate.hold()
        return Response.text("done\n")

    with server_thread(app, threads=1) as srv:
        first = connect(srv.address)
        first.sendall(b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n")
        gate.wait_entered()
        waiting = connect(srv.address)
        waiting.sendall(GET)
        wait_for(lambda: srv.admission.queue_depth == 1, 5, "the second request to queue")
        # Reset (not FIN, which only half-closes): read at accept and queued, the
        # connection is watched all the same, so the reset takes its request out.
        waiting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        waiting.close()
        wait_for(lambda: srv.admission.queue_depth == 0, 5, "the queued request to go")
        wait_for(lambda: srv.open_connections == 1, 5, "its connection to close")
        gate.release.set()
        assert read_response(first)[0] == 200
        first.close()


def test_off_reads_on_the_next_loop_turn() -> None:
    with server_thread(make_app(), defer_accept=0) as srv:
        assert srv.listener.sock is not None and deferred(srv.listener.sock) == 0
        assert not srv.reader.read_first
        s = connect(srv.address)
        wait_for(lambda: srv.open_connections == 1, 5, "the accept of a silent connection")
        s.sendall(GET)
        assert read_response(s)[0] == 200
        s.close()


def test_a_unix_socket_is_not_deferred() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "s.sock")
        with server_thread(make_app(), bind=f"unix:{path}") as srv:
            assert not srv.listener.deferred and not srv.reader.read_first
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            s.sendall(GET)
            assert read_response(s)[0] == 200
            s.close()


def test_many_new_connections_at_once_are_all_answered() -> None:
    with server_thread(make_app(), threads=4) as srv:
        socks = [connect(srv.address) for _ in range(64)]
        for s in socks:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        results: list[bytes] = []
        lock = threading.Lock()

        def drain(s: socket.socket) -> None:
            data = recv_until_closed(s)
            with lock:
                results.append(data)

        threads = [threading.Thread(target=drain, args=(s,)) for s in socks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(results) == 64
        assert all(r.startswith(b"HTTP/1.1 200 ") and r.endswith(b"Hello, world!\n")
                   for r in results)
        for s in socks:
            s.close()
        wait_for(lambda: srv.open_connections == 0, 5, "every connection to close")
