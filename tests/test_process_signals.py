"""A real `rtserve` subprocess: SIGINT drains in-flight work and exits 0; CLI errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import connect, read_response_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, tuple[str, int]]:
    """Start `python -m rtserve ...` on an ephemeral port; return it and its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtserve", *args, "--bind", "127.0.0.1:0"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, ("127.0.0.1", int(m.group(1)))
    proc.kill()
    raise RuntimeError("server did not start: " + (proc.stderr.read() or ""))


@pytest.fixture
def demo():
    proc, addr = start("examples.hello:app", "--threads", "4")
    yield proc, addr
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_sigint_lets_the_in_flight_request_finish_then_exits_0(demo):
    proc, addr = demo
    s = connect(addr)
    s.sendall(b"GET /slow?seconds=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    idle = connect(addr)  # an idle keep-alive connection is closed at once on drain
    idle.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response_file(idle.makefile("rb"))[0] == 200
    # Wait until the slow request is on a worker, then interrupt.
    m = connect(addr)
    for _ in range(100):
        m.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        text = read_response_file(m.makefile("rb"))[2]
        if b"rtserve_busy_workers 1" in text:
            break
    m.close()
    proc.send_signal(signal.SIGINT)
    status, headers, body = read_response_file(s.makefile("rb"))
    assert status == 200 and body == b"slept 1 s\n"
    assert headers.get("connection") == "close"  # draining: no keep-alive
    assert idle.recv(10) == b""
    assert proc.wait(15) == 0
    s.close()
    idle.close()


def test_sigterm_with_nothing_in_flight_exits_0_quickly(demo):
    proc, addr = demo
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_second_sigint_exits_at_once(demo):
    proc, addr = demo
    s = connect(addr)
    s.sendall(b"GET /slow?seconds=30 HTTP/1.1\r\nHost: x\r\n\r\n")
    m = connect(addr)
    for _ in range(100):
        m.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        if b"rtserve_busy_workers 1" in read_response_file(m.makefile("rb"))[2]:
            break
    m.close()
    proc.send_signal(signal.SIGINT)
    # Standard signals don't queue: wait until the first one was handled.
    while "draining" not in proc.stderr.readline():
        pass
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) != 0
    s.close()


def test_unimportable_app_exits_with_a_message():
    proc = subprocess.run(
        [sys.executable, "-m", "rtserve", "no_such_module_xyz:app"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode != 0
    assert "no_such_module_xyz" in proc.stderr


def test_invalid_setting_is_named():
    proc = subprocess.run(
        [sys.executable, "-m", "rtserve", "examples.hello:app", "--threads", "zero"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2 and "threads" in proc.stderr


def test_environment_variables_configure_the_server():
    proc, addr = start("examples.hello:app", env={"RTSERVE_THREADS": "3"})
    try:
        s = connect(addr)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"rtserve_workers 3" in read_response_file(s.makefile("rb"))[2]
        s.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
