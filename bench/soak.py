"""Soak test: minutes of mixed hostile and normal traffic against one rtserve process.

    nice -n 10 .venv/bin/python bench/soak.py --minutes 10

Starts `python -m rtserve bench.soak:app` (the app below) on 127.0.0.1 port 0 and runs a
few client threads for `--minutes`. Each client picks, request after request, one of:

- ``valid``      GET /id on its keep-alive connection
- ``post``       POST /echo with a body on its keep-alive connection
- ``pipelined``  3-6 requests written in one send, answers read in order
- ``stream``     a chunked streamed response, every chunk carries the id
- ``slow``       a request written in pieces with pauses (slow sender), or a slow reader
- ``malformed``  a request the parser must refuse (bare LF, CL+TE, bad Content-Length ...)
- ``aborted``    a request abandoned mid-head, mid-body, while the handler runs, or with a
                 reset (SO_LINGER 0)

Every request carries an id (the ``X-Request-Id`` header and the ``id`` query parameter)
that the handler echoes in the ``X-Echo-Id`` header and the body. The client checks every
response it reads against the request it sent: a response carrying another id is a
``wrong_client`` error, the one figure that must be zero.

The report (text and, with ``--json``, a JSON line) gives requests completed by kind,
errors by kind, the server's RSS and open fds after warm-up and at the end, and the
server's own counters from /metrics.

Every minute it also samples the server's memory (docs/reliability.md, "Soak"): RSS by
kind of mapping (/proc/PID/smaps), glibc's mallinfo2() and arena count and the live
Python heap (the app's /_soak/malloc). ``--out FILE`` writes the samples and the report as
JSON lines, ``--table FILE`` prints them every 10 minutes as markdown, ``--server-env
NAME=VALUE`` / ``--server-arg ARG`` change the server's environment or command line,
``--idle-for S`` adds a lull to every minute, ``--watch PID`` samples a server started
elsewhere.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

from rtserve import App, Request, Response

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ======================================================================================
# The server side: an app whose every answer names the request it answers.
# ======================================================================================

app = App()


def _rid(request: Request) -> str:
    rid: str = request.headers.get("x-request-id") or request.query_param("id", "")
    return rid[:64]


@app.get("/id")
def echo_id(request: Request) -> Response:
    rid = _rid(request)
    return Response.text(f"id={rid}\n", headers={"X-Echo-Id": rid})


@app.post("/echo")
def echo_body(request: Request) -> Response:
    rid = _rid(request)
    return Response(request.body, 200, {"X-Echo-Id": rid}, "application/octet-stream")


@app.get("/sleep")
def sleep(request: Request) -> Response:
    rid = _rid(request)
    time.sleep(min(float(request.query_param("ms", "10")), 1000.0) / 1000.0)
    return Response.text(f"id={rid}\n", headers={"X-Echo-Id": rid})


@app.get("/stream")
def stream(request: Request) -> Response:
    rid = _rid(request)
    n = min(int(request.query_param("n", "8")), 10_000)
    size = min(int(request.query_param("size", "64")), 1 << 16)
    pad = b"." * size

    def chunks():
        for i in range(n):
            yield b"[%s:%d]%s" % (rid.encode(), i, pad)

    return Response(chunks(), 200, {"X-Echo-Id": rid}, "application/octet-stream")


@app.get("/_soak/heap")
def heap(request: Request) -> Response:
    """Live Python heap (blocks, gc objects) and RSS before/after glibc's malloc_trim(0).

    Tells a leak (live blocks grow) from allocator retention (RSS falls after the trim).
    """
    import ctypes
    import gc

    gc.collect()
    out: dict[str, float] = {"py_blocks": sys.getallocatedblocks(),
                             "gc_objects": len(gc.get_objects()),
           "rss_kib": _self_rss_kib()}
    try:
        t0 = time.perf_counter()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["trim_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    except OSError:
        pass
    out["rss_after_trim_kib"] = _self_rss_kib()
    return Response.json(out)


@app.get("/_soak/malloc")
def malloc_figures(request: Request) -> Response:
    """glibc's own heap figures and the live Python heap, without trimming anything.

    One per-minute sample: mallinfo2() (arena = sbrk heap, ordblks = free chunks,
    uordblks = in use, fordblks = free but held, hblkhd = mmapped, keepcost = trimmable
    top), the number of malloc arenas (``<heap nr=`` in malloc_info's XML), the live
    Python heap after a gc.collect() and RSS. Fields glibc cannot give are absent.
    """
    import gc

    gc.collect()
    out: dict[str, Any] = {"py_blocks": sys.getallocatedblocks(),
                           "gc_objects": len(gc.get_objects()), "rss_kib": _self_rss_kib()}
    out.update(_glibc_figures())
    return Response.json(out)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _glibc_figures() -> dict[str, Any]:
    """mallinfo2() and malloc_info()'s arena count and totals; {} without glibc >= 2.33."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = _Mallinfo2
    mi = mallinfo2()
    out: dict[str, Any] = {f"mi_{field[0]}": getattr(mi, field[0])
                           for field in _Mallinfo2._fields_}
    # malloc_info(0, fp) writes XML; an open_memstream FILE* collects it in memory.
    buf = ctypes.c_char_p()
    size = ctypes.c_size_t()
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p),
                                    ctypes.POINTER(ctypes.c_size_t)]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    fp = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if fp:
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        xml = ctypes.string_at(buf, size.value).decode("ascii", "replace")
        libc.free(buf)
        out["arenas"] = len(re.findall(r"<heap nr=", xml))
        tail = xml[xml.rfind("</heap>"):]  # the totals over all arenas follow the last heap
        for kind in ("current", "max"):
            m = re.search(rf'<system type="{kind}" size="(\d+)"/>', tail)
            if m:
                out[f"system_{kind}"] = int(m.group(1))
        m = re.search(r'<total type="mmap" count="(\d+)" size="(\d+)"/>', tail)
        if m:
            out["mmap_count"], out["mmap_bytes"] = int(m.group(1)), int(m.group(2))
    return out


def _self_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ======================================================================================
# The client side.
# ======================================================================================

MALFORMED = [
    b"GET /id HTTP/1.1\nHost: x\n\n",  # bare LF
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # CL + TE
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"GET /id HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",  # obs-fold
    b"GET /id HTTP/1.1\r\nHost : x\r\n\r\n",  # space before colon
    b"GET /id HTTP/1.1\r\n\r\n",  # no Host
    b"GET /id HTTP/2.0\r\nHost: x\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0x5\r\nhello\r\n0\r\n\r\n",  # chunk size with 0x
    b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # 414
    b"GET /id HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
]

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


class ProtocolError(Exception):
    """The server's answer is not what the request called for (the kind names why)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    """One response from a buffered socket file (Content-Length, chunked or to-close)."""
    line = f.readline()
    if not line:
        raise ConnectionError("closed before a response")
    m = _STATUS.match(line)
    if not m:
        raise ProtocolError("bad_status_line", repr(line[:60]))
    status = int(m.group(1))
    headers: dict[str, str] = {}
    while True:
        h = f.readline()
        if not h:
            raise ConnectionError("closed inside a response head")
        if h == b"\r\n":
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        body = f.read(n)
        if len(body) != n:
            raise ConnectionError("closed inside a body")
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size_line = f.readline()
            if not size_line:
                raise ConnectionError("closed inside a chunked body")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                f.readline()
                break
            parts.append(f.read(size))
            f.readline()
        body = b"".join(parts)
    else:
        body = f.read()
    return status, headers, body


class Client(threading.Thread):
    """One client thread: a keep-alive connection plus throw-away hostile connections."""

    KINDS = ("valid", "post", "pipelined", "stream", "slow", "malformed", "aborted")
    WEIGHTS = (40, 12, 12, 8, 6, 12, 10)

    def __init__(self, n: int, addr: tuple[str, int], stop: threading.Event, seed: int) -> None:
        super().__init__(name=f"soak-client-{n}", daemon=True)
        self.n = n
        self.addr = addr
        self.stop_event = stop
        self.go = threading.Event()  # cleared by the driver for a quiet spell (--idle-for)
        self.go.set()
        self.rng = random.Random(seed)
        self.seq = 0
        self.done: Counter = Counter()  # requests answered correctly, by kind
        self.errors: Counter = Counter()  # by kind of error
        self.details: dict[str, list[str]] = {}  # the first few of each kind, for the report
        self.wrong_client = 0
        self.sock: socket.socket | None = None
        self.file: Any = None

    # ---- helpers ----------------------------------------------------------------------

    def next_id(self) -> str:
        self.seq += 1
        return f"c{self.n}-{self.seq}"

    def new_socket(self, timeout: float = 10.0) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def keepalive(self) -> tuple[socket.socket, Any]:
        if self.sock is None:
            self.sock = self.new_socket()
            self.file = self.sock.makefile("rb")
        return self.sock, self.file

    def drop_keepalive(self) -> None:
        if self.sock is not None:
            try:
                self.file.close()
                self.sock.close()
            except OSError:
                pass
        self.sock = self.file = None

    def check(self, rid: str, status: int, headers: dict[str, str], body: bytes,
              expect_body: bytes | None = None) -> None:
        echoed = headers.get("x-echo-id")
        if echoed != rid:
            self.wrong_client += 1
            raise ProtocolError("wrong_client", f"sent {rid}, got {echoed}")
        if status != 200:
            raise ProtocolError(f"status_{status}")
        if expect_body is not None and body != expect_body:
            raise ProtocolError("wrong_body", f"{rid}: {body[:60]!r}")

    @staticmethod
    def get(path: str, rid: str) -> bytes:
        sep = "&" if "?" in path else "?"
        return (f"GET {path}{sep}id={rid} HTTP/1.1\r\nHost: soak\r\n"
                f"X-Request-Id: {rid}\r\n\r\n").encode()

    # ---- traffic kinds ------------------------------------------------------------------

    def do_valid(self) -> None:
        s, f = self.keepalive()
        rid = self.next_id()
        s.sendall(self.get("/id", rid))
        st, h, body = read_response(f)
        self.check(rid, st, h, body, f"id={rid}\n".encode())

    def do_post(self) -> None:
        s, f = self.keepalive()
        rid = self.next_id()
        payload = (rid.encode() + b":") * self.rng.randint(1, 2000)
        s.sendall((f"POST /echo HTTP/1.1\r\nHost: soak\r\nX-Request-Id: {rid}\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload)
        st, h, body = read_response(f)
        self.check(rid, st, h, body, payload)

    def do_pipelined(self) -> None:
        s, f = self.keepalive()
        ids = [self.next_id() for _ in range(self.rng.randint(3, 6))]
        s.sendall(b"".join(self.get("/id", rid) for rid in ids))
        for rid in ids:
            st, h, body = read_response(f)
            self.check(rid, st, h, body, f"id={rid}\n".encode())
            self.done["pipelined_each"] += 1

    def do_stream(self) -> None:
        s, f = self.keepalive()
        rid = self.next_id()
        n = self.rng.randint(1, 50)
        s.sendall(self.get(f"/stream?n={n}&size=100", rid))
        st, h, body = read_response(f)
        want = b"".join(b"[%s:%d]%s" % (rid.encode(), i, b"." * 100) for i in range(n))
        self.check(rid, st, h, body, want)

    def do_slow(self) -> None:
        rid = self.next_id()
        if self.rng.random() < 0.5:  # slow sender: the head in pieces
            s, f = self.keepalive()
            data = self.get("/id", rid)
            cuts = sorted(self.rng.sample(range(1, len(data)), 4))
            prev = 0
            for c in cuts + [len(data)]:
                s.sendall(data[prev:c])
                prev = c
                time.sleep(0.02)
            st, h, body = read_response(f)
            self.check(rid, st, h, body, f"id={rid}\n".encode())
        else:  # slow reader of a streamed response, on its own connection
            s = self.new_socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                s.sendall(self.get("/stream?n=50&size=1000", rid).replace(
                    b"Host: soak\r\n", b"Host: soak\r\nConnection: close\r\n"))
                got = bytearray()
                while True:
                    chunk = s.recv(8192)
                    if not chunk:
                        break
                    got += chunk
                    time.sleep(0.002)
            finally:
                s.close()
            head, _, _ = bytes(got).partition(b"\r\n\r\n")
            if f"X-Echo-Id: {rid}".encode() not in head:
                if b"X-Echo-Id:" in head:
                    self.wrong_client += 1
                    raise ProtocolError("wrong_client", rid)
                raise ProtocolError("slow_reader_bad_head", repr(head[:80]))
            if got.count(rid.encode() + b":") != 50 or not got.endswith(b"0\r\n\r\n"):
                raise ProtocolError("slow_reader_short_body", rid)

    def do_malformed(self) -> None:
        s = self.new_socket()
        try:
            s.sendall(self.rng.choice(MALFORMED))
            # Whatever follows in the same segment must never get an answer: add a smuggled
            # request and check only one response comes back before the close.
            try:
                s.sendall(b"GET /id?id=smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
            except OSError:
                pass
            data = bytearray()
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                pass
        finally:
            s.close()
        statuses = _STATUS.findall(bytes(data))
        if not statuses:
            raise ProtocolError("malformed_no_answer")
        if len(statuses) != 1:
            raise ProtocolError("malformed_answered_twice", repr(statuses))
        code = int(statuses[0])
        if not 400 <= code < 600:
            raise ProtocolError("malformed_accepted", str(code))

    def do_aborted(self) -> None:
        rid = self.next_id()
        s = self.new_socket()
        stage = self.rng.choice(("head", "body", "handler", "response", "reset"))
        try:
            if stage == "head":
                s.sendall(self.get("/id", rid)[: self.rng.randint(1, 30)])
            elif stage == "body":
                s.sendall((f"POST /echo HTTP/1.1\r\nHost: soak\r\nX-Request-Id: {rid}\r\n"
                           "Content-Length: 1000\r\n\r\n").encode() + b"x" * 100)
            elif stage == "handler":
                s.sendall(self.get("/sleep?ms=30", rid))
            elif stage == "response":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(self.get("/stream?n=2000&size=1000", rid))
                s.recv(100)
            else:
                s.sendall(self.get("/sleep?ms=20", rid))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            s.close()
        self.done["aborted_" + stage] += 1

    def note(self, kind: str, detail: str) -> None:
        """Count an error (and keep its first details); the keep-alive connection is dropped."""
        self.errors[kind] += 1
        seen = self.details.setdefault(kind, [])
        if len(seen) < 3:
            seen.append(detail[:200])
        self.drop_keepalive()

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        kinds = self.KINDS
        weights = self.WEIGHTS
        while not self.stop_event.is_set():
            if not self.go.is_set():
                self.drop_keepalive()  # a lull: the clients leave (the server may time out idlers)
                self.go.wait(1.0)
                continue
            kind = self.rng.choices(kinds, weights)[0]
            try:
                getattr(self, "do_" + kind)()
                if kind != "aborted":
                    self.done[kind] += 1
            except ProtocolError as exc:
                self.note(exc.kind, str(exc))
            except (ConnectionError, TimeoutError, OSError) as exc:
                self.note(f"{kind}_{type(exc).__name__}", repr(exc))
        self.drop_keepalive()


# ======================================================================================
# The driver.
# ======================================================================================


def proc_figures(pid: int) -> dict[str, int]:
    """RSS (KiB), open fds and threads of a process, from /proc."""
    out = {"rss_kib": 0, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": 0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    return out


_HEAP_MAX = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: a thread arena's heaps are aligned to it
_STACK = 8 << 20  # the default pthread stack size


def smaps_breakdown(pid: int) -> dict[str, int]:
    """RSS (KiB) of a process by kind of mapping, read from /proc/PID/smaps (outside it).

    ``heap`` is the main arena ([heap], brk), ``thread_arenas`` glibc's other arenas
    (anonymous heaps aligned to 64 MiB), ``stacks`` thread stacks (8 MiB anonymous maps and
    [stack]), ``file`` code and data of the executable and libraries, ``anon_other`` the
    rest: pymalloc's arenas, malloc's mmapped chunks, ctypes' and the runtime's maps.
    """
    maps: list[tuple[int, int, str, int]] = []
    start = end = 0
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                lo, hi = head[0].split("-")
                start, end = int(lo, 16), int(hi, 16)
                name = head[5].strip() if len(head) > 5 else ""
            elif head[0] == "Rss:":
                maps.append((start, end, name, int(head[1])))
    out = {"heap": 0, "thread_arenas": 0, "stacks": 0, "file": 0, "anon_other": 0}
    for m_lo, m_hi, nm, rss in maps:
        if nm == "[heap]":
            kind = "heap"
        elif nm == "[stack]":
            kind = "stacks"
        elif nm.startswith("/"):
            kind = "file"
        elif nm:
            kind = "anon_other"  # [vdso], [vvar] ...
        elif m_lo % _HEAP_MAX == 0:  # a heap's used part; the rest of its 64 MiB is ---p
            kind = "thread_arenas"
        elif m_hi - m_lo == _STACK:
            kind = "stacks"
        else:
            kind = "anon_other"
        out[kind] += rss
    return out


def watch(pid: int, out_path: str, interval: float, seconds: float) -> int:
    """Sample a running server's RSS breakdown every `interval` s into `out_path` (JSON lines)."""
    t0 = time.monotonic()
    with open(out_path, "a") as out:
        while time.monotonic() - t0 <= seconds:
            try:
                rec = {"t_s": round(time.monotonic() - t0, 1), **proc_figures(pid),
                       "smaps": smaps_breakdown(pid)}
            except (FileNotFoundError, ProcessLookupError):
                return 0  # the server exited
            out.write(json.dumps(rec) + "\n")
            out.flush()
            time.sleep(interval)
    return 0


def table(path: str, every_s: float = 600.0, smaps_path: str = "",
          smaps_offset_s: float = 0.0) -> str:
    """A markdown table of a `--out` file's samples, one row per `every_s` seconds.

    RSS by mapping kind comes from the samples themselves or, for a run whose server was
    watched from outside (`--watch`), from `smaps_path`, whose clock starts
    `smaps_offset_s` after the soak's.
    """
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    samples = [r for r in records if r.get("type") == "sample"]
    watched: list[dict[str, Any]] = []
    if smaps_path:
        with open(smaps_path) as f:
            watched = [json.loads(line) for line in f if line.strip()]
    mib = 1 << 20
    rows = ["| min | RSS | brk heap / thread arenas / other anon (smaps) | in use (uordblks) "
            "| free held (fordblks) | glibc heaps (arena) | arenas | py blocks / gc objects "
            "| exchanges | errors | wrong client | fds | threads |",
            "|" + "---:|" * 13]
    next_t = 0.0
    for r in samples:
        if r["t_s"] + 30 < next_t:
            continue
        next_t = r["t_s"] - r["t_s"] % every_s + every_s
        sm = r.get("smaps")
        if sm is None and watched:
            w = min(watched, key=lambda w: abs(w["t_s"] + smaps_offset_s - r["t_s"]))
            if abs(w["t_s"] + smaps_offset_s - r["t_s"]) <= 45:
                sm = w["smaps"]
        m = r["server"]
        rows.append("| {:.0f} | {:.1f} | {} | {:.2f} | {:.2f} | {:.2f} | {} | {:,} / {:,} "
                    "| {:,} | {} | {} | {} | {} |".format(
                        r["t_s"] / 60, r["rss_kib"] / 1024,
                        " / ".join(f"{sm[k] / 1024:.1f}" for k in
                                   ("heap", "thread_arenas", "anon_other")) if sm else "-",
                        m.get("mi_uordblks", 0) / mib, m.get("mi_fordblks", 0) / mib,
                        m.get("mi_arena", 0) / mib, m.get("arenas", "-"),
                        m.get("py_blocks", 0), m.get("gc_objects", 0), r["done"], r["errors"],
                        r["wrong_client"], r["fds"], r["threads"]))
    return "\n".join(rows)


def scrape(addr: tuple[str, int]) -> dict[str, float]:
    """The server's /metrics as {series: value} (histograms summed to their _count)."""
    s = socket.create_connection(addr, timeout=10)
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        _, _, body = read_response(s.makefile("rb"))
    finally:
        s.close()
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("http_server_request_duration_seconds_count"):
            code = re.search(r'status_code="(\d+)"', name)
            key = f"responses_{code.group(1) if code else '?'}"
            out[key] = out.get(key, 0) + float(value)
        elif "_bucket" not in name and "_sum" not in name and "_count" not in name:
            out[name] = float(value)
    return out


def get_json(addr: tuple[str, int], path: str) -> Any:
    s = socket.create_connection(addr, timeout=30)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n".encode())
        return json.loads(read_response(s.makefile("rb"))[2])
    finally:
        s.close()


def start_server(threads: int, log_path: str, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None
                 ) -> tuple[subprocess.Popen, tuple[str, int]]:
    """`python -m rtserve bench.soak:app` on an ephemeral port; returns it and its address.

    The server's stderr goes to `log_path` (a pipe nobody drains could block the server).
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rtserve", "bench.soak:app", "--bind", "127.0.0.1:0",
             "--threads", str(threads), "--keepalive-timeout", "30", "--header-timeout", "5",
             "--body-timeout", "5", *(extra_args or [])],
            cwd=ROOT, stderr=log, stdout=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(log_path) as f:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", f.read())
        if m:
            return proc, ("127.0.0.1", int(m.group(1)))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait(5)
    with open(log_path) as f:
        raise RuntimeError("server did not start: " + f.read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    p.add_argument("--threads", type=int, default=4, help="server worker threads (default 4)")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    p.add_argument("--log", default="/tmp/rtserve-soak-server.log", help="server stderr file")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the server, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the server command line (repeatable)")
    p.add_argument("--idle-for", type=float, default=0.0, metavar="S",
                   help="clients pause for the last S seconds of every minute (a lull: lets "
                   "the server's --malloc-trim-idle act); the minute's sample is taken at the "
                   "end of the lull")
    p.add_argument("--out", help="append every per-minute sample, then the report, to this "
                   "file as JSON lines (written as they come, so a cut-short run keeps them)")
    p.add_argument("--watch", type=int, metavar="PID",
                   help="only sample a running server's RSS by mapping kind into --out "
                   "every minute, for --minutes (no traffic)")
    p.add_argument("--table", metavar="FILE",
                   help="only print a markdown table (every 10 minutes) of a --out file")
    p.add_argument("--smaps", default="", metavar="FILE",
                   help="with --table: a --watch file for the RSS by mapping kind")
    p.add_argument("--smaps-offset", type=float, default=0.0, metavar="S",
                   help="with --smaps: seconds after the soak's start the watch began")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table, 600.0, args.smaps, args.smaps_offset))
        return 0
    if args.watch:
        return watch(args.watch, args.out or "/dev/stdout", 60.0, args.minutes * 60)
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    out_file = open(args.out, "a") if args.out else None  # noqa: SIM115 (closed at the end)

    def emit(record: dict[str, Any]) -> None:
        if out_file is not None:
            out_file.write(json.dumps(record) + "\n")
            out_file.flush()

    emit({"type": "start", "argv": sys.argv, "server_env": server_env,
          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    proc, addr = start_server(args.threads, args.log, server_env, args.server_arg)
    stop = threading.Event()
    clients: list[Client] = []
    try:
        # Warm up (imports, first allocations) before the baseline figures.
        warm = Client(-1, addr, threading.Event(), args.seed)
        for _ in range(200):
            warm.do_valid()
            warm.do_stream()
        warm.drop_keepalive()
        time.sleep(0.5)
        before = proc_figures(proc.pid)
        malloc_before = get_json(addr, "/_soak/malloc")
        emit({"type": "sample", "t_s": 0.0, **before, "done": 0, "errors": 0,
              "wrong_client": 0, "server": malloc_before})
        heap_before = get_json(addr, "/_soak/heap")  # trims: take the RSS figure first
        t0 = time.monotonic()
        clients = [Client(i, addr, stop, args.seed + i) for i in range(args.clients)]
        for c in clients:
            c.start()
        end = t0 + args.minutes * 60
        samples = []
        quiet = min(args.idle_for, 50.0)
        while time.monotonic() < end:
            if quiet:  # traffic, then a quiet spell at the end of each minute, sampled at its end
                time.sleep(min(60.0 - quiet, max(0.0, end - time.monotonic())))
                for c in clients:
                    c.go.clear()
                time.sleep(quiet)
            else:
                time.sleep(min(60.0, max(0.0, end - time.monotonic())))
            if proc.poll() is not None:
                print("server exited with", proc.returncode, file=sys.stderr)
                break
            fig: dict[str, Any] = proc_figures(proc.pid)
            fig["smaps"] = smaps_breakdown(proc.pid)
            done = sum(v for c in clients for k, v in c.done.items() if k != "pipelined_each")
            errs = sum(sum(c.errors.values()) for c in clients)
            wrong_now = sum(c.wrong_client for c in clients)
            try:
                mal = get_json(addr, "/_soak/malloc")
            except (OSError, ValueError) as exc:
                mal = {"error": repr(exc)}
            if quiet:
                mal["trims"] = scrape(addr).get('rtserve_malloc_trims_total{when="idle"}')
                for c in clients:
                    c.go.set()
            samples.append(fig)
            emit({"type": "sample", "t_s": round(time.monotonic() - t0, 1), **fig, "done": done,
                  "errors": errs, "wrong_client": wrong_now, "server": mal})
            print(f"[{time.monotonic() - t0:6.0f} s] rss {fig['rss_kib']} KiB, fds {fig['fds']}, "
                  f"threads {fig['threads']}, done {done}, errors {errs}, "
                  f"in use {mal.get('mi_uordblks', 0) >> 10} KiB, "
                  f"free held {mal.get('mi_fordblks', 0) >> 10} KiB, "
                  f"arenas {mal.get('arenas')}, py blocks {mal.get('py_blocks')}", flush=True)
        stop.set()
        for c in clients:
            c.join(30)
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # let lingering closes finish
        after = proc_figures(proc.pid)
        metrics = scrape(addr)
        idle_trim: dict[str, Any] = {}
        key = 'rtserve_malloc_trims_total{when="idle"}'
        if key in metrics:
            # The clients stopped: wait (bounded: the trim may be off) for the server's own
            # idle trim (--malloc-trim-idle, 10 s by default).
            wait_end = time.monotonic() + 30
            while time.monotonic() < wait_end and scrape(addr).get(key, 0) <= metrics.get(key, 0):
                time.sleep(1.0)
            m2 = scrape(addr)
            idle_trim = {"trims": m2.get(key, 0), "seconds": m2.get("rtserve_malloc_trim_seconds"),
                         **proc_figures(proc.pid), "smaps": smaps_breakdown(proc.pid),
                         "server": get_json(addr, "/_soak/malloc")}
            emit({"type": "after_idle_trim", **idle_trim})
        heap_after = get_json(addr, "/_soak/heap")
    finally:
        stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    done_by_kind: Counter = Counter()
    errors: Counter = Counter()
    for c in clients:
        done_by_kind.update(c.done)
        errors.update(c.errors)
    wrong = sum(c.wrong_client for c in clients)
    details: dict[str, list[str]] = {}
    for c in clients:
        for k, v in c.details.items():
            details.setdefault(k, []).extend(v[: 3 - len(details.get(k, []))])
    report = {
        "minutes": round(elapsed / 60, 2),
        "clients": args.clients,
        "server_threads": args.threads,
        "completed": sum(v for k, v in done_by_kind.items() if k != "pipelined_each"),
        "completed_by_kind": dict(sorted(done_by_kind.items())),
        "errors_by_kind": dict(sorted(errors.items())),
        "wrong_client": wrong,
        "error_details": details,
        "server_before": before,
        "server_after": after,
        "rss_samples_kib": [s["rss_kib"] for s in samples],
        "server_heap_before": heap_before,
        "server_heap_after": heap_after,
        "after_idle_trim": idle_trim,
        "server_metrics": {k: v for k, v in sorted(metrics.items()) if v},
        "server_exit_code": proc.returncode,
    }
    print("\n== soak report ==")
    for k, v in report.items():
        print(f"{k}: {v}")
    if args.json:
        print(json.dumps(report))
    emit({"type": "report", **report})
    if out_file is not None:
        out_file.close()
    return 0 if wrong == 0 and proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
