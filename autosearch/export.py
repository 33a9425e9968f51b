"""Pick a trial of a study and export it, with a verification report.

:func:`pick_trial` turns a rule (a trial number, ``"fastest"``, ``"fastest:0.98"``,
``"smallest"``, ``"knee"``) into a trial number. :func:`export_trial` writes that
trial's ONNX file, its configuration and the study's figures to a folder, then
verifies them: the exported file is loaded afresh, its accuracy is re-measured
(when an evaluator is given, or rebuilt from a CLI study's spec) and its latency is
measured in interleaved rounds with the original float model, in one run, plus the
largest output difference from the original. The report says whether the figures
agree with what the study recorded.

Example:
    >>> from autosearch import Study
    >>> from autosearch.export import export_trial
    >>> study = Study.load("demo")                                   # doctest: +SKIP
    >>> report = export_trial(study, "knee", "exported/demo")        # doctest: +SKIP
    >>> print(report.table())                                        # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autosearch.artifacts import atomic_copy, atomic_write_text
from autosearch.errors import ConfigError
from autosearch.knobs import known

__all__ = ["ExportReport", "export_trial", "pick_trial"]

RULES = ("<trial number>", "fastest", "fastest:<min accuracy>", "smallest", "smallest:<min accuracy>", "knee")
_DIFF_SAMPLES = 256


# --------------------------------------------------------------------------- picking
def _complete(study: Any) -> Any:
    """Complete trials with finite accuracy and latency (a DataFrame)."""
    df = study.trials(include_failed=False)
    if df.empty:
        return df
    acc = df["accuracy"].astype(float)
    lat = df["latency_ms"].astype(float)
    return df[np.isfinite(acc) & np.isfinite(lat)]


def _parse_floor(rule: str, name: str) -> float | None:
    if rule == name:
        return None
    text = rule[len(name) + 1 :]
    try:
        floor = float(text)
    except ValueError:
        raise ConfigError(
            f"pick rule {rule!r}: the accuracy floor after ':' must be a number, e.g. '{name}:0.98'"
        ) from None
    if not math.isfinite(floor):
        raise ConfigError(f"pick rule {rule!r}: the accuracy floor must be a finite number, e.g. '{name}:0.98'")
    return floor


def _knee(front: Any) -> int:
    """The front point farthest from the line joining the front's extremes (normalised space)."""
    pts = front.sort_values("latency_ms")
    trials = [int(t) for t in pts["trial"]]
    acc = pts["accuracy"].to_numpy(dtype=float)
    lat = pts["latency_ms"].to_numpy(dtype=float)
    if len(pts) < 3:
        return trials[int(np.argmax(acc))]  # no knee between two points: keep the accurate one

    def norm(v: np.ndarray) -> np.ndarray:
        span = float(v.max() - v.min())
        return (v - v.min()) / span if span > 0 else np.zeros_like(v)

    x, y = norm(lat), norm(acc)
    p0 = np.array([x[0], y[0]])
    p1 = np.array([x[-1], y[-1]])
    d = p1 - p0
    length = float(np.hypot(*d))
    if length == 0:
        return trials[int(np.argmax(acc))]
    dist = np.abs(d[0] * (y - p0[1]) - d[1] * (x - p0[0])) / length
    return trials[int(np.argmax(dist))]


def pick_trial(study: Any, rule: str | int) -> int:
    """The trial number a rule picks.

    Rules:

    - a trial number (``7`` or ``"7"``): that trial, which must be COMPLETE;
    - ``"fastest"``: the fastest feasible trial (meets the study's accuracy constraint);
      ``"fastest:0.98"``: the fastest trial with accuracy >= 0.98 (this floor replaces
      the study's constraint);
    - ``"smallest"`` / ``"smallest:0.98"``: the same with size (MB), ties broken by latency;
    - ``"knee"``: the Pareto-front point farthest from the straight line joining the
      front's fastest and most accurate points, with accuracy and latency each scaled to
      [0, 1]; with fewer than three front points, the most accurate one.

    Args:
        study: A :class:`autosearch.Study`.
        rule: One of the rules above.

    Returns:
        The trial number.

    Raises:
        ConfigError: unknown rule, a trial that does not exist or is not COMPLETE, no
            complete trial, or no trial meeting the floor (the message gives the best
            accuracy available).

    Example:
        >>> pick_trial(study, "fastest:0.95")      # doctest: +SKIP
        12
    """
    if isinstance(rule, bool) or not isinstance(rule, (int, str)):
        raise ConfigError(f"pick rule must be a trial number or one of {', '.join(RULES)}; got {rule!r}")
    text = rule.strip().lower() if isinstance(rule, str) else str(rule)
    if text.lstrip("-").isdigit():
        number = int(text)
        ost = study.optuna_study
        trials = ost.get_trials(deepcopy=False)
        by_number = {t.number: t for t in trials}
        if number not in by_number:
            span = f"0-{len(trials) - 1}" if trials else "none yet"
            raise ConfigError(f"pick: trial {number} does not exist in study {study.name!r} (trials: {span})")
        t = by_number[number]
        if t.state.name != "COMPLETE":
            reason = t.user_attrs.get("fail_reason") or t.system_attrs.get("fail_reason") or ""
            done = _complete(study)
            hint = f"; complete trials include {', '.join(str(int(n)) for n in done['trial'][:8])}" if not done.empty else ""
            raise ConfigError(
                f"pick: trial {number} of study {study.name!r} is {t.state.name}, not COMPLETE"
                + (f" ({str(reason)[:200]})" if reason else "")
                + f": pick a complete trial or a rule such as 'knee'{hint}"
            )
        return number
    df = _complete(study)
    if df.empty:
        raise ConfigError(
            f"pick: study {study.name!r} has no complete trial yet: run more trials (autosearch resume {study.name})"
        )
    best = df.loc[df["accuracy"].astype(float).idxmax()]
    for name, key in (("fastest", "latency_ms"), ("smallest", "size_mb")):
        if text == name or text.startswith(name + ":"):
            floor = _parse_floor(text, name)
            if floor is None:
                pool = df[df["feasible"].eq(True)]
                if pool.empty:
                    raise ConfigError(
                        f"pick {rule!r}: no trial of study {study.name!r} meets its accuracy constraint; the best "
                        f"accuracy available is {float(best['accuracy']):.4f} (trial {int(best['trial'])}): "
                        f"give a floor, e.g. '{name}:{math.floor(float(best['accuracy']) * 1000) / 1000:.3f}', or a trial number"
                    )
            else:
                pool = df[df["accuracy"].astype(float) >= floor]
                if pool.empty:
                    raise ConfigError(
                        f"pick {rule!r}: no complete trial of study {study.name!r} reaches accuracy >= {floor:g}; the best "
                        f"accuracy available is {float(best['accuracy']):.4f} (trial {int(best['trial'])}): lower the floor"
                    )
            order = [key, "latency_ms", "trial"] if key != "latency_ms" else [key, "trial"]
            return int(pool.sort_values(order).iloc[0]["trial"])
    if text == "knee":
        front = study.front()
        front = front[np.isfinite(front["latency_ms"].astype(float)) & np.isfinite(front["accuracy"].astype(float))]
        if front.empty:
            raise ConfigError(f"pick 'knee': study {study.name!r} has no Pareto front yet: run more trials")
        return _knee(front)
    raise ConfigError(f"unknown pick rule {rule!r}; use one of: {', '.join(RULES)} (e.g. 'fastest:0.98')")


# --------------------------------------------------------------------------- report
@dataclass
class ExportReport:
    """What :func:`export_trial` wrote and what the verification measured.

    Attributes:
        study: Study name.
        trial: Trial number exported.
        rule: The pick rule that chose it.
        out_dir: The export folder.
        files: Name -> path of each file written.
        study_figures: The study's figures for the trial (accuracy, latency_ms, speedup, size_mb).
        measured: Re-measured figures of the exported file and of the original float model.
        max_abs_diff: Largest absolute output difference from the original (``None``: not measured).
        diff_on: What inputs the difference was measured on.
        agrees: Whether the re-measured figures agree with the study (``None``: nothing comparable).
        verdict: One line saying so, with the figures that differ.
        notes: What could not be checked, and why.
    """

    study: str
    trial: int
    rule: str
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    study_figures: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    max_abs_diff: float | None = None
    diff_on: str = ""
    agrees: bool | None = None
    verdict: str = ""
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (what ``report.json`` holds).

        Example:
            >>> report.to_dict()["agrees"]                   # doctest: +SKIP
            True
        """
        return {
            "study": self.study,
            "trial": self.trial,
            "rule": self.rule,
            "out_dir": str(self.out_dir),
            "files": {k: str(v) for k, v in self.files.items()},
            "study_figures": self.study_figures,
            "measured": self.measured,
            "max_abs_diff": self.max_abs_diff,
            "diff_on": self.diff_on,
            "agrees": self.agrees,
            "verdict": self.verdict,
            "notes": list(self.notes),
            **self.details,
        }

    def _rows(self) -> list[tuple[str, str, str, str]]:
        s, m = self.study_figures, self.measured

        def f(v: Any, fmt: str) -> str:
            return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)

        return [
            ("accuracy", f(s.get("accuracy"), "{:.4f}"), f(m.get("accuracy"), "{:.4f}"), f(m.get("original_accuracy"), "{:.4f}")),
            ("latency_ms", f(s.get("latency_ms"), "{:.3f}"), f(m.get("latency_ms"), "{:.3f}"), f(m.get("original_latency_ms"), "{:.3f}")),
            ("speedup", f(s.get("speedup"), "{:.2f}x"), f(m.get("speedup"), "{:.2f}x"), "1.00x"),
            ("size_mb", f(s.get("size_mb"), "{:.3f}"), f(m.get("size_mb"), "{:.3f}"), f(m.get("original_size_mb"), "{:.3f}")),
        ]

    def table(self) -> str:
        """The report as aligned plain text (what ``autosearch export`` prints).

        Example:
            >>> print(report.table())                        # doctest: +SKIP
        """
        head = ("", "study", "re-measured", "float original")
        rows = [head, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"exported trial {self.trial} of study {self.study!r} (rule {self.rule!r}) to {self.out_dir}"]
        lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        rem = self.study_figures.get("remeasured_speedup")
        if rem:
            lines.append(f"the study's interleaved re-measure of its front: {self.study_figures.get('remeasured_ms') or 0:.3f} ms, {rem:.2f}x")
        if self.max_abs_diff is not None:
            lines.append(f"max |output - original output|: {self.max_abs_diff:.6g} on {self.diff_on}")
        for key, ms in self.measured.items():
            if key.startswith("latency_ms@"):
                lbl = key.split("@", 1)[1]
                was = self.study_figures.get(key)
                lines.append(f"on {lbl}: {ms:.3f} ms, {self.measured.get(f'speedup@{lbl}', float('nan')):.2f}x over the float "
                             f"model there" + (f" (study: {was:.3f} ms)" if was else ""))
        lines.append(self.verdict)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        """The report as Markdown (what ``report.md`` holds).

        Example:
            >>> Path("report.md").write_text(report.markdown())  # doctest: +SKIP
        """
        d = self.details
        lines = [
            f"# Export of trial {self.trial} of study `{self.study}`",
            "",
            f"Picked by rule `{self.rule}`. Configuration: {d.get('summary', '')}.",
            "",
            f"**{self.verdict}**",
            "",
            "| | study | re-measured | float original (re-measured) |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in self._rows()]
        lines.append("")
        rem = self.study_figures.get("remeasured_speedup")
        if rem:
            ms = self.study_figures.get("remeasured_ms") or 0.0
            lines += [f"The study's own interleaved re-measure of its front gave {ms:.3f} ms ({rem:.2f}x).", ""]
        if self.max_abs_diff is not None:
            lines.append(f"Largest absolute output difference from the original float model: **{self.max_abs_diff:.6g}** "
                         f"(on {self.diff_on}).")
            lines.append("")
        tgt = d.get("target", {})
        lines += [
            (
                "Re-measured now: the exported `model.onnx` was loaded afresh and timed in "
                f"{d.get('rounds', '?')} interleaved rounds with the original float model (`baseline.onnx` of the study), "
                f"{tgt.get('threads', '?')} thread(s), {', '.join(tgt.get('providers', []))}, ONNX Runtime "
                f"{d.get('ort_version', '?')} on {d.get('cpu', '?')} at {d.get('measured_at', '?')}."
            ),
            "",
            (
                f"Agreement rule: accuracy within {d.get('tolerances', {}).get('accuracy', '?')}; latency within "
                f"{100 * float(d.get('tolerances', {}).get('latency', 0)):.0f}% of the study's figure, or speedup over the "
                "float model within the same fraction of the study's speedup or of its interleaved front re-measure "
                "(absolute latency drifts with machine load; a ratio measured side by side drifts less)."
            ),
            "",
        ]
        if self.notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in self.notes] + [""]
        lines += ["Files:", ""] + [f"- `{Path(p).name}`" for p in self.files.values()] + [""]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------- export
def _trial_onnx(study: Any, trial: Any) -> Path:
    """The trial's model on this machine: by its artifact id first, its recorded path for older studies
    (:meth:`autosearch.study.Study.model_path`)."""
    if hasattr(study, "model_path"):
        return Path(study.model_path(trial))
    raw = trial.user_attrs.get("onnx_path")
    if not raw or not Path(raw).exists():
        raise ConfigError(f"the ONNX file of trial {trial.number} of study {study.name!r} is missing ({raw})")
    return Path(raw)


def _baseline_onnx(study: Any) -> Path | None:
    """The study's float model on this machine (its folder's ``baseline.onnx``, else the study's artifact)."""
    if hasattr(study, "baseline_path"):
        found = study.baseline_path()
        return Path(found) if found is not None else None
    p = Path(study.dir) / "baseline.onnx"
    return p if p.exists() else None


def _copy_onnx(src: Path, dst_dir: Path) -> Path:
    """Copy an ONNX file and any external-data files it references."""
    import onnx

    dst = atomic_copy(src, dst_dir / "model.onnx")
    try:
        proto = onnx.load(str(src), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable copy has no external data to follow
        return dst
    seen: set[str] = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location" and kv.value not in seen:
                    seen.add(kv.value)
                    if (src.parent / kv.value).exists():
                        atomic_copy(src.parent / kv.value, dst_dir / kv.value)
    return dst


def _config(study: Any, trial: Any) -> dict[str, Any]:
    """Per-unit knobs (every unit of the space, neutral values included) plus global options."""
    cand = dict(trial.user_attrs.get("candidate", {}))
    units_by_knob: Mapping[str, list[str]] = study.meta.get("units", {}) or {}
    neutral = {k.name: k.neutral for k in known([*units_by_knob, *cand])}
    knobs = [k for k in neutral if units_by_knob.get(k) or cand.get(k)]
    names: list[str] = []
    for k in knobs:
        for u in list(units_by_knob.get(k, [])) + list(cand.get(k, {})):
            if u not in names:
                names.append(u)
    per_unit: dict[str, dict[str, Any]] = {}
    for u in names:
        per_unit[u] = {k: cand.get(k, {}).get(u, neutral[k]) for k in knobs if u in units_by_knob.get(k, []) or u in cand.get(k, {})}
    return {
        "study": study.name,
        "trial": trial.number,
        "summary": trial.user_attrs.get("summary", ""),
        "units": per_unit,
        "quantization": dict(cand.get("quant", {})),
        "recovery": dict(cand.get("recovery", {})),
        "candidate": {k: cand.get(k, {}) for k in [*neutral, "quant", "recovery"]},
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def _feed(example: Any, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(example, Mapping):
        missing = [n for n in names if n not in example]
        if missing:
            raise ConfigError(f"example_inputs lacks model input(s) {missing}; it has {sorted(example)}")
        return {n: np.asarray(example[n]) for n in names}
    items = list(example) if isinstance(example, (list, tuple)) else [example]
    arrays = [np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x) for x in items]
    if len(arrays) != len(names):
        raise ConfigError(f"example_inputs has {len(arrays)} array(s) but the model has {len(names)} input(s) {names}")
    return dict(zip(names, arrays))


def _rebuild_problem(study: Any, base_path: Path | None, notes: list[str]) -> tuple[Any, Any]:
    """(evaluator, example_inputs) from a CLI study's spec; (None, None) for Python studies."""
    spec = study.optuna_study.user_attrs.get("cli_spec")
    if not spec:
        notes.append("accuracy not re-measured: the study was created from Python, so pass evaluator= "
                      "(and example_inputs=) to export_trial to re-measure it")
        return None, None
    from autosearch.problem import load_problem

    try:
        _, evaluator, example = load_problem(dict(spec))
    except ConfigError as exc:  # e.g. the data file moved: verify what can be verified
        notes.append(f"accuracy not re-measured: the study's model or data cannot be loaded again ({exc})")
        return None, None
    if evaluator is None and base_path is not None:
        # the search's own default: fidelity on 64 random inputs (seeds 0..63)
        import onnx

        from autosearch.evaluate import default_evaluator

        evaluator = default_evaluator(onnx.load(str(base_path)))
    return evaluator, example


def _accuracy_floor(meta: Mapping[str, Any], base: Any) -> float | None:
    """The study's accuracy floor: the float model's score less ``max_accuracy_drop``, and ``min_accuracy``."""
    cons = (meta.get("space") or {}).get("constraints") or {}
    floors = []
    if cons.get("max_accuracy_drop") is not None and base is not None:
        floors.append(float(base) - float(cons["max_accuracy_drop"]))
    if cons.get("min_accuracy") is not None:
        floors.append(float(cons["min_accuracy"]))
    return max(floors) if floors else None


def _floor_rule(meta: Mapping[str, Any], base: Any) -> str:
    cons = (meta.get("space") or {}).get("constraints") or {}
    parts = []
    if cons.get("max_accuracy_drop") is not None and base is not None:
        parts.append(f"max_accuracy_drop {float(cons['max_accuracy_drop']):g} from the float model's {float(base):.4f}")
    if cons.get("min_accuracy") is not None:
        parts.append(f"min_accuracy {float(cons['min_accuracy']):g}")
    return ", ".join(parts)


def _target_of(study: Any) -> Any:
    from autosearch.remote import target_from_identity

    return target_from_identity(study.meta.get("target", {}) or {}, lock_path=str(Path(study.dir).parent / ".profile.lock"))


def _max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            worst = max(worst, float(np.max(np.abs(x - y))))
    return worst


def export_trial(
    study: Any,
    rule: str | int,
    out_dir: str | Path,
    *,
    evaluator: Any = None,
    example_inputs: Any = None,
    target: Any = None,
    latency_tolerance: float = 0.15,
    accuracy_tolerance: float = 0.005,
    rounds: int = 5,
    force: bool = False,
) -> ExportReport:
    """Export a trial's model and verify it against the study in one fresh run.

    Writes to ``out_dir``: ``model.onnx`` (the trial's file), ``config.yaml`` (its
    per-unit knobs and global options), ``metrics.json`` (the study's figures),
    ``report.md`` and ``report.json`` (the verification).

    Args:
        study: A :class:`autosearch.Study`.
        rule: Which trial (see :func:`pick_trial`): a number, ``"fastest[:floor]"``,
            ``"smallest[:floor]"`` or ``"knee"``.
        out_dir: Folder to write (created; files of the same names are replaced).
        evaluator: Re-measures accuracy. Default: rebuilt from a CLI study's spec;
            a study created from Python gets no accuracy check without it.
        example_inputs: Input batch latency is measured at (default: the CLI spec's,
            else random data of the model's input shape, batch 1).
        target: Where latency is measured (default: the study's providers and threads).
        latency_tolerance: Relative latency (or speedup) difference counted as noise.
        accuracy_tolerance: Absolute accuracy difference counted as agreement.
        rounds: Interleaved timing rounds of the exported and the original model.
        force: Replace an earlier export: a folder that already holds a ``model.onnx`` is refused without it.

    Returns:
        The :class:`ExportReport` (``print(report)`` shows its table).

    Raises:
        ConfigError: a bad rule or trial, a missing ONNX file, bad options, a folder holding an export (without ``force``).

    Example:
        >>> report = export_trial(study, "fastest:0.98", "out/fast", evaluator=ev)  # doctest: +SKIP
        >>> report.agrees, report.files["model"]                                    # doctest: +SKIP
        (True, PosixPath('out/fast/model.onnx'))
    """
    import yaml

    from autosearch.evaluate import FidelityEvaluator, run_batched
    from autosearch.target import interleaved

    if not (isinstance(latency_tolerance, (int, float)) and latency_tolerance > 0):
        raise ConfigError(f"latency_tolerance must be a positive fraction such as 0.15, got {latency_tolerance!r}")
    if not (isinstance(accuracy_tolerance, (int, float)) and accuracy_tolerance >= 0):
        raise ConfigError(f"accuracy_tolerance must be >= 0 such as 0.005, got {accuracy_tolerance!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer such as 5, got {rounds!r}")
    number = pick_trial(study, rule)
    trial = next(t for t in study.optuna_study.get_trials(deepcopy=False) if t.number == number)
    ua = trial.user_attrs
    src = _trial_onnx(study, trial)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export folder {str(out)!r} is a file: pass a folder path with -o / out_dir")
    if (out / "model.onnx").exists() and not force:
        raise ConfigError(f"export folder {str(out)!r} already holds a model.onnx: pass force=True (CLI --force) to "
                          "replace it, or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    files: dict[str, Path] = {"model": _copy_onnx(src, out)}

    cfg = _config(study, trial)
    files["config"] = out / "config.yaml"
    atomic_write_text(
        files["config"],
        f"# trial {number} of study {study.name!r}: per-unit knobs (every unit of the search space; bits 32 = float,\n"
        "# prune 0 = untouched, rank 1.0 = full rank), global quantizer and recovery options.\n"
        "# 'candidate' is the same in the form autosearch.Candidate.from_dict() reads.\n"
        + yaml.safe_dump(_jsonable(cfg), sort_keys=False, default_flow_style=False)
    )
    baseline = study.baseline
    meta = study.meta
    study_figures = {
        "accuracy": ua.get("accuracy"),
        "accuracy_drop": ua.get("accuracy_drop"),
        "latency_ms": ua.get("latency_ms"),
        "speedup": ua.get("speedup"),
        "size_mb": ua.get("size_mb"),
        "feasible": ua.get("feasible"),
        "baseline_latency_ms": ua.get("baseline_latency_ms", baseline.get("latency_ms")),
        "baseline_accuracy": baseline.get("accuracy"),
    }
    floor = _accuracy_floor(meta, baseline.get("accuracy"))
    study_figures["accuracy_floor"] = floor
    remeasured = (study.optuna_study.user_attrs.get("front_remeasured") or {}).get("trials", {}).get(str(number))
    if remeasured:
        study_figures["remeasured_ms"] = remeasured.get("latency_ms")
        study_figures["remeasured_speedup"] = remeasured.get("speedup")
    metrics = {
        "study": study.name,
        "trial": number,
        "summary": ua.get("summary", ""),
        "objectives": meta.get("objectives", []),
        "values": list(trial.values or []),
        "evaluator": meta.get("evaluator"),
        **study_figures,
        "latency": ua.get("latency", {}),
        "baseline": baseline,
        "target": meta.get("target", {}),
        "build_notes": ua.get("build_notes", []),
        "source_onnx": str(src),
        "artifact_id": ua.get("artifact_id"),
        "artifact_store": ua.get("artifact_store"),
    }
    files["metrics"] = out / "metrics.json"
    atomic_write_text(files["metrics"], json.dumps(_jsonable(metrics), indent=2))

    # -- verification, in one run
    tgt = target if target is not None else _target_of(study)
    base_path_opt = _baseline_onnx(study)
    if base_path_opt is None:
        notes.append(f"original float model {Path(study.dir) / 'baseline.onnx'} is missing (and the study has no "
                     "reachable baseline artifact): latency measured alone, no output difference")
    if evaluator is None:
        evaluator, rebuilt_example = _rebuild_problem(study, base_path_opt, notes)
        if example_inputs is None:
            example_inputs = rebuilt_example
    exp_sess = tgt.session(files["model"])
    base_sess = tgt.session(base_path_opt) if base_path_opt is not None else None
    names = [i.name for i in exp_sess.get_inputs()]
    if example_inputs is not None:
        feed = _feed(example_inputs, names)
        feed_note = "the example input"
    else:
        import onnx

        from autosearch.model import random_feed

        feed = random_feed(onnx.load(str(base_path_opt or files["model"]), load_external_data=False))
        feed_note = "a random input (batch 1)"
        notes.append("latency measured on random input of the model's input shape (batch 1): pass example_inputs= to use yours")

    measured: dict[str, Any] = {"size_mb": files["model"].stat().st_size / 1e6}
    if base_path_opt is not None:
        measured["original_size_mb"] = base_path_opt.stat().st_size / 1e6
    # accuracy
    acc_ok: bool | None = None
    if isinstance(evaluator, FidelityEvaluator) and evaluator.reference is None:
        if base_sess is None:
            notes.append("accuracy not re-measured: a fidelity evaluator needs the original float model")
            evaluator = None
        else:
            evaluator.prepare(base_sess)
    if evaluator is not None:
        # the original first, as in the search: whether samples run batched is decided on the float model
        # (a dynamically quantized model gives batch-dependent outputs and would be scored one by one)
        if base_sess is not None:
            measured["original_accuracy"] = float(evaluator(base_sess))
        measured["accuracy"] = float(evaluator(exp_sess))
        name = getattr(evaluator, "name", None)
        if meta.get("evaluator") and name != meta.get("evaluator"):
            notes.append(f"the evaluator given scores {name!r}, the study's scored {meta.get('evaluator')!r}: accuracy not compared")
        elif study_figures["accuracy"] is not None:
            acc_ok = abs(measured["accuracy"] - float(study_figures["accuracy"])) <= accuracy_tolerance
    # output difference
    max_diff: float | None = None
    diff_on = ""
    if base_sess is not None:
        inputs = getattr(evaluator, "inputs", None) if evaluator is not None else None
        try:
            if inputs is not None:
                n_all = len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) else (
                    len(inputs) if isinstance(inputs, np.ndarray) else len(inputs[0]))
                n = min(n_all, _DIFF_SAMPLES)
                max_diff = _max_abs_diff(run_batched(exp_sess, inputs, limit=n), run_batched(base_sess, inputs, limit=n))
                diff_on = f"{n} evaluation sample(s)"
            else:
                max_diff = _max_abs_diff(exp_sess.run(None, feed), base_sess.run(None, feed))
                diff_on = feed_note
        except Exception as exc:  # noqa: BLE001 - a model that cannot run on these inputs is reported, not raised
            notes.append(f"output difference not measured: {str(exc)[:200]}")
    # latency, interleaved with the original
    pairs = [("exported", exp_sess)] + ([("original", base_sess)] if base_sess is not None else [])
    stats = interleaved(pairs, feed, tgt, rounds=rounds)
    exp_lat = stats["exported"]
    measured["latency_ms"] = exp_lat.median_ms
    measured["latency_iqr"] = exp_lat.iqr_rel
    measured["latency_runs"] = exp_lat.runs
    if "original" in stats:
        measured["original_latency_ms"] = stats["original"].median_ms
        measured["speedup"] = stats["original"].median_ms / exp_lat.median_ms
    # the further targets the study timed every candidate on: the exported model and the original, interleaved, on each
    if target is None and base_path_opt is not None:
        from autosearch.errors import AutosearchError
        from autosearch.remote import target_from_identity

        for lbl, ident in ((study.meta.get("target") or {}).get("also") or {}).items():
            try:
                st = interleaved([("exported", files["model"]), ("original", base_path_opt)], feed,
                                 target_from_identity(ident), rounds=rounds)
            except AutosearchError as exc:
                notes.append(f"not re-timed on {lbl}: {exc}")
                continue
            measured[f"latency_ms@{lbl}"] = st["exported"].median_ms
            measured[f"speedup@{lbl}"] = st["original"].median_ms / st["exported"].median_ms
            study_figures[f"latency_ms@{lbl}"] = ua.get(f"latency_ms@{lbl}")
    # latency agrees when the time, or the speedup over the float model, is within the tolerance of the
    # study's figure, or of the study's own interleaved re-measure of its front when it made one
    pairs_cmp: list[tuple[str, str, float, float]] = []
    s_lat, s_sp, s_rem = study_figures["latency_ms"], study_figures["speedup"], study_figures.get("remeasured_speedup")
    if s_lat:
        pairs_cmp.append(("latency_rel_diff", f"latency {measured['latency_ms']:.3f} ms vs {float(s_lat):.3f} ms in the study",
                          measured["latency_ms"], float(s_lat)))
    if measured.get("speedup") and s_sp:
        pairs_cmp.append(("speedup_rel_diff", f"speedup {measured['speedup']:.2f}x vs {float(s_sp):.2f}x",
                          measured["speedup"], float(s_sp)))
    if measured.get("speedup") and s_rem:
        pairs_cmp.append(("remeasured_speedup_rel_diff", f"vs {float(s_rem):.2f}x in the study's interleaved front re-measure",
                          measured["speedup"], float(s_rem)))
    lat_ok: bool | None = None
    for key, _, got, want in pairs_cmp:
        measured[key] = got / want - 1
    if pairs_cmp:
        lat_ok = any(abs(measured[key]) <= latency_tolerance for key, _, _, _ in pairs_cmp)
    # verdict
    checks = {"accuracy": acc_ok, "latency": lat_ok}
    compared = {k: v for k, v in checks.items() if v is not None}
    agrees = all(compared.values()) if compared else None
    diffs = []
    if acc_ok is False:
        diffs.append(f"accuracy {measured['accuracy']:.4f} vs {float(study_figures['accuracy']):.4f} in the study "
                     f"(tolerance {accuracy_tolerance})")
    if lat_ok is False:
        diffs.append("; ".join(f"{text} ({100 * measured[key]:+.0f}%)" for key, text, _, _ in pairs_cmp)
                     + f" (tolerance {100 * latency_tolerance:.0f}%)")
    below_floor = floor is not None and study_figures["accuracy"] is not None and float(study_figures["accuracy"]) < floor
    if below_floor:
        notes.insert(0, f"BELOW THE STUDY'S ACCURACY FLOOR: trial {number} scored {float(study_figures['accuracy']):.4f} in the "
                     f"study, under its floor {floor:.4f} ({_floor_rule(meta, baseline.get('accuracy'))}): it does not meet "
                     "the study's constraint; pick a feasible trial (e.g. --pick fastest) to meet it")
    cores = os.cpu_count() or 1
    if exp_lat.load_avg > cores:
        notes.append(f"the machine was busy while measuring (1-minute load average {exp_lat.load_avg:.1f} on {cores} cores): "
                     "latency figures are noisy; re-run the export on an idle machine to confirm")
    if agrees is None:
        verdict = "NOT VERIFIED: nothing could be compared with the study"
    elif agrees:
        what = " and ".join(k for k in ("accuracy", "latency") if checks[k] is not None)
        verdict = f"AGREES: the re-measured figures ({what}) agree with the study's, within noise"
        if acc_ok is None:
            verdict += "; accuracy was not re-measured"
    else:
        verdict = "DIFFERS from the study: " + "; ".join(diffs)
    import onnxruntime as ort

    details = {
        "summary": ua.get("summary", ""),
        "config": _jsonable(cfg),
        "checks": checks,
        "accuracy_floor": floor,
        "below_floor": below_floor,
        "tolerances": {"accuracy": accuracy_tolerance, "latency": latency_tolerance},
        "rounds": rounds,
        "latency_on": feed_note,
        "target": _jsonable({k: v for k, v in tgt.describe().items() if k in ("providers", "threads", "graph_optimization_level")}),
        "ort_version": ort.__version__,
        "cpu": exp_lat.cpu,
        "load_avg": exp_lat.load_avg,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    report = ExportReport(
        study=study.name, trial=number, rule=str(rule), out_dir=out, files=files,
        study_figures=_jsonable(study_figures), measured=_jsonable(measured), max_abs_diff=max_diff, diff_on=diff_on,
        agrees=agrees, verdict=verdict, notes=notes, details=details,
    )
    files["report_md"] = out / "report.md"
    files["report_json"] = out / "report.json"
    atomic_write_text(files["report_md"], report.markdown())
    atomic_write_text(files["report_json"], json.dumps(_jsonable(report.to_dict()), indent=2))
    return report
