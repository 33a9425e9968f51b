"""Bits knob: candidates quantized by ONNX Runtime's quantizer build, run and keep float units float."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest

from autosearch.analysis import module_path_of_node, quant_units
from autosearch.build import build_candidate
from autosearch.candidate import Candidate, SpaceUnits
from autosearch.errors import CandidateError, ConfigError


def _units(src):
    return [u.name for u in quant_units(src.onnx_model, by_module=True)]


def test_units_are_named_by_module_path(small_source) -> None:
    units = _units(small_source)
    assert "stem.0" in units and "fc" in units and "layer2.0.shortcut.0" in units
    assert len(units) == 16  # stem + 6 blocks x 2 convs + 2 shortcuts + fc


@pytest.mark.parametrize(
    "quant",
    [
        {"mode": "static", "activation_type": "uint8", "per_channel": True},
        {"mode": "static", "activation_type": "int8", "per_channel": False, "reduce_range": True},
        {"mode": "dynamic", "per_channel": False},
    ],
)
def test_uniform_int8_builds_runs_and_scores(small_source, small_problem, fast_target, tmp_path: Path, quant) -> None:
    _, ev, _ = small_problem
    units = _units(small_source)
    cal = ev.calibration_feeds(64, small_source.input_names)
    res = build_candidate(small_source, Candidate(bits={u: 8 for u in units}, quant=quant), tmp_path, bits_units=units, calibration=cal)
    ops = Counter(n.op_type for n in onnx.load(str(res.path)).graph.node)
    if quant["mode"] == "static":
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] >= ops["Conv"]
    else:
        assert ops["ConvInteger"] + ops["MatMulInteger"] > 0
    float_acc = ev(fast_target.session(small_source.save(tmp_path / "f.onnx")))
    acc = ev(fast_target.session(res.path))
    assert acc > 0.5 and abs(acc - float_acc) < 0.15
    assert res.path.stat().st_size < (tmp_path / "f.onnx").stat().st_size


def test_float_units_stay_float(small_source, small_problem, tmp_path: Path) -> None:
    _, ev, _ = small_problem
    units = _units(small_source)
    keep = {"stem.0", "fc"}
    bits = {u: (32 if u in keep else 8) for u in units}
    res = build_candidate(
        small_source, Candidate(bits=bits, quant={"mode": "static", "activation_type": "uint8"}), tmp_path,
        bits_units=units, calibration=ev.calibration_feeds(32, ["input"]),
    )
    graph = onnx.load(str(res.path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}

    def weight_is_quantized(node) -> bool:
        w = node.input[1]
        return w in producers and producers[w].op_type == "DequantizeLinear"

    by_name = {n.name: n for n in graph.node}
    assert not weight_is_quantized(by_name["/stem/stem.0/Conv"])
    assert not weight_is_quantized(by_name["/fc/Gemm"]) and by_name["/fc/Gemm"].input[1] in inits
    assert weight_is_quantized(by_name["/layer1/layer1.0/conv1/Conv"])
    assert any("kept float" in n for n in res.notes)


def test_unknown_unit_in_config_is_named(small_source, tmp_path: Path) -> None:
    """A candidate naming a unit the model does not have is refused by the build (not silently left float)."""
    units = SpaceUnits(bits=tuple(_units(small_source)))
    with pytest.raises(ConfigError, match=r"unknown unit 'layer9.conv' for knob 'bits'.*units are: fc, layer1"):
        build_candidate(small_source, Candidate(bits={"layer9.conv": 8}), tmp_path, units=units, calibration=[])
    assert not (tmp_path / "model.onnx").exists()


def test_impossible_candidate_is_a_candidate_error(small_source, tmp_path: Path) -> None:
    units = _units(small_source)
    with pytest.raises(CandidateError, match="16/4-bit units need static quantization"):
        build_candidate(small_source, Candidate(bits={u: 16 for u in units}, quant={"mode": "dynamic"}), tmp_path,
                        bits_units=units, calibration=[])


def test_onnx_only_model_quantizes_per_node(mlp_onnx: Path, tmp_path: Path) -> None:
    import numpy as np

    from autosearch.model import import_model

    src = import_model(mlp_onnx)
    units = [u.name for u in quant_units(src.onnx_model)]
    assert units == ["fc1_matmul", "fc2"]
    cal = [{"x": np.random.default_rng(i).standard_normal((4, 16)).astype(np.float32)} for i in range(8)]
    res = build_candidate(src, Candidate(bits={"fc1_matmul": 8, "fc2": 32}, quant={"mode": "static"}), tmp_path,
                          bits_units=units, calibration=cal)
    graph = onnx.load(str(res.path)).graph
    fc2 = next(n for n in graph.node if n.name == "fc2")
    assert fc2.input[1] == "w2"  # float weight, untouched
    assert any(n.op_type == "DequantizeLinear" and n.output[0].startswith("w1") for n in graph.node)


def test_preprocessing_fusion_keeps_per_unit_choices(mlp_onnx: Path, tmp_path: Path) -> None:
    """quant_pre_process fuses MatMul+Add into a renamed Gemm; the unit still gets its precision."""
    import numpy as np

    from autosearch.model import import_model

    src = import_model(mlp_onnx)
    units = [u.name for u in quant_units(src.onnx_model)]
    cal = [{"x": np.random.default_rng(i).standard_normal((4, 16)).astype(np.float32)} for i in range(8)]
    res = build_candidate(src, Candidate(bits={"fc1_matmul": 8}, quant={"mode": "static", "preprocess": True}), tmp_path,
                          bits_units=units, calibration=cal)
    graph = onnx.load(str(res.path)).graph
    assert any(n.op_type == "DequantizeLinear" and n.output[0].startswith("w1") for n in graph.node)
    assert not any(n.op_type == "DequantizeLinear" and n.output[0].startswith("w2") for n in graph.node)


def _mlp(mlp_onnx: Path):
    import numpy as np

    from autosearch.model import import_model

    src = import_model(mlp_onnx)
    cal = [{"x": np.random.default_rng(i).standard_normal((4, 16)).astype(np.float32)} for i in range(8)]
    return src, [u.name for u in quant_units(src.onnx_model)], cal


def _outputs(path: Path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("quant", [{"mode": "static"}, {"mode": "dynamic"}])
def test_int4_matmul_and_gemm_units_become_matmulnbits(mlp_onnx: Path, tmp_path: Path, quant) -> None:
    """4 bits on a MatMul or Gemm unit is ORT's weight-only MatMulNBits; 8-bit units beside it keep int8."""
    import numpy as np

    src, units, cal = _mlp(mlp_onnx)
    x = np.random.default_rng(99).standard_normal((5, 16)).astype(np.float32)
    ref = _outputs(src.save(tmp_path / "f.onnx"), x)
    res = build_candidate(src, Candidate(bits={"fc1_matmul": 8, "fc2": 4}, quant=quant), tmp_path / "m", bits_units=units, calibration=cal)
    graph = onnx.load(str(res.path)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMulNBits"] == 1, ops
    nbits = next(n for n in graph.node if n.op_type == "MatMulNBits")
    assert nbits.name.startswith("fc2")  # the Gemm unit, rewritten as MatMul + bias Add
    assert {a.name: onnx.helper.get_attribute_value(a) for a in nbits.attribute}["bits"] == 4
    if quant["mode"] == "static":
        assert any(n.op_type == "DequantizeLinear" and n.output[0].startswith("w1") for n in graph.node)
    else:
        assert ops["MatMulInteger"] == 1
    y = _outputs(res.path, x)
    assert y.shape == ref.shape
    rel = np.abs(y - ref).max() / np.abs(ref).max()
    assert 0 < rel < 0.2, rel  # 4-bit weights: close, not equal
    assert any("MatMulNBits" in n for n in res.notes)


def test_int4_only_and_block_size_option(mlp_onnx: Path, tmp_path: Path) -> None:
    src, units, cal = _mlp(mlp_onnx)
    res = build_candidate(src, Candidate(bits={"fc1_matmul": 4}, quant={"mode": "static", "int4_block_size": 16}), tmp_path,
                          bits_units=units, calibration=cal)
    graph = onnx.load(str(res.path)).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1 and nbits[0].name.startswith("fc1_matmul")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}["block_size"] == 16
    assert not any(n.op_type == "QuantizeLinear" for n in graph.node)  # nothing else was quantized
    assert next(n for n in graph.node if n.name == "fc2").op_type == "Gemm"


def test_int16_and_int4_conv_units_are_qdq_overrides(small_source, small_problem, fast_target, tmp_path: Path) -> None:
    """16 bits, and 4 bits on a conv (no MatMulNBits for convs), are QDQ weight overrides; the model runs."""
    _, ev, _ = small_problem
    units = _units(small_source)
    bits = {u: 8 for u in units} | {"layer1.0.conv1": 16, "layer1.0.conv2": 4}
    res = build_candidate(small_source, Candidate(bits=bits, quant={"mode": "static", "activation_type": "uint8"}), tmp_path,
                          bits_units=units, calibration=ev.calibration_feeds(32, ["input"]))
    graph = onnx.load(str(res.path)).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    dq_types = {n.output[0]: inits.get(n.input[0]) for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    conv = {n.name: n for n in graph.node if n.op_type == "Conv"}

    def weight_type(unit: str) -> int | None:
        node = next(n for name, n in conv.items() if module_path_of_node(name) == unit)
        return dq_types.get(node.input[1])

    assert weight_type("layer1.0.conv1") == onnx.TensorProto.INT16
    assert weight_type("layer1.0.conv2") == onnx.TensorProto.INT4
    assert weight_type("layer2.0.conv1") == onnx.TensorProto.INT8
    acc = ev(fast_target.session(res.path))
    assert acc > 0.5


def test_dynamic_mode_keeps_a_float_gemm_unit_float(mlp_onnx: Path, tmp_path: Path) -> None:
    """quantize_dynamic renames each Gemm to "<name>_MatMul" before excluding nodes; a float unit stays float."""
    src, units, cal = _mlp(mlp_onnx)
    res = build_candidate(src, Candidate(bits={"fc1_matmul": 8, "fc2": 32}, quant={"mode": "dynamic"}), tmp_path,
                          bits_units=units, calibration=cal)
    graph = onnx.load(str(res.path)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMulInteger"] == 1
    assert any(n.op_type in ("Gemm", "MatMul") and "w2" in n.input[1] for n in graph.node)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_takes_any_sample_count(small_source, small_problem, fast_target, tmp_path: Path, method) -> None:
    # 40 samples = one batch of 32 and one of 8: ORT's histogram collectors need equal batches
    _, ev, _ = small_problem
    units = _units(small_source)
    quant = {"mode": "static", "activation_type": "uint8", "per_channel": True, "calibrate_method": method}
    res = build_candidate(small_source, Candidate(bits={u: 8 for u in units}, quant=quant), tmp_path,
                          bits_units=units, calibration=ev.calibration_feeds(40, small_source.input_names))
    assert Counter(n.op_type for n in onnx.load(str(res.path)).graph.node)["QuantizeLinear"] > 0
    float_acc = ev(fast_target.session(small_source.save(tmp_path / "f.onnx")))
    assert abs(ev(fast_target.session(res.path)) - float_acc) < 0.15
