"""benchmarks/anchors.py: its pure helpers (fast) and a --quick end-to-end run (slow, opt-in with -m slow)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _anchors_lib as lib


def test_hypervolume_two_points_known_area() -> None:
    # rectangles [1,3]x[0.8,0.9] (0.2) and [2,3]x[0.8,0.95] (0.15) overlap on [2,3]x[0.8,0.9] (0.1): union 0.25
    assert lib.hypervolume_2d([(0.9, 1.0), (0.95, 2.0)], ref=(0.8, 3.0)) == pytest.approx(0.25)


def test_hypervolume_ignores_dominated_and_out_of_box_points() -> None:
    base = lib.hypervolume_2d([(0.9, 1.0), (0.95, 2.0)], ref=(0.8, 3.0))
    more = [(0.9, 1.0), (0.95, 2.0), (0.85, 2.5), (0.7, 0.5), (0.99, 3.5), (float("nan"), 1.0)]
    assert lib.hypervolume_2d(more, ref=(0.8, 3.0)) == pytest.approx(base)
    assert lib.hypervolume_2d([], ref=(0.8, 3.0)) == 0.0
    assert lib.hypervolume_2d([(0.8, 1.0)], ref=(0.8, 3.0)) == 0.0  # on the reference: nothing


def test_hypervolume_staircase_matches_grid_count() -> None:
    rng = np.random.default_rng(0)
    pts = [(float(a), float(b)) for a, b in zip(rng.uniform(0, 1, 12), rng.uniform(0, 1, 12))]
    ref = (0.1, 0.9)
    g = (np.arange(400) + 0.5) / 400  # cell centres of a 400x400 grid on the unit square
    acc, lat = np.meshgrid(g, g, indexing="ij")
    covered = np.zeros_like(acc, dtype=bool)
    for a, b in pts:
        covered |= (acc >= ref[0]) & (acc <= a) & (lat >= b) & (lat <= ref[1])
    assert lib.hypervolume_2d(pts, ref) == pytest.approx(covered.mean(), abs=5e-3)


class _Trial:
    def __init__(self, state: str, **attrs: object) -> None:
        self.state = type("S", (), {"name": state})()
        self.user_attrs = attrs


def test_study_float_latency_pools_baseline_once_with_float_trials() -> None:
    trials = [
        _Trial("COMPLETE", baseline_latency_ms=2.0, summary="float", latency_ms=1.0),
        _Trial("COMPLETE", baseline_latency_ms=2.0, summary="int8 16/16 static u8", latency_ms=0.4),
        _Trial("FAIL", baseline_latency_ms=2.0, summary="float", latency_ms=9.0),
        _Trial("COMPLETE", baseline_latency_ms=2.0, summary="float", latency_ms=1.2),
    ]
    assert lib.study_float_latency(trials) == pytest.approx(1.2)  # median of 2.0 (once), 1.0, 1.2
    assert math.isnan(lib.study_float_latency([]))


def test_checkpoints() -> None:
    assert lib.checkpoints(40) == [10, 20, 40]
    assert lib.checkpoints(30) == [10, 20, 30]
    assert lib.checkpoints(6) == [3, 6]
    assert lib.checkpoints(1) == [1]


def test_quality_metrics() -> None:
    e = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert lib.mean_cosine(e, e) == pytest.approx(1.0)
    assert lib.mean_cosine(e, -e) == pytest.approx(-1.0)
    assert lib.nn_agreement(e, e) == 1.0
    theta = 0.7
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    assert lib.nn_agreement(e, e @ rot) == 1.0  # a rotation keeps every neighbour
    assert lib.nn_agreement(e, e[[0, 2, 1, 3]]) == 0.0  # neighbours 0-1 / 2-3 become 0-2 / 1-3
    assert lib.top1_agreement(np.eye(3), np.eye(3)[[0, 2, 1]]) == pytest.approx(1 / 3)


def test_cpu_flags_parses_cpuinfo_text() -> None:
    flags = lib.cpu_flags("processor : 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert flags["avx2"] and flags["avx512_vnni"] and not flags["amx_int8"]


def test_sentences_file_has_scored_and_calibration_sets() -> None:
    scored, calib = lib.read_sentences(BENCH / "sentences.txt")
    assert len(scored) >= 150 and len(calib) >= 20
    assert len(set(scored)) == len(scored) and not set(scored) & set(calib)


def test_table_marks_speedups_and_best_rows() -> None:
    base = lib.Row("float", "float", quality={"accuracy": 0.99, "agree": 1.0}, size_mb=2.8, latency_ms={1: 1.0, 2: 0.6})
    rows = [
        base,
        lib.Row("fast but wrong", "anchor", quality={"accuracy": 0.90, "agree": 0.9}, size_mb=0.7, latency_ms={1: 0.2, 2: 0.15}),
        lib.Row("int8", "anchor", quality={"accuracy": 0.985, "agree": 0.99}, size_mb=0.7, latency_ms={1: 0.4, 2: 0.3}),
        lib.Row("broken", "anchor", error="quantize_static failed"),
        lib.Row("AutoSearch trial 7", "autosearch", quality={"accuracy": 0.99, "agree": 0.99}, size_mb=0.5, latency_ms={1: 0.25, 2: 0.2}),
    ]
    best_a = lib.best_row(rows, "anchor", base_score=0.99, max_drop=0.01)
    best_s = lib.best_row(rows, "autosearch", base_score=0.99, max_drop=0.01)
    assert best_a is not None and best_a.method == "int8"
    assert best_s is not None and best_s.method == "AutoSearch trial 7"
    md = lib.format_table(rows, threads=[1, 2], base=base, marks={"int8": "best anchor", best_s.method: "best search"})
    parsed = {r["method"]: r for r in lib.parse_table(md)}
    assert list(parsed) == ["float", "fast but wrong", "int8", "broken", "AutoSearch trial 7"]
    assert lib.parse_speedup(parsed["int8"]["speedup 1T"]) == pytest.approx(2.5)
    assert lib.parse_speedup(parsed["AutoSearch trial 7"]["speedup 2T"]) == pytest.approx(3.0)
    assert parsed["int8"]["mark"] == "best anchor"
    assert parsed["broken"]["speedup 1T"] == "-" and "FAILED" in parsed["broken"]["notes"]
    assert parsed["fast but wrong"]["accuracy drop"] == "+0.0900"


def test_hv_table_renders_every_checkpoint() -> None:
    md = lib.format_hv_table({"AutoSearch (nsga2)": {10: (0.5, 2.0), 20: (0.6, 2.5)}, "random": {10: (0.4, 1.8), 20: (0.45, 1.9)}})
    rows = lib.parse_table(md, first_header="trials")
    assert [r["trials"] for r in rows] == ["10", "20"]
    assert float(rows[1]["random HV"]) == pytest.approx(0.45)


def test_cli_rejects_unknown_model() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "anchors.py"), "--models", "resnet50"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "unknown" in proc.stderr


@pytest.mark.slow
def test_anchors_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "anchors.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=3000, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert "onnxruntime" in report and "CPU:" in report and "command:" in report
    rows = {r["method"]: r for r in lib.parse_table(report)}
    expected = ["float", "ORT dynamic int8 per-tensor", "ORT dynamic int8 per-channel", "ORT static QDQ u8s8", "ORT static QDQ s8s8",
                "ORT static QDQ u8s8 reduce_range", "ORT static QDQ s8s8 reduce_range"]
    for name in expected:
        assert name in rows, f"row {name!r} missing from {list(rows)}"
    search = [m for m in rows if m.startswith("AutoSearch")]
    assert search, "no AutoSearch front row"
    for name in ["float", *search]:
        for t in (1, 2):
            sp = lib.parse_speedup(rows[name][f"speedup {t}T"])
            assert sp is not None and math.isfinite(sp) and sp > 0, (name, rows[name])
    assert lib.parse_speedup(rows["float"]["speedup 1T"]) == pytest.approx(1.0)
    working = [r for r in rows.values() if "FAILED" not in r["notes"]]
    assert all(lib.parse_speedup(r["speedup 1T"]) is not None for r in working)
    assert "AutoSearch best / best anchor at 1T" in report or "no front point meets" in report
    hv = lib.parse_table(report, first_header="trials")
    assert hv and all(float(v) >= 0 for r in hv for k, v in r.items() if k.endswith("HV"))


# --------------------------------------------------------------------------- benchmarks/onnx_prune.py: pure helpers
def _onnx_prune():
    """benchmarks/onnx_prune.py as a module."""
    import importlib.util

    if "bench_onnx_prune" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_onnx_prune", BENCH / "onnx_prune.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_onnx_prune"] = mod  # dataclasses look their module up while the class is built
        spec.loader.exec_module(mod)
    return sys.modules["bench_onnx_prune"]


class _Lat:
    def __init__(self, ms: float) -> None:
        self.median_ms, self.p10_ms, self.p90_ms = ms, 0.9 * ms, 1.1 * ms


def test_onnx_prune_weight_elements_follow_dequantize_and_skip_activations() -> None:
    from onnx import TensorProto, helper, numpy_helper

    op = _onnx_prune()
    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    wq = numpy_helper.from_array(np.zeros((4, 8), np.int8), "wq")
    scale = numpy_helper.from_array(np.ones(4, np.float32), "s")
    zp = numpy_helper.from_array(np.zeros(4, np.int8), "z")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], axis=0),
        helper.make_node("MatMul", ["f", "f2"], ["m"]),  # two activations: nothing counted
        helper.make_node("Gemm", ["f", "wd"], ["g"], transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                                           helper.make_tensor_value_info("f2", TensorProto.FLOAT, [8, 8])],
                              [helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, 4])], initializer=[w, b, wq, scale, zp])
    assert op.weight_elements(helper.make_model(graph)) == 8 * 27 + 8 + 4 * 8


def test_onnx_prune_summary_picks_fastest_at_bar_and_ratio() -> None:
    op = _onnx_prune()
    g = "m"
    rows = [
        op.Row(g, "float", "float", score=1.0),
        op.Row(g, "int8 a", "quant", score=1.0),
        op.Row(g, "int8 b", "quant", score=0.97),  # faster but below the bar
        op.Row(g, "prune 10%", "prune", score=0.99),
        op.Row(g, "prune 10% + int8 a", "prune+quant", score=0.984, extra={"quant": "int8 a"}),
        op.Row(g, "prune 10% + int8 b", "prune+quant", score=0.99, extra={"quant": "int8 b"}),
        op.Row(g, "prune 25% + int8 a", "prune+quant", score=0.5, extra={"quant": "int8 a"}),
        op.Row(g, "broken", "prune+quant", error="CandidateError: no"),
    ]
    lat = {f"{g}: float": _Lat(5.0), f"{g}: int8 a": _Lat(6.0), f"{g}: int8 b": _Lat(3.0), f"{g}: prune 10%": _Lat(4.0),
           f"{g}: prune 10% + int8 a": _Lat(3.0), f"{g}: prune 10% + int8 b": _Lat(2.0), f"{g}: prune 25% + int8 a": _Lat(1.0)}
    assert op.fastest_at_bar(rows, lat, 0.98, ("quant",)).label == "int8 a"
    lines, marks = op.summary_lines(rows, lat, rows[0], 0.98, "argmax_agreement")
    text = "\n".join(lines)
    assert "**(b) / (a): 3.00x**" in text and "slower than float" in text and "(b) is 2.50x" in text
    assert "the int8 setting of (a), fastest at the bar: prune 10% + int8 a (" in text
    assert marks == {f"{g}: int8 a": "(a)", f"{g}: prune 10% + int8 b": "(b)"}
    md = op.format_table(rows, lat, {g: rows[0]}, score_name="argmax_agreement", bar=0.98, marks=marks)
    parsed = {r["variant"]: r for r in lib.parse_table(md, first_header="variant")}
    assert parsed["int8 a"]["speedup"] == "0.83x" and parsed["int8 a"]["mark"] == "(a)"
    assert parsed["int8 b"]["at bar"] == "no" and "FAILED" in parsed["broken"]["notes"]
    assert len({ln.count("|") for ln in md.splitlines()}) == 1  # every line, a failed one too, has every column
    assert "over quantization alone: 3.00x** (prune 10% + int8 b" in text  # the fastest pruned row at the bar, int8 or not
    none_lines, _ = op.summary_lines(rows[:3], lat, rows[0], 0.98, "argmax_agreement")
    assert any("no pruned + quantized row reaches the bar" in ln for ln in none_lines)
    alone, _ = op.summary_lines([r for r in rows if r.kind != "prune+quant"], lat, rows[0], 0.98, "argmax_agreement")
    assert any("over quantization alone: 1.50x** (prune 10%," in ln for ln in alone), alone  # pruning without int8 counts


def test_onnx_prune_cli_and_estimate() -> None:
    op = _onnx_prune()
    assert op.fmt_seconds(75) == "1 min 15 s" and op.fmt_seconds(40) == "40 s"
    quick, full = op.budget_for(True), op.budget_for(False)
    assert op.estimate_seconds(quick, op.PARTS) < 300 < op.estimate_seconds(full, op.PARTS) < 1200
    with pytest.raises(SystemExit):
        op.parse_args(["--parts", "resnet"])
    assert op.parse_args(["--parts", "digits", "--threads", "2"]).parts == ["digits"]
