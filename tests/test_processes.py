"""`--processes N`: the supervisor, its children, reload, drain and recycling, over real
processes and sockets on 127.0.0.1.

Every test starts `python -m rtserve tests.apps.pidapp:app --processes N --bind
127.0.0.1:0`, learns the port and the children from the supervisor's log lines (read
from its stderr as they come), and kills every process it saw by pid when it ends, even
on failure. Answers carry X-Pid, so a test knows which child served a request.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import connect, read_response

ROOT = Path(__file__).resolve().parent.parent
PIDAPP = "tests.apps.pidapp:app"


class Supervised:
    """A supervisor subprocess whose stderr lines are collected by a reader thread."""

    def __init__(self, *args: str, app: str = PIDAPP) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RTSERVE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rtserve", app, "--bind", "127.0.0.1:0", *args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<eof>")
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match:
        """The first log line (from index `start`) matching `pattern`; fails after timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    if m:
                        return m
                    if self.lines[i] == "<eof>":
                        raise AssertionError(f"{pattern!r} never logged:\n" + self.log())
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{pattern!r} not logged in {timeout} s:\n" + self.log())
                self.cond.wait(left)

    def wait_count(self, pattern: str, n: int, timeout: float = 10.0, start: int = 0) -> None:
        """Wait until `n` log lines (from index `start`) match `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while sum(1 for line in self.lines[start:] if rx.search(line)) < n:
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == "<eof>"):
                    raise AssertionError(f"{n} x {pattern!r} not logged:\n" + self.log())
                self.cond.wait(left)

    def mark(self) -> int:
        with self.cond:
            return len(self.lines)

    def log(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def started_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"started process (\d+)", self.log())]

    def ready(self, n: int) -> int:
        """Wait until the supervisor reports all `n` children ready; returns the port."""
        m = self.wait_for(r"supervisor listening on 127\.0\.0\.1:(\d+)")
        self.port = int(m.group(1))
        self.wait_for(rf"all {n} processes ready", timeout=20)
        return self.port

    def cleanup(self) -> None:
        """Kill every child this supervisor ever started, then the supervisor; by pid."""
        for pid in self.started_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.reader.join(5)


@pytest.fixture
def supervised() -> Iterator[list[Supervised]]:
    started: list[Supervised] = []
    yield started
    for s in started:
        s.cleanup()


def start(started: list[Supervised], *args: str, app: str = PIDAPP) -> Supervised:
    s = Supervised(*args, app=app)
    started.append(s)
    return s


def get(port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """One request on a new connection (Connection: close)."""
    with connect(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        return read_response(sock)


def pid_of(port: int, path: str = "/") -> int:
    status, headers, _ = get(port, path)
    assert status == 200
    return int(headers["x-pid"])


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's reaper may be slow)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Traffic:
    """A client thread doing sequential requests, each on a new connection, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.pids: list[int] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(20)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, headers, body = get(self.port)
                if status != 200 or body != b"ok\n":
                    self.failures.append(f"status {status} body {body!r}")
                else:
                    self.ok += 1
                    self.pids.append(int(headers["x-pid"]))
            except OSError as exc:
                self.failures.append(repr(exc))

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        target = self.ok + n
        while self.ok < target and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.01)
        assert self.ok >= target, f"traffic stalled at {self.ok} ({self.failures[:3]})"


# ======================================================================================


def test_all_processes_serve(supervised):
    s = start(supervised, "--processes", "3")
    port = s.ready(3)
    children = set(s.started_pids())
    assert len(children) == 3
    seen: set[int] = set()
    for _ in range(300):  # new connections: the kernel hashes them over 3 listeners
        seen.add(pid_of(port))
        if seen == children:
            break
    assert seen == children
    assert "SO_REUSEPORT" in s.log()


def test_shared_listener_mode_serves_from_every_process(supervised):
    s = start(supervised, "--processes", "2", "--share-listener")
    port = s.ready(2)
    assert "one shared listener" in s.log()
    seen: set[int] = set()
    for _ in range(400):
        seen.add(pid_of(port))
        if len(seen) == 2:
            break
    assert seen == set(s.started_pids())


def test_kill_9_child_is_replaced_and_service_continues(supervised):
    s = start(supervised, "--processes", "2")
    port = s.ready(2)
    victim, survivor = s.started_pids()
    mark = s.mark()
    os.kill(victim, signal.SIGKILL)
    m = s.wait_for(rf"process {victim} died \(signal SIGKILL\)", start=mark)
    assert m
    new = int(s.wait_for(r"started process (\d+)", start=mark).group(1))
    s.wait_for(rf"process {new} ready", start=mark, timeout=20)
    seen: set[int] = set()
    for _ in range(200):  # every request after the kill succeeds (queued ones wait)
        seen.add(pid_of(port))
        if seen == {survivor, new}:
            break
    assert seen == {survivor, new}
    assert victim not in seen


def test_sighup_reload_under_traffic_fails_no_request(supervised):
    s = start(supervised, "--processes", "2")
    port = s.ready(2)
    old = set(s.started_pids())
    with Traffic(port) as t:
        t.wait_for_requests(20)
        mark = s.mark()
        s.proc.send_signal(signal.SIGHUP)
        s.wait_for(r"reload complete", start=mark, timeout=30)
        for pid in old:
            s.wait_for(rf"process {pid} exited \(exit code 0\)", start=mark)
        t.wait_for_requests(20)
    assert t.failures == []
    new = set(s.started_pids()) - old
    assert len(new) == 2
    assert set(t.pids[-10:]) <= new  # after the reload only new processes answer
    assert s.proc.poll() is None


def test_sighup_reload_in_shared_listener_mode_fails_no_request(supervised):
    s = start(supervised, "--processes", "2", "--share-listener")
    port = s.ready(2)
    old = set(s.started_pids())
    with Traffic(port) as t:
        t.wait_for_requests(20)
        mark = s.mark()
        s.proc.send_signal(signal.SIGHUP)
        s.wait_for(r"reload complete", start=mark, timeout=30)
        t.wait_for_requests(20)
    assert t.failures == []
    assert set(t.pids[-10:]) <= set(s.started_pids()) - old


def test_sigterm_drains_in_flight_requests_and_exits_0(supervised, tmp_path):
    s = start(supervised, "--processes", "2", "--drain-seconds", "2")
    port = s.ready(2)
    marks = tmp_path / "running"
    results: list[object] = []

    def slow() -> None:
        try:
            results.append(get(port, f"/slow?seconds=1.5&mark={marks}", timeout=20))
        except OSError as exc:
            results.append(exc)

    threads = [threading.Thread(target=slow) for _ in range(4)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # every slow request is running on a worker
        if marks.exists() and len(marks.read_text().splitlines()) == 4:
            break
        time.sleep(0.01)
    assert len(marks.read_text().splitlines()) == 4
    mark = s.mark()
    s.proc.send_signal(signal.SIGTERM)
    s.wait_count(r"SIGTERM: draining \(up to", 2, start=mark)  # both children got it
    # While draining (--drain-seconds) a child reports not ready but still answers.
    status, _, body = get(port, "/readyz")
    assert (status, body) == (503, b"not ready: draining\n")
    for th in threads:
        th.join(20)
    assert len(results) == 4
    for r in results:
        assert not isinstance(r, BaseException), r
        status, headers, body = r
        assert status == 200 and body == b"slept 1.5\n"
        assert headers.get("connection") == "close"
    assert s.proc.wait(15) == 0
    assert "restarting" not in s.log()
    assert all(not alive(pid) for pid in s.started_pids())


@pytest.mark.parametrize(
    "app, message",
    [
        ("tests.apps.broken:app", "fails to import on purpose"),
        ("tests.apps.no_such_module:app", "cannot import module"),
    ],
)
def test_unimportable_app_exits_non_zero_with_a_message_and_no_restart_loop(
    supervised, app, message
):
    t0 = time.monotonic()
    s = start(supervised, "--processes", "2", app=app)
    rc = s.proc.wait(20)
    s.reader.join(5)
    assert rc == 3
    assert time.monotonic() - t0 < 15
    log = s.log()
    assert message in log
    assert "failed to start" in log and "no restart" in log
    assert len(s.started_pids()) == 2  # the first two children, never a replacement
    assert all(not alive(pid) for pid in s.started_pids())


def test_child_without_heartbeat_is_killed_and_replaced(supervised):
    s = start(supervised, "--processes", "2", "--heartbeat-timeout", "1.5")
    port = s.ready(2)
    victim, survivor = s.started_pids()
    mark = s.mark()
    os.kill(victim, signal.SIGSTOP)  # a conductor that stopped looping, as far as anyone sees
    try:
        s.wait_for(rf"process {victim}: no heartbeat", start=mark, timeout=10)
        new = int(s.wait_for(r"started process (\d+)", start=mark).group(1))
        s.wait_for(rf"process {new} ready", start=mark, timeout=20)
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    seen: set[int] = set()
    for _ in range(200):
        seen.add(pid_of(port))
        if seen == {survivor, new}:
            break
    assert seen == {survivor, new}
    assert not alive(victim)


def test_max_requests_recycles_children_without_failing_a_request(supervised):
    s = start(supervised, "--processes", "2", "--max-requests", "10",
              "--max-requests-jitter", "3")
    port = s.ready(2)
    failures: list[str] = []
    pids: list[int] = []
    for _ in range(50):
        try:
            status, headers, body = get(port)
            assert status == 200, status
            pids.append(int(headers["x-pid"]))
        except (OSError, AssertionError) as exc:
            failures.append(repr(exc))
    assert failures == []
    assert len(set(pids)) >= 4  # 50 requests over 2 slots of <= 13: each recycled
    assert "replacement" in s.log()
    assert "died" not in s.log()


def test_max_requests_recycle_keeps_serving_for_drain_seconds(supervised):
    """A recycle is a drain like SIGTERM's: the child goes on answering (reporting /readyz
    503) for --drain-seconds while its replacement starts, then exits 0. Before, it
    stopped accepting at its max_requests-th request, so no child ever answered more."""
    s = start(supervised, "--processes", "2", "--max-requests", "4", "--drain-seconds", "2")
    port = s.ready(2)
    served: dict[int, int] = {}
    failures: list[str] = []
    for _ in range(300):  # until one child is seen past its limit
        try:
            pid = pid_of(port)
        except (OSError, AssertionError) as exc:
            failures.append(repr(exc))
            continue
        served[pid] = served.get(pid, 0) + 1
        if served[pid] > 4:
            break
    assert failures == []
    recycled = next(pid for pid, n in served.items() if n > 4)
    s.wait_for(rf"process {recycled} is draining: starting its replacement")
    s.wait_for(rf"process {recycled} exited \(exit code 0\)", timeout=20)
    assert "died" not in s.log()


def test_sighup_rereads_the_config_file(supervised, tmp_path):
    """SIGHUP re-reads --config and restarts the children with it; a file that no longer
    parses changes nothing. max_body_size shows which settings a child runs with."""
    conf = tmp_path / "rtserve.toml"
    conf.write_text("max_body_size = 10\n")
    s = start(supervised, "--processes", "2", "--config", str(conf))
    port = s.ready(2)

    def post20() -> int:
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                         b"Content-Length: 20\r\n\r\n" + b"x" * 20)
            return read_response(sock)[0]

    assert post20() == 413
    old = set(s.started_pids())
    conf.write_text("max_body_size = 100\n")
    mark = s.mark()
    s.proc.send_signal(signal.SIGHUP)
    s.wait_for(r"SIGHUP: max_body_size: 10 -> 100", start=mark)
    s.wait_for(r"reload complete", start=mark, timeout=30)
    for pid in old:
        s.wait_for(rf"process {pid} exited \(exit code 0\)", start=mark)
    assert [post20() for _ in range(4)] == [501] * 4  # read past the parser: no POST route

    conf.write_text("max_body_size = -1\n")
    mark = s.mark()
    running = set(s.started_pids())
    s.proc.send_signal(signal.SIGHUP)
    s.wait_for(r"SIGHUP: .*max_body_size.*left as they were", start=mark)
    assert "rolling restart" not in "\n".join(s.lines[mark:])  # logged in the same call
    assert set(s.started_pids()) == running
    assert post20() == 501


def test_child_drains_when_its_supervisor_is_killed(supervised):
    s = start(supervised, "--processes", "2")
    s.ready(2)
    children = s.started_pids()
    s.proc.kill()
    s.proc.wait(5)
    deadline = time.monotonic() + 10  # they notice on their next heartbeat (1 s)
    while time.monotonic() < deadline and any(alive(p) for p in children):
        time.sleep(0.05)
    assert not any(alive(p) for p in children)


def test_children_get_the_supervisors_settings_as_flags():
    """child_args round-trips every non-default setting, including lists with commas."""
    from rtserve.child_command import child_args
    from rtserve.cli import build_parser
    from rtserve.config import Config

    cfg = Config(
        _env={}, processes="4", threads=3, deadline_ms=25.5, access_log=True,
        health_endpoints=False, root_path="-odd", heartbeat_timeout=7,
        fallback=['/score=200:{"decision":"review","score":0}', "/x=503:busy"],
        route_deadline=["/score=20"], forwarded_allow_ips=["10.0.0.1", "10.0.0.0/8"],
    )
    argv = child_args("pkg.mod:app", cfg)
    assert argv[1:4] == ["-m", "rtserve", "pkg.mod:app"]
    args = build_parser().parse_args(argv[3:])
    child = Config(_env={}, **{k: v for k, v in vars(args).items()
                               if k != "app" and v is not None})
    expected = cfg.as_dict() | {"processes": "1"}
    assert child.as_dict() == expected
