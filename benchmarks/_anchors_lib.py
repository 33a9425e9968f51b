"""Pure helpers of ``benchmarks/anchors.py``: hypervolume, quality metrics, rows and the table.

Nothing here imports torch, ONNX Runtime or autosearch, so the tests of these helpers run in
milliseconds.

Example:
    >>> round(hypervolume_2d([(0.9, 1.0), (0.95, 2.0)], ref=(0.8, 3.0)), 6)
    0.25
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CPU_FLAGS",
    "Row",
    "best_row",
    "checkpoints",
    "cpu_flags",
    "format_hv_table",
    "format_table",
    "hypervolume_2d",
    "mean_cosine",
    "nn_agreement",
    "parse_speedup",
    "parse_table",
    "read_sentences",
    "study_float_latency",
    "top1_agreement",
]

# Flags that decide which int8 kernels ONNX Runtime can use on x86.
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_flags(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` the CPU has (from ``/proc/cpuinfo`` unless given its text).

    Example:
        >>> cpu_flags("flags : fpu avx2 avx512f")["avx512_vnni"]
        False
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    have: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.split(":", 1)[0].strip() == "flags":
            have.update(line.split(":", 1)[1].split())
    return {f: f in have for f in CPU_FLAGS}


def hypervolume_2d(points: Iterable[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` and bounded by ``ref``; the first coordinate is maximised, the second minimised.

    A point contributes only where it beats the reference in both coordinates (accuracy above
    ``ref[0]``, latency below ``ref[1]``); dominated points add nothing.

    Example:
        >>> hypervolume_2d([(1.0, 0.0)], ref=(0.0, 1.0))
        1.0
        >>> hypervolume_2d([], ref=(0.0, 1.0))
        0.0
    """
    r_acc, r_lat = ref
    pts = sorted((lat, acc) for acc, lat in points if math.isfinite(acc) and math.isfinite(lat) and acc > r_acc and lat < r_lat)
    area = 0.0
    best_acc = r_acc
    for lat, acc in pts:  # by latency, fastest first: each point adds the strip above the best accuracy so far
        if acc > best_acc:
            area += (r_lat - lat) * (acc - best_acc)
            best_acc = acc
    return area


def study_float_latency(trials: Iterable[Any]) -> float:
    """The float model's latency as one study measured it: the median of its baseline measurement(s) and of
    its trials whose candidate is the float model (one noisy baseline then moves no hypervolume by itself)."""
    baselines: set[float] = set()  # every trial of one run stores the same baseline: count it once
    floats: list[float] = []
    for t in trials:
        ua = t.user_attrs
        if ua.get("baseline_latency_ms"):
            baselines.add(float(ua["baseline_latency_ms"]))
        if t.state.name == "COMPLETE" and ua.get("summary") == "float" and ua.get("latency_ms"):
            floats.append(float(ua["latency_ms"]))
    vals = sorted(baselines) + floats
    return float(np.median(vals)) if vals else float("nan")


def checkpoints(n_trials: int, marks: Sequence[int] = (10, 20, 40)) -> list[int]:
    """Trial counts at which the hypervolume is reported: the marks below ``n_trials``, then ``n_trials``.

    Example:
        >>> checkpoints(40)
        [10, 20, 40]
        >>> checkpoints(6)
        [3, 6]
    """
    out = sorted({m for m in marks if m < n_trials} | {n_trials})
    if len(out) == 1 and n_trials >= 2:
        out = [n_trials // 2, n_trials]
    return out


def mean_cosine(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean per-row cosine similarity of two (n, d) arrays."""
    a = np.asarray(ref, np.float64).reshape(len(ref), -1)
    b = np.asarray(got, np.float64).reshape(len(got), -1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)))


def _nearest(emb: np.ndarray) -> np.ndarray:
    e = np.asarray(emb, np.float64).reshape(len(emb), -1)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def nn_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Fraction of rows whose nearest neighbour (cosine, itself excluded) is the same under both embeddings.

    Example:
        >>> e = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> nn_agreement(e, e)
        1.0
    """
    return float(np.mean(_nearest(ref) == _nearest(got)))


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Fraction of rows whose argmax matches."""
    r = np.asarray(ref).reshape(len(ref), -1)
    g = np.asarray(got).reshape(len(got), -1)
    return float(np.mean(r.argmax(1) == g.argmax(1)))


def read_sentences(path: str | Path) -> tuple[list[str], list[str]]:
    """(scored sentences, calibration sentences) of ``sentences.txt``.

    Lines starting with ``#`` are comments, except the ``## calibration`` marker: lines after it
    are the calibration set.
    """
    scored: list[str] = []
    calib: list[str] = []
    cur = scored
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.lower().startswith("## calibration"):
            cur = calib
            continue
        if not line or line.startswith("#"):
            continue
        cur.append(line)
    return scored, calib


@dataclass
class Row:
    """One model variant of the table.

    Attributes:
        method: Label (unique within a table).
        kind: ``float``, ``anchor`` or ``autosearch``.
        path: Its ONNX file (``None`` when it failed to build).
        quality: Score first (accuracy, cosine), then extra quality figures, by name.
        size_mb: Size of the ONNX file.
        latency_ms: Median latency by thread count (from the interleaved measurement).
        iqr_rel: Relative interquartile range by thread count.
        note: Free text (configuration, trial number).
        error: Why the variant has no figures (failed to build, load or run).
    """

    method: str
    kind: str
    path: str | None = None
    quality: dict[str, float] = field(default_factory=dict)
    size_mb: float = float("nan")
    latency_ms: dict[int, float] = field(default_factory=dict)
    iqr_rel: dict[int, float] = field(default_factory=dict)
    note: str = ""
    error: str | None = None

    @property
    def score(self) -> float:
        return next(iter(self.quality.values())) if self.quality else float("nan")


def best_row(rows: Iterable[Row], kind: str, *, base_score: float, max_drop: float, threads: int = 1) -> Row | None:
    """The fastest row of ``kind`` at ``threads`` whose score is within ``max_drop`` of ``base_score``."""
    ok = [
        r
        for r in rows
        if r.kind == kind and r.error is None and math.isfinite(r.latency_ms.get(threads, math.nan))
        and base_score - r.score <= max_drop + 1e-9
    ]
    return min(ok, key=lambda r: r.latency_ms[threads]) if ok else None


def _fmt(v: float, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def format_table(rows: Sequence[Row], *, threads: Sequence[int], base: Row, marks: Mapping[str, str] | None = None) -> str:
    """The markdown table: method, quality (and drop vs float), latency and speedup per thread count, size.

    Args:
        rows: Every row, float first.
        threads: Thread counts measured.
        base: The float row (speedups are its median over the row's, at the same thread count).
        marks: Method -> mark shown in the first column (``best anchor``, ``best search``).
    """
    marks = dict(marks or {})
    qnames = list(base.quality) or ["score"]
    score_name = qnames[0]
    head = ["mark", "method", score_name, f"{score_name} drop", *qnames[1:]]
    head += [f"{t}T ms" for t in threads] + ["size MB"] + [f"speedup {t}T" for t in threads] + ["notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [marks.get(r.method, ""), r.method]
        cells.append(_fmt(r.score, ".4f"))
        cells.append(_fmt(base.score - r.score, "+.4f") if r.quality else "-")
        cells += [_fmt(r.quality.get(q, math.nan), ".4f") for q in qnames[1:]]
        cells += [_fmt(r.latency_ms.get(t, math.nan), ".3f") for t in threads]
        cells.append(_fmt(r.size_mb, ".2f"))
        for t in threads:
            b, v = base.latency_ms.get(t, math.nan), r.latency_ms.get(t, math.nan)
            cells.append(_fmt(b / v, ".2f") + "x" if math.isfinite(b) and math.isfinite(v) and v > 0 else "-")
        note = r.note if r.error is None else f"FAILED: {r.error}"
        cells.append(note.replace("|", "/").replace("\n", " ")[:160])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_hv_table(curves: Mapping[str, Mapping[int, tuple[float, float]]]) -> str:
    """Markdown table of hypervolume (and best feasible speedup) after k trials, one column pair per sampler.

    Args:
        curves: Sampler label -> {trials: (normalised hypervolume, best feasible speedup)}.
    """
    labels = list(curves)
    ks = sorted({k for c in curves.values() for k in c})
    head = ["trials"] + [f"{lab} HV" for lab in labels] + [f"{lab} best speedup" for lab in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for k in ks:
        cells = [str(k)]
        cells += [_fmt(curves[lab].get(k, (math.nan, math.nan))[0], ".4f") for lab in labels]
        cells += [_fmt(curves[lab].get(k, (math.nan, math.nan))[1], ".2f") + "x" for lab in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_table(markdown: str, first_header: str = "mark") -> list[dict[str, str]]:
    """Rows of the first markdown table whose header starts with ``first_header`` (for tests and post-processing)."""
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells and cells[0] == first_header:
            out = []
            for row in lines[i + 2 :]:
                if not row.lstrip().startswith("|"):
                    break
                vals = [c.strip() for c in row.strip().strip("|").split("|")]
                out.append(dict(zip(cells, vals)))
            return out
    return []


_SPEEDUP = re.compile(r"^(\d+(?:\.\d+)?)x$")


def parse_speedup(cell: str) -> float | None:
    """``'2.80x'`` -> 2.8; anything else -> ``None``."""
    m = _SPEEDUP.match(cell.strip())
    return float(m.group(1)) if m else None
