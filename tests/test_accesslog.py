"""The access log: off by default, one line per request with the queue/handler/write
split, and no control character from a client ever reaches the log unescaped."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

import pytest

from rtserve import App, Request, Response
from rtserve.accesslog import escape, format_line
from rtserve.request import Request as Req
from tests.helpers import REVIEW, Client, Gate, server_thread, wait_for


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access() -> Iterator[Capture]:
    logger = logging.getLogger("rtserve.access")
    cap = Capture()
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(cap)
    yield cap
    logger.removeHandler(cap)
    logger.setLevel(old)


def _app(gate: Gate) -> App:
    app = App()

    @app.get("/work")
    def work(request: Request) -> Response:
        time.sleep(0.02)
        return Response.text("done\n")

    @app.get("/block")
    def block(request: Request) -> Response:
        gate.hold("block")
        return Response.text("unblocked\n")

    @app.get("/fb", deadline_ms=20, fallback=Response.json(REVIEW))
    def fb(request: Request) -> Response:
        gate.hold("fb")
        return Response.text("late\n")

    return app


SPLIT = re.compile(r"queue=(\S+) handler=(\S+) write=(\S+) total=(\S+)$")


def test_off_by_default(access: Capture, gate: Gate) -> None:
    with server_thread(_app(gate)) as server:
        c = Client(server.address)
        assert c.request("GET", "/work")[0] == 200
        c.close()
    assert access.lines == []


def test_one_line_per_request_with_the_time_split(access: Capture, gate: Gate) -> None:
    with server_thread(_app(gate), access_log=True, threads=1) as server:
        a = Client(server.address)
        a.send("GET", "/block")
        gate.wait_entered()
        b = Client(server.address)
        b.send("GET", "/work")
        wait_for(lambda: server.admission.queue_depth == 1)
        time.sleep(0.03)  # B waits in the queue at least this long
        gate.release.set()
        assert a.recv()[0] == 200
        assert b.recv()[0] == 200
        assert b.request("GET", "/nowhere")[0] == 404
        wait_for(lambda: len(access.lines) == 3)
        a.close()
        b.close()
    block_line, work_line, missing_line = access.lines
    assert '"GET /block HTTP/1.1" 200' in block_line
    queue, handler, write, total = SPLIT.search(work_line).groups()
    assert '"GET /work HTTP/1.1" 200' in work_line
    assert float(queue) >= 30.0  # waited behind /block
    assert float(handler) >= 20.0  # slept 20 ms
    assert float(write) >= 0.0
    assert float(total) >= float(queue) + float(handler)
    assert SPLIT.search(missing_line).groups()[:3] == ("-", "-", "-")  # 404: no handler ran


def test_fallback_line_has_no_handler_time(access: Capture, gate: Gate) -> None:
    with server_thread(_app(gate), access_log=True) as server:
        c = Client(server.address)
        assert c.request("GET", "/fb")[0] == 200
        wait_for(lambda: len(access.lines) == 1)
        gate.release.set()
        c.close()
    queue, handler, write, total = SPLIT.search(access.lines[0]).groups()
    assert (queue, handler, write) == ("-", "-", "-")
    assert float(total) >= 19.0  # answered at respond_by, 20 ms budget minus the margin


def test_control_characters_are_escaped(access: Capture, gate: Gate) -> None:
    with server_thread(_app(gate), access_log=True) as server:
        c = Client(server.address)
        assert c.request("GET", "/%1b[31mred%0aFAKE")[0] == 404
        # obs-text is legal in a header value: \x9b is a one-byte CSI on many terminals
        ua = 'evil\x9b31m "quoted" back\\slash'
        assert c.request("GET", "/work", {"User-Agent": ua})[0] == 200
        # a raw ESC in a header is refused by the parser before anything is logged
        c2 = Client(server.address)
        c2.sock.sendall(b"GET /work HTTP/1.1\r\nHost: t\r\nUser-Agent: a\x1b[31mb\r\n\r\n")
        assert c2.recv()[0] == 400
        wait_for(lambda: len(access.lines) == 2)
        c.close()
        c2.close()
    assert len(access.lines) == 2
    for line in access.lines:
        assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in line), repr(line)
    assert "/%1b[31mred%0aFAKE" in access.lines[0]
    assert r'"evil\x9b31m \"quoted\" back\\slash"' in access.lines[1]


def test_custom_format(access: Capture, gate: Gate) -> None:
    with server_thread(_app(gate), access_log=True,
                       access_log_format="%(m)s %(U)s %(s)s h=%(handler_ms)s %(nope)s") as server:
        c = Client(server.address)
        assert c.request("GET", "/work")[0] == 200
        wait_for(lambda: len(access.lines) == 1)
        c.close()
    m = re.fullmatch(r"GET /work 200 h=(\S+) -", access.lines[0])
    assert m and float(m.group(1)) >= 20.0


def test_escape_and_broken_format_unit() -> None:
    assert escape("a\x00b\x1b\x7f\x85\x9f\xa0\"\\") == 'a\\x00b\\x1b\\x7f\\x85\\x9f\xa0\\"\\\\'
    req = Req("GET", "/x", "/x", "", "HTTP/1.1", [])
    req.status = 200
    line = format_line(req, time.monotonic_ns(), "%(s)s %")  # a broken format: never raises
    assert '"GET /x HTTP/1.1" 200' in line
