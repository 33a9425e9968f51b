"""Trial config: a mapping unit -> knobs plus global options, sampled from a space."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autosearch.errors import ConfigError
from autosearch.space import INT4_OPTIONS, STATIC_OPTIONS

if TYPE_CHECKING:
    import optuna

    from autosearch.space import SearchSpace

__all__ = ["Candidate", "SpaceUnits", "sample_candidate"]

NEUTRAL = {"bits": 32, "prune": 0.0, "rank": 1.0}


@dataclass(frozen=True)
class SpaceUnits:
    """Which units of this model each knob applies to (after the space's include/exclude)."""

    bits: tuple[str, ...] = ()
    prune: tuple[str, ...] = ()
    rank: tuple[str, ...] = ()

    def of(self, knob: str) -> tuple[str, ...]:
        return tuple(getattr(self, knob))


@dataclass(frozen=True)
class Candidate:
    """One point of the search space.

    Attributes:
        bits: unit -> 32 | 16 | 8 | 4 (units absent stay float).
        prune: unit -> fraction of structured width removed (absent: 0).
        rank: unit -> fraction of rank kept (absent: 1.0).
        quant: global quantization options (mode, activation_type, per_channel, ...).
        recovery: recovery options (bn_recalibration, distill_steps, ...).
    """

    bits: Mapping[str, int] = field(default_factory=dict)
    prune: Mapping[str, float] = field(default_factory=dict)
    rank: Mapping[str, float] = field(default_factory=dict)
    quant: Mapping[str, Any] = field(default_factory=dict)
    recovery: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, knobs at their neutral value left out."""
        return {
            "bits": {u: int(b) for u, b in sorted(self.bits.items()) if b != 32},
            "prune": {u: float(p) for u, p in sorted(self.prune.items()) if p > 0},
            "rank": {u: float(r) for u, r in sorted(self.rank.items()) if r < 1},
            "quant": dict(sorted(self.quant.items())) if self.quantized else {},
            "recovery": dict(sorted(self.recovery.items())) if self.structural else {},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        """Inverse of :meth:`to_dict`."""
        allowed = {"bits", "prune", "rank", "quant", "recovery"}
        for key in data:
            if key not in allowed:
                raise ConfigError(f"unknown key {key!r} in candidate config; allowed: {', '.join(sorted(allowed))}")
        return cls(
            bits=dict(data.get("bits", {})),
            prune=dict(data.get("prune", {})),
            rank=dict(data.get("rank", {})),
            quant=dict(data.get("quant", {})),
            recovery=dict(data.get("recovery", {})),
        )

    @property
    def quantized(self) -> bool:
        return any(b != 32 for b in self.bits.values())

    @property
    def structural(self) -> bool:
        return any(p > 0 for p in self.prune.values()) or any(r < 1 for r in self.rank.values())

    def key(self, fingerprint: str) -> str:
        """Content hash of (source model, candidate): equal keys build equal models."""
        blob = json.dumps({"src": fingerprint, "cand": self.to_dict()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def validate(self, units: SpaceUnits) -> None:
        """Raise :class:`ConfigError` for a unit name this model does not have."""
        for knob in ("bits", "prune", "rank"):
            known = set(units.of(knob))
            for unit in getattr(self, knob):
                if unit not in known:
                    shown = ", ".join(sorted(known)[:8]) + (" ..." if len(known) > 8 else "")
                    raise ConfigError(
                        f"unknown unit {unit!r} for knob {knob!r} in the candidate config; "
                        f"this model's {knob} units are: {shown or '(none)'}"
                    )

    def summary(self) -> str:
        """One short line: e.g. ``int8 12/14 static u8 per-ch | prune 3 | rank 2``."""
        parts = []
        if self.quantized:
            q = self.quant
            n8 = sum(1 for b in self.bits.values() if b != 32)
            kinds = sorted({b for b in self.bits.values() if b != 32})
            act = {"uint8": "u8", "int8": "s8"}.get(str(q.get("activation_type")), "?")
            mode = q.get("mode", "static")
            parts.append(
                f"int{'/'.join(map(str, kinds))} {n8}/{len(self.bits)} {mode}"
                + (f" {act}" if mode == "static" else "")
                + (" per-ch" if q.get("per_channel") else "")
                + (" rr" if q.get("reduce_range") else "")
                + (" weighted-ops" if mode == "static" and q.get("op_scope") == "weighted" else "")
                + (" pre" if q.get("preprocess") else "")
            )
        else:
            parts.append("float")
        pr = [p for p in self.prune.values() if p > 0]
        if pr:
            parts.append(f"prune {len(pr)} units (mean {sum(pr) / len(pr):.2f})")
        rk = [r for r in self.rank.values() if r < 1]
        if rk:
            parts.append(f"rank {len(rk)} units (mean {sum(rk) / len(rk):.2f})")
        return " | ".join(parts)


def _suggest(trial: optuna.Trial, name: str, choices: Sequence[Any]) -> Any:
    if len(choices) == 1:
        return choices[0]
    return trial.suggest_categorical(name, list(choices))


def sample_candidate(trial: optuna.Trial, space: SearchSpace, units: SpaceUnits) -> Candidate:
    """Sample a candidate; parameter names are ``"<unit>.<knob>"`` or ``"<group>.<knob>"``."""
    chosen: dict[str, dict[str, Any]] = {"bits": {}, "prune": {}, "rank": {}}
    for knob in ("prune", "rank", "bits"):
        spec = space.knobs.get(knob)
        if spec is None:
            continue
        first: dict[str, str] = {}  # a share group samples from its first unit's choices
        for unit in units.of(knob):
            group = spec.group_of(unit)
            key = first.setdefault(group, unit) if group else unit
            chosen[knob][unit] = _suggest(trial, f"{group or unit}.{knob}", spec.choices_for(key))
    quant: dict[str, Any] = {}
    if any(b != 32 for b in chosen["bits"].values()):
        int4 = any(b == 4 for b in chosen["bits"].values())
        for opt, choices in space.quantization.items():
            if opt in STATIC_OPTIONS and quant.get("mode") == "dynamic":
                continue
            if opt in INT4_OPTIONS and not int4:
                continue
            quant[opt] = _suggest(trial, f"quant.{opt}", choices)
    recovery: dict[str, Any] = {}
    if any(p > 0 for p in chosen["prune"].values()) or any(r < 1 for r in chosen["rank"].values()):
        recovery = {k: v for k, v in space.recovery.items() if k != "distill_steps"}
        steps = space.recovery.get("distill_steps", 0)
        recovery["distill_steps"] = _suggest(trial, "recovery.distill_steps", steps) if isinstance(steps, list) else steps
    return Candidate(chosen["bits"], chosen["prune"], chosen["rank"], quant, recovery)


def candidate_params(cand: Candidate, space: SearchSpace, units: SpaceUnits) -> dict[str, Any]:
    """Optuna parameters that reproduce ``cand`` (for ``study.enqueue_trial``)."""
    params: dict[str, Any] = {}
    for knob in ("prune", "rank", "bits"):
        spec = space.knobs.get(knob)
        if spec is None:
            continue
        first: dict[str, str] = {}
        for unit in units.of(knob):
            group = spec.group_of(unit)
            choices = spec.choices_for(first.setdefault(group, unit) if group else unit)
            if len(choices) == 1:
                continue
            val = getattr(cand, knob).get(unit, NEUTRAL[knob])
            if val not in choices:
                val = min(choices, key=lambda c: abs(float(c) - float(val)))
            params[f"{group or unit}.{knob}"] = val
    for opt, choices in space.quantization.items():
        if len(choices) > 1 and opt in cand.quant and cand.quant[opt] in choices:
            params[f"quant.{opt}"] = cand.quant[opt]
    steps = space.recovery.get("distill_steps")
    if isinstance(steps, list) and len(steps) > 1:
        params["recovery.distill_steps"] = cand.recovery.get("distill_steps", steps[0])
    return params
