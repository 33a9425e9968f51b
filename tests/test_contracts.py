"""Contract suites: what the search relies on from every evaluator, target and storage, run by each
implementation there is (the knob contract is in tests/test_knobs.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import tiny_onnx

from autosearch.evaluate import Evaluator, FidelityEvaluator, LabelledEvaluator, default_evaluator
from autosearch.target import LatencyStats, Target

N = 96


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((N, 16)).astype(np.float32), rng.standard_normal((40, 16)).astype(np.float32), rng


def _evaluators(model: Path) -> dict[str, Any]:
    x, cal, _ = _data()
    y = ort.InferenceSession(str(model)).run(None, {"x": x})[0].argmax(1)
    import onnx

    return {
        "labelled": LabelledEvaluator(x, y, calibration=cal),
        "fidelity-scaled_cosine": FidelityEvaluator(x, calibration=cal),
        "fidelity-top1": FidelityEvaluator(x, metric="top1", calibration=cal),
        "default": default_evaluator(onnx.load(str(model))),
    }


@pytest.fixture(params=["labelled", "fidelity-scaled_cosine", "fidelity-top1", "default"])
def evaluator_case(request, tmp_path: Path) -> tuple[Any, Path, Path]:
    model = tiny_onnx(tmp_path / "m.onnx")
    other = tiny_onnx(tmp_path / "other.onnx", seed=7)  # another model with the same signature
    ev = _evaluators(model)[request.param]
    if isinstance(ev, FidelityEvaluator):
        ev.prepare(ort.InferenceSession(str(model)))
    return ev, model, other


def test_evaluator_contract(evaluator_case: tuple[Any, Path, Path]) -> None:
    """Higher is better and the original scores best; scores are deterministic; ``limit`` scores a subset;
    calibration feeds are single samples keyed by input name."""
    ev, model, other = evaluator_case
    assert isinstance(ev, Evaluator) and isinstance(ev.name, str) and ev.name
    sess, worse = ort.InferenceSession(str(model)), ort.InferenceSession(str(other))
    full = ev(sess)
    assert isinstance(full, float) and full == pytest.approx(1.0)  # the model agrees with itself / its own labels
    assert ev(sess) == full  # deterministic
    assert ev(worse) < full - 0.05  # a different model scores lower
    assert any(ev(worse, limit=k) != ev(worse) for k in (3, 8, 16))  # limit scores a subset, not all samples
    feeds = ev.calibration_feeds(5, ["x"])
    assert len(feeds) == 5 and all(set(f) == {"x"} and f["x"].shape == (1, 16) for f in feeds)


@pytest.fixture(params=["cpu-1-thread", "cpu-2-threads"])
def target(request, tmp_path: Path) -> Target:
    threads = 1 if request.param == "cpu-1-thread" else 2
    return Target(threads=threads, warmup=2, min_runs=15, max_runs=100, max_seconds=0.2, lock_path=str(tmp_path / "lock"))


def test_target_contract(target: Target, tmp_path: Path) -> None:
    """A session carries the target's settings; profile returns consistent statistics of at least
    ``min_runs`` runs; describe() names what the study records to refuse a resume on another target."""
    model = tiny_onnx(tmp_path / "m.onnx")
    sess = target.session(model)
    assert sess.get_session_options().intra_op_num_threads == target.threads
    assert sess.get_providers()[0] == target.providers[0]
    stats = target.profile(sess, {"x": np.zeros((1, 16), np.float32)})
    assert isinstance(stats, LatencyStats)
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms and stats.runs >= target.min_runs
    assert stats.threads == target.threads and stats.provider == target.providers[0] and stats.ort_version == ort.__version__
    desc = target.describe()
    assert {"providers", "threads", "graph_optimization_level"} <= set(desc)
    assert desc["threads"] == target.threads


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'contract.db'}"


@pytest.fixture(params=["sqlite"])
def storage_url(request, tmp_path: Path) -> str:
    return {"sqlite": _sqlite}[request.param](tmp_path)


def test_storage_contract(storage_url: str, tmp_path: Path) -> None:
    """A search records every trial with its candidate and figures; a second process-free resume adds to it;
    the study opens again by name with no model (what export, the dashboard and the CLI rely on)."""
    from autosearch import Study, search

    model = tiny_onnx(tmp_path / "m.onnx")
    space = {"knobs": {"bits": [32, 8]}, "quantization": {"mode": ["dynamic"]}, "strategy": {"analysis": False,
             "remeasure_front": False}, "sampler": {"name": "random"}}
    target = Target(threads=1, warmup=2, min_runs=10, max_runs=50, max_seconds=0.2, lock_path=str(tmp_path / "lock"))
    kw: dict[str, Any] = {"space": space, "target": target, "study_name": "c", "storage": storage_url,
                          "studies_dir": tmp_path / "studies", "verbose": False}
    first = search(str(model), n_trials=2, **kw)
    numbers = [t.number for t in first.optuna_study.trials]
    search(str(model), n_trials=2, **kw)
    again = Study.load("c", storage_url, studies_dir=tmp_path / "studies")
    df = again.trials()
    assert list(df["trial"])[: len(numbers)] == numbers and len(df) == len(numbers) + 2
    assert set(df["state"]) == {"COMPLETE"} and df["latency_ms"].gt(0).all() and df["config"].str.len().gt(0).all()
    assert again.meta["units"]["bits"] == ["fc1_matmul", "fc2"]
