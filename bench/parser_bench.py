"""Parser micro-benchmark: ns per request for rtserve's parser vs httptools (and h11).

Why: the conductor parses every request on one thread, so parse cost is serial cost
(DESIGN.md section 8). Each contender does the work the conductor needs: method, target,
lower-cased header list and the whole body from one received buffer.

Run: .venv/bin/python bench/parser_bench.py [--number N] [--repeat R]
Pin to one core for stable figures: taskset -c 1 .venv/bin/python bench/parser_bench.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import timeit
from collections.abc import Callable

from rtserve.parser import NEED_DATA, RequestParser

GET_6 = (
    b"GET /api/v1/score?user=42&amount=1999 HTTP/1.1\r\n"
    b"Host: scoring.internal:8080\r\n"
    b"User-Agent: payment-gateway/3.1.4\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\n"
    b"X-Request-Id: 6f1c2a9e-3b7d-4c1e-9a55-0d2f8e7b1c34\r\n"
    b"\r\n"
)

_BODY = json.dumps(
    {"items": [{"id": i, "amount": i * 3.25, "currency": "EUR"} for i in range(24)]}
).encode()[:1024]
_BODY = _BODY + b" " * (1024 - len(_BODY))
POST_1K = (
    b"POST /score HTTP/1.1\r\n"
    b"Host: scoring.internal:8080\r\n"
    b"User-Agent: payment-gateway/3.1.4\r\n"
    b"Content-Type: application/json\r\n"
    b"Accept: application/json\r\n"
    b"X-Request-Deadline-Ms: 20\r\n"
    b"Content-Length: 1024\r\n"
    b"\r\n" + _BODY
)

# Chunked upload as a streaming client sends it: three chunks, no extensions (the common
# case the chunk-size line regex must keep cheap), no trailers.
POST_CHUNKED = (
    b"POST /score HTTP/1.1\r\n"
    b"Host: scoring.internal:8080\r\n"
    b"User-Agent: payment-gateway/3.1.4\r\n"
    b"Content-Type: application/json\r\n"
    b"X-Request-Deadline-Ms: 20\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"100\r\n" + _BODY[:256] + b"\r\n"
    b"100\r\n" + _BODY[256:512] + b"\r\n"
    b"200\r\n" + _BODY[512:] + b"\r\n"
    b"0\r\n\r\n"
)


POOL_SIZE = 4096


def variants(data: bytes, name: bytes) -> list[bytes]:
    """POOL_SIZE copies of a request, each with a different value of header `name`.

    Real traffic repeats most header lines but not all (request ids, lengths); one unique
    line per request keeps the parsers' own caches (ours caches split field lines) honest.
    """
    start = data.index(name + b": ") + len(name) + 2
    end = data.index(b"\r\n", start)
    width = end - start
    return [data[:start] + b"%0*x" % (width, i) + data[end:] for i in range(POOL_SIZE)]


def rtserve_runner(pool: list[bytes]) -> Callable[[], object]:
    """Our parser, reused across requests as the conductor reuses it per connection."""
    parser = RequestParser()
    nxt = itertools.cycle(pool).__next__

    def run() -> object:
        parser.feed(nxt())
        request = parser.next_event()
        assert request is not NEED_DATA
        return request

    return run


class _HttptoolsProto:
    """Collects what the conductor needs, as uvicorn's httptools protocol does."""

    __slots__ = ("url", "headers", "body", "done")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = False

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


def httptools_runner(pool: list[bytes]) -> Callable[[], object] | None:
    """httptools (llhttp): callbacks only, no request object (its floor)."""
    try:
        import httptools
    except ImportError:
        return None
    proto = _HttptoolsProto()
    parser = httptools.HttpRequestParser(proto)
    nxt = itertools.cycle(pool).__next__

    def run() -> object:
        parser.feed_data(nxt())
        assert proto.done
        return (parser.get_method(), proto.url, proto.headers, b"".join(proto.body))

    return run


def httptools_request_runner(pool: list[bytes]) -> Callable[[], object] | None:
    """httptools plus what a conductor would add to get our Request: decode, split, flags.

    This is the like-for-like comparison: rtserve's figure includes building the Request.
    """
    try:
        import httptools
    except ImportError:
        return None
    from rtserve.request import Request

    proto = _HttptoolsProto()
    parser = httptools.HttpRequestParser(proto)
    nxt = itertools.cycle(pool).__next__

    def run() -> object:
        parser.feed_data(nxt())
        assert proto.done
        target = proto.url.decode("latin-1")
        path, _, query = target.partition("?")
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in proto.headers]
        cl = None
        for n, v in headers:
            if n == "content-length":
                cl = int(v)
        request = Request(
            parser.get_method().decode("ascii"),
            target,
            path,
            query,
            "HTTP/" + parser.get_http_version(),
            headers,
            cl,
            False,
            parser.should_keep_alive(),
            False,
        )
        request.body = b"".join(proto.body)
        return request

    return run


def h11_runner(pool: list[bytes]) -> Callable[[], object] | None:
    """h11 for reference: a fresh Connection per request (its cycle needs a response)."""
    try:
        import h11
    except ImportError:
        return None
    nxt = itertools.cycle(pool).__next__

    def run() -> object:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(nxt())
        request = conn.next_event()
        body = b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            else:
                break
        return request, body

    return run


def measure(runners: dict[str, Callable[[], object]], number: int, repeat: int) -> dict[str, float]:
    """Best-of-`repeat` ns per call for each runner, timed round-robin.

    Round-robin (not one contender after another) so that a noisy neighbour or a CPU
    frequency change hits every contender alike; the minimum is the least noisy estimate.
    """
    best = {name: float("inf") for name in runners}
    for run in runners.values():
        run()
    for _ in range(repeat):
        for name, run in runners.items():
            n = number if not name.startswith("h11") else max(1, number // 10)
            t = min(timeit.repeat(run, number=n, repeat=1)) / n * 1e9
            best[name] = min(best[name], t)
    return best


CONTENDERS = [
    ("rtserve", rtserve_runner),
    ("httptools", httptools_runner),
    ("httptools+Request", httptools_request_runner),
    ("h11 (ref)", h11_runner),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=20000, help="calls per timing")
    ap.add_argument("--repeat", type=int, default=15, help="timings; best is reported")
    args = ap.parse_args(argv)

    cases = [
        ("GET, 6 headers", variants(GET_6, b"X-Request-Id")),
        ("POST 1 KiB JSON (CL)", variants(POST_1K, b"X-Request-Deadline-Ms")),
        ("POST 1 KiB, 3 chunks", variants(POST_CHUNKED, b"X-Request-Deadline-Ms")),
    ]
    version = sys.version.split()[0]
    print(f"python {version}; best of {args.repeat} x {args.number} calls; ns/request")
    widths = [max(12, len(name) + 2) for name, _ in CONTENDERS]
    header = f"{'case':<22}" + "".join(
        f"{name:>{w}}" for (name, _), w in zip(CONTENDERS, widths, strict=True)
    )
    header += f"{'rt/ht':>8}{'rt/ht+Req':>11}"
    print(header)
    print("-" * len(header))
    for label, pool in cases:
        runners = {}
        for name, factory in CONTENDERS:
            run = factory(pool)
            if run is not None:
                runners[name] = run
        best = measure(runners, args.number, args.repeat)
        row = f"{label:<22}"
        for (name, _), w in zip(CONTENDERS, widths, strict=True):
            row += f"{best[name]:>{w}.0f}" if name in best else f"{'n/a':>{w}}"
        for ref in ("httptools", "httptools+Request"):
            col = 8 if ref == "httptools" else 11
            if ref in best:
                row += f"{best['rtserve'] / best[ref]:>{col}.2f}"
        print(row)
    print("rt/ht = rtserve / httptools callbacks only; rt/ht+Req = rtserve / httptools building")
    print("the same Request object (like for like). Below 1.00: rtserve is faster.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
