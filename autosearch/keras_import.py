"""TensorFlow / Keras models in: converted to ONNX by tf2onnx, then checked against TensorFlow.

A Keras 3 model in memory (``tf.keras`` is Keras 3 from TensorFlow 2.16 on), a ``.keras`` or ``.h5`` file, or a
SavedModel folder (one holding ``saved_model.pb``, as ``model.export(dir)`` or ``tf.saved_model.save`` write it)
becomes a float ONNX ``ModelProto``; :func:`autosearch.model.import_model` then takes it like any ONNX model, so the
units, knobs, study and export see an ONNX model.

The conversion is ``tf2onnx.convert.from_function`` on a ``tf.function`` that calls the model (``training=False``)
or the SavedModel's serving signature, with an explicit ``tf.TensorSpec`` per input whose batch dimension is free.
Keras 3's own ``model.export(path, format="onnx")`` is that same call (and needs a model that has been called
once); ``tf2onnx.convert.from_keras`` fails on Keras 3 models (it looks up Keras 2 tensor names). Going through
``from_function`` directly takes all three sources alike and names the ONNX inputs and outputs itself.

Before the search starts, :func:`check_parity` runs the ONNX model in ONNX Runtime and the original in TensorFlow on
the example input: the largest difference of each output must stay within ``tolerance`` (1e-4) of that output's
scale (its largest absolute value), or the import stops with a :class:`ConfigError` naming the output.

The ONNX graph keeps Keras' layout: inputs are NHWC as the Keras model takes them (tf2onnx puts Transposes around
the convolutions, which run NCHW in ONNX).

Nothing here imports TensorFlow until a Keras model is actually given: :func:`is_keras_source` only looks at the
path or the object's class.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from autosearch.errors import ConfigError

__all__ = ["KERAS_SUFFIXES", "Converted", "check_parity", "compare_outputs", "input_specs", "is_keras_source", "keras_to_onnx"]

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
INSTALL = "pip install 'autosearch[tensorflow]'"
_OPSET = 17  # the opset autosearch.model exports PyTorch models at
_TOLERANCE = 1e-4


def is_keras_source(model: Any) -> bool:
    """Whether ``model`` is a Keras / TensorFlow model, a ``.keras``/``.h5`` file or a SavedModel folder.

    Imports nothing: a path is judged by its suffix or by the ``saved_model.pb`` it holds, an object by the
    package its class comes from (``keras``, ``tf_keras`` or ``tensorflow``).
    """
    if isinstance(model, (str, Path)):
        p = Path(model)
        return p.suffix.lower() in KERAS_SUFFIXES or (p.is_dir() and (p / "saved_model.pb").is_file())
    return any(c.__module__.split(".")[0] in ("keras", "tf_keras", "tensorflow") for c in type(model).__mro__)


def _tf(what: str) -> tuple[Any, Any]:
    """``(tensorflow, tf2onnx)``, or one line saying how to install them."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise ConfigError(f"{what} is a TensorFlow/Keras model: converting it to ONNX needs TensorFlow and tf2onnx, "
                          f"which are not installed ({exc}); install them with: {INSTALL}") from None
    return tf, tf2onnx


@dataclass
class Converted:
    """A Keras / TensorFlow model converted to ONNX.

    Attributes:
        model: The float ONNX graph (inputs in the Keras model's layout, batch dimension ``batch``).
        feed: The example input it was checked on, by ONNX input name.
        parity: Per output name, the largest difference to TensorFlow relative to the output's scale.
        notes: What the conversion did, for the user.
    """

    model: onnx.ModelProto
    feed: dict[str, np.ndarray]
    parity: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Callable:
    """A TensorFlow model as one function: input tensors in order -> outputs by name."""

    fn: Callable[[list[Any]], dict[str, Any]]
    names: list[str]
    shapes: list[tuple[int | None, ...]] | None  # None: unknown until example inputs give them
    dtypes: list[Any] | None
    what: str
    owner: Any = None  # a loaded SavedModel owns the variables its signature reads: kept alive with the function


def _describe(model: Any) -> str:
    if isinstance(model, (str, Path)):
        p = Path(model)
        return f"SavedModel folder {str(p)!r}" if p.is_dir() else f"Keras file {str(p)!r}"
    return f"the {type(model).__name__} model"


def _load(model: Any) -> Any:
    """A Keras model object, or a loaded SavedModel, from what the user handed over."""
    if not isinstance(model, (str, Path)):
        return model
    p = Path(model)
    if not p.exists():
        raise ConfigError(f"model path {str(p)!r} does not exist: pass a .keras/.h5 file or a SavedModel folder")
    if p.is_dir():
        tf, _ = _tf(_describe(p))
        try:
            return tf.saved_model.load(str(p))
        except Exception as exc:  # noqa: BLE001 - TF raises OSError, ValueError, its own errors: one ConfigError
            raise ConfigError(f"TensorFlow cannot load the SavedModel folder {str(p)!r}: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:400]}") from None
    _tf(_describe(p))
    import keras

    try:
        return keras.models.load_model(str(p), compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises ValueError, OSError, ...: one ConfigError with the reason
        raise ConfigError(f"Keras cannot load {str(p)!r}: {type(exc).__name__}: {' '.join(str(exc).split())[:400]} "
                          "(a model with custom layers needs them registered with keras.saving.register_keras_serializable)"
                          ) from None


def _output_dict(out: Any) -> dict[str, Any]:
    """A model's outputs by name: a dict as it is, a list or a single tensor as ``output``, ``output_1``, ..."""
    if isinstance(out, Mapping):
        return {str(k): v for k, v in out.items()}
    seq = list(out) if isinstance(out, (list, tuple)) else [out]
    return {f"output{'' if i == 0 else f'_{i}'}": t for i, t in enumerate(seq)}


def _as_callable(obj: Any, what: str) -> _Callable:
    """The model as a function of its inputs, with their names, shapes and dtypes where the model knows them."""
    import keras

    if isinstance(obj, keras.Model):
        backend = keras.backend.backend()
        if backend != "tensorflow":
            raise ConfigError(f"Keras runs on the {backend!r} backend: converting {what} to ONNX needs the TensorFlow "
                              "backend (set KERAS_BACKEND=tensorflow before importing keras)")
        struct = getattr(obj, "_inputs_struct", None)
        try:
            inputs = list(obj.inputs)
        except (AttributeError, ValueError):  # a subclassed model: no symbolic inputs, the example inputs say them
            inputs = []
        names = [str(t.name) for t in inputs]
        if not names or any(n.startswith("keras_tensor") for n in names):  # unnamed keras.Input(): input, input_1, ...
            names = [f"input{'' if i == 0 else f'_{i}'}" for i in range(len(inputs))]
        keys = list(struct) if isinstance(struct, Mapping) else None

        def call(args: list[Any]) -> dict[str, Any]:
            if keys is not None:  # a model built on a dict of inputs takes them by its own keys
                x: Any = dict(zip(keys, args))
            else:
                x = args[0] if len(args) == 1 else list(args)
            return _output_dict(obj(x, training=False))

        if not inputs:
            return _Callable(call, [], None, None, what)
        return _Callable(call, names, [tuple(t.shape) for t in inputs], [t.dtype for t in inputs], what)
    sigs = getattr(obj, "signatures", None)
    if sigs is not None:  # a loaded SavedModel
        if not sigs:
            raise ConfigError(f"{what} has no serving signature: save it with model.export(dir) or "
                              "tf.saved_model.save(obj, dir, signatures=...)")
        sig = sigs["serving_default"] if "serving_default" in sigs else sigs[min(sigs)]
        args, kwargs = sig.structured_input_signature
        if args:
            raise ConfigError(f"{what}: its serving signature takes positional inputs; re-save it with named inputs")
        sig_names = list(kwargs)

        def call_sig(xs: list[Any]) -> dict[str, Any]:
            return _output_dict(sig(**dict(zip(sig_names, xs))))

        return _Callable(call_sig, sig_names, [tuple(kwargs[n].shape) for n in sig_names],
                         [kwargs[n].dtype for n in sig_names], what, owner=obj)
    raise ConfigError(f"{what} is neither a Keras model nor a loaded SavedModel (not a keras.Model, no .signatures): pass "
                      "a keras.Model, a .keras/.h5 file or a SavedModel folder")


def input_specs(model: Any) -> list[tuple[str, tuple[int | None, ...]]]:
    """The names and shapes (``None`` where free) the ONNX conversion's inputs will have, without converting.

    Raises:
        ConfigError: as :func:`keras_to_onnx`; also for a subclassed model, which declares no input shapes.
    """
    what = _describe(model)
    loaded = _load(model)
    _tf(what)
    c = _as_callable(loaded, what)
    if c.shapes is None:
        raise ConfigError(f"{what} does not declare its input shapes (a subclassed model): build it on keras.Input(...) "
                          "layers, or pass the model object with example_inputs from Python")
    return [(n, tuple(shape)) for n, shape in zip(c.names, c.shapes)]


def _example_feed(c: _Callable, example_inputs: Any, tf: Any) -> dict[str, np.ndarray]:
    """The example input by name: the user's arrays (floats cast to the input's float type, as Keras does), or
    random data of the model's input shapes at batch 1."""
    import keras

    feed = _given_feed(c, example_inputs, tf)
    for k, n in enumerate(c.names):  # a subclassed model declares no dtype: floats go in as Keras' floatx (float32)
        want = np.dtype(tf.as_dtype(c.dtypes[k]).as_numpy_dtype) if c.dtypes else np.dtype(keras.config.floatx())
        if np.issubdtype(want, np.floating) and np.issubdtype(feed[n].dtype, np.floating):
            feed[n] = feed[n].astype(want, copy=False)
    return feed


def _given_feed(c: _Callable, example_inputs: Any, tf: Any) -> dict[str, np.ndarray]:
    if example_inputs is None:
        if c.shapes is None or c.dtypes is None:
            raise ConfigError(f"{c.what} does not declare its input shapes (a subclassed model): pass example_inputs, "
                              "e.g. np.zeros((1, 28, 28, 1), np.float32)")
        rng = np.random.default_rng(0)
        feed: dict[str, np.ndarray] = {}
        for n, shape, dt in zip(c.names, c.shapes, c.dtypes):
            dims = [1 if d is None else int(d) for d in shape]
            np_dt = np.dtype(tf.as_dtype(dt).as_numpy_dtype)
            feed[n] = rng.integers(0, 2, size=dims).astype(np_dt) if np.issubdtype(np_dt, np.integer) \
                else rng.standard_normal(dims).astype(np_dt)
        return feed
    if isinstance(example_inputs, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in example_inputs.items()}
        if c.names and sorted(arrays) != sorted(c.names):
            raise ConfigError(f"example input names {sorted(arrays)} do not match the model's inputs {c.names}")
        if not c.names:
            c.names = list(arrays)
        return {n: arrays[n] for n in c.names}
    seq = list(example_inputs) if isinstance(example_inputs, (list, tuple)) else [example_inputs]
    arrs = [np.asarray(x) for x in seq]
    if not c.names:
        c.names = [f"input{'' if i == 0 else f'_{i}'}" for i in range(len(arrs))]
    if len(arrs) != len(c.names):
        raise ConfigError(f"{len(arrs)} example input(s) given, the model takes {len(c.names)} ({c.names})")
    return dict(zip(c.names, arrs))


def _run_tf(c: _Callable, feed: Mapping[str, np.ndarray], tf: Any) -> dict[str, np.ndarray]:
    try:
        out = c.fn([tf.convert_to_tensor(feed[n]) for n in c.names])
    except Exception as exc:  # noqa: BLE001 - whatever the model's call raises: a ConfigError with the shapes
        shapes = {n: list(np.shape(v)) for n, v in feed.items()}
        raise ConfigError(f"{c.what} does not run in TensorFlow on the example input {shapes}: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}") from None
    return {k: np.asarray(v) for k, v in out.items()}


def compare_outputs(expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], *,
                    tolerance: float = _TOLERANCE, what: str = "the ONNX model") -> dict[str, float]:
    """Per output, the largest difference relative to the output's scale (its largest absolute value).

    Raises:
        ConfigError: an output is missing, has another shape, or differs by more than ``tolerance`` of its scale;
            one line naming the output, the largest difference and the scale.
    """
    missing = [k for k in expected if k not in got]
    if missing:
        raise ConfigError(f"{what} lacks output(s) {missing} of the TensorFlow model (it has {sorted(got)})")
    rel: dict[str, float] = {}
    for name, ref in expected.items():
        ref, val = np.asarray(ref), np.asarray(got[name])
        if ref.shape != val.shape:
            raise ConfigError(f"{what}: output {name!r} has shape {list(val.shape)}, TensorFlow's {list(ref.shape)}")
        if not np.issubdtype(ref.dtype, np.floating):
            rel[name] = 0.0 if np.array_equal(ref, val) else float("inf")
            diff, scale = (0.0 if rel[name] == 0 else float("inf")), 1.0
        else:
            a, b = ref.astype(np.float64), val.astype(np.float64)
            diff = float(np.max(np.abs(a - b))) if a.size else 0.0
            if not np.isfinite(diff):
                diff = float("inf")
            scale = float(np.max(np.abs(a))) if a.size else 0.0
            scale = scale if scale > 0 else 1.0
            rel[name] = diff / scale
        if rel[name] > tolerance:
            raise ConfigError(f"{what} does not match TensorFlow on the example input: output {name!r} differs by up to "
                              f"{diff:.3g} ({rel[name]:.2g} of its scale {scale:.3g}; allowed {tolerance:g})")
    return rel


def _run_onnx(proto: onnx.ModelProto, feed: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, dict(feed))
    except Exception as exc:  # noqa: BLE001 - ORT's load and run errors: one ConfigError with the message
        raise ConfigError(f"{what} does not run in ONNX Runtime {ort.__version__}: {' '.join(str(exc).split())[:400]} "
                          "(an op tf2onnx could not convert stays a TensorFlow op ONNX Runtime does not know)") from None
    return {o.name: v for o, v in zip(sess.get_outputs(), outs)}


def check_parity(proto: onnx.ModelProto, reference: Any, feed: Mapping[str, np.ndarray], *,
                 tolerance: float = _TOLERANCE) -> dict[str, float]:
    """Run ``proto`` in ONNX Runtime and ``reference`` (a Keras model, a ``.keras``/``.h5`` file, a SavedModel folder
    or a loaded SavedModel) in TensorFlow on ``feed``; see :func:`compare_outputs`.

    Returns:
        Per output name, the largest difference relative to the output's scale.

    Raises:
        ConfigError: the outputs differ by more than ``tolerance`` of their scale (naming the output and the
            difference), or either model does not run on ``feed``.
    """
    what = _describe(reference)
    loaded = _load(reference)
    tf, _ = _tf(what)
    c = _as_callable(loaded, what)
    if not c.names:
        c.names = list(feed)
    expected = _run_tf(c, feed, tf)
    return compare_outputs(expected, _run_onnx(proto, feed, f"the ONNX conversion of {what}"), tolerance=tolerance,
                           what=f"the ONNX conversion of {what}")


def _fold_affine_into_conv(proto: onnx.ModelProto) -> int:
    """``Conv -> Mul(c) -> Add(c)`` with per-output-channel constants folded into the Conv's weight and bias, in place.

    Keras 3 computes BatchNormalization at inference as ``x * scale + shift`` (no fused op), which tf2onnx writes as a
    ``Mul`` and an ``Add`` after the ``Conv``: left there they run in float between int8 layers once the Conv is
    quantized. ``W' = W * s``, ``b' = b * s + t``. Only a Conv whose output feeds the one Mul/Add, with float32
    initializers of shape ``[C, 1, ...]`` or ``[1, C, 1, ...]`` (or a scalar), is folded. Returns how many were.
    """
    from onnx import numpy_helper

    g = proto.graph
    folded = 0
    while True:
        inits = {t.name: t for t in g.initializer}
        uses: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                uses.setdefault(i, []).append(n)
        outputs = {o.name for o in g.output}
        done = False
        for conv in g.node:
            if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits or conv.output[0] in outputs:
                continue
            nxt = uses.get(conv.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in ("Mul", "Add") or len(nxt[0].input) != 2:
                continue
            op = nxt[0]
            const = op.input[1] if op.input[0] == conv.output[0] else op.input[0]
            if const not in inits or inits[const].data_type != onnx.TensorProto.FLOAT \
                    or inits[conv.input[1]].data_type != onnx.TensorProto.FLOAT:
                continue
            w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
            c = numpy_helper.to_array(inits[const]).astype(np.float64)
            n_out = w.shape[0]
            shape = [d for d in c.shape]
            if shape and shape[0] == 1 and len(shape) == w.ndim:
                shape = shape[1:]
            if c.size not in (1, n_out) or (c.size == n_out and (not shape or shape[0] != n_out or any(d != 1 for d in shape[1:])
                                                                 or len(shape) > w.ndim - 1)):
                continue
            vec = np.broadcast_to(c.reshape(-1), (n_out,))
            has_bias = len(conv.input) > 2 and conv.input[2] != ""
            if has_bias and conv.input[2] not in inits:
                continue
            b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(n_out)
            if op.op_type == "Mul":
                w, b = w * vec.reshape(-1, *([1] * (w.ndim - 1))), b * vec
            else:
                b = b + vec
            k = folded
            w_name, b_name = f"{conv.input[1]}__affine{k}", f"{conv.name}__affine_bias{k}"
            g.initializer.extend([numpy_helper.from_array(w.astype(np.float32), w_name),
                                  numpy_helper.from_array(b.astype(np.float32), b_name)])
            x = conv.input[0]
            del conv.input[:]
            conv.input.extend([x, w_name, b_name])
            conv.output[0] = op.output[0]
            g.node.remove(op)
            folded += 1
            done = True
            break
        if not done:
            break
    if folded:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [t for t in g.initializer if t.name in used]
        g.ClearField("initializer")
        g.initializer.extend(keep)
    return folded


def _canonical_names(proto: onnx.ModelProto) -> None:
    """tf2onnx numbers the names it makes (``..__173``) from a counter that runs on across conversions in one process;
    renumbered here ``__0``, ``__1``, ... in the counter's order, so that converting a model again gives the same
    ONNX (and the same fingerprint, which a resumed study checks). Node names (the units' names) lose the
    ``StatefulPartitionedCall/`` prefix a SavedModel's signature puts before each."""
    import re

    pat = re.compile(r"__(\d+)(?=(:\d+)?$)")
    g = proto.graph
    names: set[str] = set()
    for n in g.node:
        names.update([n.name, *n.input, *n.output])
    names.update(t.name for t in g.initializer)
    names.update(v.name for v in [*g.input, *g.output, *g.value_info])
    numbers = sorted({int(m.group(1)) for s in names if (m := pat.search(s))})
    rank = {v: k for k, v in enumerate(numbers)}

    def fix(s: str) -> str:
        return pat.sub(lambda m: f"__{rank[int(m.group(1))]}", s)

    prefix = "StatefulPartitionedCall/"  # a SavedModel signature's call wraps every node name (twice): left out
    short = [re.sub(f"^(?:{prefix})+", "", n.name) for n in g.node]
    if len(set(short)) < len(short) or "" in short:
        short = [n.name for n in g.node]
    for n, name in zip(g.node, short):
        n.name = fix(name)
        for seq in (n.input, n.output):
            for k, s in enumerate(seq):
                seq[k] = fix(s)
    for t in g.initializer:
        t.name = fix(t.name)
    for v in [*g.input, *g.output, *g.value_info]:
        v.name = fix(v.name)
    g.doc_string = "converted by tf2onnx"


def _name_batch(proto: onnx.ModelProto) -> None:
    """The free first dimension tf2onnx names ``unk__N`` on the graph's inputs and outputs becomes ``batch``."""
    for vi in list(proto.graph.input) + list(proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param") and dims[0].dim_param.startswith("unk__"):
            dims[0].dim_param = "batch"


def keras_to_onnx(model: Any, example_inputs: Any = None, *, opset: int = _OPSET,
                  tolerance: float = _TOLERANCE) -> Converted:
    """Convert a Keras model, a ``.keras``/``.h5`` file or a SavedModel folder to ONNX and check it against TensorFlow.

    Args:
        model: A ``keras.Model`` (Keras 3, TensorFlow backend), a path to a ``.keras`` or ``.h5`` file, a SavedModel
            folder, or a SavedModel loaded with ``tf.saved_model.load``.
        example_inputs: One batch of input as numpy arrays in the Keras layout (NHWC for images): an array, a
            sequence in input order, or a dict by input name. ``None``: random data of the model's input shapes,
            batch 1.
        opset: ONNX opset of the conversion.
        tolerance: Largest difference allowed between the ONNX and the TensorFlow outputs, relative to each
            output's largest absolute value.

    Raises:
        ConfigError: TensorFlow is not installed (one line with the ``pip install``), the model cannot be loaded or
            run, tf2onnx fails, or the converted model does not match TensorFlow on the example input.
    """
    what = _describe(model)
    loaded = _load(model)  # a missing file is said before a missing TensorFlow
    tf, tf2onnx = _tf(what)
    c = _as_callable(loaded, what)
    feed = _example_feed(c, example_inputs, tf)
    expected = _run_tf(c, feed, tf)
    shapes = c.shapes or [tuple(feed[n].shape) for n in c.names]
    dtypes = c.dtypes or [tf.as_dtype(feed[n].dtype) for n in c.names]
    specs = [tf.TensorSpec((None, *shape[1:]) if shape else (), dt, name=n)
             for n, shape, dt in zip(c.names, shapes, dtypes)]

    @tf.function(autograph=False)
    def fn(*args: Any) -> dict[str, Any]:
        return c.fn(list(args))

    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # tf2onnx logs each step at INFO/WARNING; its errors still show
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=specs, opset=opset)
    except Exception as exc:  # noqa: BLE001 - tf2onnx fails in many ways: one ConfigError with the reason
        raise ConfigError(f"tf2onnx {tf2onnx.__version__} could not convert {what} to ONNX: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:400]}") from None
    finally:
        logger.setLevel(level)
    _name_batch(proto)
    _canonical_names(proto)
    n_fold = _fold_affine_into_conv(proto)
    parity = compare_outputs(expected, _run_onnx(proto, feed, f"the ONNX conversion of {what}"), tolerance=tolerance,
                             what=f"the ONNX conversion of {what}")
    worst = max(parity.values(), default=0.0)
    note = (f"converted {what} to ONNX with tf2onnx {tf2onnx.__version__} (TensorFlow {tf.__version__}, opset {opset}); "
            f"its outputs match TensorFlow's on the example input within {worst:.1g} of their scale")
    notes = [note]
    if n_fold:
        notes.append(f"folded {n_fold} per-channel Mul/Add (Keras' BatchNormalization at inference) into the Conv before each")
    return Converted(proto, feed, parity, notes)
