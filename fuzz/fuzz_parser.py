"""Long-running fuzzer for the request parser (atheris if installed, else hypothesis).

Why: the parser is the smuggling boundary; a few hundred examples in `make test` catch
regressions, hours of coverage-guided mutation catch what nobody thought to write down.

Each input is checked for:
  - only ParseError escapes (any other exception is a bug);
  - the outcome (requests, or the error status) is the same whether the bytes arrive whole,
    in pieces chosen by the input, or one byte at a time;
  - every returned request respects the limits;
  - whatever we accept, h11 (the lenient oracle) accepts with the same method, target,
    headers and body: we must never be the lenient one, except where an RFC tells a
    recipient to accept more than h11 does (BWS in chunk extensions, RFC 9112 7.1.1).

Run (from the repo root):
  .venv/bin/pip install atheris            # optional; falls back to hypothesis
  nice -n 19 .venv/bin/python fuzz/fuzz_parser.py --time 1800
  nice -n 19 .venv/bin/python fuzz/fuzz_parser.py --engine hypothesis --time 600
Findings go to fuzz/findings/ (the input bytes); the corpus to fuzz/corpus/ (git-ignored).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

LIMITS = {
    "max_request_line": 256,
    "max_header_block": 1024,
    "max_header_count": 12,
    "max_body_size": 512,
}
STATUSES = {400, 413, 414, 417, 431, 501, 505}


def seeds() -> list[bytes]:
    """Starting inputs: the conformance corpus and the unit tests' valid and invalid cases."""
    out: list[bytes] = []
    try:
        from tests.conformance.corpus import load_cases

        out += [case.raw for case in load_cases()]
    except Exception:  # the corpus is optional for fuzzing
        pass
    try:
        from tests.test_parser import REJECTIONS, STREAMS

        out += [data for data, _ in REJECTIONS.values()] + list(STREAMS.values())
    except Exception:
        pass
    if not out:
        out.append(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    return out


# The same exception as tests/test_parser_fuzz.py: BWS before the `;` of a chunk extension.
CHUNK_BWS_BEFORE_EXT = re.compile(rb"\r\n[0-9A-Fa-f]++[ \t]++;")


def make_checker():
    """Build check(data) with the parser imported (instrumented, under atheris)."""
    import h11

    from rtserve.errors import ParseError
    from rtserve.parser import NEED_DATA, RequestParser

    def run(pieces: list[bytes]) -> tuple[list[tuple], int | None, int]:
        parser = RequestParser(**LIMITS)
        out: list[tuple] = []
        fed = 0
        try:
            for piece in pieces:
                parser.feed(piece)
                fed += len(piece)
                while True:
                    if parser.buffered > fed:
                        raise AssertionError("buffered more than fed")
                    event = parser.next_event()
                    if event is NEED_DATA:
                        break
                    if len(event.body) > LIMITS["max_body_size"]:
                        raise AssertionError("body over the limit")
                    if len(event.raw_headers) > LIMITS["max_header_count"]:
                        raise AssertionError("too many headers returned")
                    out.append(
                        (
                            event.method,
                            event.target,
                            event.path,
                            event.query_string,
                            event.raw_headers,
                            event.body,
                            event.keep_alive,
                            event.expect_continue,
                        )
                    )
        except ParseError as exc:
            if exc.status not in STATUSES:
                raise AssertionError(f"unexpected status {exc.status}") from exc
            if parser.buffered or parser.pending is not None:
                raise AssertionError("dead parser still holds data") from exc
            return out, exc.status, 0
        return out, None, parser.buffered

    def h11_view(data: bytes):
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(data)
        req = conn.next_event()
        if not isinstance(req, h11.Request):
            return None
        body = b""
        while True:
            ev = conn.next_event()
            if isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                return None
        headers = [
            (
                n.decode("latin-1"),
                v.decode("latin-1").lower() if n == b"transfer-encoding" else v.decode("latin-1"),
            )
            for n, v in req.headers
        ]
        return req.method.decode("latin-1"), req.target.decode("latin-1"), headers, body

    def same(a: tuple, b: tuple) -> bool:
        """Same requests and verdict. Input breaking two rules (say a bad byte in an
        over-long line) may be refused for either, depending on how it arrived: a 400
        against a 414/431 is the same verdict."""
        if a[0] != b[0]:
            return False
        if a[1] == b[1]:
            return True
        return a[1] is not None and b[1] is not None and {a[1], b[1]} <= {400, 414, 431}

    def check(data: bytes) -> None:
        whole = run([data])
        # pieces chosen by the input itself, so the fuzzer can steer the split points
        step = (data[0] % 7 + 1) if data else 1
        pieces = [data[i : i + step] for i in range(0, len(data), step)]
        if not same(run(pieces), whole):
            raise AssertionError(f"split into {step}-byte pieces changed the outcome")
        if len(data) <= 4096 and not same(run([data[i : i + 1] for i in range(len(data))]), whole):
            raise AssertionError("byte-by-byte feeding changed the outcome")
        requests, status, leftover = whole
        if requests and status is None and leftover == 0 and len(requests) == 1:
            # one request, consumed exactly: the lenient oracle must agree on its meaning
            consumed = data
            while consumed.startswith(b"\r\n"):  # RFC 9112 2.2 leniency h11 lacks
                consumed = consumed[2:]
            try:
                theirs = h11_view(consumed)
            except h11.RemoteProtocolError as exc:
                if "chunk header" in str(exc) and CHUNK_BWS_BEFORE_EXT.search(consumed):
                    return  # RFC 9112 7.1.1 BWS: h11 refuses it, the grammar allows it
                raise AssertionError(f"we accept what h11 rejects: {exc}") from exc
            mine = requests[0]
            ours = (
                mine[0],
                mine[1],
                [(n, v.lower() if n == "transfer-encoding" else v) for n, v in mine[4]],
                mine[5],
            )
            if theirs is not None and theirs != ours:
                raise AssertionError(f"h11 reads it differently: {theirs!r} != {ours!r}")

    return check


def save_finding(data: bytes, error: BaseException) -> Path:
    folder = ROOT / "fuzz" / "findings"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("crash-" + hashlib.sha1(data).hexdigest()[:16])
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(f"{type(error).__name__}: {error}\n")
    return path


def run_atheris(seconds: int, extra: list[str]) -> int:
    import atheris

    with atheris.instrument_imports():
        check = make_checker()

    def one_input(data: bytes) -> None:
        try:
            check(data)
        except AssertionError as exc:
            print("FINDING saved to", save_finding(data, exc), flush=True)
            raise
        except Exception as exc:  # anything but ParseError escaping is a bug
            print("FINDING saved to", save_finding(data, exc), flush=True)
            raise

    corpus = ROOT / "fuzz" / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (ROOT / "fuzz" / "findings").mkdir(parents=True, exist_ok=True)
    for data in seeds():
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)
    argv = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={seconds}",
        "-max_len=4096",
        "-print_final_stats=1",
        "-timeout=10",
        f"-artifact_prefix={ROOT / 'fuzz' / 'findings'}/",
        *extra,
    ]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


def run_hypothesis(seconds: int) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from tests.test_parser_fuzz import fuzz_input

    check = make_checker()
    count = 0
    seed_inputs = seeds()
    for data in seed_inputs:
        check(data)
        count += 1

    @settings(
        max_examples=200,  # small batches so the time budget is kept
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(fuzz_input | st.sampled_from(seed_inputs))
    def batch(data: bytes) -> None:
        nonlocal count
        count += 1
        try:
            check(data)
        except Exception as exc:
            print("FINDING saved to", save_finding(data, exc), flush=True)
            raise

    start = time.monotonic()
    batches = 0
    while time.monotonic() - start < seconds:
        batch()
        batches += 1
    elapsed = time.monotonic() - start
    print(
        f"hypothesis: {count} executions in {elapsed:.0f} s ({count / elapsed:.0f}/s), no findings"
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", type=int, default=600, help="time budget in seconds")
    ap.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    args, extra = ap.parse_known_args()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    print(f"engine={engine} budget={args.time}s pid={os.getpid()}", flush=True)
    if engine == "atheris":
        return run_atheris(args.time, extra)
    return run_hypothesis(args.time)


if __name__ == "__main__":
    raise SystemExit(main())
