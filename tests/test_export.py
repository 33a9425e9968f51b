"""Picking a trial by rule, exporting it, and the verification report (real ORT, real study)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from conftest import tiny_onnx

from autosearch import Candidate, ConfigError, Study, Target, search
from autosearch.export import export_trial, pick_trial

SPACE = {"knobs": {"bits": {"choices": [32, 8]}}, "quantization": {"mode": ["static"], "activation_type": ["uint8", "int8"]},
         "strategy": {"analysis": False, "remeasure_front": False}}  # keep the test fast


def handmade_study(rows: list[dict[str, Any]]) -> Study:
    """An in-memory study with trials of given figures (no model): for the picking rules."""
    ost = optuna.create_study(directions=["maximize", "minimize"])
    ost.set_user_attr("autosearch", {"objectives": ["accuracy", "latency_ms"], "evaluator": "accuracy", "units": {"bits": ["a", "b"]}})
    ost.set_user_attr("baseline", {"accuracy": 0.95, "latency_ms": 10.0, "size_mb": 4.0})
    for r in rows:
        state = r.get("state", optuna.trial.TrialState.COMPLETE)
        complete = state == optuna.trial.TrialState.COMPLETE
        ua = {"accuracy": r.get("acc"), "latency_ms": r.get("lat"), "size_mb": r.get("size", 1.0), "feasible": r.get("feasible", True),
              "speedup": 10.0 / r["lat"] if r.get("lat") else None, "summary": "x", "candidate": {}}
        if not complete:
            ua = {"fail_reason": "quantizer exploded", "summary": "x"}
        ost.add_trial(optuna.trial.create_trial(state=state, values=[r["acc"], r["lat"]] if complete else None, user_attrs=ua))
    return Study(ost)


@pytest.fixture()
def picks() -> Study:
    #   trial: 0 float   1 feasible    2 knee      3 fastest but infeasible   4 FAIL   5 small, slowish
    return handmade_study([
        {"acc": 0.95, "lat": 10.0, "size": 4.0},
        {"acc": 0.949, "lat": 8.0, "size": 2.0},
        {"acc": 0.945, "lat": 3.0, "size": 1.5},
        {"acc": 0.90, "lat": 2.0, "size": 1.2, "feasible": False},
        {"state": optuna.trial.TrialState.FAIL},
        {"acc": 0.944, "lat": 9.0, "size": 1.0},
    ])


def test_pick_rules(picks: Study) -> None:
    assert pick_trial(picks, "fastest") == 2  # trial 3 is faster but below the study's floor
    assert pick_trial(picks, "fastest:0.9") == 3  # an explicit floor replaces the study's constraint
    assert pick_trial(picks, "fastest:0.948") == 1
    assert pick_trial(picks, "smallest") == 5
    assert pick_trial(picks, "smallest:0.946") == 1
    # feasible front: 2 (3 ms), 1 (8 ms), 0 (10 ms); in (latency, accuracy) scaled to [0, 1]:
    # 2 -> (0, 0), 1 -> (5/7, 0.8), 0 -> (1, 1): trial 1 is off the line joining the ends, the knee
    assert pick_trial(picks, "knee") == 1
    assert pick_trial(picks, 0) == 0 and pick_trial(picks, "5") == 5 and pick_trial(picks, " Fastest ") == 2


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("fastest:0.99", r"no complete trial .* reaches accuracy >= 0.99; the best accuracy available is 0.9500 \(trial 0\)"),
        ("fastest:high", r"floor after ':' must be a number, e.g. 'fastest:0.98'"),
        ("slowest", r"unknown pick rule 'slowest'; use one of: .*knee"),
        (4, r"trial 4 .* is FAIL, not COMPLETE \(quantizer exploded\)"),
        (17, r"trial 17 does not exist .* \(trials: 0-5\)"),
        (True, r"pick rule must be a trial number"),
    ],
)
def test_pick_errors_name_the_fix(picks: Study, rule: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pick_trial(picks, rule)


def test_pick_without_a_feasible_trial_gives_the_best_accuracy() -> None:
    st = handmade_study([{"acc": 0.8, "lat": 1.0, "feasible": False}, {"acc": 0.85, "lat": 2.0, "feasible": False}])
    with pytest.raises(ConfigError, match=r"meets its accuracy constraint; the best accuracy available is 0.8500 \(trial 1\).*'fastest:0.850'"):
        pick_trial(st, "fastest")
    assert pick_trial(st, "knee") == 1  # two front points: no knee between them, the accurate one


@pytest.fixture(scope="module")
def study(small_problem, tmp_path_factory: pytest.TempPathFactory) -> Study:
    model, ev, example = small_problem
    home = tmp_path_factory.mktemp("export_study")
    target = Target(threads=1, warmup=3, min_runs=20, max_runs=200, max_seconds=0.3, lock_path=str(home / "lock"))
    return search(model, ev, example_inputs=example, space=SPACE, target=target, study_name="ex", n_trials=6,
                  studies_dir=home / "studies", verbose=False)


def _target(tmp_path: Path) -> Target:
    return Target(threads=1, warmup=3, min_runs=20, max_runs=200, max_seconds=0.3, lock_path=str(tmp_path / "lock"))


def test_export_float_trial_matches_the_original_exactly(study: Study, small_problem, tmp_path: Path) -> None:
    _, ev, example = small_problem
    # latency within any factor counts as agreement here, so the verdict does not hang on machine load
    rep = export_trial(study, 0, tmp_path / "out", evaluator=ev, example_inputs=example, target=_target(tmp_path),
                       latency_tolerance=1e6)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.onnx", "config.yaml", "metrics.json", "report.md", "report.json"} <= names
    assert rep.max_abs_diff == 0.0 and rep.diff_on.endswith("evaluation sample(s)")
    assert rep.measured["accuracy"] == pytest.approx(study.trials()["accuracy"][0], abs=1e-9)
    assert rep.measured["original_accuracy"] == pytest.approx(rep.measured["accuracy"], abs=1e-9)
    assert rep.details["checks"] == {"accuracy": True, "latency": True} and rep.agrees is True
    assert rep.measured["latency_ms"] > 0 and rep.measured["original_latency_ms"] > 0
    assert rep.verdict == "AGREES: the re-measured figures (accuracy and latency) agree with the study's, within noise"
    assert rep.verdict in (tmp_path / "out" / "report.md").read_text()
    js = json.loads((tmp_path / "out" / "report.json").read_text())
    assert js["trial"] == 0 and js["max_abs_diff"] == 0.0 and js["verdict"] == rep.verdict


def test_export_quantized_trial_config_metrics_and_report(study: Study, small_problem, tmp_path: Path) -> None:
    _, ev, example = small_problem
    done = study.trials(include_failed=False)
    number = next(int(r.trial) for r in done.itertuples() if study.candidate(int(r.trial)).quantized)
    rep = export_trial(study, number, tmp_path / "q", evaluator=ev, example_inputs=example, target=_target(tmp_path))
    trial = study.optuna_study.trials[number]
    cfg = yaml.safe_load((tmp_path / "q" / "config.yaml").read_text())
    assert Candidate.from_dict(cfg["candidate"]).to_dict() == study.candidate(number).to_dict()
    units = study.meta["units"]["bits"]
    assert set(cfg["units"]) == set(units) and all(cfg["units"][u]["bits"] in (8, 32) for u in units)
    assert cfg["quantization"]["mode"] == "static"
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(trial.user_attrs["accuracy"]) and metrics["latency_ms"] == pytest.approx(trial.user_attrs["latency_ms"])
    assert (tmp_path / "q" / "model.onnx").read_bytes() == Path(trial.user_attrs["onnx_path"]).read_bytes()
    # the same quantized file scores the same: the accuracy check agrees; outputs differ from the float model
    assert rep.details["checks"]["accuracy"] is True
    assert rep.max_abs_diff is not None and rep.max_abs_diff > 0
    assert "| accuracy |" in (tmp_path / "q" / "report.md").read_text()
    assert "re-measured" in rep.table() and "float original" in rep.table()


def test_export_without_evaluator_says_what_was_not_checked(study: Study, tmp_path: Path) -> None:
    rep = export_trial(study, "knee", tmp_path / "k", target=_target(tmp_path))
    assert rep.trial == pick_trial(study, "knee")
    assert "accuracy" not in rep.measured and rep.details["checks"]["accuracy"] is None
    assert any("created from Python" in n for n in rep.notes) and any("random input" in n for n in rep.notes)
    assert rep.max_abs_diff is not None and rep.diff_on == "a random input (batch 1)"


def test_export_rejects_a_bad_folder_and_tolerance(study: Study, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        export_trial(study, 0, tmp_path / "file")
    with pytest.raises(ConfigError, match="latency_tolerance must be a positive fraction"):
        export_trial(study, 0, tmp_path / "o", latency_tolerance=-1)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autosearch", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_export_rebuilds_the_evaluator_from_the_study(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    import onnxruntime as ort

    y = ort.InferenceSession(str(model)).run(None, {"x": x})[0].argmax(1)
    np.savez(tmp_path / "val.npz", x=x, y=y)
    out = _cli("search", "--model", "mlp.onnx", "--data", "val.npz", "--space", "quant", "--study", "c", "--n-trials", "3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # a tolerance no timing noise reaches: the verdict then depends on the accuracy alone, which must agree
    out = _cli("export", "c", "--pick", "fastest:0.5", "-o", "exp", "--latency-tolerance", "1e6", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rep = json.loads((tmp_path / "exp" / "report.json").read_text())
    assert "re-measured" in out.stdout and rep["verdict"] in out.stdout
    assert rep["verdict"].startswith("AGREES: the re-measured figures (accuracy and latency)") and rep["agrees"] is True
    assert rep["rule"] == "fastest:0.5" and rep["checks"]["accuracy"] is True  # labels rebuilt from the CLI spec
    assert rep["diff_on"] == "200 evaluation sample(s)"
    out = _cli("export", "c", "--pick", "fastest:1.5", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("autosearch: error: pick 'fastest:1.5'") and "Traceback" not in out.stderr
    assert "best accuracy available" in out.stderr
    help_ = _cli("export", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "examples:" in help_.stdout
