#!/usr/bin/env python
"""Ceiling: how much cosine can distillation win back for MiniLM's mildest structural changes?

The MiniLM search keeps every prune / rank parameter neutral when, alone at its mildest value and
distilled as far as the space allows, it still breaks the cosine >= 0.99 floor. This script asks
whether a longer or richer distillation would change that verdict, on the same text the search may
use (the calibration sentences shipped in ``autosearch/zoo/data/sentences.txt``; nothing is
downloaded). For each change it scores, in torch, the mean cosine to the float embeddings on the
eval sentences after:

- the least-squares refit alone (what the search does without distillation);
- ``N`` Adam steps on the output MSE only (``apply_structural(distill_hidden=False)``, what the
  search did before it matched hidden states);
- ``N`` steps that also match every encoder block's hidden states (the default for transformers:
  each block's MSE relative to the teacher's scale, padding left out, weight 0.1 per block).

Usage::

    .venv/bin/python benchmarks/ceiling.py                      # 50 and 200 steps, two changes (~10 min at 2 threads)
    .venv/bin/python benchmarks/ceiling.py --steps 50 --changes ffn_low

Scores only (no latency): the question is whether any of these reaches 0.99.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

try:
    import autosearch  # noqa: F401
except ImportError:
    sys.path.append(str(Path(__file__).resolve().parent.parent))

#: The changes, named as in search_spaces/transformer.yaml (blocks 0-2 = "low").
CHANGES = {
    "ffn_low": ("prune", "bert.encoder.layer.{i}.ffn", 0.25),
    "heads_low": ("prune", "bert.encoder.layer.{i}.attn", 0.25),
    "ffn_in_low": ("rank", "bert.encoder.layer.{i}.intermediate.dense", 0.5),
}


def say(msg: str) -> None:
    print(f"[ceiling] {msg}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--changes", default="ffn_low,heads_low", help=f"comma-separated, from {', '.join(CHANGES)} (default ffn_low,heads_low)")
    p.add_argument("--steps", default="50,200", help="distillation step counts (default 50,200)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, cosine-decayed (default 1e-4, the preset's)")
    p.add_argument("--calibration", type=int, default=200, help="calibration samples (default 200, the preset's)")
    args = p.parse_args(argv)
    changes = [c.strip() for c in args.changes.split(",") if c.strip()]
    bad = [c for c in changes if c not in CHANGES]
    if bad:
        p.error(f"unknown change(s) {bad}; choose from {', '.join(CHANGES)}")
    steps = [int(s) for s in args.steps.split(",")]

    import torch
    import torch.nn.functional as F

    from autosearch.transforms.structural import apply_structural
    from autosearch.zoo.minilm import INPUT_NAMES, minilm_problem

    torch.manual_seed(0)
    model, ev, example = minilm_problem(n_calibration=args.calibration)
    model.eval()
    eval_in = tuple(torch.from_numpy(ev.inputs[n]) for n in INPUT_NAMES)
    cal = ev.calibration
    n_cal = len(cal[INPUT_NAMES[0]])
    batches = [tuple(torch.from_numpy(cal[n][i : i + 32]) for n in INPUT_NAMES) for i in range(0, n_cal, 32)]
    ex = tuple(example[n] for n in INPUT_NAMES)
    with torch.no_grad():
        ref = model(*eval_in)

    def cosine(m) -> float:
        with torch.no_grad():
            return float(F.cosine_similarity(m(*eval_in), ref).mean())

    say(f"MiniLM: {len(ref)} eval sentences, {n_cal} calibration samples, torch threads {torch.get_num_threads()}")
    rows = []
    for name in changes:
        knob, pattern, value = CHANGES[name]
        spec = {pattern.format(i=i): value for i in range(3)}
        kw = {"prune": spec} if knob == "prune" else {"rank": spec}
        recipes = [("least-squares refit, no distillation", 0, False)]
        recipes += [(f"{s} steps, outputs only", s, False) for s in steps]
        recipes += [(f"{s} steps, outputs + every block's hidden states", s, True) for s in steps]
        for label, n, hidden in recipes:
            t = time.perf_counter()
            student = apply_structural(model, ex, calibration=batches, distill_steps=n, distill_lr=args.lr, distill_hidden=hidden, **kw)
            score = cosine(student)
            rows.append((f"{name} ({knob} {value}, blocks 0-2)", label, score, time.perf_counter() - t))
            say(f"{rows[-1][0]} | {label}: cosine {score:.4f} ({rows[-1][3]:.0f} s)")
    print()
    print("| change | recovery | cosine | drop | seconds |")
    print("|---|---|---|---|---|")
    for change, label, score, sec in rows:
        print(f"| {change} | {label} | {score:.4f} | {1 - score:.4f} | {sec:.0f} |")
    print(f"\nfloor: cosine >= 0.99; command: {' '.join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
