"""The candidate store: one folder per candidate under ``<study>/candidates/<key>/``.

Holds the built ``model.onnx`` and its ``metrics.json`` (scores and timings, or the error that
failed it). The objective and the analysis measure through the same store, so a candidate is never
built or measured twice, and a failed one is never retried. Records are written atomically.

Several workers on one machine may share the store (``autosearch worker``): a candidate's folder is locked
(``.build.lock``, an ``flock`` the OS drops when a worker dies) while it is built and measured, so a second
worker asking for the same candidate waits and takes the first one's record; the build goes to a private
folder and its ``model.onnx`` is moved into place with ``os.replace``, so no reader sees half a file.

With an artifact store (:mod:`autosearch.artifacts`), :meth:`CandidateStore.publish` uploads a candidate's model
and record once per store (under the candidate's lock; the ids are kept in its ``metrics.json`` under
``artifacts``), however many trials repeat the candidate: trials refer to those ids, not to this folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autosearch.artifacts import atomic_write_text, describe_store, upload_file
from autosearch.build import build_candidate
from autosearch.candidate import Candidate
from autosearch.errors import CandidateError
from autosearch.evaluate import Evaluator, evaluator_fingerprint
from autosearch.model import SourceModel
from autosearch.remote import TargetUnreachable
from autosearch.target import Target
from autosearch.toolchain import toolchain as toolchain_of
from autosearch.toolchain import toolchain_fingerprint

__all__ = ["CandidateStore", "read_json", "write_json"]


@dataclass
class CandidateStore:
    """Build, score and time candidates of one study, caching each record by the candidate's key.

    Attributes:
        root: The study's folder (candidates go under ``root / "candidates"``).
        source: The imported model.
        units: Knob -> unit names (what the build checks candidates against).
        calibration: Feeds for calibration.
        evaluator: Scores a session.
        target: Times a session.
        base_latency_ms: The float model's latency (a candidate's ``speedup`` divides it).
        evaluator_fingerprint: The evaluator's data and metric (default: computed from ``evaluator``); part of
            each folder's key, so a record scored on other data is never taken for this one's.
        toolchain: The versions that build and time the candidates (default: :func:`autosearch.toolchain.toolchain`
            of ``source`` and ``units``); part of each folder's key, so a record made before an upgrade of ONNX
            Runtime, torch or AutoSearch is measured again, not taken for this one's.
    """

    root: Path
    source: SourceModel
    units: Mapping[str, Sequence[str]]
    calibration: Sequence[dict[str, np.ndarray]]
    evaluator: Evaluator
    target: Target
    base_latency_ms: float
    also: Mapping[str, Any] = field(default_factory=dict)  # label -> (target, float latency on it)
    evaluator_fingerprint: str = field(default="")
    artifacts: Any = None  # an optuna.artifacts store: publish() uploads to it
    toolchain: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.evaluator_fingerprint:
            self.evaluator_fingerprint = evaluator_fingerprint(self.evaluator)[0]
        if not self.toolchain:
            self.toolchain = toolchain_of(self.source, self.units)
        self._tools = toolchain_fingerprint(self.toolchain)

    def folder(self, cand: Candidate) -> Path:
        """Absolute: trials record this path, and a study is read from any working directory."""
        return self.root.resolve() / "candidates" / cand.key(self.source.fingerprint + self.evaluator_fingerprint + self._tools)

    def model_path(self, cand: Candidate) -> Path:
        return self.folder(cand) / "model.onnx"

    def cached(self, cand: Candidate) -> dict[str, Any]:
        """The stored record (empty when there is none, or it was cut short)."""
        return read_json(self.folder(cand) / "metrics.json")

    def failed(self, cand: Candidate) -> bool:
        return "error" in self.cached(cand)

    def measure(self, cand: Candidate, *, floor: float | None = None) -> dict[str, Any]:
        """The candidate's record, measured now unless stored; ``cached: True`` when it was.

        Raises:
            CandidateError: it failed (now, or when it was first tried; the reason is stored).
        """
        rec = self.cached(cand)
        if not rec:
            with _locked(self.folder(cand) / ".build.lock"):
                rec = self.cached(cand)  # another worker may have measured it while this one waited
                if not rec:
                    return self._fresh(cand, floor)
        if rec:
            if "error" in rec:
                raise CandidateError(rec["error"])
            missing = [lbl for lbl in self.also if f"latency_ms@{lbl}" not in rec]
            if missing and rec.get("latency_ms") == rec.get("latency_ms") and self.model_path(cand).exists():
                rec.update(self._also(self.model_path(cand), missing))  # a target added since it was measured
                write_json(self.folder(cand) / "metrics.json", rec)
            return {**{k: v for k, v in rec.items() if k != "artifacts"}, "cached": True}
        return self._fresh(cand, floor)

    def publish(self, cand: Candidate, attach: Any) -> dict[str, str] | None:
        """Upload the measured candidate's model and record to the artifact store, once per store: the ids
        ``{"model", "metrics", "store"}`` (``store``: its address), kept in the candidate's record so a trial
        repeating the candidate takes them as they are. ``attach``: the Optuna trial (or study) whose artifact
        list names the upload. ``None``: no store, or nothing to upload (a failed candidate)."""
        if self.artifacts is None:
            return None
        where = describe_store(self.artifacts)
        known = self._uploaded(self.cached(cand), where)
        if known:
            return {**known, "store": where}
        with _locked(self.folder(cand) / ".build.lock"):
            rec = self.cached(cand)
            known = self._uploaded(rec, where)  # another worker may have uploaded it while this one waited
            if known:
                return {**known, "store": where}
            if not rec or "error" in rec or not self.model_path(cand).is_file():
                return None
            figures = {k: v for k, v in rec.items() if k != "artifacts"}
            with tempfile.TemporaryDirectory(prefix=".publish-", dir=self.folder(cand)) as tmp:
                mfile = Path(tmp) / "metrics.json"
                atomic_write_text(mfile, json.dumps({"key": self.folder(cand).name, "candidate": cand.to_dict(), **figures},
                                                    default=float))
                ids = {"model": upload_file(self.artifacts, self.model_path(cand), attach, name="model.onnx"),
                       "metrics": upload_file(self.artifacts, mfile, attach)}
            write_json(self.folder(cand) / "metrics.json", {**rec, "artifacts": {**(rec.get("artifacts") or {}), where: ids}})
            return {**ids, "store": where}

    def _fresh(self, cand: Candidate, floor: float | None) -> dict[str, Any]:
        mfile = self.folder(cand) / "metrics.json"
        try:
            rec = self._measure(cand, floor)
        except TargetUnreachable:
            raise  # the profiler was not there: nothing is known about the candidate, nothing is stored
        except CandidateError as exc:
            write_json(mfile, {"error": str(exc)})
            raise
        write_json(mfile, rec)
        return rec

    def _uploaded(self, rec: Mapping[str, Any], where: str) -> dict[str, str] | None:
        """The ids a record holds for store ``where``; ``None`` when it holds none, or (a folder store) the
        folder no longer has the model (deleted since: upload again)."""
        known = (rec.get("artifacts") or {}).get(where)
        if not known:
            return None
        path_of = getattr(self.artifacts, "path_of", None)
        if callable(path_of) and not path_of(known["model"]).is_file():
            return None
        return dict(known)

    def _measure(self, cand: Candidate, floor: float | None) -> dict[str, Any]:
        folder = self.folder(cand)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=folder))
        try:
            built = build_candidate(self.source, cand, tmp, units=self.units, calibration=self.calibration)
            path = self.model_path(cand)
            os.replace(built.path, path)  # whole or absent: a reader never opens half a model
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        built.path = path
        sess = self.target.session(built.path)
        t = time.perf_counter()
        n = getattr(self.evaluator, "num_samples", 0)
        size = built.path.stat().st_size / 1e6
        rec: dict[str, Any] = {"build_s": built.seconds, "build_notes": built.notes, **built.stages}
        if floor is not None and n >= 200:
            sub = float(self.evaluator(sess, limit=max(100, n // 4)))
            if sub < floor - 0.05:  # far below the floor on a quarter of the samples: no need to time it
                rec.update(accuracy=sub, early_stopped=True, latency_ms=float("nan"), size_mb=size, speedup=float("nan"))
                return rec
        acc = float(self.evaluator(sess))
        rec["eval_s"] = time.perf_counter() - t
        lat = self.target.profile(sess, self.source.example_feed)
        rec.update(accuracy=acc, latency_ms=lat.median_ms, latency=lat.as_dict(), size_mb=size,
                   speedup=self.base_latency_ms / lat.median_ms, measured_at=time.time())
        rec.update(self._also(built.path, list(self.also)))
        return rec

    def _also(self, path: Path, labels: Sequence[str]) -> dict[str, Any]:
        """The model timed on each further target: ``latency_ms@<label>``, ``speedup@<label>``."""
        out: dict[str, Any] = {}
        for lbl in labels:
            tgt, base_ms = self.also[lbl]
            ms = tgt.profile(path, self.source.example_feed).median_ms
            out[f"latency_ms@{lbl}"] = ms
            out[f"speedup@{lbl}"] = base_ms / ms
        return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created) for the block; released by the OS if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a record atomically: a reader sees the old file or the new one, never half of one."""
    atomic_write_text(path, json.dumps(dict(data), default=float))


def read_json(path: Path) -> dict[str, Any]:
    """A record; an unreadable one (a write cut short) counts as absent."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
