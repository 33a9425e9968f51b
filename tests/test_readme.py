"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_custom_scorer_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    block = next(b for b in _blocks() if "class Agreement" in b)
    monkeypatch.chdir(tmp_path)  # the example writes studies/ where it runs
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    study = namespace["study"]
    df = study.trials()  # type: ignore[attr-defined]
    assert len(df) == 4 and df["accuracy"].notna().any()
    assert (tmp_path / "studies" / "orientation.db").exists()
    assert "orientation_agreement" in capsys.readouterr().out
