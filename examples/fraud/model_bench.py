"""Which runtime scores one transaction fastest, and does it let other threads run?

Trains the same gradient-boosted ensemble (same trees, leaves and learning rate, same
simulated data) with LightGBM and scikit-learn's HistGradientBoosting, converts both to
ONNX, and measures four ways of scoring one row as the service does (a Python list of
floats in, a probability out):

- single-row latency, p50 and p99 over `--calls` calls on one thread;
- GIL: the speed a pure-Python counting thread keeps while another thread predicts in a
  loop, as a share of its speed alone (1.0 = predict never holds the GIL; ~0.5 = it
  holds it like pure Python would, the two threads taking turns);
- two threads predicting at once: total predictions/s over one thread's (2.0 = parallel),
  for single rows and for batches of `--batch` rows (where native work dominates, so a
  runtime that releases the GIL in its kernels shows it).

Each runtime is measured in a process of its own (two OpenMP runtimes in one process
disturb each other's timings). Native thread pools are limited to one thread
(threadpoolctl, `num_threads=1`, `intra_op_num_threads=1`): the service scores one row per
request on its worker threads, and a per-call OpenMP pool only adds wake-up latency.

    .venv/bin/python -m examples.fraud.model_bench            # about a minute on 2 cores

The figures depend on the machine and its load; run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from .dataset import build

TREES, LEAVES, RATE = 150, 15, 0.08


def _lightgbm(x: np.ndarray, y: np.ndarray):
    import lightgbm as lgb

    m = lgb.LGBMClassifier(n_estimators=TREES, num_leaves=LEAVES, learning_rate=RATE,
                           random_state=13, verbose=-1, n_jobs=2)
    m.fit(x, y)
    return m


def _hgb(x: np.ndarray, y: np.ndarray):
    from sklearn.ensemble import HistGradientBoostingClassifier

    m = HistGradientBoostingClassifier(max_iter=TREES, max_leaf_nodes=LEAVES,
                                       learning_rate=RATE, early_stopping=False,
                                       random_state=13)
    m.fit(x, y)
    return m


Predict = Callable[[list[list[float]]], object]


def _onnx_session(onnx_bytes: bytes) -> Predict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = [sess.get_outputs()[1].name]

    def predict(rows: list[list[float]]) -> object:
        return sess.run(out, {name: np.asarray(rows, dtype=np.float32)})[0][:, 1]

    return predict


def _lgb_onnx(x: np.ndarray, y: np.ndarray) -> Predict:
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    types = [("x", FloatTensorType([None, x.shape[1]]))]
    return _onnx_session(convert_lightgbm(_lightgbm(x, y), initial_types=types, zipmap=False,
                                          target_opset=15).SerializeToString())


def _hgb_onnx(x: np.ndarray, y: np.ndarray) -> Predict:
    from skl2onnx import to_onnx

    return _onnx_session(to_onnx(_hgb(x, y), x[:1], options={"zipmap": False},
                                 target_opset={"": 15, "ai.onnx.ml": 3}).SerializeToString())


def _lgb_native(x: np.ndarray, y: np.ndarray) -> Predict:
    booster = _lightgbm(x, y).booster_
    return lambda rows: booster.predict(np.asarray(rows, dtype=np.float64), num_threads=1)


def _hgb_native(x: np.ndarray, y: np.ndarray) -> Predict:
    hgb = _hgb(x, y)
    return lambda rows: hgb.predict_proba(np.asarray(rows, dtype=np.float32))[:, 1]


#: name -> trains the model and returns its predict function (rows in, probabilities out).
CANDIDATES: dict[str, Callable[[np.ndarray, np.ndarray], Predict]] = {
    "lightgbm Booster.predict": _lgb_native,
    "sklearn HGB predict_proba": _hgb_native,
    "onnxruntime (from LightGBM)": _lgb_onnx,
    "onnxruntime (from HGB)": _hgb_onnx,
}


def latency_us(predict: Predict, rows: list[list[float]], calls: int) -> tuple[float, float]:
    """p50 and p99 of one single-row call, in microseconds."""
    for row in rows[:50]:
        predict([row])
    samples = []
    for i in range(calls):
        row = rows[i % len(rows)]
        t0 = time.perf_counter_ns()
        predict([row])
        samples.append((time.perf_counter_ns() - t0) / 1000)
    q = statistics.quantiles(samples, n=100)
    return q[49], q[98]


def _count_for(seconds: float, stop: threading.Event, out: list[int]) -> None:
    n, t_end = 0, time.perf_counter() + seconds
    while time.perf_counter() < t_end and not stop.is_set():
        for _ in range(1000):
            n += 1
    out.append(n)


def gil_share(predict: Predict, rows: list[list[float]], seconds: float) -> float:
    """Speed of a pure-Python counter while predict() runs in a loop / its speed alone."""
    alone: list[int] = []
    _count_for(seconds, threading.Event(), alone)
    busy: list[int] = []
    stop = threading.Event()
    counter = threading.Thread(target=_count_for, args=(seconds, stop, busy))
    counter.start()
    i = 0
    while counter.is_alive():
        predict([rows[i % len(rows)]])
        i += 1
    counter.join()
    return busy[0] / alone[0]


def parallel_speedup(predict: Predict, rows: list[list[float]], seconds: float, batch: int
                     ) -> float:
    """Calls/s of two threads together over one thread's, `batch` rows per call."""
    batches = [rows[i:i + batch] for i in range(0, len(rows) - batch + 1, batch)]

    def loop(out: list[int], t_end: float) -> None:
        n = 0
        while time.perf_counter() < t_end:
            predict(batches[n % len(batches)])
            n += 1
        out.append(n)

    one: list[int] = []
    loop(one, time.perf_counter() + seconds)
    two: list[int] = []
    t_end = time.perf_counter() + seconds
    ts = [threading.Thread(target=loop, args=(two, t_end)) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(two) / one[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cards", type=int, default=1500)
    p.add_argument("--days", type=float, default=15.0)
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--only", choices=sorted(CANDIDATES), help="measure one, in this process")
    p.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="sys.setswitchinterval, as rtserve sets it (default 0.5)")
    a = p.parse_args(argv)
    if not a.only:
        return _each_in_its_process(argv or sys.argv[1:])
    sys.setswitchinterval(a.switch_interval_ms / 1000)
    ds = build(13, a.cards, a.days)
    train, test = ds.split(0.8)
    x = np.asarray(train.rows, dtype=np.float32)
    y = np.asarray(train.labels)
    rows = test.rows[:2000]
    from threadpoolctl import threadpool_limits

    name = a.only
    try:
        predict = CANDIDATES[name](x, y)
    except (TypeError, ValueError) as exc:  # skl2onnx lags behind scikit-learn releases
        json.dump({name: {"error": str(exc)[:200]}}, sys.stdout)
        return 0
    # After the runtime is loaded: threadpoolctl limits only the libraries loaded by then.
    with threadpool_limits(1):
        p50, p99 = latency_us(predict, rows, a.calls)
        r = {
            "p50_us": round(p50, 1), "p99_us": round(p99, 1),
            "gil_share_kept": round(gil_share(predict, rows, a.seconds), 2),
            "two_thread_speedup_1_row": round(parallel_speedup(predict, rows, a.seconds, 1), 2),
            f"two_thread_speedup_{a.batch}_rows": round(
                parallel_speedup(predict, rows, a.seconds, a.batch), 2),
            "load_average_1m": round(os.getloadavg()[0], 2),
        }
    json.dump({name: r}, sys.stdout)
    return 0


def _each_in_its_process(argv: list[str]) -> int:
    results: dict[str, dict] = {}
    for name in CANDIDATES:
        out = subprocess.run([sys.executable, "-m", "examples.fraud.model_bench", *argv,
                              "--only", name], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])[name]
        results[name] = r
        if "error" in r:
            print(f"{name:28s} failed: {r['error'][:90]}", file=sys.stderr, flush=True)
            continue
        batch = next(k for k in r if k.endswith("_rows"))
        print(f"{name:28s} p50 {r['p50_us']:7.1f} us  p99 {r['p99_us']:7.1f} us  counter "
              f"keeps {r['gil_share_kept']:.2f}  2 threads {r['two_thread_speedup_1_row']:.2f}x"
              f" (1 row) {r[batch]:.2f}x ({batch.split('_')[-2]} rows)  "
              f"load {r['load_average_1m']}", file=sys.stderr, flush=True)
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
