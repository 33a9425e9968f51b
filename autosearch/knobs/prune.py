"""The ``prune`` knob: structured pruning ratio of a channel group, FFN or attention heads.

Units are the dependency groups torch-pruning finds in the PyTorch model (every layer whose width
changes together is one unit) and the FFN / attention heads of BERT-like blocks; a value is the
fraction of the unit's width removed, least important first (:mod:`autosearch.transforms.structural`).
It needs the ``nn.Module``: an ONNX-only model has no prune units.
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
        if source.origin != "torch":
            return [], ["prune knob skipped: structured pruning needs the PyTorch model (this one came as ONNX)"]
        from autosearch.transforms.structural import find_prune_units

        assert source.torch_example is not None  # set with origin "torch" (load_model)
        return [u.name for u in find_prune_units(source.torch_module, source.torch_example)], []

    def unit_layers(self, source: SourceModel) -> Mapping[str, tuple[str, ...]]:
        if source.origin != "torch":
            return {}
        from autosearch.transforms.structural import find_prune_units

        assert source.torch_example is not None  # set with origin "torch" (load_model)
        return {su.name: tuple(su.modules) for su in find_prune_units(source.torch_module, source.torch_example)}

    def estimated_saving(self, value: Any, *, share: float, dims: tuple[int, int, int] | None = None) -> float:
        return share * float(value)

    def apply(self, state: BuildState, values: Mapping[str, Any]) -> None:
        if state.source.origin != "torch":
            raise ConfigError("structured pruning needs the PyTorch model: this study was given an ONNX file. "
                              "Remove 'prune' from the search space's knobs, or pass the nn.Module")
        state.structural(prune=dict(values))

    def summary(self, values: Mapping[str, Any], options: Mapping[str, Any]) -> str | None:
        pr = [float(p) for p in values.values() if self.active(p)]
        return f"prune {len(pr)} units (mean {sum(pr) / len(pr):.2f})" if pr else None
