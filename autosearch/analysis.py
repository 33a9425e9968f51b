"""Analysis: the searchable units of a model, with parameters and FLOPs.

For the ``bits`` knob a unit is a layer with weights that ONNX Runtime's
quantizer can take (Conv, MatMul, Gemm, plus Gather of an embedding table).
For a model that came from PyTorch, a unit is named by its module path
(``layer1.0.conv1``) and owns every ONNX node the module (or what replaced it,
such as the two factors of a low-rank split) exported; for an ONNX-only model
a unit is one node, named by the node's name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

__all__ = ["POST_PREFIX", "QuantUnit", "module_path_of_node", "node_unit_map", "op_groups", "quant_units", "units_frame"]

QUANT_OPS = ("Conv", "MatMul", "Gemm")
POST_PREFIX = "post:"  # units of the non-weighted ops after the last weighted layer, one per graph output
_STRUCTURE_OPS = {"Constant", "Shape", "Size", "ConstantOfShape", "Range", "NonZero", "If", "Loop", "Scan", "Identity",
                  "QuantizeLinear", "DequantizeLinear"}


def op_groups(model: onnx.ModelProto, unit_of_node: dict[str, str]) -> dict[str, str]:
    """The unit each non-weighted node of the main graph belongs to, for per-unit precision.

    The ops that break under int8 are often not weighted layers: a detection head's
    Concat of box pixels with class scores, the Mul/Sigmoid of its decoding. So every
    non-weighted node gets a unit and is quantized only when that unit is:

    - a node with no weighted node downstream (post-processing) belongs to ``post:<output>``,
      the first graph output it feeds: a unit of its own, so "the head stays float" is a
      value of the search;
    - any other node follows the nearest weighted node upstream (its activations are that
      layer's output: a residual Add, a pool, a Resize), or, before the first weighted layer,
      the nearest one downstream.

    Args:
        model: The graph.
        unit_of_node: Weighted node name -> unit (from :func:`node_unit_map`).
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # which graph outputs a node reaches with no weighted node in between, and whether a weighted node is downstream
    weighted_below: dict[str, bool] = {}
    first_output: dict[str, str] = {}
    outputs = [o.name for o in g.output]
    for node in reversed(list(g.node)):
        below = False
        reach: str | None = None
        for o in node.output:
            if o in outputs and reach is None:
                reach = o
            for c in consumers.get(o, []):
                if c.name in unit_of_node or weighted_below.get(c.name, False):
                    below = True
                if reach is None and c.name in first_output:
                    reach = first_output[c.name]
        weighted_below[node.name] = below
        if reach is not None:
            first_output[node.name] = reach
    out: dict[str, str] = {}
    for node in g.node:  # graph order: a node's producers are assigned before it
        if node.name in unit_of_node or node.op_type in _STRUCTURE_OPS:
            continue
        if not weighted_below.get(node.name, False):
            out[node.name] = POST_PREFIX + first_output.get(node.name, outputs[0] if outputs else "output")
            continue
        up = None
        for i in node.input:
            p = producer.get(i)
            if p is None:
                continue
            up = unit_of_node.get(p.name) or (out.get(p.name) if not out.get(p.name, "").startswith(POST_PREFIX) else None)
            if up:
                break
        if up:
            out[node.name] = up
    # before the first weighted layer: the nearest weighted node downstream
    for node in reversed(list(g.node)):
        if node.name in out or node.name in unit_of_node or node.op_type in _STRUCTURE_OPS:
            continue
        for o in node.output:
            for c in consumers.get(o, []):
                down = unit_of_node.get(c.name) or out.get(c.name)
                if down and not down.startswith(POST_PREFIX):
                    out[node.name] = down
                    break
            if node.name in out:
                break
    return out


@dataclass(frozen=True)
class QuantUnit:
    """One unit of the bits knob.

    Attributes:
        name: Module path (torch models) or node name (ONNX models).
        op_types: ONNX op types of its nodes.
        nodes: Names of its quantizable ONNX nodes.
        params: Weight parameters in those nodes.
        flops: Multiply-accumulates x2 at the example input's shape (0 where unknown).
    """

    name: str
    op_types: tuple[str, ...]
    nodes: tuple[str, ...]
    params: int
    flops: int


def module_path_of_node(node_name: str) -> str:
    """Recover the torch module path from a TorchScript-exported node name.

    ``/layer1.0/fc/fc.0/Gemm`` -> ``layer1.0.fc.0``; ``/stem/stem.0/Conv`` -> ``stem.0``.
    Each scope segment is the child's name, sometimes prefixed with its parent's
    (``fc.0`` under ``fc``), so overlapping segments are merged.

    Example:
        >>> module_path_of_node("/layer1.0/conv1/Conv")
        'layer1.0.conv1'
    """
    parts = [p for p in node_name.split("/") if p]
    if len(parts) <= 1:
        return ""
    segs = parts[:-1]
    path: list[str] = []
    for seg in segs:
        if path:
            head = seg.split(".")
            # merge "fc" + "fc.0" -> "fc.0"; "layer1" + "layer1.0" -> "layer1.0"
            if len(head) > 1 and ".".join(path[-1:]) == head[0]:
                path[-1:] = head
                continue
            if seg.startswith(".".join(path) + "."):
                path = seg.split(".")
                continue
        path.extend(seg.split("."))
    return ".".join(path)


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes are optional here: InferenceError, ValueError (> 2 GB), ... give none
        return {}
    out: dict[str, list[int]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = dims
    return out


def _node_cost(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], shapes: dict[str, list[int]]) -> tuple[int, int]:
    """(weight params, FLOPs) of one node; FLOPs 0 where shapes are unknown."""
    weight = next((inits[i] for i in node.input[1:2] if i in inits), None)
    if weight is None:
        return 0, 0
    wshape = list(weight.dims)
    params = int(np.prod(wshape)) if wshape else 0
    bias = inits.get(node.input[2]) if len(node.input) > 2 else None
    if bias is not None:
        params += int(np.prod(list(bias.dims)))
    out_shape = shapes.get(node.output[0])
    if not out_shape:
        return params, 0
    out_elems = int(np.prod(out_shape))
    if node.op_type == "Conv":
        per_out = int(np.prod(wshape[1:]))  # cin/groups * kh * kw
        return params, 2 * out_elems * per_out
    if node.op_type in ("MatMul", "Gemm"):
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        k = wshape[1] if (node.op_type == "Gemm" and trans_b) else wshape[0]
        return params, 2 * out_elems * k
    return params, 0


def quant_units(model: onnx.ModelProto, *, by_module: bool = False, known_units: Iterable[str] | None = None,
                post: bool = True) -> list[QuantUnit]:
    """List the units of the bits knob.

    Args:
        model: The float ONNX model.
        by_module: Group nodes by torch module path (for models exported from PyTorch).
        known_units: Unit names decided earlier (e.g. before a low-rank split): nodes
            map to the longest known name that prefixes their module path.
        post: Also list the post-processing units (``post:<output>``, see :func:`op_groups`).

    Returns:
        Weighted units in graph order, then the post-processing units. Nodes whose weight
        is not an initializer are skipped (the quantizers cannot take them).
    """
    inits = _initializers(model)
    shapes = _shapes(model)
    mapping = node_unit_map(model, by_module=by_module, known_units=known_units)
    order: list[str] = []
    acc: dict[str, dict[str, list]] = {}
    for node in model.graph.node:
        unit = mapping.get(node.name)
        if unit is None:
            continue
        params, flops = _node_cost(node, inits, shapes)
        if unit not in acc:
            order.append(unit)
            acc[unit] = {"ops": [], "nodes": [], "params": [0], "flops": [0]}
        acc[unit]["ops"].append(node.op_type)
        acc[unit]["nodes"].append(node.name)
        acc[unit]["params"][0] += params
        acc[unit]["flops"][0] += flops
    units = [
        QuantUnit(u, tuple(dict.fromkeys(acc[u]["ops"])), tuple(acc[u]["nodes"]), acc[u]["params"][0], acc[u]["flops"][0])
        for u in order
    ]
    if post and mapping:
        post_nodes: dict[str, list[onnx.NodeProto]] = {}
        by_name = {n.name: n for n in model.graph.node}
        for name, unit in op_groups(model, mapping).items():
            if unit.startswith(POST_PREFIX):
                post_nodes.setdefault(unit, []).append(by_name[name])
        for unit, nodes in post_nodes.items():
            units.append(QuantUnit(unit, tuple(dict.fromkeys(n.op_type for n in nodes)), tuple(n.name for n in nodes), 0, 0))
    return units


def node_unit_map(model: onnx.ModelProto, *, by_module: bool, known_units: Iterable[str] | None = None) -> dict[str, str]:
    """Map each quantizable node (weight is an initializer) to its unit name."""
    inits = _initializers(model)
    known = sorted(set(known_units or ()), key=len, reverse=True)
    out: dict[str, str] = {}
    for k, node in enumerate(model.graph.node):
        if node.op_type not in QUANT_OPS:
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.name or f"{node.op_type}_{k}"
        unit = name
        if by_module:
            path = module_path_of_node(name)
            if path:
                unit = path
                for cand in known:
                    if path == cand or path.startswith(cand + "."):
                        unit = cand
                        break
        out[name] = unit
    return out


def units_frame(units: list[QuantUnit]):  # -> pandas.DataFrame
    """The units as a DataFrame (name, ops, nodes, params, flops, flops share)."""
    import pandas as pd

    total = sum(u.flops for u in units) or 1
    return pd.DataFrame(
        {
            "unit": [u.name for u in units],
            "ops": [",".join(u.op_types) for u in units],
            "nodes": [len(u.nodes) for u in units],
            "params": [u.params for u in units],
            "mflops": [u.flops / 1e6 for u in units],
            "flops_share": [u.flops / total for u in units],
        }
    )


def latency_by_unit(
    model_path: str,
    feed: dict[str, np.ndarray],
    *,
    units: Iterable[str],
    by_module: bool,
    threads: int = 1,
    runs: int = 50,
    float_model: onnx.ModelProto | None = None,
    target: Any = None,
) -> dict[str, float]:
    """Measured time per unit (ms per inference) from ONNX Runtime's node profiler.

    Node times after graph optimization are mapped back to units by node name
    (fused nodes keep the name of the node they grew from; ``_token_N`` / ``_nchwc`` suffixes
    are dropped); everything else is reported under ``"(other)"``. For a quantized model pass
    the float graph it was made from as ``float_model``: its units name the nodes, and each
    ``<tensor>_QuantizeLinear`` / ``_DequantizeLinear`` counts for the unit that produces the
    tensor, so a unit's time includes its own quantize/dequantize work.

    Args:
        model_path: The ONNX file to profile (float, or quantized with ``float_model``).
        feed: One input batch.
        units: Unit names (bits-knob units).
        by_module: Whether node names carry torch module paths.
        threads: ``intra_op_num_threads`` of the default target (this CPU) when ``target`` is None.
        runs: Profiled runs (after 5 warm-up runs).
        float_model: The float graph a quantized ``model_path`` was made from.
        target: Where to profile (any :class:`~autosearch.target.TimingTarget`: its providers, threads and
            optimization level, on its device).
    """


    known = sorted(set(units), key=len, reverse=True)
    model = onnx.load(model_path)
    names_from = float_model if float_model is not None else model
    direct = node_unit_map(names_from, by_module=by_module, known_units=known)
    if not by_module:
        direct = {n: u for n, u in direct.items() if u in known} if float_model is not None else direct
    direct.update(op_groups(names_from, dict(direct)))  # activation ops count for their unit, post-processing for post:*
    tensor_unit = {o: direct[n.name] for n in names_from.graph.node if n.name in direct for o in n.output}
    tensor_unit.update({i.name: direct[c.name] for c in names_from.graph.node if c.name in direct
                        for i in names_from.graph.input if i.name in c.input})
    from autosearch.target import Target

    tgt = target if target is not None else Target(threads=threads)
    events = tgt.node_times(model_path, feed, runs=runs)
    totals: dict[str, float] = {}
    producer = {out: node for node in model.graph.node for out in node.output}
    weighted_ops = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "NhwcFusedConv", "QLinearConv",
                    "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}

    def resolve(name: str, op: str) -> str | None:
        if name in direct:
            return direct[name]
        base = re.sub(r"(_token_\d+|_nchwc|_quant)+$", "", name)
        if base in direct:
            return direct[base]
        for suffix in ("_QuantizeLinear", "_DequantizeLinear"):
            if base.endswith(suffix) and base[: -len(suffix)] in tensor_unit:
                return tensor_unit[base[: -len(suffix)]]
        if op not in weighted_ops:
            return None
        # optimized nodes are named after their output tensor: walk back to the weighted node
        frontier = [base]
        for _ in range(4):
            nxt: list[str] = []
            for tensor in frontier:
                prod = producer.get(tensor)
                if prod is None:
                    continue
                if prod.name in direct:
                    return direct[prod.name]
                nxt.extend(prod.input)
            frontier = nxt
        return None

    for node, op, us in events:
        key = resolve(node, op) or "(other)"
        totals[key] = totals.get(key, 0.0) + us / 1000.0
    return totals
