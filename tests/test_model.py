"""Import stage: export parity with ONNX Runtime, and clear errors on bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autosearch.errors import ConfigError
from autosearch.model import export_onnx, import_model, load_onnx
from autosearch.target import Target


def test_export_matches_torch_outputs(small_cnn, digits, tmp_path: Path) -> None:
    path = export_onnx(small_cnn, torch.from_numpy(digits.x_test[:1]), tmp_path / "m.onnx")
    sess = Target().session(path)
    x = digits.x_test[:16]  # batch dimension is free: 16 at once
    (got,) = sess.run(None, {"input": x})
    with torch.no_grad():
        want = small_cnn(torch.from_numpy(x)).numpy()
    assert got.shape == (16, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_import_keeps_the_source_untouched(small_cnn, digits) -> None:
    before = {k: v.clone() for k, v in small_cnn.state_dict().items()}
    src = import_model(small_cnn, digits.x_test[:1])
    assert src.origin == "torch" and src.input_names == ["input"]
    assert src.torch_module is not small_cnn
    for k, v in small_cnn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(src.fingerprint) == 16


def test_import_onnx_path_and_random_feed(mlp_onnx: Path) -> None:
    src = import_model(mlp_onnx)
    assert src.origin == "onnx"
    assert src.example_feed["x"].shape == (1, 16)
    assert src.input_batch_fixed() is None


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist.*\.onnx"):
        load_onnx(tmp_path / "nope.onnx")


def test_non_onnx_bytes_are_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "weights.onnx"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a protobuf" * 10)
    with pytest.raises(ConfigError, match="not a readable ONNX model|holds no ONNX graph"):
        load_onnx(bad)


def test_wrong_input_shape_names_the_input(mlp_onnx: Path) -> None:
    with pytest.raises(ConfigError, match=r"'x' has shape \[1, 7\], the model expects \['\?', 16\]"):
        import_model(mlp_onnx, np.zeros((1, 7), np.float32))


def test_torch_model_needs_example_inputs(small_cnn) -> None:
    with pytest.raises(ConfigError, match="example_inputs"):
        import_model(small_cnn)


def test_torch_model_that_fails_on_the_example_is_named(small_cnn) -> None:
    with pytest.raises(ConfigError, match=r"does not run on example_inputs of shapes \[\(1, 3, 32, 32\)\]"):
        import_model(small_cnn, torch.zeros(1, 3, 32, 32))
