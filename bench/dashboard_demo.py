"""A minute of realistic traffic on the live dashboard, and a screenshot of it.

Runs `rtserve apps.native_app:app --dashboard` (the benchmark app: /hello, and /score with
~1 ms of CPU, a 200 ms stall on 1% of requests, a 50 ms deadline and a fallback), drives
it with bench/openloop.py from other processes (steady load, then 15 s at about twice what
/score can take, then steady again), and screenshots /dashboard in headless Chromium:

    .venv/bin/python bench/dashboard_demo.py --out docs/images/dashboard.png

Loopback only; about 75 s. Needs chromium (apt-get install chromium).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from tests.browser import Browser  # noqa: E402

from apps import logic  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(port: int, path: str, rate: float, seconds: float, body: Path | None) -> subprocess.Popen:
    args = [sys.executable, str(BENCH / "openloop.py"), "--port", str(port), "--rate",
            str(rate), "--duration", str(seconds), "--warmup", "0", "--path", path,
            "--max-conns", "200", "--init-conns", "16"]
    if body is not None:
        args += ["--body-file", str(body)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "dashboard.png"))
    p.add_argument("--seconds", type=float, default=60.0, help="traffic before the shot")
    p.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    a = p.parse_args()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="rtserve-demo-"))
    body = tmp / "tx.json"
    body.write_bytes(logic.sample_transaction())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH), str(ROOT / "src")]))
    server = subprocess.Popen(
        [sys.executable, "-m", "rtserve", "apps.native_app:app", "--bind", f"127.0.0.1:{port}",
         "--threads", "8", "--dashboard", "--log-level", "warning"], env=env, cwd=BENCH)
    loads: list[subprocess.Popen] = []
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/livez", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        total = a.seconds
        surge_at, surge_for = total * 0.4, 15.0
        # The browser opens first: its start-up takes a core for a second or two, which on
        # a small machine would show up on the page as a stall of the server.
        with Browser(a.chromium, width=1400, height=900) as browser:
            browser.goto(base + "/dashboard")
            browser.wait_for("document.body.dataset.state === 'live'")
            # The steady load runs past the screenshot, so "now" on the page is no lull.
            loads.append(load(port, "/hello", 300, total + 10, None))
            loads.append(load(port, "/score", 200, total + 10, body))
            time.sleep(surge_at)
            loads.append(load(port, "/score", 500, surge_for, body))  # more than it can take
            time.sleep(total - surge_at)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            browser.screenshot(a.out)
        print(a.out)
    finally:
        for proc in loads:
            proc.terminate()
            proc.wait(10)
        server.terminate()
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
