"""Low-rank factorization on ONNX graphs, checked with onnx.checker and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autosearch.errors import ConfigError
from autosearch.transforms.lowrank_onnx import apply_onnx_lowrank, find_onnx_lowrank_units

IN, HID, OUT = 48, 40, 24


def _low_rank_matrix(rng: np.random.Generator, rows: int, cols: int, rank: int) -> np.ndarray:
    """A matrix of exact rank ``rank`` (so truncation at ``rank`` is lossless)."""
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / rank).astype(np.float32)


def _build(*, trans_a: bool = False, exact_rank: int | None = None) -> onnx.ModelProto:
    """x (N, IN) -> MatMul W1 (IN x HID) -> Add b1 -> Relu -> Gemm(W2 (OUT x HID), transB=1, C2) -> y (N, OUT).

    With ``trans_a`` the input arrives transposed and the Gemm uses ``transA=1``.
    A second output ``z = y[:, :2] @ W3`` (W3: 2 x 1) is a MatMul that can never pay.
    """
    rng = np.random.default_rng(0)
    if exact_rank is None:
        w1 = (rng.standard_normal((IN, HID)) / np.sqrt(IN)).astype(np.float32)
        w2 = (rng.standard_normal((OUT, HID)) / np.sqrt(HID)).astype(np.float32)
    else:
        w1 = _low_rank_matrix(rng, IN, HID, exact_rank)
        w2 = _low_rank_matrix(rng, OUT, HID, exact_rank)
    b1 = rng.standard_normal(HID).astype(np.float32)
    c2 = rng.standard_normal(OUT).astype(np.float32)
    w3 = rng.standard_normal((2, 1)).astype(np.float32)  # in + out >= in * out: never pays
    inits = [
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "W2"),
        numpy_helper.from_array(c2, "C2"),
        numpy_helper.from_array(w3, "W3"),
    ]
    nodes = []
    x_name = "x"
    if trans_a:
        nodes.append(helper.make_node("Transpose", ["xt"], ["x"], name="pre_t"))
    nodes += [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
    ]
    if trans_a:
        nodes.append(helper.make_node("Transpose", ["h2"], ["h2t"], name="mid_t"))
        nodes.append(helper.make_node("Gemm", ["h2t", "W2", "C2"], ["y"], name="fc2", transA=1, transB=1, alpha=0.5, beta=2.0))
        x_name = "xt"
        x_shape = [IN, "N"]
    else:
        nodes.append(helper.make_node("Gemm", ["h2", "W2", "C2"], ["y"], name="fc2", transB=1, alpha=0.5, beta=2.0))
        x_shape = ["N", IN]
    # "tiny" consumes y[:, :2] through a weight that can never pay: not a candidate.
    nodes.append(helper.make_node("Slice", ["y", "s0", "s1", "ax"], ["y1"], name="slice"))
    nodes.append(helper.make_node("MatMul", ["y1", "W3"], ["z"], name="tiny"))
    inits += [
        numpy_helper.from_array(np.array([0], dtype=np.int64), "s0"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "s1"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "ax"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_mlp",
        [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, x_shape)],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUT]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 1]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return [np.asarray(o) for o in sess.run(None, {name: x})]


def _n_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


def test_find_units_lists_matmul_and_gemm_with_transb() -> None:
    units = find_onnx_lowrank_units(_build())
    assert units == [("fc1", IN, HID), ("fc2", HID, OUT)]


def test_full_rank_is_exact_and_low_rank_shrinks() -> None:
    model = _build()
    before = model.SerializeToString()
    x = np.random.default_rng(1).standard_normal((5, IN)).astype(np.float32)
    ref_y, ref_z = _run(model, x)

    # fraction 1.0 is a no-op; a fraction just under full rank that still saves
    # parameters would not exist here (r * (in + out) >= in * out), so check the no-op path.
    same = apply_onnx_lowrank(model, {"fc1": 1.0, "fc2": 1.0})
    assert same.SerializeToString() == before

    small = apply_onnx_lowrank(model, {"fc1": 0.25, "fc2": 0.25})
    assert model.SerializeToString() == before  # source untouched
    onnx.checker.check_model(small, full_check=True)
    r1 = round(0.25 * min(IN, HID))
    r2 = round(0.25 * min(HID, OUT))
    expected = _n_params(model) - IN * HID + r1 * (IN + HID) - OUT * HID + r2 * (HID + OUT)
    assert _n_params(small) == expected
    init_names = {i.name for i in small.graph.initializer}
    assert "W1" not in init_names and "W2" not in init_names
    assert {"fc1/lowrank_A", "fc1/lowrank_B", "fc2/lowrank_A", "fc2/lowrank_B"} <= init_names
    assert all(n.name.startswith(("fc1", "fc2")) for n in small.graph.node if "lowrank" in n.name)
    y, z = _run(small, x)
    assert y.shape == ref_y.shape and z.shape == ref_z.shape
    assert not np.allclose(y, ref_y, atol=1e-3)  # truncation at a quarter of a random matrix's rank loses something
    sess = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert [o.name for o in sess.get_outputs()] == ["y", "z"]


@pytest.mark.parametrize("trans_a", [False, True])
def test_truncation_at_true_rank_is_lossless(trans_a: bool) -> None:
    # weights of exact rank 6: keeping 6 of min(in, out) singular values reproduces them.
    model = _build(trans_a=trans_a, exact_rank=6)
    shape = (IN, 5) if trans_a else (5, IN)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    ref = _run(model, x)
    small = apply_onnx_lowrank(model, {"fc1": 6 / min(IN, HID), "fc2": 6 / min(HID, OUT)})
    onnx.checker.check_model(small, full_check=True)
    a = {i.name: tuple(i.dims) for i in small.graph.initializer}
    assert a["fc1/lowrank_A"] == (IN, 6) and a["fc1/lowrank_B"] == (6, HID)
    assert a["fc2/lowrank_A"] == (HID, 6) and a["fc2/lowrank_B"] == (OUT, 6)  # transB kept
    out = _run(small, x)
    for got, want in zip(out, ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_shared_weight_is_kept_while_still_used() -> None:
    model = _build()
    # a second MatMul reusing W1
    model.graph.node.append(helper.make_node("MatMul", ["x", "W1"], ["h_again"], name="fc1_again"))
    model.graph.output.append(helper.make_tensor_value_info("h_again", TensorProto.FLOAT, ["N", HID]))
    small = apply_onnx_lowrank(model, {"fc1": 0.5})
    onnx.checker.check_model(small)
    assert "W1" in {i.name for i in small.graph.initializer}
    x = np.random.default_rng(3).standard_normal((3, IN)).astype(np.float32)
    ref = _run(model, x)
    out = _run(small, x)
    np.testing.assert_allclose(out[2], ref[2], rtol=1e-6)  # the untouched consumer is exact


def test_bad_names_and_fractions_raise_config_error() -> None:
    model = _build()
    with pytest.raises(ConfigError, match=r"nope.*fc1"):
        apply_onnx_lowrank(model, {"nope": 0.5})
    with pytest.raises(ConfigError, match="tiny"):
        apply_onnx_lowrank(model, {"tiny": 0.5})  # exists but can never pay
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="fc1"):
            apply_onnx_lowrank(model, {"fc1": bad})
