"""``autosearch serve-profiler``: time candidates on the device they will run on, for a search elsewhere.

A small HTTP service (FastAPI, served by uvicorn) that measures ONNX models with exactly the local protocol
of :class:`autosearch.target.Target` (warm-up, median until precise, interleaved rounds) on this machine and
returns the same statistics plus the device's description (CPU model, int8 flags, ONNX Runtime version and
providers). FastAPI + uvicorn because they are the well-kept standard for a typed JSON service in Python and
need no web server in front to run; put a reverse proxy (nginx, Caddy) in front for TLS.

Protocol (every request carries ``Authorization: Bearer <token>``; every error is JSON ``{"error": reason}``):

* ``GET /device`` - the device's description;
* ``POST /profile`` - body: an ``.npz`` (``numpy.savez``, no pickles) holding ``__params__`` (UTF-8 JSON:
  the target's settings), ``__model_<i>__`` (the bytes of each ONNX model, self-contained) and the feed
  arrays by input name; answer: ``{"stats": {label: LatencyStats}, "device": ...}``, the models measured in
  interleaved rounds when there are several;
* ``POST /nodes`` - the same body with one model; answer: ``{"nodes": [[name, op, us per run], ...]}``.

What a client may ask is bounded (:class:`Limits`): threads up to the device's cores, runs and seconds per
measurement, a deadline per request; a request over a limit is answered 400 with the limit and the option
that raises it. Each measurement runs in a separate process (one, kept warm between requests) that is killed
at the deadline (answer 504), when the client disconnects, or when the server stops, so no model (an ONNX
``Loop`` that never ends, a graph too heavy for the device) can hold the server. One measurement at a time
(a request that waits longer than ``queue_timeout_s`` is answered 503); uploads over ``max_upload_mb`` are
refused (413); models with external data are refused; uploads live in one folder per server
(``autosearch-profiler-<pid>-*`` in the temporary directory), emptied after each request and removed when
the server stops; folders of servers that died without removing theirs are removed at start.
"""

# (no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time)

import asyncio
import contextlib
import hmac
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autosearch.errors import AutosearchError, ConfigError

__all__ = ["Limits", "create_app", "remove_stale_folders", "serve", "upload_folder"]

PROTOCOL = 1
_SETTINGS = ("providers", "threads", "graph_optimization_level", "warmup", "min_runs", "max_runs", "max_seconds",
             "rel_precision")
FOLDER_PREFIX = "autosearch-profiler-"
_START_TIMEOUT_S = 120.0  # the measuring process imports ONNX Runtime before it is ready
_POLL_S = 0.05
_MIN_ROUND_RUNS = 20  # each interleaved round runs at least this many times (target.round_budget)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the device (each a ``serve-profiler`` option).

    Attributes:
        max_threads: intra-op threads at most (``--max-threads``; default and ceiling: the device's cores).
        max_runs: warm-up, timed or profiled runs of one measurement at most (``--max-runs``).
        max_seconds: the time budget of one measurement at most (``--max-seconds``).
        deadline_s: the longest one request may hold the device; past it the measurement is killed and the
            answer is 504 (``--deadline-s``).
        max_upload_mb: the largest request body (``--max-upload-mb``).
        queue_timeout_s: how long a request waits for the one measurement slot (``--queue-timeout``).
    """

    max_threads: int
    max_runs: int = 100_000
    max_seconds: float = 60.0
    deadline_s: float = 300.0
    max_upload_mb: float = 256.0
    queue_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        from autosearch.target import cpu_cores

        cores = cpu_cores()
        if not 1 <= self.max_threads <= cores:
            raise ConfigError(f"--max-threads {self.max_threads}: this device has {cores} core(s); pass 1 to {cores}")
        for name, flag in (("max_runs", "--max-runs"), ("max_seconds", "--max-seconds"), ("deadline_s", "--deadline-s"),
                           ("max_upload_mb", "--max-upload-mb"), ("queue_timeout_s", "--queue-timeout")):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} {value}: pass a positive number")


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _require(*names: str) -> None:
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ConfigError(f"the profiler service needs {', '.join(missing)}: pip install 'autosearch[remote]'")


# ------------------------------------------------------------------ what a request may hold
def _self_contained(data: bytes) -> Any:
    """The parsed model; refused (400) where any tensor - initializer, sparse initializer, tensor attribute of
    any node (``Constant`` included), in the main graph, a subgraph at any depth or a local function - keeps its
    data in an external file."""
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's bad upload
        raise _Refused(400, f"not an ONNX model: {str(exc)[:200]}") from None

    def refuse(t: Any, where: str) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            raise _Refused(400, f"tensor {t.name!r} ({where}) keeps its data in an external file: only self-contained "
                                "models are accepted (save with onnx.save(model, path, save_as_external_data=False))")

    def sparse(s: Any, where: str) -> None:
        refuse(s.values, where)
        refuse(s.indices, where)

    # iterative walk: a hostile nesting depth cannot overflow the stack
    node_lists: list[Any] = [f.node for f in model.functions]
    graphs = [model.graph]
    while graphs or node_lists:
        if graphs:
            g = graphs.pop()
            for t in g.initializer:
                refuse(t, f"initializer of graph {g.name!r}")
            for s in g.sparse_initializer:
                sparse(s, f"sparse initializer of graph {g.name!r}")
            node_lists.append(g.node)
            continue
        for node in node_lists.pop():
            for a in node.attribute:
                where = f"attribute {a.name!r} of {node.op_type} node {node.name!r}"
                if a.HasField("t"):
                    refuse(a.t, where)
                for t in a.tensors:
                    refuse(t, where)
                if a.HasField("sparse_tensor"):
                    sparse(a.sparse_tensor, where)
                for s in a.sparse_tensors:
                    sparse(s, where)
                if a.HasField("g"):
                    graphs.append(a.g)
                graphs.extend(a.graphs)
    return model


def _parse(body: bytes) -> tuple[dict[str, Any], list[tuple[str, bytes]], dict[str, np.ndarray]]:
    try:
        z = np.load(io.BytesIO(body), allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - a body numpy cannot read is the client's bad upload
        raise _Refused(400, f"the body is not a readable .npz (numpy.savez, no pickles): {str(exc)[:200]}") from None
    raw = arrays.pop("__params__", None)
    if raw is None:
        raise _Refused(400, "the body lacks __params__ (the target's settings as UTF-8 JSON)")
    try:
        params = json.loads(bytes(raw.astype(np.uint8)).decode())
    except ValueError:
        raise _Refused(400, "__params__ is not UTF-8 JSON") from None
    if not isinstance(params, dict):
        raise _Refused(400, "__params__ is not a JSON object")
    models = sorted((k, bytes(v.astype(np.uint8))) for k, v in arrays.items() if k.startswith("__model_"))
    if not models:
        raise _Refused(400, "the body holds no model (__model_0__)")
    feed = {k: v for k, v in arrays.items() if not k.startswith("__")}
    labels = params.get("labels") or [k.strip("_").removeprefix("model_") for k, _ in models]
    if not isinstance(labels, list) or len(labels) != len(models):
        raise _Refused(400, f"labels must be a list of one label per model ({len(models)})")
    return params, [(str(lbl), data) for lbl, (_, data) in zip(labels, models)], feed


def _check_limits(params: dict[str, Any], lim: Limits) -> None:
    """400 with the limit and the option that raises it, for any setting over a limit (or of a wrong type)."""
    from autosearch.target import cpu_cores

    def integer(key: str, low: int) -> int | None:
        v = params.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Refused(400, f"{key} must be an integer, got {str(v)[:40]!r}")
        if v < low:
            raise _Refused(400, f"{key} must be >= {low}, got {v}")
        return v

    threads = integer("threads", 1)
    if threads is not None and threads > lim.max_threads:
        raise _Refused(400, f"threads {threads} is over this profiler's limit of {lim.max_threads} (the device has "
                            f"{cpu_cores()} core(s); serve-profiler --max-threads sets it, up to the cores)")
    for key in ("warmup", "min_runs", "max_runs", "runs"):
        n = integer(key, 0)
        if n is not None and n > lim.max_runs:
            raise _Refused(400, f"{key} {n} is over the limit of {lim.max_runs} runs per measurement "
                                "(serve-profiler --max-runs raises it)")
    rounds = integer("rounds", 1)
    if rounds is not None and rounds * _MIN_ROUND_RUNS > lim.max_runs:
        raise _Refused(400, f"rounds {rounds} means at least {rounds * _MIN_ROUND_RUNS} runs per model, over the limit "
                            f"of {lim.max_runs} runs per measurement (serve-profiler --max-runs raises it)")
    for key in ("max_seconds", "rel_precision"):
        v = params.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise _Refused(400, f"{key} must be a number >= 0, got {str(v)[:40]!r}")
    seconds = params.get("max_seconds")
    if seconds is not None and seconds > lim.max_seconds:
        raise _Refused(400, f"max_seconds {seconds:g} is over the limit of {lim.max_seconds:g} s per measurement "
                            "(serve-profiler --max-seconds raises it)")
    providers = params.get("providers")
    if providers is not None and (not isinstance(providers, list) or not all(isinstance(p, str) for p in providers)):
        raise _Refused(400, "providers must be a list of execution provider names")
    level = params.get("graph_optimization_level")
    if level is not None and not isinstance(level, str):
        raise _Refused(400, "graph_optimization_level must be a string")


def _target(params: dict[str, Any]) -> Any:
    from autosearch.target import Target

    kw = {k: params[k] for k in _SETTINGS if k in params}
    if "providers" in kw:
        kw["providers"] = tuple(kw["providers"])
    try:
        return Target(**kw)
    except (ConfigError, TypeError) as exc:
        raise _Refused(400, f"target settings refused: {exc}") from None


# ------------------------------------------------------------------ upload folders
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_folders(root: str | Path | None = None) -> list[Path]:
    """Remove the upload folders of profilers that are gone (``autosearch-profiler-<pid>-*`` whose pid is no
    live process); returns what was removed."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(FOLDER_PREFIX + "*"):
        pid_text = path.name[len(FOLDER_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or not path.is_dir() or path.is_symlink():
            continue
        pid = int(pid_text)
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def upload_folder() -> Iterator[Path]:
    """This server's upload folder (stale ones of dead servers removed first), removed on every way out."""
    remove_stale_folders()
    path = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _empty(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


# ------------------------------------------------------------------ the measuring process
_WORKER = "import sys; from autosearch.profiler import _worker_main; _worker_main(int(sys.argv[1]))"


def _worker_main(parent: int) -> None:  # pragma: no cover - runs in the child process (covered through the server)
    """The measuring process: one JSON job per line on stdin, one JSON answer per line on stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the libraries print goes to stderr, never into the answers
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the server, even if it is killed
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        return
    import onnxruntime  # noqa: F401 - imported before "ready": the deadline does not pay for it

    out.write(json.dumps({"ready": True}) + "\n")
    while line := sys.stdin.readline():
        try:
            answer: dict[str, Any] = {"ok": _run_job(json.loads(line))}
        except _Refused as exc:
            answer = {"status": exc.status, "error": exc.reason}
        except AutosearchError as exc:
            answer = {"status": 422, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the server answers it; this process goes on
            answer = {"status": 500, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        out.write(json.dumps(answer) + "\n")


def _run_job(job: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - runs in the child process
    params = job["params"]
    target = _target(params)
    with np.load(job["feed"], allow_pickle=False) as z:
        feed = {k: z[k] for k in z.files}
    paths = [(str(label), Path(p)) for label, p in job["models"]]
    if job["what"] == "nodes":
        return {"nodes": [list(n) for n in target.node_times(paths[0][1], feed, runs=int(params.get("runs", 50)))]}
    if len(paths) == 1:
        stats = {paths[0][0]: target.profile(paths[0][1], feed)}
    else:
        stats = target.interleaved(paths, feed, rounds=int(params.get("rounds", 5)))
    return {"stats": {k: v.as_dict() for k, v in stats.items()}}


class _Runner:
    """The one measuring process: started ahead, reused between requests, killed and replaced when a
    measurement overruns its deadline, loses its client or the server stops."""

    def __init__(self, folder: Path, limits: Limits) -> None:
        self.folder = folder
        self.limits = limits
        self.proc: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Future[asyncio.subprocess.Process] | None = None
        self.stopping = False

    async def _spawn(self) -> asyncio.subprocess.Process:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "TMPDIR": str(self.folder),  # whatever the measurement writes lands in the folder
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _WORKER, str(os.getpid()), env=env,
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                    start_new_session=True, limit=64 * 2**20)  # a Ctrl-C is the server's to handle
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), _START_TIMEOUT_S)
            if json.loads(line or b"{}").get("ready") is not True:
                raise ValueError(line[:200])
        except (TimeoutError, ValueError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise _Refused(503, f"the measuring process did not start ({type(exc).__name__}): see the profiler's log") from None
        return proc

    async def worker(self) -> asyncio.subprocess.Process:
        if self.proc is not None and self.proc.returncode is None:
            return self.proc
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._spawn())
        starting = self._starting
        try:
            proc = await asyncio.shield(starting)
        finally:
            if self._starting is starting and starting.done():
                self._starting = None
        self.proc = proc
        return proc

    def prestart(self) -> None:
        """Start the next process now, so the next request finds it ready."""
        if self.stopping:
            return
        task = asyncio.ensure_future(self.worker())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failure shows at the next request

    def kill(self) -> None:
        """Kill the measuring process now (safe from a signal handler)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def close(self) -> None:
        self.stopping = True
        if self._starting is not None:
            with contextlib.suppress(BaseException):
                self.proc = await self._starting
        self.kill()
        if self.proc is not None:
            await self.proc.wait()

    async def run(self, request: Any, what: str, params: dict[str, Any], models: list[tuple[str, bytes]],
                  feed: dict[str, np.ndarray]) -> dict[str, Any]:
        from anyio import to_thread

        if self.stopping:
            raise _Refused(503, "the profiler is stopping")
        proc = await self.worker()  # a process started for this request: its start is not the request's time
        assert proc.stdin is not None and proc.stdout is not None
        job_dir = Path(tempfile.mkdtemp(prefix="job-", dir=self.folder))

        def write() -> dict[str, Any]:
            paths = []
            for i, (label, data) in enumerate(models):
                path = job_dir / f"m{i}.onnx"
                path.write_bytes(data)
                paths.append([label, str(path)])
            np.savez(job_dir / "feed.npz", **feed)  # type: ignore[arg-type]
            return {"what": what, "params": params, "models": paths, "feed": str(job_dir / "feed.npz")}

        read: asyncio.Future[bytes] | None = None
        try:
            job = await to_thread.run_sync(write)
            try:
                proc.stdin.write((json.dumps(job) + "\n").encode())
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                raise _Refused(500, "the measuring process was gone: retry (see the profiler's log)") from None
            loop = asyncio.get_running_loop()
            end = loop.time() + self.limits.deadline_s
            read = asyncio.ensure_future(proc.stdout.readline())
            while True:
                await asyncio.wait({read}, timeout=_POLL_S)
                if read.done():
                    break
                if self.stopping:
                    raise _Refused(503, "the profiler is stopping: measurement stopped")
                if loop.time() >= end:
                    raise _Refused(504, f"the measurement did not end within the deadline of {self.limits.deadline_s:g} s, "
                                        "so it was stopped (serve-profiler --deadline-s raises it; fewer runs, a smaller "
                                        "max_seconds or a lighter model fit in it)")
                if await request.is_disconnected():
                    raise _Refused(499, "the client disconnected: measurement stopped")
            line = read.result()
            if not line:
                code = await proc.wait()
                self.prestart()
                raise _Refused(500, f"the measuring process died (exit code {code}) on this request: see the profiler's log")
            answer = json.loads(line)
        finally:
            if read is None or not read.done():  # stopped before its answer (deadline, client gone, stop, cancel)
                if read is not None:
                    read.cancel()
                self.kill()
                await asyncio.shield(proc.wait())
                self.prestart()
            _empty(self.folder)
        if "ok" not in answer:
            raise _Refused(int(answer.get("status", 500)), str(answer.get("error", answer)))
        return dict(answer["ok"])


# ------------------------------------------------------------------ the application
class _Guard:
    """ASGI middleware in front of every route: the token, then the declared upload size."""

    def __init__(self, app: Any, *, token: str, limits: Limits) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.limits = limits

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            await _send_json(send, 401, "missing or wrong token (Authorization: Bearer <token>)")
            return
        size = headers.get(b"content-length")
        if size is not None:
            if not size.isdigit():
                await _send_json(send, 400, "Content-Length is not a number")
                return
            if int(size) > self.limits.max_upload_mb * 1e6:
                await _send_json(send, 413, f"upload of {int(size) / 1e6:.1f} MB is over the limit of "
                                            f"{self.limits.max_upload_mb:g} MB (serve-profiler --max-upload-mb)")
                return
        await self.app(scope, receive, send)


async def _send_json(send: Any, status: int, reason: str) -> None:
    body = json.dumps({"error": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(*, token: str, limits: Limits | None = None, upload_dir: str | Path | None = None) -> Any:
    """The FastAPI application (``uvicorn.run(create_app(token=...))`` serves it).

    Args:
        token: What every request must carry (``Authorization: Bearer <token>``).
        limits: What one request may ask (default: :class:`Limits` with the device's cores).
        upload_dir: The folder for uploads (default: one made by :func:`upload_folder` for the app's lifetime).
    """
    _require("fastapi", "uvicorn")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from autosearch.target import cpu_cores, device_info

    if not token:
        raise ConfigError("the profiler needs a token: set AUTOSEARCH_PROFILER_TOKEN or pass --token-file FILE")
    lim = limits or Limits(max_threads=cpu_cores())
    device = device_info()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        with contextlib.ExitStack() as stack:
            folder = Path(upload_dir) if upload_dir is not None else stack.enter_context(upload_folder())
            app.state.runner = _Runner(folder, lim)
            app.state.slot = asyncio.Lock()
            app.state.runner.prestart()
            try:
                yield
            finally:
                await app.state.runner.close()

    # no /docs, /redoc, /openapi.json: every route is one of the three below
    app = FastAPI(title="autosearch profiler", version=str(PROTOCOL), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.limits = lim
    app.add_middleware(_Guard, token=token, limits=lim)

    @app.exception_handler(_Refused)
    async def refused(_request: Request, exc: _Refused) -> JSONResponse:
        return JSONResponse({"error": exc.reason}, status_code=exc.status)

    @app.exception_handler(AutosearchError)
    async def failed(_request: Request, exc: AutosearchError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=422)

    async def body_of(request: Request) -> bytes:
        chunks, total, limit = [], 0, lim.max_upload_mb * 1e6
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _Refused(413, f"upload over the limit of {lim.max_upload_mb:g} MB (serve-profiler --max-upload-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def measure(request: Request, what: str) -> dict[str, Any]:
        from anyio import to_thread

        body = await body_of(request)
        params, models, feed = await to_thread.run_sync(_parse, body)
        _check_limits(params, lim)
        _target(params)  # the settings are valid here too: refused before waiting for the slot
        await to_thread.run_sync(lambda: [_self_contained(data) for _, data in models])
        slot: asyncio.Lock = request.app.state.slot
        try:
            await asyncio.wait_for(slot.acquire(), lim.queue_timeout_s)
        except TimeoutError:
            raise _Refused(503, f"the profiler was busy for {lim.queue_timeout_s:g} s (one measurement at a time): "
                                "retry later (serve-profiler --queue-timeout sets the wait)") from None
        try:
            out = await request.app.state.runner.run(request, what, params, models, feed)
        finally:
            slot.release()
        return {**out, "device": device} if what == "profile" else out

    @app.get("/device")
    async def get_device() -> dict[str, Any]:
        return {"device": device, "protocol": PROTOCOL,
                "limits": {k: getattr(lim, k) for k in ("max_threads", "max_runs", "max_seconds", "deadline_s", "max_upload_mb")}}

    @app.post("/profile")
    async def profile(request: Request) -> dict[str, Any]:
        return await measure(request, "profile")

    @app.post("/nodes")
    async def nodes(request: Request) -> dict[str, Any]:
        return await measure(request, "nodes")

    return app


class _Stop(Exception):
    """SIGTERM or SIGINT outside uvicorn's own handling (before it starts, or re-raised after it stops)."""


def serve(*, host: str = "127.0.0.1", port: int = 8765, token: str, limits: Limits | None = None,
          log_level: str = "warning") -> None:
    """Serve the profiler until SIGTERM or SIGINT (either stops it within seconds, a running measurement
    killed); the upload folder is removed on every way out."""
    _require("fastapi", "uvicorn")
    import uvicorn

    def stop(_sig: int, _frame: Any) -> None:
        raise _Stop

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with upload_folder() as folder:
            app = create_app(token=token, limits=limits, upload_dir=folder)

            class Server(uvicorn.Server):
                def handle_exit(self, sig: int, frame: Any) -> None:
                    runner = getattr(app.state, "runner", None)
                    if runner is not None:  # kill the measurement now: its request answers 503 at once
                        runner.stopping = True
                        runner.kill()
                    super().handle_exit(sig, frame)

            server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3))
            server.run()
    except _Stop:
        pass
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
