"""nginx in front of two rtserve instances: one is stopped (SIGTERM) mid-traffic and no
client request fails.

The nginx configuration is deploy/nginx.conf, the file docs/deploy.md shows; the test only
swaps its two upstream addresses and its listen port for loopback test ports, and wraps it
in a minimal main configuration (foreground, pid and logs in a temporary directory).
nginx is installed from Debian packages if missing; the test is skipped only when that
fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import connect, read_response, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs" / "deploy.md"


def find_program(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/usr/local/sbin") if os.access(p := f"{d}/{name}", os.X_OK)),
        None,
    )


def ensure_installed(name: str) -> str:
    """The program's path, installed with `apt-get install -y NAME` if missing (else skip)."""
    path = find_program(name)
    if path:
        return path
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, timeout=300,
                       capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", name], env=env, check=True,
                       timeout=300, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"{name} is not installed and `apt-get install -y {name}` failed: {exc}")
    path = find_program(name)
    if not path:
        pytest.skip(f"{name} is not installed and apt-get did not provide it")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_site(upstreams: list[int], listen: int) -> str:
    """deploy/nginx.conf with test ports; fails if the file no longer has what we swap."""
    text = (DEPLOY / "nginx.conf").read_text()
    for default, port in zip(("127.0.0.1:8001", "127.0.0.1:8002"), upstreams, strict=True):
        assert text.count(f"server {default} ") == 1, default
        text = text.replace(f"server {default} ", f"server 127.0.0.1:{port} ")
    assert text.count("listen 8080;") == 1
    return text.replace("listen 8080;", f"listen 127.0.0.1:{listen};")


def main_conf(tmp: Path, site: Path) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "\n".join(
        f"    {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\n{user}worker_processes 1;\npid {tmp / 'nginx.pid'};\n"
        f"error_log {tmp / 'error.log'} warn;\n"
        "events { worker_connections 512; }\n"
        "http {\n"
        f"    access_log {tmp / 'access.log'};\n{temps}\n"
        f"    include {site};\n"
        "}\n"
    )


class Instance:
    """One single-process rtserve on an ephemeral port; its stderr read by a thread."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RTSERVE_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rtserve", "tests.apps.pidapp:app", "--bind",
             "127.0.0.1:0", *args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        self.port_found = threading.Event()
        self.port = 0
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m and not self.port:
                self.port = int(m.group(1))
                self.port_found.set()
        self.port_found.set()

    def wait_port(self) -> int:
        assert self.port_found.wait(20) and self.port, "".join(self.lines)
        return self.port

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def cleanup() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def get(port: int) -> tuple[int, dict, bytes]:
    with connect(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        return read_response(sock)


def test_docs_show_the_deploy_configurations_verbatim():
    docs = DOCS.read_text()
    for name in ("nginx.conf", "haproxy.cfg", "rtserve.service", "k8s-pod.yaml"):
        assert (DEPLOY / name).read_text().strip() in docs, f"docs/deploy.md lacks {name}"


def test_nginx_in_front_of_two_instances_loses_no_request_when_one_stops(tmp_path, cleanup):
    nginx = ensure_installed("nginx")
    a = Instance("--drain-seconds", "1")
    cleanup.append(a.proc)
    b = Instance("--drain-seconds", "1")
    cleanup.append(b.proc)
    ports = [a.wait_port(), b.wait_port()]
    front = free_port()
    site = tmp_path / "rtserve.conf"
    site.write_text(render_site(ports, front))
    conf = tmp_path / "nginx.conf"
    conf.write_text(main_conf(tmp_path, site))
    ngx = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    cleanup.append(ngx)
    lose_no_request_when_one_stops(ngx, front, a, b)
    ngx.send_signal(signal.SIGQUIT)  # nginx: graceful shutdown
    ngx.wait(10)
    b.kill()


def lose_no_request_when_one_stops(
    balancer: subprocess.Popen, front: int, a: Instance, b: Instance
) -> None:
    """Traffic through the balancer from 3 clients; SIGTERM `a` mid-traffic; no failure."""

    def up() -> bool:
        assert balancer.poll() is None, "the load balancer exited"
        try:
            return get(front)[0] == 200
        except OSError:
            return False

    wait_for(up, 15, "the load balancer to come up", interval=0.02)
    ok: list[tuple[float, int]] = []  # (time, pid)
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                status, headers, body = get(front)
                if status == 200 and body == b"ok\n":
                    ok.append((time.monotonic(), int(headers["x-pid"])))
                else:
                    failures.append(f"{status} {body[:80]!r}")
            except OSError as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        pids = {a.proc.pid, b.proc.pid}
        wait_for(lambda: {p for _, p in ok} == pids and len(ok) >= 60, 15,
                 "traffic to reach both instances", interval=0.02)
        a.proc.send_signal(signal.SIGTERM)  # mid-traffic: not ready for a while, then stop
        assert a.proc.wait(15) == 0
        settled = time.monotonic() + 0.1  # responses relayed before A exited are in
        wait_for(lambda: sum(t > settled for t, _ in ok) >= 60, 15,
                 "traffic to go on after the stop", interval=0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert failures == [], failures[:5]
    assert {p for t, p in ok if t > settled} == {b.proc.pid}


def render_haproxy(upstreams: list[int], listen: int) -> str:
    """deploy/haproxy.cfg with test ports; fails if the file no longer has what we swap."""
    text = (DEPLOY / "haproxy.cfg").read_text()
    for default, port in zip(("10.0.0.11:8001", "10.0.0.12:8001"), upstreams, strict=True):
        assert text.count(default) == 1, default
        text = text.replace(default, f"127.0.0.1:{port}")
    assert text.count("bind :8080") == 1
    return text.replace("bind :8080", f"bind 127.0.0.1:{listen}")


def test_haproxy_health_checks_readyz_and_loses_no_request_when_one_stops(tmp_path, cleanup):
    haproxy = ensure_installed("haproxy")
    # --drain-seconds 3 > HAProxy's detection time (inter 500ms x fall 2): it stops routing
    # to the instance (its /readyz says 503) before the instance stops accepting.
    a = Instance("--drain-seconds", "3")
    cleanup.append(a.proc)
    b = Instance("--drain-seconds", "3")
    cleanup.append(b.proc)
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render_haproxy([a.wait_port(), b.wait_port()], front))
    log = tmp_path / "haproxy.log"
    with open(log, "wb") as err:
        hap = subprocess.Popen(
            [haproxy, "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err,
        )
    cleanup.append(hap)
    lose_no_request_when_one_stops(hap, front, a, b)
    hap.send_signal(signal.SIGUSR1)  # HAProxy: soft stop
    hap.wait(10)
    b.kill()
    # The health check took the draining instance out on its /readyz 503, not on a refused
    # connection after it stopped accepting.
    text = log.read_text(errors="replace")
    assert re.search(r"rtserve/app1 is DOWN, reason: Layer7 wrong status, code: 503", text), text
