"""Step 5: the front re-timed, interleaved with the float model (fair under drifting load)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autosearch.errors import AutosearchError, CandidateError
from autosearch.target import Target, interleaved

if TYPE_CHECKING:
    from autosearch.study import Study

__all__ = ["remeasure_front"]


def remeasure_front(study: Study, tgt: Target, feed: Mapping[str, np.ndarray], base_path: Path, *,
                    say: Callable[[str], None] = print, rounds: int = 5) -> dict[str, Any]:
    """Re-time the front and the float model interleaved; stored in the study.

    Returns the stored record: ``{"float_ms", "trials": {number: {"latency_ms", "speedup"}}, "at"}``.
    """
    front = study.front()
    if front.empty:
        return {}
    models: list[tuple[str, Path]] = [("float", base_path)]
    for r in front.itertuples():
        try:  # by artifact id (a trial another machine built is downloaded), else its recorded path
            models.append((str(int(r.trial)), study.model_path(int(r.trial))))
        except AutosearchError:
            continue
    try:
        stats = interleaved(models, feed, tgt, rounds=rounds)
    except CandidateError as exc:  # e.g. a remote profiler gone: the trials' own figures stay, the study is intact
        say(f"[autosearch] front not re-measured: {exc}")
        return {}
    base = stats["float"].median_ms
    rec = {
        "float_ms": base,
        "trials": {k: {"latency_ms": v.median_ms, "speedup": base / v.median_ms, "iqr_rel": v.iqr_rel} for k, v in stats.items() if k != "float"},
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_avg": stats["float"].load_avg,
    }
    study.optuna_study.set_user_attr("front_remeasured", rec)
    say(f"[autosearch] front re-measured interleaved with the float model ({rounds} rounds): float {base:.3f} ms")
    return rec
