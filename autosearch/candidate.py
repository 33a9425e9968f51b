"""Trial config: per knob a mapping unit -> value, plus global options, sampled from a space.

Knobs are whatever :mod:`autosearch.knobs` has registered; nothing here names one.

Example:
    >>> from autosearch.candidate import Candidate
    >>> c = Candidate(bits={"conv1": 8, "fc": 32}, quant={"mode": "dynamic"})
    >>> c.bits, c.quantized, c.summary()
    ({'conv1': 8, 'fc': 32}, True, 'int8 1/2 dynamic')
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from autosearch.errors import ConfigError
from autosearch.knobs import knob, knob_names, knobs

if TYPE_CHECKING:
    import optuna

    from autosearch.space import SearchSpace

__all__ = ["Candidate", "SpaceUnits", "candidate_params", "sample_candidate"]

_OPTIONS = ("quant", "recovery")


class SpaceUnits(Mapping[str, tuple[str, ...]]):
    """Which units of this model each knob applies to (after the space's include/exclude).

    A read-only mapping knob -> unit names; ``units.bits`` is ``units["bits"]`` and a knob with no
    unit reads as ``()``.
    """

    def __init__(self, units: Mapping[str, Sequence[str]] | None = None, **by_knob: Sequence[str]) -> None:
        self._units = {k: tuple(v) for k, v in {**(units or {}), **by_knob}.items()}

    def of(self, name: str) -> tuple[str, ...]:
        return self._units.get(name, ())

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self.of(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)

    def __getattr__(self, name: str) -> tuple[str, ...]:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.of(name)

    def __bool__(self) -> bool:
        return any(self._units.values())

    def __repr__(self) -> str:
        return f"SpaceUnits({', '.join(f'{k}={len(v)}' for k, v in self._units.items())})"


class Candidate:
    """One point of the search space: per knob unit -> value, and the global options.

    Construct with keywords: one per knob (``bits={...}``, ``prune={...}``, ``rank={...}``, any
    registered knob), plus ``quant`` (quantization options) and ``recovery`` (recovery options).
    Units a knob leaves out take its neutral value. ``cand.<knob>`` reads a knob's values.
    """

    __slots__ = ("_values", "quant", "recovery")

    def __init__(self, *, quant: Mapping[str, Any] | None = None, recovery: Mapping[str, Any] | None = None,
                 **values: Mapping[str, Any]) -> None:
        for name in values:
            knob(name)  # ConfigError for an unknown knob, naming the registered ones
        object.__setattr__(self, "_values", {k: dict(v or {}) for k, v in values.items()})
        object.__setattr__(self, "quant", dict(quant or {}))
        object.__setattr__(self, "recovery", dict(recovery or {}))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Candidate is immutable: build a new one")

    def __getattr__(self, name: str) -> dict[str, Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in knob_names():
            return self._values.get(name, {})
        raise AttributeError(f"Candidate has no knob or attribute {name!r}; knobs: {', '.join(knob_names())}")

    def values(self, name: str) -> dict[str, Any]:
        """Unit -> value of one knob (empty when the candidate leaves it untouched)."""
        return self._values.get(name, {})

    def active(self, name: str) -> dict[str, Any]:
        """Unit -> value of one knob, neutral values left out."""
        k = knob(name)
        return {u: v for u, v in self.values(name).items() if k.active(v)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Candidate) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    def __repr__(self) -> str:
        return f"Candidate({self.summary()})"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, knobs at their neutral value left out (options only where a knob needs them)."""
        out: dict[str, Any] = {}
        for k in knobs():
            out[k.name] = dict(sorted(self.active(k.name).items()))
        out["quant"] = dict(sorted(self.quant.items())) if self.quantized else {}
        out["recovery"] = dict(sorted(self.recovery.items())) if self.structural else {}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        """Inverse of :meth:`to_dict`."""
        names = knob_names()
        for key in data:
            if key not in names and key not in _OPTIONS:
                raise ConfigError(f"unknown key {key!r} in candidate config; allowed: {', '.join([*names, *_OPTIONS])}")
        return cls(quant=data.get("quant"), recovery=data.get("recovery"),
                   **{k: dict(v) for k, v in data.items() if k not in _OPTIONS})

    def _needs(self, section: str) -> bool:
        return any(self.active(k.name) for k in knobs() if k.options == section)

    @property
    def quantized(self) -> bool:
        """Whether a knob that needs the ``quant`` options is active."""
        return self._needs("quant")

    @property
    def structural(self) -> bool:
        """Whether a knob that needs the ``recovery`` options is active."""
        return self._needs("recovery")

    def key(self, fingerprint: str) -> str:
        """Content hash of (source model, candidate): equal keys build equal models.

        Knobs with no active value are left out, so registering a new knob keeps every key."""
        cand = {k: v for k, v in self.to_dict().items() if v or k in _OPTIONS}
        blob = json.dumps({"src": fingerprint, "cand": cand}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def check(self, units: Mapping[str, Sequence[str]]) -> None:
        """Raise :class:`ConfigError` for a unit name this model does not have (a silent no-op otherwise)."""
        for name, vals in self._values.items():
            known = set(units.get(name, ()))
            for unit in vals:
                if unit not in known:
                    shown = ", ".join(sorted(known)[:8]) + (" ..." if len(known) > 8 else "")
                    raise ConfigError(
                        f"unknown unit {unit!r} for knob {name!r} in the candidate config; "
                        f"this model's {name} units are: {shown or '(none)'}"
                    )

    def summary(self) -> str:
        """One short line: e.g. ``int8 12/14 static u8 per-ch | prune 3 units (mean 0.25)``."""
        ordered = sorted(knobs(), key=lambda k: (k.options != "quant", k.order))
        parts = [p for k in ordered for p in [k.summary(self.values(k.name), self.quant)] if p]
        if not self.quantized and not any(k.options == "quant" for k in ordered):
            parts.insert(0, "float")
        return " | ".join(parts) or "float"


def _suggest(trial: optuna.Trial, name: str, choices: Sequence[Any]) -> Any:
    if len(choices) == 1:
        return choices[0]
    return trial.suggest_categorical(name, list(choices))


def sample_candidate(trial: optuna.Trial, space: SearchSpace, units: Mapping[str, Sequence[str]]) -> Candidate:
    """Sample a candidate; parameter names are ``"<unit>.<knob>"`` or ``"<group>.<knob>"``."""
    chosen: dict[str, dict[str, Any]] = {}
    for k in knobs():
        spec = space.knobs.get(k.name)
        if spec is None:
            continue
        chosen[k.name] = {}
        first: dict[str, str] = {}  # a share group samples from its first unit's choices
        for unit in units.get(k.name, ()):
            group = spec.group_of(unit)
            key = first.setdefault(group, unit) if group else unit
            chosen[k.name][unit] = _suggest(trial, f"{group or unit}.{k.name}", spec.choices_for(key))
    probe = Candidate(**chosen)
    quant: dict[str, Any] = {}
    if probe.quantized:
        quant = space.quant.sample(lambda opt, choices: _suggest(trial, f"quant.{opt}", choices), probe)
    recovery: dict[str, Any] = {}
    if probe.structural:
        recovery = space.recovery.sample(lambda opt, choices: _suggest(trial, f"recovery.{opt}", choices))
    sections = {"quant": quant, "recovery": recovery}
    for k in knobs():  # what the options make a no-op is neutral: one candidate (and one build) per model
        if k.name in chosen and k.options in sections:
            chosen[k.name] = k.effective(chosen[k.name], sections[k.options])
    if not Candidate(**chosen).quantized:
        quant = {}
    return Candidate(quant=quant, recovery=recovery, **chosen)


def candidate_params(cand: Candidate, space: SearchSpace, units: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Optuna parameters that reproduce ``cand`` (for ``study.enqueue_trial``)."""
    params: dict[str, Any] = {}
    for k in knobs():
        spec = space.knobs.get(k.name)
        if spec is None:
            continue
        first: dict[str, str] = {}
        for unit in units.get(k.name, ()):
            group = spec.group_of(unit)
            choices = spec.choices_for(first.setdefault(group, unit) if group else unit)
            if len(choices) == 1:
                continue
            val = cand.values(k.name).get(unit, k.neutral)
            if val not in choices:
                val = min(choices, key=lambda c: abs(float(c) - float(val)))
            params[f"{group or unit}.{k.name}"] = val
    for opt, choices in space.quant.choices().items():
        if len(choices) > 1 and opt in cand.quant and cand.quant[opt] in choices:
            params[f"quant.{opt}"] = cand.quant[opt]
    for opt, choices in space.recovery.choices().items():
        if len(choices) > 1:
            params[f"recovery.{opt}"] = cand.recovery.get(opt, choices[0])
    return params
