"""Scoring a candidate: labelled data + metric, or fidelity to the original model.

An evaluator is called with an ONNX Runtime ``InferenceSession`` of the
candidate and returns one float, higher is better. ``limit`` scores only the
first samples (the cheap first pass of early stopping).

Example:
    >>> import numpy as np
    >>> from autosearch.evaluate import LabelledEvaluator
    >>> ev = LabelledEvaluator(np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, 0, 1]))
    >>> ev.num_samples
    4
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from autosearch.errors import CandidateError, ConfigError

__all__ = ["Evaluator", "FidelityEvaluator", "LabelledEvaluator", "run_batched"]

Inputs = np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray]


@runtime_checkable
class Evaluator(Protocol):
    """Anything that scores a session; higher is better."""

    name: str

    def __call__(self, session: Any, *, limit: int | None = None) -> float: ...

    def calibration_feeds(self, n: int, input_names: Sequence[str]) -> list[dict[str, np.ndarray]]: ...


def _as_named(inputs: Inputs, names: Sequence[str]) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ConfigError(f"evaluation data lacks model input(s) {missing}; it has {sorted(inputs)}")
        return {n: np.asarray(inputs[n]) for n in names}
    arrays = [np.asarray(inputs)] if isinstance(inputs, np.ndarray) else [np.asarray(a) for a in inputs]
    if len(arrays) != len(names):
        raise ConfigError(f"evaluation data has {len(arrays)} array(s) but the model has {len(names)} input(s) {list(names)}")
    return dict(zip(names, arrays))


def _length(inputs: Inputs) -> int:
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    if isinstance(inputs, np.ndarray):
        return len(inputs)
    return len(inputs[0])


def run_batched(session: Any, inputs: Inputs, *, limit: int | None = None, batch_size: int = 64) -> list[np.ndarray]:
    """Run ``session`` over all samples, in batches where the batch dimension is free.

    Returns one array per model output, samples concatenated along axis 0.

    Raises:
        CandidateError: ONNX Runtime fails on the data.
        ConfigError: data shape does not fit the model.
    """
    metas = session.get_inputs()
    names = [m.name for m in metas]
    named = _as_named(inputs, names)
    n = _length(inputs) if limit is None else min(limit, _length(inputs))
    dim0 = metas[0].shape[0] if metas[0].shape else None
    step = dim0 if isinstance(dim0, int) and dim0 > 0 else batch_size
    for meta in metas:
        arr = named[meta.name]
        want = [d if isinstance(d, int) and d > 0 else None for d in meta.shape[1:]]
        if arr.ndim != len(meta.shape) or any(w is not None and w != s for w, s in zip(want, arr.shape[1:])):
            raise ConfigError(
                f"evaluation data for input {meta.name!r} has per-sample shape {list(arr.shape[1:])}, the model expects "
                f"{['?' if w is None else w for w in want]}"
            )
    outs: list[list[np.ndarray]] = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        feed = {k: v[start:stop] for k, v in named.items()}
        if stop - start < step and step != batch_size:  # fixed batch: pad the tail
            feed = {k: np.concatenate([v, np.repeat(v[-1:], step - (stop - start), axis=0)]) for k, v in feed.items()}
        try:
            res = session.run(None, feed)
        except Exception as exc:
            raise CandidateError(f"ONNX Runtime failed while scoring: {str(exc)[:600]}") from exc
        if not outs:
            outs = [[] for _ in res]
        for acc, r in zip(outs, res):
            acc.append(np.asarray(r)[: stop - start])
    return [np.concatenate(o) for o in outs]


def _calibration(inputs: Inputs, n: int, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    named = _as_named(inputs, names)
    total = _length(inputs)
    idx = np.linspace(0, total - 1, num=min(n, total)).astype(int)
    return [{k: v[i : i + 1] for k, v in named.items()} for i in idx]


class LabelledEvaluator:
    """Score on labelled data: top-1 accuracy by default, or any ``metric(outputs, labels)``.

    Args:
        inputs: Samples (array with samples on axis 0, a tuple of such arrays, or name -> array).
        labels: One label per sample.
        metric: ``"accuracy"`` (argmax of the first output) or a callable
            ``(outputs: list[np.ndarray], labels) -> float``.
        calibration: Samples used for quantization calibration and BatchNorm
            recalibration (default: the evaluation inputs themselves; pass training data).
        batch_size: Batch size where the model's batch dimension is free.
    """

    def __init__(
        self,
        inputs: Inputs,
        labels: np.ndarray,
        *,
        metric: str | Callable[[list[np.ndarray], np.ndarray], float] = "accuracy",
        calibration: Inputs | None = None,
        batch_size: int = 64,
    ) -> None:
        labels = np.asarray(labels)
        if len(labels) != _length(inputs):
            raise ConfigError(f"{_length(inputs)} input samples but {len(labels)} labels: give one label per sample")
        if isinstance(metric, str) and metric != "accuracy":
            raise ConfigError(f"metric {metric!r} is not known; use 'accuracy' or pass a callable (outputs, labels) -> float")
        self.inputs = inputs
        self.labels = labels
        self.metric = metric
        self.calibration = calibration if calibration is not None else inputs
        self.batch_size = batch_size
        self.name = "accuracy" if isinstance(metric, str) else getattr(metric, "__name__", "metric")

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __call__(self, session: Any, *, limit: int | None = None) -> float:
        outs = run_batched(session, self.inputs, limit=limit, batch_size=self.batch_size)
        labels = self.labels[: len(outs[0])]
        if callable(self.metric):
            return float(self.metric(outs, labels))
        return float((outs[0].reshape(len(labels), -1).argmax(axis=1) == labels).mean())

    def calibration_feeds(self, n: int, input_names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        return _calibration(self.calibration, n, input_names)


class FidelityEvaluator:
    """Label-free score: agreement of the candidate's outputs with the original model's.

    Metrics (each output is scored and the worst output counts, so one output with a
    large scale cannot hide another that broke):

    - ``"top1"``: fraction of samples whose argmax over the last axis matches.
    - ``"cosine"``: mean per-sample cosine similarity of each output (flattened per sample).

    Args:
        inputs: Samples, as for :class:`LabelledEvaluator`.
        metric: ``"top1"`` or ``"cosine"``.
        reference: The original outputs; computed by :meth:`prepare` when not given.
        calibration: Samples for calibration (default: ``inputs``).
    """

    def __init__(
        self,
        inputs: Inputs,
        *,
        metric: str = "cosine",
        reference: Sequence[np.ndarray] | None = None,
        calibration: Inputs | None = None,
        batch_size: int = 64,
    ) -> None:
        if metric not in ("top1", "cosine"):
            raise ConfigError(f"fidelity metric {metric!r} is not known; use 'top1' or 'cosine'")
        self.inputs = inputs
        self.metric = metric
        self.reference = None if reference is None else [np.asarray(r) for r in reference]
        self.calibration = calibration if calibration is not None else inputs
        self.batch_size = batch_size
        self.name = f"fidelity_{metric}"

    @property
    def num_samples(self) -> int:
        return _length(self.inputs)

    def prepare(self, reference_session: Any) -> None:
        """Compute the reference outputs with the original model (once)."""
        if self.reference is None:
            self.reference = run_batched(reference_session, self.inputs, batch_size=self.batch_size)

    def __call__(self, session: Any, *, limit: int | None = None) -> float:
        if self.reference is None:
            raise ConfigError("FidelityEvaluator has no reference outputs: call prepare(original_session) first")
        outs = run_batched(session, self.inputs, limit=limit, batch_size=self.batch_size)
        scores = []
        for got, ref in zip(outs, self.reference):
            ref = ref[: len(got)]
            if got.shape != ref.shape:
                raise CandidateError(f"candidate output shape {got.shape} differs from the original's {ref.shape}")
            if self.metric == "top1":
                scores.append(float((got.argmax(-1) == ref.argmax(-1)).mean()))
            else:
                g = got.reshape(len(got), -1).astype(np.float64)
                r = ref.reshape(len(ref), -1).astype(np.float64)
                denom = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
                cos = np.where(denom > 0, (g * r).sum(1) / np.maximum(denom, 1e-30), 1.0)
                scores.append(float(cos.mean()))
        return min(scores)

    def calibration_feeds(self, n: int, input_names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        return _calibration(self.calibration, n, input_names)
