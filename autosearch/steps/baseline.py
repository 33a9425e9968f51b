"""Step 2: the float model as shipped, scored and timed on the target in this run."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autosearch.errors import ConfigError
from autosearch.evaluate import FidelityEvaluator, LabelledEvaluator, run_batched
from autosearch.steps import SearchContext
from autosearch.target import LatencyStats

__all__ = ["Baseline", "check_baseline_score", "measure_baseline", "metric_range"]


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
    check_baseline_score(ctx.evaluator, acc, sess)
    lat = ctx.target.profile(sess, ctx.source.example_feed)
    return Baseline(path, acc, lat, path.stat().st_size / 1e6, time.strftime("%Y-%m-%d %H:%M:%S"), load_before, time.time())


_RATES = ("accuracy", "top1", "decision")  # built-in scores that are a share of samples, in [0, 1]


def metric_range(evaluator: Any) -> tuple[float, float] | None:
    """The range of a built-in score (``accuracy``, ``top1``, ``decision``: [0, 1]; ``cosine``, ``scaled_cosine``:
    [-1, 1]); ``None`` for a metric callable or a scorer of the user's, whose range is not known."""
    metric = getattr(evaluator, "metric", None)
    if not isinstance(metric, str):
        return None
    if metric in _RATES:
        return 0.0, 1.0
    if metric in ("cosine", "scaled_cosine"):
        return -1.0, 1.0
    return None


def _nonfinite(outputs: Any, names: list[str]) -> str | None:
    """Where the first output holding NaN or inf is, with how many such values; ``None`` when all are finite."""
    for k, out in enumerate(outputs or []):
        for j, part in enumerate(out if isinstance(out, list) else [out]):
            a = np.asarray(part)
            if a.dtype.kind not in "fc":
                continue
            bad = ~np.isfinite(a)
            if bad.any():
                name = names[k] if k < len(names) else f"#{k}"
                at = (f"sample {j}" if isinstance(out, list) else
                      f"sample {int(np.argwhere(bad.reshape(len(a), -1))[0][0])}" if a.ndim else "the scalar")
                return f"output {name!r} holds {int(bad.sum())} NaN or inf value(s) of {a.size} (first at {at})"
    return None


def _values(a: np.ndarray, n: int = 6) -> str:
    """``3 value(s): 0, 1, 2`` (the first ``n`` distinct values)."""
    u = np.unique(a)
    shown = ", ".join(repr(v.item()) for v in u[:n]) + (", ..." if len(u) > n else "")
    return f"{len(u)} value(s): {shown}"


def check_baseline_score(evaluator: Any, score: float, session: Any) -> None:
    """The float model as shipped must score something meaningful on the user's data: a score that is not
    finite, float outputs holding NaN or inf, or a share-of-samples score of 0 means the data, the labels or the
    model are wrong (every candidate would be "feasible" against a floor below 0).

    Raises:
        ConfigError: saying what the outputs and (for labels) the labels looked like.
    """
    names = [o.name for o in session.get_outputs()]
    if isinstance(evaluator, FidelityEvaluator):
        outs = evaluator.reference
    elif hasattr(evaluator, "inputs"):
        outs = run_batched(session, evaluator.inputs, limit=64)
    else:
        outs = None
    where = _nonfinite(outs, names)
    if where is not None:
        raise ConfigError(f"the float model's {where} on the evaluation data, so no score means anything: check the inputs "
                          "(dtype, scaling, NaN-free) and that the model runs in float32 on ONNX Runtime")
    rng = metric_range(evaluator)
    name = getattr(evaluator, "name", "score")
    what = f"the float model scores {name} {score!r} on the evaluation data"
    if isinstance(evaluator, LabelledEvaluator):
        labels = np.asarray(evaluator.labels)
        first = np.asarray(outs[0]) if outs and not isinstance(outs[0], list) else np.zeros(0)
        rows = first.reshape(len(first), -1) if first.ndim >= 1 and len(first) else None
        classes = rows.shape[1] if rows is not None else None
        pred = f"; of its {classes} classes it predicts {_values(rows.argmax(1))}" if rows is not None else ""
        booleans = evaluator.metric == "accuracy" and labels.dtype == np.bool_ and classes is not None and classes > 2
        if booleans or not np.isfinite(score) or (rng is not None and rng[0] == 0.0 and score == 0.0):
            why = f"boolean labels for a model of {classes} classes" if booleans else "the labels do not match its outputs"
            raise ConfigError(f"{what}: {why} (labels: dtype {labels.dtype}, {_values(labels)}){pred}; pass 'y' as this "
                              "model's class indices 0..C-1 (e.g. y.argmax(1) of one-hot labels, not booleans), or a "
                              "metric callable for other labels")
        return
    if np.isfinite(score) and not (rng is not None and rng[0] == 0.0 and score == 0.0):
        return
    raise ConfigError(f"{what}: the data or the metric is wrong (the original scored against itself should give a "
                      "finite, non-zero score); check the inputs and the metric")
