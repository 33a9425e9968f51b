"""Per-unit int8 sensitivity from one calibrated pass, instead of one build per unit.

ONNX Runtime's ``qdq_loss_debug`` pairs every tensor of a QDQ model before and after its
quantize/dequantize step and with the float model's value (``create_activation_matching``)
and scores them (``compute_activation_error``). Here both models run on a few calibration
samples with every float tensor exposed, shapes kept (ORT's own saver flattens them, and
a flattened tensor cannot be scored per channel); the error function is the relative noise
power, taken on the graph outputs per band of channels on one scale
(:func:`autosearch.metrics.scale_bands`), so a Concat of box pixels and class scores shows
its broken scores.

A unit's own contribution is how much relative noise its nodes add: the noise on its
outputs minus the noise on its inputs, against the float model. The measured drop of the
uniform int8 model is then shared among the units in proportion: an additive estimate,
consistent with the one measurement it rests on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from autosearch.metrics import scale_bands

__all__ = ["estimated_drops", "expose_tensors", "noise_by_unit", "run_exposed"]

_SAVE = "__saved"


def expose_tensors(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose node outputs (float tensors of the main graph) are also graph outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inferred: dict[str, int] = {}
    try:
        for vi in onnx.shape_inference.infer_shapes(model).graph.value_info:
            inferred[vi.name] = vi.type.tensor_type.elem_type
    except Exception:  # noqa: BLE001, S110 - best effort: without inferred types, tensors are taken as float
        pass
    have = {o.name for o in g.output}
    inits = {t.name for t in g.initializer}
    names: list[str] = []
    for node in list(g.node):
        if node.op_type in ("Constant", "Shape", "Size", "QuantizeLinear"):
            continue
        for t in node.output:
            if not t or t in have or t in inits:
                continue
            etype = inferred.get(t, onnx.TensorProto.FLOAT)
            if etype not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                continue
            g.node.append(onnx.helper.make_node("Identity", [t], [t + _SAVE], name=t + _SAVE))
            g.output.append(onnx.helper.make_tensor_value_info(t + _SAVE, etype, None))
            names.append(t)
            have.add(t)
    return out, names


def run_exposed(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Every exposed tensor's value on each feed (graph optimizations off, so the tensors exist)."""
    import onnxruntime as ort

    aug, names = expose_tensors(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(aug.SerializeToString(), so, providers=["CPUExecutionProvider"])
    wanted = [n + _SAVE for n in names]
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for n, v in zip(names, sess.run(wanted, dict(feed))):
            got[n].append(np.asarray(v))
    return got


def _noise(ref: Sequence[np.ndarray], test: Sequence[np.ndarray], *, banded: bool = False) -> float:
    """Relative noise power of ``test`` against ``ref`` (0 = equal); with ``banded``, the worst band of
    channels on one scale (for graph outputs: inside a network, channels of many scales are normal)."""
    worst = 0.0
    for r, t in zip(ref, test):
        r = np.asarray(r, np.float64)
        t = np.asarray(t, np.float64)
        if r.shape != t.shape or not r.size:
            continue
        if not np.isfinite(t).all():
            return 1.0
        split = scale_bands(r[None]) if banded and r.ndim >= 1 else None
        groups = [(r, t)] if split is None else [(np.take(r[None], b, axis=split[0]), np.take(t[None], b, axis=split[0]))
                                                   for b in split[1]]
        for rr, tt in groups:
            sig = float(np.mean(rr**2))
            err = float(np.mean((rr - tt) ** 2))
            if sig > 0:
                worst = max(worst, min(err / sig, 1.0))
            elif err > 0:
                worst = 1.0
    return worst


def noise_by_unit(
    float_model: onnx.ModelProto,
    qdq_path: str | Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    unit_of_node: Mapping[str, str],
) -> dict[str, float]:
    """Relative noise each unit adds in the uniform int8 model at ``qdq_path`` (see the module docstring).

    Args:
        float_model: The float graph the QDQ model was made from (same tensor names).
        qdq_path: The uniform int8 QDQ model.
        feeds: A few calibration samples.
        unit_of_node: Every node of the float graph that belongs to a unit -> the unit
            (weighted nodes, their followers, post-processing).
    """
    from onnxruntime.quantization.qdq_loss_debug import compute_activation_error, create_activation_matching

    qdq = onnx.load(str(qdq_path))
    float_acts = run_exposed(float_model, feeds)
    qdq_acts = run_exposed(qdq, feeds)
    matching = create_activation_matching(qdq_acts, float_acts)
    errors = compute_activation_error(matching, err_func=_noise)
    noise: dict[str, float] = {}
    for name, ref in float_acts.items():
        if name in errors and "xmodel_err" in errors[name]:
            noise[name] = float(errors[name]["xmodel_err"])
        elif name in qdq_acts:
            noise[name] = _noise(ref, qdq_acts[name])
    producer = {t: n for n in float_model.graph.node for t in n.output}
    nodes_of: dict[str, list[onnx.NodeProto]] = {}
    for n in float_model.graph.node:
        u = unit_of_node.get(n.name)
        if u is not None:
            nodes_of.setdefault(u, []).append(n)
    outs = _graph_outputs(float_model, qdq, feeds)
    noise.update(outs)
    contrib: dict[str, float] = {}
    for unit, nodes in nodes_of.items():
        mine = {n.name for n in nodes}
        produced = {t for n in nodes for t in n.output}
        ins = [t for n in nodes for t in n.input if t in producer and producer[t].name not in mine]
        outs_u = [t for t in produced if t in noise and (t in outs or any(t in c.input and c.name not in mine
                                                                             for c in float_model.graph.node))]
        n_in = max((noise.get(t, 0.0) for t in ins), default=0.0)
        n_out = max((noise.get(t, 0.0) for t in outs_u), default=n_in)
        contrib[unit] = max(0.0, n_out - n_in)
    return contrib


def _graph_outputs(float_model: onnx.ModelProto, qdq: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    a = ort.InferenceSession(float_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(qdq.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in a.get_outputs()]
    ref: dict[str, list[np.ndarray]] = {n: [] for n in names}
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for n, v in zip(names, a.run(names, dict(feed))):
            ref[n].append(np.asarray(v))
        for n, v in zip(names, b.run(names, dict(feed))):
            got[n].append(np.asarray(v))
    return {n: _noise(ref[n], got[n], banded=True) for n in names if np.issubdtype(ref[n][0].dtype, np.floating)}


def estimated_drops(contrib: Mapping[str, float], total_drop: float, *, floor: float = 0.0) -> dict[str, float]:
    """``total_drop`` (the uniform int8 model's measured drop) shared among units by their noise."""
    total = sum(contrib.values())
    if total <= 0:
        return {u: floor for u in contrib}
    return {u: max(floor, total_drop * c / total) for u, c in contrib.items()}
