"""The default model's training: progress lines when verbose, silence otherwise, the same weights and cache key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from autosearch.zoo import digits as zoo_digits
from autosearch.zoo import pretrained_digits_cnn

TINY = {"epochs": 2, "widths": (4, 8, 8)}


def test_cache_key_formula_unchanged() -> None:
    # the file names of weights cached by earlier versions: a changed formula would retrain everyone's model
    assert zoo_digits._cache_path((32, 64, 128), 12, 0).name == "digits_resnet_fc135a0ee8e2.pt"
    assert zoo_digits._cache_path((8, 16, 16), 4, 0).name == "digits_resnet_eec7fb55c3d1.pt"
    assert (zoo_digits._WIDTHS, zoo_digits._EPOCHS, zoo_digits._SEED) == ((32, 64, 128), 12, 0)


def test_verbose_training_prints_estimate_and_one_line_per_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTOSEARCH_CACHE", str(tmp_path / "loud"))
    loud = pretrained_digits_cnn(verbose=True, **TINY)
    lines = capsys.readouterr().out.splitlines()
    path = zoo_digits._cache_path(TINY["widths"], TINY["epochs"], 0)
    assert path.exists() and path.parent == tmp_path / "loud"

    estimate = [ln for ln in lines if "training the digits CNN" in ln]
    assert len(estimate) == 1
    assert re.search(r": 2 epochs, ~[\d.]+ (s|min) on this machine \(cached at .+\)$", estimate[0]), estimate[0]
    assert str(path) in estimate[0]
    epochs = [ln for ln in lines if re.search(r"epoch +\d+/2 ", ln)]
    assert len(epochs) == 2
    for k, ln in enumerate(epochs, 1):
        assert re.search(rf"epoch +{k}/2 +train loss \d+\.\d+ +elapsed \d+:\d\d +left ~\d+:\d\d$", ln), ln
    assert lines.index(estimate[0]) < lines.index(epochs[0])  # the estimate comes first
    assert "test accuracy" in lines[-1]

    # silent when cached, and when verbose=False; the weights do not depend on the progress lines
    assert pretrained_digits_cnn(verbose=True, **TINY) is not None and capsys.readouterr().out == ""
    monkeypatch.setenv("AUTOSEARCH_CACHE", str(tmp_path / "quiet"))
    quiet = pretrained_digits_cnn(verbose=False, **TINY)
    assert capsys.readouterr().out == ""
    assert (tmp_path / "quiet" / path.name).exists()
    a, b = loud.state_dict(), quiet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
