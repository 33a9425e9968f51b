"""Evaluators: labelled accuracy and label-free fidelity, on real sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from autosearch.errors import ConfigError
from autosearch.evaluate import FidelityEvaluator, LabelledEvaluator, run_batched
from autosearch.target import Target


def test_labelled_accuracy_matches_numpy(mlp_onnx: Path) -> None:
    sess = Target().session(mlp_onnx)
    x = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    (logits,) = run_batched(sess, x, batch_size=7)  # uneven batches
    y = logits.argmax(1).copy()
    y[:25] = (y[:25] + 1) % 10  # a quarter wrong
    ev = LabelledEvaluator(x, y)
    assert ev(sess) == pytest.approx(0.75)
    assert ev(sess, limit=25) == pytest.approx(0.0)
    assert ev(sess, limit=50) == pytest.approx(0.5)


def test_custom_metric(mlp_onnx: Path) -> None:
    sess = Target().session(mlp_onnx)
    x = np.ones((8, 16), np.float32)
    ev = LabelledEvaluator(x, np.zeros(8), metric=lambda outs, y: float(outs[0].shape[0]))
    assert ev(sess) == 8.0 and ev.name == "<lambda>"


def test_fidelity_is_one_for_the_same_model_and_lower_for_a_perturbed_one(mlp_onnx: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    ref = Target().session(mlp_onnx)
    model = onnx.load(str(mlp_onnx))
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    arr = numpy_helper.to_array(w1).copy()
    arr += np.random.default_rng(2).standard_normal(arr.shape).astype(np.float32) * 0.5
    w1.CopyFrom(numpy_helper.from_array(arr, "w1"))
    onnx.save(model, str(tmp_path / "p.onnx"))
    other = Target().session(tmp_path / "p.onnx")
    for metric in ("cosine", "top1"):
        ev = FidelityEvaluator(x, metric=metric)
        ev.prepare(ref)
        assert ev(ref) == pytest.approx(1.0)
        assert ev(other) < 0.99


def test_evaluator_input_errors(mlp_onnx: Path) -> None:
    with pytest.raises(ConfigError, match="100 input samples but 99 labels"):
        LabelledEvaluator(np.zeros((100, 16), np.float32), np.zeros(99))
    with pytest.raises(ConfigError, match="metric 'f1' is not known"):
        LabelledEvaluator(np.zeros((4, 16), np.float32), np.zeros(4), metric="f1")
    ev = LabelledEvaluator(np.zeros((4, 15), np.float32), np.zeros(4))
    with pytest.raises(ConfigError, match=r"per-sample shape \[15\], the model expects \[16\]"):
        ev(Target().session(mlp_onnx))
    with pytest.raises(ConfigError, match="call prepare"):
        FidelityEvaluator(np.zeros((4, 16), np.float32))(Target().session(mlp_onnx))
