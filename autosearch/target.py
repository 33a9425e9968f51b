"""Target: where latency is measured, and the measurement itself.

Every latency figure comes from ONNX Runtime running the candidate on the
target: warm-up, then repeated timed runs in rounds until the median is
known to within ``rel_precision`` (a bootstrap-free estimate from the
interquartile range) or the time budget is spent. The figure is recorded with
the provider, thread count, ORT version and CPU name.

Two implementations keep one protocol (:class:`TimingTarget`): :class:`Target`, ONNX Runtime on this
machine with any execution provider installed here, and :class:`autosearch.remote.RemoteTarget`, the same
measurement made by ``autosearch serve-profiler`` on the device, over HTTP. Candidates are always scored
here (:meth:`session`); only their timing happens on the target.

Example:
    >>> from autosearch.target import Target
    >>> t = Target(threads=1)
    >>> t.describe()["threads"]
    1
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from autosearch.errors import CandidateError, ConfigError

__all__ = ["LatencyStats", "Target", "TimingTarget", "cpu_cores", "cpu_name", "device_info", "interleaved", "same_target", "target_label"]

# CPU flags that decide which int8 kernels ONNX Runtime can use (VNNI: fast u8s8 and s8s8 dot products)
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
              "asimd", "asimddp", "i8mm", "sve")

_OPT_LEVELS = {"disable": 0, "basic": 1, "extended": 2, "all": 99}


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The int8-relevant flags of this CPU (:data:`INT8_FLAGS` it has)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in INT8_FLAGS if f in have]
    except OSError:
        pass
    return []


def cpu_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one, else ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


_CLAMP_NOTED: set[tuple[int, int]] = set()


def usable_threads(threads: int) -> int:
    """``threads`` clamped to :func:`cpu_cores`; asking for more prints a one-line note (once per value) on stderr.

    More intra-op threads than cores only slows ONNX Runtime down, and a huge count makes it spawn threads
    for minutes before the first run."""
    cores = cpu_cores()
    if threads <= cores:
        return threads
    if (threads, cores) not in _CLAMP_NOTED:
        _CLAMP_NOTED.add((threads, cores))
        import sys

        print(f"autosearch: note: {threads} threads asked, this machine has {cores} core(s): timing with {cores} "
              f"(ask for {cores} or fewer to silence this)", file=sys.stderr, flush=True)
    return cores


def device_info() -> dict[str, Any]:
    """What this machine is, as far as timing is concerned: CPU model and int8 flags, cores, ONNX Runtime
    version and its execution providers."""
    import onnxruntime as ort

    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": cpu_cores(), "machine": platform.machine(),
            "system": platform.system(), "ort_version": ort.__version__, "providers": list(ort.get_available_providers())}


@runtime_checkable
class TimingTarget(Protocol):
    """What every target does: score here, time there."""

    @property
    def threads(self) -> int: ...

    def identity(self) -> dict[str, Any]:
        """What a study records and a resume compares (kind, where, providers, threads, device)."""
        ...

    def describe(self) -> dict[str, Any]:
        ...

    def session(self, model: str | Path | bytes) -> Any:
        """A local ``InferenceSession`` to score the model with."""
        ...

    def profile(self, model: str | Path | Any, feed: Mapping[str, np.ndarray]) -> LatencyStats:
        ...

    def interleaved(self, models: Sequence[tuple[str, Any]], feed: Mapping[str, np.ndarray], *,
                    rounds: int = 5) -> dict[str, LatencyStats]:
        ...

    def node_times(self, model: str | Path, feed: Mapping[str, np.ndarray], *, runs: int = 50) -> list[tuple[str, str, float]]:
        """(node name after graph optimization, op type, microseconds per run) from ONNX Runtime's profiler."""
        ...


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model on one target, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    iqr_rel: float  # (p75 - p25) / median
    runs: int
    provider: str
    threads: int
    ort_version: str
    cpu: str
    load_avg: float  # 1-minute load average when the measurement ended

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Target:
    """ONNX Runtime on this machine.

    Attributes:
        providers: Execution providers in priority order.
        threads: ``intra_op_num_threads``; more than this machine's cores is clamped to them (a one-line
            note on stderr), so :meth:`identity` records the threads actually used.
        graph_optimization_level: ``disable`` | ``basic`` | ``extended`` | ``all``.
        warmup: Untimed runs first.
        min_runs: Timed runs at least.
        max_runs: Timed runs at most.
        max_seconds: Time budget of one measurement (after warm-up).
        rel_precision: Stop when the median's standard error is below this fraction.
        lock_path: A file locked while measuring, so workers on one machine never time
            concurrently (``None``: no lock).
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 1
    graph_optimization_level: str = "all"
    warmup: int = 10
    min_runs: int = 50
    max_runs: int = 2000
    max_seconds: float = 2.0
    rel_precision: float = 0.005
    lock_path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.graph_optimization_level not in _OPT_LEVELS:
            raise ConfigError(
                f"graph_optimization_level {self.graph_optimization_level!r} is not one of {', '.join(_OPT_LEVELS)}"
            )
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        object.__setattr__(self, "threads", usable_threads(self.threads))  # frozen: set once, here
        import onnxruntime as ort

        avail = ort.get_available_providers()
        for p in self.providers:
            if p not in avail:
                raise ConfigError(f"execution provider {p!r} is not available here; available: {', '.join(avail)}")

    def describe(self) -> dict[str, Any]:
        """What identifies this target (recorded with every figure and in the study)."""
        import onnxruntime as ort

        return {
            "kind": "local",
            "providers": list(self.providers),
            "threads": self.threads,
            "graph_optimization_level": self.graph_optimization_level,
            "ort_version": ort.__version__,
            "cpu": cpu_name(),
            "device": device_info(),
        }

    def identity(self) -> dict[str, Any]:
        """What a study records and a resume compares: kind, providers, threads, optimization level, and the
        device (CPU model and int8 flags: a front timed on another CPU is another front)."""
        dev = device_info()
        return {"kind": "local", "providers": list(self.providers), "threads": self.threads,
                "graph_optimization_level": self.graph_optimization_level,
                "device": {"cpu": dev["cpu"], "cpu_flags": dev["cpu_flags"]}}

    def interleaved(self, models: Sequence[tuple[str, Any]], feed: Mapping[str, np.ndarray], *,
                    rounds: int = 5) -> dict[str, LatencyStats]:
        """Several models measured in interleaved rounds (see :func:`interleaved`)."""
        return _interleaved(self, models, feed, rounds=rounds)

    def node_times(self, model: str | Path, feed: Mapping[str, np.ndarray], *, runs: int = 50) -> list[tuple[str, str, float]]:
        """(node name, op type, microseconds per run) of each node, from ONNX Runtime's profiler on a session
        configured like this target (providers, threads, optimization level): names are those after graph
        optimization, so fused nodes show under the name of the node they grew from."""
        import json
        import tempfile

        import onnxruntime as ort

        so = self._options()
        with tempfile.TemporaryDirectory(prefix="as_prof_") as tmp:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, "p")
            try:
                sess = ort.InferenceSession(str(model), so, providers=list(self.providers))
            except Exception as exc:
                raise CandidateError(f"ONNX Runtime cannot load the model: {str(exc)[:600]}") from exc
            with self._locked():
                for _ in range(5):
                    sess.run(None, dict(feed))
                for _ in range(runs):
                    sess.run(None, dict(feed))
            events = json.loads(Path(sess.end_profiling()).read_text())
        totals: dict[tuple[str, str], float] = {}
        for ev in events:
            if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
                key = (str(ev["name"])[: -len("_kernel_time")], str(ev.get("args", {}).get("op_name", "")))
                totals[key] = totals.get(key, 0.0) + float(ev.get("dur", 0)) / (runs + 5)
        return [(name, op, us) for (name, op), us in totals.items()]

    def session(self, model: str | Path | bytes, *, threads: int | None = None) -> Any:
        """An ``InferenceSession`` configured like this target.

        Raises:
            CandidateError: ONNX Runtime refuses the model.
        """
        import onnxruntime as ort

        so = self._options(threads)
        try:
            return ort.InferenceSession(str(model) if isinstance(model, Path) else model, so, providers=list(self.providers))
        except Exception as exc:
            raise CandidateError(f"ONNX Runtime cannot load the model: {str(exc)[:600]}") from exc

    def _options(self, threads: int | None = None) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = usable_threads(threads) if threads else self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel(_OPT_LEVELS[self.graph_optimization_level])
        so.log_severity_level = 3
        return so

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.lock_path:
            yield
            return
        Path(self.lock_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def profile(self, model: str | Path | Any, feed: Mapping[str, np.ndarray]) -> LatencyStats:
        """Measure latency: warm-up, then timed rounds until precise or out of budget.

        Args:
            model: Path of an ONNX file, or an ``InferenceSession`` made by :meth:`session`.
            feed: One input batch by input name.

        Raises:
            CandidateError: the model does not load or fails to run.
        """
        sess: Any = model if hasattr(model, "run") else self.session(model)  # an InferenceSession (untyped)
        feed = dict(feed)
        with self._locked():
            try:
                for _ in range(self.warmup):
                    sess.run(None, feed)
            except Exception as exc:
                raise CandidateError(f"ONNX Runtime failed to run the model: {str(exc)[:600]}") from exc
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < self.max_runs:
                for _ in range(min(25, self.max_runs - len(times))):
                    t0 = time.perf_counter_ns()
                    sess.run(None, feed)
                    times.append((time.perf_counter_ns() - t0) / 1e6)
                if len(times) >= self.min_runs:
                    if _median_rel_se(times) <= self.rel_precision:
                        break
                    if time.perf_counter() - start > self.max_seconds:
                        break
        arr = np.asarray(times)
        q10, q25, q50, q75, q90 = np.percentile(arr, [10, 25, 50, 75, 90])
        import onnxruntime as ort

        return LatencyStats(
            median_ms=float(q50),
            p10_ms=float(q10),
            p90_ms=float(q90),
            mean_ms=float(arr.mean()),
            iqr_rel=float((q75 - q25) / q50) if q50 > 0 else 0.0,
            runs=len(arr),
            provider=sess.get_providers()[0],
            threads=self.threads,
            ort_version=ort.__version__,
            cpu=cpu_name(),
            load_avg=os.getloadavg()[0],
        )


def _median_rel_se(times: Sequence[float]) -> float:
    """Standard error of the median relative to it (IQR-based, robust to outliers)."""
    arr = np.asarray(times)
    q25, q50, q75 = np.percentile(arr, [25, 50, 75])
    sigma = (q75 - q25) / 1.349
    return float(1.2533 * sigma / np.sqrt(len(arr)) / q50) if q50 > 0 else 0.0


def interleaved(targets: Sequence[tuple[str, Any]], feed: Mapping[str, np.ndarray], target: TimingTarget, *,
                rounds: int = 5) -> dict[str, LatencyStats]:
    """Measure several models in interleaved rounds (fair under drifting machine load), on ``target``.

    Args:
        targets: (label, model path or session) pairs.
        feed: Input batch.
        target: Where to run (any :class:`TimingTarget`).
        rounds: Each model is measured this many times, in turn; its runs are pooled.
    """
    return target.interleaved(targets, feed, rounds=rounds)


def pool_rounds(pooled: Mapping[str, Sequence[LatencyStats]]) -> dict[str, LatencyStats]:
    """One figure per model from its rounds: medians of the rounds' statistics, runs summed."""
    out: dict[str, LatencyStats] = {}
    for label, stats in pooled.items():
        first = stats[0]
        out[label] = dataclasses.replace(
            first,
            median_ms=float(np.median([s.median_ms for s in stats])),
            p10_ms=float(np.median([s.p10_ms for s in stats])),
            p90_ms=float(np.median([s.p90_ms for s in stats])),
            mean_ms=float(np.mean([s.mean_ms for s in stats])),
            iqr_rel=float(np.median([s.iqr_rel for s in stats])),
            runs=sum(s.runs for s in stats),
            load_avg=stats[-1].load_avg,
        )
    return out


def round_budget(target: Any, rounds: int) -> dict[str, Any]:
    """A target's measurement settings for one of ``rounds`` interleaved rounds."""
    return {"min_runs": max(10, target.min_runs // rounds), "max_runs": max(20, target.max_runs // rounds),
            "max_seconds": target.max_seconds / rounds}


def _interleaved(target: Target, targets: Sequence[tuple[str, Any]], feed: Mapping[str, np.ndarray], *,
                 rounds: int) -> dict[str, LatencyStats]:
    sessions = {label: (m if hasattr(m, "run") else target.session(m)) for label, m in targets}
    pooled: dict[str, list[LatencyStats]] = {label: [] for label in sessions}
    short = dataclasses.replace(target, **round_budget(target, rounds))  # every other field kept as it is
    for _ in range(rounds):
        for label, sess in sessions.items():
            pooled[label].append(short.profile(sess, feed))
    return pool_rounds(pooled)


def target_label(t: Any) -> str:
    """A short name of a target for column names: ``cpu-1t``, ``cpu-2t-disable``, ``openvino-1t``, ``device:8765-1t``."""
    prov = str(t.providers[0]).removesuffix("ExecutionProvider").lower() if t.providers else "cpu"
    where = ""
    url = getattr(t, "url", None)
    if url:  # host:port/path: never the credentials (user:password@, query values)
        where = url.split("://", 1)[-1].split("#", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1].rstrip("/").replace("/", "_") + "-"
        prov = "" if prov == "cpu" else prov + "-"
        return f"{where}{prov}{t.threads}t"
    level = "" if t.graph_optimization_level == "all" else f"-{t.graph_optimization_level}"
    return f"{prov}-{t.threads}t{level}"


def same_target(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The first key where a study's recorded target differs from this one (None: the same target).
    Keys an older study did not record (this run has more) are not compared."""
    for key, was in old.items():
        if key not in new:
            return key  # e.g. the study was also timed on further targets, this run is not
        if new[key] != was:
            if isinstance(was, Mapping) and isinstance(new[key], Mapping):
                inner = same_target(was, new[key])
                if inner:
                    return f"{key}.{inner}"
                continue
            return key
    return None
