"""Low-rank factorization of MatMul / Gemm weights directly on an ONNX graph.

For models that arrive as ONNX only: a ``MatMul(X, W)`` whose ``W`` (``in x out``)
is a 2-D floating-point initializer becomes ``MatMul(MatMul(X, A), B)`` with
``A`` (``in x r``) and ``B`` (``r x out``) from a truncated SVD of ``W``. A
``Gemm`` with an initializer ``B`` becomes ``MatMul(op(A), P)`` followed by a
``Gemm`` with the second factor, keeping ``alpha``, ``beta``, ``C``, ``transA``
and ``transB`` semantics.

Only top-level nodes with a non-empty, unique name are addressable. Weights that
are also graph inputs (overridable at run time) or stored as external data that
was not loaded are left out.

Example:
    >>> units = find_onnx_lowrank_units(model)            # doctest: +SKIP
    >>> small = apply_onnx_lowrank(model, {units[0][0]: 0.25})  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autosearch.errors import ConfigError

__all__ = ["apply_onnx_lowrank", "find_onnx_lowrank_units"]

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _usable_initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """2-D floating-point initializers with in-memory data that are not graph inputs."""
    inputs = {i.name for i in graph.input}
    out: dict[str, onnx.TensorProto] = {}
    for init in graph.initializer:
        if init.name in inputs or init.data_type not in _FLOAT_TYPES or len(init.dims) != 2:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        out[init.name] = init
    return out


def _unique_names(graph: onnx.GraphProto) -> set[str]:
    seen: set[str] = set()
    dup: set[str] = set()
    for node in graph.node:
        if node.name in seen:
            dup.add(node.name)
        seen.add(node.name)
    return seen - dup - {""}


def _candidates(graph: onnx.GraphProto) -> dict[str, tuple[int, int, int]]:
    """``{node name: (node index, in, out)}`` for factorizable MatMul/Gemm nodes."""
    inits = _usable_initializers(graph)
    names = _unique_names(graph)
    out: dict[str, tuple[int, int, int]] = {}
    for i, node in enumerate(graph.node):
        if node.name not in names or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None:
            continue
        d0, d1 = int(weight.dims[0]), int(weight.dims[1])
        if node.op_type == "MatMul":
            n_in, n_out = d0, d1
        elif node.op_type == "Gemm":
            n_in, n_out = (d1, d0) if int(_attr(node, "transB", 0)) else (d0, d1)
        else:
            continue
        if n_in + n_out >= n_in * n_out:
            continue  # no rank r >= 1 saves parameters
        out[node.name] = (i, n_in, n_out)
    return out


def find_onnx_lowrank_units(model: onnx.ModelProto) -> list[tuple[str, int, int]]:
    """List the MatMul / Gemm nodes whose constant weight factorization can shrink.

    Args:
        model: The ONNX model (not modified).

    Returns:
        ``(node name, in, out)`` in graph order, where the weight acts as an
        ``in x out`` matrix and ``r * (in + out) < in * out`` for some ``r >= 1``.
    """
    cands = _candidates(model.graph)
    return [(name, n_in, n_out) for name, (_, n_in, n_out) in sorted(cands.items(), key=lambda kv: kv[1][0])]


def _svd(weight: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """``(left, right)`` with ``left @ right ~= weight``: left (in x r), right (r x out)."""
    u, s, vt = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:r])
    left = (u[:, :r] * root[None, :]).astype(weight.dtype)
    right = (root[:, None] * vt[:r, :]).astype(weight.dtype)
    return np.ascontiguousarray(left), np.ascontiguousarray(right)


def _all_used_names(graph: onnx.GraphProto) -> set[str]:
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used.update(_all_used_names(a.g))
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    used.update(_all_used_names(g))
    used.update(o.name for o in graph.output)
    return used


def _all_value_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def apply_onnx_lowrank(model: onnx.ModelProto, rank: Mapping[str, float]) -> onnx.ModelProto:
    """Factorize chosen MatMul / Gemm weights with a truncated SVD.

    Args:
        model: Source model; it is not modified.
        rank: ``{node name: fraction}`` with names from
            :func:`find_onnx_lowrank_units` and fractions in ``(0, 1]``; the
            rank is ``max(1, round(fraction * min(in, out)))``. A node is left
            unchanged when ``fraction == 1`` or the factorization would not save
            parameters.

    Returns:
        A new ``ModelProto``. New node, value and initializer names start with
        the original node's name (``"<name>/lowrank_..."``).

    Raises:
        ConfigError: Unknown node name or a fraction outside ``(0, 1]``.
    """
    if not isinstance(rank, Mapping):
        raise ConfigError(f"rank must be a mapping of node name to fraction, got {type(rank).__name__}")
    cands = _candidates(model.graph)
    plan: dict[str, int] = {}
    for name, fraction in rank.items():
        if name not in cands:
            valid = ", ".join(repr(n) for n in list(cands)[:8]) or "(none)"
            more = f" (and {len(cands) - 8} more)" if len(cands) > 8 else ""
            raise ConfigError(f"rank: unknown ONNX node {name!r}; factorizable MatMul/Gemm nodes are: {valid}{more}")
        ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and math.isfinite(fraction)
        if not ok or not 0.0 < float(fraction) <= 1.0:
            raise ConfigError(
                f"rank[{name!r}] = {fraction!r} is out of range; allowed is a number in (0, 1] "
                "(fraction of the weight's full rank to keep)"
            )
        _, n_in, n_out = cands[name]
        if float(fraction) >= 1.0:
            continue
        r = max(1, round(float(fraction) * min(n_in, n_out)))
        if r * (n_in + n_out) >= n_in * n_out:
            continue
        plan[name] = r

    new = onnx.ModelProto()
    new.CopyFrom(model)
    if not plan:
        return new
    graph = new.graph
    taken = _all_value_names(graph)

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name = f"{base}_{k}"
            k += 1
        taken.add(name)
        return name

    inits = {i.name: i for i in graph.initializer}
    old_nodes = list(graph.node)
    new_nodes: list[onnx.NodeProto] = []
    replaced_weights: set[str] = set()
    for node in old_nodes:
        r_node = plan.get(node.name) if node.name else None
        if r_node is None:
            new_nodes.append(node)
            continue
        w_init = inits[node.input[1]]
        w = numpy_helper.to_array(w_init)
        trans_b = node.op_type == "Gemm" and int(_attr(node, "transB", 0)) == 1
        matrix = w.T if trans_b else w  # in x out
        left, right = _svd(matrix, r_node)  # left: in x r, right: r x out
        base = node.name
        a_name = fresh(f"{base}/lowrank_A")
        graph.initializer.append(numpy_helper.from_array(left, a_name))
        x = node.input[0]
        if node.op_type == "Gemm" and int(_attr(node, "transA", 0)) == 1:
            xt = fresh(f"{base}/lowrank_xT")
            new_nodes.append(helper.make_node("Transpose", [x], [xt], name=fresh(f"{base}/lowrank_transpose")))
            x = xt
        mid = fresh(f"{base}/lowrank_mid")
        new_nodes.append(helper.make_node("MatMul", [x, a_name], [mid], name=fresh(f"{base}/lowrank_a")))
        b_name = fresh(f"{base}/lowrank_B")
        if node.op_type == "MatMul":
            graph.initializer.append(numpy_helper.from_array(right, b_name))
            new_nodes.append(helper.make_node("MatMul", [mid, b_name], list(node.output), name=fresh(f"{base}/lowrank_b")))
        else:
            second = np.ascontiguousarray(right.T) if trans_b else right
            graph.initializer.append(numpy_helper.from_array(second, b_name))
            gemm = helper.make_node(
                "Gemm",
                [mid, b_name, *node.input[2:]],
                list(node.output),
                name=fresh(f"{base}/lowrank_b"),
                alpha=float(_attr(node, "alpha", 1.0)),
                beta=float(_attr(node, "beta", 1.0)),
                transA=0,
                transB=1 if trans_b else 0,
            )
            new_nodes.append(gemm)
        replaced_weights.add(w_init.name)

    del graph.node[:]
    graph.node.extend(new_nodes)
    still_used = _all_used_names(graph)
    keep = [i for i in graph.initializer if i.name not in replaced_weights or i.name in still_used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
        drop_vi = [v for v in graph.value_info if v.name in replaced_weights and v.name not in still_used]
        for v in drop_vi:
            graph.value_info.remove(v)
    return new
