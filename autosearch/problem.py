"""The problem of a search as data: which model, which samples, which metric.

The CLI writes a problem spec, the study stores it (so ``autosearch resume`` and export can rebuild the
evaluator), and :func:`load_problem` turns it back into ``(model, evaluator, example_inputs)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from autosearch.errors import ConfigError

__all__ = ["load_npz", "load_problem"]


def load_npz(path: str) -> dict[str, Any]:
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data file {path!r} does not exist: pass an .npz with 'x' (and 'y' for labels)")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - OSError, BadZipFile, ValueError (pickled), not an .npz: a ConfigError
        raise ConfigError(f"{path!r} is not a readable .npz file ({exc}); save one with numpy.savez(path, x=..., y=...)") from None


def load_problem(spec: Mapping[str, Any], say: Callable[[str], None] = print) -> tuple[Any, Any, Any]:
    """(model, evaluator, example_inputs) from a problem spec, as the CLI writes it and a study stores it:
    ``{"kind": "default"}`` (the embedded digits CNN) or ``{"kind": "onnx", "path": ..., "data": npz or None,
    "metric": name or None}``. The path may also be a ``.keras``/``.h5`` file or a SavedModel folder (converted by ``import_model``).
    Export rebuilds a CLI study's evaluator from it."""
    from autosearch.evaluate import FidelityEvaluator, LabelledEvaluator

    if spec["kind"] == "default":
        from autosearch.demo import default_problem

        return default_problem()
    from autosearch.feeds import Samples
    from autosearch.keras_import import is_keras_source
    from autosearch.model import graph_inputs, load_onnx, normalize_onnx

    path = spec["path"]
    if is_keras_source(path):  # a .keras/.h5 file or a SavedModel folder: import_model converts it (checked on the example)
        from autosearch.keras_import import input_specs

        specs = input_specs(path)
        names, ranks = [n for n, _ in specs], {n: len(shape) for n, shape in specs}
    else:
        proto, _ = normalize_onnx(load_onnx(path))  # clear errors first
        names = [vi.name for vi in graph_inputs(proto)]
        ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in graph_inputs(proto)}
    if not spec.get("data"):
        return path, None, None
    data = load_npz(spec["data"])
    x: Any
    inputs = {k: v for k, v in data.items() if k != "y" and not k.startswith("calib")}
    if not inputs:
        raise ConfigError(f"{spec['data']!r} has no input array: save it with numpy.savez(path, x=..., y=...)")
    if "x" in inputs and len(names) == 1 and (names[0] not in inputs or names[0] == "x"):
        x = {names[0]: inputs["x"]}
        ignored = sorted(k for k in data if k not in ("x", "y", "calib") and not k.startswith("calib_"))
        if ignored:
            say(f"[autosearch] note: {spec['data']!r}: the model's one input takes 'x'; array(s) {ignored} are ignored "
                "(the data file's arrays used: x, y, calib, calib_<input>)")
    else:
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ConfigError(f"{spec['data']!r} lacks array(s) {missing} for the model's inputs {names}; it has "
                              f"{sorted(inputs)} (name one array per input, or use 'x' for a one-input model)")
        x = {n: inputs[n] for n in names}
    calib: Any = data.get("calib")
    if calib is not None and len(names) == 1:
        calib = {names[0]: calib}
    per_input = {k[len("calib_"):]: v for k, v in data.items() if k.startswith("calib_")}
    if per_input:
        calib = per_input
    example = Samples(x, names, ranks=ranks).feed(0)
    metric = spec.get("metric")
    if "y" in data and metric in (None, "accuracy"):
        return path, LabelledEvaluator(x, data["y"], calibration=calib), example
    if metric == "accuracy":
        raise ConfigError(f"--metric accuracy needs labels: {spec['data']!r} has no 'y' array")
    return path, FidelityEvaluator(x, metric=metric or "scaled_cosine", calibration=calib), example
