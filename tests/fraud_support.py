"""Shared pieces of the examples/fraud tests: transactions, an HTTP client, a Redis server.

The Redis server is real: Debian's redis-server, installed with apt-get if missing (the
tests that need it skip, with the reason, only when that install fails), started on a
free loopback port and a unix socket in a temporary directory, without persistence.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BASE_TS = 1_704_067_200.0  # 2024-01-01T00:00:00Z


def tx_body(**overrides: Any) -> dict:
    """A valid /authorize body; keyword arguments replace fields."""
    body = {"card_id": "c-test", "merchant_id": "m-shop", "mcc": 5411, "amount": 42.5,
            "currency": "EUR", "country": "FR", "channel": "pos", "timestamp": BASE_TS}
    body.update(overrides)
    return body


class Http:
    """A keep-alive HTTP/1.1 client (http.client) that also times each exchange."""

    def __init__(self, addr: tuple[str, int], timeout: float = 10.0) -> None:
        self.conn = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)

    def call(self, method: str, path: str, body: bytes | dict | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict, Any, float]:
        """(status, lower-case headers, JSON body or raw bytes, seconds taken)."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        t0 = time.monotonic()
        self.conn.request(method, path, data, headers or {})
        r = self.conn.getresponse()
        raw = r.read()
        elapsed = time.monotonic() - t0
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        if hdrs.get("content-type", "").startswith("application/json"):
            return r.status, hdrs, json.loads(raw), elapsed
        return r.status, hdrs, raw, elapsed

    def close(self) -> None:
        self.conn.close()


def server_timing(header: str) -> dict[str, float]:
    """`wait;dur=0.1, features;dur=0.2` -> {"wait": 0.1, "features": 0.2} (ms)."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    for cmd in (["apt-get", "install", "-y", "-qq", "redis-server"],
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "redis-server"]):
        try:
            subprocess.run(cmd, check=False, capture_output=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            return None
        found = shutil.which("redis-server")
        if found:
            return found
    return None


class RedisServer:
    """A running redis-server: `url` (TCP) and `unix_url`, and `cli()` for admin commands."""

    def __init__(self, binary: str, tmp: Path) -> None:
        self.port = _free_port()
        self.sock = tmp / "redis.sock"
        self.log = tmp / "redis.log"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp), "--unixsocket", str(self.sock),
             "--unixsocketperm", "700", "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.unix_url = f"unix://{self.sock}?db=1"

    def cli(self, *command: Any, timeout: float = 5.0) -> Any:
        """One command on a connection of its own (e.g. CLIENT PAUSE)."""
        from examples.fraud.resp import Client

        c = Client(self.url)
        try:
            return c.execute([list(command)], timeout)[0]
        finally:
            c.close()

    def wait_ready(self, timeout: float = 15.0) -> None:
        from examples.fraud.resp import RedisError

        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log.read_text()[-500:]}")
            try:
                if self.cli("PING", timeout=1.0) == b"PONG":
                    return
            except RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    binary = _redis_binary()
    if binary is None:
        pytest.skip("redis-server is not installed and `apt-get install -y redis-server` "
                    "failed")
    with tempfile.TemporaryDirectory(prefix="fraud-redis-") as tmp:
        server = RedisServer(binary, Path(tmp))
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()
