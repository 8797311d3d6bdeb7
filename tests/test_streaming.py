"""Large and streamed responses: incremental writes, chunked framing, backpressure."""

from __future__ import annotations

import socket
import threading

from rtserve import App, Request, Response
from tests.helpers import connect, read_response_file, recv_until_closed, server_thread


def test_4mib_response_read_slowly(addr):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # a small window: many partial sends
    s.settimeout(20)
    s.connect(addr)
    s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    f = s.makefile("rb", buffering=0)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += f.read(1)
    assert b"Content-Length: 4194304" in head
    got = bytearray()
    pause = threading.Event()
    while len(got) < 4 << 20:
        got += f.read(min(4096, (4 << 20) - len(got)))
        if len(got) % (256 << 10) < 4096:
            pause.wait(0.01)  # a slow reader
    assert bytes(got) == bytes(range(256)) * (4 << 20 >> 8)
    rest = read_response_file(s.makefile("rb"))
    assert rest[2] == b"Hello, world!\n"
    s.close()


def test_iterable_body_is_chunked_on_http11(addr):
    s = connect(addr)
    s.sendall(b"GET /stream?n=4 HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    f = s.makefile("rb")
    status, headers, body = read_response_file(f)
    assert headers["transfer-encoding"] == "chunked"
    assert body == b"part0;part1;part2;part3;"
    assert read_response_file(f)[2] == b"Hello, world!\n"  # keep-alive after a stream
    s.close()


def test_iterable_body_is_close_delimited_on_http10(addr):
    s = connect(addr)
    s.sendall(b"GET /stream?n=3 HTTP/1.0\r\n\r\n")
    data = recv_until_closed(s)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"part0;part1;part2;"
    s.close()


def test_streaming_worker_waits_at_the_high_water_mark():
    produced = []
    finished = threading.Event()
    app = App()

    @app.get("/firehose")
    def firehose(request: Request) -> Response:
        def gen():
            try:
                for i in range(10_000):
                    produced.append(i)
                    yield b"x" * 16384
            finally:
                finished.set()

        return Response(gen(), 200, None, "application/octet-stream")

    with server_thread(app, threads=2, stream_high_water=65536) as srv:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.connect(srv.address)
        s.sendall(b"GET /firehose HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(100)  # the stream has started
        # Without reading, the producer must stall: high water + socket buffers is a few MiB
        # at most, far below the 160 MiB the generator could produce.
        stalled = threading.Event()
        last = -1
        for _ in range(50):
            stalled.wait(0.05)
            if len(produced) == last:
                break
            last = len(produced)
        assert len(produced) * 16384 < 16 << 20
        assert not finished.is_set()
        s.close()  # client goes away: the producer is aborted and its close() runs
        assert finished.wait(10)
        assert len(produced) < 10_000


def test_iterable_that_raises_midway_closes_without_final_chunk():
    app = App()

    @app.get("/broken")
    def broken(request: Request) -> Response:
        def gen():
            yield b"first;"
            raise RuntimeError("midway")

        return Response(gen(), 200, None, "text/plain")

    with server_thread(app) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
        data = recv_until_closed(s)
        assert b"6\r\nfirst;\r\n" in data
        assert not data.endswith(b"0\r\n\r\n")  # no terminating chunk: truncation is visible
        s.close()


def test_stream_shorter_than_content_length_closes():
    app = App()

    @app.get("/short")
    def short(request: Request) -> Response:
        return Response(iter([b"abc"]), 200, [("Content-Length", "10")])

    with server_thread(app) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n")
        data = recv_until_closed(s)
        assert data.endswith(b"\r\n\r\nabc")
        s.close()


def test_stream_longer_than_content_length_is_cut_there_and_closes():
    app = App()

    @app.get("/long")
    def long(request: Request) -> Response:
        return Response(iter([b"abc", b"defgh", b"never"]), 200, [("Content-Length", "5")])

    with server_thread(app) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n")
        data = recv_until_closed(s)
        assert data.endswith(b"\r\n\r\nabcde")  # what fits its length, then the close
        s.close()


def test_file_body_sent_with_sendfile(tmp_path):
    from rtserve import FileBody

    payload = bytes(range(256)) * 4096
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    app = App()

    @app.get("/file")
    def file(request: Request) -> Response:
        return Response(FileBody(open(path, "rb")), 200, None, "application/octet-stream")

    with server_thread(app) as srv:
        s = connect(srv.address)
        s.sendall(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response_file(s.makefile("rb"))
        assert status == 200 and body == payload
        s.close()


def test_large_body_sent_beside_its_head_to_a_slow_reader():
    """Bodies >= 64 KiB go out with sendmsg(head, body): framing intact across partial sends."""
    app = App()
    payload = bytes(range(256)) * 2048  # 512 KiB

    @app.get("/large")
    def large(request: Request) -> Response:
        return Response(payload, 200, None, "application/octet-stream")

    with server_thread(app) as srv:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(srv.address)
        s.sendall(b"GET /large HTTP/1.1\r\nHost: x\r\n\r\nHEAD /large HTTP/1.1\r\nHost: x\r\n\r\n")
        f = s.makefile("rb")
        status, headers, body = read_response_file(f)
        assert status == 200 and headers["content-length"] == str(len(payload))
        assert body == payload
        status, headers, body = read_response_file(f, head_only=True)
        assert status == 200 and headers["content-length"] == str(len(payload))
        s.close()
