"""Trials refer to their models by Optuna artifact id: uploaded once per candidate, found from any folder that
reaches the store (two "machines" with their own candidate folders, an export on a third after both are gone),
and a study made before artifact ids still exports and resumes. Every file the package writes for a reader is
written atomically."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import optuna
import pytest
import yaml
from conftest import tiny_onnx
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

import autosearch
from autosearch import LabelledEvaluator, Study, search
from autosearch.export import export_trial

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ONE_CANDIDATE = {"knobs": {"bits": [8]}, "quantization": {"mode": "static"}, "constraints": {"max_accuracy_drop": None},
                 "strategy": {"analysis": False, "remeasure_front": False}}
SPACE = {
    "name": "artifacts",
    "knobs": {"bits": {"choices": [32, 8]}},
    "quantization": {"mode": ["static", "dynamic"], "activation_type": ["uint8", "int8"], "calibration_samples": 16},
    "constraints": {"max_accuracy_drop": 0.05},
    "sampler": {"name": "random", "seed": 0},
    "strategy": {"analysis": False, "remeasure_front": False},
}


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _data(tmp_path: Path, model: Path, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32)
    y = ort.InferenceSession(str(model)).run(None, {"x": x})[0].argmax(1)
    return x, y


def test_trials_carry_artifact_ids_and_a_candidate_is_uploaded_once(mlp_onnx: Path, fast_target, tmp_path: Path) -> None:
    """Three trials of one candidate: each records the same artifact id, whose bytes are the candidate's model; the
    store holds that model, its record and the float model, once each. Catches: the trial not recording
    ``artifact_id`` (KeyError), or ``publish`` not reusing the ids kept in the record (an upload per trial: 7 files)."""
    x, y = _data(tmp_path, mlp_onnx)
    study = search(mlp_onnx, LabelledEvaluator(x, y), space=ONE_CANDIDATE, target=fast_target, study_name="ids",
                   studies_dir=tmp_path / "studies", n_trials=3, verbose=False)
    trials = study.optuna_study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    ids = {t.user_attrs["artifact_id"] for t in trials}
    assert len(ids) == 1
    aid = ids.pop()
    store_dir = tmp_path / "studies" / "ids" / "artifacts"
    assert trials[0].user_attrs["artifact_store"] == "file://" + str(store_dir.resolve())
    assert _sha(store_dir / aid) == _sha(Path(trials[0].user_attrs["onnx_path"]))
    metrics = json.loads((store_dir / trials[0].user_attrs["metrics_artifact_id"]).read_text())
    assert metrics["accuracy"] == trials[0].user_attrs["accuracy"] and metrics["candidate"] == trials[0].user_attrs["candidate"]
    assert len(list(store_dir.iterdir())) == 3  # model + record of the one candidate, the float model
    assert not list(store_dir.glob(".*.tmp"))
    # optuna's own artifact list (what optuna-dashboard shows) names the upload on the trial that made it
    stor = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'studies' / 'ids.db'}")
    assert sorted(m.filename for m in get_all_artifact_meta(trials[0], storage=stor)) == ["metrics.json", "model.onnx"]
    # resolved by id: the store's own file when the store is a folder of this machine ...
    assert study.model_path(0).resolve() == (store_dir / aid).resolve()
    # ... downloaded once into the study's downloads/ when it is a store this code cannot read as a folder
    other = Study.load("ids", studies_dir=tmp_path / "studies", artifact_store=FileSystemArtifactStore(str(store_dir)))
    got = other.model_path(1)
    assert got == tmp_path / "studies" / "ids" / "downloads" / aid / "model.onnx" and _sha(got) == _sha(store_dir / aid)


def _worker(cwd: Path, root: Path, url: str, artifacts: Path, index: int, n: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autosearch", "worker", "--index", str(index), "--model", str(root / "mlp.onnx"),
         "--data", str(root / "val.npz"), "--space", str(root / "space.yaml"), "--study", "two", "--storage", url,
         "--artifacts", str(artifacts), "--n-trials", str(n)],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, check=False)


def test_two_machines_one_artifact_folder_export_on_a_third(tmp_path: Path) -> None:
    """Two workers in their own folders (their own candidate stores, as on two machines) share one storage and one
    artifact folder; both folders are deleted, and an export from a third folder finds the picked trial's model and
    the float model by artifact id (the store the study recorded), re-scores it and agrees. Catches: export reading
    the model from ``onnx_path`` only (the file is gone: exit 2), workers uploading to their own folders, or
    ``--artifacts`` not reaching the export (the folder moved: exit 2)."""
    tiny_onnx(tmp_path / "mlp.onnx")
    x, y = _data(tmp_path, tmp_path / "mlp.onnx", 200)
    np.savez(tmp_path / "val.npz", x=x, y=y)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    (tmp_path / "db").mkdir()
    url = f"sqlite:///{tmp_path / 'db' / 'two.db'}"
    shared = tmp_path / "shared-artifacts"
    machines = [tmp_path / "m1", tmp_path / "m2"]
    for i, m in enumerate(machines):
        m.mkdir()
        out = _worker(m, tmp_path, url, shared, i, 3)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    st = optuna.load_study(study_name="two", storage=url)
    done = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6 and all(t.user_attrs.get("artifact_id") for t in done)
    built_in = {Path(t.user_attrs["onnx_path"]).relative_to(tmp_path).parts[0] for t in done}
    assert built_in == {"m1", "m2"}  # each machine built in its own folder
    assert {t.user_attrs["artifact_store"] for t in done} == {"file://" + str(shared.resolve())}
    by_id = {t.number: t.user_attrs["artifact_id"] for t in done}
    for m in machines:
        shutil.rmtree(m)
    third = tmp_path / "m3"
    third.mkdir()
    pick = max(done, key=lambda t: t.user_attrs["accuracy"]).number  # a trial whose accuracy the export re-measures
    out = subprocess.run([sys.executable, "-m", "autosearch", "export", "two", "--storage", url, "--pick", str(pick),
                          "-o", "exp", "--latency-tolerance", "1e6"],
                         cwd=third, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    rep = json.loads((third / "exp" / "report.json").read_text())
    exported = third / "exp" / "model.onnx"
    onnx.checker.check_model(onnx.load(str(exported)))
    assert _sha(exported) == _sha(shared / by_id[pick])
    assert rep["checks"]["accuracy"] is True  # re-scored on the study's data: the same model
    assert rep["max_abs_diff"] is not None  # the float model came from the study's baseline artifact
    meta = json.loads((third / "exp" / "metrics.json").read_text())
    assert meta["artifact_id"] == by_id[pick] and meta["source_onnx"].startswith(str(shared.resolve()))
    # the shared folder mounted elsewhere on this machine: --artifacts names it, the recorded address is not needed
    moved = tmp_path / "mounted-elsewhere"
    shared.rename(moved)
    out = subprocess.run([sys.executable, "-m", "autosearch", "export", "two", "--storage", url, "--pick", str(pick),
                          "-o", "exp2", "--latency-tolerance", "1e6", "--artifacts", str(moved)],
                         cwd=third, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert _sha(third / "exp2" / "model.onnx") == _sha(moved / by_id[pick])
    assert json.loads((third / "exp2" / "report.json").read_text())["max_abs_diff"] is not None


def _strip_artifacts(study_dir: Path, url: str, old_url: str, name: str) -> None:
    """What a study made before artifact ids looks like: the same trials without the artifact attributes, no
    artifact folder (the candidates' records keep the ids of that deleted folder: they must be uploaded again)."""
    src = optuna.load_study(study_name=name, storage=url)
    dst = optuna.create_study(study_name=name, storage=old_url, directions=src.directions)
    for k, v in src.user_attrs.items():
        if k not in ("artifact_store", "baseline_artifact"):
            dst.set_user_attr(k, v)
    for t in src.trials:
        ua = {k: v for k, v in t.user_attrs.items() if k not in ("artifact_id", "metrics_artifact_id", "artifact_store")}
        dst.add_trial(optuna.trial.create_trial(state=t.state, params=t.params, distributions=t.distributions,
                                                values=t.values, user_attrs=ua, system_attrs=t.system_attrs))
    shutil.rmtree(study_dir / "artifacts")


def test_a_study_made_without_artifact_ids_exports_and_resumes(mlp_onnx: Path, fast_target, tmp_path: Path) -> None:
    """A study whose trials record only ``onnx_path`` (made before artifact ids) exports from that path, and a
    resumed run adds trials that carry ids (the candidate uploaded now) while the old ones still export. Catches:
    resolution that requires ``artifact_id`` (no fallback to ``onnx_path``), or ``publish`` trusting ids whose file
    the folder store no longer has."""
    x, y = _data(tmp_path, mlp_onnx, 200)
    ev = LabelledEvaluator(x, y)
    kw: dict[str, Any] = {"space": ONE_CANDIDATE, "target": fast_target, "study_name": "old",
                          "studies_dir": tmp_path / "studies", "verbose": False}
    search(mlp_onnx, ev, n_trials=2, storage=f"sqlite:///{tmp_path / 'new.db'}", **kw)
    old_url = f"sqlite:///{tmp_path / 'old.db'}"
    _strip_artifacts(tmp_path / "studies" / "old", f"sqlite:///{tmp_path / 'new.db'}", old_url, "old")
    old = Study.load("old", old_url, studies_dir=tmp_path / "studies")
    assert not any("artifact_id" in t.user_attrs for t in old.optuna_study.trials)
    rep = export_trial(old, 0, tmp_path / "exp-old", evaluator=ev, latency_tolerance=1e6)
    assert rep.details["checks"]["accuracy"] is True
    assert _sha(rep.files["model"]) == _sha(Path(old.optuna_study.trials[0].user_attrs["onnx_path"]))
    resumed = search(mlp_onnx, ev, n_trials=1, storage=old_url, **kw)
    trials = resumed.optuna_study.trials
    assert len(trials) == 3 and "artifact_id" not in trials[0].user_attrs
    aid = trials[2].user_attrs["artifact_id"]
    assert (tmp_path / "studies" / "old" / "artifacts" / aid).is_file()
    rep = export_trial(Study.load("old", old_url, studies_dir=tmp_path / "studies"), 1, tmp_path / "exp-old2",
                       evaluator=ev, latency_tolerance=1e6)
    assert rep.details["checks"]["accuracy"] is True
    assert json.loads(rep.files["metrics"].read_text())["artifact_id"] is None


# files that may be written in place, with the reason
IN_PLACE = {
    "profiler.py": "the device's private temporary copy of an upload, read only by the request that wrote it",
}


def _replaces(fn: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "replace"
               and isinstance(n.func.value, ast.Name) and n.func.value.id == "os" for n in ast.walk(fn))


def test_every_file_written_for_a_reader_is_written_atomically() -> None:
    """No module writes a file in place (``write_text``, ``write_bytes``, ``open(..., "w")``, ``to_csv(path)``)
    unless the same function moves a temporary file into place with ``os.replace`` (the helpers of
    :mod:`autosearch.artifacts` do it for everyone else). Catches: one such call added (e.g. the dashboard's
    ``out.write_text(html)`` back)."""
    pkg = Path(autosearch.__file__).parent
    found = []
    for path in sorted(pkg.rglob("*.py")):
        if path.name in IN_PLACE:
            continue
        tree = ast.parse(path.read_text())
        safe = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and _replaces(fn)
                for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or id(node) in safe:
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), None)
            mode = next((k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)), mode)
            writes = (name in ("write_text", "write_bytes")
                      or (name == "open" and isinstance(mode, str) and any(c in mode for c in "wx"))
                      or (name == "to_csv" and bool(node.args)))
            if writes:
                found.append(f"{path.relative_to(pkg)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert found == []


def test_an_s3_store_without_boto3_is_one_line(tmp_path: Path) -> None:
    """``s3://`` needs boto3 (not a dependency): the error says what to install or use instead. Catches: importing
    boto3 unguarded (a ModuleNotFoundError traceback)."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("boto3 is installed here")
    from autosearch.artifacts import open_artifact_store
    from autosearch.errors import ConfigError

    with pytest.raises(ConfigError, match="needs boto3.*pip install boto3"):
        open_artifact_store("s3://bucket")
    with pytest.raises(ConfigError, match="s3://bucket"):
        open_artifact_store("ftp://host/x")
