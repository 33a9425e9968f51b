"""What a knob is: the contract every knob module implements.

A knob owns everything that is particular to it: which units of a model it applies to, which
values it accepts, its neutral ("untouched") value, which global option section an active value
pulls in (``quant`` or ``recovery``), how it changes a model during a build, and how a candidate's
values read in one line. Everything else (the space, the candidate, the sampler, the study, the
dashboard and the export) iterates over the registered knobs and never names one.

Example (a knob that changes nothing, as a test would write it):
    >>> from autosearch.knobs import Knob, register
    >>> class Fuse(Knob):
    ...     name, neutral, order = "fuse", 0, 50
    ...     def find_units(self, source):
    ...         return [n.name for n in source.onnx_model.graph.node if n.op_type == "Relu"], []
    ...     def apply(self, state, values):
    ...         pass
    >>> _ = register(Fuse())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from autosearch.build import BuildState
    from autosearch.model import SourceModel

__all__ = ["Knob"]


class Knob:
    """Base class of a knob; subclass it, set the class attributes, implement the two methods.

    Attributes:
        name: The key in a space's ``knobs:`` section and in a candidate (``"bits"``).
        neutral: The value that leaves a unit untouched (32 bits, prune 0.0, rank 1.0).
        order: Sampling and build order (lower first): structural knobs before precision.
        options: The global option section an active value needs: ``"quant"``, ``"recovery"`` or None.
        structural: Whether it changes the model's structure (the analysis probes it with recovery).
        colorscale: Plotly colorscale of its heatmap in the dashboard.
    """

    name: ClassVar[str] = ""
    neutral: ClassVar[Any] = None
    order: ClassVar[int] = 100
    options: ClassVar[str | None] = None
    structural: ClassVar[bool] = False
    colorscale: ClassVar[str] = "Viridis"

    # ----------------------------------------------------------------- values
    def check(self, value: Any) -> Any:
        """The value as stored (coerced), or ``ValueError`` saying what is allowed."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{value!r} is not a number")  # noqa: TRY004 - check() raises ValueError (see space.py)
        return value

    def active(self, value: Any) -> bool:
        """Whether ``value`` changes the unit (is not the neutral value)."""
        return bool(value != self.neutral)

    def mildest(self, choices: Sequence[Any]) -> Any:
        """The non-neutral choice that changes a unit least (``None`` when every choice is neutral)."""
        vals = [v for v in choices if self.active(v)]
        if not vals:
            return None
        return min(vals, key=lambda v: abs(float(v) - float(self.neutral)))

    def estimated_saving(self, value: Any, *, share: float, dims: tuple[int, int, int] | None = None) -> float:
        """Fraction of the model's latency one unit at ``value`` is expected to save (the analysis'
        additive model ranks warm-start candidates by it); ``share`` is the unit's measured latency
        share, ``dims`` its layer's (in, out, full rank) where known. Default: nothing."""
        return 0.0

    def effective(self, values: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        """The values as the build will apply them under the candidate's ``options`` (its knob's option
        section): a value that the options make a no-op becomes neutral, so equal models share one candidate.
        Default: as sampled."""
        return dict(values)

    # ------------------------------------------------------------------ model
    def find_units(self, source: SourceModel) -> tuple[list[str], list[str]]:
        """Names of the units of ``source`` this knob can change, and notes for the user."""
        raise NotImplementedError

    def apply(self, state: BuildState, values: Mapping[str, Any]) -> None:
        """Change the candidate being built (``state``) for the active ``values`` (unit -> value)."""
        raise NotImplementedError

    def unit_layers(self, source: SourceModel) -> Mapping[str, tuple[str, ...]]:
        """Unit -> the layers (modules or nodes) it spans, where a unit is more than one layer; the
        analysis sums their latency shares. Default: each unit is its own layer."""
        return {}

    def unit_dims(self, source: SourceModel) -> Mapping[str, tuple[int, int, int]]:
        """Layer -> (inputs, outputs, full rank) where the knob's saving model needs it. Default: none."""
        return {}

    # ---------------------------------------------------------------- reading
    def summary(self, values: Mapping[str, Any], options: Mapping[str, Any]) -> str | None:
        """One short part of a candidate's summary line, or None when no value is active."""
        vals = [v for v in values.values() if self.active(v)]
        if not vals:
            return None
        if all(isinstance(v, (int, float)) for v in vals):
            return f"{self.name} {len(vals)} units (mean {sum(vals) / len(vals):.2f})"
        return f"{self.name} {len(vals)} units"

    def __repr__(self) -> str:
        return f"<knob {self.name!r} neutral={self.neutral!r}>"
