"""Bad input refused up front: one line naming the problem and the fix (exit 2 in the CLI), before any trial runs.

Python cases go through ``search``; CLI cases through the real command in a subprocess. The read-only folder is a
read-only bind mount and the full disk a 1 MB tmpfs (both need root; skipped elsewhere).
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import optuna
import pytest
from conftest import tiny_onnx
from onnx import TensorProto, helper, numpy_helper

from autosearch import FidelityEvaluator, LabelledEvaluator, Target, search
from autosearch.errors import ConfigError
from autosearch.space import load_space
from autosearch.study import Study, check_storage_url, check_study_name

SPACE: dict[str, Any] = {
    "knobs": {"bits": [32, 8]},
    "quantization": {"mode": ["static"], "calibration_samples": 16},
    "constraints": {"max_accuracy_drop": 0.02},
    "sampler": {"name": "random", "seed": 0},
    "strategy": {"analysis": False, "remeasure_front": False},
}
YAML = ("knobs: {bits: [32, 8]}\nquantization: {mode: [static], calibration_samples: 16}\n"
        "constraints: {max_accuracy_drop: 0.02}\nsampler: {name: random}\nstrategy: {analysis: false, remeasure_front: false}\n")
N = 128


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "autosearch", *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
                          env=env)


def _refused(out: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2, one line on stderr starting with the error, naming each of ``words``, and no trial line."""
    assert out.returncode == 2, (out.returncode, out.stdout[-800:], out.stderr[-800:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autosearch: error: "), out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "trial 0" not in out.stdout


def _target(d: Path) -> Target:
    return Target(threads=1, warmup=2, min_runs=10, max_runs=50, max_seconds=0.1, lock_path=str(d / "lock"))


def _labels(model: Path, x: np.ndarray, name: str = "x") -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {name: x})[0].argmax(1)


@pytest.fixture(scope="module")
def prob(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The MLP, its data (labels its own predictions) and a folder with the CLI's inputs and one CLI study."""
    d = tmp_path_factory.mktemp("inputs")
    model = tiny_onnx(d / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((N, 16)).astype(np.float32)
    y = _labels(model, x)
    np.savez(d / "val.npz", x=x, y=y)
    (d / "q.yaml").write_text(YAML)
    out = _cli("search", "--model", "mlp.onnx", "--data", "val.npz", "--space", "q.yaml", "--study", "s", "--n-trials", "2",
               cwd=d)
    assert out.returncode == 0, out.stderr
    return {"dir": d, "model": model, "x": x, "y": y}


def _kw(tmp_path: Path, name: str = "t") -> dict[str, Any]:
    return {"space": SPACE, "target": _target(tmp_path), "study_name": name, "studies_dir": tmp_path / "studies", "verbose": False}


def _no_study(tmp_path: Path, name: str = "t") -> None:
    db = tmp_path / "studies" / f"{name}.db"
    assert not db.exists() or name not in optuna.get_all_study_names(f"sqlite:///{db}")


# ---------------------------------------------------------------- the float model's score on the user's data


def _nan_model(path: Path) -> Path:
    """x @ W then Sqrt: NaN wherever the product is negative (about half the outputs)."""
    w = np.random.default_rng(1).standard_normal((16, 10)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Sqrt", ["h"], ["y"], name="sq")],
                          "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 10])], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_a_float_model_with_nan_outputs_is_refused(prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: NaN outputs scored 'accuracy 0.0000' and every candidate passed as feasible."""
    model = _nan_model(tmp_path / "nan.onnx")
    with pytest.raises(ConfigError, match=r"float model's output 'y' holds \d+ NaN") as err:
        search(model, FidelityEvaluator(prob["x"], metric="top1"), n_trials=2, **_kw(tmp_path))
    assert "\n" not in str(err.value)
    _no_study(tmp_path)


def test_boolean_labels_for_a_ten_class_model_are_refused(prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: y saved as booleans for a 10-class model was scored and searched as if it were class indices."""
    with pytest.raises(ConfigError, match=r"boolean labels for a model of 10 classes \(labels: dtype bool") as err:
        search(prob["model"], LabelledEvaluator(prob["x"], prob["y"] > 4), n_trials=2, **_kw(tmp_path))
    assert "class indices" in str(err.value)
    _no_study(tmp_path)


def test_a_float_model_scoring_zero_is_refused_and_the_study_forgotten(prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: labels that never match (score 0) gave a floor of -0.02 and a front; and the refused study kept
    the bad data's fingerprint, so the same name with fixed labels was refused as 'different evaluation data'."""
    wrong = (prob["y"] + 1) % 10
    with pytest.raises(ConfigError, match=r"scores accuracy 0\.0 .*labels do not match its outputs .*it predicts"):
        search(prob["model"], LabelledEvaluator(prob["x"], wrong), n_trials=2, **_kw(tmp_path))
    _no_study(tmp_path)
    st = search(prob["model"], LabelledEvaluator(prob["x"], prob["y"]), n_trials=1, **_kw(tmp_path))
    assert st.baseline["accuracy"] == 1.0


# ---------------------------------------------------------------- constraints, budget, timeout


@pytest.mark.parametrize("cons, match", [
    ({"max_accuracy_drop": -0.1}, "a drop is >= 0"),
    ({"max_accuracy_drop": float("nan")}, "give a finite number"),
    ({"min_accuracy": float("inf")}, "give a finite number"),
])
def test_constraints_that_are_not_a_drop_or_a_score(cons: dict[str, Any], match: str) -> None:
    """Catches: a negative or NaN allowed drop was taken (NaN makes every comparison false)."""
    with pytest.raises(ConfigError, match=match):
        load_space({**SPACE, "constraints": cons})


@pytest.mark.parametrize("cons, match", [
    ({"max_accuracy_drop": 1.0}, r"the whole range of accuracy \(\[0, 1\]\)"),
    ({"max_accuracy_drop": None, "min_accuracy": 1.5}, r"outside the range of accuracy"),
])
def test_constraints_outside_the_metrics_range(cons: dict[str, Any], match: str, prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: max_accuracy_drop 1 made every candidate feasible; min_accuracy 1.5 none."""
    with pytest.raises(ConfigError, match=match):
        search(prob["model"], LabelledEvaluator(prob["x"], prob["y"]), n_trials=1,
               **{**_kw(tmp_path), "space": {**SPACE, "constraints": cons}})
    _no_study(tmp_path)


def test_timeouts_must_be_positive(prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: timeout=-1 started no trial and printed the budget as if it had run; budget.timeout_s: 0 the same."""
    with pytest.raises(ConfigError, match=r"budget\.timeout_s.* is 0: give a number of seconds > 0"):
        load_space({**SPACE, "budget": {"timeout_s": 0}})
    with pytest.raises(ConfigError, match=r"timeout is -1: pass a number of seconds > 0"):
        search(prob["model"], LabelledEvaluator(prob["x"], prob["y"]), timeout=-1, **_kw(tmp_path))
    _no_study(tmp_path)


def test_cli_timeout_must_be_positive(prob: dict[str, Any]) -> None:
    """Catches: --timeout -1 printed '20 trial(s)' after running none."""
    out = _cli("search", "--model", "mlp.onnx", "--data", "val.npz", "--study", "neg", "--timeout", "-1", cwd=prob["dir"])
    _refused(out, "--timeout -1", "> 0")


def test_a_yaml_nested_5000_deep(prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: a RecursionError traceback from the YAML loader."""
    (tmp_path / "deep.yaml").write_text("knobs: " + "[" * 5000 + "]" * 5000 + "\n")
    out = _cli("search", "--model", str(prob["model"]), "--space", str(tmp_path / "deep.yaml"), "--study", "d", cwd=tmp_path)
    _refused(out, "deep.yaml", "nests too deeply")


# ---------------------------------------------------------------- the model


def test_a_float16_model_is_refused_with_what_to_pass(prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: a float16 model went on to fail in the quantizer on every trial."""
    m = onnx.load(str(prob["model"]))
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(m, str(tmp_path / "half.onnx"))
    with pytest.raises(ConfigError, match=r"is a float16 model .*4 weight\(s\).* pass the float32 \.onnx"):
        search(tmp_path / "half.onnx", n_trials=1, **_kw(tmp_path))
    _no_study(tmp_path)


def test_a_declared_billion_dimension_is_refused_before_allocating(prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: a model input declared [1, 1e9] allocated 4 GB of random input (or died of memory)."""
    m = onnx.load(str(prob["model"]))
    dim = m.graph.input[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = 10**9
    onnx.save(m, str(tmp_path / "huge.onnx"))
    with pytest.raises(ConfigError, match=r"model input 'x' declares shape \[1, 1000000000\] \(dimension 1 .*pass an example input"):
        search(tmp_path / "huge.onnx", n_trials=1, **_kw(tmp_path))


def test_a_model_over_2gb_with_external_data_is_checked_by_path(tmp_path: Path) -> None:
    """Catches: a valid model whose external data is over 2 GB was loaded whole and refused ('Failed to serialize
    proto'). The 2.2 GB data file is sparse (written at an offset): it takes no disk, and the load reads none of it."""
    from autosearch.model import PROTO_LIMIT, external_data_bytes, load_onnx

    k, n = 1000, 550_000  # 2.2e9 bytes of float32
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[k, n], data_location=TensorProto.EXTERNAL)
    for key, v in (("location", "w.bin"), ("offset", "0"), ("length", str(k * n * 4))):
        w.external_data.add(key=key, value=v)
    with open(tmp_path / "w.bin", "wb") as f:
        f.seek(k * n * 4 - 1)
        f.write(b"\0")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "big",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "big.onnx"))
    proto = load_onnx(tmp_path / "big.onnx")
    assert external_data_bytes(proto) == k * n * 4 > PROTO_LIMIT
    t = proto.graph.initializer[0]
    assert t.data_location == TensorProto.EXTERNAL and not t.raw_data  # the weights stay in their file
    os.rename(tmp_path / "w.bin", tmp_path / "moved.bin")  # checked by path: the checker looks for the data file
    with pytest.raises(ConfigError, match=r"fails onnx.checker: .*should be stored in .*w\.bin"):
        load_onnx(tmp_path / "big.onnx")


# ---------------------------------------------------------------- data


def test_calibration_of_another_dtype_is_refused(prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: float64 calibration samples for a float32 input failed every quantized trial."""
    ev = LabelledEvaluator(prob["x"], prob["y"], calibration=prob["x"].astype(np.float64))
    with pytest.raises(ConfigError, match=r"have dtype float64 .*takes float32: convert them with \.astype\(np\.float32\)"):
        search(prob["model"], ev, n_trials=1, **_kw(tmp_path))
    _no_study(tmp_path)


def test_an_npz_with_x_and_other_arrays_takes_x(prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: an .npz holding x plus other arrays was refused for a one-input model whose input is not named x."""
    m = onnx.load(str(prob["model"]))
    m.graph.input[0].name = "pixels"
    for node in m.graph.node:
        node.input[:] = ["pixels" if i == "x" else i for i in node.input]
    onnx.save(m, str(tmp_path / "named.onnx"))
    np.savez(tmp_path / "extra.npz", x=prob["x"], y=prob["y"], ids=np.arange(N), mean=np.zeros(16))
    (tmp_path / "q.yaml").write_text(YAML)
    out = _cli("search", "--model", "named.onnx", "--data", "extra.npz", "--space", "q.yaml", "--study", "e", "--n-trials", "1",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "array(s) ['ids', 'mean'] are ignored" in out.stdout and "1 trial(s) in" in out.stdout


# ---------------------------------------------------------------- names and storage


@pytest.mark.parametrize("name, match", [("a\tb", "control character"), ("a\x1b[2J", "control character"),
                                         ("n" * 253, "bytes long"), ("é" * 127, "bytes long")])
def test_a_study_name_the_file_system_cannot_take(name: str, match: str) -> None:
    """Catches: control characters in a study name reached the file names; an over-long one failed with ENAMETOOLONG."""
    with pytest.raises(ConfigError, match=match):
        check_study_name(name)


def test_in_memory_sqlite_is_refused_with_the_reason() -> None:
    """Catches: sqlite:///:memory: lost the study between connections (a traceback at the first step)."""
    with pytest.raises(ConfigError, match="in-memory SQLite database.*use a file"):
        check_storage_url("sqlite:///:memory:")


# ---------------------------------------------------------------- file-system mistakes (CLI)


def test_studies_dir_or_artifacts_naming_a_file(prob: dict[str, Any]) -> None:
    """Catches: FileExistsError / NotADirectoryError tracebacks for --studies-dir FILE and --artifacts FILE."""
    _refused(_cli("search", "--model", "mlp.onnx", "--study", "f", "--studies-dir", "val.npz", cwd=prob["dir"]),
             "--studies-dir 'val.npz'", "is a file, not a folder")
    _refused(_cli("search", "--model", "mlp.onnx", "--study", "f", "--artifacts", "val.npz", cwd=prob["dir"]),
             "--artifacts 'val.npz'", "is a file, not a folder")


def test_front_csv_naming_a_folder(prob: dict[str, Any]) -> None:
    """Catches: IsADirectoryError traceback after the front was printed."""
    _refused(_cli("front", "s", "--csv", "studies", cwd=prob["dir"]), "--csv 'studies' is a folder", "name a file")


def test_export_below_a_file(prob: dict[str, Any]) -> None:
    """Catches: NotADirectoryError traceback for export -o FILE/sub."""
    _refused(_cli("export", "s", "-o", "val.npz/out", cwd=prob["dir"]), "lies below", "which is a file")


@contextlib.contextmanager
def _mounted(*args: str, at: Path) -> Iterator[Path]:
    at.mkdir(parents=True, exist_ok=True)
    for cmd in args:
        if subprocess.run([*cmd.split(), str(at)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", str(at)], capture_output=True, check=False)
            pytest.skip(f"cannot {cmd} here (needs root and mount)")
    try:
        yield at
    finally:
        subprocess.run(["umount", str(at)], capture_output=True, check=False)


def test_resume_and_export_in_a_read_only_folder(prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: resume in a read-only folder died in SQLite ('attempt to write a readonly database', a traceback);
    export there died in mkdir. The folder is a read-only bind mount (root ignores chmod)."""
    ro = tmp_path / "ro"
    with _mounted(f"mount --bind {prob['dir']}", "mount -o remount,ro,bind", at=ro):
        _refused(_cli("resume", "s", "--n-trials", "1", cwd=ro), "--studies-dir 'studies'", "not writable")
        _refused(_cli("export", "s", cwd=ro), "-o/--out '.'", "not writable")
        _refused(_cli("export", "s", "-o", str(tmp_path / "out"), cwd=ro), "studies folder 'studies' is not writable")


def test_a_full_disk_stops_the_search_with_one_line(prob: dict[str, Any], tmp_path: Path) -> None:
    """Catches: on a full disk every remaining trial FAILed with ENOSPC (or the search died in a traceback).
    The studies folder is a real 1 MB tmpfs, filled but for room for the baseline and the first candidates."""
    space = YAML.replace("mode: [static]", "mode: [static, dynamic], per_channel: [true, false], reduce_range: [true, false]")
    (tmp_path / "many.yaml").write_text(space)
    with _mounted("mount -t tmpfs -o size=1m tmpfs", at=tmp_path / "small") as small:
        (small / "filler").write_bytes(b"\0" * 850_000)
        out = _cli("search", "--model", str(prob["model"]), "--data", str(prob["dir"] / "val.npz"), "--space", "many.yaml",
                   "--study", "full", "--studies-dir", str(small / "st"), "--storage", f"sqlite:///{tmp_path / 'full.db'}",
                   "--n-trials", "40", cwd=tmp_path)
    assert out.returncode == 2, out.stdout[-1500:] + out.stderr[-1500:]
    assert out.stderr.strip().splitlines()[-1].startswith("autosearch: error: no space left on device at ")
    assert "free space or use --studies-dir" in out.stderr and "Traceback" not in out.stderr
    st = optuna.load_study(study_name="full", storage=f"sqlite:///{tmp_path / 'full.db'}")
    states = [t.state for t in st.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and states[-1] == optuna.trial.TrialState.FAIL  # the search stopped
    assert len(states) < 40


# ---------------------------------------------------------------- counts


def test_counts_say_what_ran(prob: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    """Catches: '100000000000 trial(s)' printed after a timeout ended the run at a few; front headers counting
    queued (WAITING) trials as trials."""
    from autosearch.report import print_front

    kw = {**_kw(tmp_path), "verbose": True, "space": {**SPACE, "knobs": {"bits": [8]}}}
    st = search(prob["model"], LabelledEvaluator(prob["x"], prob["y"]), n_trials=10**11, timeout=1.5, **kw)
    ran = len(st.optuna_study.trials)
    assert 0 < ran < 10**11
    assert f"] {ran} trial(s) in " in capsys.readouterr().out
    st.optuna_study.enqueue_trial({})  # a queued trial: not finished
    print_front(Study.load("t", studies_dir=tmp_path / "studies"))
    assert f"({ran} finished trial(s);" in capsys.readouterr().out
    assert math.isfinite(st.baseline["accuracy"])
