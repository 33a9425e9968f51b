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
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import optuna

from autosearch.analysis import quant_units
from autosearch.build import build_candidate
from autosearch.candidate import Candidate, SpaceUnits, candidate_params, sample_candidate
from autosearch.errors import CandidateError, ConfigError, StudyMismatchError
from autosearch.evaluate import Evaluator, FidelityEvaluator, default_evaluator
from autosearch.model import SourceModel, import_model
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

    inner = _subgraph_weighted(source.onnx_model)
    if inner and "bits" in space.knobs:
        notes.append(f"{inner} weighted node(s) inside If/Loop/Scan subgraphs stay float: ONNX Runtime's quantizer "
                     "does not reach into subgraphs")
    units = SpaceUnits(bits=keep("bits", bits), prune=keep("prune", prune), rank=keep("rank", rank))
    for knob in space.knobs:
        if not units.of(knob) and not any(knob in n for n in notes):
            notes.append(f"knob {knob!r}: no unit of this model matches its include/exclude patterns")
    return units, notes


def _subgraph_weighted(model: onnx.ModelProto) -> int:
    """Conv/MatMul/Gemm nodes inside subgraphs (If branches, Loop bodies), at any depth."""
    def count(graph: onnx.GraphProto, top: bool) -> int:
        n = 0
        for node in graph.node:
            if not top and node.op_type in ("Conv", "MatMul", "Gemm"):
                n += 1
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    n += count(a.g, False)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    n += sum(count(g, False) for g in a.graphs)
        return n

    return count(model.graph, True)


_QUANTIZED_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM", "MatMulNBits",
                  "DynamicQuantizeMatMul", "QGemm", "QAttention", "DequantizeLinear")


def no_units_reason(source: SourceModel, space: SearchSpace) -> str:
    """Why a model has nothing to search, and what to do about it (one line)."""
    g = source.onnx_model.graph
    inits = {t.name for t in g.initializer}
    weighted = [n for n in g.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    computed = [n for n in weighted if len(n.input) > 1 and n.input[1] not in inits]
    sub = sum(1 for n in g.node for a in n.attribute if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS))
    integer = {}
    for n in g.node:
        if n.op_type in _QUANTIZED_OPS:
            integer[n.op_type] = integer.get(n.op_type, 0) + 1
    if not weighted and integer:
        ops = ", ".join(f"{c} {op}" for op, c in sorted(integer.items(), key=lambda kv: -kv[1]))
        return (f"nothing to search in this model: it is already quantized ({ops}), so no float layer is left for the "
                "bits knob; search the float model it was made from")
    if not weighted:
        why = "it has no Conv, MatMul or Gemm node in its main graph" + (f" ({sub} node(s) hold subgraphs)" if sub else "")
    elif computed:
        why = (f"{len(computed)} of its {len(weighted)} Conv/MatMul/Gemm nodes take a weight computed at run time, not a "
               f"constant (e.g. {computed[0].name!r} from {computed[0].input[1]!r}), and the others match no knob's include patterns")
    else:
        why = f"none of its {len(weighted)} weighted nodes matches the include/exclude patterns of the space's knobs"
    where = space.source or space.name
    return (f"nothing to search in this model: {why}. Check the knobs' include/exclude patterns in {where} "
            "(`autosearch analyze --model ...` lists the units), or fold computed weights into constants "
            "(e.g. onnxruntime.quantization.shape_inference.quant_pre_process)")


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

        rem = self.optuna_study.user_attrs.get("front_remeasured", {}).get("trials", {})
        cores = os.cpu_count() or 1
        rows = []
        for t in self.optuna_study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.WAITING:
                continue  # queued warm-start candidates that have not run yet
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
                    "remeasured_ms": rem.get(str(t.number), {}).get("latency_ms"),
                    "remeasured_speedup": rem.get(str(t.number), {}).get("speedup"),
                    "loaded": (ua.get("latency", {}).get("load_avg") or 0) > cores,
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

    def analysis(self) -> Any:
        """The analysis the search measured first, one row per sampled parameter (a unit or a share
        group): knob, latency share, parameters, MFLOPs, ``drop@<value>`` and ``saving@<value>``.
        ``None`` when the study ran without one (``strategy.analysis: false``)."""
        import pandas as pd

        blob = self.optuna_study.user_attrs.get("analysis")
        return pd.DataFrame(blob["units"]) if blob else None

    def export(
        self,
        out_dir: str | Path,
        *,
        pick: str | int = "knee",
        evaluator: Evaluator | None = None,
        example_inputs: Any = None,
        target: Target | None = None,
    ) -> Any:
        """Export a trial picked by rule (number, ``fastest[:floor]``, ``smallest``, ``knee``) with a
        verification report that re-measures it against the original (see :func:`autosearch.export.export_trial`).

        Example:
            >>> report = study.export("out/knee", evaluator=ev)   # doctest: +SKIP
        """
        from autosearch.export import export_trial

        return export_trial(self, pick, out_dir, evaluator=evaluator, example_inputs=example_inputs, target=target)

    def dashboard(self, path: str | Path) -> Path:
        """Write the self-contained HTML dashboard of this study (see :func:`autosearch.dashboard.write_dashboard`)."""
        from autosearch.dashboard import write_dashboard

        return write_dashboard(self, path)

    def candidate(self, trial: int) -> Candidate:
        """The candidate of a trial number."""
        t = self.optuna_study.trials[trial]
        return Candidate.from_dict(t.user_attrs.get("candidate", {}))


def _print_row(msg: str) -> None:
    print(msg, flush=True)


def _silent(_msg: str) -> None:
    return None


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
    say = _print_row if verbose else _silent
    sp = load_space(space)
    studies_dir = Path(studies_dir)
    studies_dir.mkdir(parents=True, exist_ok=True)
    study_dir = studies_dir / study_name
    tgt = target or Target(lock_path=str(studies_dir / ".profile.lock"))
    source = import_model(model, example_inputs)
    if evaluator is None:
        say("[autosearch] no evaluator given: scoring by fidelity to the original (scaled cosine) on 64 random inputs; "
            "random inputs rarely look like real data: pass an evaluator with your samples")
        evaluator = default_evaluator(source.onnx_model)
    if not isinstance(evaluator, Evaluator):
        raise ConfigError("evaluator must be callable as evaluator(session, limit=None) -> float with calibration_feeds(); "
                          "use LabelledEvaluator or FidelityEvaluator")
    for n in source.notes:
        say(f"[autosearch] import: {n}")
    units, notes = discover_units(source, sp)
    for n in notes:
        say(f"[autosearch] {n}")
    if not (units.bits or units.prune or units.rank):
        raise ConfigError(no_units_reason(source, sp))
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
        # trials queued by the warm start but not run yet (e.g. after `analyze --sensitivity`) are not done
        n_done = sum(t.state != optuna.trial.TrialState.WAITING for t in existing.trials) if existing is not None else 0
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
        f"[autosearch] study {study_name!r} ({n_done} trials so far) at {url}\n"
        f"[autosearch] float model: {evaluator.name} {base_acc:.4f}, latency {base_lat.median_ms:.3f} ms median "
        f"({tgt.threads} thread(s), {base_lat.provider}), {baseline['size_mb']:.2f} MB"
        + (f"; accuracy floor {floor:.4f}" if floor is not None else "")
    )
    calibration = evaluator.calibration_feeds(max(sp.calibration_samples, int(sp.recovery.get("calibration_samples", 200))), source.input_names)
    def measure_cached(cand: Candidate) -> dict[str, Any]:
        cdir = study_dir / "candidates" / cand.key(source.fingerprint)
        mfile = cdir / "metrics.json"
        if mfile.exists() and _read_json(mfile):
            rec = _read_json(mfile)
            if "error" in rec:
                raise CandidateError(rec["error"])
            return rec
        try:
            rec = _measure(cand, cdir, source, units, calibration, evaluator, tgt, None, base_lat.median_ms)
        except CandidateError as exc:
            cdir.mkdir(parents=True, exist_ok=True)
            _write_json(mfile, {"error": str(exc)})
            raise
        _write_json(mfile, rec)
        return rec

    if n_before == 0:
        warm = _warm_start(sp, units)
        if sp.strategy.get("analysis", True) and (units.bits or units.prune or units.rank):
            warm += _analysis_warm_start(
                ost, sp, units, source, evaluator, calibration, tgt, base_path, base_acc, base_lat.median_ms, measure_cached, say,
                n_trials=n_trials if n_trials else sp.n_trials, ost_dir=study_dir,
            )
        cached = ost.user_attrs.get("analysis")
        hopeless: dict[str, Any] = {}
        reasons: list[str] = []
        if sp.strategy.get("narrow", True) and cached:
            from autosearch.strategy import hopeless_structural, narrowed_options

            hopeless, reasons = hopeless_structural(cached.get("units", []), sp)
        for cand in warm:
            params = candidate_params(cand, sp, units)
            if any(k in params and params[k] != v for k, v in hopeless.items()):
                continue  # a structural value the analysis showed cannot meet the floor
            measured = study_dir / "candidates" / cand.key(source.fingerprint) / "metrics.json"
            if measured.exists() and "error" in _read_json(measured):
                continue  # the analysis built it and it failed: no trial to spend on it
            if params:
                with _quiet_optuna():  # "already exists. Skipping enqueue." is not news
                    ost.enqueue_trial(params, skip_if_exists=True)
        if sp.strategy.get("narrow", True) and cached:

            def confirm(best_q: Mapping[str, Any], other_q: Mapping[str, Any]) -> float | None:
                from autosearch.target import interleaved

                paths = [(lbl, study_dir / "candidates" / Candidate(bits=sp.uniform_bits(units.bits, 8), quant=dict(q)).key(source.fingerprint)
                          / "model.onnx") for lbl, q in (("best", best_q), ("other", other_q))]
                if not all(p.exists() for _, p in paths):
                    return None  # nothing to re-time: keep the analysis' figure
                st = interleaved(paths, source.example_feed, tgt, rounds=3)
                return st["best"].median_ms / st["other"].median_ms

            fixed, why = narrowed_options(sp, cached.get("uniform", []), floor, confirm=confirm)
            fixed, why = {**fixed, **hopeless}, [*why, *reasons]
            ost.set_user_attr("narrowed", {"fixed": fixed, "why": why})
    narrowed = ost.user_attrs.get("narrowed") or {}
    if narrowed.get("fixed"):
        # measured, not assumed: options whose every alternative ran far slower are fixed for the sampler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ost.sampler = optuna.samplers.PartialFixedSampler(narrowed["fixed"], ost.sampler)
        say("[autosearch] the sampler keeps " + "; ".join(narrowed["why"]))

    budget = n_trials if n_trials is not None else sp.n_trials
    total = n_done + budget
    started = time.perf_counter()

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        cand = sample_candidate(trial, sp, units)
        trial.set_user_attr("candidate", cand.to_dict())
        trial.set_user_attr("summary", cand.summary())
        key = cand.key(source.fingerprint)
        cdir = study_dir / "candidates" / key
        trial.set_user_attr("onnx_path", str(cdir / "model.onnx"))
        metrics_file = cdir / "metrics.json"
        if metrics_file.exists() and _read_json(metrics_file):
            rec = _read_json(metrics_file)
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
                _write_json(metrics_file, {"error": str(exc)})
                raise
            _write_json(metrics_file, rec)
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
        head = f"[{trial.number + 1:>3}/{total}] trial {trial.number:<3}"
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
    if sp.strategy.get("remeasure_front", True):
        remeasure_front(study, tgt, source.example_feed, base_path, say=say)
    say(f"[autosearch] {budget} trial(s) in {time.perf_counter() - started:.0f} s; study {study_name!r} at {url}")
    return study


def remeasure_front(study: Study, tgt: Target, feed: Mapping[str, np.ndarray], base_path: Path, *, say: Any = print, rounds: int = 5) -> dict[str, Any]:
    """Re-time the front and the float model interleaved (fair under drifting load); stored in the study.

    Returns the stored record: ``{"float_ms", "trials": {number: {"latency_ms", "speedup"}}, "at"}``.
    """
    from autosearch.target import interleaved

    front = study.front()
    if front.empty:
        return {}
    models = [("float", base_path)] + [(str(int(r.trial)), Path(r.onnx)) for r in front.itertuples() if r.onnx and Path(r.onnx).exists()]
    stats = interleaved(models, feed, tgt, rounds=rounds)
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


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a metrics record atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(data), default=float))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    """A metrics record; an unreadable one (a write cut short) counts as absent."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _floor(sp: SearchSpace, base_acc: float) -> float | None:
    from autosearch.strategy import _space_floor

    return _space_floor(sp, base_acc)


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
    out = [Candidate()] if spec is None or 32 in spec.all_choices else []
    int8 = sp.uniform_bits(units.bits, 8)
    if int8:
        out.append(Candidate(bits=int8, quant=sp.quant_first()))
    return out


def _analysis_warm_start(
    ost: optuna.Study,
    sp: SearchSpace,
    units: SpaceUnits,
    source: SourceModel,
    evaluator: Evaluator,
    calibration: list[dict[str, np.ndarray]],
    tgt: Target,
    base_path: Path,
    base_acc: float,
    base_latency: float,
    measure: Any,
    say: Any,
    *,
    n_trials: int | None = None,
    ost_dir: Path = Path("studies"),
) -> list[Candidate]:
    """Run the analysis (cached in the study) and return warm-start candidates."""
    import shutil
    import tempfile

    from autosearch.strategy import Analysis, analyze, knapsack_candidates, ranked_uniform

    n_sub = int(sp.strategy.get("sensitivity_samples", 150))

    def score_subset(cand: Candidate) -> float:
        tmp = Path(tempfile.mkdtemp(prefix="as_sens_"))
        try:
            built = build_candidate(source, cand, tmp, bits_units=units.bits, calibration=calibration)
            return float(evaluator(tgt.session(built.path), limit=n_sub))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    cached = ost.user_attrs.get("analysis")
    if cached:
        analysis = Analysis.from_json(cached)
        best_quant = cached.get("best_quant")
    else:
        say("[autosearch] analysis: latency share per unit, uniform int8 variants, sensitivity of each unit")
        analysis = analyze(
            source, sp, units, base_path=base_path, base_accuracy=float(evaluator_subset_base(evaluator, tgt, base_path, n_sub)),
            base_latency_ms=base_latency, measure=measure, score_subset=score_subset, threads=tgt.threads,
            say=(lambda m: (sys.stdout.write(m), sys.stdout.flush())) if say is not _silent else _silent,
            n_trials=n_trials or sp.n_trials, calibration=calibration,
            built_path=lambda c: ost_dir / "candidates" / c.key(source.fingerprint) / "model.onnx",
        )
        best_quant = getattr(analysis, "best_quant", None)
        blob = analysis.to_json()
        blob["best_quant"] = best_quant
        ost.set_user_attr("analysis", blob)
        ok = [u for u in analysis.uniform if "error" not in u]
        say(f"[autosearch] analysis took {analysis.seconds:.0f} s; uniform int8 variants (speedup, {evaluator.name}): "
            + "; ".join(f"{_qlabel(u['quant'])} {u['speedup']:.2f}x {u['accuracy']:.4f}" for u in ok))
    out: list[Candidate] = []
    feasible = ranked_uniform(analysis.uniform, _floor(sp, base_acc))
    for u in feasible[:2]:
        out.append(Candidate(bits=sp.uniform_bits(units.bits, 8), quant=dict(u["quant"])))
    floor = _floor(sp, base_acc)
    scale = base_acc - floor if floor is not None and base_acc > floor else (sp.max_accuracy_drop or 0.01)
    budgets = [b * scale for b in sp.strategy.get("warm_start_budgets", [0.5, 1.0, 2.0, 4.0])]
    knap = knapsack_candidates(analysis, sp, budgets, best_quant,
                               resolution=0.5 / max(1, min(n_sub, getattr(evaluator, "num_samples", n_sub))))
    out += knap
    best_int8: dict[str, int] = {}
    best_q: dict[str, Any] = {}
    fast = [u for u in feasible if u["speedup"] > 1.0]
    if fast and units.bits:
        best_int8, best_q = sp.uniform_bits(units.bits, 8), dict(fast[0]["quant"])
    # compose two measured winners: each structural knapsack point with the best feasible uniform int8
    if best_int8:
        out += [Candidate(best_int8, c.prune, c.rank, best_q, c.recovery) for c in knap if c.structural]
    out += _uniform_structural(sp, units, best_int8, best_q)
    # the runner-up setting too when it is about as fast: a pruned and distilled model can sit
    # differently in int8 (u8s8 saturation on CPUs without VNNI, fixed by reduce_range)
    if len(fast) > 1 and fast[1]["speedup"] >= 0.9 * fast[0]["speedup"]:
        out += _uniform_structural(sp, units, best_int8, dict(fast[1]["quant"]))
    return out


def _uniform_structural(sp: SearchSpace, units: SpaceUnits, bits: dict[str, int], quant: dict[str, Any]) -> list[Candidate]:
    """Every prune unit at each prune choice, with the most recovery the space allows, on the best int8.

    What an engineer tries first; the per-unit sensitivity of the analysis is measured with the
    least recovery, so it cannot see that distillation makes uniform pruning affordable.
    """
    spec = sp.knobs.get("prune")
    if spec is None or not units.prune:
        return []
    rec = sp.recovery_with(distill="max")
    out = []
    for r in sorted(spec.all_choices):
        if r <= 0:
            continue
        # each unit at r, or at the largest of its own choices below r
        prune = {u: max((c for c in spec.choices_for(u) if c <= r), default=0.0) for u in units.prune}
        out.append(Candidate(bits, {u: float(p) for u, p in prune.items() if p > 0}, {}, quant if bits else {}, rec))
    return out


def evaluator_subset_base(evaluator: Evaluator, tgt: Target, base_path: Path, n: int) -> float:
    """The float model's score on the sensitivity subset."""
    return float(evaluator(tgt.session(base_path), limit=n))


def _qlabel(q: Mapping[str, Any]) -> str:
    if q.get("mode") == "dynamic":
        return "dynamic" + (" per-ch" if q.get("per_channel") else "") + (" rr" if q.get("reduce_range") else "")
    act = {"uint8": "u8s8", "int8": "s8s8"}.get(str(q.get("activation_type")), "?")
    return (act + (" per-ch" if q.get("per_channel") else "") + (" rr" if q.get("reduce_range") else "")
            + (" weighted-ops" if q.get("op_scope") == "weighted" else "") + (" pre" if q.get("preprocess") else ""))


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
