"""The command line, run as users run it (a subprocess), on a small ONNX model and data file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import tiny_onnx


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autosearch", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_teaches_with_examples(tmp_path: Path) -> None:
    out = _cli("--help", cwd=tmp_path)
    assert out.returncode == 0 and "examples:" in out.stdout and "autosearch resume" in out.stdout
    for cmd in ("search", "resume", "front", "demo", "analyze"):
        sub = _cli(cmd, "--help", cwd=tmp_path)
        assert sub.returncode == 0 and "examples:" in sub.stdout, cmd


def test_search_resume_front_on_onnx_with_labels(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    import onnxruntime as ort

    y = ort.InferenceSession(str(model)).run(None, {"x": x})[0].argmax(1)
    np.savez(tmp_path / "val.npz", x=x, y=y)
    out = _cli("search", "--model", "mlp.onnx", "--data", "val.npz", "--study", "cli", "--n-trials", "3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Pareto front of study 'cli'" in out.stdout and "[  3/3] trial 2" in out.stdout
    out = _cli("resume", "cli", "--n-trials", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "(3 trials so far)" in out.stdout and "[  5/5] trial 4" in out.stdout
    out = _cli("front", "cli", "--all", "--csv", "all.csv", cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "all.csv").read_text().count("\n") == 6


def test_errors_are_one_line_with_the_fix(tmp_path: Path) -> None:
    out = _cli("front", "missing", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("autosearch: error: no study database")
    assert "Traceback" not in out.stderr
    out = _cli("search", "--model", "nope.onnx", cwd=tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    out = _cli("--debug", "search", "--model", "nope.onnx", cwd=tmp_path)
    assert "Traceback" in out.stderr


def test_analyze_sensitivity_is_kept_for_the_search(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(1).standard_normal((120, 16)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x)  # no labels: fidelity to the original
    out = _cli("analyze", "--model", "mlp.onnx", "--sensitivity", cwd=tmp_path)
    assert out.returncode == 2 and "--study NAME" in out.stderr
    out = _cli("analyze", "--model", "mlp.onnx", "--data", "val.npz", "--sensitivity", "--study", "sens", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "drop@8" in out.stdout and "fc1_matmul" in out.stdout and "latency_share" in out.stdout
    out = _cli("search", "--model", "mlp.onnx", "--data", "val.npz", "--study", "sens", "--n-trials", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "(0 trials so far)" in out.stdout and "[analysis]" not in out.stdout  # the stored scan is reused
