"""Build a candidate: prune -> low-rank -> recover -> export ONNX -> quantize.

Structural changes (pruning, low-rank) are made on a copy of the torch module
and re-exported; ONNX-only models get low-rank on the graph itself, and their
pruning is made on the module converted from the graph
(:mod:`autosearch.transforms.onnx_torch`) and written back into the graph.
Quantization is ONNX Runtime's own quantizer: static QDQ with calibration
(``quantize_static``) or dynamic (``quantize_dynamic``); per-unit precision is
set by excluding float units' nodes and, for 16 bits (and 4-bit convs), by the
quantizer's per-tensor overrides. 4-bit MatMul/Gemm units are weight-only int4
through ORT's ``MatMulNBitsQuantizer`` (the ``MatMulNBits`` contrib op), run
after the 8/16-bit pass. Nothing here re-implements what the quantizers do.

Any failure of the libraries doing the work (exporter, quantizer, ORT) is a
:class:`~autosearch.errors.CandidateError`: the trial fails with the reason
and the search goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from autosearch.analysis import node_unit_map, op_groups
from autosearch.candidate import Candidate
from autosearch.config import QuantSetting, RecoverySetting
from autosearch.errors import CandidateError, ConfigError
from autosearch.model import SourceModel, export_onnx, opset_of, upgrade_opset

__all__ = ["BuildResult", "BuildState", "build_candidate", "quantize_model"]

_log = logging.getLogger("autosearch")


@dataclass
class BuildResult:
    """What a build produced."""

    path: Path
    seconds: float
    notes: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)


class _Reader:
    """ORT ``CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def batch_feeds(feeds: Sequence[dict[str, np.ndarray]], batch: int) -> list[dict[str, np.ndarray]]:
    """Concatenate single-sample feeds into batches (only for models that batch on axis 0:
    :attr:`SourceModel.batchable`); ``batch`` 1 keeps one feed per sample."""
    if batch <= 1:
        return list(feeds)
    out = []
    for i in range(0, len(feeds), batch):
        chunk = feeds[i : i + batch]
        if all(f.keys() == chunk[0].keys() and all(np.shape(f[k])[1:] == np.shape(chunk[0][k])[1:] for k in f) for f in chunk):
            out.append({k: np.concatenate([f[k] for f in chunk]) for k in chunk[0]})
        else:  # samples that do not stack stay one by one (the quantizer then says what it makes of them)
            out.extend(chunk)
    return out


CALIBRATION_MEMORY = 1 << 30  # bytes of activations one calibration batch may hold


def calibration_batch(source: SourceModel, *, memory: int = CALIBRATION_MEMORY, largest: int = 32) -> int:
    """Samples per calibration batch: 1 where the model does not batch on axis 0, else as many as
    keep one batch's activations under ``memory`` (at most ``largest``).

    The activations of one sample are the summed sizes of every intermediate tensor of the float
    model on the example input (measured once: :func:`activation_bytes`). A 640x640 detector at
    batch 32 held 13.7 GB during calibration; bounded, it calibrates in about a gigabyte.
    """
    if not source.batchable:
        return 1
    per = activation_bytes(source)
    return max(1, min(largest, memory // max(per, 1)))


def activation_bytes(source: SourceModel) -> int:
    """Bytes of every intermediate float tensor of one sample (the example input), measured by
    running the float model with each tensor exposed as an output; cached on ``source``."""
    cached = getattr(source, "_activation_bytes", None)
    if cached is not None:
        return int(cached)
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(source.onnx_model)
    known = {o.name for o in model.graph.output}
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in known and out not in inits and node.op_type not in ("Constant", "Shape"):
                model.graph.output.append(onnx.ValueInfoProto(name=out))
                known.add(out)
    total = 0
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, source.example_feed)
        total = sum(int(np.asarray(o).nbytes) for o in outs if isinstance(o, np.ndarray))
        rows = max(1, min((len(v) for v in source.example_feed.values() if np.ndim(v)), default=1))
        total //= rows
    except Exception:  # noqa: BLE001 - too large to serialize, or an output ORT cannot expose: assume the input x 100
        total = 100 * sum(int(np.asarray(v).nbytes) for v in source.example_feed.values())
    source._activation_bytes = total  # type: ignore[attr-defined]
    return total


def even_batches(feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Re-split batched feeds into batches of one size (the largest divisor of the sample count
    that is no larger than the largest batch given).

    ORT's histogram calibrators (entropy, percentile) stack every batch's activations into one
    array and fail on a short last batch ("inhomogeneous shape").
    """
    sizes = {len(next(iter(f.values()))) for f in feeds}
    if len(sizes) <= 1:
        return list(feeds)
    joined = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    total = len(next(iter(joined.values())))
    size = max(d for d in range(1, max(sizes) + 1) if total % d == 0)
    return [{k: v[i : i + size] for k, v in joined.items()} for i in range(0, total, size)]


def quantize_model(
    model: onnx.ModelProto,
    out_path: Path,
    *,
    bits: dict[str, int],
    unit_of_node: dict[str, str],
    options: QuantSetting | Mapping[str, Any],
    calibration: Sequence[dict[str, np.ndarray]],
    notes: list[str] | None = None,
) -> Path:
    """Quantize ``model`` with ONNX Runtime's quantizer, per-unit precision.

    Args:
        model: Float model.
        out_path: Where the quantized model goes.
        bits: Unit -> bits (32 float, 16, 8, 4).
        unit_of_node: Quantizable node name -> unit (nodes not in it stay float).
        options: The quantization setting (:class:`~autosearch.config.QuantSetting` or its mapping).
        calibration: Feeds for static calibration.

    Raises:
        CandidateError: the quantizer or pre-processing failed.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = notes if notes is not None else []
    q = options if isinstance(options, QuantSetting) else QuantSetting.of(options)
    work = Path(tempfile.mkdtemp(prefix="as_q_"))
    # the quantizer logs "consider pre-processing" through the root logger on every call, and its
    # calibration sessions print ONNX Runtime's warnings (a wrongly declared output shape: one per sample)
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        src = work / "float.onnx"
        onnx.save(model, str(src))
        # units are tracked by weight initializer as well as by node name: pre-processing
        # fuses nodes (MatMul+Add -> Gemm under a new name) but keeps the weight tensor
        unit_of_weight = {n.input[1]: unit_of_node[n.name] for n in model.graph.node if n.name in unit_of_node and len(n.input) > 1}
        if q.preprocess:
            pre = work / "pre.onnx"
            # symbolic shape inference first; it fails on most real models, so retry without. It leaves
            # temporary files in the working directory when it fails: run it inside the work folder
            with _cwd(work):
                try:
                    quant_pre_process(str(src), str(pre))
                except Exception:  # noqa: BLE001 - symbolic shape inference fails in many ways; the retry skips it
                    try:
                        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
                    except Exception as exc:
                        raise CandidateError(f"quant_pre_process failed (also with skip_symbolic_shape=True): "
                                             f"{type(exc).__name__}: {str(exc)[:400]}") from exc
            src = pre
        graph = onnx.load(str(src))
        node_unit: dict[str, str] = {}
        for n in graph.graph.node:
            if n.name in unit_of_node:
                node_unit[n.name] = unit_of_node[n.name]
            elif n.op_type in ("Conv", "MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in unit_of_weight:
                node_unit[n.name] = unit_of_weight[n.input[1]]
        unit_of_node = node_unit
        quant_nodes = [n for n in graph.graph.node if n.name in unit_of_node]
        # 4-bit MatMul/Gemm with a constant weight: weight-only int4 (MatMulNBits) after the int8 pass
        nbits = [n.name for n in quant_nodes if bits.get(unit_of_node[n.name], 32) == 4 and _nbits_able(graph, n)]
        exclude = [n.name for n in quant_nodes if bits.get(unit_of_node[n.name], 32) == 32 or n.name in nbits]
        quantized = [n.name for n in quant_nodes if bits.get(unit_of_node[n.name], 32) != 32 and n.name not in nbits]
        # non-weighted nodes follow their unit (a float unit keeps its activation ops float);
        # post-processing after the last weighted layer is a unit of its own (post:<output>)
        mode = q.mode
        groups = op_groups(graph, unit_of_node) if scope_all(q, mode) else {}
        # (followers of a weight-only int4 unit stay float: its activations are)
        float_ops = [n for n, u in groups.items() if bits.get(u, 32) not in (8, 16)]
        quant_ops = [n for n, u in groups.items() if bits.get(u, 32) in (8, 16)]
        if not quantized and not nbits and not quant_ops:
            low = sorted(u for u, b in bits.items() if b != 32)
            why = (" (post: units hold no weight: only static quantization with op_scope 'all' quantizes them)"
                   if low and all(u.startswith("post:") for u in low) and not scope_all(q, q.mode) else "")
            raise CandidateError(f"no node of the units set to quantize ({', '.join(low[:5])}) was found in the graph{why}")
        if not quantized and not quant_ops:
            onnx.save(graph, str(out_path))
            _int4_weight_only(out_path, nbits, q)
            notes.append(f"int4 weight-only (MatMulNBits) on {len(nbits)} node(s), the rest float")
            return out_path
        weight_of = {n.name: n.input[1] for n in quant_nodes if len(n.input) > 1}
        overrides: dict[str, list[dict[str, Any]]] = {}
        for name in quantized:
            b = bits[unit_of_node[name]]
            if b in (16, 4):
                qt = {16: QuantType.QInt16, 4: QuantType.QInt4}[b]
                overrides[weight_of[name]] = [{"quant_type": qt}]
        if mode == "dynamic":
            if overrides:
                raise CandidateError("16/4-bit units need static quantization (mode: static)")
            try:
                quantize_dynamic(
                    str(src),
                    str(out_path),
                    per_channel=q.per_channel_in(mode),
                    reduce_range=q.reduce_range,
                    weight_type=QuantType.QInt8,
                    # the dynamic quantizer rewrites every Gemm as "<name>_MatMul" + "<name>_Add" first
                    nodes_to_exclude=[x for n in graph.graph.node if n.name and n.name not in quantized
                                      for x in ((n.name, f"{n.name}_MatMul") if n.op_type == "Gemm" else (n.name,))],
                    extra_options={"MatMulConstBOnly": True},
                )
            except Exception as exc:
                raise CandidateError(f"quantize_dynamic failed: {type(exc).__name__}: {str(exc)[:400]}") from exc
        else:
            act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[q.activation_type]
            method = {
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[q.calibrate_method]
            if method != CalibrationMethod.MinMax:
                calibration = even_batches(calibration)
            extra: dict[str, Any] = {}
            if overrides:
                extra["TensorQuantOverrides"] = overrides
            scope = q.op_scope
            op_types = None
            if scope == "weighted":
                # only the layers' own weighted ops: activations between them stay float
                op_types = ["Conv", "MatMul", "Gemm"]
            else:
                # the quantizer's defaults, but never a Softmax or the Add that feeds one: an
                # additive attention mask holds float32 min and calibrating it collapses every score
                exclude = exclude + float_ops + [n for n in _softmax_guard(graph) if n not in float_ops]
            try:
                quantize_static(
                    str(src),
                    str(out_path),
                    _Reader(calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=q.per_channel_in(mode),
                    reduce_range=q.reduce_range,
                    activation_type=act,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude,
                    op_types_to_quantize=op_types,
                    calibrate_method=method,
                    extra_options=extra,
                )
            except Exception as exc:
                raise CandidateError(f"quantize_static failed: {type(exc).__name__}: {str(exc)[:400]}") from exc
        if nbits:
            _int4_weight_only(out_path, nbits, q)
            notes.append(f"int4 weight-only (MatMulNBits) on {len(nbits)} node(s)")
        notes.append(f"quantized {len(quantized)} weighted node(s) and up to {len(quant_ops)} other, "
                     f"{len(exclude) - len(nbits)} kept float ({mode})")
        return out_path
    finally:
        logging.disable(logging.NOTSET)
        ort.set_default_logger_severity(2)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def scope_all(options: QuantSetting | Mapping[str, Any], mode: str) -> bool:
    """Whether non-weighted ops are quantized at all (static mode, ``op_scope: all``)."""
    q = options if isinstance(options, QuantSetting) else QuantSetting.of(options)
    return mode != "dynamic" and q.op_scope == "all"


def _nbits_able(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """Whether ORT's MatMulNBits quantizer can take ``node``: a MatMul, or a plain Gemm, with a constant 2-D weight."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return False
    weight = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
    if weight is None or len(weight.dims) != 2:
        return False
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return False
    return True


def _gemm_as_matmul(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Rewrite the named Gemm nodes as MatMul (+ Add of the bias): MatMulNBits only replaces MatMul."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    out: list[onnx.NodeProto] = []
    for n in nodes:
        if n.op_type != "Gemm" or n.name not in names:
            out.append(n)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        w = onnx.numpy_helper.to_array(inits[n.input[1]])
        if attrs.get("transB", 0):
            w = w.T
        w_name = f"{n.input[1]}__kn"
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        if len(n.input) > 2 and n.input[2]:
            mid = f"{n.output[0]}__mm"
            out.append(onnx.helper.make_node("MatMul", [n.input[0], w_name], [mid], name=n.name))
            out.append(onnx.helper.make_node("Add", [mid, n.input[2]], list(n.output), name=f"{n.name}__bias"))
        else:
            out.append(onnx.helper.make_node("MatMul", [n.input[0], w_name], list(n.output), name=n.name))
    model.graph.ClearField("node")
    model.graph.node.extend(out)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(keep)


def _int4_weight_only(path: Path, names: Sequence[str], q: QuantSetting) -> None:
    """Weight-only int4 of the named MatMul/Gemm nodes with ORT's ``MatMulNBitsQuantizer`` (in place)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(path))
    present = {n.name for n in model.graph.node}
    names = [n if n in present else f"{n}_MatMul" for n in names]  # Gemm rewritten by the dynamic quantizer
    try:
        _gemm_as_matmul(model, names)
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=q.int4_block_size,
            is_symmetric=True,
            accuracy_level=q.int4_accuracy_level or None,
            nodes_to_exclude=others,  # nodes_to_include does not restrict: every MatMul is taken otherwise
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
    except Exception as exc:
        raise CandidateError(f"MatMulNBits int4 quantization failed: {type(exc).__name__}: {str(exc)[:400]}") from exc


def _softmax_guard(model: onnx.ModelProto) -> list[str]:
    """Softmax nodes and the Add/Where/Mul nodes that feed them (attention masks)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out: list[str] = []
    for n in model.graph.node:
        if n.op_type != "Softmax":
            continue
        out.append(n.name)
        prev = producer.get(n.input[0])
        if prev is not None and prev.op_type in ("Add", "Where", "Mul", "Sub"):
            out.append(prev.name)
    return [o for o in out if o]


class BuildState:
    """A candidate on its way from the source model to ``model.onnx``; what knobs change in :meth:`Knob.apply`.

    Structural knobs queue edits of the PyTorch model (:meth:`structural`, :meth:`edit_module`); they are made
    on one copy, followed by the recovery the candidate asks for, and exported once, the first time a later
    knob reads :attr:`proto`. Graph knobs read and replace :attr:`proto`; a knob that writes the final file
    itself (precision: :meth:`quantize`) sets :attr:`written`.
    """

    def __init__(self, source: SourceModel, candidate: Candidate, out_dir: Path, *, units: Mapping[str, Sequence[str]],
                 calibration: Sequence[dict[str, np.ndarray]]) -> None:
        self.source = source
        self.candidate = candidate
        self.out_dir = out_dir
        self.units = units
        self.calibration = calibration
        self.notes: list[str] = []
        self.stages: dict[str, float] = {}
        self.written = False
        self._proto: onnx.ModelProto | None = None
        self._structural: dict[str, dict[str, Any]] = {}
        self._module_edits: list[Callable[[Any], Any]] = []

    @property
    def out(self) -> Path:
        return self.out_dir / "model.onnx"

    def structural(self, **edits: Mapping[str, Any]) -> None:
        """Queue edits of the built-in structural transform (``prune=``, ``rank=``:
        :func:`autosearch.transforms.structural.apply_structural`)."""
        if self._proto is not None:
            raise ConfigError("a structural knob was applied after the graph was exported: give it a lower 'order'")
        for k, v in edits.items():
            self._structural.setdefault(k, {}).update(v)

    def edit_module(self, fn: Callable[[Any], Any]) -> None:
        """Queue ``fn(module) -> module`` on the PyTorch copy (before the recovery and the export).

        For an ONNX model the copy is the module converted from the graph, and the edited weights are
        written back into the graph: an edit may change the layers' widths and values, not replace them."""
        if not self.source.trainable:
            raise ConfigError(f"this knob edits the PyTorch model, and this ONNX model has none: {self.source.not_trainable_reason}")
        self._module_edits.append(fn)

    def flush(self) -> None:
        """Make the queued PyTorch edits and export (once)."""
        if self._proto is not None or not (self._structural or self._module_edits):
            return
        t = time.perf_counter()
        self._proto = _structural(self.source, self.candidate.recovery, self._structural, self._module_edits,
                                  self.calibration, self.out_dir)
        self.stages["structural_s"] = self.stages.get("structural_s", 0.0) + time.perf_counter() - t

    @property
    def proto(self) -> onnx.ModelProto:
        """The candidate's ONNX graph so far (the source's until something changes it)."""
        self.flush()
        return self._proto if self._proto is not None else self.source.onnx_model

    @proto.setter
    def proto(self, model: onnx.ModelProto) -> None:
        self.flush()
        self._proto = model

    def quantize(self, bits: Mapping[str, int]) -> None:
        """Precision per unit with ONNX Runtime's quantizer and the candidate's ``quant`` options; writes :attr:`out`."""
        t = time.perf_counter()
        cand, source = self.candidate, self.source
        opts = QuantSetting.of(cand.quant)
        proto = self.proto
        need = _opset_needed(opts)
        if opset_of(proto) < need:
            proto = source.at_opset(need) if proto is source.onnx_model else upgrade_opset(proto, need)
            self.notes.append(f"opset raised to {opset_of(proto)} for this setting")
        bits_units = list(self.units.get("bits", ())) or list(bits)
        by_module = source.origin == "torch"
        unit_of_node = node_unit_map(proto, by_module=by_module, known_units=bits_units)
        if not by_module:
            onnx_units = {n: _onnx_unit(n, bits_units) for n in unit_of_node}
            unit_of_node = {n: u for n, u in onnx_units.items() if u}
        cal = list(self.calibration)
        if opts.calibrate_method != "minmax" and opts.mode == "static":
            # histogram calibrators keep every sample's activations until the end: bound the sample count
            most = max(4, CALIBRATION_MEMORY // max(activation_bytes(source), 1))
            if len(cal) > most:
                self.notes.append(f"{opts.calibrate_method} calibration on {most} of {len(cal)} samples (memory bound)")
                cal = cal[:: -(-len(cal) // most)][:most]
        feeds = batch_feeds(cal, calibration_batch(source))
        quantize_model(proto, self.out, bits=dict(bits), unit_of_node=unit_of_node, options=opts,
                       calibration=feeds, notes=self.notes)
        self.written = True
        self.stages["quantize_s"] = time.perf_counter() - t


def build_candidate(
    source: SourceModel,
    cand: Candidate,
    out_dir: Path,
    *,
    calibration: Sequence[dict[str, np.ndarray]],
    units: Mapping[str, Sequence[str]] | None = None,
    bits_units: Sequence[str] | None = None,
) -> BuildResult:
    """Build ``cand`` from ``source`` into ``out_dir/model.onnx``: each registered knob with an active
    value applies its change, in knob order (structural, graph, precision).

    Args:
        source: The imported model (never modified).
        cand: The candidate.
        out_dir: Its folder (created).
        calibration: Single-sample feeds for calibration (quantization and BatchNorm).
        units: Knob -> every unit name of that knob (the candidate is checked against them, and the
            bits units map nodes of re-exported graphs back).
        bits_units: Shorthand for ``units={"bits": bits_units}``.

    Raises:
        CandidateError: a stage failed.
        ConfigError: the candidate asks for something this model cannot do, or names a unit it does not have.
    """
    from autosearch.knobs import knobs

    t0 = time.perf_counter()
    if units is None:
        units = {"bits": tuple(bits_units or ())}
    elif bits_units is not None:
        units = {**units, "bits": tuple(bits_units)}
    else:
        cand.check(units)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = BuildState(source, cand, out_dir, units=units, calibration=calibration)
    for k in knobs():
        values = cand.active(k.name)
        if not values:
            continue
        if not k.structural:
            state.flush()
        t = time.perf_counter()
        k.apply(state, values)
        if not k.structural and k.name != "bits":
            state.stages[f"{k.name}_s"] = time.perf_counter() - t
    if not state.written:
        onnx.save(state.proto, str(state.out))
    return BuildResult(state.out, time.perf_counter() - t0, state.notes, state.stages)


def _opset_needed(quant: QuantSetting | Mapping[str, Any]) -> int:
    """The lowest opset ONNX Runtime's quantizer writes a valid model at, for these options:
    per-channel QDQ needs 13 (``DequantizeLinear`` with ``axis``); ``DynamicQuantizeLinear`` 11."""
    q = quant if isinstance(quant, QuantSetting) else QuantSetting.of(quant)
    if q.mode == "dynamic":
        return 11
    return 13 if q.per_channel_in(q.mode) else 10


def _onnx_unit(node_name: str, units: Sequence[str]) -> str | None:
    """Unit of a node in an ONNX-only model: itself, or the node it was factorized from."""
    if node_name in units:
        return node_name
    best = None
    for u in units:
        if node_name.startswith(u) and (best is None or len(u) > len(best)):
            best = u
    return best


def _structural(source: SourceModel, recovery: Mapping[str, Any], edits: Mapping[str, Mapping[str, Any]],
                module_edits: Sequence[Callable[[Any], Any]], calibration: Sequence[dict[str, np.ndarray]],
                out_dir: Path) -> onnx.ModelProto:
    """The PyTorch model with the queued edits and the recovery, exported to ONNX."""
    import torch

    from autosearch.transforms.structural import apply_structural

    rec = RecoverySetting.of(recovery)
    feeds = calibration[: rec.calibration_samples]
    names = source.input_names
    if not source.trainable:
        raise ConfigError(f"structural edits need a PyTorch model: {source.not_trainable_reason}")
    assert source.torch_example is not None  # set with the module (import or conversion)
    cal_batches = [tuple(torch.from_numpy(b[n]) for n in names) for b in batch_feeds(feeds, 32)]
    module = source.torch_module
    conv = source.converted
    prune = {u: p for u, p in edits.get("prune", {}).items() if p > 0}
    if conv is not None:  # an ONNX model: units are node names, the module's layers are named after them
        unknown = [u for u in prune if u not in conv.module_of_node]
        if unknown:
            raise ConfigError(f"prune: unknown unit {unknown[0]!r}: this ONNX model has no node of that name")
        prune = {conv.path_of(u): p for u, p in prune.items()}
    try:
        for fn in module_edits:
            import copy

            module = fn(copy.deepcopy(module))
        module = apply_structural(
            module,
            source.torch_example,
            prune=prune,
            rank={u: r for u, r in edits.get("rank", {}).items() if r < 1},
            calibration=cal_batches,
            recalibrate_bn=rec.bn_recalibration,
            reconstruct=None if rec.reconstruct == "auto" else bool(rec.reconstruct),
            distill_steps=rec.distill_steps,
            distill_lr=rec.distill_lr,
        )
    except (ConfigError, CandidateError):
        raise
    except Exception as exc:
        raise CandidateError(f"structural transform failed: {type(exc).__name__}: {str(exc)[:400]}") from exc
    if conv is not None:
        from autosearch.transforms.onnx_torch import write_back

        return write_back(source.onnx_model, conv, module)
    path = export_onnx(module, source.torch_example, out_dir / "structural.onnx", input_names=names, output_names=source.output_names)
    proto = onnx.load(str(path))
    path.unlink(missing_ok=True)
    return proto
