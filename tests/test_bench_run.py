"""bench/run.py's order of points: a server and its `--baseline` twin alternate.

A before/after ratio compares an rtserve server with `NAME@REF`, the same server on an
older tree; on a VM whose speed moves between minutes, the two must run side by side,
point by point, not one sweep after the other (`pair_with_twins` groups them).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import run  # noqa: E402


def by_name() -> dict[str, run.Server]:
    return {s.name: s for s in run.SERVERS}


def test_each_rtserve_server_is_grouped_with_its_own_twin_only():
    srv = by_name()
    twin = run.baseline_twin(srv["rtserve"], "main~1", ROOT / "src")
    wsgi_twin = run.baseline_twin(srv["rtserve-wsgi"], "main~1", ROOT / "src")
    order = [srv["rtserve"], twin, srv["rtserve-wsgi"], wsgi_twin, srv["granian"]]
    groups = [[s.name for s in g] for g in run.pair_with_twins(order)]
    assert groups == [["rtserve", "rtserve@main~1"], ["rtserve-wsgi", "rtserve-wsgi@main~1"],
                      ["granian"]]


def test_without_a_baseline_every_server_is_its_own_group():
    srv = by_name()
    order = [srv["rtserve"], srv["rtserve-wsgi"], srv["uvicorn"], srv["granian"]]
    assert [[s.name for s in g] for g in run.pair_with_twins(order)] == [
        ["rtserve"], ["rtserve-wsgi"], ["uvicorn"], ["granian"]]
