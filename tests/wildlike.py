"""Small ONNX models, built in code with ``onnx.helper``, that carry the traits of real third-party exports.

Other tests use them to prove that the project copes with models it did not export itself. Every factory
writes one ``.onnx`` file, is deterministic (fixed seeds), builds in milliseconds and runs in ONNX Runtime
on the CPU; each has a ``*_feeds(n, seed=0)`` companion that returns complete, structured feeds.

Traits and what they mimic:

``constant_weights_cnn`` -- every weight and bias is the output of a ``Constant`` node, the graph has no
    initializers at all, ``ir_version`` 6 / opset 11. This is what ``torch.onnx.export(...,
    do_constant_folding=False, opset_version=11)`` of torch 1.4-1.8 writes, and what many Caffe2 / early
    ONNX model-zoo files look like. Quantizers that look weights up among the initializers do not see them.

``minus_one_batch_mlp`` -- dim 0 of the input and of the output is written as ``dim_value: -1`` instead of a
    ``dim_param`` (tf2onnx / keras2onnx and some hand-written converters do this), and dim 1 is a symbolic
    ``dim_param: "seq"``. Code that reads ``dim_value`` as a size gets -1.

``stateful_vad`` -- a Silero-VAD-like streaming model: ``input`` float [B, 64] (one audio chunk), ``sr``
    an int64 *scalar* (rank 0), ``state`` float [2, B, 32] with the batch on axis 1; outputs ``output``
    [B, 1] (speech probability) and ``stateN`` [2, B, 32]. The encoder is chosen by an ``If`` on
    ``sr == 16000``; both branches hold a weighted ``MatMul`` (the 16 kHz one on an initializer of the
    subgraph itself, the 8 kHz one on an initializer of the main graph read from the outer scope), then two
    GRU-like cells written out with MatMul/Add/Sigmoid/Tanh/Mul. Feeds must carry the state from call to call.

``mixed_scale_detector`` -- a YOLO-like head: boxes in *pixels* (0..640, Sigmoid * stride + grid offsets,
    Sigmoid * 320 for sizes) and class scores in 0..1 are joined by one ``Concat`` into a single output
    [1, 64, 4 + 3] (as YOLOv5/YOLOv8 exports ``output0``). Per-tensor int8 quantization of that Concat gives
    the scores the pixel scale (~2.5 per step), so every score rounds to 0 and detection collapses, while a
    whole-output cosine stays > 0.99: the op that breaks under int8 is not a weighted layer.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "FeedsReader",
    "constant_weights_cnn",
    "constant_weights_cnn_feeds",
    "detection_f1",
    "detections",
    "detector_images",
    "minus_one_batch_mlp",
    "minus_one_batch_mlp_feeds",
    "mixed_scale_detector",
    "mixed_scale_detector_feeds",
    "stateful_vad",
    "stateful_vad_feeds",
    "vad_sequence_feeds",
    "vad_signal",
]

Feeds = dict[str, np.ndarray]

# opset -> the ir_version the exporters of that time wrote (what ONNX Runtime also expects as a minimum).
_IR_FOR_OPSET = {11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8}


def _model(graph: onnx.GraphProto, opset: int, producer: str, producer_version: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name=producer,
        producer_version=producer_version,
    )
    model.ir_version = _IR_FOR_OPSET.get(opset, 8)
    return model


def _save(model: onnx.ModelProto, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _session(model: str | Path | bytes | onnx.ModelProto) -> ort.InferenceSession:
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"])


class FeedsReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a list of feeds (duck-typed, no import needed)."""

    def __init__(self, feeds: list[Feeds]):
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


# --------------------------------------------------------------------------------------------------------------
# 1. Constant-node weights, opset 11
# --------------------------------------------------------------------------------------------------------------
#
# What onnxruntime 1.32 (the installed version) does with this model as is:
# * ``quantize_static(..., per_channel=True)`` (QDQ, the default) neither quantizes nothing nor writes a model that
#   fails to load: it treats each Constant output that feeds a Conv/Gemm weight as an *activation*, calibrates it
#   and gives it a per-tensor QuantizeLinear/DequantizeLinear pair of the activation type (uint8 with
#   activation_type=QUInt8), with no ``axis`` -- per_channel is silently not applied, so the file still loads and
#   runs at opset 11. The biases stay float (warnings "Expected bias '1' to be an initializer" and "Bias of Gemm
#   node 'Gemm_0' is not constant. Please exclude this node for better performance.").
# * ``quantize_static(..., quant_format=QuantFormat.QOperator, per_channel=True)`` raises
#   ``AttributeError: 'NoneType' object has no attribute 'data_type'`` (quant_utils.tensor_proto_to_array gets
#   None for the weight, which it looked up among the initializers).
# * ``quantize_dynamic(..., per_channel=True)`` raises ``ValueError: Expected 0 to be an initializer``
#   (operators/conv.py, ConvInteger.add_bias; "0" is the first Conv's weight).
# tests/test_wildlike_models.py pins the first point.


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"Constant_{name}", value=numpy_helper.from_array(value, name))


def constant_weights_cnn(path: str | Path, opset: int = 11) -> Path:
    """Conv(1->8) Relu Conv(8->16, s2) Relu Conv(16->16) Relu GlobalAveragePool Flatten Gemm(16->10).

    Input ``input.1`` float [N, 1, 16, 16] (N free), output ``23`` float [N, 10] (numbered names, as the old
    TorchScript exporter wrote them). All weights are Constant nodes; ``graph.initializer`` is empty.
    """
    rng = np.random.default_rng(11)

    def he(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return _f32(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape))

    nodes: list[onnx.NodeProto] = []
    convs = [(1, 8, 1), (8, 16, 2), (16, 16, 1)]
    x = "input.1"
    k = 0
    for i, (cin, cout, stride) in enumerate(convs):
        w, b, y, r = f"{k}", f"{k + 1}", f"{k + 2}", f"{k + 3}"
        k += 4
        nodes.append(_const(w, he(cout, cin, 3, 3)))
        nodes.append(_const(b, _f32(rng.normal(0.0, 0.05, cout))))
        nodes.append(
            helper.make_node(
                "Conv", [x, w, b], [y], name=f"Conv_{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride],
                dilations=[1, 1], group=1,
            )
        )
        nodes.append(helper.make_node("Relu", [y], [r], name=f"Relu_{i}"))
        x = r
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["20"], name="GlobalAveragePool_0"))
    nodes.append(helper.make_node("Flatten", ["20"], ["21"], name="Flatten_0", axis=1))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 1, 16, 16])
    # The classifier is whitened on the pooled features of reference images, so that the ten logits spread
    # out and the argmax depends on the image (random weights alone give one class for everything).
    features = _model(helper.make_graph(nodes, "features", [inp], [helper.make_tensor_value_info("21", TensorProto.FLOAT, None)]),
                      opset, "pytorch", "1.4")
    ref = np.concatenate([f["input.1"] for f in constant_weights_cnn_feeds(64, seed=1234)])
    feat = _session(features).run(None, {"input.1": ref})[0].astype(np.float64)
    mean, std = feat.mean(0), feat.std(0) + 1e-3
    fc = rng.normal(0.0, 1.0, (10, 16)) / np.sqrt(16) * 2.0
    nodes.append(_const("fc.weight", _f32(fc / std)))
    nodes.append(_const("fc.bias", _f32(-(fc / std) @ mean)))
    nodes.append(helper.make_node("Gemm", ["21", "fc.weight", "fc.bias"], ["23"], name="Gemm_0", alpha=1.0, beta=1.0, transB=1))
    graph = helper.make_graph(nodes, "torch-jit-export", [inp], [helper.make_tensor_value_info("23", TensorProto.FLOAT, ["N", 10])])
    model = _model(graph, opset, "pytorch", "1.4")
    onnx.checker.check_model(model)
    return _save(model, path)


def constant_weights_cnn_feeds(n: int, seed: int = 0) -> list[Feeds]:
    """``n`` feeds ``{"input.1": [1, 1, 16, 16]}``: a bar, a cross, a ring or a box on a dim background, noise 0.05."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float32)
    out = []
    for _ in range(n):
        img = np.full((16, 16), 0.1, np.float32)
        kind = rng.integers(4)
        cx, cy = rng.uniform(5, 11, 2)
        if kind == 0:  # vertical or horizontal bar
            img[np.abs((xx if rng.integers(2) else yy) - cx) < 1.5] = 1.0
        elif kind == 1:  # cross
            img[(np.abs(xx - cx) < 1.2) | (np.abs(yy - cy) < 1.2)] = 1.0
        elif kind == 2:  # ring
            r = np.hypot(xx - cx, yy - cy)
            img[np.abs(r - rng.uniform(3, 5)) < 1.0] = 1.0
        else:  # filled box
            h = rng.uniform(2, 4)
            img[(np.abs(xx - cx) < h) & (np.abs(yy - cy) < h)] = 1.0
        img += rng.normal(0.0, 0.05, img.shape).astype(np.float32)
        out.append({"input.1": _f32(img[None, None])})
    return out


# --------------------------------------------------------------------------------------------------------------
# 2. dim_value -1 on the batch dim
# --------------------------------------------------------------------------------------------------------------
#
# With onnx 1.23.2 ``onnx.checker.check_model`` accepts ``dim_value: -1``, also with ``full_check=True``, and
# ``onnx.shape_inference.infer_shapes(strict_mode=True)`` keeps the -1 on the output. onnxruntime 1.32 loads
# and runs it for any batch size and reports the dim as ``None`` (``sess.get_inputs()[0].shape == [None, 'seq',
# 16]``), while code that reads the ValueInfo itself (``dim.dim_value``) gets -1 -- and ``HasField("dim_value")``
# is True, so "is it symbolic?" checks on ``dim_param`` say no. quantize_static (QDQ and QOperator) and
# quantize_dynamic handle it and keep the -1 on the quantized model's input.


def minus_one_batch_mlp(path: str | Path) -> Path:
    """MatMul(16->32) Add Relu MatMul(32->32) Add Relu MatMul(32->4) Add on ``x`` float [-1, seq, 16] -> ``y`` [-1, seq, 4]."""
    rng = np.random.default_rng(22)
    sizes = [16, 32, 32, 4]
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    x = "x"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        inits.append(numpy_helper.from_array(_f32(rng.normal(0, np.sqrt(2.0 / a), (a, b))), f"dense_{i}/kernel:0"))
        inits.append(numpy_helper.from_array(_f32(rng.normal(0, 0.05, b)), f"dense_{i}/bias:0"))
        nodes.append(helper.make_node("MatMul", [x, f"dense_{i}/kernel:0"], [f"dense_{i}/MatMul:0"], name=f"dense_{i}/MatMul"))
        last = i == len(sizes) - 2
        y = "y" if last else f"dense_{i}/BiasAdd:0"
        nodes.append(helper.make_node("Add", [f"dense_{i}/MatMul:0", f"dense_{i}/bias:0"], [y], name=f"dense_{i}/BiasAdd"))
        if not last:
            nodes.append(helper.make_node("Relu", [y], [f"dense_{i}/Relu:0"], name=f"dense_{i}/Relu"))
            x = f"dense_{i}/Relu:0"
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, "seq", 16])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, "seq", 4])
    for vi in (inp, out):
        dim0 = vi.type.tensor_type.shape.dim[0]
        dim0.Clear()
        dim0.dim_value = -1  # what some converters write for "unknown"
    graph = helper.make_graph(nodes, "tf2onnx", [inp], [out], initializer=inits)
    model = _model(graph, 13, "tf2onnx", "1.9.3")
    onnx.checker.check_model(model)
    return _save(model, path)


def minus_one_batch_mlp_feeds(n: int, seed: int = 0, batch: int = 1, seq: int = 8) -> list[Feeds]:
    """``n`` feeds ``{"x": [batch, seq, 16]}``: smooth multi-sine feature tracks (like sensor channels) plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(seq, dtype=np.float32)[:, None]
    out = []
    for _ in range(n):
        freq = rng.uniform(0.02, 0.12, (batch, 1, 16))  # cycles per step: slow tracks
        phase = rng.uniform(0, 2 * np.pi, (batch, 1, 16))
        amp = rng.uniform(0.5, 2.0, (batch, 1, 16))
        x = amp * np.sin(2 * np.pi * freq * t[None] + phase) + rng.normal(0, 0.05, (batch, seq, 16))
        out.append({"x": _f32(x)})
    return out


# --------------------------------------------------------------------------------------------------------------
# 3. Stateful VAD with an If on a scalar sample rate
# --------------------------------------------------------------------------------------------------------------

VAD_CHUNK = 64
VAD_HIDDEN = 32


VAD_ENERGY = 8  # hidden units 0..7 of both cells integrate the chunk energy; they drive the speech probability


def _gru_cell(prefix: str, x: str, h: str, din: int, rng: np.random.Generator, inits: list, nodes: list,
              energy_from: int, energy_gain: float, energy_bias: float) -> str:
    """Writes ``h' = (1 - z) * n + z * h`` with z, r = Sigmoid(x Wz + h Uz + bz), n = Tanh(x Wn + (r * h) Un + bn).

    Units ``:VAD_ENERGY`` are energy trackers: their ``Wn`` column is ``energy_gain`` on inputs ``:energy_from``
    (near zero elsewhere) and their ``bn`` is ``energy_bias``; the other units are random.
    """
    H = VAD_HIDDEN

    def w(name: str, a: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(_f32(a), f"{prefix}.{name}"))
        return f"{prefix}.{name}"

    def node(op: str, ins: list[str], out: str) -> str:
        nodes.append(helper.make_node(op, ins, [f"{prefix}/{out}"], name=f"{prefix}/{op}_{out}"))
        return f"{prefix}/{out}"

    E = VAD_ENERGY
    wn = rng.normal(0, 1.0 / np.sqrt(din), (din, H))
    wn[:, :E] = rng.normal(0, 0.02, (din, E))
    wn[:energy_from, :E] += energy_gain * rng.uniform(0.8, 1.2, (energy_from, E))
    un = rng.normal(0, 0.5 / np.sqrt(H), (H, H))
    un[:, :E] *= 0.1
    bn = rng.normal(0, 0.1, H)
    bn[:E] = energy_bias
    gates = {}
    for g, bias in (("z", 1.0), ("r", 0.0)):
        xz = node("MatMul", [x, w(f"W{g}", rng.normal(0, 1.0 / np.sqrt(din), (din, H)))], f"x{g}")
        hz = node("MatMul", [h, w(f"U{g}", rng.normal(0, 0.5 / np.sqrt(H), (H, H)))], f"h{g}")
        s = node("Add", [xz, hz], f"s{g}")
        b = np.full(H, bias)
        b[:E] = -0.5 if g == "z" else 0.0  # the energy trackers follow the input within a few chunks
        s = node("Add", [s, w(f"b{g}", b)], f"a{g}")
        gates[g] = node("Sigmoid", [s], g)
    rh = node("Mul", [gates["r"], h], "rh")
    xn = node("MatMul", [x, w("Wn", wn)], "xn")
    hn = node("MatMul", [rh, w("Un", un)], "hn")
    s = node("Add", [xn, hn], "sn")
    s = node("Add", [s, w("bn", bn)], "an")
    n = node("Tanh", [s], "n")
    one_minus_z = node("Sub", [w("one", np.ones(1)), gates["z"]], "1mz")
    a = node("Mul", [one_minus_z, n], "a")
    b = node("Mul", [gates["z"], h], "b")
    return node("Add", [a, b], "h_new")


def _encoder_branch(name: str, weight: str, bias: str, inits: list[onnx.TensorProto]) -> onnx.GraphProto:
    nodes = [
        helper.make_node("MatMul", ["input", weight], [f"{name}/mm"], name=f"{name}/MatMul"),
        helper.make_node("Add", [f"{name}/mm", bias], [f"{name}/add"], name=f"{name}/Add"),
        helper.make_node("Relu", [f"{name}/add"], [f"{name}/feat"], name=f"{name}/Relu"),
    ]
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info(f"{name}/feat", TensorProto.FLOAT, ["batch", VAD_HIDDEN])],
        initializer=inits,
    )


def _build_stateful_vad() -> onnx.ModelProto:
    rng = np.random.default_rng(33)
    H, C = VAD_HIDDEN, VAD_CHUNK
    t = np.arange(C) / 16000.0
    # Encoder filters: windowed cosines (a tiny learned-filterbank look) at 16 kHz; the 8 kHz branch sees the
    # same 64 samples as twice the duration, so its filters are at half the frequency.
    freqs = np.geomspace(150, 4000, H)
    win = np.hanning(C)
    w16 = np.stack([win * np.cos(2 * np.pi * f * t + rng.uniform(0, np.pi)) for f in freqs], axis=1) * 0.5
    w8 = np.stack([win * np.cos(2 * np.pi * f * 2 * t + rng.uniform(0, np.pi)) for f in freqs], axis=1) * 0.5
    sub_inits = [
        numpy_helper.from_array(_f32(w16), "enc16k.weight"),  # lives INSIDE the then-branch subgraph
        numpy_helper.from_array(_f32(np.full(H, -0.02)), "enc16k.bias"),
    ]
    main_inits = [
        numpy_helper.from_array(np.array(16000, np.int64), "sr_16k"),
        numpy_helper.from_array(np.array(0, np.int64), "idx0"),
        numpy_helper.from_array(np.array(1, np.int64), "idx1"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(_f32(w8), "enc8k.weight"),  # main graph, read by the else-branch from outer scope
        numpy_helper.from_array(_f32(np.full(H, -0.02)), "enc8k.bias"),
    ]
    nodes: list[onnx.NodeProto] = [
        helper.make_node("Equal", ["sr", "sr_16k"], ["is_16k"], name="Equal_sr"),
        helper.make_node(
            "If", ["is_16k"], ["feat"], name="If_sr",
            then_branch=_encoder_branch("enc16k", "enc16k.weight", "enc16k.bias", sub_inits),
            else_branch=_encoder_branch("enc8k", "enc8k.weight", "enc8k.bias", []),
        ),
        helper.make_node("Gather", ["state", "idx0"], ["h0"], name="Gather_h0", axis=0),
        helper.make_node("Gather", ["state", "idx1"], ["h1"], name="Gather_h1", axis=0),
    ]
    h0n = _gru_cell("rnn0", "feat", "h0", H, rng, main_inits, nodes, energy_from=H, energy_gain=1.5, energy_bias=-0.6)
    h1n = _gru_cell("rnn1", h0n, "h1", H, rng, main_inits, nodes, energy_from=VAD_ENERGY, energy_gain=0.5, energy_bias=-0.3)
    wo = rng.normal(0, 0.1, (H, 1))
    wo[:VAD_ENERGY] = 0.5
    main_inits += [
        numpy_helper.from_array(_f32(wo), "decoder.weight"),
        numpy_helper.from_array(_f32(np.array([0.0])), "decoder.bias"),
    ]
    nodes += [
        helper.make_node("MatMul", [h1n, "decoder.weight"], ["logit_mm"], name="decoder/MatMul"),
        helper.make_node("Add", ["logit_mm", "decoder.bias"], ["logit"], name="decoder/Add"),
        helper.make_node("Sigmoid", ["logit"], ["output"], name="decoder/Sigmoid"),
        helper.make_node("Unsqueeze", [h0n, "axes0"], ["h0u"], name="Unsqueeze_h0"),
        helper.make_node("Unsqueeze", [h1n, "axes0"], ["h1u"], name="Unsqueeze_h1"),
        helper.make_node("Concat", ["h0u", "h1u"], ["stateN"], name="Concat_state", axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "silero_like_vad",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", H]),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", H]),
        ],
        initializer=main_inits,
    )
    model = _model(graph, 16, "pytorch", "2.0.1")
    onnx.checker.check_model(model)
    return model


def stateful_vad(path: str | Path) -> Path:
    """Silero-VAD-like streaming model; see the module docstring. ``sr`` must be 16000 or 8000.

    With onnxruntime 1.32, quantize_static (QDQ and QOperator, per_channel=True) and quantize_dynamic all succeed
    but leave both ``If`` branches untouched: the encoder MatMuls stay float (``enc16k.weight`` stays a float
    initializer of the subgraph), only the main-graph MatMuls/Adds/Sigmoids/Muls/Concat get quantized.
    """
    return _save(_build_stateful_vad(), path)


def vad_signal(n_chunks: int, seed: int = 0, sr: int = 16000) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic recording cut into chunks: ``(chunks [n_chunks, 64] float32, speech [n_chunks] bool)``.

    Speech segments (6-16 chunks) are voiced-like harmonic stacks on a slowly gliding f0 of 100-250 Hz with a
    syllable envelope (~4 Hz) and amplitude 0.1-0.5; silences (4-12 chunks) are background noise at ~0.003.
    """
    rng = np.random.default_rng(seed)  # the segment layout and the voices
    n = n_chunks * VAD_CHUNK
    sig = np.random.default_rng([seed, 1]).normal(0, 0.003, n)  # background noise; a prefix of a longer call's
    speech = np.zeros(n, bool)
    pos = int(rng.integers(3, 8)) * VAD_CHUNK
    while pos < n:
        length = int(rng.integers(6, 17)) * VAD_CHUNK  # drawn in full, then cut: vad_signal(m) is a prefix of vad_signal(n)
        tt = np.arange(length) / sr
        f0 = rng.uniform(100, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * tt))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        voiced = sum(np.sin(k * phase) / k ** 0.7 for k in range(1, 12))
        env = rng.uniform(0.1, 0.5) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * tt + rng.uniform(0, np.pi))) * np.hanning(length) ** 0.2
        seg = env * voiced / 3 + rng.normal(0, 0.01, length)
        end = min(pos + length, n)
        sig[pos:end] += seg[:end - pos]
        speech[pos:end] = True
        pos += length + int(rng.integers(4, 13)) * VAD_CHUNK
    chunks = _f32(sig.reshape(n_chunks, VAD_CHUNK))
    return chunks, speech.reshape(n_chunks, VAD_CHUNK).mean(1) > 0.5


def vad_sequence_feeds(model: str | Path | bytes | onnx.ModelProto, chunks: np.ndarray, sr: int = 16000) -> list[Feeds]:
    """Per-call feeds for a stream of ``chunks`` [T, 64]: call t gets the state the float ``model`` returned at t-1."""
    sess = _session(model)
    state = np.zeros((2, 1, VAD_HIDDEN), np.float32)
    out = []
    for chunk in chunks:
        feed = {"input": _f32(chunk[None]), "sr": np.array(sr, np.int64), "state": state}
        out.append(feed)
        state = sess.run(["stateN"], feed)[0]
    return out


def stateful_vad_feeds(n: int, seed: int = 0, model: str | Path | bytes | onnx.ModelProto | None = None) -> list[Feeds]:
    """``n`` consecutive calls over ``vad_signal(n, seed)`` with the float model's state carried (built in memory if None)."""
    chunks, _ = vad_signal(n, seed)
    return vad_sequence_feeds(_build_stateful_vad() if model is None else model, chunks)


# --------------------------------------------------------------------------------------------------------------
# 4. Mixed-scale detector output
# --------------------------------------------------------------------------------------------------------------

DET_SIZE = 32  # model input side in pixels
DET_GRID = 8  # anchors per side -> 64 anchors
DET_CLASSES = 3  # red, green, blue rectangles
DET_STRIDE = 80.0  # the boxes are in the pixels of the 640 x 640 image the 32 x 32 input was resized from
DET_COLOURS = np.array([[0.9, 0.15, 0.1], [0.1, 0.85, 0.15], [0.15, 0.2, 0.9]], np.float32)


def mixed_scale_detector(path: str | Path) -> Path:
    """Conv(3->8, s2) Relu Conv(8->16, s2) Relu Conv1x1(16->7) -> Reshape/Transpose [1, 64, 7] -> Split.

    xy = (Sigmoid * 80 + grid) px, wh = Sigmoid * 320 px, cls = Sigmoid; ``output0`` = Concat([xy, wh, cls], 2),
    float [1, 64, 7] = (cx, cy, w, h, p_red, p_green, p_blue) per anchor, anchors row-major over the 8 x 8 grid.
    The weights are hand-set: a colour-contrast filter bank, a pooling layer and a threshold head (plus
    small random filters so the layers are not all structure).

    onnxruntime 1.32, QDQ, per_channel=True, uint8 activations, calibrated on 4 feeds (seed 100), mean per-image
    detection F1 vs float on 16 feeds (seed 0): default op types 0.0 (``output0`` gets scale ~2.36, so every
    score dequantizes to 0; the whole-output cosine is still 0.99997); ``op_types_to_quantize=["Conv", "MatMul",
    "Gemm"]`` 1.0; default op types with ``nodes_to_exclude=["/model.2/Concat"]`` also 1.0.
    """
    rng = np.random.default_rng(44)
    C, A = DET_CLASSES, DET_GRID * DET_GRID
    # conv1: channels 0..2 = "colour k minus the mean of the other two", 3 = brightness, 4..7 random edges.
    w1 = _f32(rng.normal(0, 0.08, (8, 3, 3, 3)))
    b1 = _f32(rng.normal(0, 0.01, 8))
    for k in range(3):
        w1[k] = -0.5 / 9
        w1[k, k] = 1.0 / 9
        b1[k] = 0.0
    w1[3] = 1.0 / 27
    # conv2: channels 0..2 average colour maps 0..2 over 3x3, the rest mix everything a little.
    w2 = _f32(rng.normal(0, 0.05, (16, 8, 3, 3)))
    b2 = _f32(rng.normal(0, 0.01, 16))
    for k in range(3):
        w2[k] = 0.0
        w2[k, k] = 1.0 / 9
        b2[k] = 0.0
    # head: tx, ty, tw, th, 3 class logits.
    w3 = _f32(rng.normal(0, 0.05, (4 + C, 16, 1, 1)))
    b3 = np.zeros(4 + C, np.float32)
    w3[2, :3, 0, 0] += 3.0  # wider / taller boxes where there is colour
    w3[3, :3, 0, 0] += 3.0
    b3[2:4] = -1.5
    gain, thr = 30.0, 0.28
    for k in range(C):
        w3[4 + k, :, 0, 0] = rng.normal(0, 0.02, 16)
        w3[4 + k, k, 0, 0] = gain
        w3[4 + k, [j for j in range(3) if j != k], 0, 0] = -gain / 2
        b3[4 + k] = -gain * thr
    gy, gx = np.mgrid[0:DET_GRID, 0:DET_GRID]
    grid = _f32(np.stack([gx.ravel(), gy.ravel()], axis=1)[None] * DET_STRIDE)  # [1, 64, 2]
    inits = [
        numpy_helper.from_array(w1, "model.0.conv.weight"),
        numpy_helper.from_array(b1, "model.0.conv.bias"),
        numpy_helper.from_array(w2, "model.1.conv.weight"),
        numpy_helper.from_array(b2, "model.1.conv.bias"),
        numpy_helper.from_array(w3, "model.2.m.0.weight"),
        numpy_helper.from_array(b3, "model.2.m.0.bias"),
        numpy_helper.from_array(np.array([1, 4 + C, A], np.int64), "head_shape"),
        numpy_helper.from_array(np.array([2, 2, C], np.int64), "split_sizes"),
        numpy_helper.from_array(np.array(DET_STRIDE, np.float32), "stride"),
        numpy_helper.from_array(np.array(320.0, np.float32), "wh_scale"),
        numpy_helper.from_array(grid, "grid"),
    ]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["images", "model.0.conv.weight", "model.0.conv.bias"], ["/model.0/conv/Conv_output_0"],
                         name="/model.0/conv/Conv", **conv),
        helper.make_node("Relu", ["/model.0/conv/Conv_output_0"], ["/model.0/act/Relu_output_0"], name="/model.0/act/Relu"),
        helper.make_node("Conv", ["/model.0/act/Relu_output_0", "model.1.conv.weight", "model.1.conv.bias"],
                         ["/model.1/conv/Conv_output_0"], name="/model.1/conv/Conv", **conv),
        helper.make_node("Relu", ["/model.1/conv/Conv_output_0"], ["/model.1/act/Relu_output_0"], name="/model.1/act/Relu"),
        helper.make_node("Conv", ["/model.1/act/Relu_output_0", "model.2.m.0.weight", "model.2.m.0.bias"],
                         ["/model.2/m.0/Conv_output_0"], name="/model.2/m.0/Conv", kernel_shape=[1, 1]),
        helper.make_node("Reshape", ["/model.2/m.0/Conv_output_0", "head_shape"], ["/model.2/Reshape_output_0"],
                         name="/model.2/Reshape"),
        helper.make_node("Transpose", ["/model.2/Reshape_output_0"], ["/model.2/Transpose_output_0"],
                         name="/model.2/Transpose", perm=[0, 2, 1]),
        helper.make_node("Split", ["/model.2/Transpose_output_0", "split_sizes"],
                         ["/model.2/Split_output_0", "/model.2/Split_output_1", "/model.2/Split_output_2"],
                         name="/model.2/Split", axis=2),
        helper.make_node("Sigmoid", ["/model.2/Split_output_0"], ["/model.2/Sigmoid_output_0"], name="/model.2/Sigmoid"),
        helper.make_node("Mul", ["/model.2/Sigmoid_output_0", "stride"], ["/model.2/Mul_output_0"], name="/model.2/Mul"),
        helper.make_node("Add", ["/model.2/Mul_output_0", "grid"], ["/model.2/Add_output_0"], name="/model.2/Add"),
        helper.make_node("Sigmoid", ["/model.2/Split_output_1"], ["/model.2/Sigmoid_1_output_0"], name="/model.2/Sigmoid_1"),
        helper.make_node("Mul", ["/model.2/Sigmoid_1_output_0", "wh_scale"], ["/model.2/Mul_1_output_0"], name="/model.2/Mul_1"),
        helper.make_node("Sigmoid", ["/model.2/Split_output_2"], ["/model.2/Sigmoid_2_output_0"], name="/model.2/Sigmoid_2"),
        helper.make_node("Concat", ["/model.2/Add_output_0", "/model.2/Mul_1_output_0", "/model.2/Sigmoid_2_output_0"],
                         ["output0"], name="/model.2/Concat", axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, DET_SIZE, DET_SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, A, 4 + C])],
        initializer=inits,
    )
    model = _model(graph, 17, "pytorch", "2.1.0")
    onnx.checker.check_model(model)
    return _save(model, path)


def detector_images(n: int, seed: int = 0) -> tuple[np.ndarray, list[list[tuple[int, float, float, float, float]]]]:
    """``n`` images [n, 3, 32, 32] with 2-4 coloured rectangles on a dark noisy background, and their boxes.

    A rectangle covers the anchor cells ``a..b`` (1 or 2 per side) and is drawn over the pixels ``4a-2 .. 4b+2``,
    i.e. centred on the receptive fields of those cells (Conv 3x3/s2/p1 twice puts the field of cell ``p`` on
    ``4p-3 .. 4p+3``). So every cell is either well inside a rectangle or well outside: the float class scores
    are far from 0.5 and the detections do not hinge on rounding. Boxes are ``(class, x0, y0, x1, y1)`` in
    input pixels (end exclusive).
    """
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, 3, DET_SIZE, DET_SIZE), np.float32)
    boxes: list[list[tuple[int, float, float, float, float]]] = []
    for i in range(n):
        img = rng.uniform(0.03, 0.08) + rng.normal(0, 0.015, (3, DET_SIZE, DET_SIZE))
        taken = np.zeros((DET_GRID + 2, DET_GRID + 2), bool)  # taken[c + 1] = cell c; one free cell between rectangles
        mine = []
        for _ in range(int(rng.integers(2, 5))):
            for _try in range(30):
                w, h = (int(v) for v in rng.integers(1, 3, 2))
                # cell 0 is left out: half of its receptive field is the zero padding
                x, y = int(rng.integers(1, DET_GRID - w + 1)), int(rng.integers(1, DET_GRID - h + 1))
                if not taken[y:y + h + 2, x:x + w + 2].any():
                    break
            else:
                continue
            taken[y:y + h + 2, x:x + w + 2] = True
            k = int(rng.integers(DET_CLASSES))
            colour = DET_COLOURS[k] * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02, 3)
            x0, y0, x1, y1 = 4 * x - 2, 4 * y - 2, 4 * (x + w - 1) + 3, 4 * (y + h - 1) + 3
            img[:, y0:y1, x0:x1] = colour[:, None, None]
            mine.append((k, float(x0), float(y0), float(x1), float(y1)))
        imgs[i] = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
        boxes.append(mine)
    return imgs, boxes


def mixed_scale_detector_feeds(n: int, seed: int = 0) -> list[Feeds]:
    """``n`` feeds ``{"images": [1, 3, 32, 32]}`` from ``detector_images(n, seed)``."""
    imgs, _ = detector_images(n, seed)
    return [{"images": _f32(img[None])} for img in imgs]


def detections(output: np.ndarray, thr: float = 0.5) -> list[tuple[np.ndarray, int, float]]:
    """``(box xyxy [4], class, score)`` of every anchor whose best class score exceeds ``thr`` (no NMS).

    ``output`` is one image's [1, N, 4 + C] or [N, 4 + C] (cx, cy, w, h, scores...).
    """
    out = np.asarray(output, np.float64).reshape(-1, output.shape[-1])
    scores = out[:, 4:]
    cls = scores.argmax(1)
    best = scores[np.arange(len(out)), cls]
    keep = np.nonzero(best > thr)[0]
    cx, cy, w, h = out[keep, 0], out[keep, 1], out[keep, 2], out[keep, 3]
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return [(xyxy[j], int(cls[i]), float(best[i])) for j, i in enumerate(keep)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def detection_f1(got: list[tuple[np.ndarray, int, float]], ref: list[tuple[np.ndarray, int, float]], iou: float = 0.5) -> float:
    """F1 of one image's ``got`` against its ``ref`` (lists from ``detections``): greedy one-to-one matching in
    order of score, same class and IoU >= ``iou``. Two empty lists give 1.0. Average it over images."""
    if not got and not ref:
        return 1.0
    if not got or not ref:
        return 0.0
    used = np.zeros(len(ref), bool)
    tp = 0
    for box, cls, _ in sorted(got, key=lambda d: -d[2]):
        best, best_j = iou, -1
        for j, (rbox, rcls, _) in enumerate(ref):
            if used[j] or rcls != cls:
                continue
            v = _iou(box, rbox)
            if v >= best:
                best, best_j = v, j
        if best_j >= 0:
            used[best_j] = True
            tp += 1
    return 2.0 * tp / (len(got) + len(ref))
