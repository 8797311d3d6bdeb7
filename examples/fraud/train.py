"""Retrain the fraud model: simulate, compute features, fit, choose thresholds, export.

    .venv/bin/pip install -e '.[fraud-train]'
    .venv/bin/python -m examples.fraud.train        # about a minute on 2 cores

Writes examples/fraud/model.onnx (the ensemble, run by onnxruntime) and model.json (its
feature order, decision thresholds, and its quality on a held-out set). The data is the
seeded simulator (examples/fraud/simulate.py) replayed through the service's own feature
store, split by time: the first 70% trains, the next 10% chooses the thresholds, the last
20% is held out and only measured. LightGBM trains (fast, small trees); the model is
served through ONNX Runtime, chosen by measurement (examples/fraud/model_bench.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .dataset import Dataset, build
from .features import FEATURE_NAMES

HERE = Path(__file__).resolve().parent
PARAMS = {"n_estimators": 150, "num_leaves": 15, "learning_rate": 0.08,
          "min_child_samples": 20, "subsample": 0.8, "subsample_freq": 1,
          "colsample_bytree": 0.9}
DECLINE_PRECISION = 0.95  # decline only where validation says 95% of declines are fraud
REVIEW_RECALL = 0.90  # review or decline catches 90% of validation fraud


def _threshold_for_precision(p: np.ndarray, y: np.ndarray, target: float) -> float:
    """The lowest threshold whose precision on (p, y) is at least `target`."""
    order = np.argsort(-p)
    tp = np.cumsum(y[order])
    precision = tp / np.arange(1, len(p) + 1)
    ok = np.nonzero(precision >= target)[0]
    # The last rank (in descending score) that still meets the target; ties are resolved
    # towards the higher threshold.
    return float(p[order][ok[-1]]) if len(ok) else 1.0


def _threshold_for_recall(p: np.ndarray, y: np.ndarray, target: float) -> float:
    """The highest threshold that flags at least `target` of the positives."""
    pos = np.sort(p[y == 1])[::-1]
    k = max(0, int(np.ceil(target * len(pos))) - 1)
    return float(pos[k]) if len(pos) else 0.5


def quality(p: np.ndarray, y: np.ndarray, patterns: list[str], threshold: float) -> dict:
    """Precision, recall and false-positive rate of `p >= threshold`, and recall by pattern."""
    flag = p >= threshold
    tp = int(np.sum(flag & (y == 1)))
    fp = int(np.sum(flag & (y == 0)))
    fn = int(np.sum(~flag & (y == 1)))
    pats = np.asarray(patterns)
    by = {}
    for name in sorted(set(patterns) - {"legit"}):
        idx = pats == name
        by[name] = {"n": int(idx.sum()), "recall": round(float(flag[idx].mean()), 3)}
    return {
        "threshold": round(threshold, 4),
        "precision": round(tp / (tp + fp), 3) if tp + fp else None,
        "recall": round(tp / (tp + fn), 3) if tp + fn else None,
        "false_positive_rate": round(fp / max(1, int(np.sum(y == 0))), 5),
        "flagged": tp + fp,
        "recall_by_pattern": by,
    }


def fit(train: Dataset, seed: int):
    import lightgbm as lgb

    m = lgb.LGBMClassifier(**PARAMS, random_state=seed, verbose=-1, n_jobs=2,
                           deterministic=True, force_row_wise=True)
    m.fit(np.asarray(train.rows, dtype=np.float32), np.asarray(train.labels))
    return m


def export_onnx(model, n_features: int) -> bytes:
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    onx = convert_lightgbm(model, initial_types=[("x", FloatTensorType([None, n_features]))],
                           zipmap=False, target_opset=15)
    return onx.SerializeToString()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Retrain examples/fraud/model.onnx.")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--cards", type=int, default=4000)
    p.add_argument("--days", type=float, default=30.0)
    p.add_argument("--out", type=Path, default=HERE)
    a = p.parse_args(argv)

    ds = build(a.seed, a.cards, a.days)
    train, val, test = ds.split(0.7, 0.1)
    model = fit(train, a.seed)
    p_val = model.predict_proba(np.asarray(val.rows, dtype=np.float32))[:, 1]
    y_val = np.asarray(val.labels)
    decline_at = _threshold_for_precision(p_val, y_val, DECLINE_PRECISION)
    review_at = min(decline_at, _threshold_for_recall(p_val, y_val, REVIEW_RECALL))

    x_test = np.asarray(test.rows, dtype=np.float32)
    y_test = np.asarray(test.labels)
    p_test = model.predict_proba(x_test)[:, 1]
    onnx_bytes = export_onnx(model, len(FEATURE_NAMES))

    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    p_onnx = sess.run([sess.get_outputs()[1].name], {"x": x_test})[0][:, 1]
    drift = float(np.max(np.abs(p_onnx - p_test)))
    if drift > 1e-4:
        raise SystemExit(f"ONNX export disagrees with LightGBM by {drift}")

    import lightgbm
    from sklearn.metrics import average_precision_score

    meta = {
        "features": list(FEATURE_NAMES),
        "thresholds": {"decline": round(decline_at, 4), "review": round(review_at, 4)},
        "trained_with": {"lightgbm": lightgbm.__version__, "params": PARAMS,
                         "seed": a.seed, "cards": a.cards, "days": a.days},
        "data": {"transactions": len(ds.rows), "fraud": int(sum(ds.labels)),
                 "train": len(train.rows), "validation": len(val.rows),
                 "held_out": len(test.rows), "held_out_fraud": int(y_test.sum()),
                 "patterns_held_out": dict(Counter(test.patterns))},
        "held_out": {
            "average_precision": round(float(average_precision_score(y_test, p_test)), 4),
            "decline": quality(p_test, y_test, test.patterns, decline_at),
            "review_or_decline": quality(p_test, y_test, test.patterns, review_at),
        },
        "onnx_max_abs_diff": drift,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "model.onnx").write_bytes(onnx_bytes)
    (a.out / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta["held_out"], indent=1))
    print(f"model.onnx: {len(onnx_bytes) / 1024:.0f} KiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
