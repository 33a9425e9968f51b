"""The remote target: a real `autosearch serve-profiler` process on 127.0.0.1, a real search timing through it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from conftest import tiny_onnx

from autosearch import Study, search
from autosearch.errors import CandidateError, ConfigError, StudyMismatchError
from autosearch.remote import RemoteTarget
from autosearch.target import LatencyStats, Target, cpu_name

TOKEN = "t0ken-for-tests"
FEED = {"x": np.zeros((1, 16), np.float32)}
FAST = {"warmup": 2, "min_runs": 10, "max_runs": 60, "max_seconds": 0.2}
SPACE = {"knobs": {"bits": [32, 8]}, "quantization": {"mode": ["dynamic"]},
         "strategy": {"analysis": False}, "sampler": {"name": "random"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(tmp: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = int(extra[extra.index("--port") + 1]) if "--port" in extra else _free_port()
    extra = tuple(e for i, e in enumerate(extra) if e != "--port" and (i == 0 or extra[i - 1] != "--port"))
    env = {**os.environ, "AUTOSEARCH_PROFILER_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "autosearch", "serve-profiler", "--port", str(port), *extra],
                            env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/device", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"serve-profiler exited: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("serve-profiler did not start in 30 s")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    proc, url = _start(tmp_path_factory.mktemp("srv"), "--max-upload-mb", "1", "--queue-timeout", "0.3")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_profiles_with_the_local_protocol_and_describes_the_device(server: str, tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    target = RemoteTarget(server, token=TOKEN, **FAST)
    desc = target.describe()
    assert desc["kind"] == "remote" and desc["device"]["cpu"] == cpu_name()
    assert isinstance(desc["device"]["cpu_flags"], list) and "CPUExecutionProvider" in desc["device"]["providers"]
    stats = target.profile(model, FEED)
    assert isinstance(stats, LatencyStats) and stats.runs >= FAST["min_runs"] and 0 < stats.p10_ms <= stats.median_ms
    local = Target(**FAST).profile(model, FEED)
    assert set(stats.as_dict()) == set(local.as_dict())  # the same statistics (the figures: benchmarks/remote.py)
    assert (stats.provider, stats.threads, stats.ort_version, stats.cpu) == (local.provider, local.threads, local.ort_version, local.cpu)
    both = target.interleaved([("a", model), ("b", tiny_onnx(tmp_path / "b.onnx", seed=3))], FEED, rounds=2)
    assert set(both) == {"a", "b"} and all(s.runs >= 2 * 10 for s in both.values())
    nodes = target.node_times(model, FEED, runs=5)
    local = Target(**FAST).node_times(model, FEED, runs=5)
    assert {(n, op) for n, op, _ in nodes} == {(n, op) for n, op, _ in local}  # the same optimized graph, profiled there
    assert all(us >= 0 for _, _, us in nodes)
    # a session made here from a path is timed there (the store passes sessions)
    assert target.profile(target.session(model), FEED).runs >= FAST["min_runs"]


def test_token_is_required(server: str, tmp_path: Path) -> None:
    assert httpx.get(server + "/device").status_code == 401
    r = httpx.get(server + "/device", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "token" in r.json()["error"]
    with pytest.raises(ConfigError, match="refused the token"):
        RemoteTarget(server, token="wrong").describe()


def test_bad_uploads_get_a_json_reason(server: str, tmp_path: Path) -> None:
    big = tmp_path / "big.onnx"
    model = onnx.load(str(tiny_onnx(tmp_path / "m.onnx", hidden=20000)))  # (16 + 10) * 20000 floats: 2 MB > 1 MB
    onnx.save(model, str(big))
    with pytest.raises(CandidateError, match="413.*over the limit of 1 MB"):
        RemoteTarget(server, token=TOKEN, **FAST).profile(big, FEED)
    ext = tmp_path / "ext" / "m.onnx"
    ext.parent.mkdir()
    onnx.save(onnx.load(str(tiny_onnx(tmp_path / "e.onnx"))), str(ext), save_as_external_data=True, size_threshold=0,
              all_tensors_to_one_file=True, location="w.bin")
    # the client sends the graph only: the server refuses what points at an external file
    with pytest.raises(CandidateError, match="400.*external file.*self-contained"):
        RemoteTarget(server, token=TOKEN, **FAST).profile(ext, FEED)
    r = httpx.post(server + "/profile", content=b"not an npz", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400 and "npz" in r.json()["error"]
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage, not a protobuf" * 10)
    with pytest.raises(CandidateError, match="400.*not an ONNX model"):
        RemoteTarget(server, token=TOKEN, **FAST).profile(junk, FEED)


def test_one_measurement_at_a_time_with_a_bounded_wait(server: str, tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    slow = RemoteTarget(server, token=TOKEN, warmup=1, min_runs=10**6, max_runs=10**6, max_seconds=1.5, rel_precision=0.0)
    results: list[object] = []
    t = threading.Thread(target=lambda: results.append(slow.profile(model, FEED)))
    t.start()
    time.sleep(0.6)  # the first measurement holds the slot for ~1.5 s; the queue timeout is 0.3 s
    with pytest.raises(CandidateError, match="503.*busy"):
        RemoteTarget(server, token=TOKEN, **FAST).profile(model, FEED)
    t.join()
    assert isinstance(results[0], LatencyStats)


def test_search_times_on_the_profiler_and_records_the_device(tmp_path: Path) -> None:
    """Trials are timed remotely; the study records the remote identity; a local resume is refused; a dead
    profiler makes FAIL trials with the reason, not a dead study."""
    proc, url = _start(tmp_path)
    try:
        model = tiny_onnx(tmp_path / "m.onnx")
        remote = RemoteTarget(url, token=TOKEN, **FAST)
        kw = {"space": SPACE, "study_name": "r", "studies_dir": tmp_path / "s", "verbose": False}
        study = search(str(model), target=remote, n_trials=3, **kw)
        meta = study.meta["target"]
        assert meta["kind"] == "remote" and meta["url"] == url and meta["device"]["cpu"] == cpu_name()
        assert all(t.state.name == "COMPLETE" for t in study.optuna_study.trials)
        with pytest.raises(StudyMismatchError, match=r"different target \(target.kind: 'remote', now 'local'\)"):
            search(str(model), target=Target(threads=1, **FAST), n_trials=1, **kw)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    # the profiler is gone: the resumed search (same target) fails at its start with the reason, one line
    with pytest.raises(ConfigError, match="did not answer"):
        search(str(model), target=remote, n_trials=1, **kw)
    assert len(Study.load("r", studies_dir=tmp_path / "s").optuna_study.trials) == 3
    # restarted on the same port: the study resumes and keeps every trial
    proc, url2 = _start(tmp_path, "--port", url.rsplit(":", 1)[1])
    try:
        assert url2 == url
        again = search(str(model), target=remote, n_trials=2, **kw)
        states = [t.state.name for t in again.optuna_study.trials]
        assert len(states) == 5 and states.count("COMPLETE") == 5
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_serve_profiler_help_teaches() -> None:
    out = subprocess.run([sys.executable, "-m", "autosearch", "serve-profiler", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "AUTOSEARCH_PROFILER_TOKEN" in out and "--profiler http://" in out and "reverse proxy" in out
    assert "127.0.0.1" in out


def test_serve_profiler_without_a_token_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AUTOSEARCH_PROFILER_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "autosearch", "serve-profiler"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "needs a token" in out.stderr


def test_analysis_profiles_on_the_target() -> None:
    """The latency share is profiled with the target's settings: an unoptimized graph keeps the Add that the
    optimized one fuses into its MatMul."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_onnx(Path(tmp) / "m.onnx")
        fused = {name for name, _, _ in Target(graph_optimization_level="all").node_times(model, FEED, runs=3)}
        plain = {name for name, _, _ in Target(graph_optimization_level="disable").node_times(model, FEED, runs=3)}
        assert "fc1_add" in plain and "fc1_add" not in fused
        from autosearch.analysis import latency_by_unit

        shares = latency_by_unit(str(model), FEED, units=["fc1_matmul", "fc2"], by_module=False,
                                 target=Target(graph_optimization_level="disable"), runs=3)
        assert set(shares) <= {"fc1_matmul", "fc2", "(other)"} and shares.get("fc1_matmul", 0) > 0


def test_a_profiler_lost_mid_search_fails_trials_with_the_reason(tmp_path: Path) -> None:
    proc, url = _start(tmp_path)
    calls: list[int] = []

    class Dying(RemoteTarget):
        """The real client; the real server is killed when the first trial is timed."""

        def profile(self, model, feed):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) == 2:
                proc.kill()
                proc.wait(timeout=10)
            return super().profile(model, feed)

    model = tiny_onnx(tmp_path / "m.onnx")
    study = search(str(model), target=Dying(url, token=TOKEN, **FAST), space=SPACE, study_name="d",
                   studies_dir=tmp_path / "s", n_trials=3, verbose=False)
    df = study.trials()
    assert len(df) == 3 and set(df["state"]) == {"FAIL"}  # the study went on through every trial
    assert df["reason"].str.contains(f"the profiler at {url} did not answer").all()
