"""Text tables of a study for terminals and logs."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["format_front", "print_front"]


def _missing(v: Any) -> bool:
    """None or NaN (of any float width): how a table's column holds an absent value."""
    return v is None or isinstance(v, (float, np.floating)) and bool(np.isnan(v))


def format_front(study: Any, *, all_trials: bool = False) -> str:
    """The front (or every trial) as an aligned text table."""
    df = study.trials() if all_trials else study.front()
    if df.empty:
        return "(no complete trial yet)"
    df = df.copy()
    df["delta"] = -df["accuracy_drop"]
    cols = ["trial", "accuracy", "delta", "latency_ms", "speedup", "remeasured_speedup", "size_mb", "feasible", "config"]
    if all_trials:
        cols = ["trial", "state", *cols[1:], "reason"]
    df = df[[c for c in cols if c in df.columns]].copy()
    fmt = {"accuracy": "{:.4f}", "delta": "{:+.4f}", "remeasured_speedup": "{:.2f}x", "latency_ms": "{:.3f}", "speedup": "{:.2f}x", "size_mb": "{:.2f}"}
    for col, f in fmt.items():
        if col in df:
            df[col] = [f.format(v) if not _missing(v) else "-" for v in df[col]]
    df = df.rename(columns={"remeasured_speedup": "speedup (re-measured)"})
    if "reason" in df:
        df["reason"] = [("" if _missing(r) else str(r)[:60]) for r in df["reason"]]
    return df.to_string(index=False)


def print_front(study: Any) -> None:
    """Print the Pareto front with the float baseline and where the study lives."""
    base = study.baseline
    meta = study.meta
    print()
    done = sum(t.state.is_finished() for t in study.optuna_study.get_trials(deepcopy=False))  # not those queued or running
    print(f"Pareto front of study {study.name!r} ({done} finished trial(s); "
          f"objectives {', '.join(meta.get('objectives', []))}; speedup vs the float model measured in the same run)")
    if base:
        print(f"float model: accuracy {base['accuracy']:.4f}, latency {base['latency_ms']:.3f} ms, {base['size_mb']:.2f} MB")
    print(format_front(study))
    print(f"study: {study.dir} (artifacts) | look: autosearch front {study.name}")
