"""Worker-path micro-benchmark: ns per request for native, WSGI and Flask handlers.

Why: with the GIL, every microsecond a worker spends per request is a microsecond the
conductor cannot use (on one core, throughput = 1 / (conductor + worker time)). This times
the whole worker path, `Worker.__call__(conn, req_id, request)`: handler (for WSGI apps the
adapter in rtserve/wsgi.py: environ, app call, Response) plus `serialize` to response bytes.
Requests are built the way the conductor builds them: parsed by `RequestParser`, routed by
the app's `resolve`, stamped with the client address and start time.

Cases (GET is a 6-header `GET /hello`; POST is a 1 KiB body read by the app):

- native-get / native-post: an rtserve `App`;
- wsgi-get: bench/apps/wsgi_app.py (the app the load benchmark runs) through `WSGIApp`;
- wsgi-post: a WSGI app that reads `wsgi.input` and answers its length;
- flask-get / flask-post: the same two endpoints in Flask (if installed).

`app-only` rows time just the app callable with a prebuilt environ: the difference between
the `wsgi-*` row and its `app-only` row is what the adapter plus serialize cost.

Run:       .venv/bin/python bench/wsgi_bench.py [--number N] [--repeat R] [CASE ...]
Pinned:    taskset -c 1 .venv/bin/python bench/wsgi_bench.py
Callgrind: .venv/bin/python bench/wsgi_bench.py --callgrind wsgi-get
           (instructions per request, from two valgrind runs of different length: exact
           and independent of machine load; PYTHONHASHSEED is fixed)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

from apps.wsgi_app import app as bench_wsgi_app  # noqa: E402

from apps import logic  # noqa: E402
from rtserve import App, Request, Response  # noqa: E402
from rtserve.app import Route  # noqa: E402
from rtserve.config import Config  # noqa: E402
from rtserve.parser import NEED_DATA, RequestParser  # noqa: E402
from rtserve.pool import WorkerPool  # noqa: E402
from rtserve.worker import Worker  # noqa: E402
from rtserve.wsgi import WSGIApp  # noqa: E402

GET_6 = (
    b"GET /hello HTTP/1.1\r\n"
    b"Host: scoring.internal:8080\r\n"
    b"User-Agent: payment-gateway/3.1.4\r\n"
    b"Accept: text/plain\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\n"
    b"X-Request-Id: 6f1c2a9e-3b7d-4c1e-9a55-0d2f8e7b1c34\r\n"
    b"\r\n"
)
BODY_1K = logic.sample_transaction()[:1024].ljust(1024)
POST_1K = (
    b"POST /echo HTTP/1.1\r\n"
    b"Host: scoring.internal:8080\r\n"
    b"User-Agent: payment-gateway/3.1.4\r\n"
    b"Content-Type: application/json\r\n"
    b"Accept: application/json\r\n"
    b"X-Request-Id: 6f1c2a9e-3b7d-4c1e-9a55-0d2f8e7b1c34\r\n"
    b"Content-Length: 1024\r\n"
    b"\r\n" + BODY_1K
)
CLIENT = ("127.0.0.1", 54321)


# ---- the apps -----------------------------------------------------------------------------


def native_app() -> App:
    app = App()

    @app.get("/hello")
    def hello(request: Request) -> Response:
        return Response.text("Hello, world!")

    @app.post("/echo")
    def echo(request: Request) -> Response:
        return Response(b"%d" % len(request.body), content_type="text/plain")

    return app


def wsgi_echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """GET /hello as the bench app; POST reads wsgi.input and answers its length."""
    if environ["REQUEST_METHOD"] != "POST":
        return bench_wsgi_app(environ, start_response)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    out = b"%d" % len(body)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]


def flask_app() -> Any:
    from flask import Flask, request

    app = Flask("wsgi_bench")

    @app.get("/hello")
    def hello() -> Any:
        return "Hello, world!"

    @app.post("/echo")
    def echo() -> Any:
        return str(len(request.get_data()))

    return app


# ---- the worker path ------------------------------------------------------------------------


def make_request(raw: bytes, app: Any) -> Request:
    """Parse and stamp a request as the conductor does before handing it to a worker."""
    parser = RequestParser()
    parser.feed(raw)
    req = parser.next_event()
    assert req is not NEED_DATA and isinstance(req, Request), req
    req.client = CLIENT
    req.start_ns = time.monotonic_ns()
    route = app.resolve(req)
    assert route.__class__ is Route, route
    req.route = route
    return req


def runner(app: Any, raw: bytes, expect: bytes) -> Callable[[], object]:
    """One `Worker.__call__` per call (the request object is reused: the worker only
    stamps times, status and keep-alive on it, the same values every time)."""
    pool = WorkerPool(1)  # never started: a bytes reply needs no thread or completion
    worker = Worker(pool, 1 << 16)
    req = make_request(raw, app)
    out = worker(None, 1, req)
    # A reply is (status, keep-alive, bytes): the writer's input (worker.py).
    assert isinstance(out, tuple) and out[0] == 200, out
    data = out[2]
    assert isinstance(data, bytes), out
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(expect), out
    call = worker.__call__

    def run() -> object:
        return call(None, 1, req)

    return run


def app_only(wsgi: Callable[..., Any], raw: bytes) -> Callable[[], object]:
    """Just the app callable on a prebuilt environ (fresh input stream each time)."""
    import io

    wapp = WSGIApp(wsgi, Config())
    req = make_request(raw, wapp)
    env = wapp.environ(req)
    body = req.body

    def start_response(status: str, headers: list, exc_info: Any = None) -> None:
        return None

    def run() -> object:
        e = env.copy()
        e["wsgi.input"] = io.BytesIO(body)
        result = wsgi(e, start_response)
        b"".join(result)
        close = getattr(result, "close", None)
        if close is not None:
            close()
        return result

    return run


def cases() -> dict[str, Callable[[], Callable[[], object]]]:
    native = native_app()
    out: dict[str, Callable[[], Callable[[], object]]] = {
        "native-get": lambda: runner(native, GET_6, b"Hello, world!"),
        "native-post": lambda: runner(native, POST_1K, b"1024"),
        "wsgi-get": lambda: runner(WSGIApp(bench_wsgi_app, Config()), GET_6, b"Hello, world!"),
        "wsgi-post": lambda: runner(WSGIApp(wsgi_echo, Config()), POST_1K, b"1024"),
        "app-only-get": lambda: app_only(bench_wsgi_app, GET_6),
        "app-only-post": lambda: app_only(wsgi_echo, POST_1K),
    }
    if importlib.util.find_spec("flask") is None:
        return out
    out["flask-get"] = lambda: runner(WSGIApp(flask_app(), Config()), GET_6, b"Hello, world!")
    out["flask-post"] = lambda: runner(WSGIApp(flask_app(), Config()), POST_1K, b"1024")
    out["flask-only-get"] = lambda: app_only(flask_app(), GET_6)
    return out


def best_ns(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Best of `repeat` timeit runs of `number` calls, in ns per call."""
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9


# ---- callgrind ----------------------------------------------------------------------------


def _callgrind_ir(case: str, loops: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        outfile = os.path.join(tmp, "cg.out")
        env = dict(os.environ, PYTHONHASHSEED="0")
        # setarch -R: no address randomisation, so address-keyed hashing is the same in
        # both runs (it was the main source of run-to-run differences, ~1k instructions).
        norand = ["setarch", "-R"] if shutil.which("setarch") else []
        subprocess.run(
            [
                *norand,
                "valgrind", "--tool=callgrind", "--callgrind-out-file=" + outfile,
                sys.executable, __file__, "--loops", str(loops), case,
            ],
            check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        text = Path(outfile).read_text()
    m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    if m is None:
        raise RuntimeError("no instruction total in callgrind output")
    return int(m.group(1))


def callgrind(case: str, loops: int) -> float:
    """Instructions per request: (Ir of 2*loops+W runs - Ir of loops+W runs) / loops."""
    short = _callgrind_ir(case, loops)
    long = _callgrind_ir(case, 2 * loops)
    return (long - short) / loops


# ---- main ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help="cases to run (default: all)")
    ap.add_argument("--number", type=int, default=20000, help="calls per timing run")
    ap.add_argument("--repeat", type=int, default=7, help="timing runs (best is kept)")
    ap.add_argument("--callgrind", action="store_true",
                    help="instructions per request under valgrind instead of timings")
    ap.add_argument("--loops", type=int, default=0,
                    help="(internal) run the case this many times, untimed, and exit")
    ap.add_argument("--cg-loops", type=int, default=3000,
                    help="requests per callgrind run (the difference of two runs is used)")
    args = ap.parse_args()
    table = cases()
    names = args.cases or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(table)}")
    if args.loops:
        for name in names:
            fn = table[name]()
            for _ in range(100):  # warm-up (caches filled) is the same in both runs
                fn()
            for _ in range(args.loops):
                fn()
        return
    if args.callgrind:
        for name in names:
            ir = callgrind(name, args.cg_loops)
            print(f"{name:16s} {ir:10.0f} instructions/request", flush=True)
        return
    print(f"Python {sys.version.split()[0]}, best of {args.repeat} x {args.number} calls")
    for name in names:
        ns = best_ns(table[name](), args.number, args.repeat)
        print(f"{name:16s} {ns:8.0f} ns/request", flush=True)


if __name__ == "__main__":
    main()
