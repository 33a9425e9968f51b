"""Samples as the model takes them: complete feeds, batched only where that is safe.

Real models have inputs that do not batch on axis 0: a scalar sample rate, a recurrent
state ``[2, B, 64]`` whose batch axis is 1, a fixed batch of 1. Data for such a model is
a list of complete feeds (one ``session.run`` each). Where every input batches on axis
0, samples are concatenated into batches, after a check on the model itself that a
batch of two gives the two single-sample outputs.

Accepted forms of samples (``Inputs``):

- an array (one input), a sequence of arrays (one per input, in input order) or a
  mapping input name -> array: axis 0 indexes samples. An array with the input's rank
  gives samples of batch 1 (``x[i:i+1]``); one with a rank more gives complete inputs
  (``x[i]``, e.g. a scalar input stored as shape ``(N,)``, a state ``(N, 2, 1, 64)``);
- a sequence of mappings: complete feeds, one per sample.

Example:
    >>> import numpy as np
    >>> s = Samples(np.zeros((10, 3), np.float32), ["x"], ranks={"x": 2})
    >>> s.n, s.feed(4)["x"].shape
    (10, (1, 3))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeGuard

import numpy as np

from autosearch.errors import CandidateError, ConfigError

__all__ = ["Inputs", "Samples", "batches_of", "can_batch", "concat_feeds", "session_ranks", "stack_outputs"]

Inputs = np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]]


def _is_feed_list(data: Any) -> TypeGuard[Sequence[Mapping[str, np.ndarray]]]:
    return isinstance(data, Sequence) and not isinstance(data, (str, bytes, np.ndarray)) and len(data) > 0 \
        and isinstance(data[0], Mapping)


def session_ranks(session: Any) -> dict[str, int]:
    """Rank of each input of an ``InferenceSession``."""
    return {m.name: len(m.shape) for m in session.get_inputs()}


class Samples:
    """Indexed samples of a model's inputs.

    Args:
        data: Samples in one of the accepted forms (see the module docstring).
        names: The model's input names, in order.
        ranks: Rank of each model input (decides ``x[i:i+1]`` vs ``x[i]``); ``None``: ``x[i:i+1]``.

    Raises:
        ConfigError: a missing input, unequal sample counts, or no samples.
    """

    def __init__(self, data: Inputs, names: Sequence[str], *, ranks: Mapping[str, int] | None = None) -> None:
        self.names = list(names)
        self._feeds: list[dict[str, np.ndarray]] | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._whole: dict[str, bool] = {}  # True: x[i] is a complete input; False: x[i:i+1]
        if _is_feed_list(data):
            feeds = [dict(f) for f in data]
            for k, f in enumerate(feeds):
                missing = [n for n in self.names if n not in f]
                if missing:
                    raise ConfigError(f"sample {k} lacks model input(s) {missing}; it has {sorted(f)}")
            self._feeds = [{n: np.asarray(f[n]) for n in self.names} for f in feeds]
            self.n = len(self._feeds)
            return
        if isinstance(data, Mapping):
            missing = [n for n in self.names if n not in data]
            if missing:
                raise ConfigError(f"the data lacks model input(s) {missing}; it has {sorted(data)}")
            arrays = {n: np.asarray(data[n]) for n in self.names}
        else:
            seq = [np.asarray(data)] if isinstance(data, np.ndarray) else [np.asarray(a) for a in data]
            if len(seq) != len(self.names):
                raise ConfigError(f"the data has {len(seq)} array(s) but the model has {len(self.names)} input(s) {self.names}")
            arrays = dict(zip(self.names, seq))
        counts = {n: (len(a) if a.ndim else 0) for n, a in arrays.items()}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise ConfigError(
                f"every input needs one entry per sample along axis 0; got {counts}: store a scalar input as an "
                "array of shape (N,) and pass complete feeds as a list of dicts when samples differ in shape"
            )
        self._arrays = arrays
        for n, a in arrays.items():
            rank = None if ranks is None else ranks.get(n)
            self._whole[n] = rank is not None and a.ndim == rank + 1
        self.n = next(iter(counts.values()))

    def feed(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as a complete feed."""
        if self._feeds is not None:
            return self._feeds[i]
        return {n: (np.asarray(a[i]) if self._whole[n] else a[i : i + 1]) for n, a in self._arrays.items()}

    def feeds(self, indices: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
        """Several samples as complete feeds."""
        return [self.feed(int(i)) for i in (range(self.n) if indices is None else indices)]

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples ``start:stop`` concatenated along axis 0 (only for models that batch on axis 0)."""
        if self._feeds is None and not any(self._whole.values()):
            return {n: a[start:stop] for n, a in self._arrays.items()}
        return concat_feeds([self.feed(i) for i in range(start, stop)])


def concat_feeds(feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Feeds joined along axis 0, input by input."""
    return {k: np.concatenate([np.asarray(f[k]) for f in feeds]) for k in feeds[0]}


def _static_batchable(session: Any) -> bool:
    for m in session.get_inputs():
        if not m.shape or isinstance(m.shape[0], int) and m.shape[0] > 0:
            return False
    return True


def can_batch(session: Any, feeds: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """Whether ``session`` may run several of ``feeds`` at once, joined on axis 0.

    True only when every input has a free axis 0, every feed has the same per-sample shape,
    and a batch of two samples (two different ones when given, else one twice) reproduces
    each sample's own outputs. A state whose batch axis is 1, a scalar input, or a model
    that mixes samples fails one of these.
    """
    if not feeds or not _static_batchable(session):
        return False
    first = feeds[0]
    if any(np.asarray(v).ndim == 0 for v in first.values()):
        return False
    pair = [first, feeds[1] if len(feeds) > 1 else first]
    for k in first:
        if np.asarray(pair[0][k]).shape[1:] != np.asarray(pair[1][k]).shape[1:]:
            return False
    try:
        singles = [session.run(None, dict(f)) for f in pair]
        joined = session.run(None, concat_feeds(pair))
    except Exception:  # noqa: BLE001 - any ORT failure on a joined batch means: do not batch
        return False
    n0 = len(next(iter(pair[0].values())))
    for i, out in enumerate(joined):
        a, b = np.asarray(singles[0][i]), np.asarray(singles[1][i])
        want = np.concatenate([a, b]) if a.ndim else None
        out = np.asarray(out)
        if want is None or out.shape != want.shape or len(a) != n0:
            return False
        if np.issubdtype(want.dtype, np.floating):
            scale = float(np.abs(want).max()) if want.size else 0.0
            if not np.allclose(out, want, rtol=1e-3, atol=1e-4 * max(scale, 1.0), equal_nan=True):
                return False
        elif not np.array_equal(out, want):
            return False
    return True


def batches_of(samples: Samples, n: int, step: int, *, fixed: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], int | None]]:
    """``(feed, real_rows)`` over the first ``n`` samples, ``step`` at a time (``step`` 1: one run per sample).

    ``fixed``: the model takes exactly this batch; a short last batch is padded with its last
    sample and ``real_rows`` says how many rows are real (``None`` when nothing was padded).
    """
    for start in range(0, n, step):
        stop = min(start + step, n)
        if step == 1:
            yield samples.feed(start), None
            continue
        feed = samples.batch(start, stop)
        if fixed is not None and stop - start < fixed:
            feed = {k: np.concatenate([v, np.repeat(v[-1:], fixed - (stop - start), axis=0)]) for k, v in feed.items()}
            yield feed, stop - start
            continue
        yield feed, None


def stack_outputs(per_run: Sequence[Sequence[np.ndarray]], counts: Sequence[int | None]) -> list[Any]:
    """Outputs of several runs joined along axis 0, output by output.

    Rows past a run's count (padding of a fixed batch; ``None``: no padding) are dropped. An output whose runs differ in
    shape beyond axis 0 stays a list of per-run arrays.

    Raises:
        CandidateError: runs returned different numbers of outputs.
    """
    if not per_run:
        return []
    n_out = len(per_run[0])
    if any(len(r) != n_out for r in per_run):
        raise CandidateError("the model returned a different number of outputs on different samples")
    out: list[Any] = []
    for k in range(n_out):
        parts = []
        for r, c in zip(per_run, counts):
            a = np.asarray(r[k])
            parts.append(a[:c] if c is not None and a.ndim and c < len(a) else a)
        if all(p.ndim >= 1 for p in parts) and len({p.shape[1:] for p in parts}) == 1:
            out.append(np.concatenate(parts))
        elif all(p.ndim == 0 for p in parts):
            out.append(np.stack(parts))
        else:
            out.append(parts)
    return out
