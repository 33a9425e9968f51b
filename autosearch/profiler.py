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

One measurement at a time (a lock; a request that waits longer than ``queue_timeout_s`` is answered 503
with the reason); uploads over ``max_upload_mb`` are refused (413); models with external data are refused;
uploaded files live in a temporary folder deleted after each request.
"""

# (no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time)

import hmac
import io
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from autosearch.errors import AutosearchError, ConfigError

__all__ = ["create_app", "serve"]

PROTOCOL = 1
_SETTINGS = ("providers", "threads", "graph_optimization_level", "warmup", "min_runs", "max_runs", "max_seconds",
             "rel_precision")


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


def _self_contained(data: bytes) -> Any:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's bad upload
        raise _Refused(400, f"not an ONNX model: {str(exc)[:200]}") from None

    def graphs(g: Any) -> Any:
        yield g
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from graphs(a.g)
                for sub in a.graphs:
                    yield from graphs(sub)

    for g in graphs(model.graph):
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise _Refused(400, f"tensor {t.name!r} keeps its data in an external file: only self-contained "
                                    "models are accepted (save with onnx.save(model, path, save_as_external_data=False))")
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
    models = sorted((k, bytes(v.astype(np.uint8))) for k, v in arrays.items() if k.startswith("__model_"))
    if not models:
        raise _Refused(400, "the body holds no model (__model_0__)")
    feed = {k: v for k, v in arrays.items() if not k.startswith("__")}
    labels = params.get("labels") or [k.strip("_").removeprefix("model_") for k, _ in models]
    if len(labels) != len(models):
        raise _Refused(400, f"{len(labels)} labels for {len(models)} models")
    return params, [(str(lbl), data) for lbl, (_, data) in zip(labels, models)], feed


def _target(params: dict[str, Any]) -> Any:
    from autosearch.target import Target

    kw = {k: params[k] for k in _SETTINGS if k in params}
    if "providers" in kw:
        kw["providers"] = tuple(kw["providers"])
    try:
        return Target(**kw)
    except (ConfigError, TypeError) as exc:
        raise _Refused(400, f"target settings refused: {exc}") from None


def create_app(*, token: str, max_upload_mb: float = 256.0, queue_timeout_s: float = 600.0) -> Any:
    """The FastAPI application (``uvicorn.run(create_app(token=...))`` serves it)."""
    _require("fastapi", "uvicorn")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from autosearch.target import device_info

    if not token:
        raise ConfigError("the profiler needs a token: set AUTOSEARCH_PROFILER_TOKEN or pass --token-file FILE")
    app = FastAPI(title="autosearch profiler", version=str(PROTOCOL))
    lock = threading.Lock()
    limit = int(max_upload_mb * 1e6)
    device = device_info()

    def authorized(request: Request) -> bool:
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    @app.exception_handler(_Refused)
    async def refused(_request: Request, exc: _Refused) -> JSONResponse:
        return JSONResponse({"error": exc.reason}, status_code=exc.status)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if not authorized(request):
            return JSONResponse({"error": "missing or wrong token (Authorization: Bearer <token>)"}, status_code=401)
        size = request.headers.get("content-length")
        if size is not None and int(size) > limit:
            return JSONResponse({"error": f"upload of {int(size) / 1e6:.1f} MB is over the limit of {max_upload_mb:g} MB "
                                          "(serve-profiler --max-upload-mb)"}, status_code=413)
        try:
            return await call_next(request)
        except AutosearchError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)

    async def body_of(request: Request) -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _Refused(413, f"upload over the limit of {max_upload_mb:g} MB (serve-profiler --max-upload-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    def measure(body: bytes, what: str) -> dict[str, Any]:
        params, models, feed = _parse(body)
        target = _target(params)
        for _, data in models:
            _self_contained(data)
        if not lock.acquire(timeout=queue_timeout_s):
            raise _Refused(503, f"the profiler was busy for {queue_timeout_s:g} s (one measurement at a time): retry later")
        try:
            with tempfile.TemporaryDirectory(prefix="as_srv_") as tmp:
                paths = []
                for i, (label, data) in enumerate(models):
                    path = Path(tmp) / f"m{i}.onnx"
                    path.write_bytes(data)
                    paths.append((label, path))
                try:
                    if what == "nodes":
                        return {"nodes": [list(n) for n in target.node_times(paths[0][1], feed, runs=int(params.get("runs", 50)))]}
                    if len(paths) == 1:
                        stats = {paths[0][0]: target.profile(paths[0][1], feed)}
                    else:
                        stats = target.interleaved(paths, feed, rounds=int(params.get("rounds", 5)))
                except AutosearchError as exc:
                    raise _Refused(422, str(exc)) from None
                return {"stats": {k: v.as_dict() for k, v in stats.items()}, "device": device}
        finally:
            lock.release()

    @app.get("/device")
    async def get_device() -> dict[str, Any]:
        return {"device": device, "protocol": PROTOCOL}

    @app.post("/profile")
    async def profile(request: Request) -> dict[str, Any]:
        from anyio import to_thread

        body = await body_of(request)
        return await to_thread.run_sync(measure, body, "profile")

    @app.post("/nodes")
    async def nodes(request: Request) -> dict[str, Any]:
        from anyio import to_thread

        body = await body_of(request)
        return await to_thread.run_sync(measure, body, "nodes")

    return app


def serve(*, host: str = "127.0.0.1", port: int = 8765, token: str, max_upload_mb: float = 256.0,
          queue_timeout_s: float = 600.0, log_level: str = "warning") -> None:
    """Serve the profiler until interrupted."""
    _require("fastapi", "uvicorn")
    import uvicorn

    app = create_app(token=token, max_upload_mb=max_upload_mb, queue_timeout_s=queue_timeout_s)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
