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
