"""Search and study: the Optuna study that records every candidate.

The study is a plain Optuna study (metric names set, RDB storage, SQLite file by
default) so it opens in optuna-dashboard as is. Each trial holds its full
candidate and every measurement as user attributes and its ONNX file under
``studies/<name>/candidates/<hash>/``; an identical candidate is never built
or measured twice. Calling :func:`search` again with the same name and storage
resumes the study; a different model, space or target is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from autosearch.analysis import quant_units
from autosearch.build import build_candidate
from autosearch.candidate import Candidate, SpaceUnits, candidate_params, sample_candidate
from autosearch.errors import CandidateError, ConfigError, StudyMismatchError
from autosearch.evaluate import Evaluator, FidelityEvaluator
from autosearch.model import SourceModel, import_model, random_feed
from autosearch.space import OBJECTIVES, SearchSpace, load_space
from autosearch.target import Target

__all__ = ["Study", "default_storage", "search"]

_ATTR = "autosearch"


def default_storage(study_name: str, studies_dir: str | Path = "studies") -> str:
    """``sqlite:///studies/<name>.db`` (the folder is created)."""
    d = Path(studies_dir)
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / f'{study_name}.db'}"


def _storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("sqlite:"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)


def _make_sampler(name: str, seed: int, population_size: int) -> optuna.samplers.BaseSampler:
    """The sampler; constraints reach it through ``trial.set_constraint``."""
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


@contextlib.contextmanager
def _quiet_optuna(level: int = optuna.logging.WARNING) -> Iterator[None]:
    """Optuna's own per-trial logs repeat what the progress lines say; keep them down while searching."""
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)


@dataclass
class _Units:
    space_units: SpaceUnits
    all_bits: tuple[str, ...]


def discover_units(source: SourceModel, space: SearchSpace) -> tuple[SpaceUnits, list[str]]:
    """Units of each knob for this model, after the space's include/exclude; plus notes."""
    notes: list[str] = []
    by_module = source.origin == "torch"
    bits = [u.name for u in quant_units(source.onnx_model, by_module=by_module)]
    prune: list[str] = []
    rank: list[str] = []
    if "prune" in space.knobs:
        if source.origin == "torch":
            from autosearch.transforms.structural import find_prune_units

            prune = [u.name for u in find_prune_units(source.torch_module, source.torch_example)]
        else:
            notes.append("prune knob skipped: structured pruning needs the PyTorch model (this one came as ONNX)")
    if "rank" in space.knobs:
        if source.origin == "torch":
            from autosearch.transforms.structural import find_lowrank_units

            rank = [u.name for u in find_lowrank_units(source.torch_module)]
        else:
            from autosearch.transforms.lowrank_onnx import find_onnx_lowrank_units

            rank = [u[0] for u in find_onnx_lowrank_units(source.onnx_model)]

    def keep(knob: str, names: list[str]) -> tuple[str, ...]:
        spec = space.knobs.get(knob)
        return tuple(n for n in names if spec is not None and spec.applies(n))

    units = SpaceUnits(bits=keep("bits", bits), prune=keep("prune", prune), rank=keep("rank", rank))
    for knob in space.knobs:
        if not units.of(knob) and not any(knob in n for n in notes):
            notes.append(f"knob {knob!r}: no unit of this model matches its include/exclude patterns")
    return units, notes


class Study:
    """Handle on a search's Optuna study.

    Example:
        >>> study = Study.load("demo")                      # doctest: +SKIP
        >>> study.front()[["trial", "accuracy", "latency_ms", "speedup"]]  # doctest: +SKIP
    """

    def __init__(self, study: optuna.Study, *, studies_dir: str | Path = "studies") -> None:
        self.optuna_study = study
        self.name = study.study_name
        self.dir = Path(studies_dir) / study.study_name

    @classmethod
    def load(cls, study_name: str, storage: str | None = None, *, studies_dir: str | Path = "studies") -> Study:
        """Open an existing study (no model needed).

        Raises:
            ConfigError: no study of that name in that storage.
        """
        url = storage or default_storage(study_name, studies_dir)
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
            raise ConfigError(f"no study database at {url[len('sqlite:///'):]}: check the study name or pass --storage")
        try:
            st = optuna.load_study(study_name=study_name, storage=_storage(url))
        except KeyError:
            names = optuna.get_all_study_names(storage=_storage(url))
            raise ConfigError(f"study {study_name!r} not found in {url}; studies there: {', '.join(names) or '(none)'}") from None
        return cls(st, studies_dir=studies_dir)

    @property
    def meta(self) -> dict[str, Any]:
        """What the search recorded about itself (fingerprints, baseline, space, target)."""
        return dict(self.optuna_study.user_attrs.get(_ATTR, {}))

    @property
    def baseline(self) -> dict[str, Any]:
        """The float model's figures from the latest run."""
        return dict(self.optuna_study.user_attrs.get("baseline", {}))

    def trials(self, *, include_failed: bool = True) -> Any:
        """Every trial as a pandas DataFrame, one row each."""
        import pandas as pd

        rows = []
        for t in self.optuna_study.get_trials(deepcopy=False):
            if not include_failed and t.state != optuna.trial.TrialState.COMPLETE:
                continue
            ua = t.user_attrs
            rows.append(
                {
                    "trial": t.number,
                    "state": t.state.name,
                    "accuracy": ua.get("accuracy"),
                    "accuracy_drop": ua.get("accuracy_drop"),
                    "latency_ms": ua.get("latency_ms"),
                    "latency_iqr": ua.get("latency", {}).get("iqr_rel"),
                    "size_mb": ua.get("size_mb"),
                    "speedup": ua.get("speedup"),
                    "feasible": ua.get("feasible"),
                    "config": ua.get("summary", ""),
                    "reason": ua.get("fail_reason") or t.system_attrs.get("fail_reason"),
                    "onnx": ua.get("onnx_path"),
                }
            )
        return pd.DataFrame(rows)

    def front(self, *, feasible_only: bool = True) -> Any:
        """The Pareto front over complete (and feasible) trials, sorted by latency."""
        df = self.trials(include_failed=False)
        if df.empty:
            return df
        if feasible_only and df["feasible"].any():
            df = df[df["feasible"] == True]  # noqa: E712
        objectives = list(self.meta.get("objectives", ["accuracy", "latency_ms"]))
        signs = np.array([1.0 if OBJECTIVES[o] == "minimize" else -1.0 for o in objectives])
        vals = df[objectives].to_numpy(dtype=float) * signs
        keep = []
        for i in range(len(vals)):
            dominated = np.any(np.all(vals <= vals[i], axis=1) & np.any(vals < vals[i], axis=1))
            keep.append(not dominated)
        front = df[np.array(keep)].drop_duplicates(subset=objectives).sort_values("latency_ms")
        return front.reset_index(drop=True)

    def candidate(self, trial: int) -> Candidate:
        """The candidate of a trial number."""
        t = self.optuna_study.trials[trial]
        return Candidate.from_dict(t.user_attrs.get("candidate", {}))


def _print_row(msg: str) -> None:
    print(msg, flush=True)


def search(
    model: Any,
    evaluator: Evaluator | None = None,
    *,
    example_inputs: Any = None,
    space: str | Path | Mapping[str, Any] | SearchSpace | None = None,
    target: Target | None = None,
    study_name: str = "autosearch",
    storage: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    studies_dir: str | Path = "studies",
    verbose: bool = True,
    cli_spec: Mapping[str, Any] | None = None,
) -> Study:
    """Run (or resume) a search and return the study.

    Args:
        model: ``torch.nn.Module`` (with ``example_inputs``) or ``.onnx`` path.
        evaluator: Scores a candidate's session, higher is better. Default: fidelity
            (cosine) to the original model on random inputs, with a warning.
        example_inputs: One batch of input; its shape is the one latency is measured at.
        space: Preset name (``cnn``), YAML path, mapping or :class:`SearchSpace`.
        target: Where latency is measured (default: this CPU, 1 thread).
        study_name: Name of the study; calling again with the same name resumes it.
        storage: Optuna storage URL (default ``sqlite:///studies/<name>.db``).
        n_trials: Trials to run now (default: the space's budget).
        timeout: Seconds to run at most (default: the space's budget).
        studies_dir: Home of study databases and artifacts.
        verbose: Print a line per trial.

    Returns:
        The :class:`Study`; ``study.front()`` is the Pareto front as a DataFrame.

    Raises:
        ConfigError: bad model, data, space or target; StudyMismatchError when resuming
            with a different model, space or target.

    Example:
        >>> from autosearch import search, LabelledEvaluator
        >>> study = search(model, LabelledEvaluator(x, y), example_inputs=x[:1],
        ...                study_name="mine", n_trials=10)          # doctest: +SKIP
        >>> study.front()                                            # doctest: +SKIP
    """
    say = _print_row if verbose else (lambda _m: None)
    sp = load_space(space)
    studies_dir = Path(studies_dir)
    studies_dir.mkdir(parents=True, exist_ok=True)
    study_dir = studies_dir / study_name
    tgt = target or Target(lock_path=str(studies_dir / ".profile.lock"))
    source = import_model(model, example_inputs)
    if evaluator is None:
        say("[autosearch] no evaluator given: scoring by cosine fidelity to the original on 64 random inputs")
        rnd = {k: np.concatenate([random_feed(source.onnx_model, seed=s)[k] for s in range(64)]) for k in source.input_names}
        evaluator = FidelityEvaluator(rnd, metric="cosine")
    if not isinstance(evaluator, Evaluator):
        raise ConfigError("evaluator must be callable as evaluator(session, limit=None) -> float with calibration_feeds(); "
                          "use LabelledEvaluator or FidelityEvaluator")
    units, notes = discover_units(source, sp)
    for n in notes:
        say(f"[autosearch] {n}")
    url = storage or default_storage(study_name, studies_dir)
    stor = _storage(url)
    directions = [OBJECTIVES[o] for o in sp.objectives]
    meta = {
        "model_fingerprint": source.fingerprint,
        "space_fingerprint": sp.fingerprint(),
        "target": {k: v for k, v in tgt.describe().items() if k in ("providers", "threads", "graph_optimization_level")},
        "objectives": list(sp.objectives),
        "evaluator": evaluator.name,
        "space": sp.to_dict(),
        "sampler": {"name": sp.sampler, "seed": sp.seed, "population_size": sp.population_size},
        "units": {k: list(units.of(k)) for k in ("bits", "prune", "rank")},
    }
    with _quiet_optuna():
        try:
            existing = optuna.load_study(study_name=study_name, storage=stor)
        except KeyError:
            existing = None
        if existing is not None:
            old = existing.user_attrs.get(_ATTR)
            if old:
                _check_same(old, meta, study_name, url)
                meta["sampler"] = old["sampler"]
        n_before = len(existing.trials) if existing is not None else 0
        sampler_cfg = meta["sampler"]
        sampler = _make_sampler(sampler_cfg["name"], int(sampler_cfg["seed"]) + n_before, int(sampler_cfg["population_size"]))
        ost = optuna.create_study(study_name=study_name, storage=stor, directions=directions, sampler=sampler, load_if_exists=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ost.set_metric_names(list(sp.objectives))
        if not ost.user_attrs.get(_ATTR):
            ost.set_user_attr(_ATTR, meta)
        if cli_spec is not None and not ost.user_attrs.get("cli_spec"):
            ost.set_user_attr("cli_spec", dict(cli_spec))

    # -- baseline: the float model, measured in this run
    study_dir.mkdir(parents=True, exist_ok=True)
    base_path = source.save(study_dir / "baseline.onnx")
    base_sess = tgt.session(base_path)
    if isinstance(evaluator, FidelityEvaluator):
        evaluator.prepare(base_sess)
    base_acc = float(evaluator(base_sess))
    base_lat = tgt.profile(base_sess, source.example_feed)
    baseline = {
        "accuracy": base_acc,
        "latency_ms": base_lat.median_ms,
        "latency": base_lat.as_dict(),
        "size_mb": base_path.stat().st_size / 1e6,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    ost.set_user_attr("baseline", baseline)
    floor = _floor(sp, base_acc)
    say(
        f"[autosearch] study {study_name!r} ({n_before} trials so far) at {url}\n"
        f"[autosearch] float model: {evaluator.name} {base_acc:.4f}, latency {base_lat.median_ms:.3f} ms median "
        f"({tgt.threads} thread(s), {base_lat.provider}), {baseline['size_mb']:.2f} MB"
        + (f"; accuracy floor {floor:.4f}" if floor is not None else "")
    )
    calibration = evaluator.calibration_feeds(max(sp.calibration_samples, int(sp.recovery.get("calibration_samples", 200))), source.input_names)
    if n_before == 0:
        for cand in _warm_start(sp, units):
            params = candidate_params(cand, sp, units)
            if params:
                ost.enqueue_trial(params, skip_if_exists=True)

    budget = n_trials if n_trials is not None else sp.n_trials
    total = n_before + budget
    started = time.perf_counter()

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        cand = sample_candidate(trial, sp, units)
        trial.set_user_attr("candidate", cand.to_dict())
        trial.set_user_attr("summary", cand.summary())
        key = cand.key(source.fingerprint)
        cdir = study_dir / "candidates" / key
        trial.set_user_attr("onnx_path", str(cdir / "model.onnx"))
        metrics_file = cdir / "metrics.json"
        if metrics_file.exists():
            rec = json.loads(metrics_file.read_text())
            if "error" in rec:
                trial.set_user_attr("fail_reason", rec["error"])
                raise CandidateError(rec["error"])
            rec["cached"] = True
        else:
            try:
                rec = _measure(cand, cdir, source, units, calibration, evaluator, tgt, floor, base_lat.median_ms)
            except CandidateError as exc:
                trial.set_user_attr("fail_reason", str(exc))
                cdir.mkdir(parents=True, exist_ok=True)
                metrics_file.write_text(json.dumps({"error": str(exc)}))
                raise
            metrics_file.write_text(json.dumps(rec, default=float))
        for k, v in rec.items():
            trial.set_user_attr(k, v)
        acc = rec["accuracy"]
        drop = base_acc - acc
        trial.set_user_attr("accuracy_drop", drop)
        cons = 0.0 if floor is None else floor - acc
        if floor is not None:
            trial.set_constraint("accuracy_floor", cons)
        trial.set_user_attr("feasible", cons <= 0)
        trial.set_user_attr("baseline_latency_ms", base_lat.median_ms)
        if rec.get("early_stopped"):
            raise optuna.TrialPruned(f"scored {acc:.4f} on a subset, below the floor {floor:.4f}")
        return tuple(float(rec[o]) for o in sp.objectives)

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        ua = trial.user_attrs
        head = f"[trial {trial.number + 1:>3}/{total}]"
        if trial.state == optuna.trial.TrialState.COMPLETE:
            flag = "" if ua.get("feasible", True) else "  (below floor)"
            say(
                f"{head} {evaluator.name} {ua['accuracy']:.4f} ({-ua['accuracy_drop']:+.4f})  "
                f"{ua['latency_ms']:.3f} ms  {ua['speedup']:.2f}x  {ua['size_mb']:.2f} MB  {ua.get('summary', '')}"
                + (" [cached]" if ua.get("cached") else "")
                + flag
            )
        elif trial.state == optuna.trial.TrialState.PRUNED:
            say(f"{head} stopped early: {ua.get('summary', '')}: subset score {ua.get('accuracy', float('nan')):.4f} below floor")
        else:
            say(f"{head} FAILED ({ua.get('summary', '')}): {str(ua.get('fail_reason', trial.system_attrs.get('fail_reason', '?')))[:300]}")

    with _quiet_optuna(optuna.logging.ERROR):
        ost.optimize(
            objective,
            n_trials=budget,
            timeout=timeout if timeout is not None else sp.timeout_s,
            catch=(CandidateError,),
            callbacks=[progress],
            gc_after_trial=False,
        )
    study = Study(ost, studies_dir=studies_dir)
    say(f"[autosearch] {budget} trial(s) in {time.perf_counter() - started:.0f} s; study {study_name!r} at {url}")
    return study


def _floor(sp: SearchSpace, base_acc: float) -> float | None:
    floors = []
    if sp.max_accuracy_drop is not None:
        floors.append(base_acc - sp.max_accuracy_drop)
    if sp.min_accuracy is not None:
        floors.append(sp.min_accuracy)
    return max(floors) if floors else None


def _check_same(old: Mapping[str, Any], new: Mapping[str, Any], name: str, url: str) -> None:
    checks = (
        ("model_fingerprint", "a different model", "pass the same model, or give this search a new study name"),
        ("space_fingerprint", "a different search space", "use the space it was created with (see `autosearch front` for it), or a new study name"),
        ("target", "a different target", "use the same provider and thread count, or a new study name"),
        ("objectives", "different objectives", "keep the objectives, or use a new study name"),
    )
    for key, what, fix in checks:
        if old.get(key) != new.get(key):
            raise StudyMismatchError(
                f"study {name!r} in {url} was created with {what} ({key}: {old.get(key)!r}, now {new.get(key)!r}); {fix}"
            )


def _warm_start(sp: SearchSpace, units: SpaceUnits) -> list[Candidate]:
    """Float and uniform low-precision candidates, tried before the sampler takes over."""
    spec = sp.knobs.get("bits")
    out = [Candidate()] if spec is None or 32 in spec.choices else []
    if spec is not None and units.bits:
        low = [b for b in spec.choices if b != 32]
        if 8 in low:
            quant = {opt: choices[0] for opt, choices in sp.quantization.items()}
            out.append(Candidate(bits={u: 8 for u in units.bits}, quant=quant))
    return out


def _measure(
    cand: Candidate,
    cdir: Path,
    source: SourceModel,
    units: SpaceUnits,
    calibration: list[dict[str, np.ndarray]],
    evaluator: Evaluator,
    tgt: Target,
    floor: float | None,
    base_latency: float,
) -> dict[str, Any]:
    built = build_candidate(source, cand, cdir, bits_units=units.bits, calibration=calibration)
    sess = tgt.session(built.path)
    t = time.perf_counter()
    n = getattr(evaluator, "num_samples", 0)
    rec: dict[str, Any] = {"build_s": built.seconds, "build_notes": built.notes, **built.stages}
    if floor is not None and n >= 200:
        sub = float(evaluator(sess, limit=max(100, n // 4)))
        if sub < floor - 0.05:
            rec.update(accuracy=sub, early_stopped=True, latency_ms=float("nan"), size_mb=built.path.stat().st_size / 1e6, speedup=float("nan"))
            return rec
    acc = float(evaluator(sess))
    rec["eval_s"] = time.perf_counter() - t
    lat = tgt.profile(sess, source.example_feed)
    rec.update(
        accuracy=acc,
        latency_ms=lat.median_ms,
        latency=lat.as_dict(),
        size_mb=built.path.stat().st_size / 1e6,
        speedup=base_latency / lat.median_ms,
    )
    return rec


def _is_tty() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
