#!/usr/bin/env python
"""Knobs: what each knob does alone and in a few combinations, on the digits CNN and on MiniLM.

For each model this builds, with AutoSearch's own build path (``autosearch.build.build_candidate``):
the float model; uniform structured pruning of every prune unit (25% / 50%; BatchNorm
recalibration on the CNN, with and without distillation); uniform low-rank of every
rank unit (rank kept 0.5 / 0.25); uniform int8 (static QDQ u8s8 and dynamic, per-channel); int16
and int4 (QDQ weights on the CNN; weight-only MatMulNBits on MiniLM); and a few joint candidates. It scores each (CNN: test accuracy; MiniLM: mean cosine to the float
embeddings and top-1 nearest-neighbour agreement), then times every variant of a model
*interleaved* (``autosearch.target.interleaved``) so the speedups come from one run.

Usage::

    .venv/bin/python benchmarks/knobs.py                        # both models, full budgets (long: distillation)
    .venv/bin/python benchmarks/knobs.py --models cnn --threads 2
    .venv/bin/python benchmarks/knobs.py --quick                # small data, 4 distillation steps, short timings

Figures depend on the CPU (int8 kernels: AVX2 vs AVX-512 VNNI) and on its load: compare rows of
one run, not across runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import autosearch  # noqa: F401  (installed, or editable: `make` sets up .venv)
except ImportError:  # run from a checkout without installing: use the repository's package
    sys.path.append(str(Path(__file__).resolve().parent.parent))


def say(msg: str) -> None:
    print(f"[knobs] {msg}", flush=True)


@dataclass
class Variant:
    """One candidate of the table."""

    label: str
    cand: Any  # autosearch.candidate.Candidate
    path: Path | None = None
    scores: dict[str, float] = field(default_factory=dict)
    build_s: float = float("nan")
    error: str | None = None


@dataclass(frozen=True)
class Budget:
    cnn_test: int | None  # test images scored (None: all 450)
    sentences: int  # MiniLM eval sentences
    calibration: int  # calibration samples (quantizer, BatchNorm, distillation)
    distill_steps: int  # MiniLM distillation steps of the "+ distil" rows
    distill_lr: float
    cnn_distill_steps: int  # CNN distillation steps of the "+ distil" row
    rounds: int  # interleaved latency rounds
    seconds: float  # latency budget per model and round
    min_runs: int
    max_runs: int


def budget_for(quick: bool, distill_steps: int | None) -> Budget:
    if quick:
        return Budget(cnn_test=200, sentences=32, calibration=16, distill_steps=distill_steps if distill_steps is not None else 4,
                      distill_lr=1e-4, cnn_distill_steps=4, rounds=2, seconds=0.3, min_runs=10, max_runs=100)
    return Budget(cnn_test=None, sentences=200, calibration=128, distill_steps=distill_steps if distill_steps is not None else 50,
                  distill_lr=1e-4, cnn_distill_steps=100, rounds=5, seconds=2.0, min_runs=50, max_runs=2000)


# --------------------------------------------------------------------------- variants
def _units(source: Any) -> Any:
    from autosearch.space import load_space
    from autosearch.study import discover_units

    space = load_space({"knobs": {"bits": [32, 8], "prune": [0.0, 0.5], "rank": [1.0, 0.5]}})
    units, notes = discover_units(source, space)
    for n in notes:
        say(n)
    return units


def cnn_variants(units: Any, b: Budget) -> list[Variant]:
    from autosearch.candidate import Candidate

    int8 = {u: 8 for u in units.bits}
    static = {"mode": "static", "activation_type": "uint8", "per_channel": True, "reduce_range": False, "preprocess": False, "calibrate_method": "minmax"}
    dynamic = {"mode": "dynamic", "per_channel": True, "reduce_range": False, "preprocess": False}
    rec = {"bn_recalibration": True, "reconstruct": False, "calibration_samples": b.calibration, "distill_steps": 0}
    refit = {**rec, "reconstruct": True}  # least-squares refit of the layers fed by pruned / factorized ones
    rank_units = [u for u in units.rank if u != "fc"]

    def prune(r: float) -> dict[str, float]:
        return {u: r for u in units.prune}

    def rank(r: float) -> dict[str, float]:
        return {u: r for u in rank_units}

    return [
        Variant("float", Candidate()),
        Variant("prune 25% + BN recal", Candidate(prune=prune(0.25), recovery=rec)),
        Variant("prune 50% + BN recal", Candidate(prune=prune(0.5), recovery=rec)),
        Variant("prune 50% + BN recal + LS refit", Candidate(prune=prune(0.5), recovery=refit)),
        Variant("rank 0.5", Candidate(rank=rank(0.5), recovery=rec)),
        Variant("rank 0.25", Candidate(rank=rank(0.25), recovery=rec)),
        Variant("rank 0.25 + LS refit", Candidate(rank=rank(0.25), recovery=refit)),
        Variant("int8 static u8s8 per-ch", Candidate(bits=int8, quant=static)),
        Variant("int8 dynamic per-ch", Candidate(bits=int8, quant=dynamic)),
        Variant("prune 25% + int8 static", Candidate(bits=int8, prune=prune(0.25), quant=static, recovery=rec)),
        Variant("prune 50% + int8 static", Candidate(bits=int8, prune=prune(0.5), quant=static, recovery=rec)),
        Variant("rank 0.5 + int8 static", Candidate(bits=int8, rank=rank(0.5), quant=static, recovery=rec)),
        Variant("prune 25% + rank 0.5 + int8 static", Candidate(bits=int8, prune=prune(0.25), rank=rank(0.5), quant=static, recovery=rec)),
        Variant("int16 static (QDQ weights)", Candidate(bits={u: 16 for u in units.bits}, quant=static)),
        Variant("int4 static (QDQ weights)", Candidate(bits={u: 4 for u in units.bits}, quant=static)),
        Variant(f"prune 50% + distil {b.cnn_distill_steps} + int8 static rr",
                Candidate(bits=int8, prune=prune(0.5), quant={**static, "reduce_range": True},
                          recovery={**rec, "calibration_samples": 200, "distill_steps": b.cnn_distill_steps, "distill_lr": 3e-4})),
    ]


def minilm_variants(units: Any, b: Budget) -> list[Variant]:
    from autosearch.candidate import Candidate

    int8 = {u: 8 for u in units.bits}
    ffn_out = {u for u in units.bits if u.endswith(".output.dense") and ".attention." not in u}
    int8_but_ffn_out = {u: (32 if u in ffn_out else 8) for u in units.bits}
    static = {"mode": "static", "activation_type": "uint8", "per_channel": True, "reduce_range": False, "preprocess": False, "calibrate_method": "minmax"}
    dynamic = {"mode": "dynamic", "per_channel": True, "reduce_range": False, "preprocess": False}
    n = b.distill_steps

    def rec(steps: int, refit: bool = False) -> dict[str, Any]:
        return {"bn_recalibration": True, "reconstruct": refit, "calibration_samples": b.calibration,
                "distill_steps": steps, "distill_lr": b.distill_lr}

    def prune(r: float, which: Sequence[str] = ("ffn", "attn")) -> dict[str, float]:
        return {u: r for u in units.prune if u.rpartition(".")[2] in which}

    def rank(r: float) -> dict[str, float]:
        return {u: r for u in units.rank}

    weighted = {**static, "op_scope": "weighted"}
    dyn_rr = {**dynamic, "reduce_range": True}  # 7-bit weights: no u8s8 saturation on CPUs without VNNI
    return [
        Variant("float", Candidate()),
        Variant("prune 25% (ffn+heads)", Candidate(prune=prune(0.25), recovery=rec(0))),
        Variant("prune 25% + LS refit", Candidate(prune=prune(0.25), recovery=rec(0, refit=True))),
        Variant(f"prune 25% + distil {n}", Candidate(prune=prune(0.25), recovery=rec(n))),
        Variant("prune 50% (ffn+heads)", Candidate(prune=prune(0.5), recovery=rec(0))),
        Variant(f"prune 50% + distil {n}", Candidate(prune=prune(0.5), recovery=rec(n))),
        Variant("rank 0.5 (all Linear)", Candidate(rank=rank(0.5), recovery=rec(0))),
        Variant("rank 0.5 + LS refit", Candidate(rank=rank(0.5), recovery=rec(0, refit=True))),
        Variant("rank 0.25 (all Linear)", Candidate(rank=rank(0.25), recovery=rec(0))),
        Variant(f"rank 0.5 + distil {n}", Candidate(rank=rank(0.5), recovery=rec(n))),
        Variant("int8 static u8s8 per-ch (all ops)", Candidate(bits=int8, quant=static)),
        Variant("int8 static u8s8 per-ch (weighted ops)", Candidate(bits=int8, quant=weighted)),
        Variant("int8 dynamic per-ch", Candidate(bits=int8, quant=dynamic)),
        Variant("int8 dynamic per-tensor", Candidate(bits=int8, quant={**dynamic, "per_channel": False})),
        Variant("int8 static weighted, FFN-out float", Candidate(bits=int8_but_ffn_out, quant=weighted)),
        Variant("int8 dynamic per-ch, FFN-out float", Candidate(bits=int8_but_ffn_out, quant=dynamic)),
        Variant(f"prune ffn 25% + distil {n} + int8 dyn rr", Candidate(bits=int8, prune=prune(0.25, ("ffn",)), quant=dyn_rr, recovery=rec(n))),
        Variant(f"rank 0.5 + distil {n} + int8 dyn rr", Candidate(bits=int8, rank=rank(0.5), quant=dyn_rr, recovery=rec(n))),
        Variant("int4 weight-only all (MatMulNBits)", Candidate(bits={u: 4 for u in units.bits}, quant=dynamic)),
        Variant("int4 FFN-in, int8 dynamic rest", Candidate(bits={u: (4 if u.endswith(".intermediate.dense") else 8) for u in units.bits}, quant=dynamic)),
        Variant("int16 static weighted (QDQ weights)", Candidate(bits={u: 16 for u in units.bits}, quant=weighted)),
    ]


# --------------------------------------------------------------------------- running
def build_all(source: Any, variants: list[Variant], units: Any, calibration: list[dict[str, np.ndarray]], work: Path) -> None:
    from autosearch.build import build_candidate
    from autosearch.errors import CandidateError, ConfigError

    for i, v in enumerate(variants):
        t = time.perf_counter()
        try:
            if not v.cand.structural and not v.cand.quantized:
                v.path = source.save(work / f"v{i:02d}" / "model.onnx")
            else:
                v.path = build_candidate(source, v.cand, work / f"v{i:02d}", bits_units=units.bits, calibration=calibration).path
        except (CandidateError, ConfigError) as exc:
            v.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        v.build_s = time.perf_counter() - t
        say(f"  built {v.label!r} in {v.build_s:.1f} s" + (f": FAILED {v.error}" if v.error else ""))


def time_all(variants: list[Variant], feed: dict[str, np.ndarray], threads: int, b: Budget) -> dict[str, Any]:
    from autosearch.target import Target, interleaved

    # interleaved() splits these over the rounds
    tgt = Target(threads=threads, warmup=5, min_runs=b.min_runs * b.rounds, max_runs=b.max_runs * b.rounds, max_seconds=b.seconds * b.rounds)
    ok = [(v.label, v.path) for v in variants if v.path is not None and v.error is None]
    return interleaved(ok, feed, tgt, rounds=b.rounds)


def table(title: str, variants: list[Variant], lat: dict[str, Any], score_cols: Sequence[tuple[str, str]], threads: int) -> str:
    base = lat.get("float")
    head = ["variant", *[c for _, c in score_cols], "latency ms (median)", "p10-p90 ms", "size MB", "speedup", "build s"]
    lines = [f"### {title} ({threads} thread{'s' if threads > 1 else ''})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        if v.error:
            lines.append(f"| {v.label} | " + " | ".join("-" for _ in head[1:-1]) + f" | failed: {v.error[:120]} |")
            continue
        st = lat.get(v.label)
        size = v.path.stat().st_size / 1e6 if v.path else float("nan")
        cells = [v.label, *[f"{v.scores.get(k, float('nan')):.4f}" for k, _ in score_cols]]
        if st is None:
            cells += ["-", "-", f"{size:.2f}", "-"]
        else:
            speed = base.median_ms / st.median_ms if base else float("nan")
            cells += [f"{st.median_ms:.3f}", f"{st.p10_ms:.2f}-{st.p90_ms:.2f}", f"{size:.2f}", f"{speed:.2f}x"]
        cells.append(f"{v.build_s:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_cnn(b: Budget, threads: Sequence[int], work: Path) -> list[str]:
    from autosearch.demo import default_problem
    from autosearch.evaluate import LabelledEvaluator
    from autosearch.model import import_model
    from autosearch.target import Target

    say("CNN: the digits ResNet (trained and cached on first use)")
    model, ev, example = default_problem()
    if b.cnn_test is not None:
        ev = LabelledEvaluator(ev.inputs[: b.cnn_test], ev.labels[: b.cnn_test], calibration=ev.calibration)
    source = import_model(model, example)
    units = _units(source)
    say(f"CNN: {len(units.bits)} bits units, {len(units.prune)} prune units, {len(units.rank)} rank units; {ev.num_samples} test images")
    variants = cnn_variants(units, b)
    build_all(source, variants, units, ev.calibration_feeds(max(b.calibration, 200), source.input_names), work / "cnn")
    scorer = Target(threads=max(threads))
    for v in variants:
        if v.path is not None and v.error is None:
            v.scores["accuracy"] = float(ev(scorer.session(v.path)))
    out = []
    for th in threads:
        say(f"CNN: timing {len(variants)} variants interleaved at {th} thread(s)")
        lat = time_all(variants, source.example_feed, th, b)
        out.append(table("Digits CNN", variants, lat, [("accuracy", "accuracy")], th))
    return out


def run_minilm(b: Budget, threads: Sequence[int], work: Path) -> list[str]:
    from autosearch.evaluate import run_batched
    from autosearch.model import import_model
    from autosearch.target import Target
    from autosearch.zoo.minilm import minilm_problem, nn_agreement

    say(f"MiniLM: all-MiniLM-L6-v2 (offline), {b.sentences} sentences at [1,128]")
    model, ev, example = minilm_problem(n_sentences=b.sentences, n_calibration=max(b.calibration, 64))
    source = import_model(model, example)
    units = _units(source)
    say(f"MiniLM: {len(units.bits)} bits units, {len(units.prune)} prune units, {len(units.rank)} rank units")
    variants = minilm_variants(units, b)
    build_all(source, variants, units, ev.calibration_feeds(max(b.calibration, 64), source.input_names), work / "minilm")
    scorer = Target(threads=max(threads))
    ref = None
    for v in variants:  # float first
        if v.path is None or v.error is not None:
            continue
        emb = run_batched(scorer.session(v.path), ev.inputs)[0]
        if ref is None:
            ref = emb
        g, r = emb.astype(np.float64), ref.astype(np.float64)
        v.scores["cosine"] = float(np.mean((g * r).sum(1) / np.maximum(np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1), 1e-30)))
        v.scores["nn"] = nn_agreement(emb, ref)
    out = []
    for th in threads:
        say(f"MiniLM: timing {len(variants)} variants interleaved at {th} thread(s)")
        lat = time_all(variants, source.example_feed, th, b)
        out.append(table("MiniLM (all-MiniLM-L6-v2)", variants, lat, [("cosine", "cosine"), ("nn", "NN agree")], th))
    return out


def header(b: Budget, threads: Sequence[int], quick: bool) -> str:
    import onnxruntime as ort
    import torch

    from autosearch.target import cpu_name

    return "\n".join([
        "## Knobs: each alone and a few joint candidates, measured in one run",
        "",
        (f"- CPU: {cpu_name()} ({os.cpu_count()} logical cores); threads {','.join(map(str, threads))}; "
         f"ORT {ort.__version__}, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}"),
        f"- load average at start: {os.getloadavg()[0]:.2f} (other work on the machine skews absolute figures; ratios within a table are interleaved)",
        (f"- budget: {'QUICK (smoke test)' if quick else 'full'}; calibration {b.calibration} samples; MiniLM distillation "
         f"{b.distill_steps} steps at lr {b.distill_lr:g} on calibration sentences (never the scored ones); "
         f"latency: {b.rounds} interleaved rounds x {b.seconds:.1f} s per variant"),
    ])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--models", default="cnn,minilm", help="comma-separated: cnn, minilm (default both)")
    p.add_argument("--threads", default="1", help="thread counts to time at, e.g. 1,2 (default 1)")
    p.add_argument("--quick", action="store_true", help="small data, few distillation steps, short timings (a smoke test)")
    p.add_argument("--distill-steps", type=int, default=None, help="MiniLM distillation steps of the '+ distil' rows (default 50; --quick 4)")
    p.add_argument("--out", default=None, help="also write the tables (markdown) here")
    p.add_argument("--keep", default=None, help="keep the built models in this folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in ("cnn", "minilm")]
    if bad:
        p.error(f"unknown model(s) {bad}; choose from cnn, minilm")
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        p.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(args.threads)))
    import torch

    torch.set_num_threads(max(args.threads))
    b = budget_for(args.quick, args.distill_steps)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="knobs_"))
    work.mkdir(parents=True, exist_ok=True)
    report = [header(b, args.threads, args.quick)]
    say(report[0].replace("\n", "\n[knobs] "))
    runners: dict[str, Callable[[Budget, Sequence[int], Path], list[str]]] = {"cnn": run_cnn, "minilm": run_minilm}
    status = 0
    t0 = time.perf_counter()
    try:
        for m in args.models:
            try:
                report += runners[m](b, args.threads, work)
            except Exception as exc:  # noqa: BLE001  (one model failing should not hide the other's table)
                status = 1
                traceback.print_exc()
                report.append(f"### {m}: FAILED: {type(exc).__name__}: {exc}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report.append(f"\n(total {time.perf_counter() - t0:.0f} s; load average at end {os.getloadavg()[0]:.2f})")
    text = "\n\n".join(report)
    print("\n" + text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
