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

import dataclasses
import fnmatch
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from autosearch.config import CONFIG_VERSION, QuantChoices, RecoveryChoices, StrategyConfig
from autosearch.errors import ConfigError
from autosearch.knobs import knob, knob_names, load_plugins
from autosearch.presets import preset_names, preset_path

__all__ = ["KnobSpec", "SearchSpace", "load_space", "preset_path"]

OBJECTIVES: dict[str, Literal["maximize", "minimize"]] = {"accuracy": "maximize", "latency_ms": "minimize", "size_mb": "minimize"}
SAMPLERS = ("nsga2", "tpe", "random")
_TOP_KEYS = ("name", "description", "version", "plugins", "knobs", "quantization", "recovery", "objectives", "constraints",
             "budget", "sampler", "strategy")
# compatibility names: the one declaration is autosearch.config
QUANT_DEFAULTS: dict[str, Any] = {k: v for k, v in QuantChoices.parse({}).first().items()}


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
    quant: QuantChoices = field(default_factory=lambda: QuantChoices.parse({}))
    recovery: RecoveryChoices = field(default_factory=lambda: RecoveryChoices.parse({}))
    objectives: tuple[str, ...] = ("accuracy", "latency_ms")
    max_accuracy_drop: float | None = 0.01
    min_accuracy: float | None = None
    n_trials: int = 20
    timeout_s: float | None = None
    sampler: str = "nsga2"
    seed: int = 0
    population_size: int = 10
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    plugins: tuple[str, ...] = ()
    source: str | None = None

    @property
    def quantization(self) -> dict[str, tuple[Any, ...]]:
        """Quantization option -> its choices (the sampling order)."""
        return self.quant.choices()

    @property
    def calibration_samples(self) -> int:
        return int(self.quant.calibration_samples)

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
        plugins = data.get("plugins") or []
        if isinstance(plugins, str):
            plugins = [plugins]
        if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
            raise ConfigError(f"'plugins'{_where(source)} must be a list of module names, got {plugins!r}")
        load_plugins(plugins, source=source)
        knobs_raw = data.get("knobs") or {}
        if not isinstance(knobs_raw, Mapping):
            raise ConfigError(f"'knobs'{_where(source)} must be a mapping knob -> spec, got {knobs_raw!r}")
        knobs: dict[str, KnobSpec] = {}
        for name, spec in knobs_raw.items():
            if name not in knob_names():
                raise ConfigError(f"unknown knob 'knobs.{name}'{_where(source)}; allowed: {', '.join(sorted(knob_names()))} "
                                  "(a plug-in module under 'plugins:' adds more)")
            knobs[name] = _knob(name, spec, source)
        quant = QuantChoices.parse(data.get("quantization"), source)
        recovery = RecoveryChoices.parse(data.get("recovery"), source)
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
            if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float))):
                raise ConfigError(f"'constraints.{key}'{_where(source)} must be a number or null, got {val!r}")
            if val is not None and not math.isfinite(val):
                raise ConfigError(f"'constraints.{key}'{_where(source)} is {val!r}: give a finite number "
                                  "(e.g. max_accuracy_drop: 0.01), or null for no such constraint")
        if max_drop is not None and max_drop < 0:
            raise ConfigError(f"'constraints.max_accuracy_drop'{_where(source)} is {max_drop!r}: a drop is >= 0 (0 keeps only "
                              "candidates as good as the float model; 0.01 allows one point of accuracy)")
        budget = dict(data.get("budget") or {})
        n_trials = budget.pop("n_trials", 20)
        timeout = budget.pop("timeout_s", None)
        if budget:
            raise ConfigError(f"unknown key 'budget.{next(iter(budget))}'{_where(source)}; allowed: n_trials, timeout_s")
        if not isinstance(n_trials, int) or n_trials < 1:
            raise ConfigError(f"'budget.n_trials'{_where(source)} must be a positive integer, got {n_trials!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise ConfigError(f"'budget.timeout_s'{_where(source)} is {timeout!r}: give a number of seconds > 0, "
                              "or null for no time limit")
        sampler = dict(data.get("sampler") or {})
        sname = sampler.pop("name", "nsga2")
        seed = sampler.pop("seed", 0)
        pop = sampler.pop("population_size", 10)
        if sampler:
            raise ConfigError(f"unknown key 'sampler.{next(iter(sampler))}'{_where(source)}; allowed: name, seed, population_size")
        if sname not in SAMPLERS:
            raise ConfigError(f"'sampler.name'{_where(source)} is {sname!r}; allowed: {', '.join(SAMPLERS)}")
        strategy = StrategyConfig.of(data.get("strategy"), source=source)
        version = data.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"'version'{_where(source)} is {version!r}; this AutoSearch reads version {CONFIG_VERSION}")
        return cls(
            name=str(data.get("name", Path(source).stem if source else "custom")),
            strategy=strategy,
            knobs=knobs,
            quant=quant,
            recovery=recovery,
            objectives=tuple(objectives_raw),
            max_accuracy_drop=None if max_drop is None else float(max_drop),
            min_accuracy=None if min_acc is None else float(min_acc),
            n_trials=n_trials,
            timeout_s=timeout,
            sampler=sname,
            seed=int(seed),
            population_size=int(pop),
            plugins=tuple(plugins),
            source=source,
        )

    def uniform_bits(self, units: Sequence[str], bits: int) -> dict[str, int]:
        """Every one of ``units`` that may take ``bits`` (per its choices), at ``bits``."""
        spec = self.knobs.get("bits")
        return {u: bits for u in units if spec is not None and bits in spec.choices_for(u)}

    def quant_first(self, *, mode: str | None = None, int4: bool = False) -> dict[str, Any]:
        """Quantization options at their first choice, keyed as the sampler would produce them."""
        return self.quant.first_setting(mode=mode, int4=int4)

    def recovery_with(self, *, distill: str = "min") -> dict[str, Any]:
        """Recovery options with one distillation step count (``min`` or ``max`` of the choices)."""
        return self.recovery.with_distill(distill)

    # ---------------------------------------------------------------- identity
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (the study's fingerprint and export); :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {"version": CONFIG_VERSION, "name": self.name}
        if self.plugins:
            out["plugins"] = list(self.plugins)
        out["knobs"] = {}
        for k, v in self.knobs.items():
            out["knobs"][k] = {"choices": list(v.choices), "include": list(v.include), "exclude": list(v.exclude),
                               "share": {g: list(p) for g, p in v.share.items()}}
            if v.by_unit:
                out["knobs"][k]["by_unit"] = {p: list(c) for p, c in v.by_unit.items()}
        out["quantization"] = self.quant.to_dict()
        out["recovery"] = self.recovery.to_dict()
        out["objectives"] = list(self.objectives)
        out["constraints"] = {"max_accuracy_drop": self.max_accuracy_drop, "min_accuracy": self.min_accuracy}
        out["budget"] = {"n_trials": self.n_trials, "timeout_s": self.timeout_s}
        out["sampler"] = {"name": self.sampler, "seed": self.seed, "population_size": self.population_size}
        out["strategy"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.strategy.model_dump().items()}
        return out

    def with_strategy(self, **options: Any) -> SearchSpace:
        """A copy with some strategy options changed (validated)."""
        strategy = StrategyConfig.of({**self.strategy.model_dump(), **options}, source=self.source)
        return dataclasses.replace(self, strategy=strategy)

    def fingerprint(self) -> str:
        """Hash of what changes the meaning of trials (not the budget, not how much analysis runs)."""
        d = self.to_dict()
        old = {  # the layout older studies hashed: keep their fingerprints
            "name": d["name"], "knobs": d["knobs"], "quantization": {k: v for k, v in d["quantization"].items()
                                                                     if k != "calibration_samples"},
            "calibration_samples": d["quantization"]["calibration_samples"], "recovery": d["recovery"],
            "objectives": d["objectives"], "max_accuracy_drop": self.max_accuracy_drop, "min_accuracy": self.min_accuracy,
            "n_trials": self.n_trials, "timeout_s": self.timeout_s, "sampler": self.sampler, "seed": self.seed,
            "population_size": self.population_size, "strategy": d["strategy"],
        }
        if self.plugins:
            old["plugins"] = d["plugins"]
        for k in ("n_trials", "timeout_s", "name"):
            old.pop(k, None)
        # options left at their default are left out, so a new option does not orphan older studies
        old["quantization"] = {k: v for k, v in old["quantization"].items() if v != [QUANT_DEFAULTS.get(k)]}
        # how much analysis to run does not change what a trial means
        old["strategy"] = {k: v for k, v in old["strategy"].items() if k not in ("analysis", "analysis_budget", "bits_sensitivity")}
        return hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def _knob_choices(name: str, key: str, choices: Any, source: str | None) -> tuple[Any, ...]:
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"'knobs.{name}.{key}'{_where(source)} must be a non-empty list, got {choices!r}")
    k = knob(name)
    out = []
    for v in choices:
        try:
            out.append(k.check(v))
        except ValueError as exc:
            raise ConfigError(f"'knobs.{name}.{key}'{_where(source)} has {exc}") from None
    return tuple(dict.fromkeys(out))


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
    except RecursionError:
        raise ConfigError(f"{path} nests too deeply to read (thousands of levels of lists or mappings): a search space "
                          "is a few levels deep, e.g. knobs: {bits: [32, 8]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"search space file {path} cannot be read ({exc}): pass a readable UTF-8 YAML file") from None
    if data is None:
        raise ConfigError(f"search space file {path} is empty: write at least a 'knobs:' section, e.g. knobs: {{bits: [32, 8]}} "
                          "(the presets cnn and quant are complete examples)")
    return SearchSpace.from_dict(data, source=str(path))
