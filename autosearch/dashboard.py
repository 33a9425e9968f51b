"""A study as one self-contained HTML dashboard (plotly.js inlined, works offline).

Two steps, so the data can be checked without rendering:

1. :func:`dashboard_data` reads the study (never writes to it, so it still opens in
   optuna-dashboard as is) into a :class:`DashboardData`: every trial as a point with
   its category (``front`` / ``feasible`` / ``infeasible``), failed and stopped trials
   with their reasons, per-knob matrices of units x front trials, the hypervolume after
   each trial, and the per-unit analysis when the study holds one.
2. :func:`figures` turns that into plotly figures; :func:`write_dashboard` writes them,
   with the front as a text table, to one HTML file.

Example:
    >>> from autosearch import Study
    >>> from autosearch.dashboard import write_dashboard
    >>> write_dashboard(Study.load("demo"), "demo.html")            # doctest: +SKIP
    PosixPath('demo.html')
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from autosearch.errors import ConfigError
from autosearch.knobs import known

__all__ = ["CATEGORIES", "DashboardData", "KnobMatrix", "dashboard_data", "figures", "hypervolume_2d", "write_dashboard"]

CATEGORIES = ("front", "feasible", "infeasible", "failed")
_SIGNS = {"accuracy": -1.0, "latency_ms": 1.0, "size_mb": 1.0}  # to minimisation
_COLOURS = {"front": "#d62728", "feasible": "#1f77b4", "infeasible": "#9e9e9e"}
_SYMBOLS = {"front": "diamond", "feasible": "circle", "infeasible": "x"}
_HOVER_UNITS = 24


@dataclass(frozen=True)
class KnobMatrix:
    """One knob's values on the front: ``values[i, j]`` is unit ``units[i]`` in trial ``trials[j]``.

    Attributes:
        knob: ``bits``, ``prune`` or ``rank``.
        units: Unit names (rows).
        trials: Front trial numbers, fastest first (columns).
        values: Float matrix units x trials (neutral value where the trial left the unit alone).
        choices: The knob's choices in the search space.
    """

    knob: str
    units: tuple[str, ...]
    trials: tuple[int, ...]
    values: np.ndarray
    choices: tuple[Any, ...] = ()


@dataclass
class DashboardData:
    """Everything the dashboard shows, as plain data.

    Attributes:
        study: Study name.
        metric: The score's name (``accuracy``, ``fidelity_cosine``, ...).
        objectives: The study's objectives.
        baseline: The float model's figures (latest run).
        points: Complete trials, one row each: trial, accuracy, accuracy_drop, latency_ms, size_mb, speedup,
            remeasured_speedup (the study's interleaved re-measure of its front, when made), config, feasible,
            category (front / feasible / infeasible), hover.
        failed: Trials without figures (FAIL, and PRUNED = stopped early): trial, state, config, reason.
        front: The Pareto front (``study.front()``).
        knobs: Knob name -> :class:`KnobMatrix` over the front trials.
        hypervolume: trial, hypervolume (after that trial), over finished trials in order.
        hv_reference: Objective -> reference value (the worst complete trial, plus a 10% margin).
        analysis: Per-unit analysis rows (knob, unit, latency_share, drop@v, ...), or ``None``.
        uniform: Uniform int8 variants of the analysis, or ``None``.
        running: Trials still running or waiting (not shown).
        notes: What was skipped, and why.
        target_fronts: For a study timed on several targets, each further target's front (``study.front(target=)``).
    """

    study: str
    metric: str
    objectives: list[str]
    baseline: dict[str, Any]
    points: Any
    failed: Any
    front: Any
    knobs: dict[str, KnobMatrix] = field(default_factory=dict)
    hypervolume: Any = None
    hv_reference: dict[str, float] = field(default_factory=dict)
    analysis: Any = None
    uniform: Any = None
    running: int = 0
    notes: list[str] = field(default_factory=list)
    target_fronts: dict[str, Any] = field(default_factory=dict)  # further target's label -> its front

    def counts(self) -> dict[str, int]:
        """Trials per category (``failed`` counts FAIL and PRUNED trials)."""
        out = {c: int((self.points["category"] == c).sum()) if len(self.points) else 0 for c in CATEGORIES[:3]}
        out["failed"] = len(self.failed)
        return out


# --------------------------------------------------------------------------- data
def hypervolume_2d(points: Sequence[Sequence[float]] | np.ndarray, reference: Sequence[float] | np.ndarray) -> float:
    """Area dominated by ``points`` (both objectives minimised) and bounded by ``reference``.

    Example:
        >>> hypervolume_2d([[1.0, 3.0], [2.0, 1.0]], [4.0, 4.0])
        7.0
    """
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    ref = np.asarray(reference, dtype=float)
    pts = pts[np.all(pts < ref, axis=1)]
    if not len(pts):
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    hv = 0.0
    prev_y = ref[1]
    for x, y in pts:
        if y < prev_y:
            hv += (ref[0] - x) * (prev_y - y)
            prev_y = y
    return float(hv)


def _hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    if points.shape[1] == 2:
        return hypervolume_2d(points, reference)
    pts = points[np.all(points < reference, axis=1)]
    if not len(pts):
        return 0.0
    from optuna._hypervolume import compute_hypervolume  # private API; only for 3 objectives

    return float(compute_hypervolume(pts, reference))


def _unit_lines(cand: Mapping[str, Any]) -> list[str]:
    """``unit: bits 8, prune 0.25`` for each unit a candidate changes."""
    per_unit: dict[str, list[str]] = {}
    for kb in known(cand):
        knob = kb.name
        for unit, val in (cand.get(knob) or {}).items():
            if kb.active(val):
                per_unit.setdefault(unit, []).append(f"{knob} {val:g}" if isinstance(val, (int, float)) else f"{knob} {val}")
    lines = [f"{u}: {', '.join(v)}" for u, v in per_unit.items()]
    if len(lines) > _HOVER_UNITS:
        lines = lines[:_HOVER_UNITS] + [f"... and {len(lines) - _HOVER_UNITS} more unit(s)"]
    return lines


def _num(v: Any) -> TypeGuard[int | float | np.floating]:
    """A finite number (not None, not NaN)."""
    return isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and math.isfinite(float(v))


def _hover(row: Mapping[str, Any], cand: Mapping[str, Any], metric: str) -> str:
    drop = row.get("accuracy_drop")
    lines = [
        f"<b>trial {int(row['trial'])}</b> ({row['category']})",
        f"{metric} {row['accuracy']:.4f}" + (f" ({-drop:+.4f})" if _num(drop) else ""),
        f"latency {row['latency_ms']:.3f} ms" + (f" ({row['speedup']:.2f}x)" if _num(row.get("speedup")) else ""),
        f"re-measured side by side with the float model: {row['remeasured_speedup']:.2f}x" if row.get("remeasured_speedup") else "",
        f"size {row['size_mb']:.3f} MB" if _num(row.get("size_mb")) else "",
        html.escape(str(row.get("config") or "")),
    ]
    q = cand.get("quant") or {}
    if q:
        lines.append(html.escape(", ".join(f"{k}={v}" for k, v in q.items())))
    lines += [html.escape(s) for s in _unit_lines(cand)]
    return "<br>".join(s for s in lines if s)


def _analysis_frames(blob: Any, notes: list[str]) -> tuple[Any, Any]:
    import pandas as pd

    if not blob:
        return None, None
    try:
        units = blob.get("units") if isinstance(blob, Mapping) else blob
        if isinstance(units, Mapping):  # unit -> figures
            units = [{"unit": u, **(v if isinstance(v, Mapping) else {"latency_share": v})} for u, v in units.items()]
        df = pd.DataFrame(list(units or []))
        if df.empty or "unit" not in df.columns:
            notes.append("analysis panel skipped: the study's 'analysis' attribute has no per-unit rows")
            df = None
        uni = blob.get("uniform") if isinstance(blob, Mapping) else None
        udf = pd.DataFrame(list(uni)) if uni else None
        return df, udf
    except Exception as exc:  # noqa: BLE001 - an analysis of another version is shown without, not fatal
        notes.append(f"analysis panel skipped: unreadable 'analysis' attribute ({type(exc).__name__}: {exc})")
        return None, None


def dashboard_data(study: Any) -> DashboardData:
    """Read a study into the dashboard's data (no rendering; the study is not modified).

    Args:
        study: A :class:`autosearch.Study`.

    Returns:
        A :class:`DashboardData`.

    Raises:
        ConfigError: ``study`` is not an autosearch Study.

    Example:
        >>> data = dashboard_data(Study.load("demo"))                 # doctest: +SKIP
        >>> data.counts()                                             # doctest: +SKIP
        {'front': 4, 'feasible': 11, 'infeasible': 3, 'failed': 2}
    """
    import pandas as pd

    if not hasattr(study, "optuna_study") or not hasattr(study, "trials"):
        raise ConfigError(f"dashboard needs an autosearch.Study (e.g. Study.load('name')), got {type(study).__name__}")
    meta = study.meta
    metric = str(meta.get("evaluator") or "accuracy")
    objectives = [o for o in (meta.get("objectives") or ["accuracy", "latency_ms"]) if o in _SIGNS]
    notes: list[str] = []
    trials = {t.number: t for t in study.optuna_study.get_trials(deepcopy=False)}
    df = study.trials()
    front = study.front()
    front_trials = [int(t) for t in front["trial"]] if len(front) else []

    remeasured = (study.optuna_study.user_attrs.get("front_remeasured") or {}).get("trials", {}) or {}
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    running = 0
    for rec in df.to_dict("records") if len(df) else []:
        number = int(rec["trial"])
        t = trials[number]
        state = rec["state"]
        if state in ("RUNNING", "WAITING"):
            running += 1
            continue
        finite = all(_num(rec.get(k)) for k in ("accuracy", "latency_ms"))
        if state != "COMPLETE" or not finite:
            reason = rec.get("reason")
            reason = "" if reason is None or (isinstance(reason, float) and math.isnan(reason)) else str(reason)
            if state == "PRUNED" and not reason:
                acc = t.user_attrs.get("accuracy")
                reason = "stopped early: subset score below the accuracy floor" + (f" ({acc:.4f})" if isinstance(acc, float) else "")
            failed.append({"trial": number, "state": state, "config": rec.get("config") or "",
                           "reason": reason})
            continue
        if number in front_trials:
            cat = "front"
        elif isinstance(rec.get("feasible"), (bool, np.bool_)) and not rec["feasible"]:
            cat = "infeasible"
        else:
            cat = "feasible"
        row = {k: rec.get(k) for k in ("trial", "accuracy", "accuracy_drop", "latency_ms", "size_mb", "speedup", "config")}
        row["feasible"] = rec.get("feasible")
        row["category"] = cat
        row["remeasured_speedup"] = (remeasured.get(str(number)) or {}).get("speedup")
        row["hover"] = _hover(row, t.user_attrs.get("candidate") or {}, metric)
        rows.append(row)
    cols = ["trial", "accuracy", "accuracy_drop", "latency_ms", "size_mb", "speedup", "remeasured_speedup", "config", "feasible",
            "category", "hover"]
    points = pd.DataFrame(rows, columns=cols)
    failed_df = pd.DataFrame(failed, columns=["trial", "state", "config", "reason"])
    if running:
        notes.append(f"{running} trial(s) still running or waiting are not shown")

    # knob matrices over the front, fastest first
    units_by_knob: Mapping[str, Sequence[str]] = meta.get("units") or {}
    space_knobs = (meta.get("space") or {}).get("knobs") or {}
    knobs: dict[str, KnobMatrix] = {}
    ordered = [int(t) for t in front.sort_values("latency_ms")["trial"]] if len(front) else []
    for kb in known(units_by_knob):
        knob = kb.name
        units = list(units_by_knob.get(knob) or [])
        if not units or not ordered:
            continue
        mat = np.full((len(units), len(ordered)), float(kb.neutral))
        for j, number in enumerate(ordered):
            chosen = (trials[number].user_attrs.get("candidate") or {}).get(knob) or {}
            for i, unit in enumerate(units):
                if unit in chosen:
                    mat[i, j] = float(chosen[unit])
        choices = tuple((space_knobs.get(knob) or {}).get("choices") or ())
        knobs[knob] = KnobMatrix(knob, tuple(units), tuple(ordered), mat, choices)

    # hypervolume after each finished trial, in the space of the objectives scaled to [0, 1]
    hv_rows: list[dict[str, Any]] = []
    ref_out: dict[str, float] = {}
    if len(points) and objectives:
        pool = points[points["feasible"].eq(True)] if points["feasible"].eq(True).any() else points
        vals = pool[objectives].to_numpy(dtype=float) * np.array([_SIGNS[o] for o in objectives])
        ok = np.all(np.isfinite(vals), axis=1)
        vals, pool_trials = vals[ok], pool["trial"].to_numpy()[ok]
        if len(vals):
            lo, hi = vals.min(axis=0), vals.max(axis=0)
            span = np.where(hi > lo, hi - lo, 1.0)
            scaled = (vals - lo) / span
            ref = np.full(len(objectives), 1.1)
            ref_out = {o: float((lo[k] + 1.1 * span[k]) * _SIGNS[o]) for k, o in enumerate(objectives)}
            finished = sorted(n for n, t in trials.items() if t.state.name not in ("RUNNING", "WAITING"))
            pos = {int(n): k for k, n in enumerate(pool_trials)}
            seen: list[int] = []
            hv = 0.0
            for n in finished:
                if n in pos:
                    seen.append(pos[n])
                    hv = _hypervolume(scaled[seen], ref)
                hv_rows.append({"trial": n, "hypervolume": hv})
    hv_df = pd.DataFrame(hv_rows, columns=["trial", "hypervolume"])

    analysis, uniform = _analysis_frames(study.optuna_study.user_attrs.get("analysis"), notes)
    target_fronts = {lbl: study.front(target=lbl) for lbl in getattr(study, "targets", list)()}
    return DashboardData(
        study=study.name, metric=metric, objectives=objectives, baseline=study.baseline, points=points, failed=failed_df,
        front=front, knobs=knobs, hypervolume=hv_df, hv_reference=ref_out, analysis=analysis, uniform=uniform,
        running=running, notes=notes, target_fronts=target_fronts,
    )


# --------------------------------------------------------------------------- figures
def _pareto(data: DashboardData) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    pts = data.points
    sizes = pts["size_mb"].astype(float) if len(pts) else None
    smax = float(np.nanmax(sizes)) if sizes is not None and len(sizes) and np.isfinite(sizes).any() else 0.0
    for cat in ("infeasible", "feasible", "front"):
        sub = pts[pts["category"] == cat]
        if sub.empty:
            continue
        if smax > 0:
            msize = (8 + 14 * sub["size_mb"].astype(float).fillna(0) / smax).tolist()
        else:
            msize = 10
        sub = sub.sort_values("latency_ms")
        fig.add_trace(go.Scatter(
            x=sub["latency_ms"].astype(float), y=sub["accuracy"].astype(float),
            mode="lines+markers" if cat == "front" else "markers",
            line={"shape": "hv", "color": _COLOURS[cat], "width": 1.5} if cat == "front" else None,
            name={"front": "Pareto front", "feasible": "feasible", "infeasible": "below the accuracy floor"}[cat],
            marker={"size": msize, "color": _COLOURS[cat], "symbol": _SYMBOLS[cat],
                    "line": {"width": 1, "color": "#333"} if cat == "front" else {"width": 0}},
            text=sub["hover"], hovertemplate="%{text}<extra></extra>", customdata=sub["trial"],
        ))
    base = data.baseline
    if base.get("latency_ms"):
        fig.add_vline(x=float(base["latency_ms"]), line_dash="dot", line_color="#555",
                      annotation_text="float model", annotation_position="top")
    if base.get("accuracy") is not None:
        fig.add_hline(y=float(base["accuracy"]), line_dash="dot", line_color="#555")
    n_failed = len(data.failed)
    fig.update_layout(
        title=f"{data.metric} vs latency: {len(pts)} complete trial(s)"
        + (f", {n_failed} failed or stopped (listed below)" if n_failed else "")
        + " — marker size: model size",
        xaxis_title="latency (ms, median, ONNX Runtime)", yaxis_title=data.metric,
        template="plotly_white", height=520, legend={"orientation": "h", "y": -0.18},
    )
    return fig


def _targets_figure(data: DashboardData) -> Any:
    """The front on each target of a study timed on several: one line each (speedup against that target's float)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    base = data.baseline
    fronts = {"first target": (data.front, float(base.get("latency_ms") or 0))}
    fronts.update({lbl: (f, float(base.get(f"latency_ms@{lbl}") or 0)) for lbl, f in data.target_fronts.items()})
    for lbl, (front, float_ms) in fronts.items():
        if front is None or not len(front):
            continue
        f = front.sort_values("latency_ms")
        x = float_ms / f["latency_ms"].astype(float) if float_ms else f["latency_ms"].astype(float)
        fig.add_trace(go.Scatter(x=x, y=f["accuracy"].astype(float), mode="lines+markers", name=lbl,
                                 line={"shape": "hv"}, customdata=f["trial"],
                                 hovertemplate=f"{lbl}: trial %{{customdata}}<br>%{{x:.2f}}x, %{{y:.4f}}<extra></extra>"))
    fig.update_layout(title="The front on each target (speedup against the float model on that target)",
                      xaxis_title="speedup (x)", yaxis_title=data.metric, template="plotly_white", height=440)
    return fig


def _knob_figure(m: KnobMatrix) -> Any:
    import plotly.graph_objects as go

    labels = [f"t{t}" for t in m.trials]
    scale = next((k.colorscale for k in known([m.knob])), "Viridis")
    text = [[f"{v:g}" for v in row] for row in m.values]
    fig = go.Figure(go.Heatmap(
        z=m.values, x=labels, y=list(m.units), colorscale=scale, text=text, texttemplate="%{text}" if m.values.size <= 400 else None,
        hovertemplate=f"unit %{{y}}<br>trial %{{x}}<br>{m.knob} %{{z:g}}<extra></extra>",
        colorbar={"title": m.knob, **({"tickvals": [float(c) for c in m.choices]} if m.choices else {})},
        zmin=float(min(m.choices)) if m.choices else None, zmax=float(max(m.choices)) if m.choices else None,
    ))
    fig.update_layout(
        title=f"{m.knob} per unit on the Pareto front (columns: front trials, fastest first)",
        xaxis_title="trial", xaxis={"type": "category"},
        yaxis={"autorange": "reversed", "type": "category", "tickmode": "array", "tickvals": list(m.units)},
        template="plotly_white", height=160 + 24 * len(m.units),
    )
    return fig


def _hv_figure(data: DashboardData) -> Any:
    import plotly.graph_objects as go

    hv = data.hypervolume
    fig = go.Figure(go.Scatter(x=hv["trial"], y=hv["hypervolume"], mode="lines", line={"shape": "hv"}, name="hypervolume"))
    fig.update_layout(
        title="hypervolume of the front after each trial (objectives scaled to [0, 1] between the best and worst "
        "trials; reference 1.1)",
        xaxis_title="trial", yaxis_title="hypervolume", template="plotly_white", height=360,
    )
    return fig


def _analysis_figures(data: DashboardData) -> dict[str, Any]:
    import plotly.graph_objects as go

    out: dict[str, Any] = {}
    df = data.analysis
    if df is None:
        return out
    if "latency_share" in df.columns:
        share = df.drop_duplicates(subset="unit")[["unit", "latency_share"]].copy()
        share["latency_share"] = share["latency_share"].astype(float)
        fig = go.Figure(go.Bar(x=share["unit"], y=100 * share["latency_share"], name="latency share"))
        fig.update_layout(title="latency share of each unit in the float model (ONNX Runtime node profiler)",
                          yaxis_title="% of inference time", template="plotly_white", height=380)
        out["analysis_latency"] = fig
    drop_cols = [c for c in df.columns if str(c).startswith("drop@")]
    if drop_cols and "knob" in df.columns:
        labels: list[str] = []
        series: list[list[float]] = []
        units = list(dict.fromkeys(df["unit"]))
        for knob in dict.fromkeys(df["knob"]):
            sub = df[df["knob"] == knob].set_index("unit")
            for col in drop_cols:
                if col not in sub.columns or sub[col].isna().all():
                    continue
                labels.append(f"{knob} {col[len('drop@'):]}")
                series.append([float(sub.at[u, col]) if u in sub.index and sub.at[u, col] is not None else float("nan")
                               for u in units])
        if labels:
            z = np.array(series, dtype=float).T
            fig = go.Figure(go.Heatmap(z=z, x=labels, y=units, colorscale="OrRd", colorbar={"title": "drop"},
                                       hovertemplate="unit %{y}<br>%{x}<br>score drop %{z:.4f}<extra></extra>"))
            fig.update_layout(title=f"sensitivity: {data.metric} drop when one unit alone takes the value (subset)",
                              yaxis={"autorange": "reversed", "type": "category", "tickmode": "array", "tickvals": units},
                              template="plotly_white", height=160 + 24 * len(units))
            out["analysis_sensitivity"] = fig
    return out


def figures(data: DashboardData) -> dict[str, Any]:
    """Plotly figures of the dashboard, by name.

    Names: ``pareto``, ``knobs_<knob>`` for each knob with units, ``hypervolume``, and
    ``analysis_latency`` / ``analysis_sensitivity`` when the study holds an analysis.

    Example:
        >>> figs = figures(dashboard_data(study))        # doctest: +SKIP
        >>> figs["pareto"].show()                         # doctest: +SKIP
    """
    out: dict[str, Any] = {"pareto": _pareto(data)}
    if data.target_fronts:
        out["targets"] = _targets_figure(data)
    for knob, m in data.knobs.items():
        out[f"knobs_{knob}"] = _knob_figure(m)
    if data.hypervolume is not None and len(data.hypervolume):
        out["hypervolume"] = _hv_figure(data)
    out.update(_analysis_figures(data))
    return out


# --------------------------------------------------------------------------- page
_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.meta { color: #555; font-size: 13px; } pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
table.failed { border-collapse: collapse; font-size: 12px; } table.failed td, table.failed th { border: 1px solid #ddd; padding: 3px 6px; text-align: left; }
.figure { margin-top: 8px; }
"""


def write_dashboard(study: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Write the dashboard of a study to one self-contained HTML file.

    The page holds the Pareto scatter (accuracy vs latency; marker size is model size;
    front, feasible and below-floor trials distinct; failed trials listed under it with
    their reasons), knob heatmaps over the front, the hypervolume over trials, the
    analysis panels when present, and the front as a text table. plotly.js is inlined,
    so the file opens offline. The study is only read.

    Args:
        study: A :class:`autosearch.Study`.
        path: The ``.html`` file to write (its folder is created).
        title: Page title (default: the study's name).

    Returns:
        The path written.

    Raises:
        ConfigError: ``path`` is a folder.

    Example:
        >>> write_dashboard(study, "reports/demo.html")    # doctest: +SKIP
        PosixPath('reports/demo.html')
    """
    from autosearch.report import format_front

    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"dashboard path {str(out)!r} is a folder: pass a file name such as {str(out / 'dashboard.html')!r}")
    data = dashboard_data(study)
    figs = figures(data)
    counts = data.counts()
    base = data.baseline
    meta = study.meta
    tgt = meta.get("target") or {}
    head = html.escape(title or f"AutoSearch study {data.study!r}")
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{head}</title>", f"<style>{_CSS}</style>",
        "</head><body>", f"<h1>{head}</h1>",
        "<p class='meta'>"
        + html.escape(
            f"{len(study.optuna_study.trials)} trials: {counts['front']} on the front, {counts['feasible']} other feasible, "
            f"{counts['infeasible']} below the accuracy floor, {counts['failed']} failed or stopped early. "
            f"Objectives: {', '.join(data.objectives)}. Score: {data.metric}. "
            f"Target: {', '.join(tgt.get('providers', []))}, {tgt.get('threads', '?')} thread(s)."
        )
        + ("<br>" + html.escape(f"Float model: {data.metric} {base['accuracy']:.4f}, latency {base['latency_ms']:.3f} ms, "
                                f"{base.get('size_mb', float('nan')):.3f} MB (measured {base.get('measured_at', '?')}).")
           if base.get("accuracy") is not None and base.get("latency_ms") else "")
        + "</p>",
    ]
    sections = {
        "pareto": "Pareto front", "hypervolume": "Hypervolume over trials", "targets": "The front on each target",
        "analysis_latency": "Analysis: latency per unit", "analysis_sensitivity": "Analysis: sensitivity per unit",
    }
    first = True
    config = {"displaylogo": False, "responsive": True}
    for name, fig in figs.items():
        heading = sections.get(name) or f"Knob {name[len('knobs_'):]!r} on the front"
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append("<div class='figure'>" + fig.to_html(full_html=False, include_plotlyjs=first, config=config,
                                                          div_id=name.replace("_", "-")) + "</div>")
        first = False
        if name == "pareto":
            if len(data.failed):
                rows = "".join(
                    f"<tr><td>{int(r.trial)}</td><td>{html.escape(str(r.state))}</td><td>{html.escape(str(r.config))}</td>"
                    f"<td>{html.escape(str(r.reason)[:400])}</td></tr>"
                    for r in data.failed.itertuples()
                )
                parts.append("<h2>Failed or stopped trials</h2><table class='failed' id='failed'>"
                             f"<tr><th>trial</th><th>state</th><th>config</th><th>reason</th></tr>{rows}</table>")
            parts.append(f"<h2>Pareto front (table)</h2><pre id='front-table'>{html.escape(format_front(study))}</pre>")
    if data.notes:
        parts.append("<p class='meta'>" + "<br>".join(html.escape(n) for n in data.notes) + "</p>")
    parts.append("<p class='meta'>The study is a plain Optuna study: optuna-dashboard opens it too.</p>")
    parts.append("</body></html>")
    from autosearch.artifacts import atomic_write_text

    atomic_write_text(out, "\n".join(parts))  # a browser reloading it never reads half a page
    return out
