"""Search space: YAML presets in ``search_spaces/``, validated on load.

A space says which units get which knob choices, global quantization options,
recovery options, objectives, constraints, budget and sampler. It maps
one-to-one onto Optuna categorical distributions with parameter names
``"<unit>.<knob>"`` (and ``"quant.<option>"`` for global options), so a study
stays a plain Optuna study.

Example:
    >>> from autosearch.space import SearchSpace
    >>> space = SearchSpace.from_dict({"knobs": {"bits": {"choices": [32, 8]}}})
    >>> space.knobs["bits"].choices
    (32, 8)
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autosearch.errors import ConfigError
from autosearch.presets import preset_names, preset_path

__all__ = ["KnobSpec", "SearchSpace", "load_space", "preset_path"]

KNOB_VALUES: dict[str, tuple[Any, ...]] = {
    "bits": (32, 16, 8, 4),
    "prune": None,  # type: ignore[dict-item]  # any float in [0, 1)
    "rank": None,  # type: ignore[dict-item]  # any float in (0, 1]
}
QUANT_OPTIONS: dict[str, tuple[Any, ...]] = {
    "mode": ("static", "dynamic"),
    "activation_type": ("uint8", "int8"),
    "per_channel": (True, False),
    "reduce_range": (False, True),
    "preprocess": (True, False),
    "op_scope": ("all", "weighted"),
    "calibrate_method": ("minmax", "entropy", "percentile"),
    "int4_block_size": (32, 64, 128, 256),  # 4-bit MatMul/Gemm units: MatMulNBits block
    "int4_accuracy_level": (0, 1, 2, 3, 4),  # MatMulNBits compute type (4: int8 activations); 0 = ORT default
}
QUANT_DEFAULTS: dict[str, Any] = {"mode": "static", "activation_type": "uint8", "per_channel": True, "reduce_range": False,
                                  "preprocess": False, "calibrate_method": "minmax", "op_scope": "all",
                                  "int4_block_size": 32, "int4_accuracy_level": 0}
INT4_OPTIONS = ("int4_block_size", "int4_accuracy_level")  # sampled only when a unit takes 4 bits
STATIC_OPTIONS = ("activation_type", "calibrate_method", "op_scope")  # not sampled in dynamic mode
OBJECTIVES = {"accuracy": "maximize", "latency_ms": "minimize", "size_mb": "minimize"}
SAMPLERS = ("nsga2", "tpe", "random")
_TOP_KEYS = ("name", "description", "version", "knobs", "quantization", "recovery", "objectives", "constraints", "budget", "sampler", "strategy")


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


@dataclass(frozen=True)
class KnobSpec:
    """Choices of one knob and which units take it.

    Attributes:
        choices: Values to sample from (the first is the "untouched" value when it is one).
        include: Unit-name glob patterns that get the knob (default all).
        exclude: Patterns removed from ``include``.
        share: Groups of patterns whose units share one sampled value; the parameter
            is named after the group key (a group takes the choices of its first unit).
        by_unit: Pattern -> choices for the units it matches (first match wins),
            e.g. attention heads ``[0.0, 0.25]`` while FFN neurons take ``choices``.
    """

    choices: tuple[Any, ...]
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    share: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    by_unit: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def choices_for(self, unit: str) -> tuple[Any, ...]:
        """The choices ``unit`` samples from."""
        for pat, vals in self.by_unit.items():
            if fnmatch.fnmatchcase(unit, pat):
                return vals
        return self.choices

    @property
    def all_choices(self) -> tuple[Any, ...]:
        """Every value any unit may take, sorted."""
        vals = set(self.choices).union(*self.by_unit.values()) if self.by_unit else set(self.choices)
        return tuple(sorted(vals))

    def applies(self, unit: str) -> bool:
        """Whether ``unit`` gets this knob."""
        return any(fnmatch.fnmatchcase(unit, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(unit, p) for p in self.exclude
        )

    def group_of(self, unit: str) -> str | None:
        """The share-group key of ``unit``, if any."""
        for key, pats in self.share.items():
            if any(fnmatch.fnmatchcase(unit, p) for p in pats):
                return key
        return None


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space. Build with :func:`load_space` or :meth:`from_dict`."""

    name: str = "custom"
    knobs: Mapping[str, KnobSpec] = field(default_factory=dict)
    quantization: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    calibration_samples: int = 128
    recovery: Mapping[str, Any] = field(default_factory=dict)
    objectives: tuple[str, ...] = ("accuracy", "latency_ms")
    max_accuracy_drop: float | None = 0.01
    min_accuracy: float | None = None
    n_trials: int = 20
    timeout_s: float | None = None
    sampler: str = "nsga2"
    seed: int = 0
    population_size: int = 10
    strategy: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> SearchSpace:
        """Validate a mapping (as read from YAML) into a space.

        Raises:
            ConfigError: naming the key, the value, what is allowed and the file.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a search space must be a mapping of keys{_where(source)}, got {type(data).__name__}")
        for key in data:
            if key not in _TOP_KEYS:
                raise ConfigError(f"unknown key {key!r}{_where(source)}; allowed top-level keys: {', '.join(_TOP_KEYS)}")
        knobs_raw = data.get("knobs") or {}
        if not isinstance(knobs_raw, Mapping):
            raise ConfigError(f"'knobs'{_where(source)} must be a mapping knob -> spec, got {knobs_raw!r}")
        knobs: dict[str, KnobSpec] = {}
        for knob, spec in knobs_raw.items():
            if knob not in KNOB_VALUES:
                raise ConfigError(f"unknown knob 'knobs.{knob}'{_where(source)}; allowed: {', '.join(KNOB_VALUES)}")
            knobs[knob] = _knob(knob, spec, source)
        quant_raw = dict(data.get("quantization") or {})
        cal = quant_raw.pop("calibration_samples", 128)
        if not isinstance(cal, int) or cal < 1:
            raise ConfigError(f"'quantization.calibration_samples'{_where(source)} must be a positive integer, got {cal!r}")
        quant: dict[str, tuple[Any, ...]] = {}
        for opt, allowed in QUANT_OPTIONS.items():
            raw = quant_raw.pop(opt, [QUANT_DEFAULTS[opt]])
            vals = raw if isinstance(raw, list) else [raw]
            for v in vals:
                if v not in allowed:
                    raise ConfigError(
                        f"'quantization.{opt}'{_where(source)} has value {v!r}; allowed: {', '.join(map(repr, allowed))}"
                    )
            quant[opt] = tuple(dict.fromkeys(vals))
        if quant_raw:
            raise ConfigError(
                f"unknown key 'quantization.{next(iter(quant_raw))}'{_where(source)}; allowed: "
                f"{', '.join([*QUANT_OPTIONS, 'calibration_samples'])}"
            )
        recovery = dict(data.get("recovery") or {})
        rec_allowed = {
            "bn_recalibration": bool,
            "reconstruct": (bool, str),
            "calibration_samples": int,
            "distill_steps": (int, list),
            "distill_lr": float,
        }
        for key, val in recovery.items():
            if key not in rec_allowed:
                raise ConfigError(f"unknown key 'recovery.{key}'{_where(source)}; allowed: {', '.join(rec_allowed)}")
        recovery.setdefault("bn_recalibration", True)
        recovery.setdefault("reconstruct", "auto")
        if recovery["reconstruct"] not in ("auto", True, False):
            raise ConfigError(
                f"'recovery.reconstruct'{_where(source)} is {recovery['reconstruct']!r}; use auto (only without "
                "distillation), true or false"
            )
        recovery.setdefault("calibration_samples", 200)
        recovery.setdefault("distill_steps", 0)
        recovery.setdefault("distill_lr", 3e-4)
        objectives_raw = data.get("objectives", ["accuracy", "latency_ms"])
        if isinstance(objectives_raw, Mapping):
            objectives_raw = list(objectives_raw)
        if not isinstance(objectives_raw, list) or not objectives_raw:
            raise ConfigError(f"'objectives'{_where(source)} must be a list such as [accuracy, latency_ms]")
        for obj in objectives_raw:
            if obj not in OBJECTIVES:
                raise ConfigError(f"unknown objective {obj!r} in 'objectives'{_where(source)}; allowed: {', '.join(OBJECTIVES)}")
        cons = dict(data.get("constraints") or {})
        max_drop = cons.pop("max_accuracy_drop", 0.01)
        min_acc = cons.pop("min_accuracy", None)
        if cons:
            raise ConfigError(
                f"unknown key 'constraints.{next(iter(cons))}'{_where(source)}; allowed: max_accuracy_drop, min_accuracy"
            )
        for key, val in (("max_accuracy_drop", max_drop), ("min_accuracy", min_acc)):
            if val is not None and not isinstance(val, (int, float)):
                raise ConfigError(f"'constraints.{key}'{_where(source)} must be a number or null, got {val!r}")
        budget = dict(data.get("budget") or {})
        n_trials = budget.pop("n_trials", 20)
        timeout = budget.pop("timeout_s", None)
        if budget:
            raise ConfigError(f"unknown key 'budget.{next(iter(budget))}'{_where(source)}; allowed: n_trials, timeout_s")
        if not isinstance(n_trials, int) or n_trials < 1:
            raise ConfigError(f"'budget.n_trials'{_where(source)} must be a positive integer, got {n_trials!r}")
        sampler = dict(data.get("sampler") or {})
        sname = sampler.pop("name", "nsga2")
        seed = sampler.pop("seed", 0)
        pop = sampler.pop("population_size", 10)
        if sampler:
            raise ConfigError(f"unknown key 'sampler.{next(iter(sampler))}'{_where(source)}; allowed: name, seed, population_size")
        if sname not in SAMPLERS:
            raise ConfigError(f"'sampler.name'{_where(source)} is {sname!r}; allowed: {', '.join(SAMPLERS)}")
        strategy = dict(data.get("strategy") or {})
        strat_allowed: dict[str, Any] = {"analysis": bool, "sensitivity_samples": int, "warm_start_budgets": list,
                                         "remeasure_front": bool, "narrow": bool, "analysis_budget": (float, int, type(None)),
                                         "bits_sensitivity": str}
        for key, val in strategy.items():
            if key not in strat_allowed:
                raise ConfigError(f"unknown key 'strategy.{key}'{_where(source)}; allowed: {', '.join(strat_allowed)}")
            if not isinstance(val, strat_allowed[key]) or isinstance(val, bool) and strat_allowed[key] is not bool:
                kind = strat_allowed[key].__name__ if isinstance(strat_allowed[key], type) else "number or null"
                raise ConfigError(f"'strategy.{key}'{_where(source)} must be a {kind}, got {val!r}")
        budget_frac = strategy.get("analysis_budget", 0.25)
        if budget_frac is not None and not 0 < float(budget_frac) < 1:
            raise ConfigError(f"'strategy.analysis_budget'{_where(source)} is {budget_frac!r}: a fraction of the search's "
                              "wall time in (0, 1), e.g. 0.25, or null for no bound")
        if strategy.get("bits_sensitivity", "auto") not in ("auto", "measure", "estimate"):
            raise ConfigError(f"'strategy.bits_sensitivity'{_where(source)} is {strategy['bits_sensitivity']!r}; allowed: "
                              "auto (measure per unit when it fits the analysis budget), measure, estimate (one pass)")
        strategy.setdefault("analysis_budget", 0.25)  # the analysis may take this fraction of the search's wall time
        strategy.setdefault("bits_sensitivity", "auto")
        strategy.setdefault("analysis", True)
        strategy.setdefault("sensitivity_samples", 150)
        strategy.setdefault("warm_start_budgets", [0.5, 1.0, 2.0, 4.0])  # x max_accuracy_drop
        strategy.setdefault("remeasure_front", True)
        strategy.setdefault("narrow", True)  # fix quantizer options whose alternatives all measured far slower
        return cls(
            name=str(data.get("name", Path(source).stem if source else "custom")),
            strategy=strategy,
            knobs=knobs,
            quantization=quant,
            calibration_samples=cal,
            recovery=recovery,
            objectives=tuple(objectives_raw),
            max_accuracy_drop=None if max_drop is None else float(max_drop),
            min_accuracy=None if min_acc is None else float(min_acc),
            n_trials=n_trials,
            timeout_s=timeout,
            sampler=sname,
            seed=int(seed),
            population_size=int(pop),
            source=source,
        )

    def uniform_bits(self, units: Sequence[str], bits: int) -> dict[str, int]:
        """Every one of ``units`` that may take ``bits`` (per its choices), at ``bits``."""
        spec = self.knobs.get("bits")
        return {u: bits for u in units if spec is not None and bits in spec.choices_for(u)}

    def quant_first(self, *, mode: str | None = None, int4: bool = False) -> dict[str, Any]:
        """Quantization options at their first choice, keyed as the sampler would produce them."""
        q = {k: v[0] for k, v in self.quantization.items() if int4 or k not in INT4_OPTIONS}
        if mode is not None:
            q["mode"] = mode
        if q.get("mode") == "dynamic":
            for k in STATIC_OPTIONS:
                q.pop(k, None)
        return q

    def recovery_with(self, *, distill: str = "min") -> dict[str, Any]:
        """Recovery options with one distillation step count (``min`` or ``max`` of the choices)."""
        rec = dict(self.recovery)
        steps = rec.get("distill_steps", 0)
        if isinstance(steps, list):
            rec["distill_steps"] = (min if distill == "min" else max)(steps)
        return rec

    # ---------------------------------------------------------------- identity
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (used for the study's fingerprint and for export)."""
        out = asdict(self)
        out.pop("source")
        out["knobs"] = {}
        for k, v in self.knobs.items():
            out["knobs"][k] = {"choices": list(v.choices), "include": list(v.include), "exclude": list(v.exclude),
                               "share": {g: list(p) for g, p in v.share.items()}}
            if v.by_unit:
                out["knobs"][k]["by_unit"] = {p: list(c) for p, c in v.by_unit.items()}
        out["quantization"] = {k: list(v) for k, v in self.quantization.items()}
        return out

    def fingerprint(self) -> str:
        """Hash of what changes the meaning of trials (not the budget)."""
        d = self.to_dict()
        for k in ("n_trials", "timeout_s", "name"):
            d.pop(k, None)
        # options left at their default are left out, so a new option does not orphan older studies
        d["quantization"] = {k: v for k, v in d["quantization"].items() if v != [QUANT_DEFAULTS.get(k)]}
        # how much analysis to run does not change what a trial means
        d["strategy"] = {k: v for k, v in d["strategy"].items() if k not in ("analysis", "analysis_budget", "bits_sensitivity")}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _knob(knob: str, spec: Any, source: str | None) -> KnobSpec:
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"'knobs.{knob}'{_where(source)} must be a list of choices or a mapping with 'choices'")
    allowed_keys = {"choices", "include", "exclude", "share", "by_unit"}
    for key in spec:
        if key not in allowed_keys:
            raise ConfigError(f"unknown key 'knobs.{knob}.{key}'{_where(source)}; allowed: {', '.join(sorted(allowed_keys))}")
    vals = _knob_choices(knob, "choices", spec.get("choices"), source)
    by_raw = spec.get("by_unit") or {}
    if not isinstance(by_raw, Mapping):
        raise ConfigError(f"'knobs.{knob}.by_unit'{_where(source)} must map a unit-name pattern to a list of choices, got {by_raw!r}")
    by_unit = {str(p): _knob_choices(knob, f"by_unit.{p}", c, source) for p, c in by_raw.items()}
    def pats(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        raw = spec.get(key, list(default))
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise ConfigError(f"'knobs.{knob}.{key}'{_where(source)} must be a list of name patterns, got {raw!r}")
        return tuple(raw)
    share_raw = spec.get("share") or {}
    if not isinstance(share_raw, Mapping):
        raise ConfigError(f"'knobs.{knob}.share'{_where(source)} must map a group name to a list of patterns")
    share = {str(g): tuple([p] if isinstance(p, str) else p) for g, p in share_raw.items()}
    return KnobSpec(vals, pats("include", ("*",)), pats("exclude", ()), share, by_unit)


def _knob_choices(knob: str, key: str, choices: Any, source: str | None) -> tuple[Any, ...]:
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"'knobs.{knob}.{key}'{_where(source)} must be a non-empty list, got {choices!r}")
    for v in choices:
        if knob == "bits" and v not in KNOB_VALUES["bits"]:
            raise ConfigError(f"'knobs.bits.{key}'{_where(source)} has {v!r}; allowed: 32, 16, 8, 4")
        if knob == "prune" and not (isinstance(v, (int, float)) and 0 <= v < 1):
            raise ConfigError(f"'knobs.prune.{key}'{_where(source)} has {v!r}; a pruning ratio must be in [0, 1)")
        if knob == "rank" and not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise ConfigError(f"'knobs.rank.{key}'{_where(source)} has {v!r}; a kept-rank fraction must be in (0, 1]")
    return tuple(float(v) if knob != "bits" else int(v) for v in dict.fromkeys(choices))


def load_space(space: str | Path | Mapping[str, Any] | SearchSpace | None = None) -> SearchSpace:
    """Load a space from a YAML path, a preset name, a mapping, or pass one through.

    ``None`` gives the ``cnn`` preset.

    Raises:
        ConfigError: unknown preset or file, YAML syntax error, invalid key or value.
    """
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, Mapping):
        return SearchSpace.from_dict(space)
    name = "cnn" if space is None else str(space)
    path = Path(name)
    if not path.exists():
        if name.removesuffix(".yaml") not in preset_names():
            raise ConfigError(f"search space {name!r} is neither a file nor a preset; presets: {', '.join(preset_names())}")
        path = preset_path(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return SearchSpace.from_dict(data or {}, source=str(path))


def normalise_units(names: Sequence[str]) -> list[str]:
    """Unique unit names in order."""
    return list(dict.fromkeys(names))
