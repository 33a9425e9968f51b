"""Profiler: real ONNX Runtime timings with statistics and provenance."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_onnx

from autosearch.errors import CandidateError, ConfigError
from autosearch.model import import_model
from autosearch.target import Target, interleaved


def test_profile_statistics_are_consistent(mlp_onnx: Path, fast_target: Target) -> None:
    src = import_model(mlp_onnx)
    stats = fast_target.profile(mlp_onnx, src.example_feed)
    assert stats.runs >= fast_target.min_runs
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.iqr_rel >= 0
    assert stats.provider == "CPUExecutionProvider" and stats.threads == 1
    assert stats.ort_version and stats.cpu


def test_a_much_bigger_model_measures_slower(tmp_path: Path, fast_target: Target) -> None:
    small = tiny_onnx(tmp_path / "s.onnx", in_features=16, hidden=16)
    big = tiny_onnx(tmp_path / "b.onnx", in_features=512, hidden=4096)
    feed_s = import_model(small).example_feed
    feed_b = import_model(big).example_feed
    s = fast_target.profile(small, feed_s).median_ms
    b = fast_target.profile(big, feed_b).median_ms
    assert b > 3 * s


def test_interleaved_measures_each_model(tmp_path: Path, fast_target: Target) -> None:
    a = tiny_onnx(tmp_path / "a.onnx")
    feed = import_model(a).example_feed
    out = interleaved([("a", a), ("a2", a)], feed, fast_target, rounds=3)
    assert set(out) == {"a", "a2"} and all(s.runs >= 30 for s in out.values())


def test_bad_target_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="execution provider 'NoSuchProvider' is not available here; available: .*CPUExecutionProvider"):
        Target(providers=("NoSuchProvider",))
    with pytest.raises(ConfigError, match="graph_optimization_level 'max'"):
        Target(graph_optimization_level="max")


def test_model_ort_refuses_is_a_candidate_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(CandidateError, match="ONNX Runtime cannot load the model"):
        Target().session(bad)
