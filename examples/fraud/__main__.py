"""`python -m examples.fraud [--redis URL] [--stall-share S --stall-ms MS] [rtserve options]`.

Sets the FRAUD_* variables the app factory reads (children of `--processes N` inherit
them), then runs rtserve on `examples.fraud:app` with the remaining options.
"""

from __future__ import annotations

import argparse
import os
import sys

from rtserve.cli import main as rtserve_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.fraud", add_help=False,
                                description="The fraud-scoring reference service on rtserve.")
    p.add_argument("--redis", help="feature store URL: redis://host:port/db or "
                                   "unix:///path.sock (default: in-process)")
    p.add_argument("--stall-share", type=float, help="share of feature fetches that stall")
    p.add_argument("--stall-ms", type=float, help="how long a stalled fetch takes")
    p.add_argument("--stall-mode", choices=("abandon", "block"))
    p.add_argument("--fraud-deadline-ms", type=float, help="POST /authorize deadline (20)")
    a, rest = p.parse_known_args(argv)
    for value, var in ((a.redis, "FRAUD_REDIS_URL"), (a.stall_share, "FRAUD_STALL_SHARE"),
                       (a.stall_ms, "FRAUD_STALL_MS"), (a.stall_mode, "FRAUD_STALL_MODE"),
                       (a.fraud_deadline_ms, "FRAUD_DEADLINE_MS")):
        if value is not None:
            os.environ[var] = str(value)
    return rtserve_main(["examples.fraud:app", *rest])


if __name__ == "__main__":
    sys.exit(main())
