"""Typed, validated option sections of a search space (pydantic v2, strict).

Each section has two forms from one declaration, so each default lives in one place:

* the *setting* a candidate carries (one value per option): :class:`QuantSetting`,
  :class:`RecoverySetting`; the build reads its options through these;
* the *choices* a space holds (a tuple of values per option, sampled when there are several):
  :class:`QuantChoices`, :class:`RecoveryChoices`.

:class:`StrategyConfig` holds how the search spends its time. Strict validation: a YAML string
``"no"`` is not a boolean, ``8.5`` is not an integer; every error is one line naming the key, the
value, what is allowed and the file (:func:`config_error`).

Example:
    >>> from autosearch.config import QuantChoices, QuantSetting
    >>> QuantSetting.of({"mode": "dynamic"}).per_channel   # the default, from the one declaration
    True
    >>> QuantChoices.parse({"per_channel": [True, False]}).choices()["per_channel"]
    (True, False)
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from autosearch.errors import ConfigError

__all__ = [
    "CONFIG_VERSION",
    "QuantChoices",
    "QuantSetting",
    "RecoveryChoices",
    "RecoverySetting",
    "StrategyConfig",
    "config_error",
    "quant_label",
]

CONFIG_VERSION = 1


def quant_label(q: Mapping[str, Any]) -> str:
    """Short label of quantizer options: ``static u8 per-ch rr``, ``dynamic per-ch``, ...

    The one wording of a ``quant`` setting, used by trial summaries and the analysis' lines.
    """
    mode = str(q.get("mode", "static"))
    act = {"uint8": "u8", "int8": "s8"}.get(str(q.get("activation_type")), "?")
    return (mode + (f" {act}" if mode == "static" else "")
            + (" per-ch" if q.get("per_channel") else "")
            + (" rr" if q.get("reduce_range") else "")
            + (" weighted-ops" if mode == "static" and q.get("op_scope") == "weighted" else "")
            + (" pre" if q.get("preprocess") else ""))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @classmethod
    def of(cls, data: Mapping[str, Any] | None, *, section: str = "", source: str | None = None) -> Any:
        """Validate ``data`` (missing keys take their defaults), or raise a one-line :class:`ConfigError`."""
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            raise config_error(exc, cls, section or cls._section, source) from None

    _section: typing.ClassVar[str] = ""


class QuantSetting(_Strict):
    """The quantization options of one candidate (ONNX Runtime's quantizer)."""

    _section = "quantization"
    mode: Literal["static", "dynamic"] = "static"
    activation_type: Literal["uint8", "int8"] = "uint8"
    per_channel: bool | None = None  # None: per-channel in static mode, per-tensor in dynamic (ORT's defaults)
    reduce_range: bool = False  # 7-bit weights: avoids u8s8 saturation on CPUs without VNNI
    preprocess: bool = False  # onnxruntime.quantization.shape_inference.quant_pre_process first
    op_scope: Literal["all", "weighted"] = "all"  # weighted: Conv/MatMul/Gemm only; all: every op a unit owns
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    int4_block_size: Literal[16, 32, 64, 128, 256] = 32  # 4-bit MatMul/Gemm units: MatMulNBits block
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] = 0  # MatMulNBits compute type (4: int8 activations); 0 = ORT default


    def per_channel_in(self, mode: str) -> bool:
        """Whether weights are quantized per channel in ``mode``."""
        return (mode != "dynamic") if self.per_channel is None else self.per_channel


# sampled only when a unit takes 4 bits / not sampled in dynamic mode
INT4_OPTIONS = ("int4_block_size", "int4_accuracy_level")
STATIC_OPTIONS = ("activation_type", "calibrate_method", "op_scope")


class RecoverySetting(_Strict):
    """How a structurally changed model recovers (:func:`autosearch.transforms.structural.apply_structural`)."""

    _section = "recovery"
    bn_recalibration: bool = True  # a pruned CNN without it falls to chance
    reconstruct: Literal["auto"] | bool = "auto"  # least-squares refit; auto: only without distillation
    calibration_samples: int = Field(200, ge=1)
    distill_steps: int = Field(0, ge=0)
    distill_lr: float = Field(3e-4, gt=0)


class StrategyConfig(_Strict):
    """How the search spends its time (none of it changes what a trial means, except where said)."""

    _section = "strategy"
    analysis: bool = True  # measure latency shares, uniform int8 variants and sensitivities first
    analysis_budget: float | None = Field(0.25, gt=0, lt=1)  # fraction of the search's wall time; None: no bound
    bits_sensitivity: Literal["auto", "measure", "estimate"] = "auto"
    sensitivity_samples: int = Field(150, ge=1)
    warm_start_budgets: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # x max_accuracy_drop
    remeasure_front: bool = True
    narrow: bool = True  # fix quantizer options whose alternatives all measured far slower

    @field_validator("warm_start_budgets", mode="before")
    @classmethod
    def _listed(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v


def _choices_model(setting: type[_Strict], name: str, extra: dict[str, Any] | None = None,
                   defaults: Mapping[str, Any] | None = None) -> type[_Strict]:
    """A model with, per option of ``setting``, a non-empty tuple of its values (default: its default,
    or ``defaults[option]`` where the space's default is not the setting's)."""
    fields: dict[str, Any] = {}
    for opt, f in setting.model_fields.items():
        args = (f.annotation, *f.metadata)  # a name, not inline: mypy 2's parser takes Annotated[(a, *b)] for 3.11-only A[a, *b]
        item = Annotated[args] if f.metadata else f.annotation  # keep ge/gt per choice
        fields[opt] = (tuple[item, ...], ((defaults or {}).get(opt, f.default),))  # type: ignore[valid-type]
    fields.update(extra or {})

    def listed(cls: Any, v: Any) -> Any:  # a scalar is one choice, a list several (duplicates dropped)
        vals = v if isinstance(v, (list, tuple)) else [v]
        if not vals:
            raise ValueError("must list at least one choice")
        out: list[Any] = []
        for x in vals:  # True == 1 for dict keys: keep the type in the key
            if (type(x), x) not in {(type(y), y) for y in out}:
                out.append(x)
        return tuple(out)

    validators = {"_listed": field_validator(*setting.model_fields, mode="before")(listed)}
    model = create_model(name, __base__=_Strict, __validators__=validators, **fields)
    model._section = setting._section
    return model


class _Choices:
    """Methods shared by the choices forms."""

    setting: typing.ClassVar[type[_Strict]]

    def choices(self) -> dict[str, tuple[Any, ...]]:
        """Option -> its choices, in declaration order (the sampling order)."""
        return {k: getattr(self, k) for k in self.setting.model_fields}

    def first(self) -> dict[str, Any]:
        return {k: v[0] for k, v in self.choices().items()}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.choices().items()}


_QUANT_CHOICES = _choices_model(QuantSetting, "_QuantChoices", {"calibration_samples": (int, Field(128, ge=1))},
                                defaults={"per_channel": True})  # a space samples per-channel unless it says otherwise


class QuantChoices(_QUANT_CHOICES, _Choices):  # type: ignore[misc,valid-type]
    """The quantization choices of a space (``quantization:``), plus ``calibration_samples``."""

    setting: typing.ClassVar[type[_Strict]] = QuantSetting

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None, source: str | None = None) -> QuantChoices:
        return cls.of(data, section="quantization", source=source)

    def sample(self, suggest: Callable[[str, tuple[Any, ...]], Any], candidate: Any) -> dict[str, Any]:
        """One setting: ``suggest(option, choices)`` per option that applies (no static options in dynamic
        mode, no int4 options unless a unit of ``candidate`` takes 4 bits)."""
        int4 = any(v == 4 for v in candidate.values("bits").values())
        out: dict[str, Any] = {}
        for opt, choices in self.choices().items():
            if opt in STATIC_OPTIONS and out.get("mode") == "dynamic":
                continue
            if opt in INT4_OPTIONS and not int4:
                continue
            out[opt] = suggest(opt, choices)
        return out

    def first_setting(self, *, mode: str | None = None, int4: bool = False) -> dict[str, Any]:
        """Every option at its first choice, keyed as :meth:`sample` would produce them."""
        q = {k: v for k, v in self.first().items() if int4 or k not in INT4_OPTIONS}
        if mode is not None:
            q["mode"] = mode
        if q.get("mode") == "dynamic":
            for k in STATIC_OPTIONS:
                q.pop(k, None)
        return q

    def to_dict(self) -> dict[str, Any]:
        return {**_Choices.to_dict(self), "calibration_samples": self.calibration_samples}


class RecoveryChoices(_choices_model(RecoverySetting, "_RecoveryChoices"), _Choices):  # type: ignore[misc]
    """The recovery choices of a space (``recovery:``); an option given as a list is searched."""

    setting: typing.ClassVar[type[_Strict]] = RecoverySetting

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None, source: str | None = None) -> RecoveryChoices:
        return cls.of(data, section="recovery", source=source)

    def sample(self, suggest: Callable[[str, tuple[Any, ...]], Any]) -> dict[str, Any]:
        return {opt: suggest(opt, choices) for opt, choices in self.choices().items()}

    def with_distill(self, which: str = "min") -> dict[str, Any]:
        """One setting: first choices, ``distill_steps`` at the ``min`` or ``max`` of its choices."""
        rec = self.first()
        rec["distill_steps"] = (min if which == "min" else max)(self.distill_steps)
        return rec

    def to_dict(self) -> dict[str, Any]:
        """Scalars where there is one choice (as written in YAML), lists where the search picks."""
        return {k: (v[0] if len(v) == 1 else list(v)) for k, v in self.choices().items()}


def _allowed(model: type[BaseModel], field: str) -> str | None:
    """``'a', 'b'`` for a Literal field (or a tuple of them)."""
    f = model.model_fields.get(field)
    if f is None:
        return None
    ann = f.annotation
    if typing.get_origin(ann) is tuple:
        ann = typing.get_args(ann)[0]
    args: list[Any] = []
    for part in (typing.get_args(ann) if typing.get_origin(ann) in (Union, types.UnionType) else (ann,)):  # Union[a, b], a | b
        if typing.get_origin(part) is Literal:
            args += list(typing.get_args(part))
        elif part is bool:
            args += [True, False]
    return ", ".join(map(repr, args)) if args else None


def config_error(exc: ValidationError, model: type[BaseModel], section: str, source: str | None) -> ConfigError:
    """The first validation error as one line: key, value, what is allowed, the file."""
    err = exc.errors()[0]
    where = f" in {source}" if source else ""
    loc = [str(p) for p in err["loc"]]
    key = ".".join([section, loc[0]]) if loc else section
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        return ConfigError(f"unknown key '{key}'{where}; allowed: {', '.join(model.model_fields)}")
    allowed = _allowed(model, loc[0]) if loc else None
    if allowed:
        return ConfigError(f"'{key}'{where} has value {value!r}; allowed: {allowed}")
    return ConfigError(f"'{key}'{where} is {value!r}: {err['msg'].lower()}")
