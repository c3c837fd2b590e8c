"""Raw ONNX Runtime on this machine: the ceiling the served systems are compared with.

CPU execution provider, default session options (intra-op threads: every core).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort

from bench.models import BenchModel

BATCH_SIZES = (1, 4, 8, 16, 32, 64)
_WARMUP_S = 0.5


@dataclass(frozen=True)
class RawOrt:
    """Raw ONNX Runtime figures for one model."""

    batch1_ips: float
    """Inferences per second of a batch-1 ``session.run`` loop."""
    batch1_p50_ms: float
    best_ips: float
    """Inferences per second at the best batch size (rows of all batches run, per second)."""
    best_batch: int
    by_batch: dict[int, float]
    """Inferences per second for each batch size tried."""

    def to_json(self) -> dict[str, object]:
        """Plain JSON-able dict."""
        return asdict(self) | {"by_batch": {str(k): v for k, v in self.by_batch.items()}}

    @classmethod
    def median(cls, rounds: Sequence[RawOrt]) -> RawOrt:
        """Each figure's median over ``rounds``; the best batch is the best of the medians."""
        by_batch = {b: statistics.median(r.by_batch[b] for r in rounds) for b in rounds[0].by_batch}
        best = max(by_batch, key=lambda b: by_batch[b])
        return cls(
            batch1_ips=statistics.median(r.batch1_ips for r in rounds),
            batch1_p50_ms=statistics.median(r.batch1_p50_ms for r in rounds),
            best_ips=by_batch[best],
            best_batch=best,
            by_batch=by_batch,
        )


def _session(model: BenchModel) -> ort.InferenceSession:
    return ort.InferenceSession(model.data, providers=["CPUExecutionProvider"])


def _loop(session: ort.InferenceSession, x: np.ndarray, seconds: float) -> list[float]:
    """Run ``session`` on ``x`` for ``seconds``; return every call's latency in seconds."""
    latencies = []
    end = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        session.run(None, {"x": x})
        latencies.append(time.perf_counter() - started)
        if started >= end:
            return latencies


def measure(model: BenchModel, seconds: float, sweep_seconds: float) -> RawOrt:
    """Batch-1 loop for ``seconds``, then each of ``BATCH_SIZES`` for ``sweep_seconds``."""
    session = _session(model)
    one = np.ones((1, model.width), np.float32)
    _loop(session, one, _WARMUP_S)
    latencies = _loop(session, one, seconds)
    by_batch = {}
    for batch in BATCH_SIZES:
        x = np.ones((batch, model.width), np.float32)
        _loop(session, x, min(_WARMUP_S, sweep_seconds) / 2)
        runs = _loop(session, x, sweep_seconds)
        by_batch[batch] = batch * len(runs) / sum(runs)
    best = max(by_batch, key=lambda b: by_batch[b])
    return RawOrt(
        batch1_ips=len(latencies) / sum(latencies),
        batch1_p50_ms=float(np.percentile(latencies, 50)) * 1000,
        best_ips=by_batch[best],
        best_batch=best,
        by_batch=by_batch,
    )
