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

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from autosearch.errors import CandidateError, ConfigError
from autosearch.feeds import Inputs, Samples, batches_of, can_batch, session_ranks, stack_outputs
from autosearch.metrics import Metric, per_output, resolve_metric

__all__ = ["Evaluator", "FidelityEvaluator", "LabelledEvaluator", "default_evaluator", "evaluator_fingerprint", "run_batched"]


@runtime_checkable
class Evaluator(Protocol):
    """Anything that scores a session; higher is better."""

    name: str

    def __call__(self, session: Any, *, limit: int | None = None) -> float: ...

    def calibration_feeds(self, n: int, input_names: Sequence[str]) -> list[dict[str, np.ndarray]]: ...


def _length(inputs: Inputs) -> int:
    if isinstance(inputs, Samples):
        return inputs.n
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    if isinstance(inputs, np.ndarray):
        return len(inputs)
    return len(inputs) if inputs and isinstance(inputs[0], Mapping) else len(inputs[0])


def _arrays(inputs: Any, where: str = "") -> list[tuple[str, np.ndarray]]:
    """Every array of samples in any accepted form, with where it sits (``input 'x'``, ``sample 3, input 'x'``)."""
    if isinstance(inputs, Samples):
        inputs = inputs._feeds if inputs._feeds is not None else inputs._arrays
    if hasattr(inputs, "detach"):  # a torch tensor
        inputs = inputs.detach().cpu().numpy()
    if isinstance(inputs, np.ndarray) or np.isscalar(inputs):
        return [(where, np.asarray(inputs))]
    if isinstance(inputs, Mapping):
        return [a for k, v in inputs.items() for a in _arrays(v, f"{where}, input {k!r}" if where else f"input {k!r}")]
    if isinstance(inputs, (list, tuple)):
        feeds = bool(inputs) and isinstance(inputs[0], Mapping)
        return [a for i, v in enumerate(inputs)
                for a in _arrays(v, f"sample {i}" if feeds else (f"{where}, array {i}" if where else f"array {i}"))]
    return [(where, np.asarray(inputs))]


def _check_finite(inputs: Any, what: str) -> None:
    """NaN or inf in samples makes every score meaningless (and quantization calibration fail): refuse it."""
    for where, arr in _arrays(inputs):
        if arr.dtype.kind not in "fc":
            continue
        bad = ~np.isfinite(arr)
        if bad.any():
            first = int(np.argwhere(bad.reshape(len(arr), -1) if arr.ndim else bad.reshape(1, 1))[0][0])
            at = where if "sample" in where or not arr.ndim else ", ".join(filter(None, [f"sample {first}", where]))
            raise ConfigError(f"the {what} hold {int(bad.sum())} NaN or inf value(s) (first at {at or 'the scalar'}): clean "
                              "them or drop those samples before searching (np.isfinite finds them)")


def _metric_id(metric: Any) -> Any:
    """What names a metric in a fingerprint: a built-in's name, a callable's module and name, per output."""
    if isinstance(metric, str) or metric is None:
        return metric
    if isinstance(metric, Mapping):
        return {str(k): _metric_id(v) for k, v in metric.items()}
    return f"{getattr(metric, '__module__', '')}.{getattr(metric, '__qualname__', '')}:{getattr(metric, '__name__', type(metric).__name__)}"


def _fingerprint(kind: str, metric: Any, *parts: Any) -> str:
    """Hash of a scorer's kind, metric and data: every array's dtype, shape and bytes, in order."""
    h = hashlib.sha256(repr((kind, _metric_id(metric))).encode())
    for part in parts:
        if part is None:
            h.update(b"<none>")
            continue
        for where, arr in _arrays(part):
            arr = np.ascontiguousarray(arr)
            h.update(f"|{where}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(repr(arr.tolist()).encode() if arr.dtype.hasobject else arr.view(np.uint8).reshape(-1).data)
    return h.hexdigest()[:16]


def evaluator_fingerprint(evaluator: Any) -> tuple[str, bool]:
    """``(fingerprint, known)``: the evaluator's ``fingerprint()`` (a hash of its data and metric), or, for a
    scorer without one, ``name:<its name>`` and ``known=False`` (a change of its data cannot be told)."""
    fp = getattr(evaluator, "fingerprint", None)
    if callable(fp):
        return str(fp()), True
    return f"name:{getattr(evaluator, 'name', type(evaluator).__name__)}", False


def _check_shapes(session: Any, samples: Samples) -> None:
    feed = samples.feed(0)
    for meta in session.get_inputs():
        arr = np.asarray(feed[meta.name])
        want = [d if isinstance(d, int) and d > 0 else None for d in meta.shape]
        if arr.ndim != len(meta.shape) or any(w is not None and w != s for w, s in zip(want[1:], arr.shape[1:])):
            raise ConfigError(
                f"evaluation data for input {meta.name!r} has per-sample shape {list(arr.shape[1:]) if arr.ndim else []}, "
                f"the model expects {['?' if w is None else w for w in want[1:]]} (its input shape: "
                f"{['?' if w is None else w for w in want]}); a sample fed as is: {list(arr.shape)}"
            )


def _signature(session: Any) -> tuple[Any, ...]:
    return tuple((m.name, tuple(m.shape), m.type) for m in session.get_inputs())


def run_batched(
    session: Any,
    inputs: Inputs | Samples,
    *,
    limit: int | None = None,
    batch_size: int = 64,
    batchable: bool | None = None,
) -> list[Any]:
    """Run ``session`` over the samples: in batches where the model batches on axis 0, else one by one.

    Returns one entry per model output: the samples joined along axis 0, or a list of per-sample
    arrays where an output's shape varies from sample to sample.

    Args:
        batchable: Whether samples may be joined (``None``: checked on this session with
            :func:`autosearch.feeds.can_batch`).

    Raises:
        CandidateError: ONNX Runtime fails on the data.
        ConfigError: data shape does not fit the model.
    """
    metas = session.get_inputs()
    samples = inputs if isinstance(inputs, Samples) else Samples(inputs, [m.name for m in metas], ranks=session_ranks(session))
    n = samples.n if limit is None else min(limit, samples.n)
    _check_shapes(session, samples)
    dim0 = metas[0].shape[0] if metas[0].shape else None
    fixed = dim0 if isinstance(dim0, int) and dim0 > 1 else None
    if batchable is None:
        batchable = can_batch(session, samples.feeds(range(min(2, samples.n))))
    step = fixed or (batch_size if batchable else 1)
    per_run: list[list[np.ndarray]] = []
    counts: list[int | None] = []
    for feed, count in batches_of(samples, n, step, fixed=fixed):
        try:
            per_run.append(session.run(None, feed))
        except Exception as exc:
            raise CandidateError(f"ONNX Runtime failed while scoring: {str(exc)[:600]}") from exc
        counts.append(count)
    return stack_outputs(per_run, counts)


class _Scored:
    """Samples of an evaluator, and whether the model batches them (decided once, on the first session)."""

    def __init__(self, inputs: Inputs, calibration: Inputs | None, batch_size: int) -> None:
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise ConfigError("the evaluation data holds no sample")
        _check_finite(inputs, "evaluation inputs")
        if calibration is not None:
            _check_finite(calibration, "calibration samples")
        self.inputs = inputs
        self.calibration = calibration if calibration is not None else inputs
        self.batch_size = batch_size
        self._samples: dict[tuple[Any, ...], tuple[Samples, bool]] = {}
        self._ranks: dict[str, int] | None = None

    def _prepared(self, session: Any) -> tuple[Samples, bool]:
        sig = _signature(session)
        if sig not in self._samples:
            samples = Samples(self.inputs, [m.name for m in session.get_inputs()], ranks=session_ranks(session))
            _check_shapes(session, samples)
            self._samples[sig] = (samples, can_batch(session, samples.feeds(range(min(2, samples.n)))))
            self._ranks = session_ranks(session)
        return self._samples[sig]

    def run(self, session: Any, limit: int | None) -> list[Any]:
        samples, batchable = self._prepared(session)
        return run_batched(session, samples, limit=limit, batch_size=self.batch_size, batchable=batchable)

    def calibration_feeds(self, n: int, input_names: Sequence[str], ranks: Mapping[str, int] | None = None) -> list[dict[str, np.ndarray]]:
        return _calibration(self.calibration, n, input_names, ranks or self._ranks)


def _calibration(inputs: Inputs, n: int, names: Sequence[str], ranks: Mapping[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    samples = Samples(inputs, names, ranks=ranks)
    idx = np.linspace(0, samples.n - 1, num=min(n, samples.n)).astype(int)
    return samples.feeds(list(dict.fromkeys(int(i) for i in idx)))


class LabelledEvaluator:
    """Score on labelled data: top-1 accuracy by default, or any ``metric(outputs, labels)``.

    Args:
        inputs: Samples: an array with samples on axis 0, a tuple of such arrays, name -> array,
            or a list of complete feeds (see :mod:`autosearch.feeds`).
        labels: One label per sample.
        metric: ``"accuracy"`` (argmax of the first output) or a callable
            ``(outputs: list[np.ndarray], labels) -> float``.
        calibration: Samples used for quantization calibration and BatchNorm
            recalibration (default: the evaluation inputs themselves; pass training data).
        batch_size: Batch size where the model batches on axis 0.
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
        if metric == "accuracy":
            _check_class_labels(labels)
        self._data = _Scored(inputs, calibration, batch_size)
        self.inputs = inputs
        self.labels = labels
        self.metric = metric
        self.calibration = self._data.calibration
        self.batch_size = batch_size
        self.name = "accuracy" if isinstance(metric, str) else getattr(metric, "__name__", "metric")

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __call__(self, session: Any, *, limit: int | None = None) -> float:
        outs = self._data.run(session, limit)
        labels = self.labels[: self.num_samples if limit is None else min(limit, self.num_samples)]
        if callable(self.metric):
            return float(self.metric(outs, labels))
        first = outs[0] if not isinstance(outs[0], list) else np.concatenate([np.asarray(o).reshape(1, -1) for o in outs[0]])
        return float((np.asarray(first).reshape(len(labels), -1).argmax(axis=1) == labels).mean())

    def calibration_feeds(self, n: int, input_names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        return self._data.calibration_feeds(n, input_names)

    def fingerprint(self) -> str:
        """Hash of the metric, inputs, labels and calibration samples (a resumed study must match it)."""
        calib = None if self.calibration is self.inputs else self.calibration
        return _fingerprint("labelled", self.metric, self.inputs, self.labels, calib)

    def validate(self, session: Any) -> None:
        """Check the labels against the float model's output on the first batch (``accuracy`` only).

        Raises:
            ConfigError: a label outside the model's classes.
        """
        if self.metric != "accuracy":
            return
        n = min(self.num_samples, self.batch_size)
        outs = self._data.run(session, n)
        first = outs[0] if not isinstance(outs[0], list) else np.concatenate([np.asarray(o).reshape(1, -1) for o in outs[0]])
        classes = int(np.asarray(first).size // n)
        bad = np.flatnonzero(self.labels >= classes)
        if bad.size:
            raise ConfigError(
                f"label {self.labels[bad[0]].item()!r} (sample {int(bad[0])}; {bad.size} label(s) in all) is outside the model's "
                f"{classes} classes (its first output gives {classes} score(s) per sample, classes 0..{classes - 1}): "
                "pass class indices of this model's output, or a metric callable for other labels"
            )


def _check_class_labels(labels: np.ndarray) -> None:
    """Labels for ``accuracy`` are class indices: one integer >= 0 per sample."""
    if labels.ndim != 1:
        fix = "y.argmax(1) for one-hot labels" if labels.ndim == 2 and labels.shape[1] > 1 else "y.reshape(-1)"
        raise ConfigError(f"labels for metric 'accuracy' must be one class index per sample (shape (N,)), got shape "
                          f"{list(labels.shape)}: pass {fix}")
    if labels.dtype.kind not in "biuf":
        raise ConfigError(f"labels for metric 'accuracy' must be integer class indices, got dtype {labels.dtype}: map them "
                          "to indices, e.g. np.unique(y, return_inverse=True)[1]")
    if labels.dtype.kind == "f":
        frac = np.flatnonzero(~np.isfinite(labels) | (np.mod(np.nan_to_num(labels), 1) != 0))
        if frac.size:
            raise ConfigError(f"labels for metric 'accuracy' must be integer class indices; label {labels[frac[0]].item()!r} "
                              f"(sample {int(frac[0])}; {frac.size} in all) is not: pass y.astype(int) class indices "
                              "(or a metric callable for continuous targets)")
    neg = np.flatnonzero(labels < 0)
    if neg.size:
        raise ConfigError(f"labels for metric 'accuracy' must be class indices >= 0; label {labels[neg[0]].item()!r} "
                          f"(sample {int(neg[0])}; {neg.size} in all) is negative: remap them to 0..C-1")


class FidelityEvaluator:
    """Label-free score: agreement of the candidate's outputs with the original model's.

    Args:
        inputs: Samples, as for :class:`LabelledEvaluator`.
        metric: A built-in name (``scaled_cosine``, the default; ``cosine``; ``top1``; ``decision``;
            see :mod:`autosearch.metrics`), ``"package.module:function"``, a callable
            ``metric(outputs, reference) -> float`` (one entry per model output, samples joined on
            axis 0; 1.0 = identical), or a mapping output name -> metric (only those outputs are
            scored; the worst counts).
        reference: The original outputs; computed by :meth:`prepare` when not given.
        calibration: Samples for calibration (default: ``inputs``).
        batch_size: Batch size where the model batches on axis 0.

    Example:
        >>> from autosearch.metrics import argmax_agreement
        >>> ev = FidelityEvaluator(x, metric={"logits": argmax_agreement(-1)})   # doctest: +SKIP
    """

    def __init__(
        self,
        inputs: Inputs,
        *,
        metric: str | Metric | Mapping[str, str | Metric] = "scaled_cosine",
        reference: Sequence[Any] | None = None,
        calibration: Inputs | None = None,
        batch_size: int = 64,
    ) -> None:
        self._by_output = dict(metric) if isinstance(metric, Mapping) else None
        self._metric: Metric | None = None if self._by_output is not None else resolve_metric(metric)  # type: ignore[arg-type]
        self._data = _Scored(inputs, calibration, batch_size)
        self.inputs = inputs
        self.metric = metric
        self.reference = None if reference is None else list(reference)
        self._given_reference = self.reference
        self._ref_session: Any = None
        self._ref_limited: dict[int, list[Any]] = {}
        self.calibration = self._data.calibration
        self.batch_size = batch_size
        if self._by_output is not None:
            label = "+".join(f"{k}:{v if isinstance(v, str) else getattr(v, '__name__', 'metric')}" for k, v in self._by_output.items())
        else:
            label = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
        self.name = f"fidelity_{label}"

    @property
    def num_samples(self) -> int:
        return _length(self.inputs)

    def prepare(self, reference_session: Any) -> None:
        """Compute the reference outputs with the original model (once)."""
        if self._by_output is not None and self._metric is None:
            self._metric = per_output(self._by_output, [o.name for o in reference_session.get_outputs()])
        if self.reference is None:
            self.reference = self._data.run(reference_session, None)
            self._ref_session = reference_session

    def __call__(self, session: Any, *, limit: int | None = None) -> float:
        if self.reference is None or self._metric is None:
            raise ConfigError("FidelityEvaluator has no reference outputs: call prepare(original_session) first")
        outs = self._data.run(session, limit)
        ref = self.reference
        if limit is not None and limit < self.num_samples:
            if self._ref_session is not None:  # the original on the same subset (outputs need not batch on axis 0)
                if limit not in self._ref_limited:
                    self._ref_limited[limit] = self._data.run(self._ref_session, limit)
                ref = self._ref_limited[limit]
            else:
                ref = [r[: len(o)] for r, o in zip(ref, outs)]
        try:
            return float(self._metric(outs, ref))
        except (CandidateError, ConfigError):
            raise
        except Exception as exc:
            raise ConfigError(f"metric {self.name[len('fidelity_'):]!r} failed: {type(exc).__name__}: {exc}") from exc

    def calibration_feeds(self, n: int, input_names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        return self._data.calibration_feeds(n, input_names)

    def fingerprint(self) -> str:
        """Hash of the metric, inputs, calibration samples and given reference outputs (a resumed study must match it)."""
        calib = None if self.calibration is self.inputs else self.calibration
        return _fingerprint("fidelity", self.metric, self.inputs, calib, self._given_reference)


def default_evaluator(model: Any, *, n: int = 64) -> FidelityEvaluator:
    """The score used when none is given: scaled-cosine fidelity on ``n`` random feeds (seeds 0..n-1)."""
    from autosearch.model import random_feed

    return FidelityEvaluator([random_feed(model, seed=s) for s in range(n)], metric="scaled_cosine")
