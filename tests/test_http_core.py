"""HTTP/1.1 behaviour over real sockets: keep-alive, pipelining, bodies, Expect, HEAD."""

from __future__ import annotations

import http.client
import json
import socket

import requests

from tests.helpers import connect, read_response, read_response_file, recv_until_closed


def test_hello_404_405_501(addr):
    r = requests.get(f"http://{addr[0]}:{addr[1]}/hello", timeout=5)
    assert r.status_code == 200 and r.text == "Hello, world!\n"
    assert "date" in r.headers
    r = requests.get(f"http://{addr[0]}:{addr[1]}/nothing-here", timeout=5)
    assert r.status_code == 404
    r = requests.post(f"http://{addr[0]}:{addr[1]}/hello", timeout=5)  # POST: /echo has it
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    r = requests.delete(f"http://{addr[0]}:{addr[1]}/hello", timeout=5)  # no route has DELETE
    assert r.status_code == 501 and "allow" not in r.headers


def test_query_headers_and_client_address(addr):
    r = requests.get(f"http://{addr[0]}:{addr[1]}/headers?a=1&a=2&b=", timeout=5)
    data = r.json()
    assert data["path"] == "/headers"
    assert data["query"] == {"a": ["1", "2"], "b": [""]}
    assert data["host"] == f"{addr[0]}:{addr[1]}"
    assert data["client"][0] == "127.0.0.1"


def test_keep_alive_is_the_http11_default(addr):
    conn = http.client.HTTPConnection(*addr, timeout=5)
    for _ in range(5):
        conn.request("GET", "/hello")
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
        assert resp.getheader("connection") is None
    sock_before = conn.sock
    conn.request("GET", "/hello")
    conn.getresponse().read()
    assert conn.sock is sock_before  # the same TCP connection served all six
    conn.close()


def test_connection_close_is_honoured(addr):
    s = connect(addr)
    s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = recv_until_closed(s)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in data
    s.close()


def test_http10_closes_by_default_and_keeps_alive_on_request(addr):
    s = connect(addr)
    s.sendall(b"GET /hello HTTP/1.0\r\n\r\n")
    data = recv_until_closed(s)
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"Hello, world!\n")
    s.close()
    s = connect(addr)
    f = s.makefile("rb")
    for _ in range(3):
        s.sendall(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = read_response_file(f)
        assert status == 200 and headers["connection"] == "keep-alive"
    s.close()


def test_three_pipelined_requests_in_one_send_answered_in_order(addr):
    s = connect(addr)
    s.sendall(
        b"GET /slow?seconds=0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nsecond"
        b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    f = s.makefile("rb")
    assert read_response_file(f)[2] == b"slow\n"
    assert read_response_file(f)[2] == b"second"
    assert read_response_file(f)[2] == b"Hello, world!\n"
    s.close()


def test_request_arriving_one_byte_at_a_time(addr):
    s = connect(addr)
    body = b'{"amount": 12.5}'
    req = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    for i in range(len(req)):
        s.send(req[i : i + 1])
    status, _, got = read_response_file(s.makefile("rb"))
    assert status == 200 and got == body
    s.close()


def test_chunked_body_with_trailers(addr):
    s = connect(addr)
    s.sendall(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n"
        b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    f = s.makefile("rb")
    assert read_response_file(f)[2] == b"hello world"
    assert read_response_file(f)[0] == 200  # trailers were consumed, framing intact
    s.close()


def test_body_sent_one_byte_at_a_time_chunked(addr):
    s = connect(addr)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for piece in [b"3\r\n", b"a", b"b", b"c", b"\r\n", b"0\r\n", b"\r\n"]:
        for i in range(len(piece)):
            s.send(piece[i : i + 1])
    assert read_response_file(s.makefile("rb"))[2] == b"abc"
    s.close()


def test_oversize_content_length_gets_413_before_the_body(server):
    addr = server.address
    s = connect(addr)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 << 20))
    data = recv_until_closed(s)  # answered without sending a single body byte
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in data
    s.close()


def test_expect_100_continue(addr):
    s = connect(addr)
    s.sendall(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    f = s.makefile("rb")
    assert f.readline() == b"HTTP/1.1 100 Continue\r\n"
    assert f.readline() == b"\r\n"
    s.sendall(b"data")
    assert read_response_file(f)[2] == b"data"
    s.close()


def test_expect_100_with_oversize_body_gets_413_and_no_100(addr):
    s = connect(addr)
    s.sendall(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    data = recv_until_closed(s)
    assert data.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in data
    s.close()


def test_unknown_expectation_gets_417(addr):
    s = connect(addr)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nExpect: teapot\r\n\r\nx")
    assert recv_until_closed(s).startswith(b"HTTP/1.1 417 ")
    s.close()


def test_head_has_headers_but_no_body(addr):
    s = connect(addr)
    s.sendall(b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    f = s.makefile("rb")
    status, headers, body = read_response_file(f, head_only=True)
    assert status == 200 and headers["content-length"] == "14"
    status, _, body = read_response_file(f)  # the next response starts right after the head
    assert body == b"Hello, world!\n"
    s.close()


def test_handler_exception_is_a_500_without_details(addr, caplog):
    r = requests.get(f"http://{addr[0]}:{addr[1]}/boom", timeout=5)
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text
    assert any("secret internal detail" in str(rec.exc_info) for rec in caplog.records)


def test_response_header_injection_becomes_500(addr):
    s = connect(addr)
    s.sendall(b"GET /inject HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = read_response_file(s.makefile("rb"))
    assert status == 500
    assert "set-cookie" not in headers
    s.close()


def test_bad_request_gets_400_close_and_nothing_for_what_followed(addr):
    s = connect(addr)
    s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\nGET /hello HTTP/1.1\r\n\r\n")
    data = recv_until_closed(s)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert data.count(b"HTTP/1.1") == 1
    s.close()
    # the server still serves the next client
    assert requests.get(f"http://{addr[0]}:{addr[1]}/hello", timeout=5).status_code == 200


def test_metrics_endpoint_counts_requests(addr):
    base = f"http://{addr[0]}:{addr[1]}"
    requests.get(base + "/hello", timeout=5)
    text = requests.get(base + "/metrics", timeout=5).text
    assert 'http_route="/hello",http_response_status_code="200"' in text
    assert requests.get(base + "/livez", timeout=5).text == "ok\n"
    assert requests.get(base + "/readyz", timeout=5).status_code == 200


def test_json_response(addr):
    r = requests.get(f"http://{addr[0]}:{addr[1]}/headers", timeout=5)
    assert r.headers["content-type"] == "application/json"
    assert json.loads(r.content)["path"] == "/headers"


def test_half_close_after_request_still_gets_the_response(addr):
    s = connect(addr)
    s.sendall(b"GET /slow?seconds=0.1 HTTP/1.1\r\nHost: x\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    data = recv_until_closed(s)
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"slow\n")
    s.close()


def test_lingering_close_delivers_the_response_while_the_client_still_sends(addr):
    """Connection: close with more bytes behind it: the server answers, shuts its write
    side and discards what still comes (no read at once: epoll reports it), so the
    client reads the whole response and a clean EOF, never a reset, however much it sends
    after."""
    s = connect(addr)
    s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
              b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined: never answered
    status, headers, body = read_response(s)
    assert status == 200 and body == b"Hello, world!\n"
    for _ in range(64):  # 1 MiB after the server's FIN: read and dropped, not reset
        s.sendall(b"x" * 16384)
    assert s.recv(1) == b""  # a clean EOF
    s.close()
