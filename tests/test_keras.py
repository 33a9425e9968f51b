"""TensorFlow / Keras models: converted to ONNX (tf2onnx), checked against TensorFlow, then searched as ONNX.

A small Keras CNN (Conv2D, BatchNormalization, ReLU, pooling, Dense) trained for a few steps on sklearn's bundled
digits (8x8x1, NHWC) is imported from memory, from a ``.keras`` file and from a SavedModel folder, searched with
all three knobs (prune, bits, rank), and run through the CLI. Needs the ``[tensorflow]`` extra; the message without it is tested in a
subprocess where ``import tensorflow`` fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")  # read when TensorFlow starts its thread pools
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install 'autosearch[tensorflow]')")
pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install 'autosearch[tensorflow]')")
keras = pytest.importorskip("keras", reason="Keras is not installed (pip install 'autosearch[tensorflow]')")

from autosearch.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TF_CPP_MIN_LOG_LEVEL="2", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


@pytest.fixture(scope="module")
def digits_nhwc():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1): NHWC as Keras takes it
    return x[:1400], d.target[:1400].astype(np.int64), x[1400:], d.target[1400:].astype(np.int64)


@pytest.fixture(scope="module")
def keras_cnn(digits_nhwc):
    """Conv2D/BatchNorm/ReLU/pooling/Dense, trained 3 epochs on the digits (seconds)."""
    x_train, y_train, _, _ = digits_nhwc
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(momentum=0.9), layers.ReLU(),
        layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same"), layers.BatchNormalization(momentum=0.9), layers.ReLU(),
        layers.GlobalAveragePooling2D(),
        layers.Dense(64, activation="relu"),
        layers.Dense(10),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def saved(keras_cnn, tmp_path_factory):
    """The CNN as a .keras file and as a SavedModel folder (``model.export``)."""
    d = tmp_path_factory.mktemp("keras")
    keras_cnn.save(d / "cnn.keras")
    keras_cnn.export(str(d / "cnn_savedmodel"), verbose=False)
    return d / "cnn.keras", d / "cnn_savedmodel"


def test_h5_file_and_tf_saved_model_save_folder_convert_too(keras_cnn, tmp_path: Path) -> None:
    from autosearch.keras_import import keras_to_onnx

    keras_cnn.save(tmp_path / "cnn.h5")  # Keras' legacy HDF5 format
    tf.saved_model.save(keras_cnn, str(tmp_path / "tf_saved"))  # TensorFlow's own writer: signature input 'inputs'
    h5, folder = keras_to_onnx(tmp_path / "cnn.h5"), keras_to_onnx(tmp_path / "tf_saved")
    assert h5.parity["output"] <= TOL and folder.parity["output_0"] <= TOL
    assert [i.name for i in folder.model.graph.input] == ["inputs"]
    assert not any(n.name.startswith("StatefulPartitionedCall") for n in folder.model.graph.node)


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def test_keras_cnn_imports_with_parity_from_memory_file_and_savedmodel(keras_cnn, saved, digits_nhwc) -> None:
    import onnxruntime as ort

    from autosearch.keras_import import is_keras_source
    from autosearch.model import import_model

    _, _, x_test, _ = digits_nhwc
    keras_file, savedmodel = saved
    assert is_keras_source(keras_cnn) and is_keras_source(keras_file) and is_keras_source(savedmodel)
    ref = keras_cnn.predict(x_test[:64], verbose=0)
    for source, example in ((keras_cnn, x_test[:1]), (keras_file, None), (savedmodel, x_test[:1])):
        src = import_model(source, example)
        assert src.origin == "onnx" and "tf2onnx" in src.notes[0], src.notes
        assert src.input_names == ["image"]
        assert src.output_names == (["output_0"] if source is savedmodel else ["output"])
        dims = src.onnx_model.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [8, 8, 1]  # NHWC kept, batch free
        assert src.input_batch_fixed() is None and src.batchable
        assert not [n for n in src.onnx_model.graph.node if n.op_type in ("BatchNormalization", "Mul")], \
            "Keras' BatchNormalization (Mul/Add at inference) is folded into the Conv"
        got = ort.InferenceSession(src.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"image": x_test[:64]})[0]
        assert _max_rel(ref, got) <= TOL  # a batch of 64 on the model checked at batch 1


def test_conversion_reports_parity_and_is_deterministic(saved, digits_nhwc) -> None:
    from autosearch.keras_import import keras_to_onnx
    from autosearch.model import _fingerprint

    keras_file, _ = saved
    a = keras_to_onnx(keras_file)  # random data of the model's input shape, batch 1
    b = keras_to_onnx(keras_file, {"image": digits_nhwc[2][:4]})
    assert list(a.feed) == ["image"] and a.feed["image"].shape == (1, 8, 8, 1)
    assert set(a.parity) == {"output"} and a.parity["output"] <= TOL and b.parity["output"] <= TOL
    assert _fingerprint(a.model) == _fingerprint(b.model)  # tf2onnx's name counter renumbered: same ONNX again


def test_parity_failure_names_the_output_and_the_largest_difference(keras_cnn, saved, digits_nhwc) -> None:
    from autosearch.keras_import import check_parity, compare_outputs, keras_to_onnx

    keras_file, _ = saved
    feed = {"image": digits_nhwc[2][:8]}
    onnx_of_original = keras_to_onnx(keras_file, feed).model
    assert check_parity(onnx_of_original, keras_cnn, feed)["output"] <= TOL
    changed = keras.models.clone_model(keras_cnn)
    changed.set_weights([w + 0.05 for w in keras_cnn.get_weights()])  # another model: its weights moved
    with pytest.raises(ConfigError) as err:
        check_parity(onnx_of_original, changed, feed)
    msg = str(err.value)
    assert "\n" not in msg and "output 'output' differs by up to" in msg, msg
    largest = float(re.search(r"differs by up to ([-+.\de]+)", msg).group(1))
    expected = np.max(np.abs(changed.predict(feed["image"], verbose=0) - keras_cnn.predict(feed["image"], verbose=0)))
    assert largest == pytest.approx(expected, rel=1e-2)
    with pytest.raises(ConfigError, match=r"output 'logits' differs by up to 0\.002 \(0\.001 of its scale 2; allowed 0\.0001\)"):
        compare_outputs({"logits": np.array([2.0, -1.0])}, {"logits": np.array([2.0, -1.002])})


def test_search_on_keras_cnn_with_all_three_knobs(keras_cnn, digits_nhwc, tmp_path: Path) -> None:
    from autosearch import search
    from autosearch.evaluate import LabelledEvaluator
    from autosearch.target import Target

    x_train, _, x_test, y_test = digits_nhwc
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent("""
        knobs:
          prune: [0.0, 0.25]
          bits: [32, 8]
          rank: [1.0, 0.5]
        quantization:
          mode: [static]
          reduce_range: [true]  # 7-bit weights: this CI's CPUs have no VNNI, u8s8 saturates the first Conv otherwise
          calibration_samples: 32
        constraints:
          max_accuracy_drop: null  # every trial runs to the end: the test is that they complete, not how good they are
        strategy:
          analysis: false
          remeasure_front: false
        budget:
          n_trials: 5
        sampler:
          name: random
          seed: 0
    """))
    ev = LabelledEvaluator(x_test, y_test, calibration=x_train[:64])
    target = Target(threads=1, warmup=2, min_runs=10, max_runs=50, max_seconds=0.2, lock_path=str(tmp_path / "lock"))
    study = search(keras_cnn, ev, example_inputs=x_test[:1], space=str(space), target=target, study_name="keras",
                   studies_dir=tmp_path / "studies", verbose=False)
    units = study.meta["units"]
    assert units["bits"] and units["rank"] and units["prune"], units  # all three knobs on a converted Keras model
    trials = [t for t in study.optuna_study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 5 and all(0.0 <= t.values[0] <= 1.0 for t in trials)  # accuracy on the digits labels
    assert any("prune" in t.user_attrs["summary"] for t in trials), [t.user_attrs["summary"] for t in trials]
    assert any("int8" in t.user_attrs["summary"] for t in trials), [t.user_attrs["summary"] for t in trials]


def test_cli_search_on_a_keras_file(saved, digits_nhwc, tmp_path: Path) -> None:
    keras_file, _ = saved
    _, _, x_test, y_test = digits_nhwc
    np.savez(tmp_path / "val.npz", x=x_test[:200], y=y_test[:200])
    (tmp_path / "space.yaml").write_text("knobs:\n  bits: [32, 8]\n  rank: [1.0, 0.5]\nquantization:\n  mode: [dynamic]\n"
                                         "strategy:\n  analysis: false\n  remeasure_front: false\nsampler:\n  name: random\n")
    out = subprocess.run([sys.executable, "-m", "autosearch", "search", "--model", str(keras_file), "--data", "val.npz",
                          "--space", "space.yaml", "--study", "k", "--n-trials", "2", "--metric", "accuracy"],
                         cwd=tmp_path, capture_output=True, text=True, check=False, timeout=600, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Pareto front of study 'k'" in out.stdout and "[  2/2] trial 1" in out.stdout, out.stdout[-2000:]
    assert "converted Keras file" in out.stdout and "tf2onnx" in out.stdout
    out = subprocess.run([sys.executable, "-m", "autosearch", "resume", "k", "--n-trials", "1"], cwd=tmp_path,
                         capture_output=True, text=True, check=False, timeout=600, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]  # converted again in a new process: the same ONNX, so the same study
    assert "(2 trials so far)" in out.stdout and "[  3/3] trial 2" in out.stdout, out.stdout[-2000:]


@pytest.mark.parametrize("kind", ["keras_file", "savedmodel"])
def test_without_tensorflow_one_line_says_how_to_install(saved, tmp_path: Path, kind: str) -> None:
    path = saved[0] if kind == "keras_file" else saved[1]
    code = ("import sys; sys.modules['tensorflow'] = None\n"  # `import tensorflow` now raises ImportError
            "from autosearch.cli import main\n"
            f"sys.exit(main(['search', '--model', {str(path)!r}, '--study', 'x', '--n-trials', '1']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300, env=_env())
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autosearch: error: "), out.stderr
    assert "pip install 'autosearch[tensorflow]'" in lines[0] and "Traceback" not in out.stderr
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "from autosearch.model import import_model\n"
            f"import_model({str(path)!r})")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300, env=_env())
    assert out.returncode == 1 and "ConfigError" in out.stderr and "pip install 'autosearch[tensorflow]'" in out.stderr
