"""Import: turn what the user hands over into a float ONNX file the search builds from.

A PyTorch module is exported with the TorchScript-based exporter
(``dynamo=False``): on torch 2.13 it is ~18x faster than the dynamo exporter
(0.2 s vs 3.6 s for the digits CNN, which matters when every trial re-exports
a pruned model), its node names carry the module path (``/layer1.0/conv1/Conv``)
so ONNX nodes map back to layers, and ONNX Runtime's quantization
pre-processing handles its graphs (it fails on dynamo-exported transformers).
If that exporter is unavailable or fails, the dynamo exporter is tried.

The source model is never modified: every candidate is built from a copy.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from autosearch.errors import CandidateError, ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["PROTO_LIMIT", "SourceModel", "export_onnx", "external_data_bytes", "import_model", "load_onnx", "normalize_onnx", "opset_of", "upgrade_opset"]

_OPSET = 17


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX file, with errors that say what is wrong.

    Raises:
        ConfigError: the file is missing, is not ONNX, or fails ONNX's checker.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model file {str(p)!r} does not exist: pass the path of an .onnx file")
    if p.is_dir():
        raise ConfigError(f"model path {str(p)!r} is a directory without saved_model.pb: pass the path of an .onnx file "
                          "(or of a TensorFlow SavedModel folder)")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, ValueError, ... on bad bytes
        raise ConfigError(
            f"{str(p)!r} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "export your model with torch.onnx.export or pass the nn.Module itself"
        ) from None
    if len(model.graph.node) == 0:
        raise ConfigError(f"{str(p)!r} holds no ONNX graph (0 nodes): is it really an .onnx file?")
    if p.stat().st_size + external_data_bytes(model) > PROTO_LIMIT:
        # over protobuf's 2 GB the proto cannot be serialized whole: check the file by path (ONNX's checker reads
        # the external data itself) and keep the weights in their external files
        _check(str(p), repr(str(p)))
        return model
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:  # noqa: BLE001 - a missing or short external-data file: a ConfigError naming it
        raise ConfigError(f"{str(p)!r}: its external data cannot be read ({type(exc).__name__}: {exc}); keep the data "
                          "file(s) next to the .onnx under the names the model gives") from None
    _check(model, repr(str(p)))
    return model


PROTO_LIMIT = onnx.checker.MAXIMUM_PROTOBUF  # bytes: a model with more is checked by path, its weights kept external


def external_data_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's tensors that are stored in external files (by the lengths the model records)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            if "length" in info and info["length"].isdigit():
                total += int(info["length"])
            else:
                total += int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def _check(model: onnx.ModelProto | str, what: str) -> None:
    """``onnx.checker`` on a proto, or on a file by path (a model over 2 GB with external data)."""
    try:
        onnx.checker.check_model(model)
    except ValueError as exc:
        if "2GB" not in str(exc) and "2 GB" not in str(exc):
            raise ConfigError(f"{what} fails onnx.checker: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - ValidationError and others from the checker: a ConfigError with its message
        raise ConfigError(f"{what} fails onnx.checker: {str(exc)[:600]}") from None


_FLOAT_ELEMS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def normalize_onnx(model: onnx.ModelProto, *, fold: bool = True) -> tuple[onnx.ModelProto, list[str]]:
    """What real exporters write, made into what the quantizers and the search expect.

    - Floating-point ``Constant`` nodes of the main graph (old exporters keep every weight in
      one) become initializers: ONNX Runtime's quantizers only take weights that are initializers.
    - ``Conv`` -> ``BatchNormalization`` pairs are folded (``fold``; see :func:`_fold_batchnorm`).
    - Nodes without a name (or with a repeated one) get one: the quantizers address nodes by name.
    - ``dim_value`` of ``-1`` or ``0`` on a graph input or output (a common spelling of a free
      dimension) becomes a named free dimension.

    Returns a normalised copy and one note per kind of change (empty when nothing changed).
    The opset is left as it is; :func:`upgrade_opset` raises it when a setting needs it.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    notes: list[str] = []
    g = out.graph
    moved = 0
    keep: list[onnx.NodeProto] = []
    outputs = {o.name for o in g.output}
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1 \
                and node.output[0] not in outputs:
            attr = {a.name: a for a in node.attribute}
            if "value" in attr and attr["value"].t.data_type in _FLOAT_ELEMS:
                t = onnx.TensorProto()
                t.CopyFrom(attr["value"].t)
                t.name = node.output[0]
                g.initializer.append(t)
                moved += 1
                continue
        keep.append(node)
    if moved:
        g.ClearField("node")
        g.node.extend(keep)
        notes.append(f"moved {moved} floating-point Constant node(s) to initializers (weights kept in Constant nodes)")
    folded = _fold_batchnorm(out) if fold else None
    if folded is not None:
        out, n_bn = folded
        g = out.graph
        notes.append(f"folded {n_bn} BatchNormalization node(s) into the Conv before each")
    seen: set[str] = set()
    renamed = 0
    for k, node in enumerate(g.node):  # the quantizers address nodes by name: every node gets a unique one
        if not node.name or node.name in seen:
            base = node.name or f"{node.op_type}_{k}"
            name, j = base, 0
            while name in seen:
                j += 1
                name = f"{base}_{j}"
            node.name = name
            renamed += 1
        seen.add(node.name)
    if renamed:
        notes.append(f"named {renamed} node(s) that had no (or a repeated) name")
    fixed = 0
    for vi in list(g.input) + list(g.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.Clear()
                d.dim_param = f"{vi.name}_dim{k}"
                fixed += 1
    if fixed:
        notes.append(f"{fixed} input/output dimension(s) written as -1 or 0 taken as free dimensions")
    return out, notes


def _fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int] | None:
    """Conv -> BatchNormalization pairs folded into the Conv's weight and bias (in place on ``model``).

    ONNX Runtime fuses them when it runs the float model, but not once the Conv is wrapped in
    Q/DQ nodes: an unfolded BatchNormalization (Paddle and training-mode exports keep them) then
    runs in float between int8 layers and makes the int8 model slower than the float one.
    ``W' = W * s``, ``b' = (b - mean) * s + B`` with ``s = scale / sqrt(var + eps)``, per output
    channel. (``onnxoptimizer``'s ``fuse_bn_into_conv`` writes that arithmetic as graph nodes for a
    Conv without bias, so the weight is no longer a constant the quantizers can take.) Only pairs
    whose Conv output feeds the BatchNormalization alone and whose parameters are float32
    initializers are folded. ``None`` when nothing was folded.
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    drop: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    for k, bn in enumerate(g.node):
        if bn.op_type != "BatchNormalization" or len(bn.input) < 5 or len(bn.output) != 1 and any(bn.output[1:]):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or attrs.get("training_mode", 0) or uses.get(bn.input[0], 0) != 1 \
                or bn.input[0] in outputs or len(conv.input) < 2:
            continue
        names = [conv.input[1], *(conv.input[2:3] if len(conv.input) > 2 and conv.input[2] else []), *bn.input[1:5]]
        if any(n not in inits or inits[n].data_type != onnx.TensorProto.FLOAT for n in names):
            continue
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
            else np.zeros(w.shape[0])
        scale, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        if scale.shape != (w.shape[0],):
            continue
        factor = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        w_name, b_name = f"{conv.input[1]}__bn_{k}", f"{conv.name}__bn_bias_{k}"
        new_inits.append(numpy_helper.from_array((w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32), w_name))
        new_inits.append(numpy_helper.from_array(((b - mean) * factor + beta).astype(np.float32), b_name))
        x = conv.input[0]
        del conv.input[:]
        conv.input.extend([x, w_name, b_name])
        conv.output[0] = bn.output[0]
        drop.add(k)
    if not drop:
        return None
    kept = [n for k, n in enumerate(g.node) if k not in drop]
    g.ClearField("node")
    g.node.extend(kept)
    g.initializer.extend(new_inits)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    still = [t for t in g.initializer if t.name in used]
    g.ClearField("initializer")
    g.initializer.extend(still)
    return model, len(drop)


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """``model`` at opset ``version`` or higher (unchanged when already there), by ``onnx.version_converter``.

    Per-channel QDQ needs opset 13 (the ``axis`` of ``DequantizeLinear``); old exporters write 9-12.

    Raises:
        CandidateError: the converter cannot upgrade this graph (the message names the op).
    """
    have = opset_of(model)
    if have >= version:
        return model
    from onnx import version_converter

    try:
        up = version_converter.convert_version(model, version)
        onnx.checker.check_model(up)
    except Exception as exc:  # noqa: BLE001 - the converter fails in many ways: the candidate fails with the reason
        raise CandidateError(
            f"this setting needs opset {version} and onnx.version_converter could not upgrade the model from opset "
            f"{have}: {type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    return up


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    import torch

    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, Sequence) or not example_inputs:
        raise ConfigError(
            "example_inputs must be a tensor or a tuple of tensors shaped like one batch of model input, "
            f"got {type(example_inputs).__name__}"
        )
    return tuple(torch.as_tensor(x) for x in example_inputs)


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = _OPSET,
) -> Path:
    """Export a module to ONNX (TorchScript exporter, dynamo as fallback).

    Args:
        module: The model; exported in eval mode, not modified.
        example_inputs: One batch of inputs (tensor or tuple of tensors).
        path: Where to write the ``.onnx`` file.
        input_names: Graph input names (default ``input``, ``input_1``, ...).
        output_names: Graph output names (default ``output``, ``output_1``, ...).
        dynamic_batch: Make dimension 0 of every input and output symbolic.
        opset: ONNX opset.

    Raises:
        CandidateError: both exporters failed.
    """
    import torch

    inputs = _as_tuple(example_inputs)
    in_names = list(input_names or [f"input{'' if i == 0 else f'_{i}'}" for i in range(len(inputs))])
    with torch.no_grad():
        outs = module(*inputs)
    n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
    out_names = list(output_names or [f"output{'' if i == 0 else f'_{i}'}" for i in range(n_out)])
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    errors: list[str] = []
    try:
        for dynamo in (False, True):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        module,
                        inputs,
                        str(path),
                        input_names=in_names,
                        output_names=out_names,
                        opset_version=opset if not dynamo else max(opset, 18),
                        dynamic_axes=axes,
                        do_constant_folding=True,
                        dynamo=dynamo,
                        external_data=not dynamo,  # dynamo: weights inside the .onnx; True is the default (and unused) otherwise
                    )
                return path
            except Exception as exc:  # noqa: BLE001 - exporter failures are many and varied; each is reported
                errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(exc).__name__}: {exc}")
    finally:
        module.train(was_training)
    raise CandidateError("ONNX export failed. " + " | ".join(e[:500] for e in errors))


def _fingerprint(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]


@dataclass
class SourceModel:
    """The model under search, as ONNX (and as a torch module when given one).

    Attributes:
        onnx_model: The float ONNX graph every candidate starts from.
        example_feed: One batch of input, by input name, at the shape latency is measured with.
        torch_module: A private copy of the user's module, or ``None`` for ONNX-only models.
        torch_example: The example inputs as tensors (torch models only).
        fingerprint: Content hash of the float ONNX; a resumed study must match it.
        origin: ``"torch"`` or ``"onnx"``: where the units' names come from (module paths or node names).
        convert_onnx: For an ONNX model: whether it may be converted to a torch module (``onnx2torch``)
            when a knob needs one (pruning and its recovery); see :attr:`trainable`.
        converted: The conversion (:class:`autosearch.transforms.onnx_torch.ConvertedOnnx`), once made.
    """

    onnx_model: onnx.ModelProto
    example_feed: dict[str, np.ndarray]
    torch_module: Any = None
    torch_example: tuple[Any, ...] | None = None
    fingerprint: str = ""
    origin: str = "onnx"
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    batchable: bool = False
    convert_onnx: bool = True
    converted: Any = field(default=None, repr=False)
    _upgraded: dict[int, onnx.ModelProto] = field(default_factory=dict, repr=False)
    _not_trainable: str | None = field(default=None, repr=False)

    @property
    def trainable(self) -> bool:
        """Whether there is a torch module to prune and train (:attr:`torch_module`).

        A torch model always; an ONNX model once converted with ``onnx2torch`` and checked
        against ONNX Runtime, done here the first time it is asked (``convert_onnx=False`` skips
        it). :attr:`not_trainable_reason` says why not.
        """
        if self.torch_module is not None:
            return True
        if self.origin != "onnx" or self._not_trainable is not None:
            return False
        if not self.convert_onnx:
            self._not_trainable = "conversion of the ONNX model to PyTorch is turned off (convert_onnx=False)"
            return False
        from autosearch.transforms.onnx_torch import convert_onnx

        conv, why = convert_onnx(self.onnx_model, self.example_feed, self.input_names)
        if conv is None:
            self._not_trainable = why or "the ONNX model could not be converted to PyTorch"
            return False
        self.converted, self.torch_module, self.torch_example = conv, conv.module, conv.example
        return True

    @property
    def not_trainable_reason(self) -> str | None:
        """Why :attr:`trainable` is false (``None`` when it is true or was not asked yet)."""
        return None if self.torch_module is not None else self._not_trainable

    def input_batch_fixed(self) -> int | None:
        """The fixed batch size of the first input, or ``None`` when it is symbolic."""
        dims = self.onnx_model.graph.input[0].type.tensor_type.shape.dim if self.onnx_model.graph.input else []
        if not dims:
            return 1
        dim0 = dims[0]
        return dim0.dim_value if dim0.HasField("dim_value") and dim0.dim_value > 0 else None

    def at_opset(self, version: int) -> onnx.ModelProto:
        """The float model at opset ``version`` or higher (converted once, then kept)."""
        if opset_of(self.onnx_model) >= version:
            return self.onnx_model
        if version not in self._upgraded:
            self._upgraded[version] = upgrade_opset(self.onnx_model, version)
        return self._upgraded[version]

    def save(self, path: str | Path) -> Path:
        """Write the float ONNX to ``path`` (atomically: workers sharing a study folder each save the baseline)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        onnx.save(self.onnx_model, str(tmp))
        os.replace(tmp, p)
        return p


_NP_TYPES: dict[int, type[np.generic]] = {  # keyed by the int elem_type of a TypeProto.Tensor
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.BOOL: np.bool_,
}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def check_feed(model: onnx.ModelProto, feed: dict[str, np.ndarray], *, what: str = "input") -> None:
    """Check names, dtypes and static dimensions of ``feed`` against the graph's inputs.

    Raises:
        ConfigError: naming the input, the expected and the given shape or type.
    """
    inputs = graph_inputs(model)
    expected = [i.name for i in inputs]
    if sorted(feed) != sorted(expected):
        raise ConfigError(f"{what} names {sorted(feed)} do not match the model's inputs {expected}")
    for vi in inputs:
        arr = feed[vi.name]
        tt = vi.type.tensor_type
        want = _NP_TYPES.get(tt.elem_type)
        if want is not None and arr.dtype != want:
            raise ConfigError(
                f"{what} {vi.name!r} has dtype {arr.dtype}, the model expects {np.dtype(want).name}: "
                f"convert it with .astype(np.{np.dtype(want).name})"
            )
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        bad = len(dims) != arr.ndim or any(d is not None and d != s for d, s in zip(dims, arr.shape))
        if bad:
            shown = ["?" if d is None else d for d in dims]
            raise ConfigError(
                f"{what} {vi.name!r} has shape {list(arr.shape)}, the model expects {shown} "
                "('?' is free): reshape the data or pass matching example inputs"
            )


def import_model(model: Any, example_inputs: Any = None, *, workdir: str | Path | None = None,
                 convert_onnx: bool = True) -> SourceModel:
    """Import a ``torch.nn.Module`` (with example inputs), an ONNX path/ModelProto, or a Keras / TensorFlow model.

    Args:
        model: ``nn.Module``, path to an ``.onnx`` file, an ``onnx.ModelProto`` (a :class:`SourceModel` is
            returned as it is), or (with the ``[tensorflow]`` extra) a ``keras.Model``, a ``.keras``/``.h5`` file
            or a SavedModel folder, converted to ONNX by :mod:`autosearch.keras_import` and checked against
            TensorFlow first.
        example_inputs: One batch of input; required for modules, optional for ONNX and Keras
            (random data of the graph's static shape is used, batch 1 where symbolic).
        workdir: Unused today; reserved for external-data models.
        convert_onnx: An ONNX model may be converted to PyTorch (``onnx2torch``) when pruning
            needs it (:attr:`SourceModel.trainable`); ``False`` keeps it ONNX-only.

    Raises:
        ConfigError: missing/unreadable file, missing example inputs, shape mismatch.
    """
    del workdir
    if isinstance(model, SourceModel):
        return model
    from autosearch.keras_import import is_keras_source

    converted_notes: list[str] = []
    if is_keras_source(model):  # Keras / TensorFlow: converted to ONNX (parity-checked), then imported as ONNX
        from autosearch.keras_import import keras_to_onnx

        conv = keras_to_onnx(model, example_inputs)
        model, example_inputs, converted_notes = conv.model, conv.feed, conv.notes
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ConfigError(
                "a torch model needs example_inputs: pass one batch of input, e.g. torch.randn(1, 3, 32, 32)"
            )
        names: list[str] | None = None
        if isinstance(example_inputs, Mapping):  # named inputs: the keys become the graph's input names
            names = [str(k) for k in example_inputs]
            example_inputs = tuple(example_inputs.values())
        inputs = _as_tuple(example_inputs)
        module = copy.deepcopy(model).eval()
        try:
            with torch.no_grad():
                module(*inputs)
        except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises: a ConfigError with the shapes
            shapes = [tuple(t.shape) for t in inputs]
            raise ConfigError(f"the model does not run on example_inputs of shapes {shapes}: {exc}") from None
        buf_path = Path(_tmpdir()) / f"export_{id(module)}.onnx"
        export_onnx(module, inputs, buf_path, input_names=names)
        proto = onnx.load(str(buf_path))
        buf_path.unlink(missing_ok=True)
        feed = {vi.name: t.numpy() for vi, t in zip(graph_inputs(proto), inputs)}
        src = SourceModel(proto, feed, module, inputs, origin="torch")
    else:
        if isinstance(model, onnx.ModelProto):
            proto = model
            _check(proto, "the ONNX model")
            what = "the ONNX model"
        elif isinstance(model, (str, Path)):
            proto = load_onnx(model)
            what = repr(str(model))
        else:
            raise ConfigError(
                "model must be a torch.nn.Module, an .onnx path, an onnx.ModelProto or a Keras model (.keras/.h5 file, "
                f"SavedModel folder), got {type(model).__name__}"
            )
        _refuse_float16(proto, what)
        original = proto
        proto, notes = normalize_onnx(proto)
        if not graph_inputs(proto):
            raise ConfigError(f"{what} has no graph input (every input is an initializer): there is nothing to feed it")
        if example_inputs is None:
            feed = random_feed(proto)
        elif isinstance(example_inputs, Mapping):
            feed = {k: np.asarray(v) for k, v in example_inputs.items()}
        elif isinstance(example_inputs, Sequence) and example_inputs and isinstance(example_inputs[0], Mapping):
            feed = {k: np.asarray(v) for k, v in example_inputs[0].items()}  # a list of feeds: the first one
        else:
            arrays = [np.asarray(getattr(x, "numpy", lambda x=x: x)()) for x in _as_tuple_np(example_inputs)]
            feed = {vi.name: a for vi, a in zip(graph_inputs(proto), arrays)}
        check_feed(proto, feed, what="example input")
        if any(n.startswith("folded") for n in notes):
            proto, notes = _keep_if_equal(original, proto, notes, feed)
        src = SourceModel(proto, feed, origin="onnx", notes=converted_notes + notes, convert_onnx=convert_onnx)
    src.fingerprint = _fingerprint(src.onnx_model)
    src.input_names = [i.name for i in graph_inputs(src.onnx_model)]
    src.output_names = [o.name for o in src.onnx_model.graph.output]
    src.batchable = _batchable(src)
    return src


def _refuse_float16(model: onnx.ModelProto, what: str) -> None:
    """A float16 model is refused: the quantizers, the sensitivity estimate and the low-rank edits take float32 weights.

    Raises:
        ConfigError: naming what is float16 and what to pass instead.
    """
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    ios = [vi.name for vi in [*graph_inputs(model), *model.graph.output] if vi.type.tensor_type.elem_type in half]
    weights = sum(t.data_type in half for t in model.graph.initializer)
    if not ios and not weights:
        return
    parts = ([f"input/output(s) {ios}"] if ios else []) + ([f"{weights} weight(s)"] if weights else [])
    raise ConfigError(
        f"{what} is a float16 model ({' and '.join(parts)} in float16): AutoSearch searches from the float32 model "
        "(ONNX Runtime's quantizers take float32): pass the float32 .onnx it was made from (before "
        "onnxconverter_common's convert_float_to_float16, or the like), or export it in float32 (torch: model.float() "
        "before torch.onnx.export)")


def _keep_if_equal(original: onnx.ModelProto, proto: onnx.ModelProto, notes: list[str],
                   feed: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str]]:
    """The normalised model if it computes what the original does on ``feed``, else the original
    made to import without the rewrites that changed values (said in the notes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        a = ort.InferenceSession(original.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)
        b = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)
        same = all(np.allclose(x, y, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(x).max()) if np.size(x) else 1.0))
                   for x, y in zip(a, b) if np.issubdtype(np.asarray(x).dtype, np.floating))
    except Exception:  # noqa: BLE001 - a model ORT cannot run or compare is not "the same": take the other path
        same = False
    if same:
        return proto, notes
    redo = onnx.ModelProto()
    redo.CopyFrom(original)
    plain, plain_notes = normalize_onnx(redo, fold=False)
    return plain, [*plain_notes, "BatchNormalization left unfolded: the folded model's outputs differed"]


def _batchable(src: SourceModel) -> bool:
    """Whether calibration may join samples on axis 0 (checked by running the float model)."""
    import onnxruntime as ort

    from autosearch.feeds import can_batch

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(src.onnx_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT's load errors (Fail, InvalidGraph, ...): a ConfigError with the message
        raise ConfigError(ort_load_error(exc, src.onnx_model)) from None
    try:
        sess.run(None, src.example_feed)
    except Exception as exc:  # noqa: BLE001 - ORT's run errors: a ConfigError naming the example input
        raise ConfigError(
            f"ONNX Runtime fails on the example input ({', '.join(f'{k}: {list(v.shape)} {v.dtype}' for k, v in src.example_feed.items())}): "
            f"{str(exc)[:400]}; pass example_inputs (a dict by input name) the model runs on"
        ) from None
    return can_batch(sess, [src.example_feed])


def ort_load_error(exc: BaseException, model: onnx.ModelProto) -> str:
    """ONNX Runtime's refusal of a model as one line; an op it cannot run is named with its domain and node."""
    import re

    import onnxruntime as ort

    text = " ".join(str(exc).split())
    where = f"ONNX Runtime {ort.__version__} (CPUExecutionProvider)"
    m = re.search(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'", text)
    if m:
        op, version, node = m.groups()
        dom = next((n.domain for n in model.graph.node if n.name == node), "") or "ai.onnx"
        return (f"the model uses op {op} (domain {dom}, opset {version}, node {node!r}), which {where} has no kernel for "
                "with these input types: replace the op or cast its inputs to a type ONNX Runtime implements it for "
                "(float32 usually), or export the model at another opset")
    m = re.search(r"(?:Fatal error: )?([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op", text)
    if m:
        dom, op, _ = m.groups()
        node = next((n.name for n in model.graph.node if n.op_type == op and (n.domain or "ai.onnx") == (dom or "ai.onnx")), "")
        return (f"the model uses op {op} of domain {dom or 'ai.onnx'!r}" + (f" (node {node!r})" if node else "")
                + f", which {where} does not know (a custom op): replace it with standard ONNX ops before searching")
    m = re.search(r"No opset import for domain '([^']*)'", text)
    if m:
        return (f"the model uses domain {m.group(1)!r} without an opset import for it, so {where} cannot load it: "
                "add the domain to the model's opset_import or replace its ops")
    return f"ONNX Runtime cannot load the model: {text[:500]}"


def _as_tuple_np(x: Any) -> tuple[Any, ...]:
    if isinstance(x, (list, tuple)):
        return tuple(x)
    return (x,)


RANDOM_FEED_BYTES = 1 << 30  # the largest input random_feed allocates (a 1e9 declared dimension is a model's mistake)


def random_feed(model: onnx.ModelProto, *, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random input for every graph input; symbolic dimensions become ``batch`` (dim 0) or 1."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if k == 0 else 1)
            for k, d in enumerate(tt.shape.dim)
        ]
        dtype = _NP_TYPES.get(tt.elem_type, np.float32)
        size = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        if size > RANDOM_FEED_BYTES:
            k = int(np.argmax(shape))
            raise ConfigError(
                f"model input {vi.name!r} declares shape {shape} (dimension {k} is {shape[k]}): one random sample of it "
                f"would take {size / 2**30:.1f} GiB: pass an example input (example_inputs=, or --data with 'x'), or fix "
                "the dimension in the model (a free dimension is a name, e.g. 'seq')")
        if np.issubdtype(dtype, np.integer):
            feed[vi.name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feed[vi.name] = np.ones(shape, dtype=np.bool_)
        else:
            feed[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def _tmpdir() -> str:
    import tempfile

    return tempfile.gettempdir()

