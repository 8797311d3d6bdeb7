"""bench/wsgi_bench.py's cases still drive the worker path of today's rtserve: each one
builds, checks its first answer (a 200 with the expected body) and runs again."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import wsgi_bench  # noqa: E402


@pytest.mark.parametrize("case", sorted(wsgi_bench.cases()))
def test_every_case_answers_and_runs_again(case: str) -> None:
    run = wsgi_bench.cases()[case]()  # the runner asserts its first answer
    again = run()
    if isinstance(again, tuple):  # the worker path: (status, keep-alive, bytes)
        assert again[0] == 200 and isinstance(again[2], bytes)
    assert wsgi_bench.best_ns(run, number=3, repeat=1) > 0
