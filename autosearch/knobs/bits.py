"""The ``bits`` knob: precision per unit in ONNX Runtime (32 float, 16, 8, 4 weight-only).

A unit is a weighted node (Conv/MatMul/Gemm with a constant weight) or, for a PyTorch model, the
module it was exported from; the ops that follow a unit go with it, and the ops after the last
weighted layer are units of their own (``post:<output>``, :func:`autosearch.analysis.op_groups`).
The build is ONNX Runtime's own quantizer (:func:`autosearch.build.quantize_model`) with the
candidate's global ``quant`` options (mode, activation type, per-channel, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import onnx

from autosearch.config import quant_label
from autosearch.knobs.base import Knob

if TYPE_CHECKING:
    from autosearch.build import BuildState
    from autosearch.model import SourceModel

__all__ = ["BITS", "Bits"]

BITS = (32, 16, 8, 4)


class Bits(Knob):
    name = "bits"
    neutral = 32
    order = 90
    options = "quant"
    colorscale = "Blues_r"

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or value not in BITS:
            raise ValueError(f"{value!r}; allowed: 32, 16, 8, 4")
        return int(value)

    def mildest(self, choices: Any) -> Any:
        vals = [v for v in choices if self.active(v)]
        return max(vals) if vals else None

    def effective(self, values: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        """``post:`` units (the ops after the last weighted layer) hold no weight: only static ``op_scope: all``
        quantizes them; under dynamic or weighted-ops quantization their value is float, whatever was sampled."""
        from autosearch.analysis import POST_PREFIX
        from autosearch.config import QuantSetting

        q = QuantSetting.of(options)
        if q.mode != "dynamic" and q.op_scope == "all":
            return dict(values)
        return {u: (self.neutral if u.startswith(POST_PREFIX) else v) for u, v in values.items()}

    def find_units(self, source: SourceModel) -> tuple[list[str], list[str]]:
        from autosearch.analysis import quant_units

        notes = []
        inner = _subgraph_weighted(source.onnx_model)
        if inner:
            notes.append(f"{inner} weighted node(s) inside If/Loop/Scan subgraphs stay float: ONNX Runtime's quantizer "
                         "does not reach into subgraphs")
        return [u.name for u in quant_units(source.onnx_model, by_module=source.origin == "torch")], notes

    def apply(self, state: BuildState, values: Mapping[str, Any]) -> None:
        state.quantize(dict(values))

    def summary(self, values: Mapping[str, Any], options: Mapping[str, Any]) -> str | None:
        low = [int(b) for b in values.values() if self.active(b)]
        if not low:
            return "float"
        return f"int{'/'.join(map(str, sorted(set(low))))} {len(low)}/{len(values)} {quant_label(options)}"


def _subgraph_weighted(model: onnx.ModelProto) -> int:
    """Conv/MatMul/Gemm nodes inside subgraphs (If branches, Loop bodies), at any depth."""
    def count(graph: onnx.GraphProto, top: bool) -> int:
        n = 0
        for node in graph.node:
            if not top and node.op_type in ("Conv", "MatMul", "Gemm"):
                n += 1
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    n += count(a.g, False)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    n += sum(count(g, False) for g in a.graphs)
        return n

    return count(model.graph, True)
