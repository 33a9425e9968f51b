"""The search spine end to end: real ORT timings, real SQLite study, resume, failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import tiny_onnx

from autosearch import FidelityEvaluator, Study, StudyMismatchError, search
from autosearch.errors import ConfigError

QUANT_SPACE = {
    "knobs": {"bits": {"choices": [32, 8]}},
    "quantization": {"mode": ["static"], "activation_type": ["uint8", "int8"], "per_channel": [True, False], "calibration_samples": 64},
    "constraints": {"max_accuracy_drop": 0.02},
    "sampler": {"name": "nsga2", "seed": 0, "population_size": 4},
    "strategy": {"analysis": False},
}


def _dominated(a: np.ndarray, others: np.ndarray) -> bool:
    return bool(np.any(np.all(others <= a, axis=1) & np.any(others < a, axis=1)))


def test_search_then_resume_keeps_every_trial(small_problem, fast_target, tmp_path: Path) -> None:
    model, ev, example = small_problem
    kw = dict(example_inputs=example, space=QUANT_SPACE, target=fast_target, study_name="resume", studies_dir=tmp_path, verbose=False)
    first = search(model, ev, n_trials=5, **kw)
    assert len(first.optuna_study.trials) == 5
    assert (tmp_path / "resume.db").exists()
    second = search(model, ev, n_trials=5, **kw)
    st = second.optuna_study
    assert len(st.trials) == 10 and [t.number for t in st.trials] == list(range(10))
    assert st.metric_names == ["accuracy", "latency_ms"]
    assert st.user_attrs["autosearch"]["sampler"]["name"] == "nsga2"
    df = second.trials()
    assert list(df["state"]).count("COMPLETE") >= 8
    done = df[df["state"] == "COMPLETE"]
    for path in done["onnx"]:
        assert Path(path).exists()
    # the front is computed over both runs: no front point is dominated by any feasible trial
    front = second.front()
    assert len(front) >= 1
    feas = done[done["feasible"] == True]  # noqa: E712
    pts = np.c_[-feas["accuracy"].to_numpy(float), feas["latency_ms"].to_numpy(float)]
    for _, row in front.iterrows():
        assert not _dominated(np.array([-row["accuracy"], row["latency_ms"]]), pts)
    # the first trial is the float model (warm start), recorded with its full config
    t0 = st.trials[0]
    assert t0.user_attrs["summary"] == "float" and t0.user_attrs["candidate"]["bits"] == {}
    t1 = st.trials[1]
    assert set(t1.user_attrs["candidate"]["bits"].values()) == {8}
    assert {"median_ms", "p10_ms", "p90_ms", "runs", "provider", "threads", "ort_version", "cpu"} <= set(t1.user_attrs["latency"])
    # reloading from storage alone gives the same front
    again = Study.load("resume", studies_dir=tmp_path)
    assert list(again.front()["trial"]) == list(front["trial"])


def test_resume_with_another_space_or_model_is_refused(mlp_onnx: Path, fast_target, tmp_path: Path) -> None:
    kw = dict(space=QUANT_SPACE, target=fast_target, study_name="s", studies_dir=tmp_path, verbose=False)
    search(mlp_onnx, n_trials=2, **kw)
    other_space = {**QUANT_SPACE, "quantization": {**QUANT_SPACE["quantization"], "per_channel": [True]}}
    with pytest.raises(StudyMismatchError, match="different search space"):
        search(mlp_onnx, n_trials=1, **{**kw, "space": other_space})
    other_model = tiny_onnx(tmp_path / "other.onnx", seed=5)
    with pytest.raises(StudyMismatchError, match="different model.*new study name"):
        search(other_model, n_trials=1, **kw)
    assert len(Study.load("s", studies_dir=tmp_path).optuna_study.trials) == 2  # nothing lost


def test_failing_candidates_are_failed_trials_and_the_study_goes_on(mlp_onnx: Path, fast_target, tmp_path: Path) -> None:
    space = {"knobs": {"bits": [32, 16]}, "quantization": {"mode": "dynamic"}, "constraints": {"max_accuracy_drop": None},
             "strategy": {"analysis": False}}
    study = search(mlp_onnx, space=space, target=fast_target, study_name="f", studies_dir=tmp_path, n_trials=6, verbose=False)
    df = study.trials()
    assert len(df) == 6
    failed = df[df["state"] == "FAIL"]
    assert len(failed) >= 1
    assert all("16/4-bit units need static quantization" in r for r in failed["reason"])
    assert (df["state"] == "COMPLETE").sum() >= 1  # the float point at least


def test_a_bug_stops_the_run_loudly(mlp_onnx: Path, fast_target, tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)

    class Buggy(FidelityEvaluator):
        calls = 0

        def __call__(self, session, *, limit=None):
            Buggy.calls += 1
            if Buggy.calls > 2:  # baseline, then the first trial pass; the second trial hits the bug
                raise ZeroDivisionError("bug in user code")
            return super().__call__(session, limit=limit)

    with pytest.raises(ZeroDivisionError):
        search(mlp_onnx, Buggy(x), space=QUANT_SPACE, target=fast_target, study_name="b", studies_dir=tmp_path, n_trials=4, verbose=False)
    st = optuna.load_study(study_name="b", storage=f"sqlite:///{tmp_path / 'b.db'}")
    assert st.trials[0].state == optuna.trial.TrialState.COMPLETE  # finished work is kept


def test_identical_candidates_are_not_rebuilt(mlp_onnx: Path, fast_target, tmp_path: Path) -> None:
    space = {"knobs": {"bits": [8]}, "quantization": {"mode": "static"}, "constraints": {"max_accuracy_drop": None},
             "strategy": {"analysis": False, "remeasure_front": False}}
    study = search(mlp_onnx, space=space, target=fast_target, study_name="c", studies_dir=tmp_path, n_trials=3, verbose=False)
    trials = study.optuna_study.trials
    assert [t.user_attrs.get("cached", False) for t in trials] == [False, True, True]
    assert trials[0].user_attrs["latency_ms"] == trials[2].user_attrs["latency_ms"]
    assert len(list((tmp_path / "c" / "candidates").iterdir())) == 1


def test_fidelity_search_without_labels(mlp_onnx: Path, fast_target, tmp_path: Path) -> None:
    study = search(mlp_onnx, space=QUANT_SPACE, target=fast_target, study_name="nolabels", studies_dir=tmp_path, n_trials=3, verbose=False)
    assert study.meta["evaluator"] == "fidelity_scaled_cosine"
    assert study.baseline["accuracy"] == pytest.approx(1.0)


def test_load_missing_study_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no study database at"):
        Study.load("nope", studies_dir=tmp_path)
