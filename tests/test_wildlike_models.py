"""The wild-like ONNX models of tests/wildlike.py build, run in ONNX Runtime and carry their documented traits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import wildlike as W
from onnx import numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static


def _session(path: str | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]


# ----------------------------------------------------------------------------------------------------------------
# constant_weights_cnn
# ----------------------------------------------------------------------------------------------------------------


def test_constant_weights_cnn_builds_runs_and_has_only_constant_weights(tmp_path: Path) -> None:
    path = W.constant_weights_cnn(tmp_path / "cnn.onnx")
    model = onnx.load(path)
    assert len(model.graph.initializer) == 0
    assert model.ir_version == 6 and [(o.domain, o.version) for o in model.opset_import] == [("", 11)]
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == 4
    for n in weighted:  # weight and bias of every Conv/Gemm come out of a Constant node
        assert [producers.get(i) for i in n.input[1:]] == ["Constant", "Constant"]

    sess = _session(path)
    feeds = W.constant_weights_cnn_feeds(16)
    outs = [sess.run(None, f)[0] for f in feeds]
    assert all(f["input.1"].shape == (1, 1, 16, 16) for f in feeds)
    assert all(o.shape == (1, 10) and np.isfinite(o).all() for o in outs)
    assert len({int(o.argmax()) for o in outs}) >= 3  # the argmax depends on the image
    batched = sess.run(None, {"input.1": np.concatenate([f["input.1"] for f in feeds[:4]])})[0]
    np.testing.assert_allclose(batched, np.concatenate(outs[:4]), rtol=1e-4, atol=1e-5)
    assert W.constant_weights_cnn_feeds(3, seed=5)[2]["input.1"].tobytes() == W.constant_weights_cnn_feeds(3, seed=5)[2]["input.1"].tobytes()


def test_constant_weights_cnn_per_channel_static_quantization_is_not_per_channel(tmp_path: Path) -> None:
    path = W.constant_weights_cnn(tmp_path / "cnn.onnx")
    feeds = W.constant_weights_cnn_feeds(4)
    out = tmp_path / "cnn_q.onnx"
    quantize_static(str(path), str(out), W.FeedsReader(feeds), per_channel=True, activation_type=QuantType.QUInt8)
    q = onnx.load(out)
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    with_axis = [n.name for n in dq if any(a.name == "axis" for a in n.attribute)]
    if with_axis:  # an axis on DequantizeLinear needs opset 13: ORT must then refuse the opset-11 file
        with pytest.raises(Exception, match=r".+"):
            _session(out)
        return
    # onnxruntime 1.32: the Constant weights are quantized like activations (per tensor) and the model runs.
    constants = {o for n in q.graph.node if n.op_type == "Constant" for o in n.output}
    weights_as_activations = [n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in constants]
    assert set(weights_as_activations) <= {"0", "4", "8", "fc.weight"}
    ref, got = _session(path).run(None, feeds[0])[0], _session(out).run(None, feeds[0])[0]
    assert got.shape == ref.shape and np.isfinite(got).all()


# ----------------------------------------------------------------------------------------------------------------
# minus_one_batch_mlp
# ----------------------------------------------------------------------------------------------------------------


def test_minus_one_batch_mlp_declares_dim_value_minus_one(tmp_path: Path) -> None:
    path = W.minus_one_batch_mlp(tmp_path / "mlp.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)  # onnx 1.23 accepts a -1 dim_value
    for vi in (model.graph.input[0], model.graph.output[0]):
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].HasField("dim_value") and dims[0].dim_value == -1
        assert dims[1].dim_param == "seq"
    sess = _session(path)
    assert not isinstance(sess.get_inputs()[0].shape[0], int) or sess.get_inputs()[0].shape[0] < 0  # ORT 1.32: None

    for batch, seq in ((1, 8), (3, 5)):
        feeds = W.minus_one_batch_mlp_feeds(3, batch=batch, seq=seq)
        for f in feeds:
            assert f["x"].shape == (batch, seq, 16)
            y = sess.run(None, f)[0]
            assert y.shape == (batch, seq, 4) and np.isfinite(y).all()
    f = W.minus_one_batch_mlp_feeds(1)[0]["x"]
    assert np.abs(np.diff(f, axis=1)).mean() < np.abs(f).mean()  # smooth tracks, not white noise


# ----------------------------------------------------------------------------------------------------------------
# stateful_vad
# ----------------------------------------------------------------------------------------------------------------


def test_stateful_vad_signature_and_subgraph_weights(tmp_path: Path) -> None:
    path = W.stateful_vad(tmp_path / "vad.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model)
    inputs = {vi.name: vi.type.tensor_type for vi in model.graph.input}
    assert list(inputs) == ["input", "sr", "state"]
    assert inputs["sr"].elem_type == onnx.TensorProto.INT64 and len(inputs["sr"].shape.dim) == 0  # a rank-0 scalar
    state = inputs["state"].shape.dim
    assert [d.dim_value for d in state] == [2, 0, 32] and state[1].dim_param == "batch"  # batch on axis 1
    assert inputs["input"].shape.dim[0].dim_param == "batch"
    assert [vi.name for vi in model.graph.output] == ["output", "stateN"]

    main_inits = {i.name for i in model.graph.initializer}
    (if_node,) = [n for n in model.graph.node if n.op_type == "If"]
    branches = _subgraphs(if_node)
    assert len(branches) == 2
    weighted = [(g, n) for g in branches for n in g.node if n.op_type in ("MatMul", "Gemm")]
    assert len(weighted) == 2
    own = [n for g, n in weighted if n.input[1] in {i.name for i in g.initializer}]
    outer = [n for g, n in weighted if n.input[1] in main_inits]
    assert len(own) == 1 and len(outer) == 1  # one on a subgraph initializer, one on an outer-scope one


def test_stateful_vad_streams_with_carried_state(tmp_path: Path) -> None:
    path = W.stateful_vad(tmp_path / "vad.onnx")
    sess = _session(path)
    n = 120
    feeds = W.stateful_vad_feeds(n, model=path)
    assert feeds[0]["state"].shape == (2, 1, 32) and not feeds[0]["state"].any()
    assert all(f["sr"].shape == () and f["sr"].dtype == np.int64 and int(f["sr"]) == 16000 for f in feeds)
    assert all(f["input"].shape == (1, 64) and f["input"].dtype == np.float32 for f in feeds)
    probs = []
    for t, f in enumerate(feeds):
        out, state_n = sess.run(None, f)
        assert out.shape == (1, 1) and state_n.shape == (2, 1, 32)
        assert np.isfinite(out).all() and np.isfinite(state_n).all() and 0.0 < out[0, 0] < 1.0
        if t + 1 < n:
            np.testing.assert_array_equal(feeds[t + 1]["state"], state_n)  # the float model's previous stateN
        probs.append(float(out[0, 0]))
    # the in-memory build is the same model
    np.testing.assert_array_equal(W.stateful_vad_feeds(8)[7]["state"], feeds[7]["state"])

    chunks, speech = W.vad_signal(n)
    assert speech.any() and (~speech).any()
    assert np.sqrt((chunks[speech] ** 2).mean()) > 10 * np.sqrt((chunks[~speech] ** 2).mean())
    probs = np.array(probs)
    assert probs[speech].mean() > probs[~speech].mean() + 0.3  # it behaves like a VAD
    assert probs[~speech].mean() < 0.2

    # batch on axis 1 of the state: two streams in one call give the two single-stream answers
    a, b = feeds[30], feeds[90]
    both = {"input": np.concatenate([a["input"], b["input"]]), "sr": a["sr"],
            "state": np.concatenate([a["state"], b["state"]], axis=1)}
    out2, state2 = sess.run(None, both)
    np.testing.assert_allclose(out2, np.concatenate([sess.run(None, a)[0], sess.run(None, b)[0]]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state2[:, 1:], sess.run(None, b)[1], rtol=1e-5, atol=1e-6)
    # the other If branch runs too, and gives another answer
    at_8k = dict(a, sr=np.array(8000, np.int64))
    assert not np.allclose(sess.run(None, at_8k)[0], sess.run(None, a)[0])


# ----------------------------------------------------------------------------------------------------------------
# mixed_scale_detector
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("detector")
    path = W.mixed_scale_detector(d / "det.onnx")
    feeds = W.mixed_scale_detector_feeds(16)
    ref = [_session(path).run(None, f)[0] for f in feeds]
    calib = W.mixed_scale_detector_feeds(4, seed=100)
    quantized = {}
    for name, extra in (("all_ops", {}), ("weighted_only", {"op_types_to_quantize": ["Conv", "MatMul", "Gemm"]})):
        out = d / f"det_{name}.onnx"
        quantize_static(str(path), str(out), W.FeedsReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **extra)
        sess = _session(out)
        quantized[name] = (out, [sess.run(None, f)[0] for f in feeds])
    return {"path": path, "feeds": feeds, "ref": ref, "quantized": quantized}


def _mean_f1(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return float(np.mean([W.detection_f1(W.detections(g), W.detections(r)) for g, r in zip(got, ref)]))


def test_mixed_scale_detector_output(detector: dict) -> None:
    model = onnx.load(detector["path"])
    onnx.checker.check_model(model)
    assert model.graph.node[-1].op_type == "Concat" and model.graph.node[-1].output[0] == "output0"
    assert all(f["images"].shape == (1, 3, 32, 32) for f in detector["feeds"])
    ref = np.concatenate(detector["ref"])
    assert ref.shape == (16, 64, 7) and np.isfinite(ref).all()
    xy, wh, scores = ref[..., :2], ref[..., 2:4], ref[..., 4:]
    assert xy.min() >= 0 and xy.max() <= 640 and wh.min() >= 0 and wh.max() <= 320 and xy.max() > 500
    assert scores.min() >= 0 and scores.max() <= 1
    best = scores.max(-1)
    per_image = (best > 0.5).sum(1)
    assert per_image.min() >= 1 and per_image.max() <= 16  # a handful per image ...
    assert (best > 0.5).mean() < 0.2  # ... most anchors are below 0.5
    assert not ((best > 0.2) & (best < 0.8)).any()  # and none is borderline
    # the detections sit on the drawn rectangles: each positive anchor's cell lies inside a rectangle of its class
    _, boxes = W.detector_images(16)
    for out, rects in zip(detector["ref"], boxes):
        for a in np.nonzero(out[0, :, 4:].max(-1) > 0.5)[0]:
            cy, cx, k = divmod(int(a), 8)[0] * 4 + 1.5, divmod(int(a), 8)[1] * 4 + 1.5, int(out[0, a, 4:].argmax())
            assert any(c == k and x0 <= cx < x1 and y0 <= cy < y1 for c, x0, y0, x1, y1 in rects)
    ref_dets = W.detections(detector["ref"][0])
    assert W.detection_f1(ref_dets, ref_dets) == 1.0 and W.detection_f1([], ref_dets) == 0.0


def test_mixed_scale_cosine_hides_the_scores(detector: dict) -> None:
    """(a) Zeroing every class score keeps the whole-output cosine > 0.99, and no detection survives."""
    zeroed = [o.copy() for o in detector["ref"]]
    for o in zeroed:
        o[..., 4:] = 0.0
    assert _cosine(np.concatenate(detector["ref"]), np.concatenate(zeroed)) > 0.99
    assert _mean_f1(zeroed, detector["ref"]) == 0.0


def test_mixed_scale_concat_breaks_int8_not_the_weighted_layers(detector: dict) -> None:
    """(b) All-op QDQ quantization puts the Concat on one (pixel) scale and loses every score; weighted-only is fine."""
    ref = detector["ref"]
    all_path, all_out = detector["quantized"]["all_ops"]
    _, weighted_out = detector["quantized"]["weighted_only"]
    f1_all, f1_weighted = _mean_f1(all_out, ref), _mean_f1(weighted_out, ref)  # onnxruntime 1.32: 0.0 and 1.0
    assert f1_all < 0.5
    assert f1_weighted >= 0.9
    assert _cosine(np.concatenate(all_out), np.concatenate(ref)) > 0.99  # and the cosine does not notice
    # the reason: the single output tensor gets one scale of ~640/255 px per step, more than a whole score
    q = onnx.load(all_path)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    (dq_out,) = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "output0"]
    assert float(inits[dq_out.input[1]]) > 1.0
    assert not any(n.op_type == "Concat" and n.output[0] == "output0" for n in q.graph.node)  # Concat -> Q -> DQ
