"""Task metrics of fidelity: a candidate's outputs against the original model's.

A metric is any callable ``metric(outputs, reference) -> float``, higher is better and
1.0 when the candidate reproduces the original. ``outputs`` and ``reference`` hold one
entry per model output (graph order): an array with the samples joined along axis 0,
or, for an output whose shape varies from sample to sample, a list of per-sample arrays.

Built-ins (by name in :func:`resolve_metric`, the CLI's ``--metric`` and
``FidelityEvaluator(metric=...)``):

- ``scaled_cosine`` (the default): cosine per sample, computed separately for each band
  of channels whose scales differ by 100x or more (box pixels next to class scores in one
  YOLO output), the worst band and output counting. Where an output has one scale it is
  the plain cosine. A whole-output cosine reads 0.998 on a detector whose int8 head lost
  most detections; this one does not.
- ``cosine``: mean per-sample cosine of each output, worst output.
- ``top1`` / ``argmax``: fraction of positions whose argmax over the last axis agrees
  (classification; per position for sequence/CTC outputs). :func:`argmax_agreement` takes another axis.
- ``decision``: fraction of values on the same side of 0.5 (VAD, binary outputs);
  :func:`decision_agreement` takes another threshold.

Example:
    >>> import numpy as np
    >>> ref = [np.array([[0.1, 0.9], [0.8, 0.2]])]
    >>> top1(ref, ref), top1([np.array([[0.9, 0.1], [0.8, 0.2]])], ref)
    (1.0, 0.5)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from autosearch.errors import CandidateError, ConfigError

__all__ = [
    "Metric",
    "argmax_agreement",
    "cosine",
    "decision_agreement",
    "per_output",
    "resolve_metric",
    "scale_bands",
    "scaled_cosine",
    "top1",
]

Metric = Callable[[Sequence[Any], Sequence[Any]], float]


def _pairs(outputs: Sequence[Any], reference: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(got, ref) array pairs, per output; a per-sample list output gives one pair per sample."""
    if len(outputs) != len(reference):
        raise CandidateError(f"the candidate has {len(outputs)} output(s), the original {len(reference)}")
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for got, ref in zip(outputs, reference):
        if isinstance(got, list) or isinstance(ref, list):
            if not (isinstance(got, list) and isinstance(ref, list)) or len(got) != len(ref):
                raise CandidateError("candidate and original outputs differ in how they vary from sample to sample")
            out.extend((np.asarray(g), np.asarray(r)) for g, r in zip(got, ref))
            continue
        got, ref = np.asarray(got), np.asarray(ref)
        if got.shape != ref.shape:
            raise CandidateError(f"candidate output shape {got.shape} differs from the original's {ref.shape}")
        out.append((got, ref))
    return out


def _per_output(outputs: Sequence[Any], reference: Sequence[Any], fn: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """``fn`` on each output (the mean over samples for a per-sample list), worst output counts."""
    if len(outputs) != len(reference):
        raise CandidateError(f"the candidate has {len(outputs)} output(s), the original {len(reference)}")
    scores = []
    for got, ref in zip(outputs, reference):
        pairs = _pairs([got], [ref])
        vals = [fn(g, r) for g, r in pairs if r.size]
        if vals:
            scores.append(float(np.mean(vals)))
    return min(scores) if scores else 1.0


def _sample_cosine(got: np.ndarray, ref: np.ndarray) -> float:
    if ref.ndim == 0:
        got, ref = got.reshape(1, 1), ref.reshape(1, 1)
    g = got.reshape(len(got), -1).astype(np.float64)
    r = ref.reshape(len(ref), -1).astype(np.float64)
    if not np.isfinite(g).all():
        return 0.0
    denom = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
    both_zero = (np.linalg.norm(g, axis=1) == 0) & (np.linalg.norm(r, axis=1) == 0)
    cos = np.where(denom > 0, (g * r).sum(1) / np.maximum(denom, 1e-300), np.where(both_zero, 1.0, 0.0))
    return float(cos.mean())


def cosine(outputs: Sequence[Any], reference: Sequence[Any]) -> float:
    """Mean per-sample cosine similarity of each output (flattened per sample); the worst output counts."""
    return _per_output(outputs, reference, _sample_cosine)


def scale_bands(ref: np.ndarray, *, decades: float = 2.0, max_channels: int = 4096) -> tuple[int, list[np.ndarray]] | None:
    """The channel axis of ``ref`` and its bands of channels on one scale, or ``None`` for one scale.

    For every non-sample axis of 2 to ``max_channels`` entries, the root mean square of each
    slice is taken over the data; the axis whose sorted slice magnitudes show the widest gap is
    the channel axis, and it is cut at every gap of at least ``decades`` powers of ten.
    Channels that are zero everywhere join the smallest band.
    """
    if ref.ndim < 2 or not np.issubdtype(ref.dtype, np.floating):
        return None
    best: tuple[float, int, np.ndarray] | None = None
    data = np.abs(ref.astype(np.float64))
    for axis in range(1, ref.ndim):
        size = ref.shape[axis]
        if not 2 <= size <= max_channels:
            continue
        other = tuple(a for a in range(ref.ndim) if a != axis)
        rms = np.sqrt(np.mean(data**2, axis=other))
        nz = rms > 0
        if nz.sum() < 2:
            continue
        logs = np.log10(rms[nz])
        gap = float(np.max(np.diff(np.sort(logs))))
        if best is None or gap > best[0]:
            best = (gap, axis, rms)
    if best is None or best[0] < decades:
        return None
    _, axis, rms = best
    nz_idx = np.flatnonzero(rms > 0)
    order = nz_idx[np.argsort(np.log10(rms[nz_idx]))]
    logs = np.log10(rms[order])
    cuts = np.flatnonzero(np.diff(logs) >= decades) + 1
    bands = [np.asarray(b) for b in np.split(order, cuts)]
    zeros = np.flatnonzero(rms == 0)
    if zeros.size:
        bands[0] = np.sort(np.concatenate([bands[0], zeros]))
    return axis, [np.sort(b) for b in bands]


def _sample_scaled_cosine(got: np.ndarray, ref: np.ndarray) -> float:
    whole = _sample_cosine(got, ref)
    split = scale_bands(ref) if ref.ndim >= 2 else None
    if split is None:
        return whole
    axis, bands = split
    return min([whole] + [_sample_cosine(np.take(got, b, axis=axis), np.take(ref, b, axis=axis)) for b in bands])


def scaled_cosine(outputs: Sequence[Any], reference: Sequence[Any]) -> float:
    """Cosine per sample, separately for each band of channels on one scale (see :func:`scale_bands`);
    the worst band of the worst output counts. Equal to :func:`cosine` where outputs have one scale."""
    return _per_output(outputs, reference, _sample_scaled_cosine)


def argmax_agreement(axis: int = -1) -> Metric:
    """Fraction of positions whose argmax along ``axis`` agrees with the original's (worst output)."""

    def argmax(outputs: Sequence[Any], reference: Sequence[Any]) -> float:
        def agree(g: np.ndarray, r: np.ndarray) -> float:
            if r.ndim == 0 or r.shape[axis] < 2:
                return 1.0
            return float((g.argmax(axis) == r.argmax(axis)).mean())

        return _per_output(outputs, reference, agree)

    argmax.__name__ = "top1" if axis == -1 else f"argmax_axis{axis}"
    return argmax


def decision_agreement(threshold: float = 0.5) -> Metric:
    """Fraction of values on the same side of ``threshold`` as the original's (worst output)."""

    def decision(outputs: Sequence[Any], reference: Sequence[Any]) -> float:
        return _per_output(outputs, reference, lambda g, r: float(((g > threshold) == (r > threshold)).mean()))

    decision.__name__ = "decision" if threshold == 0.5 else f"decision@{threshold:g}"
    return decision


top1 = argmax_agreement(-1)

BUILTINS: dict[str, Metric] = {
    "scaled_cosine": scaled_cosine,
    "cosine": cosine,
    "top1": top1,
    "argmax": top1,
    "decision": decision_agreement(0.5),
}


def per_output(metrics: Mapping[str, Metric | str], output_names: Sequence[str]) -> Metric:
    """One metric per named output; the worst counts. Outputs not named are not scored."""
    resolved = {name: resolve_metric(m) for name, m in metrics.items()}
    unknown = [n for n in resolved if n not in output_names]
    if unknown:
        raise ConfigError(f"metric given for output(s) {unknown} that the model does not have; its outputs: {list(output_names)}")
    index = {n: i for i, n in enumerate(output_names)}

    def by_output(outputs: Sequence[Any], reference: Sequence[Any]) -> float:
        return min(float(m([outputs[index[n]]], [reference[index[n]]])) for n, m in resolved.items())

    by_output.__name__ = "+".join(f"{n}:{getattr(m, '__name__', 'metric')}" for n, m in resolved.items())
    return by_output


def resolve_metric(metric: str | Metric) -> Metric:
    """A built-in by name, ``package.module:function``, or a callable as is.

    Raises:
        ConfigError: an unknown name, or a module/function that cannot be imported.
    """
    if callable(metric):
        return metric
    if not isinstance(metric, str):
        raise ConfigError(f"metric must be a name or a callable (outputs, reference) -> float, got {type(metric).__name__}")
    if metric in BUILTINS:
        return BUILTINS[metric]
    if ":" in metric:
        mod_name, _, fn_name = metric.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except Exception as exc:  # noqa: BLE001 - ImportError or anything the user's module raises: a ConfigError naming it
            raise ConfigError(f"metric {metric!r}: cannot import module {mod_name!r} ({type(exc).__name__}: {exc}); "
                              "is it on PYTHONPATH?") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise ConfigError(f"metric {metric!r}: module {mod_name!r} has no function {fn_name!r}")
        return fn
    raise ConfigError(
        f"metric {metric!r} is not known; built-ins: {', '.join(BUILTINS)}, or 'package.module:function' "
        "naming a function (outputs, reference) -> float"
    )
