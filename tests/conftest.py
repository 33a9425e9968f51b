"""Shared fixtures: small models built and trained in seconds, real ONNX Runtime and SQLite."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cache")
    os.environ["AUTOSEARCH_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def digits():
    from autosearch.zoo import load_digits_data

    return load_digits_data()


@pytest.fixture(scope="session")
def small_cnn(cache_dir: Path):
    """A narrow digits ResNet (widths 8/16/16), trained 4 epochs: seconds, ~97% accuracy."""
    from autosearch.zoo import pretrained_digits_cnn

    return pretrained_digits_cnn(epochs=4, widths=(8, 16, 16), verbose=False)


@pytest.fixture(scope="session")
def small_problem(small_cnn, digits):
    """(model, evaluator, example input) of the small CNN; calibration on training images."""
    from autosearch.evaluate import LabelledEvaluator

    ev = LabelledEvaluator(digits.x_test, digits.y_test, calibration=digits.x_train[:256])
    return small_cnn, ev, digits.x_test[:1]


@pytest.fixture(scope="session")
def small_source(small_problem):
    from autosearch.model import import_model

    model, _, example = small_problem
    return import_model(model, example)


@pytest.fixture()
def fast_target(tmp_path: Path):
    """A real ORT target with a short measurement budget (figures are for tests, not reports)."""
    from autosearch.target import Target

    return Target(threads=1, warmup=3, min_runs=20, max_runs=200, max_seconds=0.3, lock_path=str(tmp_path / "lock"))


def tiny_onnx(path: Path, *, in_features: int = 16, hidden: int = 64, out: int = 10, seed: int = 0) -> Path:
    """A two-layer MLP written with onnx.helper (MatMul+Add, Relu, Gemm), batch dimension free."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((in_features, hidden)) / np.sqrt(in_features)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((out, hidden)) / np.sqrt(hidden)).astype(np.float32)
    b2 = np.zeros(out, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1_matmul"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_add"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("Gemm", ["h2", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def mlp_onnx(tmp_path: Path) -> Path:
    return tiny_onnx(tmp_path / "mlp.onnx")


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for the session (tests/pg.py): ``postgresql+psycopg://...`` of a fresh database."""
    from pg import postgres_server

    yield from postgres_server()
