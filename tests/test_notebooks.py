"""The notebooks run top to bottom in a fresh kernel of this virtual environment.

They run in order in one temporary working folder (notebook 2 resumes the study of notebook 1,
notebook 3 draws it), each with a small trial budget set through ``AUTOSEARCH_NB_TRIALS``.

The notebooks are run as committed, with one cell put in front of each: it makes
``pretrained_digits_cnn`` (so ``default_problem()``) return the suite's narrow digits CNN (the
``small_cnn`` fixture: widths 8/16/16, 4 epochs), which the test process trains once into the
session's cache (``AUTOSEARCH_CACHE``) before the first kernel starts, so no kernel trains a model
and the trials build and time a small model. The notebooks themselves, as users run them, are
unchanged. ``AUTOSEARCH_NB_MODEL=default`` runs them with the real default model instead: the
test process trains it once, before the first kernel (minutes on two cores), into the session's
cache or into ``AUTOSEARCH_NB_CACHE`` when set; a folder that already holds it (e.g.
``~/.cache/autosearch``) skips that.

Needs ``nbformat``, ``nbclient`` and ``ipykernel`` (the ``dev`` extra).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install nbformat nbclient ipykernel (the dev extra)")
nbclient = pytest.importorskip("nbclient", reason="pip install nbformat nbclient ipykernel (the dev extra)")
pytest.importorskip("ipykernel", reason="pip install ipykernel (the dev extra)")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
TRIALS = {"01_quickstart": 6, "02_resume_and_pick": 3, "03_dashboard": 6, "04_bring_your_own_onnx": 6,
          "05_tensorflow_and_onnx_pruning": 4}
DEFAULT_MODEL = os.environ.get("AUTOSEARCH_NB_MODEL", "small") == "default"
SMALL = {"epochs": 4, "widths": (8, 16, 16)}  # the small_cnn fixture of conftest.py: the same cache file
# put in front of each notebook: every later call of pretrained_digits_cnn() (default_problem uses it) gets SMALL
SMALL_CELL = f"import autosearch.zoo.digits\nautosearch.zoo.digits.pretrained_digits_cnn.__kwdefaults__.update({SMALL!r})"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("notebooks")


@pytest.fixture(scope="module")
def kernel_env(cache_dir: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    if not DEFAULT_MODEL:
        request.getfixturevalue("small_cnn")  # trained (or found) here, in the session's cache, before any kernel
        cache = str(cache_dir)
    else:
        cache = os.environ.get("AUTOSEARCH_NB_CACHE") or str(cache_dir)
        from autosearch.zoo import pretrained_digits_cnn

        with mock.patch.dict(os.environ, {"AUTOSEARCH_CACHE": cache}):
            pretrained_digits_cnn()  # here, once, before any kernel: the kernels find it cached
    return {**os.environ, "AUTOSEARCH_CACHE": cache, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(nb: Any, cwd: Path, env: dict[str, str], *, timeout: int = 600) -> Any:
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    return nb


def _execute(name: str, cwd: Path, env: dict[str, str]) -> Any:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    if not DEFAULT_MODEL:
        nb.cells.insert(0, nbformat.v4.new_code_cell(SMALL_CELL))
    return _run(nb, cwd, {**env, "AUTOSEARCH_NB_TRIALS": str(TRIALS[name]), "AUTOSEARCH_NB_STUDIES": "studies"})


def _text(nb: Any) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(str(out["data"].get("text/plain", "")))
    return "\n".join(parts)


def _html_tables(nb: Any) -> list[str]:
    return [out["data"]["text/html"] for cell in nb.cells for out in cell.get("outputs", [])
            if "data" in out and "text/html" in out["data"] and "<table" in out["data"]["text/html"]]


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before committing"
    assert any("AUTOSEARCH_NB_TRIALS" in c.source for c in nb.cells if c.cell_type == "code")


def test_kernel_is_this_environment(workdir: Path, kernel_env: dict[str, str]) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys, os; print(sys.executable); print(os.getcwd())")])
    out = _text(_run(nb, workdir, kernel_env, timeout=120)).split()
    assert Path(out[0]).resolve() == Path(sys.executable).resolve()
    assert Path(out[1]).resolve() == workdir.resolve()


def test_01_quickstart(workdir: Path, kernel_env: dict[str, str]) -> None:
    nb = _execute("01_quickstart", workdir, kernel_env)
    text = _text(nb)
    assert "[  6/6] trial 5" in text  # progress printed
    assert "training the" not in text  # the model was trained (or found) before the kernel started
    if not DEFAULT_MODEL:  # the small model stood in for the default one
        assert "0.02 M parameters" in text, text[:500]
    tables = _html_tables(nb)
    assert tables and "latency_ms" in tables[0] and tables[0].count("<tr") >= 2  # the front: header and rows
    assert (workdir / "studies" / "quickstart.db").exists()


def test_02_resume_and_pick(workdir: Path, kernel_env: dict[str, str]) -> None:
    resumed = (workdir / "studies" / "quickstart.db").exists()  # notebook 1 ran first
    nb = _execute("02_resume_and_pick", workdir, kernel_env)
    text = _text(nb)
    out = workdir / "exported" / "quickstart"
    for f in ("model.onnx", "config.yaml", "metrics.json", "report.md", "report.json"):
        assert (out / f).exists(), f
    assert "re-measured" in text and ("AGREES" in text or "DIFFERS" in text)
    assert "ConfigError:" in text and "best accuracy available" in text
    if resumed:  # the study of notebook 1 was continued, not started afresh
        assert "trials so far)" in text and "(0 trials so far)" not in text


def test_03_dashboard(workdir: Path, kernel_env: dict[str, str]) -> None:
    nb = _execute("03_dashboard", workdir, kernel_env)
    page = workdir / "quickstart_dashboard.html"
    assert page.exists() and page.stat().st_size > 1_000_000
    assert "'front':" in _text(nb)
    shown = [out for cell in nb.cells for out in cell.get("outputs", []) if "data" in out and
             any(k.startswith("application/vnd.plotly") or k == "text/html" for k in out["data"])]
    assert len(shown) >= 3  # the scatter and the other figures were shown inline


def test_04_bring_your_own_onnx(workdir: Path, kernel_env: dict[str, str]) -> None:
    nb = _execute("04_bring_your_own_onnx", workdir, kernel_env)
    text = _text(nb)
    assert (workdir / "my_mlp.onnx").exists()
    assert "fidelity_top1" in text and "[  6/6] trial 5" in text
    assert "rank" in text  # the rank knob was searched
    assert (workdir / "exported" / "byo_onnx" / "report.md").exists()


def test_05_tensorflow_and_onnx_pruning(workdir: Path, kernel_env: dict[str, str]) -> None:
    """A Keras model in, converted and checked against TensorFlow, searched with all three knobs, exported."""
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install 'autosearch[tensorflow]')")
    pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install 'autosearch[tensorflow]')")
    env = {**kernel_env, "AUTOSEARCH_NB_EPOCHS": "5", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    nb = _execute("05_tensorflow_and_onnx_pruning", workdir, env)
    text = _text(nb)
    assert "outputs match TensorFlow's" in text  # the parity check ran and passed
    units = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(prune|bits|rank)\s+(\d+) units", text, re.M)}
    assert units.get("prune", 0) > 0 and units.get("bits", 0) > 0 and units.get("rank", 0) > 0, units  # all three knobs apply
    assert "[  4/4] trial 3" in text
    assert (workdir / "exported" / "keras_cnn" / "model.onnx").exists() and (workdir / "exported" / "keras_cnn" / "report.md").exists()
