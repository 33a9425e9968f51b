"""Search strategy: analysis of the model on the target, sensitivity, and warm start.

Before the sampler takes over, a new study gets:

1. **Latency share** per unit, measured with ONNX Runtime's node profiler on the target.
2. **Uniform variants**: every unit at int8 under each static quantizer setting of the
   space (and dynamic when allowed), built, scored and timed for real. They are what a
   one-shot tool would produce, they tell how much int8 pays on this CPU, and they become
   the first trials (their measurements are cached, so those trials cost nothing more).
3. **Sensitivity**: the score drop when one unit alone takes each knob value, on a subset.
4. **Knapsack warm start**: per accuracy budget, the knob values with the best estimated
   latency saving per unit of estimated drop (additive model over the tables above).

The analysis is a DataFrame cached in the study (user attribute ``analysis``) so a
resumed study reuses it.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autosearch.analysis import QuantUnit, latency_by_unit, quant_units
from autosearch.candidate import Candidate, SpaceUnits
from autosearch.errors import CandidateError
from autosearch.knobs import knob as get_knob
from autosearch.knobs import knobs as all_knobs
from autosearch.model import SourceModel
from autosearch.space import SearchSpace

__all__ = ["Analysis", "analyze", "hopeless_structural", "knapsack_candidates", "narrowed_options", "ranked_uniform"]

Measure = Callable[[Candidate], dict[str, Any]]


@dataclass
class Analysis:
    """What the strategy learned about the model on this target."""

    units: list[dict[str, Any]]  # one row per (knob unit): latency share, FLOPs, sensitivity per value
    uniform: list[dict[str, Any]]  # uniform int8 variants: candidate, accuracy, latency_ms
    base_accuracy: float
    base_latency_ms: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "units": self.units,
            "uniform": self.uniform,
            "base_accuracy": self.base_accuracy,
            "base_latency_ms": self.base_latency_ms,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Analysis:
        return cls(d["units"], d["uniform"], d["base_accuracy"], d["base_latency_ms"], d["seconds"])

    def frame(self) -> Any:
        """Per-unit table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.units)


def ranked_uniform(uniform: Sequence[Mapping[str, Any]], floor: float | None) -> list[Mapping[str, Any]]:
    """The uniform int8 variants that built, ran and meet ``floor``, fastest first (ties: more accurate first).

    The one ranking every consumer of the uniform variants uses (the analysis' int8 setting for
    the sensitivity scan, the warm start, the narrowing of quantizer options).
    """
    ok = [u for u in uniform if "error" not in u and u.get("speedup")]
    feasible = [u for u in ok if floor is None or u["accuracy"] >= floor]
    return sorted(feasible, key=lambda u: (-u["speedup"], -u["accuracy"]))


def narrowed_options(
    space: SearchSpace,
    uniform: Sequence[Mapping[str, Any]],
    floor: float | None,
    *,
    slower: float = 0.75,
    confirm: Callable[[Mapping[str, Any], Mapping[str, Any]], float | None] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Quantizer options the measurements settle, as fixed Optuna parameters, with the reasons.

    An option is fixed to the value of the fastest feasible uniform int8 variant when every other
    value's fastest feasible variant runs below ``slower`` times its speed (e.g. dynamic
    quantization of convolutions, or int8 activations, on a CPU without VNNI). The sampler then
    spends no trials on them; the measured variants themselves stay in the study.

    Args:
        confirm: ``confirm(best_quant, other_quant)`` re-times the two variants side by side and
            returns the other's speed relative to the best (``None``: keep the analysis' figure);
            one noisy figure then fixes nothing.
    """
    fixed, why = _speed_dead_ends(space, uniform, slower=slower, confirm=confirm)
    feasible = ranked_uniform(uniform, floor)
    if not feasible:
        return fixed, why
    best = feasible[0]
    if best["speedup"] < 1.0:
        return fixed, why  # never lock the sampler into a setting slower than the float model
    for opt, choices in space.quantization.items():
        if len(choices) < 2 or opt not in best["quant"] or f"quant.{opt}" in fixed:
            continue
        others: dict[Any, Mapping[str, Any] | None] = {}
        unsettled = False
        for val in choices:
            if val == best["quant"][opt]:
                continue
            # like for like first: the variants that differ from the best in this option alone
            like = [u for u in uniform if u["quant"].get(opt) == val and all(
                u["quant"][k] == v for k, v in best["quant"].items() if k != opt and k in u["quant"])]
            with_val = [u for u in like if u in feasible]
            if not with_val and any("error" not in u for u in like):
                unsettled = True  # built, and below the floor only as a uniform model
                break
            if not with_val:  # not built like for like (or it failed): any feasible variant with the value
                with_val = [u for u in feasible if u["quant"].get(opt) == val]
            if not with_val:
                # never built, or built and below the floor only as a *uniform* model: a per-layer mix
                # with this value was never measured, so nothing rules it out
                unsettled = True
                break
            others[val] = max(with_val, key=lambda u: u["speedup"])
        if unsettled or not others or any(u["speedup"] >= slower * best["speedup"] for u in others.values() if u):
            continue
        ratios = {v: (None if u is None else u["speedup"] / best["speedup"]) for v, u in others.items()}
        if confirm is not None:
            for v, u in others.items():
                again = None if u is None else confirm(best["quant"], u["quant"])
                ratios[v] = ratios[v] if again is None else again
            if any(r is not None and r >= slower for r in ratios.values()):
                continue
        fixed[f"quant.{opt}"] = best["quant"][opt]
        alt = ", ".join(f"{v} measured at {r:.2f}x its speed" for v, r in ratios.items() if r is not None)
        why.append(f"quant.{opt}={best['quant'][opt]} ({alt})")
    return fixed, why


DEAD_END = 0.5  # a uniform variant under half the float model's speed: its value is ruled out by speed alone


def _speed_dead_ends(
    space: SearchSpace,
    uniform: Sequence[Mapping[str, Any]],
    *,
    slower: float,
    confirm: Callable[[Mapping[str, Any], Mapping[str, Any]], float | None] | None,
) -> tuple[dict[str, Any], list[str]]:
    """Options whose other values are ruled out by speed, whatever their accuracy.

    A value is a dead end when its fastest uniform int8 variant runs under ``DEAD_END`` of the float model's
    speed and under ``slower`` times the fastest variant of the option's best value, which itself beats float:
    a per-layer mix with it runs those layers slower than float, so no candidate with it can reach the front,
    and accuracy (which a mix might recover) does not matter. This is what settles the quantization mode on
    models where no uniform variant meets the floor (dynamic convolutions at a tenth of float's speed).
    """
    built = [u for u in uniform if "error" not in u and u.get("speedup")]
    fixed: dict[str, Any] = {}
    why: list[str] = []
    for opt, choices in space.quantization.items():
        if len(choices) < 2:
            continue
        fastest: dict[Any, Mapping[str, Any]] = {}
        for u in built:
            if opt in u["quant"] and u["quant"][opt] in choices:
                v = u["quant"][opt]
                if v not in fastest or u["speedup"] > fastest[v]["speedup"]:
                    fastest[v] = u
        if len(fastest) < len(choices):
            continue  # a value never measured: nothing rules it out
        best_val = max(fastest, key=lambda v: fastest[v]["speedup"])
        best = fastest[best_val]
        if best["speedup"] <= 1.0:
            continue
        ratios: dict[Any, float] = {}
        for v, u in fastest.items():
            if v == best_val:
                continue
            r = u["speedup"] / best["speedup"]
            if u["speedup"] >= DEAD_END or r >= slower:
                break
            if confirm is not None:
                again = confirm(best["quant"], u["quant"])
                if again is not None and (again >= slower or again * best["speedup"] >= DEAD_END):
                    break
                r = r if again is None else again
            ratios[v] = r
        else:
            fixed[f"quant.{opt}"] = best_val
            alt = ", ".join(f"{v} measured at {r:.2f}x its speed ({fastest[v]['speedup']:.2f}x float, any accuracy)"
                            for v, r in ratios.items())
            why.append(f"quant.{opt}={best_val} ({alt})")
    return fixed, why


def _mildest(space: SearchSpace, knob: str, unit: str) -> Any:
    """The non-neutral value of a structural knob that changes ``unit`` least (smallest prune ratio, largest rank)."""
    k = get_knob(knob)
    return k.mildest(space.knobs[knob].choices_for(unit)) if k.structural else None


def hopeless_structural(units: Sequence[Mapping[str, Any]], space: SearchSpace) -> tuple[dict[str, Any], list[str]]:
    """Structural parameters to keep at their neutral value, with the reasons.

    A prune or rank parameter whose mildest value alone, with the most recovery the space
    allows, already drops the score by more than ``max_accuracy_drop`` (on the analysis subset)
    cannot be part of a feasible candidate: other changes only lower the score further. The
    sampler then spends no trials on it (on MiniLM with a cosine floor of 0.99 that was most
    of a 40-trial budget). ``units`` are the analysis rows.
    """
    max_drop = space.max_accuracy_drop
    if max_drop is None:
        return {}, []
    distills = space.recovery_with(distill="max").get("distill_steps", 0) > space.recovery_with(distill="min").get("distill_steps", 0)
    fixed: dict[str, Any] = {}
    why: list[str] = []
    for row in units:
        knob = row["knob"]
        if not get_knob(knob).structural:
            continue
        neutral = get_knob(knob).neutral
        first = (row.get("members") or [row["unit"]])[0]
        mild = _mildest(space, knob, first)
        if mild is None or neutral not in space.knobs[knob].choices_for(first):
            continue
        drop = row.get(f"drop_distilled@{mild}") if distills else row.get(f"drop@{mild}")
        if drop is None or drop <= max_drop:
            continue
        fixed[f"{row['unit']}.{knob}"] = neutral
        why.append(f"{row['unit']}.{knob}={neutral} ({knob} {mild} alone{' and distilled' if distills else ''} drops {drop:.4f})")
    return fixed, why


def _uniform_variants(space: SearchSpace) -> list[dict[str, Any]]:
    """Every combination of the settings that change int8 speed or accuracy most (mode, activation
    type, per-channel, reduced range, op scope); other options at their first choice. The dicts
    match what the sampler produces, so the study's cache serves the warm-start trials."""
    q = space.quantization
    varied = ("activation_type", "per_channel", "reduce_range", "op_scope")
    out = []
    for mode in q.get("mode", ("static",)):
        first = space.quant_first(mode=mode)
        keys = [k for k in varied if k in first]
        for combo in itertools.product(*(q[k] for k in keys)):
            out.append(dict(first, **dict(zip(keys, combo))))
    return out


def _space_floor(space: SearchSpace, base: float) -> float | None:
    """The accuracy floor of the space for a base score (the same rule as the study's)."""
    floors = []
    if space.max_accuracy_drop is not None:
        floors.append(base - space.max_accuracy_drop)
    if space.min_accuracy is not None:
        floors.append(space.min_accuracy)
    return max(floors) if floors else None


def _secs(s: float) -> str:
    """``0.4 s``, ``12 s``, ``3.5 min``, ``1.2 h``."""
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _ordered_variants(jobs: list[tuple[str, Candidate]], space: SearchSpace) -> list[tuple[str, Candidate]]:
    """Uniform variants in the order a budget should take them: per mode (the space's order), the
    space's first choices first, then those that change one option, two, ..."""
    modes = list(space.quantization.get("mode", ("static",)))

    def rank(job: tuple[str, Candidate]) -> tuple[int, int]:
        q = dict(job[1].quant)
        first = space.quant_first(mode=q.get("mode", "static"))
        changed = sum(1 for k, v in q.items() if first.get(k) != v)
        return changed, modes.index(q.get("mode", "static")) if q.get("mode", "static") in modes else 0

    return sorted(jobs, key=rank)


def _int8_unit_times(
    source: SourceModel,
    *,
    space: SearchSpace,
    units: SpaceUnits,
    best_quant: Mapping[str, Any] | None,
    built_path: Callable[[Candidate], Path | None] | None,
    names: Sequence[str],
    by_module: bool,
    threads: int,
    target: Any = None,
) -> dict[str, float] | None:
    """Per-unit milliseconds of the uniform int8 model (``None`` when it was not built, or when
    its nodes mostly do not map back to units)."""
    if best_quant is None or built_path is None or best_quant.get("preprocess"):
        return None  # pre-processing renames and fuses nodes: the names no longer say the unit
    path = built_path(Candidate(bits=space.uniform_bits(units.bits, 8), quant=dict(best_quant)))
    if path is None or not Path(path).exists():
        return None
    try:
        ms = latency_by_unit(str(path), source.example_feed, units=names, by_module=by_module, threads=threads,
                             runs=30, float_model=source.onnx_model, target=target)
    except Exception:  # noqa: BLE001 - a profile that cannot be read: the uniform factor serves
        return None
    total = sum(ms.values())
    return ms if total > 0 and ms.get("(other)", 0.0) <= 0.5 * total else None


def _estimate_bits(
    rows: dict[tuple[str, str], dict[str, Any]],
    members: dict[tuple[str, str], list[str]],
    bits_jobs: Sequence[tuple[str, str, Any]],
    *,
    source: SourceModel,
    space: SearchSpace,
    units: SpaceUnits,
    uniform: Sequence[Mapping[str, Any]],
    best_quant: Mapping[str, Any] | None,
    base_accuracy: float,
    built_path: Callable[[Candidate], Path | None] | None,
    calibration: Sequence[dict[str, np.ndarray]],
) -> bool:
    """Fill ``drop@8`` of the bits rows from one pass over the uniform int8 model (see
    :mod:`autosearch.sensitivity`); ``False`` when there is no such model to read."""
    from autosearch.analysis import node_unit_map, op_groups
    from autosearch.build import activation_bytes
    from autosearch.sensitivity import estimated_drops, noise_by_unit

    if best_quant is None or built_path is None or not calibration:
        return False
    meas = next((u for u in uniform if u.get("quant") == dict(best_quant) and "error" not in u), None)
    path = built_path(Candidate(bits=space.uniform_bits(units.bits, 8), quant=dict(best_quant)))
    if meas is None or path is None or not Path(path).exists():
        return False
    by_module = source.origin == "torch"
    mapping = node_unit_map(source.onnx_model, by_module=by_module, known_units=units.bits)
    if not by_module:
        from autosearch.build import _onnx_unit

        mapping = {n: u for n, u in ((n, _onnx_unit(n, units.bits)) for n in mapping) if u}
    mapping.update(op_groups(source.onnx_model, dict(mapping)))
    n_feeds = int(max(1, min(8, (256 << 20) // max(activation_bytes(source), 1))))
    try:
        contrib = noise_by_unit(source.onnx_model, path, calibration[:n_feeds], mapping)
    except Exception:  # noqa: BLE001 - a graph ORT cannot expose tensors of: fall back to measuring
        return False
    total = max(0.0, base_accuracy - float(meas["accuracy"]))
    drops = estimated_drops(contrib, total)
    for knob, key, val in bits_jobs:
        mem = members[(knob, key)]
        if val == 8:
            rows[(knob, key)]["drop@8"] = float(sum(drops.get(m, 0.0) for m in mem))
        elif val == 16:  # 8 more bits: noise power 2^16 lower
            rows[(knob, key)]["drop@16"] = float(sum(drops.get(m, 0.0) for m in mem)) / 65536
        rows[(knob, key)]["drop_estimated"] = True
    return True


def _progress(i: int, n: int, label: str, t0: float, say: Callable[[str], None]) -> None:
    width = 24
    done = int(width * i / max(n, 1))
    say(f"\r[analysis] [{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:40]:<40} {time.perf_counter() - t0:5.0f} s")


def analyze(
    source: SourceModel,
    space: SearchSpace,
    units: SpaceUnits,
    *,
    base_path: Path,
    base_accuracy: float,
    base_latency_ms: float,
    measure: Measure,
    score_subset: Callable[[Candidate], float],
    threads: int = 1,
    target: Any = None,
    say: Callable[[str], None] = print,
    n_trials: int | None = None,
    built_path: Callable[[Candidate], Path | None] | None = None,
    calibration: Sequence[dict[str, np.ndarray]] = (),
) -> Analysis:
    """Measure latency shares, uniform int8 variants and per-unit sensitivity.

    Args:
        source: The model.
        space: The search space (which knob values to scan).
        units: Units per knob.
        base_path: The float ONNX file (for node profiling).
        base_accuracy: Float model's score.
        base_latency_ms: Float model's latency on the target.
        measure: Full build + score + time of a candidate (writes the study's cache).
        score_subset: Build + score on a subset only (sensitivity).
        threads: Target threads for profiling.
        say: Where progress goes.
        n_trials: Trials the search will run (sizes the budget ``strategy.analysis_budget``).
        built_path: Where ``measure`` left a candidate's ONNX file (for the one-pass estimate).
        calibration: Calibration feeds (a few feed the one-pass estimate).

    The analysis keeps to ``strategy.analysis_budget`` (default 0.25) of the search's wall time,
    estimated from the first build: it prints the estimate before it goes on, measures the
    uniform variants first, then the int8 sensitivity per unit when that fits (else estimates it
    in one pass from every tensor's quantization noise, :mod:`autosearch.sensitivity`), then the
    structural sensitivity, largest latency share first, while the budget lasts.
    """
    t0 = time.perf_counter()
    by_module = source.origin == "torch"
    qunits: dict[str, QuantUnit] = {u.name: u for u in quant_units(source.onnx_model, by_module=by_module)}
    # profiled where the search times (the target's providers, threads and device): shares differ by device
    shares = latency_by_unit(str(base_path), source.example_feed, units=list(qunits), by_module=by_module, threads=threads,
                             target=target)
    total = sum(shares.values()) or 1.0
    # the layers each unit spans (a prune group spans several) and each layer's (in, out, full rank)
    layers: dict[str, dict[str, tuple[str, ...]]] = {}
    dims: dict[str, tuple[int, int, int]] = {}
    for kb in all_knobs():
        if units.of(kb.name):
            layers[kb.name] = dict(kb.unit_layers(source))
            dims.update(kb.unit_dims(source))

    def share_of(names: Sequence[str]) -> float:
        return sum(shares.get(n, 0.0) for n in names) / total

    # uniform variants, measured for real (become warm-start trials)
    uniform: list[dict[str, Any]] = []
    jobs: list[tuple[str, Candidate]] = []
    int8 = space.uniform_bits(units.bits, 8)
    if int8:
        for q in _uniform_variants(space):
            jobs.append(("uniform int8 " + json.dumps(q, sort_keys=True), Candidate(bits=int8, quant=q)))
    sens_jobs: list[tuple[str, str, Any]] = []
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    members: dict[tuple[str, str], list[str]] = {}  # one row per sampled parameter: a unit, or a share group
    for kb in all_knobs():
        knob = kb.name
        spec = space.knobs.get(knob)
        if spec is None:
            continue
        for unit in units.of(knob):
            members.setdefault((knob, spec.group_of(unit) or unit), []).append(unit)
        for (of_knob, key), mem in members.items():
            if of_knob != knob:
                continue
            mods = [m for u in mem for m in layers.get(knob, {}).get(u, (u,))]
            row: dict[str, Any] = {"knob": knob, "unit": key, "latency_share": share_of(mods),
                                   "params": sum(qunits[m].params for m in mods if m in qunits),
                                   "mflops": sum(qunits[m].flops for m in mods if m in qunits) / 1e6}
            if mem != [key]:
                row["members"] = list(mem)
            rows[(knob, key)] = row
            for val in spec.choices_for(mem[0]):
                if kb.active(val):
                    sens_jobs.append((knob, key, val))
    jobs = _ordered_variants(jobs, space)
    n = len(jobs) + len(sens_jobs)
    i = 0
    best_quant: dict[str, Any] | None = None
    frac = space.strategy.analysis_budget
    budget_s: float | None = None
    per_build = 0.0
    skipped: list[str] = []

    def spent() -> float:
        return time.perf_counter() - t0

    def affordable(cost: float) -> bool:
        return budget_s is None or spent() + cost <= budget_s

    floor = _space_floor(space, base_accuracy)
    queue = list(jobs)
    k = 0
    unmeasured_modes = {str(c.quant.get("mode", "static")) for _, c in queue}
    forced = False  # over the budget, measuring only the first variant of each mode not measured yet
    while queue:
        if not forced and (k >= 1 and not affordable(per_build) or (k >= 2 and budget_s is not None and spent() > 0.5 * budget_s)):
            # static against dynamic is the largest difference in int8 speed, and what narrowing needs to rule a
            # mode out: its first variant is measured whatever the budget
            firsts = [next(j for j in queue if j[1].quant.get("mode", "static") == m) for m in sorted(unmeasured_modes)
                      if any(j[1].quant.get("mode", "static") == m for j in queue)]
            if len(queue) > len(firsts):
                skipped.append(f"{len(queue) - len(firsts)} uniform variant(s)")
            if not firsts:
                break
            queue, forced = firsts, True
        label, cand = queue.pop(0)
        unmeasured_modes.discard(str(cand.quant.get("mode", "static")))
        _progress(i, n, label, t0, say)
        t_job = time.perf_counter()
        try:
            rec = measure(cand)
            uniform.append({"quant": dict(cand.quant), "accuracy": rec["accuracy"], "latency_ms": rec["latency_ms"],
                            "speedup": base_latency_ms / rec["latency_ms"] if not math.isnan(rec["latency_ms"]) else None})
        except CandidateError as exc:
            uniform.append({"quant": dict(cand.quant), "error": str(exc)[:200]})
        i += 1
        if k == 0:
            per_build = max(time.perf_counter() - t_job, 1e-3)
            est = per_build * n
            if frac is not None and n_trials:
                search_s = per_build * n_trials
                budget_s = max(frac / (1 - frac) * search_s, per_build)
            say(f"\r[analysis] {n} builds planned at ~{_secs(per_build)} each: ~{_secs(est)}"
                + (f"; budget {_secs(budget_s)} ({frac:.0%} of a ~{_secs(search_s + budget_s)} search of {n_trials} trials, "
                   "strategy.analysis_budget)" if budget_s is not None else "; no budget (strategy.analysis_budget: null)")
                + (": over it, so the int8 sensitivity may be estimated in one pass and the rest cut" if budget_s is not None
                   and est > budget_s else "") + "\n")
            last = uniform[-1]
            if floor is not None and "error" not in last and last["accuracy"] < floor:
                # the space's first setting breaks the floor: the variants that quantize fewer ops come next
                queue.sort(key=lambda j: j[1].quant.get("op_scope") != "weighted")
        k += 1
    ok = ranked_uniform(uniform, None)
    if ok:
        feasible_u = ranked_uniform(uniform, floor)
        # the setting the sensitivity scan quantizes with: the fastest feasible one; with none feasible, the
        # most accurate of those faster than float (a fast setting that breaks everything teaches nothing)
        faster = sorted((u for u in ok if u["speedup"] > 1.0), key=lambda u: (-u["accuracy"], -u["speedup"]))
        best_quant = dict((feasible_u or faster or ok)[0]["quant"])
    bits_jobs = [j for j in sens_jobs if j[0] == "bits"]
    other_jobs = [j for j in sens_jobs if j[0] != "bits"]
    mode = space.strategy.bits_sensitivity
    estimate = bits_jobs and (mode == "estimate" or mode == "auto" and not affordable(0.6 * per_build * len(bits_jobs)))
    if estimate:
        done = _estimate_bits(rows, members, bits_jobs, source=source, space=space, units=units, uniform=uniform,
                              best_quant=best_quant, base_accuracy=base_accuracy, built_path=built_path,
                              calibration=calibration)
        n -= len(bits_jobs) - 1
        _progress(i, n, "int8 sensitivity, one pass", t0, say)
        i += 1
        if done:
            bits_jobs = []
        else:
            skipped.append("int8 sensitivity (no uniform int8 model to estimate it from)")
            bits_jobs = []
    # structural values by descending latency share: the budget goes where the time is
    other_jobs.sort(key=lambda j: -float(rows[(j[0], j[1])].get("latency_share", 0.0)))
    todo = bits_jobs + other_jobs
    for k, (knob, unit, val) in enumerate(todo):
        if not affordable(0.6 * per_build):
            skipped.append(f"{len(todo) - k} sensitivity build(s)")
            break
        _progress(i, n, f"{knob} {unit}={val}", t0, say)
        setting = {m: val for m in members[(knob, unit)]}
        if knob == "bits":
            cand = Candidate(bits=setting, quant=best_quant or {"mode": "static"})
        else:
            cand = Candidate(**{knob: setting}, recovery=space.recovery_with(distill="min"))
        try:
            score = score_subset(cand)
            rows[(knob, unit)][f"drop@{val}"] = max(0.0, base_accuracy - score)
        except CandidateError:
            rows[(knob, unit)][f"drop@{val}"] = None
        i += 1
    # a structural value that alone breaks the floor without distillation gets a second chance
    # with the most distillation the space allows (the sampler may drop it only if that fails too)
    max_drop = space.max_accuracy_drop
    rec_min, rec_max = space.recovery_with(distill="min"), space.recovery_with(distill="max")
    retry = []
    if max_drop is not None and rec_max.get("distill_steps", 0) > rec_min.get("distill_steps", 0):
        for (knob, unit), row in rows.items():
            mild = _mildest(space, knob, members[(knob, unit)][0])
            drop = row.get(f"drop@{mild}") if mild is not None else None
            if drop is not None and drop > max_drop:
                retry.append((knob, unit, mild))
    n += len(retry)
    for knob, unit, val in retry:
        if not affordable(per_build):
            skipped.append("distilled re-scores")
            break
        _progress(i, n, f"{knob} {unit}={val} distilled", t0, say)
        cand = Candidate(**{knob: {m: val for m in members[(knob, unit)]}}, recovery=rec_max)
        try:
            rows[(knob, unit)][f"drop_distilled@{val}"] = max(0.0, base_accuracy - score_subset(cand))
        except CandidateError:
            rows[(knob, unit)][f"drop_distilled@{val}"] = None
        i += 1
    if skipped:
        say(f"\r[analysis] budget reached after {_secs(spent())}: skipped " + ", ".join(skipped)
            + " (raise strategy.analysis_budget, or set it to null, for a fuller analysis)\n")
    _progress(n, n, "done", t0, say)
    say("\n")
    # estimated latency factor of each knob value
    int8_speed = max((u["speedup"] for u in ok if u["quant"] == best_quant), default=1.0) if ok else 1.0
    # measured per unit where it can be: the uniform int8 model profiled node by node, each node mapped back
    # to its unit (its own quantize/dequantize work included): on a CPU where int8 is slower overall, the
    # units it makes faster still show (depthwise convs slower, pointwise ones faster)
    int8_ms = _int8_unit_times(source, space=space, units=units, best_quant=best_quant, built_path=built_path,
                               names=list(qunits), by_module=by_module, threads=threads, target=target)
    for (knob, unit), row in rows.items():
        if knob == "bits" and int8_ms is not None:
            mem = members[(knob, unit)]
            row["int8_ms"] = float(sum(int8_ms.get(m, 0.0) for m in mem))
            row["float_ms"] = float(sum(shares.get(m, 0.0) for m in mem))
    for (knob, unit), row in rows.items():
        spec = space.knobs[knob]
        mem = members[(knob, unit)]
        for val in spec.choices_for(mem[0]):
            key = f"drop@{val}"
            if key not in row:
                continue
            if knob == "bits" and "int8_ms" in row:
                saving = (row["float_ms"] - row["int8_ms"]) / total if val == 8 else 0.0
            elif knob == "bits":
                saving = row["latency_share"] * (1 - 1 / int8_speed) if int8_speed > 1 else 0.0
            else:  # the knob's own model of what a value saves, per member unit
                kb = get_knob(knob)
                saving = sum(kb.estimated_saving(val, share=share_of(layers.get(knob, {}).get(m, (m,))), dims=dims.get(m))
                             for m in mem)
            row[f"saving@{val}"] = saving
    out = Analysis(list(rows.values()), uniform, base_accuracy, base_latency_ms, time.perf_counter() - t0)
    out.best_quant = best_quant  # type: ignore[attr-defined]
    return out


def knapsack_candidates(
    analysis: Analysis,
    space: SearchSpace,
    budgets: Sequence[float],
    best_quant: dict[str, Any] | None,
    *,
    resolution: float = 0.005,
) -> list[Candidate]:
    """Warm-start candidates from the additive model of the analysis tables.

    For each accuracy-drop budget, knob values are taken greedily by estimated latency
    saving per unit of measured drop until the summed drops reach the budget; one value
    per (knob, unit). A measured drop below ``resolution`` (the subset's granularity)
    counts as ``resolution``: nothing is free, so larger budgets take more units and the
    candidates spread from cautious to aggressive.
    """
    items: list[tuple[float, float, float, str, str, Any]] = []
    group_members = {(r["knob"], r["unit"]): list(r["members"]) for r in analysis.units if r.get("members")}
    for row in analysis.units:
        for key, drop in row.items():
            if not key.startswith("drop@") or drop is None:
                continue
            val = key[len("drop@"):]
            saving = float(row.get(f"saving@{val}", 0.0))
            if saving <= 0:
                continue
            spec = space.knobs[row["knob"]]
            value = next(c for c in spec.choices_for(row.get("members", [row["unit"]])[0]) if str(c) == val)
            cost = max(float(drop), resolution)
            items.append((saving / cost, saving, cost, row["knob"], row["unit"], value))
    items.sort(key=lambda t: (-t[0], -t[1]))
    out: list[Candidate] = []
    seen: set[str] = set()
    for budget in budgets:
        chosen: dict[tuple[str, str], tuple[float, Any]] = {}
        spent = 0.0
        for _, _, cost, knob, unit, value in items:
            if (knob, unit) in chosen or spent + cost > budget:
                continue
            chosen[(knob, unit)] = (cost, value)
            spent += cost
        if not chosen:
            continue
        knobs: dict[str, dict[str, Any]] = {}
        for (knob, unit), (_, value) in chosen.items():
            for m in group_members.get((knob, unit), [unit]):
                knobs.setdefault(knob, {})[m] = value
        probe = Candidate(**knobs)
        cand = Candidate(quant=dict(best_quant or {}) if probe.quantized else {},
                         recovery=space.recovery_with(distill="min") if probe.structural else {}, **knobs)
        key = json.dumps(cand.to_dict(), sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(cand)
    return out
