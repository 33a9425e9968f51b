"""The ``rank`` knob: the fraction of rank a low-rank (truncated SVD) factorization keeps.

A unit is one Conv/Linear layer (PyTorch) or one MatMul/Gemm/Conv with a constant weight (ONNX);
at value ``f`` it becomes two layers of rank ``max(1, round(f * min(in, out)))``, left unchanged
where that would not save parameters. 1.0 keeps the layer as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from autosearch.errors import CandidateError, ConfigError
from autosearch.knobs.base import Knob

if TYPE_CHECKING:
    from autosearch.build import BuildState
    from autosearch.model import SourceModel

__all__ = ["Rank"]


class Rank(Knob):
    name = "rank"
    neutral = 1.0
    order = 20
    options = "recovery"
    structural = True
    colorscale = "Greens_r"

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{value!r}: a kept-rank fraction must be in (0, 1]")
        return float(value)

    def active(self, value: Any) -> bool:
        return float(value) < 1.0

    def find_units(self, source: SourceModel) -> tuple[list[str], list[str]]:
        if source.origin == "torch":
            from autosearch.transforms.structural import find_lowrank_units

            return [u.name for u in find_lowrank_units(source.torch_module)], []
        from autosearch.transforms.lowrank_onnx import find_onnx_lowrank_units

        return [u[0] for u in find_onnx_lowrank_units(source.onnx_model)], []

    def unit_dims(self, source: SourceModel) -> Mapping[str, tuple[int, int, int]]:
        if source.origin != "torch":
            return {}
        from autosearch.transforms.structural import find_lowrank_units

        named = dict(source.torch_module.named_modules())
        out = {}
        for su in find_lowrank_units(source.torch_module):
            w = getattr(named.get(su.name), "weight", None)
            if w is not None:
                in_f, out_f = int(np.prod(w.shape[1:])), int(w.shape[0])
                out[su.name] = (in_f, out_f, min(in_f, out_f))
        return out

    def estimated_saving(self, value: Any, *, share: float, dims: tuple[int, int, int] | None = None) -> float:
        """The layer's latency share times the parameters the factorization saves."""
        in_f, out_f, full = dims or (1, 1, 1)
        r = max(1, round(float(value) * full))
        return share * max(0.0, 1 - r * (in_f + out_f) / (in_f * out_f))

    def apply(self, state: BuildState, values: Mapping[str, Any]) -> None:
        if state.source.origin == "torch":
            state.structural(rank=dict(values))
            return
        from autosearch.transforms.lowrank_onnx import apply_onnx_lowrank

        try:
            state.proto = apply_onnx_lowrank(state.proto, dict(values))
        except (ConfigError, CandidateError):
            raise
        except Exception as exc:
            raise CandidateError(f"ONNX low-rank failed: {type(exc).__name__}: {str(exc)[:400]}") from exc

    def summary(self, values: Mapping[str, Any], options: Mapping[str, Any]) -> str | None:
        rk = [float(r) for r in values.values() if self.active(r)]
        return f"rank {len(rk)} units (mean {sum(rk) / len(rk):.2f})" if rk else None
