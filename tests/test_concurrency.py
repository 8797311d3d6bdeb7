"""Many clients, slow handlers, vanished clients: nobody waits for or hears another."""

from __future__ import annotations

import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import requests

from rtserve import App, Request, Response
from tests.conftest import make_app
from tests.helpers import Gate, connect, read_response_file, recv_until_closed, server_thread


def test_a_thousand_concurrent_connections_all_answered():
    with server_thread(make_app(), threads=8) as srv:
        addr = srv.address
        socks = []
        for _ in range(1000):
            s = socket.create_connection(addr, timeout=30)
            socks.append(s)
        for s in socks:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        bodies = [recv_until_closed(s) for s in socks]
        for s in socks:
            s.close()
        bad = [b for b in bodies if not b.startswith(b"HTTP/1.1 200 OK")]
        assert not bad, (len(bad), bad[:3], srv.metrics.render()[-3000:])
        assert all(b.endswith(b"Hello, world!\n") for b in bodies)
        assert srv.metrics.connections_accepted >= 1000


def test_a_thousand_concurrent_curls():
    """The original design's test: many independent curl processes at once (bounded)."""
    import shutil
    import subprocess

    curl = shutil.which("curl")
    assert curl, "curl is installed by the Makefile"
    with server_thread(make_app(), threads=8) as srv:
        url = f"http://{srv.address[0]}:{srv.address[1]}/hello"

        def one(_: int) -> bytes:
            return subprocess.run(
                [curl, "-s", "--max-time", "60", url], capture_output=True, timeout=90
            ).stdout

        with ThreadPoolExecutor(max_workers=100) as ex:
            outs = list(ex.map(one, range(1000)))
        assert outs.count(b"Hello, world!\n") == 1000


def test_hello_answered_while_slow_requests_occupy_workers(gate: Gate):
    app = make_app()

    @app.get("/held")
    def held(request: Request) -> Response:
        gate.hold()
        return Response.text("slow done\n")

    with server_thread(app, threads=12) as srv:
        addr = srv.address
        slow = []
        for _ in range(8):
            s = connect(addr)
            s.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            slow.append(s)
        for _ in range(8):
            gate.wait_entered()  # all 8 workers now busy on /held
        order: list[str] = []
        lock = threading.Lock()

        def read_slow(s: socket.socket) -> None:
            read_response_file(s.makefile("rb"))
            with lock:
                order.append("slow")

        readers = [threading.Thread(target=read_slow, args=(s,)) for s in slow]
        for t in readers:
            t.start()
        r = requests.get(f"http://{addr[0]}:{addr[1]}/hello", timeout=10)
        with lock:
            order.append("fast")
        gate.release.set()
        for t in readers:
            t.join(10)
        assert r.status_code == 200
        assert order[0] == "fast" and order.count("slow") == 8
        for s in slow:
            s.close()


def test_client_gone_while_in_flight_result_dropped_and_never_misdelivered(gate: Gate):
    app = make_app()

    @app.get("/secret")
    def secret(request: Request) -> Response:
        gate.hold()
        return Response.text("SECRET-FOR-FIRST-CLIENT\n")

    with server_thread(app, threads=4) as srv:
        addr = srv.address
        a = connect(addr)
        a.sendall(b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n")
        gate.wait_entered()
        # Reset (not FIN): the server sees the client vanish while the handler runs.
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a.close()
        # New clients, likely reusing the freed fd number, send their own requests.
        clients = [connect(addr) for _ in range(5)]
        for c in clients:
            c.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        files = [c.makefile("rb") for c in clients]
        firsts = [read_response_file(f) for f in files]
        gate.release.set()
        # The late result arrives now; it must be dropped, and counted.
        deadline = threading.Event()
        for _ in range(200):
            if srv.metrics.late_dropped >= 1:
                break
            deadline.wait(0.05)
        assert srv.metrics.late_dropped == 1
        assert srv.metrics.client_aborts >= 1
        for c in clients:
            c.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = [f.read() for f in files]
        for (status, _, body), tail in zip(firsts, rest, strict=True):
            assert status == 200 and body == b"Hello, world!\n"
            assert b"SECRET" not in tail
        for c in clients:
            c.close()


def test_client_closing_mid_request_does_not_disturb_others(addr):
    s = connect(addr)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-part")
    s.close()
    s = connect(addr)
    s.sendall(b"GET /hel")
    s.close()
    assert requests.get(f"http://{addr[0]}:{addr[1]}/hello", timeout=5).status_code == 200


def test_many_pipelined_requests_with_bounded_readahead():
    app = App()

    @app.get("/n")
    def n(request: Request) -> Response:
        return Response.text(request.query_param("i", ""))

    with server_thread(app, threads=2, pipeline_readahead=4096) as srv:
        s = connect(srv.address)
        reqs = b"".join(b"GET /n?i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(2000))
        sender = threading.Thread(target=s.sendall, args=(reqs,))
        sender.start()
        f = s.makefile("rb")
        got = [read_response_file(f)[2] for _ in range(2000)]
        sender.join(10)
        assert got == [b"%d" % i for i in range(2000)]
        s.close()
