"""Step 3: the analysis and the candidates a fresh study starts from.

The analysis (:func:`autosearch.strategy.analyze`: latency share per unit, uniform int8 variants, the
sensitivity of each unit) is cached in the study; from it come warm-start candidates (the best uniform
settings, knapsack points of the additive model, uniform structural ones), queued as trials, and the
quantizer options and structural values the measurements rule out, fixed for the sampler.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from autosearch.build import build_candidate
from autosearch.candidate import Candidate, SpaceUnits, candidate_params
from autosearch.config import quant_label
from autosearch.space import SearchSpace
from autosearch.steps import SearchContext, quiet_optuna
from autosearch.steps.baseline import Baseline
from autosearch.store import CandidateStore
from autosearch.strategy import (
    Analysis,
    analyze,
    hopeless_structural,
    knapsack_candidates,
    narrowed_options,
    ranked_uniform,
)
from autosearch.target import interleaved

__all__ = ["apply_narrowing", "queue_warm_start", "uniform_structural"]


def queue_warm_start(ctx: SearchContext, ost: optuna.Study, *, store: CandidateStore, baseline: Baseline,
                     floor: float | None, n_trials: int | None) -> None:
    """Run the analysis (when the space asks for it), queue the warm-start trials, record what narrowing fixes."""
    sp = ctx.space
    warm = _plain_candidates(sp, ctx.units)
    if sp.strategy.analysis and ctx.units:
        warm += _analysis_candidates(ctx, ost, store=store, baseline=baseline, n_trials=n_trials)
    cached = ost.user_attrs.get("analysis")
    hopeless: dict[str, Any] = {}
    reasons: list[str] = []
    if sp.strategy.narrow and cached:
        hopeless, reasons = hopeless_structural(cached.get("units", []), sp)
    for cand in warm:
        params = candidate_params(cand, sp, ctx.units)
        if any(k in params and params[k] != v for k, v in hopeless.items()):
            continue  # a structural value the analysis showed cannot meet the floor
        if store.failed(cand):
            continue  # the analysis built it and it failed: no trial to spend on it
        if params:
            with quiet_optuna():  # "already exists. Skipping enqueue." is not news
                ost.enqueue_trial(params, skip_if_exists=True)
    if sp.strategy.narrow and cached:
        def confirm(best_q: Mapping[str, Any], other_q: Mapping[str, Any]) -> float | None:
            int8 = sp.uniform_bits(ctx.units.bits, 8)
            paths = [(lbl, store.model_path(Candidate(bits=int8, quant=dict(q)))) for lbl, q in (("best", best_q), ("other", other_q))]
            if not all(p.exists() for _, p in paths):
                return None  # nothing to re-time: keep the analysis' figure
            st = interleaved(paths, ctx.source.example_feed, ctx.target, rounds=3)
            return st["best"].median_ms / st["other"].median_ms

        fixed, why = narrowed_options(sp, cached.get("uniform", []), floor, confirm=confirm)
        ost.set_user_attr("narrowed", {"fixed": {**fixed, **hopeless}, "why": [*why, *reasons]})


def apply_narrowing(ctx: SearchContext, ost: optuna.Study) -> None:
    """Fix, for the sampler, what the analysis ruled out (measured, not assumed)."""
    narrowed = ost.user_attrs.get("narrowed") or {}
    if narrowed.get("fixed"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ost.sampler = optuna.samplers.PartialFixedSampler(narrowed["fixed"], ost.sampler)
        ctx.say("[autosearch] the sampler keeps " + "; ".join(narrowed["why"]))


def _write_now(message: str) -> None:
    """The analysis's progress line as it comes (it redraws itself with ``\\r``)."""
    sys.stdout.write(message)
    sys.stdout.flush()


def _plain_candidates(sp: SearchSpace, units: SpaceUnits) -> list[Candidate]:
    """Float and uniform low-precision candidates, tried before the sampler takes over."""
    spec = sp.knobs.get("bits")
    out = [Candidate()] if spec is None or 32 in spec.all_choices else []
    int8 = sp.uniform_bits(units.bits, 8)
    if int8:
        out.append(Candidate(bits=int8, quant=sp.quant_first()))
    return out


def _analysis_candidates(ctx: SearchContext, ost: optuna.Study, *, store: CandidateStore, baseline: Baseline,
                         n_trials: int | None) -> list[Candidate]:
    """Run the analysis (cached in the study) and return the candidates it suggests."""
    sp, units, evaluator, tgt = ctx.space, ctx.units, ctx.evaluator, ctx.target
    n_sub = sp.strategy.sensitivity_samples

    def score_subset(cand: Candidate) -> float:
        tmp = Path(tempfile.mkdtemp(prefix="as_sens_"))
        try:
            built = build_candidate(ctx.source, cand, tmp, units=units, calibration=ctx.calibration)
            return float(evaluator(tgt.session(built.path), limit=n_sub))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    cached = ost.user_attrs.get("analysis")
    if cached:
        analysis = Analysis.from_json(cached)
        best_quant = cached.get("best_quant")
    else:
        ctx.say("[autosearch] analysis: latency share per unit, uniform int8 variants, sensitivity of each unit")
        analysis = analyze(
            ctx.source, sp, units, base_path=baseline.path,
            base_accuracy=float(evaluator(tgt.session(baseline.path), limit=n_sub)),
            base_latency_ms=baseline.latency_ms, measure=store.measure, score_subset=score_subset, threads=tgt.threads, target=tgt,
            say=_write_now if ctx.verbose else (lambda m: None),
            n_trials=n_trials or sp.n_trials, calibration=ctx.calibration, built_path=store.model_path,
        )
        best_quant = getattr(analysis, "best_quant", None)
        blob = analysis.to_json()
        blob["best_quant"] = best_quant
        ost.set_user_attr("analysis", blob)
        ok = [u for u in analysis.uniform if "error" not in u]
        ctx.say(f"[autosearch] analysis took {analysis.seconds:.0f} s; uniform int8 variants (speedup, {evaluator.name}): "
                + "; ".join(f"{quant_label(u['quant'])} {u['speedup']:.2f}x {u['accuracy']:.4f}" for u in ok))
    from autosearch.strategy import _space_floor

    floor = _space_floor(sp, baseline.accuracy)
    out: list[Candidate] = []
    feasible = ranked_uniform(analysis.uniform, floor)
    for u in feasible[:2]:
        out.append(Candidate(bits=sp.uniform_bits(units.bits, 8), quant=dict(u["quant"])))
    base_acc = baseline.accuracy
    scale = base_acc - floor if floor is not None and base_acc > floor else (sp.max_accuracy_drop or 0.01)
    budgets = [b * scale for b in sp.strategy.warm_start_budgets]
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
        out += [Candidate(bits=best_int8, prune=c.prune, rank=c.rank, quant=best_q, recovery=c.recovery) for c in knap if c.structural]
    out += uniform_structural(sp, units, best_int8, best_q)
    # the runner-up setting too when it is about as fast: a pruned and distilled model can sit
    # differently in int8 (u8s8 saturation on CPUs without VNNI, fixed by reduce_range)
    if len(fast) > 1 and fast[1]["speedup"] >= 0.9 * fast[0]["speedup"]:
        out += uniform_structural(sp, units, best_int8, dict(fast[1]["quant"]))
    return out


def uniform_structural(sp: SearchSpace, units: SpaceUnits, bits: dict[str, int], quant: dict[str, Any]) -> list[Candidate]:
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
        out.append(Candidate(bits=bits, prune={u: float(p) for u, p in prune.items() if p > 0}, quant=quant if bits else {}, recovery=rec))
    return out
