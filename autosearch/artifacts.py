"""Files that leave a worker: atomic writes, and the Optuna artifact store trials refer to by id.

Every file AutoSearch writes for a reader (candidate records, models, exports, reports, the dashboard) is
written to a temporary name in the same folder and moved into place with ``os.replace``: a reader, or a worker
killed mid-write, leaves the old file or the new one, never half of one.

A finished trial's model and metrics record go to an Optuna artifact store (:mod:`optuna.artifacts`); the trial
records their ids (``artifact_id``, ``metrics_artifact_id``) and the store they are in (``artifact_store``, a
``file://`` or ``s3://`` address), so a trial's model is found on any machine that reaches the store, not only on
the one whose candidate folder built it. The default store is a folder, ``<study folder>/artifacts``; a shared
folder (NFS, a mounted volume) or an S3-compatible bucket (``s3://bucket``, with ``boto3`` installed) lets workers
on several machines and a reader on yet another share the models.

Optuna's ``upload_artifact`` records an artifact's metadata on the trial before it writes the file; a worker killed
between the two leaves metadata naming a file that never arrived (optuna-dashboard shows a dead link). AutoSearch
sets a trial's ``artifact_id`` only after both its uploads returned, and the folder store writes each file
atomically, so an id a trial records always names a whole file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from optuna.artifacts import FileSystemArtifactStore

from autosearch.errors import ConfigError

_log = logging.getLogger(__name__)

__all__ = ["AtomicFileSystemArtifactStore", "atomic_copy", "atomic_write_bytes", "atomic_write_text", "describe_store",
           "fetch_artifact", "open_artifact_store", "upload_file"]


# --------------------------------------------------------------------------- atomic writes
def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, then ``os.replace``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(p)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` atomically."""
    d = Path(dst)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(d)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, d)
    finally:
        tmp.unlink(missing_ok=True)
    return d


def _atomic_stream(dst: Path, reader: IO[bytes]) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dst)
    try:
        with open(tmp, "wb") as fh:
            shutil.copyfileobj(reader, fh)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- artifact stores
class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
    """Optuna's folder store, writing each artifact atomically (Optuna's own writes it in place) and creating
    its folder. Any process that sees the folder (one machine, or a shared mount) reads the same artifacts."""

    def __init__(self, base_path: str | Path) -> None:
        self.base_path = Path(base_path).resolve()
        self.base_path.mkdir(parents=True, exist_ok=True)
        super().__init__(self.base_path)

    def write(self, artifact_id: str, content_body: IO[bytes]) -> None:
        _atomic_stream(self._get_filepath(artifact_id), content_body)

    def path_of(self, artifact_id: str) -> Path:
        """Where the artifact lies in the folder (it may be absent)."""
        return self._get_filepath(artifact_id)


def open_artifact_store(spec: Any) -> Any:
    """An artifact store from what a user gives: ``None`` (none), a store object (``write`` / ``open_reader``, as
    :mod:`optuna.artifacts` defines them), a folder path, ``file:///path`` or ``s3://bucket`` (needs ``boto3``;
    credentials and endpoint from boto3's usual environment, e.g. ``AWS_ENDPOINT_URL`` for an S3-compatible server).

    Raises:
        ConfigError: an ``s3://`` store without boto3, or a form not understood.
    """
    if spec is None:
        return None
    if hasattr(spec, "open_reader") and hasattr(spec, "write"):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"artifact store {spec!r}: pass a folder path, s3://bucket, or an optuna.artifacts store")
    text = os.fspath(spec)
    if text.startswith("s3://"):
        bucket = text[len("s3://"):].strip("/")
        if not bucket or "/" in bucket:
            raise ConfigError(f"artifact store {text!r}: write it as s3://<bucket> (the bucket alone)")
        import importlib.util

        if importlib.util.find_spec("boto3") is None:
            raise ConfigError(f"artifact store {text!r} needs boto3, which is not installed: pip install boto3 "
                              "(or use a shared folder: --artifacts /mnt/shared/artifacts)")
        from optuna.artifacts import Boto3ArtifactStore

        return Boto3ArtifactStore(bucket)
    if "://" in text and not text.startswith("file://"):
        raise ConfigError(f"artifact store {text!r}: use a folder path, file:///path or s3://bucket")
    return AtomicFileSystemArtifactStore(text.removeprefix("file://"))


def describe_store(store: Any) -> str:
    """An address of ``store`` that :func:`open_artifact_store` opens again: ``file:///abs/path``, ``s3://bucket``;
    for other stores their class (which a reader must be given again)."""
    base = getattr(store, "base_path", None) or getattr(store, "_base_path", None)
    if isinstance(store, FileSystemArtifactStore) and base is not None:
        return "file://" + str(Path(base).resolve())
    bucket = getattr(store, "bucket", None)
    if isinstance(bucket, str) and type(store).__name__ == "Boto3ArtifactStore":
        return f"s3://{bucket}"
    return f"{type(store).__module__}.{type(store).__qualname__}"


def reopen(address: Any) -> Any:
    """The store at an address :func:`describe_store` wrote, when it can be reached from here (else ``None``):
    a folder that exists on this machine, or a bucket with boto3 installed."""
    if not isinstance(address, str):
        return None
    if address.startswith("file://"):
        return AtomicFileSystemArtifactStore(address[len("file://"):]) if Path(address[len("file://"):]).is_dir() else None
    if address.startswith("s3://"):
        try:
            return open_artifact_store(address)
        except ConfigError:
            return None
    return None


def upload_file(store: Any, path: Path, attach: Any, *, name: str | None = None) -> str:
    """Upload ``path`` into ``store`` (its metadata attached to ``attach``, an Optuna trial or study, as Optuna's
    artifact API does it, so optuna-dashboard lists it); the artifact id. ``name``: the file name recorded."""
    from optuna.artifacts import upload_artifact

    if name is not None and name != path.name:
        with tempfile.TemporaryDirectory(prefix="as_up_") as tmp:
            named = Path(tmp) / name
            shutil.copyfile(path, named)
            return str(upload_artifact(study_or_trial=attach, file_path=str(named), artifact_store=store))
    return str(upload_artifact(study_or_trial=attach, file_path=str(path), artifact_store=store))


def fetch_artifact(stores: Iterator[Any] | list[Any], artifact_id: str, cache: Path, filename: str) -> Path | None:
    """A local path holding artifact ``artifact_id``: the file itself when a store is a folder on this machine,
    else ``cache/<id>/<filename>``, downloaded (atomically) from the first store that has it. ``None``: none has it."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    cached = cache / artifact_id / filename
    if cached.exists():
        return cached
    for store in stores:
        if store is None:
            continue
        if isinstance(store, AtomicFileSystemArtifactStore):
            p = store.path_of(artifact_id)
            if p.is_file():
                return p
            continue
        try:
            with store.open_reader(artifact_id) as reader:
                _atomic_stream(cached, reader)
            return cached
        except Exception as exc:  # noqa: BLE001 - a remote store's client errors (e.g. botocore's) are its own classes
            if not isinstance(exc, (ArtifactNotFound, OSError, ValueError)):
                _log.info("artifact %s not read from %s: %s", artifact_id, describe_store(store), exc)
    return None
