"""The ``prune`` knob: structured pruning ratio of a channel group, FFN or attention heads.

Units are the dependency groups torch-pruning finds in the PyTorch model (every layer whose width
changes together is one unit) and the FFN / attention heads of BERT-like blocks; a value is the
fraction of the unit's width removed, least important first (:mod:`autosearch.transforms.structural`).

It needs a torch module. A model given as ONNX is converted with ``onnx2torch`` the first time its
prune units are asked for (:attr:`autosearch.model.SourceModel.trainable`,
:mod:`autosearch.transforms.onnx_torch`); its units are named after the ONNX node of each group's
first conv, Gemm or MatMul (a MatMul by a constant weight becomes a Linear, its bias Add folded in),
groups whose channels meet a constant torch-pruning cannot cut are left out, and
a pruned candidate is written back into the original graph. Where the converter lacks an op or its
module differs from ONNX Runtime, the knob has no units and says why once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from autosearch.errors import ConfigError
from autosearch.knobs.base import Knob

if TYPE_CHECKING:
    from autosearch.build import BuildState
    from autosearch.model import SourceModel

__all__ = ["Prune"]


class Prune(Knob):
    name = "prune"
    neutral = 0.0
    order = 10
    options = "recovery"
    structural = True
    colorscale = "Reds"

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{value!r}: a pruning ratio must be in [0, 1)")
        return float(value)

    def find_units(self, source: SourceModel) -> tuple[list[str], list[str]]:
        if not source.trainable:
            why = source.not_trainable_reason
            return [], [f"prune knob skipped: structured pruning needs a PyTorch model, and this ONNX model has none: {why}"]
        units, notes = _units(source)
        return list(units), notes

    def unit_layers(self, source: SourceModel) -> Mapping[str, tuple[str, ...]]:
        if not source.trainable:
            return {}
        return _units(source)[0]

    def estimated_saving(self, value: Any, *, share: float, dims: tuple[int, int, int] | None = None) -> float:
        return share * float(value)

    def apply(self, state: BuildState, values: Mapping[str, Any]) -> None:
        if not state.source.trainable:
            raise ConfigError(f"structured pruning needs a PyTorch model: {state.source.not_trainable_reason}. "
                              "Remove 'prune' from the search space's knobs, or pass the nn.Module")
        state.structural(prune=dict(values))

    def summary(self, values: Mapping[str, Any], options: Mapping[str, Any]) -> str | None:
        pr = [float(p) for p in values.values() if self.active(p)]
        return f"prune {len(pr)} units (mean {sum(pr) / len(pr):.2f})" if pr else None


def _units(source: SourceModel) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Unit -> the layers it spans, and notes; found once per source (torch-pruning traces the model)."""
    cached = getattr(source, "_prune_units", None)
    if cached is not None:
        return cached[0], []
    from autosearch.transforms.structural import find_prune_units

    assert source.torch_example is not None  # set with the module (import or conversion)
    conv = source.converted
    notes: list[str] = []
    try:
        found = find_prune_units(source.torch_module, source.torch_example)
    except ConfigError as exc:
        if conv is None:
            raise
        # the user gave ONNX and asked for nothing torch: the knob is skipped, not the search
        units_none: dict[str, tuple[str, ...]] = {}
        notes.append(f"prune knob skipped: torch-pruning cannot trace the module converted from this ONNX model ({exc})")
        source._prune_units = (units_none, notes)  # type: ignore[attr-defined]
        return units_none, notes
    if conv is None:
        units = {su.name: tuple(su.modules) for su in found}
    else:  # named after the ONNX nodes the layers came from
        from autosearch.transforms.onnx_torch import safe_units

        ok, bad = safe_units(conv, found)
        if bad:
            shown = ", ".join(conv.node_of(b) or b for b in bad[:5]) + (f" ... ({len(bad)} in all)" if len(bad) > 5 else "")
            notes.append(f"prune: {len(bad)} of {len(found)} channel group(s) of the converted ONNX model left out: their "
                         f"channels meet a per-channel constant, constant MatMul or Reshape that pruning cannot cut ({shown})")
        units = {}
        for su in ok:
            layers = tuple(dict.fromkeys(n for n in (conv.node_of(m) for m in su.modules) if n))
            name = conv.node_of(su.name)
            if name:
                units[name] = layers
    source._prune_units = (units, notes)  # type: ignore[attr-defined]
    return units, notes
