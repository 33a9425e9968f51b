"""A target on another machine: candidates are timed by ``autosearch serve-profiler`` there, over HTTP.

Scoring stays here (a local CPU session); only timing travels. The client is httpx (timeouts, connection
reuse). Any failure to reach or use the profiler during a trial is a :class:`~autosearch.errors.CandidateError`
(the trial fails with the reason, the search goes on); a wrong URL or token is a
:class:`~autosearch.errors.ConfigError` when the search starts (:meth:`RemoteTarget.describe`).

Example:
    >>> from autosearch.remote import RemoteTarget
    >>> t = RemoteTarget("http://10.0.0.7:8765", token="...")    # doctest: +SKIP
    >>> t.describe()["device"]["cpu"]                             # doctest: +SKIP
    'Cortex-A76'
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autosearch.errors import CandidateError, ConfigError
from autosearch.target import LatencyStats, Target, TimingTarget

__all__ = ["RemoteTarget", "TargetUnreachable", "full_url", "redact_url", "target_from_identity"]

_HIDDEN = "***"


def redact_url(url: str) -> str:
    """``url`` as it may be shown: the password of ``user:password@`` and every query value replaced by ``***``
    (``http://user:secret@host:8765/?token=abc`` -> ``http://user:***@host:8765/?token=***``)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{_HIDDEN}@{host}" if ":" in userinfo else f"{_HIDDEN}@{host}"
        query = urlencode([(k, _HIDDEN) for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
        if parts.query and not query:
            query = _HIDDEN
        return urlunsplit((parts.scheme, netloc, parts.path, query, _HIDDEN if parts.fragment else ""))
    except ValueError:
        return "<unparsable URL>"


def full_url(url: str) -> str:
    """A profiler URL as stored (credentials redacted by :func:`redact_url`) back to the one to call:
    ``$AUTOSEARCH_PROFILER_URL`` when it redacts to ``url``; ``url`` itself when nothing was hidden in it.

    Raises:
        ConfigError: the URL had credentials and the variable is unset or names another URL.
    """
    if _HIDDEN not in url:
        return url
    full = os.environ.get("AUTOSEARCH_PROFILER_URL", "")
    if not full or redact_url(full) != url:
        raise ConfigError(f"the study's profiler URL {url} had credentials, which are never stored: set "
                          "AUTOSEARCH_PROFILER_URL to the full URL")
    return full


class TargetUnreachable(CandidateError):
    """The profiler could not be reached (no connection, or the connection broke): says nothing about the
    candidate, so it is not stored as the candidate's failure; the search waits for the profiler and tries again."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


@dataclass(frozen=True)
class RemoteTarget:
    """ONNX Runtime on a device running ``autosearch serve-profiler``.

    Attributes:
        url: The profiler's base URL (``http://host:8765``; ``https://`` behind a TLS proxy). Credentials in it
            (``user:password@``, query values) are sent, never shown: messages, :meth:`describe`,
            :meth:`identity` and ``repr`` carry :attr:`shown_url`.
        token: The profiler's token (default: ``$AUTOSEARCH_PROFILER_TOKEN``).
        providers, threads, graph_optimization_level, warmup, min_runs, max_runs, max_seconds, rel_precision:
            The measurement settings, as for :class:`~autosearch.target.Target`, applied on the device.
        timeout_s: Seconds to wait for one answer (a busy profiler queues requests).
    """

    url: str = field(repr=False)
    token: str | None = field(default=None, repr=False, compare=False)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 1
    graph_optimization_level: str = "all"
    warmup: int = 10
    min_runs: int = 50
    max_runs: int = 2000
    max_seconds: float = 2.0
    rel_precision: float = 0.005
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"profiler URL {self.shown_url!r} must start with http:// or https:// (e.g. http://device:8765)")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")

    @property
    def shown_url(self) -> str:
        """The URL with its credentials redacted (see :func:`redact_url`)."""
        return redact_url(self.url)

    def __repr__(self) -> str:
        return f"RemoteTarget({self.shown_url!r}, threads={self.threads}, providers={self.providers!r})"

    # --------------------------------------------------------------- protocol
    def _token(self) -> str:
        tok = self.token or os.environ.get("AUTOSEARCH_PROFILER_TOKEN", "")
        if not tok:
            raise ConfigError("the remote profiler needs its token: set AUTOSEARCH_PROFILER_TOKEN (or pass token=)")
        return tok

    def _request(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        try:
            import httpx
        except ImportError:
            raise ConfigError("a remote target needs httpx: pip install 'autosearch[remote]'") from None
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.url)  # the endpoint goes into the path; a query (?token=... for a proxy) stays
        url = urlunsplit(parts._replace(path=parts.path.rstrip("/") + path))
        try:
            resp = httpx.request(method, url, content=body, timeout=self.timeout_s,
                                 headers={"Authorization": f"Bearer {self._token()}",
                                          "Content-Type": "application/octet-stream"})
        except httpx.HTTPError as exc:  # httpx puts the URL in its messages: redacted here
            reason = str(exc).replace(url, redact_url(url)).replace(self.url, self.shown_url)
            message = f"the profiler at {self.shown_url} did not answer ({type(exc).__name__}: {reason})"
            if isinstance(exc, httpx.TransportError):  # connecting, or the connection itself: the profiler is not there
                raise TargetUnreachable(message, url=self.shown_url) from None
            raise CandidateError(message) from None
        try:
            data = resp.json()
        except ValueError:
            data = {"error": resp.text[:300]}
        if resp.status_code == 401:
            raise ConfigError(f"the profiler at {self.shown_url} refused the token: {data.get('error', '')} "
                              "(set AUTOSEARCH_PROFILER_TOKEN to the token it was started with)")
        if resp.status_code != 200:
            raise CandidateError(f"the profiler at {self.shown_url} answered {resp.status_code}: {data.get('error', data)}")
        return dict(data)

    def _body(self, models: Sequence[tuple[str, Any]], feed: Mapping[str, np.ndarray], **extra: Any) -> bytes:
        params = {"providers": list(self.providers), "threads": self.threads,
                  "graph_optimization_level": self.graph_optimization_level, "warmup": self.warmup,
                  "min_runs": self.min_runs, "max_runs": self.max_runs, "max_seconds": self.max_seconds,
                  "rel_precision": self.rel_precision, "labels": [lbl for lbl, _ in models], **extra}
        arrays: dict[str, np.ndarray] = {"__params__": np.frombuffer(json.dumps(params).encode(), np.uint8)}
        for i, (_, m) in enumerate(models):
            arrays[f"__model_{i}__"] = np.frombuffer(Path(_path_of(m)).read_bytes(), np.uint8)
        for k, v in feed.items():
            if k.startswith("__"):
                raise ConfigError(f"input name {k!r} starts with '__', which the profiler protocol reserves")
            arrays[k] = np.asarray(v)
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    def describe(self) -> dict[str, Any]:
        """The device's description, asked of the profiler (a wrong URL or token is a ConfigError here)."""
        try:
            dev = self._request("GET", "/device")["device"]
        except CandidateError as exc:
            raise ConfigError(f"{exc}: check the URL, and that `autosearch serve-profiler` runs there") from None
        return {"kind": "remote", "url": self.shown_url, "providers": list(self.providers), "threads": self.threads,
                "graph_optimization_level": self.graph_optimization_level, "ort_version": dev.get("ort_version"),
                "cpu": dev.get("cpu"), "device": dev}

    def identity(self) -> dict[str, Any]:
        d = self.describe()
        dev = d["device"]
        return {"kind": "remote", "url": self.shown_url, "providers": list(self.providers), "threads": self.threads,
                "graph_optimization_level": self.graph_optimization_level,
                "device": {"cpu": dev.get("cpu"), "cpu_flags": dev.get("cpu_flags")}}

    def session(self, model: str | Path | bytes, *, threads: int | None = None) -> Any:
        """A local CPU session, to score the model here (the device only times it)."""
        return Target(threads=threads or self.threads, graph_optimization_level=self.graph_optimization_level).session(model)

    def profile(self, model: str | Path | Any, feed: Mapping[str, np.ndarray]) -> LatencyStats:
        out = self._request("POST", "/profile", self._body([("m", model)], feed))
        return LatencyStats(**out["stats"]["m"])

    def interleaved(self, models: Sequence[tuple[str, Any]], feed: Mapping[str, np.ndarray], *,
                    rounds: int = 5) -> dict[str, LatencyStats]:
        out = self._request("POST", "/profile", self._body(models, feed, rounds=rounds))
        return {k: LatencyStats(**v) for k, v in out["stats"].items()}

    def node_times(self, model: str | Path, feed: Mapping[str, np.ndarray], *, runs: int = 50) -> list[tuple[str, str, float]]:
        out = self._request("POST", "/nodes", self._body([("m", model)], feed, runs=runs))
        return [(str(n), str(op), float(us)) for n, op, us in out["nodes"]]


def _path_of(model: Any) -> str | Path:
    """The file behind a model argument: a path, or a session made from one."""
    if isinstance(model, (str, Path)):
        return model
    path = getattr(model, "_model_path", None)
    if path:
        return str(path)
    raise CandidateError("a remote target times model files: pass the path (this session was made from bytes)")


def target_from_identity(ident: Mapping[str, Any], *, lock_path: str | None = None) -> TimingTarget:
    """Rebuild the target a study recorded (a remote one reads its token from ``AUTOSEARCH_PROFILER_TOKEN``)."""
    providers = tuple(ident.get("providers", ("CPUExecutionProvider",)))
    threads = int(ident.get("threads", 1))
    level = str(ident.get("graph_optimization_level", "all"))
    if ident.get("kind") == "remote":
        url = full_url(str(ident["url"]))
        return RemoteTarget(url, providers=providers, threads=threads, graph_optimization_level=level)
    return Target(providers=providers, threads=threads, graph_optimization_level=level, lock_path=lock_path)
