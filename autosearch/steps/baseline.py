"""Step 2: the float model as shipped, scored and timed on the target in this run."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autosearch.evaluate import FidelityEvaluator
from autosearch.steps import SearchContext
from autosearch.target import LatencyStats

__all__ = ["Baseline", "measure_baseline"]


@dataclass
class Baseline:
    """The float model's figures; every candidate's drop and speedup are against these."""

    path: Path
    accuracy: float
    latency: LatencyStats
    size_mb: float
    measured_at: str
    load_before: float = 0.0  # the machine's 1-minute load average before the run measured anything
    at: float = 0.0  # time.time() when the latency was measured

    @property
    def latency_ms(self) -> float:
        return self.latency.median_ms

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "latency_ms": self.latency_ms, "latency": self.latency.as_dict(),
                "size_mb": self.size_mb, "measured_at": self.measured_at, "load_before": self.load_before}


def measure_baseline(ctx: SearchContext) -> Baseline:
    """Save the float model into the study folder, score it (a fidelity evaluator takes its reference from
    it) and time it."""
    load_before = os.getloadavg()[0]
    ctx.study_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.source.save(ctx.study_dir / "baseline.onnx")
    sess = ctx.target.session(path)
    if isinstance(ctx.evaluator, FidelityEvaluator):
        ctx.evaluator.prepare(sess)
    acc = float(ctx.evaluator(sess))
    lat = ctx.target.profile(sess, ctx.source.example_feed)
    return Baseline(path, acc, lat, path.stat().st_size / 1e6, time.strftime("%Y-%m-%d %H:%M:%S"), load_before, time.time())
