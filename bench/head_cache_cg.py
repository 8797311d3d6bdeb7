#!/usr/bin/env python3
"""Instructions per parse of the request parser, for heads the cache knows and heads it never will.

Why: the parser keeps heads it has seen twice (head_cache.HeadCache; not chunked ones). A hit skips
the whole parse; a head that never repeats pays for the look-up and the set of heads seen once.
This prints both costs for a source tree, counted by callgrind (N then 2N parses in two
processes, the difference divided by N, so start-up cancels out):

  hit   one head, again and again (a keep-alive client polling one URL)
  miss  4096 heads differing in one field (X-Request-Id), cycled: never seen twice
        while the cache remembers them
  post  a scoring call: one POST head with Content-Length and a 1 KiB JSON body, head
        and body in one read, a new body each time

Usage: bench/head_cache_cg.py [--src PATH] [-n N]   (PATH: a tree's src/, default this one)
Compare with an older tree: git worktree add /tmp/old REF; bench/head_cache_cg.py --src /tmp/old/src
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from rtserve.parser import RequestParser
n, mode = int(sys.argv[2]), sys.argv[3]
heads = [b"GET /a/b?x=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n"
         b"X-Request-Id: %d\r\nAccept-Encoding: gzip\r\n\r\n" % i for i in range(4096)]
post = (b"POST /score HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1024\r\n\r\n")
bodies = [(b'{"id": %4d, ' % i).ljust(1023, b"x") + b"}" for i in range(4096)]
p = RequestParser()
for i in range(n):
    if mode == "post":
        p.feed(post + bodies[i % 4096])
    else:
        p.feed(heads[i % 4096] if mode == "miss" else heads[0])
    p.next_event()
"""


def instructions(src: Path, n: int, mode: str) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         "-c", CHILD, str(src), str(n), mode],
        capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
    )
    m = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    if m is None:
        raise RuntimeError(out.stderr[-2000:])
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=ROOT / "src")
    ap.add_argument("-n", type=int, default=5000)
    a = ap.parse_args()
    for mode in ("hit", "miss", "post"):
        per = (instructions(a.src, 2 * a.n, mode) - instructions(a.src, a.n, mode)) / a.n
        print(f"{mode}: {per:,.0f} instructions/parse ({a.src})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
