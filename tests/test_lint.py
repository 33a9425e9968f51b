"""The package passes its linters: ``ruff check autosearch`` and ``mypy`` (configured in pyproject.toml).

Timing on a 2-core machine: ruff well under a second; mypy about 5-10 s with a warm ``.mypy_cache`` and about
2.5 minutes cold (the first run after a checkout or a change to the mypy configuration). Skipped where the tool
is not installed (neither is a runtime dependency; both are in the dev extra).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def _ruff() -> list[str] | None:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    return [exe] if exe else None


def test_ruff_clean() -> None:
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    res = _run([*ruff, "check", "autosearch"], timeout=120)
    assert res.returncode == 0, f"ruff check autosearch failed:\n{res.stdout}\n{res.stderr}"


def test_mypy_clean() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e .[dev])")
    res = _run([sys.executable, "-m", "mypy"], timeout=600)  # files, options: [tool.mypy] in pyproject.toml
    assert res.returncode == 0, f"mypy failed:\n{res.stdout}\n{res.stderr}"
