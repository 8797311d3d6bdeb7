"""The app logic every benchmarked server runs, so that only the server differs.

Three endpoints:

- ``GET /hello``: a constant 13-byte text body (workloads A, B; nginx can serve it too).
- ``POST /score``: the fraud-scoring shape (workloads C, E). It parses a ~1 KiB JSON
  transaction, burns about 1 ms of CPU in a deterministic pure-Python loop, and every
  100th request (a process-wide counter) also blocks for 200 ms, like a model call that
  hit a cold cache or a slow feature store.
- ``GET /big``: 1 MiB of bytes (workload D).

The CPU loop's iteration count comes from ``BENCH_BURN_ITERS`` (set by bench/run.py after
calibrating it once on the benchmark CPU), so every server does exactly the same work.
"""

from __future__ import annotations

import itertools
import json
import os
import time

HELLO = b"Hello, world!"
BIG = b"x" * (1 << 20)
#: Default iterations of :func:`burn` when bench/run.py did not calibrate (about 1 ms on a
#: 2.6 GHz EPYC with CPython 3.11).
DEFAULT_BURN_ITERS = 11000
BURN_ITERS = int(os.environ.get("BENCH_BURN_ITERS", DEFAULT_BURN_ITERS))
STALL_EVERY = int(os.environ.get("BENCH_STALL_EVERY", "100"))
STALL_SECONDS = float(os.environ.get("BENCH_STALL_MS", "200")) / 1000.0

# itertools.count.__next__ is atomic under the GIL: a thread-safe request counter.
_counter = itertools.count(1)


def burn(iters: int = BURN_ITERS) -> int:
    """Spin the CPU in pure Python (holding the GIL) for ``iters`` rounds; deterministic."""
    acc = 0
    for i in range(iters):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


def score(body: bytes) -> bytes:
    """Score one JSON transaction: parse, ~1 ms CPU, 200 ms stall on 1 request in 100.

    Returns the JSON response body. Raises ``ValueError`` on a malformed body.
    """
    tx = json.loads(body)
    acc = burn()
    if STALL_EVERY and next(_counter) % STALL_EVERY == 0:
        time.sleep(STALL_SECONDS)
    amount = float(tx.get("amount", 0.0))
    risk = (acc % 1000) / 1000.0 * 0.1 + (0.5 if amount > 5000 else 0.0)
    decision = "decline" if risk > 0.5 else "approve"
    return json.dumps({"id": tx.get("id"), "decision": decision, "risk": round(risk, 4)}).encode()


def sample_transaction() -> bytes:
    """A ~1 KiB JSON transaction, the request body of workloads C and E."""
    tx = {
        "id": "tx-000000001",
        "amount": 129.95,
        "currency": "EUR",
        "merchant": {"id": "m-4821", "mcc": "5732", "country": "DE", "name": "Elektro Markt"},
        "card": {"bin": "457173", "last4": "4242", "country": "DE", "type": "credit"},
        "customer": {"id": "c-99812", "age_days": 812, "email_domain": "example.org"},
        "device": {"ip": "203.0.113.57", "ua": "Mozilla/5.0 (X11; Linux x86_64)", "fp": "a9f3"},
        "features": [round(i * 0.0137, 4) for i in range(48)],
    }
    raw = json.dumps(tx).encode()
    pad = max(0, 1024 - len(raw) - len(', "pad": ""'))
    tx["pad"] = "p" * pad
    return json.dumps(tx).encode()
