"""Guards: a study resumed only on the data it was made with, and bad input refused up front.

Every refusal is one ``ConfigError`` line that names the problem and the fix, raised before any trial
runs: each test checks the message and that the study on disk did not change (or was never created).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import optuna
import pytest
from conftest import tiny_onnx
from onnx import TensorProto, helper

from autosearch import FidelityEvaluator, LabelledEvaluator, Study, StudyMismatchError, Target, search
from autosearch.cli import main
from autosearch.errors import ConfigError
from autosearch.evaluate import evaluator_fingerprint
from autosearch.export import export_trial

SPACE: dict[str, Any] = {
    "knobs": {"bits": [32, 8]},
    "quantization": {"mode": ["static"], "calibration_samples": 16},
    "constraints": {"max_accuracy_drop": 0.02},
    "sampler": {"name": "random", "seed": 0},
    "strategy": {"analysis": False, "remeasure_front": False},
}
ONE = {**SPACE, "knobs": {"bits": [8]}}  # one candidate: every trial after the first is the cached one
N = 128  # one sample moves accuracy by 0.0078, under the 0.02 allowed


def _target(d: Path) -> Target:
    return Target(threads=1, warmup=2, min_runs=10, max_runs=50, max_seconds=0.1, lock_path=str(d / "lock"))


def _labels(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].argmax(1)


def snapshot(studies: Path, name: str) -> Any:
    """What a study holds (trials with their states, values and attributes; the study's attributes), or
    ``None`` when it does not exist."""
    db = studies / f"{name}.db"
    if not db.exists():
        return None
    try:
        st = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    except KeyError:
        return None
    return [(t.number, t.state.name, t.values, t.user_attrs) for t in st.trials], st.user_attrs


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small study on the MLP with labels, scored 1.0 by the float model (two trials)."""
    d = tmp_path_factory.mktemp("guards")
    model = tiny_onnx(d / "mlp.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 16)).astype(np.float32)
    calib = rng.standard_normal((32, 16)).astype(np.float32)
    y = _labels(model, x)
    kw = {"space": SPACE, "target": _target(d), "study_name": "base", "studies_dir": d / "studies", "verbose": False}
    search(model, LabelledEvaluator(x, y, calibration=calib), n_trials=2, **kw)
    return {"dir": d, "model": model, "x": x, "y": y, "calib": calib, "kw": kw, "studies": d / "studies"}


def _refused_resume(base: dict[str, Any], evaluator: Any, match: str) -> None:
    before = snapshot(base["studies"], "base")
    with pytest.raises(StudyMismatchError, match=match) as err:
        search(base["model"], evaluator, n_trials=1, **base["kw"])
    assert "\n" not in str(err.value)
    assert snapshot(base["studies"], "base") == before  # nothing run, nothing recorded


# --------------------------------------------------------------------------- 1. integrity
FIX = r"different evaluation data or metric .*evaluator_fingerprint.*use the same data, or a new study name"


def test_resume_with_other_labels_is_refused(base: dict[str, Any]) -> None:
    y = (base["y"] + 1) % 10  # the float model would score 0.0 on these; a cached candidate would keep its 1.0
    _refused_resume(base, LabelledEvaluator(base["x"], y, calibration=base["calib"]), FIX)


def test_resume_with_other_inputs_is_refused(base: dict[str, Any]) -> None:
    x = base["x"].copy()
    x[0, 0] += 1.0  # one value of one sample
    _refused_resume(base, LabelledEvaluator(x, base["y"], calibration=base["calib"]), FIX)


def test_resume_with_other_calibration_samples_is_refused(base: dict[str, Any]) -> None:
    _refused_resume(base, LabelledEvaluator(base["x"], base["y"], calibration=base["calib"][:16]), FIX)


def test_resume_with_another_metric_is_refused(base: dict[str, Any]) -> None:
    def accuracy(outs: list[np.ndarray], labels: np.ndarray) -> float:
        return float((outs[0].argmax(1) == labels).mean())

    _refused_resume(base, LabelledEvaluator(base["x"], base["y"], calibration=base["calib"], metric=accuracy), FIX)


def test_fingerprint_follows_data_and_metric() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((20, 4)).astype(np.float32), np.arange(20) % 3
    fp = LabelledEvaluator(x, y).fingerprint()
    assert fp == LabelledEvaluator(x.copy(), y.copy()).fingerprint()  # the data, not the objects
    others = [LabelledEvaluator(x, y[::-1].copy()), LabelledEvaluator(x.astype(np.float64), y),
              LabelledEvaluator(x, y, calibration=x[:5]), LabelledEvaluator(x, y, metric=lambda o, t: 0.0),
              FidelityEvaluator(x)]
    assert len({fp, *(e.fingerprint() for e in others)}) == 1 + len(others)
    assert FidelityEvaluator(x).fingerprint() != FidelityEvaluator(x, metric="top1").fingerprint()
    assert FidelityEvaluator([{"x": x[:1]}]).fingerprint() == FidelityEvaluator([{"x": x[:1].copy()}]).fingerprint()


def test_the_default_evaluator_has_a_stable_fingerprint(mlp_onnx: Path) -> None:
    from autosearch.evaluate import default_evaluator

    model = onnx.load(str(mlp_onnx))
    assert default_evaluator(model).fingerprint() == default_evaluator(model).fingerprint()  # seeded random inputs
    assert default_evaluator(model).fingerprint() != default_evaluator(model, n=8).fingerprint()


def test_candidate_folder_depends_on_the_evaluator(base: dict[str, Any]) -> None:
    from autosearch import Candidate
    from autosearch.model import import_model
    from autosearch.store import CandidateStore

    src = import_model(base["model"])
    cand = Candidate(bits={"fc2": 8})

    def folder(ev: Any) -> Path:
        return CandidateStore(base["dir"], src, {}, [], ev, _target(base["dir"]), 1.0).folder(cand)

    same = folder(LabelledEvaluator(base["x"], base["y"]))
    assert same == folder(LabelledEvaluator(base["x"].copy(), base["y"].copy()))
    assert same != folder(LabelledEvaluator(base["x"], (base["y"] + 1) % 10))
    assert same.name != cand.key(src.fingerprint)  # Candidate.key itself is unchanged: the store mixes the data in


def test_resume_with_the_same_data_reuses_cached_candidates(base: dict[str, Any], tmp_path: Path) -> None:
    kw = {**base["kw"], "space": ONE, "study_name": "same", "studies_dir": tmp_path}
    search(base["model"], LabelledEvaluator(base["x"], base["y"], calibration=base["calib"]), n_trials=1, **kw)
    again = search(base["model"], LabelledEvaluator(base["x"].copy(), base["y"].copy(), calibration=base["calib"].copy()),
                   n_trials=1, **kw)
    trials = again.optuna_study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert [bool(t.user_attrs.get("cached")) for t in trials] == [False, True]
    assert trials[1].user_attrs["accuracy"] == trials[0].user_attrs["accuracy"] and again.baseline["accuracy"] == 1.0
    assert len(list((tmp_path / "same" / "candidates").iterdir())) == 1
    assert again.meta["evaluator_fingerprint"] == LabelledEvaluator(base["x"], base["y"], calibration=base["calib"]).fingerprint()


def test_a_scorer_without_fingerprint_falls_back_to_its_name(base: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    class Mine:
        name = "mine"

        def __call__(self, session: Any, *, limit: int | None = None) -> float:
            return 1.0

        def calibration_feeds(self, n: int, input_names: Any) -> list[dict[str, np.ndarray]]:
            return [{"x": base["calib"][i : i + 1]} for i in range(min(n, 8))]

    assert evaluator_fingerprint(Mine()) == ("name:mine", False)
    st = search(base["model"], Mine(), n_trials=0, **{**base["kw"], "study_name": "mine", "studies_dir": tmp_path, "verbose": True})
    assert "evaluator 'mine' has no fingerprint()" in capsys.readouterr().out
    assert st.meta["evaluator_fingerprint"] == "name:mine"


def test_a_study_made_before_fingerprints_resumes_and_records_one(base: dict[str, Any], tmp_path: Path) -> None:
    kw = {**base["kw"], "space": ONE, "study_name": "old", "studies_dir": tmp_path}
    ev = LabelledEvaluator(base["x"], base["y"], calibration=base["calib"])
    st = search(base["model"], ev, n_trials=1, **kw)
    meta = st.meta
    del meta["evaluator_fingerprint"]
    st.optuna_study.set_user_attr("autosearch", meta)
    again = search(base["model"], ev, n_trials=1, **kw)
    assert len(again.optuna_study.trials) == 2 and again.meta["evaluator_fingerprint"] == ev.fingerprint()


# --------------------------------------------------------------------------- 2. names and storage URLs
BAD_NAMES = ["", "  ", "a/b", "../up", "a..b", ".hidden", "back\\slash"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_study_name_is_a_plain_name(name: str, mlp_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"study name .*(empty|plain name)") as err:
        search(mlp_onnx, study_name=name, studies_dir=tmp_path / "s", space=SPACE, n_trials=1, verbose=False)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.rglob("*.db"))  # no study anywhere


def test_load_and_cli_check_the_name_too(tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(ConfigError, match=r"study name '\.\.' holds '\.\.'.*plain name.*--studies-dir"):
        Study.load("..", studies_dir=tmp_path)
    assert main(["front", "a/b", "--studies-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autosearch: error: study name 'a/b' holds '/'") and err.count("\n") == 1


@pytest.mark.parametrize(("url", "match"), [
    ("notaurl", r"storage 'notaurl' is not a database URL .*write it as sqlite:///"),
    ("foo://host/db", r"unknown database 'foo'; use sqlite:///\.\.\. or postgresql\+psycopg"),
    # a driver no extra installs (psycopg is in the [postgres] extra, so postgresql:// may well open)
    ("postgresql+pg8000://user:secret@localhost/db", r"needs the Python driver 'pg8000' .*pip install pg8000"),
    ("sqlite:////no/such/folder/x.db", r"folder '/no/such/folder' of the SQLite file does not exist: create it"),
])
def test_storage_urls_are_checked(url: str, match: str, mlp_onnx: Path, tmp_path: Path) -> None:
    for call in (lambda: search(mlp_onnx, storage=url, studies_dir=tmp_path, space=SPACE, n_trials=1, verbose=False),
                 lambda: Study.load("x", url, studies_dir=tmp_path)):
        with pytest.raises(ConfigError, match=match) as err:
            call()
        assert "\n" not in str(err.value) and "secret" not in str(err.value)
    assert not list(tmp_path.rglob("*.db"))


def test_cli_storage_error_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "autosearch", "front", "x", "--storage", "notaurl"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("autosearch: error: storage 'notaurl' is not a database URL") and out.stderr.count("\n") == 1


# --------------------------------------------------------------------------- 3. bad input, refused before any trial
def _refused_fresh(call: Any, match: str, studies: Path) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    assert not list(studies.rglob("*.db")) if studies.exists() else True


def _nan_at(x: np.ndarray, i: int, value: float = np.nan) -> np.ndarray:
    x = x.copy()
    x[i, 3] = value
    return x


def test_nan_in_evaluation_inputs(base: dict[str, Any]) -> None:
    _refused_fresh(lambda: LabelledEvaluator(_nan_at(base["x"], 7), base["y"]),
                   r"evaluation inputs hold 1 NaN or inf value\(s\) \(first at sample 7\): clean them or drop those samples",
                   base["dir"] / "none")


def test_inf_in_calibration_samples(base: dict[str, Any]) -> None:
    _refused_fresh(lambda: LabelledEvaluator(base["x"], base["y"], calibration=_nan_at(base["calib"], 2, np.inf)),
                   r"calibration samples hold 1 NaN or inf value\(s\) \(first at sample 2\)", base["dir"] / "none")


def test_nan_in_fidelity_feeds(base: dict[str, Any]) -> None:
    feeds = [{"x": base["x"][i : i + 1]} for i in range(4)] + [{"x": np.full((1, 16), np.nan, np.float32)}]
    _refused_fresh(lambda: FidelityEvaluator(feeds), r"evaluation inputs hold 16 NaN .*first at sample 4, input 'x'",
                   base["dir"] / "none")


def test_nan_in_a_scorers_own_calibration_feeds(base: dict[str, Any], tmp_path: Path) -> None:
    class Mine:
        name = "mine"

        def __call__(self, session: Any, *, limit: int | None = None) -> float:
            return 1.0

        def calibration_feeds(self, n: int, input_names: Any) -> list[dict[str, np.ndarray]]:
            return [{"x": base["calib"][:1]}, {"x": np.full((1, 16), np.nan, np.float32)}]

    _refused_fresh(lambda: search(base["model"], Mine(), n_trials=1, **{**base["kw"], "studies_dir": tmp_path}),
                   r"calibration sample 1 \(input 'x'\) holds NaN or inf: clean the calibration data", tmp_path)


@pytest.mark.parametrize(("labels", "match"), [
    (lambda y: y + 0.5, r"must be integer class indices; label 0\.5 \(sample 0; 128 in all\) is not: pass y\.astype\(int\)"),
    (lambda y: np.eye(10)[y], r"one class index per sample \(shape \(N,\)\), got shape \[128, 10\]: pass y\.argmax\(1\)"),
    (lambda y: y.astype(str), r"integer class indices, got dtype <U\d+: map them to indices"),
    (lambda y: y - 20, r"class indices >= 0; label -\d+ \(sample 0; 128 in all\) is negative: remap them"),
])
def test_labels_for_accuracy_are_class_indices(labels: Any, match: str, base: dict[str, Any]) -> None:
    _refused_fresh(lambda: LabelledEvaluator(base["x"], labels(base["y"])), match, base["dir"] / "none")


def test_whole_number_float_labels_are_accepted(base: dict[str, Any]) -> None:
    assert LabelledEvaluator(base["x"], base["y"].astype(np.float32)).num_samples == N


def test_labels_outside_the_models_classes(base: dict[str, Any], tmp_path: Path) -> None:
    y = base["y"].copy()
    y[5] = 10  # the MLP has 10 outputs: classes 0..9
    _refused_fresh(lambda: search(base["model"], LabelledEvaluator(base["x"], y), n_trials=1, **{**base["kw"], "studies_dir": tmp_path}),
                   r"label 10 \(sample 5; 1 label\(s\) in all\) is outside the model's 10 classes .*classes 0\.\.9\): pass class "
                   r"indices of this model's output", tmp_path)


def test_too_few_samples_for_the_floor_warns(base: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    x, y = base["x"][:50], base["y"][:50]
    space = {**SPACE, "constraints": {"max_accuracy_drop": 0.01}}
    st = search(base["model"], LabelledEvaluator(x, y), n_trials=0,
                **{**base["kw"], "space": space, "studies_dir": tmp_path, "verbose": True})
    out = capsys.readouterr().out
    assert ("warning: 50 evaluation sample(s): one sample changes accuracy by 0.0200, more than the allowed drop "
            "(constraints.max_accuracy_drop 0.01)") in out and "use at least 100 samples, or allow a larger drop" in out
    assert st.baseline["accuracy"] == 1.0  # a warning, not a refusal
    with pytest.warns(UserWarning, match="one sample changes accuracy by 0.0200"):
        search(base["model"], LabelledEvaluator(x, y), n_trials=0, **{**base["kw"], "space": space, "studies_dir": tmp_path})


def test_an_empty_space_file(mlp_onnx: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    _refused_fresh(lambda: search(mlp_onnx, space=str(tmp_path / "empty.yaml"), studies_dir=tmp_path, n_trials=1, verbose=False),
                   r"search space file .*empty\.yaml is empty: write at least a 'knobs:' section", tmp_path)


@pytest.mark.parametrize(("space", "match"), [
    ({"strategy": {"analysis": False}}, r"has no knobs: nothing to search; add a 'knobs:' section"),
    ({"knobs": {"bits": [32], "prune": [0.0]}}, r"nothing to search: every knob only takes its neutral value \(bits: \[32\], prune: \[0\.0\]\)"),
])
def test_a_space_with_nothing_to_search(space: dict[str, Any], match: str, mlp_onnx: Path, tmp_path: Path) -> None:
    _refused_fresh(lambda: search(mlp_onnx, space=space, studies_dir=tmp_path, n_trials=1, verbose=False), match, tmp_path)


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_n_trials_must_be_a_count(n: Any, base: dict[str, Any]) -> None:
    before = snapshot(base["studies"], "base")
    with pytest.raises(ConfigError, match=r"n_trials is .*: pass a whole number of trials >= 0 \(0 runs only the analysis\)"):
        search(base["model"], LabelledEvaluator(base["x"], base["y"], calibration=base["calib"]), n_trials=n, **base["kw"])
    assert snapshot(base["studies"], "base") == before


@pytest.mark.parametrize("n", ["0", "-3"])
def test_cli_n_trials_at_least_one(n: str, base: dict[str, Any], capsys: Any) -> None:
    before = snapshot(base["studies"], "base")
    assert main(["resume", "base", "--n-trials", n, "--studies-dir", str(base["studies"])]) == 2
    err = capsys.readouterr().err
    assert err == f"autosearch: error: --n-trials {n}: run at least 1 trial (leave --n-trials out for the space's budget)\n"
    assert snapshot(base["studies"], "base") == before


def _with_node(tmp: Path, name: str, nodes: list[onnx.NodeProto], opsets: list[Any] = ()) -> Path:  # type: ignore[assignment]
    m = onnx.load(str(tiny_onnx(tmp / "plain.onnx")))
    for n in m.graph.node:
        if n.op_type == "Relu":
            n.output[0] = "r"
    for k, node in enumerate(nodes):
        m.graph.node.insert(3 + k, node)
    m.opset_import.extend(opsets)
    onnx.save(m, str(tmp / name))
    return tmp / name


def test_an_op_onnx_runtime_has_no_kernel_for(tmp_path: Path) -> None:
    model = _with_node(tmp_path, "erf.onnx", [helper.make_node("Cast", ["r"], ["rd"], name="c1", to=TensorProto.DOUBLE),
                                             helper.make_node("Erf", ["rd"], ["ed"], name="erf_d"),
                                             helper.make_node("Cast", ["ed"], ["h2"], name="c2", to=TensorProto.FLOAT)])
    _refused_fresh(lambda: search(model, space=SPACE, studies_dir=tmp_path, n_trials=1, verbose=False),
                   r"the model uses op Erf \(domain ai\.onnx, opset 13, node 'erf_d'\), which ONNX Runtime .* has no kernel "
                   r"for with these input types: replace the op or cast its inputs", tmp_path)


def test_a_custom_op_onnx_runtime_does_not_know(tmp_path: Path) -> None:
    model = _with_node(tmp_path, "custom.onnx", [helper.make_node("Foo", ["r"], ["h2"], name="foo", domain="com.example")],
                       [helper.make_opsetid("com.example", 1)])
    _refused_fresh(lambda: search(model, space=SPACE, studies_dir=tmp_path, n_trials=1, verbose=False),
                   r"the model uses op Foo of domain 'com\.example' \(node 'foo'\), which ONNX Runtime .* does not know "
                   r"\(a custom op\): replace it with standard ONNX ops", tmp_path)


# --------------------------------------------------------------------------- export
def test_export_into_an_earlier_export_needs_force(base: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    st = Study.load("base", studies_dir=base["studies"])
    out = tmp_path / "out"
    export_trial(st, 0, out, target=_target(tmp_path), rounds=1)
    stamp = (out / "model.onnx").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"export folder '.*out' already holds a model\.onnx: pass force=True \(CLI --force\)"):
        export_trial(st, 0, out, target=_target(tmp_path), rounds=1)
    assert (out / "model.onnx").stat().st_mtime_ns == stamp  # untouched
    assert main(["export", "base", "--pick", "0", "-o", str(out), "--studies-dir", str(base["studies"])]) == 2
    assert "already holds a model.onnx: pass force=True (CLI --force)" in capsys.readouterr().err
    rep = export_trial(st, 0, out, target=_target(tmp_path), rounds=1, force=True)
    assert rep.files["model"] == out / "model.onnx"


def test_export_report_says_when_the_trial_is_below_the_floor(base: dict[str, Any], tmp_path: Path) -> None:
    y = np.random.default_rng(9).integers(0, 10, N)  # random labels: the float model scores about 0.1
    space = {**SPACE, "constraints": {"max_accuracy_drop": 0.02, "min_accuracy": 0.5}}
    st = search(base["model"], LabelledEvaluator(base["x"], y, calibration=base["calib"]), n_trials=1,
                **{**base["kw"], "space": space, "study_name": "low", "studies_dir": tmp_path})
    rep = export_trial(st, 0, tmp_path / "low-out", target=_target(tmp_path), rounds=1)
    data = json.loads((tmp_path / "low-out" / "report.json").read_text())
    assert data["below_floor"] is True and data["accuracy_floor"] == 0.5
    assert "BELOW THE STUDY'S ACCURACY FLOOR: trial 0 scored" in rep.table() and "under its floor 0.5000 (" in rep.table()
    assert "min_accuracy 0.5" in rep.markdown()
    ok = export_trial(Study.load("base", studies_dir=base["studies"]), 0, tmp_path / "ok", target=_target(tmp_path), rounds=1)
    assert ok.to_dict()["below_floor"] is False and "BELOW" not in ok.table()
