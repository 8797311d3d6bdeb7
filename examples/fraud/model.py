"""The fraud model at serving time: the ONNX ensemble, its thresholds, its measured cost.

ONNX Runtime runs the trees (chosen by measurement, see README.md): about 20 us for one
row, with its thread pools set to one thread, since every request scores one row on its
own worker. The model also keeps a running p99 of its own latency, which the service
compares with a request's remaining time to decide whether the model still fits.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .features import FEATURE_NAMES, Features

HERE = Path(__file__).resolve().parent
DEFAULT_PATH = HERE / "model.onnx"


class LatencyEstimate:
    """A high quantile of the last `window` samples (seconds), refreshed every `every`."""

    def __init__(self, window: int = 512, every: int = 64, quantile: float = 0.99) -> None:
        self._samples: list[float] = []
        self._window = window
        self._every = every
        self._q = quantile
        self._next = 0
        self._n = 0
        self._lock = threading.Lock()
        self.value = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            if len(self._samples) < self._window:
                self._samples.append(seconds)
            else:
                self._samples[self._next] = seconds
                self._next = (self._next + 1) % self._window
            self._n += 1
            if self._n % self._every == 0 or self._n <= 16:
                ordered = sorted(self._samples)
                self.value = ordered[min(len(ordered) - 1, int(self._q * len(ordered)))]


class Model:
    """Scores Features with the ONNX ensemble; decides with the thresholds in model.json."""

    def __init__(self, path: Path = DEFAULT_PATH, warmup: int = 200) -> None:
        meta = json.loads(path.with_suffix(".json").read_text())
        if tuple(meta["features"]) != FEATURE_NAMES:
            raise ValueError(f"{path} was trained on other features: retrain it "
                             "(python -m examples.fraud.train)")
        self.decline_at = float(meta["thresholds"]["decline"])
        self.review_at = float(meta["thresholds"]["review"])
        self.meta = meta
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), opts,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._outputs = [self._session.get_outputs()[1].name]  # probabilities
        self.latency = LatencyEstimate()
        zero = [0.0] * len(FEATURE_NAMES)
        for _ in range(warmup):
            self.score_row(zero)

    def score_row(self, row: list[float]) -> float:
        """The fraud probability of one feature row; its time feeds `latency`."""
        t0 = time.perf_counter()
        x = np.array([row], dtype=np.float32)
        p = float(self._session.run(self._outputs, {self._input: x})[0][0, 1])
        self.latency.add(time.perf_counter() - t0)
        return p

    def score(self, features: Features) -> float:
        return self.score_row(features.row())

    def decision(self, p: float) -> str:
        return "decline" if p >= self.decline_at else "review" if p >= self.review_at else \
            "approve"
