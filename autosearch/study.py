"""Search and study: the Optuna study that records every candidate.

The study is a plain Optuna study (metric names set, RDB storage, SQLite file by
default) so it opens in optuna-dashboard as is. Each trial holds its full
candidate and every measurement as user attributes; its ONNX file is built under
``studies/<name>/candidates/<hash>/`` and published to the study's artifact store
(:mod:`autosearch.artifacts`), which the trial names by artifact id. An identical
candidate is never built or measured twice. Calling :func:`search` again with the
same name and storage resumes the study; a different model, space or target is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import inspect
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from autosearch.candidate import Candidate, SpaceUnits
from autosearch.claim import _dead_here, _pidns
from autosearch.errors import CandidateError, ConfigError, DiskFullError, StudyMismatchError
from autosearch.evaluate import Evaluator, default_evaluator, evaluator_fingerprint
from autosearch.model import import_model
from autosearch.space import OBJECTIVES, SearchSpace, load_space
from autosearch.steps import SearchContext, quiet_optuna
from autosearch.steps.baseline import measure_baseline
from autosearch.steps.objective import FloatClock, Objective, Progress
from autosearch.steps.remeasure import remeasure_front
from autosearch.steps.units import discover_units, no_units_reason
from autosearch.steps.warm_start import apply_narrowing, queue_warm_start
from autosearch.store import CandidateStore
from autosearch.target import Target, same_target, target_label
from autosearch.toolchain import toolchain

__all__ = ["Study", "check_storage_url", "check_study_name", "check_study_path", "default_storage", "heartbeat_settings", "remeasure_front", "search",
           "work"]

_ATTR = "autosearch"


def default_storage(study_name: str, studies_dir: str | Path = "studies") -> str:
    """``sqlite:///studies/<name>.db`` (the folder is created)."""
    d = Path(studies_dir)
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / f'{study_name}.db'}"


def check_study_name(name: Any) -> str:
    """A study name is a plain name (it names ``<studies>/<name>.db`` and ``<studies>/<name>/``).

    Raises:
        ConfigError: empty, not a string, a path separator, ``..`` or a leading dot.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"study name {name!r} is empty: give a plain name such as 'mynet-int8'")
    bad = next((c for c in ("/", "\\", os.sep, "\0") if c in name), None) or (".." if ".." in name else None)
    if bad is not None or name.startswith(".") or name != name.strip():
        what = (f"holds {bad!r}" if bad is not None else "starts with a dot" if name.startswith(".")
                else "starts or ends with a space")
        raise ConfigError(f"study name {name!r} {what}: a study name is a plain name (no path separators, no '..', "
                          "no leading dot), e.g. 'mynet-int8'; use --studies-dir / studies_dir= to choose the folder")
    ctrl = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if ctrl is not None:
        raise ConfigError(f"study name {name!r} holds the control character {ctrl!r}: a study name is printable text "
                          "(letters, digits, '-', '_'), e.g. 'mynet-int8'")
    size = len(f"{name}.db".encode("utf-8", "surrogateescape"))
    if size > _NAME_MAX:
        raise ConfigError(f"study name {name[:40]!r}... is {size - 3} bytes long: the file system takes at most "
                          f"{_NAME_MAX} bytes per file name (the study's is <name>.db): give a name of at most "
                          f"{_NAME_MAX - 3} bytes, e.g. 'mynet-int8'")
    return name


_NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def check_study_path(name: str, studies_dir: str | Path) -> Path:
    """The study's folder ``<studies_dir>/<name>``, checked before anything is written: the folders must be
    folders (not files), and the path short enough for the file system.

    Raises:
        ConfigError: ``studies_dir`` (or a folder above it) is a file, or a study file's path is too long.
    """
    d = Path(studies_dir)
    for p in (d, *d.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--studies-dir {str(d)!r}: {str(p)!r} is a file, not a folder: pass a folder "
                              "(it is created when missing), e.g. --studies-dir studies")
    longest = Path(os.path.abspath(d / name / "candidates" / ("0" * 64) / "metrics.json.tmp"))
    try:
        limit = os.pathconf(next((p for p in (d, *d.parents) if p.exists()), Path(".")), "PC_PATH_MAX")
    except (OSError, ValueError):
        limit = 4096
    if len(str(longest).encode("utf-8", "surrogateescape")) >= limit:
        raise ConfigError(f"the study's files would have paths of {len(str(longest))} bytes under {str(d)!r}, over the file "
                          f"system's {limit}: give a shorter study name or a shorter --studies-dir")
    return d / name


_DRIVERS = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "mysqldb": "mysqlclient", "pymysql": "pymysql",
            "asyncpg": "asyncpg", "pg8000": "pg8000", "mysqlconnector": "mysql-connector-python"}


def check_storage_url(url: Any) -> Any:
    """Parse an Optuna storage URL (SQLAlchemy's form), with one-line errors that say the fix.

    Raises:
        ConfigError: not a URL, an unknown database, its driver not installed, a SQLite file in a missing folder.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    example = "sqlite:///studies/mine.db or postgresql+psycopg://user:password@host/dbname"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError) as exc:
        raise ConfigError(f"storage {url!r} is not a database URL ({exc}): write it as {example}") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
    except ArgumentError:
        raise ConfigError(f"storage {shown!r}: unknown database {parsed.drivername!r}; use sqlite:///... or "
                          "postgresql+psycopg://... (or another SQLAlchemy database URL)") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        driver = parsed.get_driver_name()
        pkg = _DRIVERS.get(driver, driver)
        raise ConfigError(f"storage {shown!r} needs the Python driver {driver!r} for {parsed.get_backend_name()}, which is "
                          f"not installed ({exc}): pip install {pkg}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"storage {str(url)!r} is an in-memory SQLite database: each connection sees an empty one, so the "
                          "study would be lost between steps (and at exit): use a file, sqlite:///studies/mine.db, or "
                          "leave --storage out")
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        folder = Path(parsed.database).parent
        if not folder.is_dir():
            raise ConfigError(f"storage {shown!r}: the folder {str(folder)!r} of the SQLite file does not exist: "
                              "create it, or leave --storage out (the default is sqlite:///<studies-dir>/<study>.db)")
    return parsed


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: 10 and 60, or ``$AUTOSEARCH_HEARTBEAT_S`` and
    ``$AUTOSEARCH_GRACE_S`` (the grace period defaults to 6 intervals, at least 2 s more than one)."""
    def whole(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw is None or not raw.strip():
            return default
        if not raw.strip().isdigit() or int(raw) < 1:
            raise ConfigError(f"${name} is {raw!r}: give a whole number of seconds >= 1")
        return int(raw)

    interval = whole("AUTOSEARCH_HEARTBEAT_S", 10)
    return interval, whole("AUTOSEARCH_GRACE_S", max(6 * interval, interval + 2))


def _storage(url: str) -> optuna.storages.BaseStorage:
    """The RDB storage with a heartbeat: a trial whose worker died (no beat within the grace period) is marked
    FAIL by the next trial that starts (Optuna's ``fail_stale_trials``) and queued again once with the same
    parameters (``system_attrs["failed_trial"]`` names the one it retries); the failed trial's ``fail_reason``
    says which worker stopped beating, when it last beat and the trial it was retried as (:class:`_StaleTrials`)."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

    parsed = check_storage_url(url)
    interval, grace = heartbeat_settings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna 4.9 renamed failed_trial_callback (deprecated since) to heartbeat_stale_trial_callback
        cb = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
              in inspect.signature(optuna.storages.RDBStorage.__init__).parameters else "failed_trial_callback")
        stale = _StaleTrials(grace)
        kw: dict[str, Any] = {"heartbeat_interval": interval, "grace_period": grace, cb: stale}
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else None
    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna (since 2.9)
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    stale.storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, **kw)
                    return stale.storage
            except (IntegrityError, ProgrammingError):
                # workers starting together on an empty database race to create Optuna's tables (PostgreSQL:
                # duplicate key in pg_type, or a table that already exists): the loser finds them made when it tries again
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")
    except SQLAlchemyError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot open the study storage {parsed.render_as_string(hide_password=True)!r} ({first[:300]}): "
                          "check the URL, that the database server runs and the credentials") from None


def _make_sampler(name: str, seed: int, population_size: int) -> optuna.samplers.BaseSampler:
    """The sampler; constraints reach it through ``trial.set_constraint``."""
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


class Study:
    """Handle on a search's Optuna study.

    Example:
        >>> study = Study.load("demo")                      # doctest: +SKIP
        >>> study.front()[["trial", "accuracy", "latency_ms", "speedup"]]  # doctest: +SKIP
    """

    def __init__(self, study: optuna.Study, *, studies_dir: str | Path = "studies", artifact_store: Any = None) -> None:
        from autosearch.artifacts import open_artifact_store

        self.optuna_study = study
        self.name = study.study_name
        self.dir = Path(studies_dir) / study.study_name
        self.artifact_store = open_artifact_store(artifact_store)

    @classmethod
    def load(cls, study_name: str, storage: str | None = None, *, studies_dir: str | Path = "studies",
             artifact_store: Any = None) -> Study:
        """Open an existing study (no model needed). ``artifact_store``: where its trials' models are (a folder,
        ``s3://bucket`` or an :mod:`optuna.artifacts` store; default: the store each trial recorded, when it is
        reachable from here, else ``<studies_dir>/<name>/artifacts``).

        Raises:
            ConfigError: no study of that name in that storage.
        """
        check_study_name(study_name)
        check_study_path(study_name, studies_dir)
        if storage is not None:
            check_storage_url(storage)
        url = storage or default_storage(study_name, studies_dir)
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
            raise ConfigError(f"no study database at {url[len('sqlite:///'):]}: check the study name or pass --storage")
        try:
            st = optuna.load_study(study_name=study_name, storage=_storage(url))
        except KeyError:
            from autosearch.claim import is_claim_name

            names = [n for n in optuna.get_all_study_names(storage=_storage(url)) if not is_claim_name(n)]
            raise ConfigError(f"study {study_name!r} not found in {url}; studies there: {', '.join(names) or '(none)'}") from None
        return cls(st, studies_dir=studies_dir, artifact_store=artifact_store)

    def _stores(self, recorded: Any) -> list[Any]:
        """The artifact stores to read from, in order: the one given, the one recorded (per trial, then for the
        study), the default folder of this machine."""
        from autosearch.artifacts import AtomicFileSystemArtifactStore, reopen

        out = [self.artifact_store, reopen(recorded), reopen(self.optuna_study.user_attrs.get("artifact_store"))]
        default = self.dir / "artifacts"
        if default.is_dir():
            out.append(AtomicFileSystemArtifactStore(default))
        return [s for s in out if s is not None]

    def model_path(self, trial: int | optuna.trial.FrozenTrial) -> Path:
        """A local path holding the trial's ONNX file: found by its artifact id (the store's own file when the
        store is a folder here, else downloaded once into ``<studies_dir>/<name>/downloads/``), or, for a study
        made before trials recorded artifact ids, by its ``onnx_path``.

        Raises:
            ConfigError: the trial records neither, or neither can be found from here (the message says where it looked).
        """
        from autosearch.artifacts import fetch_artifact

        t = self.optuna_study.get_trials(deepcopy=False)[trial] if isinstance(trial, int) else trial
        ua = t.user_attrs
        looked: list[str] = []
        aid = ua.get("artifact_id")
        if aid:
            stores = self._stores(ua.get("artifact_store"))
            got = fetch_artifact(stores, str(aid), self.dir / "downloads", "model.onnx")
            if got is not None:
                return got
            looked.append(f"artifact {aid} in {ua.get('artifact_store', '?')}" + ("" if stores else " (not reachable from here)"))
        raw = ua.get("onnx_path")
        if raw:
            p = Path(raw)
            tries = [p] if p.is_absolute() else [p, self.dir / "candidates" / p.parent.name / p.name]
            for cand in tries:
                if cand.exists():
                    return cand
            looked += [str(c) for c in tries]
        if not looked:
            raise ConfigError(f"trial {t.number} of study {self.name!r} records no ONNX file (user attributes "
                              "'artifact_id' and 'onnx_path')")
        raise ConfigError(
            f"the ONNX file of trial {t.number} is missing (looked for {'; '.join(looked)}): pass the artifact store it "
            "was uploaded to (--artifacts PATH or s3://bucket; artifact_store= to Study.load), or run from the folder "
            "the study was created in (--studies-dir / studies_dir=)"
        )

    def baseline_path(self) -> Path | None:
        """A local path holding the float model the study was searched from: ``<study folder>/baseline.onnx`` when
        this machine ran it, else the study's ``baseline_artifact`` (downloaded); ``None`` when neither is found."""
        from autosearch.artifacts import fetch_artifact

        local = self.dir / "baseline.onnx"
        if local.exists():
            return local
        rec = self.optuna_study.user_attrs.get("baseline_artifact") or {}
        if not rec.get("id"):
            return None
        return fetch_artifact(self._stores(rec.get("store")), str(rec["id"]), self.dir / "downloads", "baseline.onnx")

    @property
    def meta(self) -> dict[str, Any]:
        """What the search recorded about itself (fingerprints, baseline, space, target)."""
        return dict(self.optuna_study.user_attrs.get(_ATTR, {}))

    @property
    def baseline(self) -> dict[str, Any]:
        """The float model's figures from the latest run."""
        return dict(self.optuna_study.user_attrs.get("baseline", {}))

    def trials(self, *, include_failed: bool = True) -> Any:
        """Every trial as a pandas DataFrame, one row each."""
        import pandas as pd

        rem = self.optuna_study.user_attrs.get("front_remeasured", {}).get("trials", {})
        cores = os.cpu_count() or 1
        # busy: the machine's load while a trial was timed rose by a whole core over the load before the run
        # (older studies did not record it: more load than cores)
        before = self.baseline.get("load_before")
        busy = cores if before is None else float(before) + 1.0
        rows = []
        for t in self.optuna_study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.WAITING:
                continue  # queued warm-start candidates that have not run yet
            if not include_failed and t.state != optuna.trial.TrialState.COMPLETE:
                continue
            ua = t.user_attrs
            rows.append(
                {
                    "trial": t.number,
                    "state": t.state.name,
                    "accuracy": ua.get("accuracy"),
                    "accuracy_drop": ua.get("accuracy_drop"),
                    "latency_ms": ua.get("latency_ms"),
                    "latency_iqr": ua.get("latency", {}).get("iqr_rel"),
                    "size_mb": ua.get("size_mb"),
                    "speedup": ua.get("speedup"),
                    "feasible": ua.get("feasible"),
                    "remeasured_ms": rem.get(str(t.number), {}).get("latency_ms"),
                    "remeasured_speedup": rem.get(str(t.number), {}).get("speedup"),
                    "loaded": (ua.get("latency", {}).get("load_avg") or 0) > busy,
                    **{k: v for k, v in ua.items() if k.startswith(("latency_ms@", "speedup@"))},
                    "config": ua.get("summary", ""),
                    "reason": ua.get("fail_reason") or t.system_attrs.get("fail_reason"),
                    "onnx": ua.get("onnx_path"),
                    "artifact_id": ua.get("artifact_id"),
                }
            )
        return pd.DataFrame(rows)

    def targets(self) -> list[str]:
        """Labels of the further targets every candidate was timed on (``front(target=label)``)."""
        return list((self.meta.get("target") or {}).get("also", {}))

    def front(self, *, feasible_only: bool = True, remeasured: bool = True, target: str | None = None) -> Any:
        """The Pareto front over complete (and feasible) trials, sorted by latency (on ``target``, a label of
        :meth:`targets`, when given).

        After the end-of-run re-measure (every front trial and the float model timed interleaved), the front
        is computed again among those trials on the re-measured latencies: a point that only looked fast
        because the machine was quieter when it ran drops out. ``remeasured=False``: the trials' own figures.
        """
        df = self.trials(include_failed=False)
        if df.empty:
            return df
        if feasible_only and df["feasible"].any():
            df = df[df["feasible"] == True]
        objectives = list(self.meta.get("objectives", ["accuracy", "latency_ms"]))
        if target is not None:  # the front on a further target: its latencies instead of the first target's
            col = f"latency_ms@{target}"
            if col not in df:
                raise ConfigError(f"study {self.name!r} was not timed on {target!r}; its targets: "
                                  f"{', '.join(self.targets()) or '(only the first)'}")
            df = df[df[col].notna()].assign(latency_ms=df[col])
            remeasured = False
        front = _pareto(df, objectives)
        if remeasured and "latency_ms" in objectives and front["remeasured_ms"].notna().all() and len(front) > 1:
            again = front.assign(latency_ms=front["remeasured_ms"].astype(float))
            keep = set(_pareto(again, objectives)["trial"])
            front = front[front["trial"].isin(keep)]
        return front.sort_values("latency_ms").reset_index(drop=True)

    def analysis(self) -> Any:
        """The analysis the search measured first, one row per sampled parameter (a unit or a share
        group): knob, latency share, parameters, MFLOPs, ``drop@<value>`` and ``saving@<value>``.
        ``None`` when the study ran without one (``strategy.analysis: false``)."""
        import pandas as pd

        blob = self.optuna_study.user_attrs.get("analysis")
        return pd.DataFrame(blob["units"]) if blob else None

    def export(
        self,
        out_dir: str | Path,
        *,
        pick: str | int = "knee",
        evaluator: Evaluator | None = None,
        example_inputs: Any = None,
        target: Target | None = None,
        force: bool = False,
    ) -> Any:
        """Export a trial picked by rule (number, ``fastest[:floor]``, ``smallest``, ``knee``) with a
        verification report that re-measures it against the original (see :func:`autosearch.export.export_trial`).

        Example:
            >>> report = study.export("out/knee", evaluator=ev)   # doctest: +SKIP
        """
        from autosearch.export import export_trial

        return export_trial(self, pick, out_dir, evaluator=evaluator, example_inputs=example_inputs, target=target, force=force)

    def dashboard(self, path: str | Path) -> Path:
        """Write the self-contained HTML dashboard of this study (see :func:`autosearch.dashboard.write_dashboard`)."""
        from autosearch.dashboard import write_dashboard

        return write_dashboard(self, path)

    def candidate(self, trial: int) -> Candidate:
        """The candidate of a trial number."""
        t = self.optuna_study.trials[trial]
        return Candidate.from_dict(t.user_attrs.get("candidate", {}))


def _pareto(df: Any, objectives: list[str]) -> Any:
    """The rows of ``df`` no other row dominates on ``objectives`` (one row per distinct point)."""
    signs = np.array([1.0 if OBJECTIVES[o] == "minimize" else -1.0 for o in objectives])
    vals = df[objectives].to_numpy(dtype=float) * signs
    keep = [not np.any(np.all(vals <= v, axis=1) & np.any(vals < v, axis=1)) for v in vals]
    return df[np.array(keep, dtype=bool)].drop_duplicates(subset=objectives)


def search(
    model: Any,
    evaluator: Evaluator | None = None,
    *,
    example_inputs: Any = None,
    space: str | Path | Mapping[str, Any] | SearchSpace | None = None,
    target: Any = None,
    study_name: str = "autosearch",
    storage: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    studies_dir: str | Path = "studies",
    verbose: bool = True,
    cli_spec: Mapping[str, Any] | None = None,
    worker: int | None = None,
    artifact_store: Any = None,
) -> Study:
    """Run (or resume) a search and return the study.

    The steps (:mod:`autosearch.steps`): units of each knob, the float baseline, the analysis and warm
    start (fresh studies), the trials, the front re-measured.

    Args:
        model: ``torch.nn.Module`` (with ``example_inputs``) or ``.onnx`` path.
        evaluator: Scores a candidate's session, higher is better. Default: fidelity
            (scaled cosine) to the original model on random inputs, with a warning.
        example_inputs: One batch of input; its shape is the one latency is measured at.
        space: Preset name (``cnn``), YAML path, mapping or :class:`SearchSpace`.
        target: Where latency is measured (default: this CPU, 1 thread): a :class:`~autosearch.target.Target`,
            a :class:`~autosearch.remote.RemoteTarget`, or a list of them: every candidate is timed on each
            (``trials()`` has ``latency_ms@<label>`` per further target, ``front(target=label)`` its front),
            the first is the one the objectives use.
        study_name: Name of the study; calling again with the same name resumes it.
        storage: Optuna storage URL (default ``sqlite:///studies/<name>.db``).
        n_trials: Trials to run now (default: the space's budget).
        timeout: Seconds to run at most (default: the space's budget).
        studies_dir: Home of study databases and artifacts.
        verbose: Print a line per trial.
        cli_spec: The problem spec the CLI built (stored, so ``autosearch resume`` and export can rebuild it).
        worker: Run as one of several workers sharing this study (see :func:`work`): this worker's index
            (any whole number distinct between the workers; the process id when ``work`` is not given one) makes
            its sampler seed its own, and the front is not re-measured at the end (the workers would time it at
            once). Without it, the same steps; either way the analysis and the warm start of a fresh study run
            once, in whichever process claims them first through the storage.
        artifact_store: Where each trial's model and record are uploaded (trials record the artifact ids): a
            folder (shared between machines: a mounted volume), ``s3://bucket`` (needs boto3) or an
            :mod:`optuna.artifacts` store. Default: the store the study recorded when it is reachable from here,
            else ``<studies_dir>/<study_name>/artifacts``.

    Returns:
        The :class:`Study`; ``study.front()`` is the Pareto front as a DataFrame.

    Raises:
        ConfigError: bad model, data, space or target; StudyMismatchError when resuming
            with a different model, space or target.

    Example:
        >>> from autosearch import search, LabelledEvaluator
        >>> study = search(model, LabelledEvaluator(x, y), example_inputs=x[:1],
        ...                study_name="mine", n_trials=10)          # doctest: +SKIP
        >>> study.front()                                            # doctest: +SKIP
    """
    check_study_name(study_name)
    check_study_path(study_name, studies_dir)
    _check_n_trials(n_trials)
    _check_timeout(timeout)
    if storage is not None:
        check_storage_url(storage)
    say = _print_row if verbose else _silent
    ctx = _context(model, evaluator, example_inputs=example_inputs, space=space, target=target, say=say,
                   verbose=verbose, study_dir=Path(studies_dir) / study_name)
    url = storage or default_storage(study_name, studies_dir)
    ost, n_done, stor, seed = _open_study(ctx, study_name=study_name, url=url, cli_spec=cli_spec, worker=worker)
    me = f"{socket.gethostname()}:{os.getpid()}" + (f"#{worker}" if worker is not None else "")
    stale = getattr(stor, "get_heartbeat_stale_trial_callback", getattr(stor, "get_failed_trial_callback", lambda: None))()
    if isinstance(stale, _StaleTrials):
        stale.say = say
    sp = ctx.space

    try:
        baseline = measure_baseline(ctx)
    except ConfigError:
        _forget_if_empty(ost, stor)  # a study refused before its first trial keeps nothing (the fixed data then starts afresh)
        raise
    ost.set_user_attr("baseline", baseline.as_dict())
    floor = _floor(sp, baseline.accuracy)
    say(
        f"[autosearch] study {study_name!r} ({n_done} trials so far) at {url}\n"
        f"[autosearch] float model: {ctx.evaluator.name} {baseline.accuracy:.4f}, latency {baseline.latency_ms:.3f} ms median "
        f"({ctx.target.threads} thread(s), {baseline.latency.provider}), {baseline.size_mb:.2f} MB"
        + (f"; accuracy floor {floor:.4f}" if floor is not None else "")
    )
    also = {lbl: (t, t.profile(baseline.path, ctx.source.example_feed).median_ms) for lbl, t in ctx.also.items()}
    if also:
        ost.set_user_attr("baseline", {**baseline.as_dict(), **{f"latency_ms@{lbl}": ms for lbl, (_, ms) in also.items()}})
        say("[autosearch] also timed on " + ", ".join(f"{lbl} (float {ms:.3f} ms)" for lbl, (_, ms) in also.items()))
    arts = _artifact_store(ost, artifact_store, ctx.study_dir, say)
    _publish_baseline(ost, arts, baseline.path, ctx.source.fingerprint)
    store = CandidateStore(ctx.study_dir, ctx.source, ctx.units, ctx.calibration, ctx.evaluator, ctx.target, baseline.latency_ms,
                           also, artifacts=arts, toolchain=toolchain(ctx.source, ctx.units))
    if _warm_start_due(ost):
        _run_warm_start_once(ctx, ost, stor, me, store=store, baseline=baseline, floor=floor, n_trials=n_trials,
                             worker=worker)
    apply_narrowing(ctx, ost)

    _fail_dead(ost, stor, say)
    _fail_unstarted(ost, stor, say)
    _requeue_unreachable(ost, stor, say)
    budget = n_trials if n_trials is not None else sp.n_trials
    started = time.perf_counter()
    ran: list[int] = []  # trials this call finished (a timeout or a stop ends the budget early)
    with quiet_optuna(optuna.logging.ERROR), _disk_full_stops(ctx.study_dir):
        ost.optimize(
            Objective(ctx, store, baseline, floor,
                      FloatClock(baseline.path, ctx.source.example_feed, ctx.target, baseline.latency_ms, baseline.at),
                      {lbl: FloatClock(baseline.path, ctx.source.example_feed, t, ms) for lbl, (t, ms) in also.items()},
                      worker={"id": me, "seed": seed, "host": socket.gethostname(), "pid": os.getpid(),
                              "pidns": _pidns()}),
            n_trials=budget,
            timeout=timeout if timeout is not None else sp.timeout_s,
            catch=(CandidateError,),
            callbacks=[Progress(ctx, n_done + budget, n_done), lambda _s, t: ran.append(t.number),
                       _stop_if_disk_full(ctx.study_dir)],
            gc_after_trial=False,
        )
    study = Study(ost, studies_dir=studies_dir, artifact_store=arts)
    if sp.strategy.remeasure_front and worker is None:
        remeasure_front(study, ctx.target, ctx.source.example_feed, baseline.path, say=say)
    say(f"[autosearch] {len(ran)} trial(s) in {time.perf_counter() - started:.0f} s; study {study_name!r} at {url}")
    return study


def work(model: Any, evaluator: Evaluator | None = None, *, study_name: str, storage: str | None = None,
         index: int | None = None, **kwargs: Any) -> Study:
    """Join (or create) a study as one of several workers: :func:`search` with ``worker=index`` (default: the
    process id). Start as many as you like, on one machine or several, with the same model, space, target and
    storage (PostgreSQL for more than one machine; a shared ``studies_dir`` on one machine); each runs ``n_trials``.

    The first to reach a fresh study runs its analysis and warm start (claimed through the storage,
    :mod:`autosearch.claim`); the others wait for it (``$AUTOSEARCH_WARM_WAIT_S``, default 3600 s, then they start
    sampling), and one of them takes the claim over when its holder dies or lets its lease lapse. Workers on
    several machines share models through one ``artifact_store=`` (a shared folder or ``s3://bucket``). A worker killed mid-trial
    leaves a RUNNING trial whose heartbeat stops: the next trial any worker starts after the grace period marks it
    FAIL and queues it once more with the same parameters (:func:`heartbeat_settings`).

    Example:
        >>> work("net.onnx", ev, study_name="net", storage="postgresql+psycopg://u:p@db/search", n_trials=20)  # doctest: +SKIP
    """
    return search(model, evaluator, study_name=study_name, storage=storage,
                  worker=os.getpid() if index is None else int(index), **kwargs)


def _warm_start_due(ost: optuna.Study) -> bool:
    """A fresh study (no trial yet), or one whose warm start was claimed and has not finished."""
    ua = ost.user_attrs
    return "warm_started" not in ua and ("warm_start_claim" in ua or not ost.trials)


def _artifact_store(ost: optuna.Study, given: Any, study_dir: Path, say: Any) -> Any:
    """The store this run uploads to: the one given, else the one the study recorded when reachable from here,
    else ``<study folder>/artifacts``. The study records the first store used (``artifact_store``)."""
    from autosearch.artifacts import AtomicFileSystemArtifactStore, describe_store, open_artifact_store, reopen

    recorded = ost.user_attrs.get("artifact_store")
    store = open_artifact_store(given)
    if store is None:
        store = reopen(recorded)
        if store is None:
            store = AtomicFileSystemArtifactStore(study_dir / "artifacts")
            if recorded and recorded != describe_store(store):
                say(f"[autosearch] note: the study's artifact store {recorded} cannot be reached from here: this run "
                    f"uploads to {describe_store(store)}; pass --artifacts (artifact_store=) to share one")
    if not recorded:
        ost.set_user_attr("artifact_store", describe_store(store))
    return store


def _publish_baseline(ost: optuna.Study, store: Any, path: Path, fingerprint: str) -> None:
    """Upload the float model once per store (an export on another machine re-times against it)."""
    from autosearch.artifacts import describe_store, upload_file

    where = describe_store(store)
    rec = ost.user_attrs.get("baseline_artifact") or {}
    if rec.get("store") == where and rec.get("model_fingerprint") == fingerprint:
        return
    aid = upload_file(store, path, ost, name="baseline.onnx")
    ost.set_user_attr("baseline_artifact", {"id": aid, "store": where, "model_fingerprint": fingerprint})


class _StaleTrials:
    """The heartbeat's callback for a trial it marked FAIL (its worker stopped beating for the grace period): the
    trial's ``fail_reason`` says which worker (host and pid), when it last beat and the trial it is retried as
    (queued once with the same parameters, as Optuna's ``RetryHeartbeatStaleTrialCallback(max_retry=1)``), and
    the run prints one line saying so (``say``, set by the search)."""

    def __init__(self, grace: int) -> None:
        self.grace = grace
        self.storage: Any = None  # the RDB storage this callback belongs to
        self.say: Callable[[str], None] = _silent

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reason = (f"its worker {_worker_name(trial)} stopped beating: {_last_beat(self.storage, trial._trial_id)}, "
                  f"grace period {self.grace} s")
        _retry_failed(study, self.storage, trial, reason, self.say)


def _worker_name(trial: optuna.trial.FrozenTrial) -> str:
    w = trial.user_attrs.get("worker")
    if isinstance(w, Mapping) and w.get("host") and w.get("pid"):
        return f"{w['host']}:{w['pid']}"
    return str(w.get("id", "?")) if isinstance(w, Mapping) else "(not recorded)"


def _last_beat(stor: Any, trial_id: int) -> str:
    """When a trial's worker last beat, as the database's clock tells (no worker clock is compared)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import func

    if stor is None:
        return "last beat unknown"
    with _create_scoped_session(stor.scoped_session) as session:
        now = session.execute(func.now()).scalar()
        hb = models.TrialHeartbeatModel.where_trial_id(trial_id, session)
        if hb is None or now is None:
            return "it never beat"
        last = hb.heartbeat.replace(tzinfo=None)
        return f"last beat {last:%Y-%m-%d %H:%M:%S} (database clock), {(now.replace(tzinfo=None) - last).total_seconds():.0f} s before"


def _set_finished_trial_attr(stor: Any, trial_id: int, key: str, value: Any) -> None:
    """Set a user attribute of a finished trial (Optuna's API refuses once a trial is finished): how it failed and
    the trial it was retried as are known only once it is FAIL and its retry queued."""
    import json

    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(stor.scoped_session, True) as session:
        session.query(models.TrialUserAttributeModel).filter_by(trial_id=trial_id, key=key).delete()
        session.add(models.TrialUserAttributeModel(trial_id=trial_id, key=key, value_json=json.dumps(value)))


def _retry_failed(study: optuna.Study, stor: Any, trial: optuna.trial.FrozenTrial, reason: str,
                  say: Callable[[str], None], *, max_retry: int | None = 1) -> int | None:
    """Queue a trial this process marked FAIL once more with the same parameters (``system_attrs``: ``failed_trial``,
    the first of the series, and ``retry_history``, as Optuna's retry callback), record why it failed and what it
    is retried as in its ``fail_reason`` (and ``retried_as``), and say so in one line. Returns the new number."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    number: int | None = None
    if max_retry is None or len(history) <= max_retry:
        system = {"failed_trial": trial.number, **trial.system_attrs, "retry_history": history}
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                                  distributions=trial.distributions, system_attrs=system))
        number = max((t.number for t in study.get_trials(deepcopy=False)
                      if t.system_attrs.get("retry_history") == history), default=None)
    full = f"{reason}; " + (f"retried as trial {number}" if number is not None else
                            f"not retried (retried {len(history) - 1} time(s) already)")
    if stor is not None:
        _set_finished_trial_attr(stor, trial._trial_id, "fail_reason", full)
        _set_finished_trial_attr(stor, trial._trial_id, "retried_as", number)
    say(f"[autosearch] trial {trial.number} FAIL: {full}")
    return number


def _fail_dead(ost: optuna.Study, stor: optuna.storages.BaseStorage, say: Callable[[str], None]) -> int:
    """Mark FAIL (and queue again, as the heartbeat would) the RUNNING trials whose worker is a process of this
    machine that no longer runs (its host and pid recorded in the trial's ``worker``): no need to wait out the
    heartbeat's grace period for what is known dead. Returns how many were marked."""
    n = 0
    for t in ost.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        w = t.user_attrs.get("worker")
        if not isinstance(w, Mapping) or not _dead_here(dict(w)):
            continue
        try:
            if not stor.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):
                continue
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):  # another process got there first
            continue
        beat = _last_beat(stor, t._trial_id)
        _retry_failed(ost, stor, stor.get_trial(t._trial_id),
                      f"its worker {_worker_name(t)} is gone (no such process on {w['host']}; {beat})", say)
        n += 1
    return n


def _requeue_unreachable(ost: optuna.Study, stor: optuna.storages.BaseStorage, say: Callable[[str], None]) -> int:
    """Queue again the trials that failed because a profiler did not answer (``unreachable``) and were not queued
    again yet: nothing was learnt about their candidates. Returns how many."""
    trials = ost.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    n = 0
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("unreachable") and t.number not in retried:
            _retry_failed(ost, stor, t, str(t.user_attrs.get("fail_reason", "the profiler did not answer")), say,
                          max_retry=None)
            n += 1
    return n


def _fail_unstarted(ost: optuna.Study, stor: optuna.storages.BaseStorage, say: Callable[[str], None]) -> int:
    """Mark FAIL the RUNNING trials whose process died before their objective started.

    Optuna creates a trial and samples its relative parameters (``study.ask``) before the heartbeat thread
    starts, and ``fail_stale_trials`` passes over a trial with no heartbeat: a process killed in that window
    leaves a trial RUNNING forever. The objective records attributes first thing, so a RUNNING trial with none,
    started longer ago than the grace period, has no process left (its parameters were never evaluated: it is
    not queued again). Returns how many were marked.
    """
    _, grace = heartbeat_settings()
    now = datetime.datetime.now()
    n = 0
    for t in ost.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs or t.datetime_start is None or (now - t.datetime_start).total_seconds() < grace:
            continue
        try:
            stor.set_trial_user_attr(t._trial_id, "fail_reason", "its process ended before the trial started (no heartbeat)")
            stor.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):  # another process got there first
            continue
        n += 1
    if n:
        say(f"[autosearch] marked {n} trial(s) FAIL whose process ended before they started (left RUNNING, no heartbeat)")
    return n


def _warm_start_wait_s() -> float:
    raw = os.environ.get("AUTOSEARCH_WARM_WAIT_S", "3600")
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"$AUTOSEARCH_WARM_WAIT_S is {raw!r}: give a number of seconds") from None


def _run_warm_start_once(ctx: SearchContext, ost: optuna.Study, stor: optuna.storages.BaseStorage, me: str, *,
                         store: CandidateStore, baseline: Any, floor: float | None, n_trials: int | None,
                         worker: int | None) -> None:
    """The analysis and warm start, in exactly one process (:mod:`autosearch.claim`): this one when it claims
    them (or takes over a claim whose holder died or let its lease lapse), else it waits until they are recorded."""
    from autosearch.claim import acquire

    interval, grace = heartbeat_settings()
    lease = acquire(stor, ost.study_name, me, done=lambda: "warm_started" in ost.user_attrs, say=ctx.say,
                    lease_s=float(grace), beat_s=float(interval), wait_s=_warm_start_wait_s())
    if lease is None:
        return
    with lease:
        ost.set_user_attr("warm_start_claim", me)
        t_ws = time.perf_counter()
        queue_warm_start(ctx, ost, store=store, baseline=baseline, floor=floor, n_trials=n_trials)
        if "warm_started" not in ost.user_attrs:  # a holder thought dead but only slow may have finished first
            ost.set_user_attr("warm_started", {"by": me, "at": time.time(), "seconds": time.perf_counter() - t_ws,
                                               "claim": lease.generation,
                                               "queued": sum(t.state == optuna.trial.TrialState.WAITING for t in ost.trials)})
    if worker is not None or lease.generation > 1:
        ctx.say(f"[autosearch] worker {me}: ran the warm start")


_ENOSPC = re.compile(r"\[Errno 28\][^']*(?:'([^']+)')?|No space left on device|database or disk is full")


def _disk_full(text: str) -> tuple[bool, str | None]:
    """Whether an error's text says the disk is full, and the path it names (if any)."""
    m = _ENOSPC.search(text)
    return (m is not None, m.group(1) if m and m.lastindex else None)


def _disk_full_message(path: Any) -> str:
    return f"no space left on device at {path}; free space or use --studies-dir (studies_dir=) on another disk; the " \
           "finished trials are saved (autosearch resume continues the study)"


def _stop_if_disk_full(study_dir: Path) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """Optuna callback: a trial that failed because the disk is full ends the search (every later trial would too)."""
    def check(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != optuna.trial.TrialState.FAIL:
            return
        full, path = _disk_full(str(trial.user_attrs.get("fail_reason") or trial.system_attrs.get("fail_reason") or ""))
        if full:
            raise DiskFullError(_disk_full_message(path or study_dir))
    return check


@contextlib.contextmanager
def _disk_full_stops(study_dir: Path) -> Any:
    """An ENOSPC anywhere in a trial (a file, the SQLite storage) becomes one :class:`DiskFullError`."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise DiskFullError(_disk_full_message(exc.filename or study_dir)) from exc
    except optuna.exceptions.StorageInternalError as exc:
        if not _disk_full(f"{exc} {exc.__cause__}")[0]:
            raise
        raise DiskFullError(_disk_full_message(f"the study storage ({study_dir.parent})")) from exc


def _forget_if_empty(ost: optuna.Study, stor: optuna.storages.BaseStorage) -> None:
    """Delete a study that holds no trial and no analysis (made by this call, refused before any work)."""
    if ost.get_trials(deepcopy=False) or "analysis" in ost.user_attrs or "warm_started" in ost.user_attrs:
        return
    with contextlib.suppress(Exception):  # another process may have deleted or used it meanwhile: the refusal's error stands
        optuna.delete_study(study_name=ost.study_name, storage=stor)


def _check_timeout(timeout: Any) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)) \
            or not np.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"timeout is {timeout!r}: pass a number of seconds > 0 (--timeout 600), or None for the space's "
                          "budget.timeout_s")


def _check_n_trials(n_trials: Any) -> None:
    if n_trials is None:
        return
    if isinstance(n_trials, bool) or not isinstance(n_trials, (int, np.integer)) or n_trials < 0:
        raise ConfigError(f"n_trials is {n_trials!r}: pass a whole number of trials >= 0 (0 runs only the analysis), "
                          "or None for the space's budget")


def _print_row(msg: str) -> None:
    print(msg, flush=True)


def _silent(_msg: str) -> None:
    return None


def _context(model: Any, evaluator: Evaluator | None, *, example_inputs: Any, space: Any, target: Any,
             say: Any, verbose: bool, study_dir: Path) -> SearchContext:
    """Load and check everything a search needs before any work starts (a ConfigError names what is wrong)."""
    sp = load_space(space)
    _check_knobs(sp)
    study_dir.parent.mkdir(parents=True, exist_ok=True)
    targets = list(target) if isinstance(target, (list, tuple)) else [target or Target(lock_path=str(study_dir.parent / ".profile.lock"))]
    if not targets:
        raise ConfigError("target=[] names no target: pass one Target (or several, the first for the objectives)")
    tgt = targets[0]
    also: dict[str, Any] = {}
    for t in targets[1:]:
        lbl = target_label(t)
        while lbl in also or lbl == target_label(tgt):
            lbl += "'"
        also[lbl] = t
    source = import_model(model, example_inputs)
    if evaluator is None:
        say("[autosearch] no evaluator given: scoring by fidelity to the original (scaled cosine) on 64 random inputs; "
            "random inputs rarely look like real data: pass an evaluator with your samples")
        evaluator = default_evaluator(source.onnx_model)
    if not isinstance(evaluator, Evaluator):
        raise ConfigError("evaluator must be callable as evaluator(session, limit=None) -> float with calibration_feeds(); "
                          "use LabelledEvaluator or FidelityEvaluator")
    if not evaluator_fingerprint(evaluator)[1]:
        say(f"[autosearch] note: evaluator {evaluator.name!r} has no fingerprint(), so a resumed study cannot tell whether "
            "its data changed (its name stands in); give it a fingerprint() returning a hash of its data and metric")
    for n in source.notes:
        say(f"[autosearch] import: {n}")
    units, notes = discover_units(source, sp)
    for n in notes:
        say(f"[autosearch] {n}")
    if not units:
        raise ConfigError(no_units_reason(source, sp))
    calibration = evaluator.calibration_feeds(max(sp.calibration_samples, max(sp.recovery.calibration_samples)),
                                              source.input_names)
    _check_calibration(calibration, source.example_feed, source.onnx_model)
    _preflight(evaluator, source, sp, say=say, verbose=verbose)
    return SearchContext(space=sp, source=source, units=units, evaluator=evaluator, target=tgt, study_dir=study_dir,
                         calibration=calibration, say=say, verbose=verbose, also=also)


def _check_knobs(sp: SearchSpace) -> None:
    """A space must have a knob with a value other than its neutral one (else every trial is the float model)."""
    from autosearch.knobs import knob

    where = sp.source or f"space {sp.name!r}"
    if not sp.knobs:
        raise ConfigError(f"search space {where} has no knobs: nothing to search; add a 'knobs:' section, "
                          "e.g. knobs: {bits: [32, 8]} (see the presets: cnn, quant)")
    values = {name: {*spec.choices, *(v for c in spec.by_unit.values() for v in c)} for name, spec in sp.knobs.items()}
    if all(vals <= {knob(name).neutral} for name, vals in values.items()):
        shown = ", ".join(f"{name}: {sorted(vals, key=str)}" for name, vals in values.items())
        raise ConfigError(f"search space {where} has nothing to search: every knob only takes its neutral value ({shown}); "
                          "add a choice that changes the model, e.g. knobs: {bits: [32, 8]}")


def _preflight(evaluator: Evaluator, source: Any, sp: SearchSpace, *, say: Any, verbose: bool) -> None:
    """The data checked against the float model before any study is opened: labels within its classes, and
    whether one sample moves the score by more than the space allows (a warning)."""
    _check_constraints(sp, evaluator)
    check = getattr(evaluator, "validate", None)
    if callable(check):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        check(ort.InferenceSession(source.onnx_model.SerializeToString(), so, providers=["CPUExecutionProvider"]))
    n = int(getattr(evaluator, "num_samples", 0) or 0)
    metric = getattr(evaluator, "metric", None)
    counts = metric == "accuracy" or metric in ("top1", "decision")  # scores that move in steps of 1/n
    if counts and n and sp.max_accuracy_drop is not None and 1.0 / n > sp.max_accuracy_drop:
        msg = (f"[autosearch] warning: {n} evaluation sample(s): one sample changes {evaluator.name} by {1.0 / n:.4f}, more "
               f"than the allowed drop (constraints.max_accuracy_drop {sp.max_accuracy_drop:g}), so the floor cannot tell one "
               f"wrong sample from none; use at least {int(np.ceil(1.0 / sp.max_accuracy_drop)) if sp.max_accuracy_drop > 0 else 'more'} "
               "samples, or allow a larger drop")
        if verbose:
            say(msg)
        else:
            warnings.warn(msg[len("[autosearch] warning: "):], UserWarning, stacklevel=3)


def _check_constraints(sp: SearchSpace, evaluator: Evaluator) -> None:
    """The space's constraints against the range of the evaluator's score (when it is a built-in one): an allowed drop
    as wide as the range makes every candidate feasible, a minimum outside it none (or all)."""
    from autosearch.steps.baseline import metric_range

    rng = metric_range(evaluator)
    if rng is None:
        return
    lo, hi = rng
    where = f" in {sp.source}" if sp.source else ""
    name = getattr(evaluator, "name", "score")
    if sp.max_accuracy_drop is not None and sp.max_accuracy_drop >= hi - lo:
        raise ConfigError(f"'constraints.max_accuracy_drop'{where} is {sp.max_accuracy_drop:g}, the whole range of {name} "
                          f"([{lo:g}, {hi:g}]): every candidate would be feasible; allow a drop below {hi - lo:g}, "
                          "e.g. 0.01, or null for no drop constraint")
    if sp.min_accuracy is not None and not lo <= sp.min_accuracy <= hi:
        raise ConfigError(f"'constraints.min_accuracy'{where} is {sp.min_accuracy:g}, outside the range of {name} "
                          f"([{lo:g}, {hi:g}]): give a score within it, e.g. 0.9, or null")


def _check_calibration(calibration: list[dict[str, np.ndarray]], example: Mapping[str, np.ndarray],
                       model: Any = None) -> None:
    """Calibration samples shaped unlike the model's input would fail every quantized trial: say so now. Only the
    rank and the dimensions the model declares fixed are compared (a free sequence length may differ per sample)."""
    if not calibration:
        return
    for k, feed in enumerate(calibration):
        for name, arr in feed.items():
            a = np.asarray(arr)
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                raise ConfigError(f"calibration sample {k} (input {name!r}) holds NaN or inf: clean the calibration data "
                                  "or drop those samples before searching")
    for name, ref in example.items():
        got = calibration[0].get(name)
        if got is None:
            raise ConfigError(f"the calibration samples lack the model input {name!r} (they have {sorted(calibration[0])}); "
                              "pass calibration= with one array per input")
        want = np.asarray(ref).dtype
        bad = next((k for k, f in enumerate(calibration) if name in f and np.asarray(f[name]).dtype != want), None)
        if bad is not None:
            have = np.asarray(calibration[bad][name]).dtype
            raise ConfigError(f"calibration samples for input {name!r} have dtype {have} (sample {bad}), the model's input "
                              f"takes {want}: convert them with .astype(np.{want.name}) ('calib' in the .npz, or "
                              "calibration=)")
        fixed = _fixed_dims(model, name) if model is not None else dict(enumerate(np.shape(ref)))
        if np.ndim(got) != np.ndim(ref) or any(i > 0 and i < np.ndim(got) and np.shape(got)[i] != d for i, d in fixed.items()):
            raise ConfigError(f"calibration samples for input {name!r} have per-sample shape {list(np.shape(got)[1:])}, "
                              f"the model's example input {list(np.shape(ref)[1:])}: pass calibration= data shaped like "
                              "the evaluation inputs")


def _fixed_dims(model: Any, name: str) -> dict[int, int]:
    """Axis -> size of the dimensions the model declares fixed for input ``name``."""
    from autosearch.model import graph_inputs

    for vi in graph_inputs(model):
        if vi.name == name:
            return {i: d.dim_value for i, d in enumerate(vi.type.tensor_type.shape.dim) if d.dim_value > 0}
    return {}


def _open_study(ctx: SearchContext, *, study_name: str, url: str, cli_spec: Mapping[str, Any] | None,
                worker: int | None = None) -> tuple[optuna.Study, int, optuna.storages.BaseStorage, int]:
    """Create the study, or open it after checking it was made for the same model, space, target and
    objectives; returns it with the number of trials already run, its storage and the sampler's seed (a
    worker's is offset by its index, so no two workers sample the same sequence)."""
    sp, stor = ctx.space, _storage(url)
    ident = ctx.target.identity() if not ctx.also else {**ctx.target.identity(),
                                                        "also": {lbl: t.identity() for lbl, t in ctx.also.items()}}
    meta: dict[str, Any] = {
        "model_fingerprint": ctx.source.fingerprint,
        "space_fingerprint": sp.fingerprint(),
        "target": {**ident, "toolchain": toolchain(ctx.source, ctx.units)},  # what built and timed the candidates
        "objectives": list(sp.objectives),
        "evaluator": ctx.evaluator.name,
        "evaluator_fingerprint": evaluator_fingerprint(ctx.evaluator)[0],
        "space": sp.to_dict(),
        "sampler": {"name": sp.sampler, "seed": sp.seed, "population_size": sp.population_size},
        "units": {k: list(v) for k, v in ctx.units.items()},
    }
    with quiet_optuna():
        try:
            existing = optuna.load_study(study_name=study_name, storage=stor)
        except KeyError:
            existing = None
        if existing is not None:
            old = existing.user_attrs.get(_ATTR)
            if old:
                _check_same(old, meta, study_name, url)
                meta["sampler"] = old["sampler"]
                ctx.units = _recorded_units(ctx, old.get("units"))
                if isinstance(old.get("target"), Mapping) and "toolchain" not in old["target"]:
                    tools = meta["target"]["toolchain"]
                    ctx.say("[autosearch] note: this study did not record the versions that built and timed its "
                            "candidates (made before they were recorded): unknown, so not compared; recorded now ("
                            + ", ".join(f"{k} {v}" for k, v in tools.items()) + "; its cached candidates are measured again)")
                    old = {**old, "target": {**old["target"], "toolchain": tools}}
                    existing.set_user_attr(_ATTR, old)
                if "evaluator_fingerprint" not in old:  # made before fingerprints were recorded: record it now
                    ctx.say("[autosearch] note: this study did not record its evaluator's data, so it cannot be checked; "
                            "recorded now (its cached candidates are measured again)")
                    existing.set_user_attr(_ATTR, {**old, "evaluator_fingerprint": meta["evaluator_fingerprint"]})
        n_before = len(existing.trials) if existing is not None else 0
        # trials queued by the warm start but not run yet (e.g. after `analyze --sensitivity`) are not done
        n_done = sum(t.state != optuna.trial.TrialState.WAITING for t in existing.trials) if existing is not None else 0
        cfg = meta["sampler"]
        seed = (int(cfg["seed"]) + n_before + (1_000_003 * int(worker) if worker is not None else 0)) % 2**32
        sampler = _make_sampler(cfg["name"], seed, int(cfg["population_size"]))
        ost = optuna.create_study(study_name=study_name, storage=stor, directions=[OBJECTIVES[o] for o in sp.objectives],
                                  sampler=sampler, load_if_exists=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ost.set_metric_names(list(sp.objectives))
        if not ost.user_attrs.get(_ATTR):
            ost.set_user_attr(_ATTR, meta)
        if cli_spec is not None and not ost.user_attrs.get("cli_spec"):
            ost.set_user_attr("cli_spec", dict(cli_spec))
    return ost, n_done, stor, seed


def _recorded_units(ctx: SearchContext, recorded: Any) -> Any:
    """The units a resumed study goes on with: a knob that had no unit when the study was made keeps none.

    A study of an ONNX model made before ONNX models could be pruned recorded no prune unit; resumed
    now, the model has some. Its trials and the sampler's history know none of them, so the study goes
    on as it was made (a new study name searches them)."""
    if not isinstance(recorded, Mapping):
        return ctx.units
    gone = [k for k, v in ctx.units.items() if v and k in recorded and not recorded[k]]
    if not gone:
        return ctx.units
    for k in gone:
        ctx.say(f"[autosearch] note: this study was made when knob {k!r} had no unit in this model; it goes on without "
                f"the {len(ctx.units[k])} {k} unit(s) found now (search them under a new study name)")
    return SpaceUnits({k: (() if k in gone else v) for k, v in ctx.units.items()})


def _floor(sp: SearchSpace, base_acc: float) -> float | None:
    from autosearch.strategy import _space_floor

    return _space_floor(sp, base_acc)


def _at(d: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, Mapping) else None  # type: ignore[assignment]
    return d


def _check_same(old: Mapping[str, Any], new: Mapping[str, Any], name: str, url: str) -> None:
    checks = (
        ("model_fingerprint", "a different model", "pass the same model, or give this search a new study name"),
        ("space_fingerprint", "a different search space", "use the space it was created with (see `autosearch front` for it), or a new study name"),
        ("target", "a different target", ("use the same provider, thread count and device, or a new study name "
                                          "(a front timed on another device is another front)")),
        ("objectives", "different objectives", "keep the objectives, or use a new study name"),
        ("evaluator_fingerprint", "different evaluation data or metric (inputs, labels, calibration samples or metric)",
         "use the same data, or a new study name"),
    )
    for key, what, fix in checks:
        if key == "target" and isinstance(old.get(key), Mapping) and isinstance(new.get(key), Mapping):
            diff = same_target(old[key], new[key])
            if diff and diff.startswith("toolchain"):
                was, now = old[key].get("toolchain", {}), new[key].get("toolchain", {})
                changed = ", ".join(f"{k} {was.get(k, 'none')} -> {now.get(k, 'none')}" for k in sorted({*was, *now})
                                    if was.get(k) != now.get(k))
                raise StudyMismatchError(
                    f"study {name!r} in {url} was built and timed with other versions ({changed}): figures of two "
                    f"toolchains never share a front; search under a new study name (e.g. --study {name}-new), or "
                    "reinstall the versions it was made with")
            if diff:
                raise StudyMismatchError(
                    f"study {name!r} in {url} was timed on a different target ({key}.{diff}: "
                    f"{_at(old[key], diff)!r}, now {_at(new[key], diff)!r}); {fix}")
            continue
        if key == "evaluator_fingerprint" and key not in old:
            continue  # a study made before the fingerprint was recorded
        if old.get(key) != new.get(key):
            raise StudyMismatchError(
                f"study {name!r} in {url} was created with {what} ({key}: {old.get(key)!r}, now {new.get(key)!r}); {fix}"
            )
