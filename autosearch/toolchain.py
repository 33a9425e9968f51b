"""What built and timed a study's candidates: the versions of ONNX Runtime, AutoSearch and, where a candidate needed
them, torch, torch-pruning, onnx2torch and tf2onnx.

The study records it with its target and the candidate store keys its records by it, so figures of another
toolchain (an upgrade of ONNX Runtime changes kernels; one of torch-pruning changes what a prune removes) never
share a front with these.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

__all__ = ["toolchain", "toolchain_fingerprint"]

# distribution names by the import name whose version is recorded
_DISTS = {"onnxruntime": "onnxruntime", "torch": "torch", "torch_pruning": "torch-pruning", "onnx2torch": "onnx2torch",
          "tf2onnx": "tf2onnx"}


def _version(module: str) -> str:
    """The module's ``__version__`` (the build's own, e.g. onnxruntime-openvino's), else its distribution's; ``unknown``."""
    try:
        got = getattr(importlib.import_module(module), "__version__", None)
    except Exception:  # noqa: BLE001 - not installed or broken: the distribution's metadata may still say
        got = None
    if got:
        return str(got)
    try:
        return metadata.version(_DISTS.get(module, module))
    except metadata.PackageNotFoundError:
        return "unknown"


def _autosearch_version() -> str:
    pkg = sys.modules.get("autosearch")
    got = getattr(pkg, "__version__", None)
    if got:
        return str(got)
    try:
        return metadata.version("autosearch")
    except metadata.PackageNotFoundError:
        return "unknown"


def toolchain(source: Any = None, units: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """Versions of what builds, scores and times this source's candidates: always ``onnxruntime`` and ``autosearch``;
    ``torch`` for a torch source or an ONNX one pruned through ``onnx2torch``; ``torch_pruning`` when a candidate
    can be pruned; ``tf2onnx`` for a model converted from TensorFlow/Keras."""
    out = {"onnxruntime": _version("onnxruntime"), "autosearch": _autosearch_version()}
    if source is None:
        return out
    prunes = bool(units and units.get("prune"))
    torch_source = getattr(source, "origin", "") == "torch"
    converted = not torch_source and prunes and bool(getattr(source, "convert_onnx", False))
    if torch_source or converted:
        out["torch"] = _version("torch")
    if converted:
        out["onnx2torch"] = _version("onnx2torch")
    if prunes and (torch_source or converted):
        out["torch_pruning"] = _version("torch_pruning")
    proto = getattr(source, "onnx_model", None)
    if proto is not None and ("tf2onnx" in proto.producer_name or "tf2onnx" in proto.graph.doc_string):
        out["tf2onnx"] = _version("tf2onnx")
    return out


def toolchain_fingerprint(tools: Mapping[str, str]) -> str:
    """A short hash of a toolchain (part of the candidate store's keys)."""
    return hashlib.sha256(json.dumps(dict(tools), sort_keys=True).encode()).hexdigest()[:16]
