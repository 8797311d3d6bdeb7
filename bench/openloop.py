"""Open-loop HTTP/1.1 load generator: requests at a constant rate, whatever the server does.

Why not wrk: wrk is a closed loop (a connection sends its next request only after the
previous answer), so a slow server slows the load down and the queueing it would cause never
shows (coordinated omission). Why not h2load ``--rps``: it fires all of a client's requests
for the interval at the same instant, so 100 clients send bursts of 100 requests, not a
constant rate. httperf opens a new connection per call and reports no percentiles.

This generator schedules request *k* at ``t0 + k / rate`` and measures its latency from that
intended time, not from when a connection was free to send it. Requests go out on idle
keep-alive connections; when none is idle a new one is opened (non-blocking connect), up to
``--max-conns``; beyond that the request waits in the client, and that wait counts in its
latency. Requests still unanswered ``--grace`` seconds after the run are counted as timeouts.

Prints one JSON object on stdout. Run pinned to the load-generator CPU:

    taskset -c 1 python bench/openloop.py --port 8080 --rate 900 --duration 10 \\
        --path /score --body-file tx.json

``--body-lines FILE`` sends one body per line of FILE instead, in turn (a stream of
different transactions); ``--capture NAME`` keeps that response header of each request,
and ``--records FILE`` writes every counted request (intended time, latency, status,
fallback, captured headers) as JSON lines. ``run(progress=...)`` reports the records
completed since its last call about once a second (bench/fraud_load.py prints them).
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import math
import resource
import select
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

_NS = 1_000_000_000


@dataclass
class Conn:
    """One client connection: its socket, receive buffer and the request it carries."""

    sock: socket.socket
    connected: bool = False
    buf: bytearray = field(default_factory=bytearray)
    intended_ns: int = 0  # intended send time of the request in flight, 0 when idle
    pending_out: bytes = b""


@dataclass
class Record:
    """Outcome of one request."""

    intended_ns: int
    latency_ns: int  # -1 when not answered
    status: int  # 0 when not answered (error or timeout)
    fallback: bool
    captured: dict[str, str] | None = None  # the --capture headers of the response


def _parse_response(buf: bytearray) -> tuple[int, int, bool, bool] | None:
    """Parse one complete response at the start of ``buf``.

    Returns (consumed bytes, status, fallback marker present, connection close) or None if
    the response is not complete yet. Only Content-Length bodies are supported (every
    benchmarked server sends one for these endpoints).
    """
    parsed = _parse(buf, ())
    return None if parsed is None else parsed[:4]


def _parse(buf: bytearray, capture: Sequence[str]
           ) -> tuple[int, int, bool, bool, dict[str, str] | None] | None:
    """_parse_response, plus the values of the (lower-case) ``capture`` headers."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    fallback = False
    close = False
    captured: dict[str, str] | None = {} if capture else None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        lname = name.strip().lower()
        if captured is not None and lname in capture:
            captured[lname] = value.strip()
        if lname == "content-length":
            length = int(value.strip())
        elif lname == "x-rtserve-fallback":
            fallback = True
        elif lname == "connection" and value.strip().lower() == "close":
            close = True
    total = end + 4 + length
    if len(buf) < total:
        return None
    return total, status, fallback, close, captured


def _request(host: str, port: int, path: str, body: bytes) -> bytes:
    method = "POST" if body else "GET"
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "User-Agent: rtserve-openloop\r\n")
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def run(host: str, port: int, rate: float, duration: float, warmup: float, path: str,
        body: bytes, max_conns: int, init_conns: int, grace: float,
        deadline_ms: float, *, bodies: Sequence[bytes] = (), capture: Sequence[str] = (),
        progress: Callable[[list[Record]], None] | None = None,
        keep: list[Record] | None = None) -> dict:
    """Drive the server at ``rate`` requests/s for ``warmup + duration`` seconds.

    Requests intended during the warm-up are sent but not counted. ``bodies``, when
    given, are sent in turn instead of ``body``; ``capture`` names response headers to
    keep in each Record; ``progress`` gets the records completed since its previous call,
    about once a second; ``keep`` receives the counted records.
    """
    requests = [_request(host, port, path, b) for b in bodies] or \
        [_request(host, port, path, body)]
    capture = tuple(h.lower() for h in capture)
    sent = 0  # requests sent: the next body is requests[sent % len(requests)]

    ep = select.epoll()
    conns: dict[int, Conn] = {}
    idle: collections.deque[Conn] = collections.deque()
    connecting = 0
    waiting: collections.deque[int] = collections.deque()  # intended times not yet sent
    records: list[Record] = []
    connect_errors = 0
    io_errors = 0
    inflight = 0

    def open_conn() -> None:
        nonlocal connecting, connect_errors
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            connect_errors += 1
            return
        c = Conn(s)
        conns[s.fileno()] = c
        connecting += 1
        ep.register(s.fileno(), select.EPOLLOUT)

    def close_conn(c: Conn, failed: bool) -> None:
        nonlocal io_errors, inflight
        fd = c.sock.fileno()
        if c.intended_ns:
            inflight -= 1
            if failed:
                records.append(Record(c.intended_ns, -1, 0, False))
                io_errors += 1
        c.intended_ns = 0
        try:
            ep.unregister(fd)
        except (OSError, ValueError):
            pass
        conns.pop(fd, None)
        c.sock.close()

    def send_on(c: Conn, intended: int) -> None:
        nonlocal inflight, sent
        c.intended_ns = intended
        inflight += 1
        request = requests[sent % len(requests)]
        sent += 1
        try:
            n = c.sock.send(request)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            close_conn(c, True)
            return
        if n < len(request):
            c.pending_out = request[n:]
            ep.modify(c.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    for _ in range(min(init_conns, max_conns)):
        open_conn()

    t_start = time.monotonic_ns()
    t_count = t_start + int(warmup * _NS)
    t_stop = t_count + int(duration * _NS)
    t_end = t_stop + int(grace * _NS)
    interval = _NS / rate
    k = 0
    next_due = t_start
    reported = 0  # records handed to progress so far
    next_report = t_start + _NS

    while True:
        now = time.monotonic_ns()
        if progress is not None and now >= next_report:
            progress(records[reported:])
            reported = len(records)
            next_report += _NS
        while next_due <= now and next_due < t_stop:
            waiting.append(next_due)
            k += 1
            next_due = t_start + int(k * interval)
        while waiting and idle:
            c = idle.popleft()
            if c.sock.fileno() in conns:
                send_on(c, waiting.popleft())
        # Open connections for the requests that found none idle (bounded).
        need = len(waiting) - connecting
        while need > 0 and len(conns) < max_conns:
            open_conn()
            need -= 1
        if now >= t_stop and not waiting and inflight == 0:
            break
        if now >= t_end:
            break
        if waiting and not idle and len(conns) >= max_conns and connecting == 0:
            wake = t_end if next_due >= t_stop else min(next_due, t_end)
        elif next_due < t_stop:
            wake = next_due
        else:
            wake = t_end
        if progress is not None:
            wake = min(wake, next_report)
        timeout = max(0.0, (wake - time.monotonic_ns()) / _NS)
        for fd, ev in ep.poll(timeout):
            got = conns.get(fd)
            if got is None:
                continue
            c = got
            if not c.connected:
                connecting -= 1
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err or ev & (select.EPOLLERR | select.EPOLLHUP):
                    connect_errors += 1
                    close_conn(c, False)
                    continue
                c.connected = True
                ep.modify(fd, select.EPOLLIN)
                if waiting:
                    send_on(c, waiting.popleft())
                else:
                    idle.append(c)
                continue
            if ev & select.EPOLLOUT and c.pending_out:
                try:
                    n = c.sock.send(c.pending_out)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    close_conn(c, True)
                    continue
                c.pending_out = c.pending_out[n:]
                if not c.pending_out:
                    ep.modify(fd, select.EPOLLIN)
            if ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                try:
                    data = c.sock.recv(262144)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    close_conn(c, True)
                    continue
                if not data:
                    close_conn(c, True)
                    continue
                c.buf += data
                parsed = _parse(c.buf, capture)
                if parsed is None:
                    continue
                used, status, fallback, close, captured = parsed
                del c.buf[:used]
                t = time.monotonic_ns()
                if c.intended_ns:
                    records.append(Record(c.intended_ns, t - c.intended_ns, status, fallback,
                                          captured))
                    c.intended_ns = 0
                    inflight -= 1
                if close:
                    close_conn(c, False)
                elif waiting:
                    send_on(c, waiting.popleft())
                else:
                    idle.append(c)

    # Whatever is left: never sent, or sent and not answered in time.
    unsent = len(waiting)
    timeouts = 0
    for c in list(conns.values()):
        if c.intended_ns:
            timeouts += 1
        close_conn(c, True)
    for intended in waiting:
        records.append(Record(intended, -1, 0, False))
    ep.close()
    if progress is not None and reported < len(records):
        progress(records[reported:])

    counted = [r for r in records if t_count <= r.intended_ns < t_stop]
    # Real answers (2xx, not a fallback) that *completed* in the measured window, whatever
    # their intended time: the throughput of a saturated server (a capacity probe).
    done_real = sum(1 for r in records if r.status and 200 <= r.status < 300 and not r.fallback
                    and t_count <= r.intended_ns + r.latency_ns < t_stop)
    if keep is not None:
        keep.extend(counted)
    offered = len(counted)
    deadline_ns = int(deadline_ms * 1e6)
    answered = [r for r in counted if r.status]
    ok = [r for r in answered if 200 <= r.status < 300]
    kept = [r for r in answered if r.latency_ns <= deadline_ns]
    within = [r for r in ok if r.latency_ns <= deadline_ns]
    good = [r for r in within if not r.fallback]
    statuses: dict[str, int] = {}
    for r in counted:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    lat = sorted(r.latency_ns if r.status else math.inf for r in counted)

    def pct(p: float) -> float | None:
        if not lat:
            return None
        v = lat[min(len(lat) - 1, max(0, math.ceil(p / 100 * len(lat)) - 1))]
        return None if v == math.inf else v / 1000.0

    return {
        "rate": rate,
        "duration_s": duration,
        "offered": offered,
        "answered": len(answered),
        "ok_2xx": len(ok),
        "answered_within_deadline": len(kept),  # any status: the deadline was kept
        "within_deadline": len(within),  # 2xx, fallbacks included
        "good": len(good),
        "fallbacks": sum(1 for r in ok if r.fallback),
        "shed_503": statuses.get("503", 0),
        "status": statuses,
        "unanswered": offered - len(answered),
        "unsent_at_end": unsent,
        "timeouts_at_end": timeouts,
        "connect_errors": connect_errors,
        "io_errors": io_errors - timeouts,
        "max_conns_used": max_conns,
        "deadline_ms": deadline_ms,
        # Latency from the intended send time; None = not answered (counts as infinite).
        "latency_us": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "p999": pct(99.9)},
        "share_kept": len(kept) / offered if offered else 0.0,
        "share_within_deadline": len(within) / offered if offered else 0.0,
        # Goodput: real answers (2xx, not a fallback) within the deadline, per second.
        "goodput_rps": len(good) / duration,
        "within_2xx_rps": len(within) / duration,
        "real_done_rps": done_real / duration,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry: run once, print the result as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before")
    p.add_argument("--path", default="/score")
    p.add_argument("--body-file", default="")
    p.add_argument("--max-conns", type=int, default=1000)
    p.add_argument("--init-conns", type=int, default=64)
    p.add_argument("--grace", type=float, default=2.0, help="seconds to wait at the end")
    p.add_argument("--deadline-ms", type=float, default=50.0)
    p.add_argument("--body-lines", default="", help="send these bodies in turn, one a line")
    p.add_argument("--capture", action="append", default=[],
                   help="response header to keep per request (repeatable)")
    p.add_argument("--records", default="", help="write counted requests as JSON lines")
    a = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    body = b""
    if a.body_file:
        with open(a.body_file, "rb") as f:
            body = f.read()
    bodies: list[bytes] = []
    if a.body_lines:
        with open(a.body_lines, "rb") as f:
            bodies = [line.rstrip(b"\n") for line in f if line.strip()]
    kept: list[Record] = []
    res = run(a.host, a.port, a.rate, a.duration, a.warmup, a.path, body, a.max_conns,
              a.init_conns, a.grace, a.deadline_ms, bodies=bodies, capture=a.capture,
              keep=kept)
    if a.records:
        with open(a.records, "w") as f:
            for r in kept:
                f.write(json.dumps({"intended_ns": r.intended_ns, "latency_ns": r.latency_ns,
                                    "status": r.status, "fallback": r.fallback,
                                    "captured": r.captured}) + "\n")
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
