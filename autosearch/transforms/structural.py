"""Dependency-aware structured pruning and low-rank factorization of a torch model.

Three public entry points:

* :func:`find_prune_units` lists what can be pruned as *units*: a dependency
  group of coupled layers found with torch-pruning (a convolution's output
  channels together with its BatchNorm and every consumer; residual additions
  couple several convolutions into one group), or, for HuggingFace BERT-like
  encoder blocks, the feed-forward neurons and the attention heads of each
  block.
* :func:`find_lowrank_units` lists every ``nn.Linear`` and ``nn.Conv2d``
  (``groups == 1``) whose truncated-SVD factorization can save parameters.
* :func:`apply_structural` builds a *new* model: prune, then factorize, then
  recover (BatchNorm recalibration, layer-wise least-squares reconstruction of the
  changed linear maps, and optional output distillation from the original model). The input model is never modified.

The rebuilt model has physically smaller layers (no masks), so a model
exported to ONNX has smaller weight tensors.

Example:
    >>> import torch
    >>> from autosearch.zoo.digits import DigitsResNet
    >>> model = DigitsResNet(widths=(8, 16, 32)).eval()
    >>> x = (torch.randn(2, 1, 32, 32),)
    >>> [u.name for u in find_prune_units(model, x)][:2]
    ['stem.0', 'layer1.0.conv1']
    >>> small = apply_structural(model, x, prune={"layer1.0.conv1": 0.5}, rank={"fc": 0.5})
    >>> small.layer1[0].conv1.out_channels
    4
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from autosearch.errors import CandidateError, ConfigError

__all__ = [
    "IMPORTANCES",
    "StructuralUnit",
    "apply_structural",
    "find_lowrank_units",
    "find_prune_units",
]

#: Channel-importance criteria accepted by :func:`apply_structural`.
IMPORTANCES: tuple[str, ...] = ("l1", "l2", "random")

_KIND_CONV = "conv_channels"
_KIND_LINEAR = "linear_neurons"
_KIND_FFN = "ffn_neurons"
_KIND_HEADS = "attention_heads"
_KIND_LOWRANK = "lowrank"


@dataclass(frozen=True)
class StructuralUnit:
    """One independently searchable structural knob of a model.

    Attributes:
        name: Stable, human-readable key: the module path of the group's root
            layer (``"layer1.0.conv1"``), ``"<block>.ffn"`` / ``"<block>.attn"``
            for transformer blocks, or the layer's path for low-rank units.
        kind: ``"conv_channels"``, ``"linear_neurons"``, ``"ffn_neurons"``,
            ``"attention_heads"`` or ``"lowrank"``.
        width: Prunable width (output channels, neurons or heads); for
            ``"lowrank"`` units the full rank ``min(out, in)``.
        modules: Module paths whose weights change when this unit changes.
        params: Number of parameters in those modules.
        producers: The convs and linears among ``modules`` whose outputs are cut (a dependency group;
            the others lose inputs).
    """

    name: str
    kind: str
    width: int
    modules: tuple[str, ...]
    params: int
    producers: tuple[str, ...] = ()


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _flatten_tensors(obj: Any) -> list[torch.Tensor]:
    """All tensors in a (nested) model output, in a deterministic order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        out: list[torch.Tensor] = []
        for key in obj:
            out.extend(_flatten_tensors(obj[key]))
        return out
    if isinstance(obj, (list, tuple)):
        out = []
        for item in obj:
            out.extend(_flatten_tensors(item))
        return out
    return []


def _as_input_tuple(batch: Any) -> tuple[torch.Tensor, ...]:
    """Normalise one calibration batch (a tensor or a sequence of tensors) to a tuple."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, Sequence):
        return tuple(batch)
    raise ConfigError(
        f"calibration batch of type {type(batch).__name__} is not supported; "
        "give a tuple of tensors (the model's positional inputs) per batch"
    )


def _param_count(modules: Iterable[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _module_order(model: nn.Module) -> dict[str, int]:
    return {name: i for i, (name, _) in enumerate(model.named_modules())}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _check_unit_map(
    mapping: Mapping[str, float] | None,
    valid: Sequence[str],
    *,
    what: str,
    low: float,
    high: float,
    low_inclusive: bool,
    high_inclusive: bool,
    hint: str,
) -> dict[str, float]:
    """Validate a ``{unit name: ratio}`` mapping; raise ConfigError naming the culprit."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{what} must be a mapping of unit name to ratio, got {type(mapping).__name__}")
    valid_set = set(valid)
    out: dict[str, float] = {}
    for name, value in mapping.items():
        if name not in valid_set:
            sample = ", ".join(repr(v) for v in list(valid)[:8])
            more = f" (and {len(valid) - 8} more)" if len(valid) > 8 else ""
            raise ConfigError(
                f"{what}: unknown unit {name!r}; valid {what} units are: {sample or '(none: the model has no such unit)'}{more}"
            )
        ok = _is_number(value)
        if ok:
            v = float(value)
            ok = (v >= low if low_inclusive else v > low) and (v <= high if high_inclusive else v < high)
        if not ok:
            lo = "[" if low_inclusive else "("
            hi = "]" if high_inclusive else ")"
            raise ConfigError(
                f"{what}[{name!r}] = {value!r} is out of range; allowed is a number in {lo}{low}, {high}{hi} ({hint})"
            )
        out[name] = float(value)
    return out


# --------------------------------------------------------------------------- #
# transformer blocks (HuggingFace BERT-style)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _BertBlock:
    path: str  # e.g. "encoder.layer.0"
    attn_self: str  # path of the module holding query/key/value and num_attention_heads
    query: str
    key: str
    value: str
    attn_out: str
    ffn_in: str
    ffn_out: str


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _find_bert_blocks(model: nn.Module) -> list[_BertBlock]:
    """HuggingFace BERT-like encoder layers (BERT, RoBERTa, MiniLM, ELECTRA, ...)."""
    blocks: list[_BertBlock] = []
    for path, m in model.named_modules():
        attn = getattr(m, "attention", None)
        inter = getattr(m, "intermediate", None)
        outp = getattr(m, "output", None)
        if not (isinstance(attn, nn.Module) and isinstance(inter, nn.Module) and isinstance(outp, nn.Module)):
            continue
        sa = getattr(attn, "self", None)
        ao = getattr(attn, "output", None)
        if not (isinstance(sa, nn.Module) and isinstance(ao, nn.Module)):
            continue
        linears = [getattr(sa, "query", None), getattr(sa, "key", None), getattr(sa, "value", None)]
        dense = [getattr(ao, "dense", None), getattr(inter, "dense", None), getattr(outp, "dense", None)]
        if not all(isinstance(x, nn.Linear) for x in linears + dense):
            continue
        if not all(hasattr(sa, a) for a in ("num_attention_heads", "attention_head_size", "all_head_size")):
            continue
        blocks.append(
            _BertBlock(
                path=path,
                attn_self=_join(path, "attention.self"),
                query=_join(path, "attention.self.query"),
                key=_join(path, "attention.self.key"),
                value=_join(path, "attention.self.value"),
                attn_out=_join(path, "attention.output.dense"),
                ffn_in=_join(path, "intermediate.dense"),
                ffn_out=_join(path, "output.dense"),
            )
        )
    return blocks


def _bert_units(model: nn.Module, blocks: list[_BertBlock]) -> list[StructuralUnit]:
    units: list[StructuralUnit] = []
    for b in blocks:
        sa: Any = model.get_submodule(b.attn_self)
        heads = int(sa.num_attention_heads)
        attn_mods = (b.query, b.key, b.value, b.attn_out)
        ffn_mods = (b.ffn_in, b.ffn_out)
        ffn_in = _linear_at(model, b.ffn_in)
        units.append(
            StructuralUnit(
                name=_join(b.path, "attn"),
                kind=_KIND_HEADS,
                width=heads,
                modules=attn_mods,
                params=_param_count(model.get_submodule(p) for p in attn_mods),
            )
        )
        units.append(
            StructuralUnit(
                name=_join(b.path, "ffn"),
                kind=_KIND_FFN,
                width=int(ffn_in.out_features),
                modules=ffn_mods,
                params=_param_count(model.get_submodule(p) for p in ffn_mods),
            )
        )
    return units


def _slice_linear(layer: nn.Linear, idx: torch.Tensor, *, dim: int) -> nn.Linear:
    """A new Linear keeping rows (``dim=0``, outputs) or columns (``dim=1``, inputs) ``idx``."""
    weight = layer.weight.detach().index_select(dim, idx).clone()
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=layer.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            bias = layer.bias.detach()
            new.bias.copy_(bias.index_select(0, idx) if dim == 0 else bias)
    new.train(layer.training)
    return new


def _linear_at(model: nn.Module, path: str) -> nn.Linear:
    module = model.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise CandidateError(f"expected nn.Linear at {path!r}, found {type(module).__name__}")
    return module


def _with_bias(lin: nn.Linear) -> torch.Tensor:
    """The weight with the bias as an extra column (rows = output neurons)."""
    return torch.cat([lin.weight, lin.bias[:, None]], 1) if lin.bias is not None else lin.weight


def _norm(t: torch.Tensor, importance: str) -> torch.Tensor:
    return t.abs().sum(dim=1) if importance == "l1" else t.pow(2).sum(dim=1)


def _keep_indices(scores: torch.Tensor, n_prune: int, gen: torch.Generator | None) -> torch.Tensor:
    """Indices (sorted ascending) of the ``len(scores) - n_prune`` highest scores."""
    if gen is not None:
        scores = torch.rand(scores.shape[0], generator=gen)
    keep = scores.shape[0] - n_prune
    order = torch.argsort(scores, descending=True, stable=True)[:keep]
    return torch.sort(order).values


def _prune_bert_heads(model: nn.Module, b: _BertBlock, ratio: float, importance: str, gen: torch.Generator | None) -> None:
    sa: Any = model.get_submodule(b.attn_self)
    heads = int(sa.num_attention_heads)
    d = int(sa.attention_head_size)
    n_prune = min(math.floor(ratio * heads), heads - 1)
    if n_prune <= 0:
        return
    q, k, v, o = (_linear_at(model, p) for p in (b.query, b.key, b.value, b.attn_out))
    with torch.no_grad():
        per_row = _norm(_with_bias(q), importance) + _norm(_with_bias(k), importance) + _norm(_with_bias(v), importance)
        per_row = per_row + _norm(o.weight.t(), importance)
        scores = per_row.reshape(heads, d).sum(dim=1)
    keep_heads = _keep_indices(scores, n_prune, gen)
    idx = (keep_heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1).to(q.weight.device)
    _set_submodule(model, b.query, _slice_linear(q, idx, dim=0))
    _set_submodule(model, b.key, _slice_linear(k, idx, dim=0))
    _set_submodule(model, b.value, _slice_linear(v, idx, dim=0))
    _set_submodule(model, b.attn_out, _slice_linear(o, idx, dim=1))
    sa.num_attention_heads = int(keep_heads.numel())
    sa.all_head_size = int(keep_heads.numel()) * d
    # keep the (shared) HF config untouched: v5 attention reshapes with -1 heads.


def _prune_bert_ffn(model: nn.Module, b: _BertBlock, ratio: float, importance: str, gen: torch.Generator | None) -> None:
    fin = _linear_at(model, b.ffn_in)
    fout = _linear_at(model, b.ffn_out)
    width = int(fin.out_features)
    n_prune = min(math.floor(ratio * width), width - 1)
    if n_prune <= 0:
        return
    with torch.no_grad():
        scores = _norm(_with_bias(fin), importance) + _norm(fout.weight.t(), importance)
    idx = _keep_indices(scores, n_prune, gen).to(fin.weight.device)
    _set_submodule(model, b.ffn_in, _slice_linear(fin, idx, dim=0))
    _set_submodule(model, b.ffn_out, _slice_linear(fout, idx, dim=1))


# --------------------------------------------------------------------------- #
# generic dependency groups (torch-pruning)
# --------------------------------------------------------------------------- #


@dataclass
class _Groups:
    dg: Any  # tp.DependencyGraph built on the model it was traced on
    units: list[StructuralUnit]
    roots: dict[str, nn.Module]  # unit name -> root module (the one pruned as "out channels")


def _build_groups(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], skip_modules: set[str]) -> _Groups:
    """Trace ``model`` (in place: it is put in eval mode) and list its prunable groups.

    Groups touching the model's outputs or inputs, groups of width 1 and groups
    containing any module in ``skip_modules`` are left out.
    """
    import torch_pruning as tp

    name_of = {id(m): n for n, m in model.named_modules()}
    order = _module_order(model)

    # Mark floating inputs with a grad_fn of our own so that a group that would
    # have to change the width of a model input can be recognised.
    marked: list[torch.Tensor] = []
    marker_fns: set[Any] = set()
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            leaf = t.detach().clone().requires_grad_(True)
            m = leaf.clone()
            marker_fns.add(m.grad_fn)
            marked.append(m)
        else:
            marked.append(t)

    outputs: list[Any] = []

    def _capture(out: Any) -> Any:
        outputs.append(out)
        return out

    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=tuple(marked), output_transform=_capture, verbose=False
            )
    except Exception as exc:
        raise ConfigError(
            f"model {type(model).__name__} could not be traced for structured pruning "
            f"({type(exc).__name__}: {exc}); check that example_inputs are the model's positional inputs"
        ) from exc
    out_fns = {t.grad_fn for t in _flatten_tensors(outputs[0] if outputs else None) if t.grad_fn is not None}

    units: list[StructuralUnit] = []
    roots: dict[str, nn.Module] = {}
    for group in dg.get_all_groups():
        producers: list[str] = []
        members: list[str] = []
        bad = False
        for dep, _idxs in group.items:
            node = dep.target
            if node.grad_fn in marker_fns:
                bad = True  # would change an input's width
                break
            is_out = dg.is_out_channel_pruning_fn(dep.handler)
            if is_out and node.grad_fn in out_fns:
                bad = True  # would change an output's width
                break
            name = name_of.get(id(node.module))
            if name is None:
                continue
            if name in skip_modules:
                bad = True
                break
            if name not in members:
                members.append(name)
            if is_out and isinstance(node.module, (nn.modules.conv._ConvNd, nn.Linear)) and name not in producers:
                producers.append(name)
        if bad or not producers:
            continue
        root_dep, root_idxs = group.items[0]
        width = len(root_idxs)
        if width < 2:
            continue
        producers.sort(key=lambda n: order[n])
        members.sort(key=lambda n: order[n])
        unit_name = producers[0]
        root_mod = model.get_submodule(unit_name)
        kind = _KIND_CONV if isinstance(root_mod, nn.modules.conv._ConvNd) else _KIND_LINEAR
        units.append(
            StructuralUnit(
                name=unit_name,
                kind=kind,
                width=width,
                modules=tuple(members),
                params=_param_count(model.get_submodule(n) for n in members),
                producers=tuple(producers),
            )
        )
        roots[unit_name] = root_dep.target.module
    units.sort(key=lambda u: order[u.name])
    return _Groups(dg=dg, units=units, roots=roots)


def _tp_importance(importance: str) -> Any:
    import torch_pruning as tp

    if importance == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if importance == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    return tp.importance.RandomImportance()


def _prune_group(groups: _Groups, unit: StructuralUnit, ratio: float, importance: str, gen: torch.Generator | None) -> None:
    dg = groups.dg
    root = groups.roots[unit.name]
    pruner = dg.get_pruner_of_module(root)
    width = int(pruner.get_out_channels(root))
    n_prune = min(math.floor(ratio * width), width - 1)
    if n_prune <= 0:
        return
    full = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(width)))
    if importance == "random":
        scores = torch.zeros(width)
    else:
        with torch.no_grad():
            scores = _tp_importance(importance)(full)
        if scores is None or scores.numel() != width:
            raise CandidateError(f"unit {unit.name!r}: torch-pruning returned no importance for the group")
        scores = torch.nan_to_num(scores.detach().float().cpu(), nan=0.0)
    keep = set(_keep_indices(scores, n_prune, gen).tolist())
    drop = [i for i in range(width) if i not in keep]
    group = dg.get_pruning_group(root, pruner.prune_out_channels, drop)
    if not dg.check_pruning_group(group):
        raise CandidateError(f"unit {unit.name!r}: pruning {n_prune} of {width} channels would empty a layer")
    for dep, idxs in group:  # which original output channels each conv keeps (the folded recalibration pairs them)
        mod = dep.target.module
        if isinstance(mod, nn.Conv2d) and getattr(dep.handler, "__name__", "") == "prune_out_channels":
            kept = list(getattr(mod, _KEPT, range(mod.out_channels)))
            gone = {int(i) for i in idxs}
            setattr(mod, _KEPT, [c for j, c in enumerate(kept) if j not in gone])
    group.prune()


def _groups_beside_blocks(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], blocks: list[_BertBlock]) -> _Groups | None:
    """Dependency groups outside the transformer blocks.

    A model with transformer blocks whose graph torch-pruning cannot trace still
    has its block units: None is returned then instead of raising.
    """
    skip = {p for b in blocks for p in (b.query, b.key, b.value, b.attn_out, b.ffn_in, b.ffn_out)}
    try:
        return _build_groups(model, example_inputs, skip)
    except ConfigError:
        if blocks:
            return None
        raise


# --------------------------------------------------------------------------- #
# public: discovery
# --------------------------------------------------------------------------- #


def find_prune_units(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[StructuralUnit]:
    """List the structured-pruning units of ``model``.

    CNN/MLP layers are grouped with torch-pruning's dependency graph: each unit
    is one dependency group (a layer's output channels plus its BatchNorm and
    consumers; a residual addition couples all convolutions feeding it). Groups
    touching the model's outputs (e.g. the classifier's logits) or inputs are
    left out. HuggingFace BERT-like encoder layers give two units per block:
    ``"<block>.attn"`` (whole attention heads) and ``"<block>.ffn"``
    (intermediate neurons); their linear layers are not listed otherwise.

    Args:
        model: The model; it is not modified (a copy is traced).
        example_inputs: Positional inputs for one forward pass.

    Returns:
        Units in module order.

    Raises:
        ConfigError: ``example_inputs`` is not a tuple, or the model cannot be traced.
    """
    inputs = _check_example_inputs(example_inputs)
    work = copy.deepcopy(model)
    work.eval()
    blocks = _find_bert_blocks(work)
    units = _bert_units(work, blocks)
    groups = _groups_beside_blocks(work, inputs, blocks)
    if groups is not None:
        units.extend(groups.units)
    order = _module_order(work)
    units.sort(key=lambda u: order.get(u.name, order.get(u.name.rpartition(".")[0], 0)))
    return units


def _lowrank_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of the weight matrix a factorization would split, or None if not eligible."""
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        kh, kw = module.kernel_size
        return int(module.in_channels * kh * kw), int(module.out_channels)
    return None


def find_lowrank_units(model: nn.Module) -> list[StructuralUnit]:
    """List every ``nn.Linear`` / ``nn.Conv2d`` (``groups == 1``) that factorization can shrink.

    A layer qualifies when some rank ``r >= 1`` gives ``r * (in + out) < in * out``
    (for a ``k x k`` convolution ``in = cin * k * k`` and ``out = cout``).

    Args:
        model: The model (not modified).

    Returns:
        Units of kind ``"lowrank"`` in module order; ``width`` is ``min(in, out)``.
    """
    units: list[StructuralUnit] = []
    for name, module in model.named_modules():
        dims = _lowrank_dims(module)
        if dims is None or not name:
            continue
        n_in, n_out = dims
        if n_in + n_out >= n_in * n_out:
            continue
        units.append(
            StructuralUnit(name=name, kind=_KIND_LOWRANK, width=min(n_in, n_out), modules=(name,), params=_param_count([module]))
        )
    return units


# --------------------------------------------------------------------------- #
# low-rank factorization
# --------------------------------------------------------------------------- #


def _svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` with ``left @ right ~= weight``: left (out x r), right (r x in)."""
    w64 = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    root = s[:r].sqrt()
    left = (u[:, :r] * root[None, :]).to(weight.dtype)
    right = (root[:, None] * vh[:r, :]).to(weight.dtype)
    return left, right


def _factorize(module: nn.Module, fraction: float) -> nn.Module | None:
    """The factorized replacement of ``module``, or None when it would not pay."""
    dims = _lowrank_dims(module)
    if dims is None or fraction >= 1.0:
        return None
    n_in, n_out = dims
    r = max(1, round(fraction * min(n_in, n_out)))
    if r * (n_in + n_out) >= n_in * n_out:
        return None
    if isinstance(module, nn.Linear):
        left, right = _svd_factors(module.weight, r)
        first = nn.Linear(n_in, r, bias=False, device=left.device, dtype=left.dtype)
        second = nn.Linear(r, n_out, bias=module.bias is not None, device=left.device, dtype=left.dtype)
        with torch.no_grad():
            first.weight.copy_(right)
            second.weight.copy_(left)
            if module.bias is not None:
                second.bias.copy_(module.bias.detach())
        seq = nn.Sequential(first, second)
    elif isinstance(module, nn.Conv2d):
        cout, cin, kh, kw = module.weight.shape
        left, right = _svd_factors(module.weight.reshape(cout, cin * kh * kw), r)
        first_c = nn.Conv2d(
            cin,
            r,
            (kh, kw),
            stride=(module.stride[0], module.stride[1]),
            padding=module.padding,
            dilation=(module.dilation[0], module.dilation[1]),
            bias=False,
            padding_mode=module.padding_mode,
            device=left.device,
            dtype=left.dtype,
        )
        second_c = nn.Conv2d(r, cout, 1, bias=module.bias is not None, device=left.device, dtype=left.dtype)
        with torch.no_grad():
            first_c.weight.copy_(right.reshape(r, cin, kh, kw))
            second_c.weight.copy_(left.reshape(cout, r, 1, 1))
            if module.bias is not None and second_c.bias is not None:
                second_c.bias.copy_(module.bias.detach())
        seq = nn.Sequential(first_c, second_c)
    else:
        return None
    seq.train(module.training)
    return seq


# --------------------------------------------------------------------------- #
# recovery
# --------------------------------------------------------------------------- #


def _recalibrate_bn(model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> bool:
    """Re-estimate BatchNorm running statistics as an exact average over ``batches``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or not batches:
        return False
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        model.eval()
    return True


_KEPT = "_autosearch_kept_out"  # set on a pruned Conv2d: the original indices of the output channels it keeps


def _channel_moments(model: nn.Module, paths: Sequence[str], batches: list[tuple[torch.Tensor, ...]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per output channel of each conv at ``paths``: mean and standard deviation over ``batches`` (samples and
    pixels), accumulated as sums, so memory does not grow with the calibration set or the image size."""
    sums: dict[str, list[Any]] = {p: [0, 0.0, 0.0] for p in paths}
    handles = []
    for p in paths:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any, p: str = p) -> None:
            y = out.detach().to(torch.float64).transpose(0, 1).reshape(out.shape[1], -1)
            acc = sums[p]
            acc[0] += y.shape[1]
            acc[1] = acc[1] + y.sum(1)
            acc[2] = acc[2] + (y * y).sum(1)

        handles.append(model.get_submodule(p).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                model(*b)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for p, (n, s1, s2) in sums.items():
        mean = s1 / max(n, 1)
        var = (s2 / max(n, 1) - mean * mean) * (n / max(n - 1, 1))
        out[p] = (mean, var.clamp_min(0).sqrt())
    return out


def _recalibrate_folded(student: nn.Module, teacher: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> list[str]:
    """BatchNorm recalibration for a model whose BatchNorms were folded into its convs (every exported ONNX CNN).

    What re-estimating a BatchNorm's statistics does after pruning, done on the conv itself: each conv whose
    weight changed shape (its inputs or outputs pruned) gets, per output channel, the scale and shift that give
    its output on ``batches`` the mean and standard deviation the original conv's same channel has there.
    Conv by conv in model order, so each sees the inputs the already-corrected ones produce. Returns the
    corrected paths.
    """
    t_mods = dict(teacher.named_modules())
    order = _module_order(student)
    todo = []
    for path, mod in student.named_modules():
        t = t_mods.get(path)
        if isinstance(mod, nn.Conv2d) and isinstance(t, nn.Conv2d) and mod.bias is not None and mod.weight.shape != t.weight.shape:
            todo.append(path)
    if not todo or not batches:
        return []
    todo.sort(key=lambda p: order.get(p, 0))
    targets = _channel_moments(teacher, todo, batches)
    done = []
    for path in todo:
        mod = cast("nn.Conv2d", student.get_submodule(path))
        kept = list(getattr(mod, _KEPT, range(mod.out_channels)))
        if len(kept) != mod.out_channels:
            continue
        mu_t, sd_t = (m[kept] for m in targets[path])
        mu_s, sd_s = _channel_moments(student, [path], batches)[path]
        scale = torch.where(sd_s > 1e-8, sd_t / sd_s.clamp_min(1e-8), torch.ones_like(sd_s)).clamp(0.05, 20.0)
        assert mod.bias is not None  # selected above
        with torch.no_grad():
            mod.weight.mul_(scale.to(mod.weight.dtype).view(-1, 1, 1, 1))
            mod.bias.copy_(((mod.bias.to(torch.float64) - mu_s) * scale + mu_t).to(mod.bias.dtype))
        done.append(path)
    return done


def _refit_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """``(student path, teacher path)`` of the linear maps whose output can be refitted to the original's.

    A ``nn.Linear`` whose inputs were pruned (same path in both, same outputs, fewer inputs) and
    the second factor ``<path>.1`` of a factorized ``nn.Linear`` or ``nn.Conv2d`` (a 1x1
    convolution: a linear map per pixel), matched to the original layer at ``<path>``.
    """
    t_mods = dict(teacher.named_modules())
    pairs: list[tuple[str, str]] = []
    for path, mod in student.named_modules():
        if isinstance(mod, nn.Linear):
            t = t_mods.get(path)
            if isinstance(t, nn.Linear) and t.out_features == mod.out_features and t.in_features != mod.in_features:
                pairs.append((path, path))
                continue
        parent, _, leaf = path.rpartition(".")
        if leaf != "1" or not parent:
            continue
        t = t_mods.get(parent)
        linear = isinstance(mod, nn.Linear) and isinstance(t, nn.Linear) and t.out_features == mod.out_features
        pointwise = (
            isinstance(mod, nn.Conv2d)
            and isinstance(t, nn.Conv2d)
            and mod.kernel_size == (1, 1)
            and mod.stride == (1, 1)
            and mod.groups == 1
            and t.out_channels == mod.out_channels
        )
        if linear or pointwise:
            pairs.append((path, parent))
    return pairs


def _rows(t: torch.Tensor, conv: bool) -> torch.Tensor:
    """Activations as a float64 matrix, one row per token / pixel."""
    t = t.detach()
    t = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) if conv else t.reshape(-1, t.shape[-1])
    return t.to(torch.float64)


def _capture(model: nn.Module, paths: Sequence[str], batches: list[tuple[torch.Tensor, ...]], *, inputs: bool) -> dict[str, torch.Tensor]:
    """The inputs (or outputs) of the modules at ``paths`` over all batches, as row matrices."""
    got: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    handles = []
    for p in paths:
        mod = model.get_submodule(p)
        conv = isinstance(mod, nn.Conv2d)

        def hook(_m: nn.Module, args: tuple[Any, ...], out: Any, p: str = p, conv: bool = conv) -> None:
            got[p].append(_rows(args[0] if inputs else out, conv))

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                model(*b)
    finally:
        for h in handles:
            h.remove()
    return {p: torch.cat(v) for p, v in got.items()}


def _ridge(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    gram = a.T @ a
    damp = 1e-4 * float(gram.diagonal().mean()) + 1e-12
    gram.diagonal().add_(damp)
    return torch.linalg.solve(gram, a.T @ y)


def _reconstruct(student: nn.Module, teacher: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> list[str]:
    """Refit each changed linear map by least squares so it reproduces the original layer's output.

    Layer by layer in model order (each fit sees the inputs the already-refitted layers
    produce), the weights and bias of the map are solved in closed form (ridge) on the
    calibration batches: ``min ||X' W + b - Y||`` with ``X'`` the student's input to the
    layer and ``Y`` the original layer's output. A fit is kept only when it lowers the error
    on the last fifth of the rows, fitted on the rest. Returns the refitted paths.
    """
    pairs = _refit_pairs(student, teacher)
    if not pairs or not batches:
        return []
    order = _module_order(student)
    pairs.sort(key=lambda sp: order.get(sp[0], 0))
    targets = _capture(teacher, [t for _, t in pairs], batches, inputs=False)
    done: list[str] = []
    for s_path, t_path in pairs:
        mod = cast("nn.Linear | nn.Conv2d", student.get_submodule(s_path))  # the kinds _refit_pairs gives
        weight: torch.Tensor = mod.weight
        bias: torch.Tensor | None = mod.bias
        x = _capture(student, [s_path], batches, inputs=True)[s_path]
        y = targets[t_path]
        if x.shape[0] != y.shape[0] or x.shape[0] < 8:
            continue
        a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if bias is not None else x
        w_now = weight.detach().reshape(weight.shape[0], -1).T.to(torch.float64)
        if bias is not None:
            w_now = torch.cat([w_now, bias.detach().to(torch.float64)[None, :]], 0)
        split = max(1, int(0.8 * a.shape[0]))
        try:
            w_fit = _ridge(a[:split], y[:split])
        except RuntimeError:  # singular even with damping
            continue
        held_now = float(((a[split:] @ w_now - y[split:]) ** 2).mean())
        held_fit = float(((a[split:] @ w_fit - y[split:]) ** 2).mean())
        if not held_fit < held_now:
            continue
        w = _ridge(a, y)
        n_in = x.shape[1]
        with torch.no_grad():
            weight.copy_(w[:n_in].T.reshape(weight.shape).to(weight.dtype))
            if bias is not None:
                bias.copy_(w[n_in].to(bias.dtype))
        done.append(s_path)
    return done


def _hidden_hooks(model: nn.Module, paths: Sequence[str], store: dict[str, torch.Tensor]) -> list[Any]:
    def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any, p: str) -> None:
        store[p] = out[0] if isinstance(out, (tuple, list)) else out

    return [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: hook(m, a, o, p)) for p in paths]


def _token_mask(batch: tuple[torch.Tensor, ...], hidden: torch.Tensor) -> torch.Tensor | None:
    """The attention mask among a batch's inputs: a 0/1 integer ``[B, T]`` tensor, cut to the hidden states' length."""
    for t in batch:
        shaped = t.dim() == 2 and not t.is_floating_point() and t.shape[0] == hidden.shape[0] and t.shape[1] >= hidden.shape[1]
        if shaped and bool(((t == 0) | (t == 1)).all()):
            return t[:, : hidden.shape[1]].unsqueeze(-1).to(hidden.dtype)
    return None


def _relative_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE over real tokens (``mask``), divided by the teacher's mean square: blocks of any scale weigh alike."""
    diff = (student - teacher).pow(2)
    if mask is not None:
        err = (diff * mask).sum() / (mask.sum() * student.shape[-1]).clamp_min(1)
        scale = (teacher.pow(2) * mask).sum() / (mask.sum() * student.shape[-1]).clamp_min(1)
    else:
        err, scale = diff.mean(), teacher.pow(2).mean()
    return err / scale.clamp_min(1e-12)


#: Weight of each matched block's relative MSE against the outputs' (measured on MiniLM, 25% of the FFN in
#: three blocks, 50 steps: cosine 0.9659 matching outputs only, 0.9693 with every block's hidden states).
_HIDDEN_WEIGHT = 0.1


def _distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: list[tuple[torch.Tensor, ...]],
    *,
    steps: int,
    lr: float,
    hidden: Sequence[str] = (),
) -> None:
    """``steps`` Adam steps matching the teacher's outputs (student in eval mode).

    The loss is the MSE of every floating-point output; with ``hidden`` (module paths whose
    outputs keep their shape, e.g. transformer blocks, whose width pruning never changes) each
    output's and each block's MSE is taken relative to the teacher's mean square (padding tokens
    left out), and every block adds ``_HIDDEN_WEIGHT`` times its error: the pruned layers get a
    signal at their own depth instead of only through the final output. The learning rate follows
    a cosine decay to zero, so the last steps settle the weights instead of leaving them wherever
    the largest step threw them.
    """
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        return
    t_store: dict[str, torch.Tensor] = {}
    hooks = _hidden_hooks(teacher, hidden, t_store)
    targets: list[tuple[list[torch.Tensor], dict[str, torch.Tensor]]] = []
    try:
        with torch.no_grad():
            for b in batches:
                outs = [t.detach() for t in _flatten_tensors(teacher(*b)) if t.is_floating_point()]
                targets.append((outs, {p: t.detach() for p, t in t_store.items()}))
                t_store.clear()
    finally:
        for h in hooks:
            h.remove()
    s_store: dict[str, torch.Tensor] = {}
    hooks = _hidden_hooks(student, hidden, s_store)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    student.eval()
    try:
        for step in range(steps):
            i = step % len(batches)
            with torch.enable_grad():
                outs = [t for t in _flatten_tensors(student(*batches[i])) if t.is_floating_point()]
                t_outs, t_hidden = targets[i]
                if len(outs) != len(t_outs):
                    raise CandidateError("distillation: the student returns a different number of outputs than the original")
                if hidden:
                    loss = sum(_relative_mse(o, t, None) for o, t in zip(outs, t_outs, strict=True))
                    mask = _token_mask(batches[i], next(iter(s_store.values()))) if s_store else None  # blocks share [B, T]
                    for p, h in s_store.items():
                        loss = loss + _HIDDEN_WEIGHT * _relative_mse(h, t_hidden[p], mask)
                else:
                    loss = sum(torch.nn.functional.mse_loss(o, t) for o, t in zip(outs, t_outs, strict=True))
                s_store.clear()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        for h in hooks:
            h.remove()
    opt.zero_grad(set_to_none=True)
    student.eval()


def _matching_blocks(student: nn.Module, teacher: nn.Module, paths: Sequence[str], batch: tuple[torch.Tensor, ...]) -> list[str]:
    """The ``paths`` whose outputs have the same shape in student and teacher on ``batch``."""
    shapes: list[dict[str, tuple[int, ...]]] = []
    for m in (student, teacher):
        store: dict[str, torch.Tensor] = {}
        hooks = _hidden_hooks(m, paths, store)
        try:
            with torch.no_grad():
                m(*batch)
        finally:
            for h in hooks:
                h.remove()
        shapes.append({p: tuple(t.shape) for p, t in store.items() if isinstance(t, torch.Tensor) and t.is_floating_point()})
    return [p for p in paths if p in shapes[0] and shapes[0][p] == shapes[1].get(p)]


# --------------------------------------------------------------------------- #
# public: apply
# --------------------------------------------------------------------------- #


def _check_example_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ConfigError(
            f"example_inputs must be a non-empty tuple of tensors (the model's positional inputs), "
            f"got {type(example_inputs).__name__}"
        )
    return tuple(example_inputs)


def _shapes(obj: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in _flatten_tensors(obj)]


def apply_structural(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    prune: Mapping[str, float] | None = None,
    rank: Mapping[str, float] | None = None,
    importance: str = "l2",
    calibration: Iterable[tuple[torch.Tensor, ...]] | None = None,
    recalibrate_bn: bool = True,
    reconstruct: bool | None = None,
    distill_steps: int = 0,
    distill_lr: float = 3e-4,
    distill_hidden: bool | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build a pruned and/or factorized copy of ``model``.

    Order: prune -> low-rank -> recover. ``model`` itself is never modified.

    Args:
        model: Source model.
        example_inputs: Positional inputs for one forward pass (used for tracing
            and to check that the result keeps the output shapes).
        prune: ``{unit name: ratio}`` with names from :func:`find_prune_units`
            and ratios in ``[0, 1)``; removes ``floor(ratio * width)`` channels,
            neurons or heads (at least one is always kept), least important first.
        rank: ``{layer path: fraction}`` with names from :func:`find_lowrank_units`
            and fractions in ``(0, 1]``; a layer becomes two layers of rank
            ``max(1, round(fraction * min(in, out)))`` from a truncated SVD
            (paths ``<path>.0`` and ``<path>.1``). Left unchanged when the
            factorization would not save parameters or when ``fraction == 1``.
        importance: Channel criterion: ``"l2"`` (group L2 norm), ``"l1"`` or ``"random"``.
        calibration: Batches (tuples of positional inputs) for recovery; consumed once.
        recalibrate_bn: Re-estimate BatchNorm statistics on ``calibration`` after
            a change (skipped without calibration data or BatchNorm layers).
        reconstruct: Refit, by least squares on ``calibration``, every linear map whose inputs
            were pruned (FFN / attention output projections, a classifier after pruned
            channels) and the second factor of every factorized layer, so each reproduces the
            original layer's output (layer-wise reconstruction; closed form, seconds).
            ``None`` (default): only when ``distill_steps == 0``. Measured on the digits CNN
            (50% of every channel group) and MiniLM (25% of every FFN): 0.70 -> 0.96 accuracy
            and cosine 0.85 -> 0.90 without distillation, but distillation started from the
            refitted weights ended lower than from the pruned ones (0.962 vs 0.976, 0.904 vs 0.918).
        distill_steps: Adam steps minimising the MSE between the new model's and
            the original model's outputs on ``calibration`` (no labels needed).
        distill_lr: Adam learning rate for distillation.
        distill_hidden: Also match the hidden states of every transformer block (BERT-like
            encoder layers keep their width when heads or FFN neurons are pruned), each as an
            MSE relative to the original's scale, padding left out. ``None`` (default): when
            the model has such blocks. On MiniLM with 25% of the FFN pruned in three blocks:
            cosine 0.9659 -> 0.9693 after 50 steps, 0.9680 -> 0.9743 after 200
            (``benchmarks/ceiling.py``).
        seed: Seed for ``"random"`` importance and distillation.

    Returns:
        A new model in eval mode taking the same inputs and returning outputs of the same shapes.

    Raises:
        ConfigError: Unknown unit names, ratios out of range, a bad ``importance``,
            ``distill_steps < 0`` or distillation without calibration data.
        CandidateError: The changed model fails to run or changes an output shape.
    """
    inputs = _check_example_inputs(example_inputs)
    if importance not in IMPORTANCES:
        raise ConfigError(f"importance={importance!r} is not supported; allowed: {', '.join(IMPORTANCES)}")
    if isinstance(distill_steps, bool) or not isinstance(distill_steps, int) or distill_steps < 0:
        raise ConfigError(f"distill_steps={distill_steps!r} must be an integer >= 0")
    if not _is_number(distill_lr) or float(distill_lr) <= 0:
        raise ConfigError(f"distill_lr={distill_lr!r} must be a positive number")
    batches = [_as_input_tuple(b) for b in calibration] if calibration is not None else []
    if distill_steps > 0 and not batches:
        raise ConfigError(f"distill_steps={distill_steps} needs calibration batches; pass calibration=[...] or distill_steps=0")

    work = copy.deepcopy(model)
    work.eval()
    with torch.no_grad():
        try:
            ref_shapes = _shapes(work(*inputs))
        except Exception as exc:
            raise ConfigError(
                f"model {type(model).__name__} does not run on example_inputs ({type(exc).__name__}: {exc})"
            ) from exc

    gen: torch.Generator | None = torch.Generator().manual_seed(seed) if importance == "random" else None

    # ---- validate names against the units of the (unchanged) copy
    blocks = _find_bert_blocks(work)
    block_units = {u.name: u for u in _bert_units(work, blocks)}
    prune_map: dict[str, float] = {}
    groups: _Groups | None = None
    if prune:
        if not (isinstance(prune, Mapping) and all(k in block_units for k in prune)):
            groups = _groups_beside_blocks(work, inputs, blocks)
        group_list = groups.units if groups is not None else []
        order = _module_order(work)
        valid = [
            u.name
            for u in sorted(
                [*block_units.values(), *group_list],
                key=lambda u: order.get(u.name, order.get(u.name.rpartition(".")[0], 0)),
            )
        ]
        prune_map = _check_unit_map(
            prune,
            valid,
            what="prune",
            low=0.0,
            high=1.0,
            low_inclusive=True,
            high_inclusive=False,
            hint="fraction of the unit's width to remove",
        )
    lowrank_names = [u.name for u in find_lowrank_units(work)]
    rank_map = _check_unit_map(
        rank,
        lowrank_names,
        what="rank",
        low=0.0,
        high=1.0,
        low_inclusive=False,
        high_inclusive=True,
        hint="fraction of the layer's full rank to keep",
    )

    changed = False
    # ---- prune
    if prune_map:
        blocks_by_name: dict[str, _BertBlock] = {}
        for b in blocks:
            blocks_by_name[_join(b.path, "attn")] = b
            blocks_by_name[_join(b.path, "ffn")] = b
        group_units = {u.name: u for u in groups.units} if groups is not None else {}
        for name, ratio in prune_map.items():
            if ratio <= 0.0:
                continue
            try:
                if groups is not None and name in group_units:
                    _prune_group(groups, group_units[name], ratio, importance, gen)
                elif block_units[name].kind == _KIND_HEADS:
                    _prune_bert_heads(work, blocks_by_name[name], ratio, importance, gen)
                else:
                    _prune_bert_ffn(work, blocks_by_name[name], ratio, importance, gen)
            except (ConfigError, CandidateError):
                raise
            except Exception as exc:
                raise CandidateError(f"pruning unit {name!r} by {ratio} failed: {type(exc).__name__}: {exc}") from exc
            changed = True
        groups = None  # the dependency graph holds references into `work`; drop it

    # ---- low-rank
    for name, fraction in rank_map.items():
        new = _factorize(work.get_submodule(name), fraction)
        if new is not None:
            _set_submodule(work, name, new)
            changed = True

    # ---- check shapes
    work.eval()
    with torch.no_grad():
        try:
            new_shapes = _shapes(work(*inputs))
        except Exception as exc:
            raise CandidateError(f"the changed model fails to run: {type(exc).__name__}: {exc}") from exc
    if new_shapes != ref_shapes:
        raise CandidateError(f"the changed model returns shapes {new_shapes}, the original {ref_shapes}")

    # ---- recover
    if changed and recalibrate_bn and batches and not _recalibrate_bn(work, batches):
        # no BatchNorm left (folded into the convs, as in every exported ONNX CNN): the same on the convs
        _recalibrate_folded(work, copy.deepcopy(model).eval() if model.training else model, batches)
    if reconstruct is None:
        reconstruct = distill_steps == 0
    if changed and reconstruct and batches:
        _reconstruct(work, copy.deepcopy(model).eval() if model.training else model, batches)
    if distill_steps > 0:
        teacher = copy.deepcopy(model).eval()
        if distill_hidden is None:
            distill_hidden = bool(blocks)
        hidden = _matching_blocks(work, teacher, [b.path for b in blocks], batches[0]) if distill_hidden else []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _distill(work, teacher, batches, steps=distill_steps, lr=float(distill_lr), hidden=hidden)
        del teacher
    work.eval()
    return work
