"""The remote target: a real `autosearch serve-profiler` process on 127.0.0.1, a real search timing through it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import optuna
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


def _start(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = int(extra[extra.index("--port") + 1]) if "--port" in extra else _free_port()
    extra = tuple(e for i, e in enumerate(extra) if e != "--port" and (i == 0 or extra[i - 1] != "--port"))
    env = {**os.environ, "AUTOSEARCH_PROFILER_TOKEN": TOKEN, **(env or {})}
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


def test_token_is_required_on_every_endpoint(server: str, tmp_path: Path) -> None:
    """Catches: an endpoint (a new one, or FastAPI's /docs and /openapi.json) answering without the token."""
    from fastapi.routing import APIRoute

    from autosearch.profiler import create_app

    routes = [(m, r.path) for r in create_app(token=TOKEN).routes for m in sorted(getattr(r, "methods", None) or ["GET"])]
    assert {("GET", "/device"), ("POST", "/profile"), ("POST", "/nodes")} <= set(routes)
    assert all(isinstance(r, APIRoute) for r in create_app(token=TOKEN).routes)  # no docs routes left open
    for method, path in [*routes, ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/no-such-path")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = httpx.request(method, server + path, headers=headers, content=b"x" if method == "POST" else None)
            assert r.status_code == 401 and "token" in r.json()["error"], (method, path, headers, r.status_code)
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
    slow = RemoteTarget(server, token=TOKEN, warmup=1, min_runs=20, max_runs=100_000, max_seconds=1.5, rel_precision=0.0)
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
    for flag in ("--max-threads", "--max-runs", "--max-seconds", "--deadline-s"):  # the limits, each explained
        assert flag in out


def test_serve_profiler_without_a_token_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AUTOSEARCH_PROFILER_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "autosearch", "serve-profiler"], check=False, capture_output=True, text=True, env=env,
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


def test_a_profiler_lost_mid_search_stops_the_search_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real server killed when the first trial is timed: the trial waits for it (2 short attempts here), then
    ends FAIL with the unreachable URL and the search stops with :class:`SearchStopped`; no other trial is spent.

    Catches: the TransportError branch of ``RemoteTarget._request`` raising a plain CandidateError (every remaining
    trial of the budget fails, the search does not stop)."""
    from autosearch.errors import SearchStopped

    monkeypatch.setenv("AUTOSEARCH_PROFILER_RETRY_S", "0.2")
    monkeypatch.setenv("AUTOSEARCH_PROFILER_ATTEMPTS", "2")
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
    with pytest.raises(SearchStopped, match="did not answer"):
        search(str(model), target=Dying(url, token=TOKEN, **FAST), space=SPACE, study_name="d",
               studies_dir=tmp_path / "s", n_trials=3, verbose=False)
    st = optuna.load_study(study_name="d", storage=f"sqlite:///{tmp_path / 's' / 'd.db'}")
    assert [t.state.name for t in st.trials] == ["FAIL", "WAITING"]  # the stopped trial queued again for a resume
    assert st.trials[0].user_attrs["unreachable"] == url


# ---------------------------------------------------------------- a profiler no request can take down
def _endless_onnx(path: Path) -> Path:
    """A model that never ends: a Loop with a trip count of 2**62 (about a microsecond each)."""
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["x_in", "x_in"], ["x_out"])], "body",
        [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("x_in", TensorProto.FLOAT, [1, 16])],
        [vi("cond_out", TensorProto.BOOL, []), vi("x_out", TensorProto.FLOAT, [1, 16])])
    nodes = [helper.make_node("Constant", [], ["M"], value=helper.make_tensor("m", TensorProto.INT64, [], [2**62])),
             helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c0", TensorProto.BOOL, [], [True])),
             helper.make_node("Loop", ["M", "c", "x"], ["y"], body=body)]
    graph = helper.make_graph(nodes, "endless", [vi("x", TensorProto.FLOAT, [1, 16])], [vi("y", TensorProto.FLOAT, [1, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _folders(tmpdir: Path) -> list[Path]:
    from autosearch.profiler import FOLDER_PREFIX

    return sorted(tmpdir.glob(FOLDER_PREFIX + "*"))


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie until reaped


def test_hostile_requests_get_a_reason_or_a_deadline_then_sigterm_stops_the_server(tmp_path: Path) -> None:
    """Catches: a client taking the profiler down (1e6 threads, 1e9 runs, a model that never ends), a slot kept
    after a killed measurement, uploads left on disk, SIGTERM waiting for a measurement or leaving the folder."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    deadline = 3.0
    proc, url = _start(tmp_path, "--deadline-s", str(deadline), "--queue-timeout", "30", env={"TMPDIR": str(tmpdir)})
    try:
        model = tiny_onnx(tmp_path / "m.onnx")
        [folder] = _folders(tmpdir)
        assert folder.name.split("-")[2] == str(proc.pid)  # named with the server's pid
        with pytest.raises(CandidateError, match=r"400.*threads 1000000 is over .*--max-threads"):
            RemoteTarget(url, token=TOKEN, **{**FAST, "threads": 10**6}).profile(model, FEED)
        with pytest.raises(CandidateError, match=r"400.*max_runs 1000000000 is over the limit of 100000 .*--max-runs"):
            RemoteTarget(url, token=TOKEN, **{**FAST, "max_runs": 10**9}).profile(model, FEED)
        with pytest.raises(CandidateError, match=r"400.*max_seconds 1e\+06 is over .*--max-seconds"):
            RemoteTarget(url, token=TOKEN, **{**FAST, "max_seconds": 1e6}).profile(model, FEED)
        endless = _endless_onnx(tmp_path / "endless.onnx")
        t0 = time.monotonic()
        with pytest.raises(CandidateError, match=r"504.*deadline of 3 s.*--deadline-s"):
            RemoteTarget(url, token=TOKEN, **FAST).profile(endless, FEED)
        assert time.monotonic() - t0 < deadline + 2.0
        assert list(folder.iterdir()) == []  # the killed measurement's upload is gone too
        # the slot is free at once: a normal request is answered (the next process was started meanwhile)
        stats = RemoteTarget(url, token=TOKEN, **FAST).profile(model, FEED)
        assert stats.runs >= FAST["min_runs"]
        assert list(folder.iterdir()) == []  # uploads are deleted after use
        # SIGTERM during a measurement: the server stops within seconds, its measuring process and folder gone
        answers: list[object] = []

        def hold() -> None:
            try:
                answers.append(RemoteTarget(url, token=TOKEN, **FAST).profile(endless, FEED))
            except CandidateError as exc:
                answers.append(exc)

        t = threading.Thread(target=hold)
        t.start()
        time.sleep(1.0)
        workers = _children(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert time.monotonic() - t0 < 5.0
        t.join(timeout=10)
        assert answers and isinstance(answers[0], CandidateError)  # answered (503) or cut off, never hung
        assert not folder.exists() and _folders(tmpdir) == []
        time.sleep(0.2)
        assert workers and all(_gone(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_a_client_that_disconnects_frees_the_slot(server: str, tmp_path: Path) -> None:
    """Catches: a measurement going on (holding the device for the 300 s deadline) after its client gave up."""
    endless = _endless_onnx(tmp_path / "endless.onnx")
    with pytest.raises(CandidateError, match="did not answer"):
        RemoteTarget(server, token=TOKEN, timeout_s=1.0, **FAST).profile(endless, FEED)
    model = tiny_onnx(tmp_path / "m.onnx")
    t0 = time.monotonic()
    while True:  # the module's server answers 503 within 0.3 s while the slot is held
        try:
            assert RemoteTarget(server, token=TOKEN, **FAST).profile(model, FEED).runs >= FAST["min_runs"]
            break
        except CandidateError as exc:
            assert "503" in str(exc) and time.monotonic() - t0 < 20, exc
            time.sleep(0.2)


def test_stale_folders_of_dead_servers_are_removed_at_start_and_sigint_removes_its_own(tmp_path: Path) -> None:
    """Catches: upload folders of killed servers piling up; a live server's folder removed; Ctrl-C leaving one."""
    from autosearch.profiler import FOLDER_PREFIX

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmpdir / f"{FOLDER_PREFIX}{dead.pid}-abc"
    (stale / "job-x").mkdir(parents=True)
    (stale / "job-x" / "m0.onnx").write_bytes(b"left by a killed server")
    live = tmpdir / f"{FOLDER_PREFIX}{os.getpid()}-def"  # this test's process: alive
    live.mkdir()
    proc, _ = _start(tmp_path, env={"TMPDIR": str(tmpdir)})
    try:
        assert not stale.exists() and live.exists()
        [own] = [f for f in _folders(tmpdir) if f != live]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
        assert not own.exists() and live.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _external_tensor(name: str) -> onnx.TensorProto:
    t = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [16], np.zeros(16, np.float32))
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "/etc/hostname"
    return t


def test_external_data_in_constants_and_subgraphs_is_refused(server: str, tmp_path: Path) -> None:
    """Catches: a Constant node's tensor attribute, or one in a subgraph two levels down, pointing ONNX Runtime
    at a file on the device (only initializers of the graphs were checked)."""
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info

    def save(graph: onnx.GraphProto, name: str) -> Path:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = tmp_path / name
        path.write_bytes(model.SerializeToString())
        return path

    const = helper.make_node("Constant", [], ["k"], name="k", value=_external_tensor("k0"))
    top = helper.make_graph([const, helper.make_node("Add", ["x", "k"], ["y"])], "g", [vi("x", TensorProto.FLOAT, [1, 16])],
                            [vi("y", TensorProto.FLOAT, [1, 16])])

    def branch(nodes: list, name: str) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [vi(nodes[-1].output[0], TensorProto.FLOAT, [16])])

    inner = helper.make_node("Constant", [], ["deep"], name="deep", value=_external_tensor("deep0"))
    safe = helper.make_node("Constant", [], ["ok"], value=helper.make_tensor("ok0", TensorProto.FLOAT, [16], np.zeros(16)))
    level2 = helper.make_node("If", ["c"], ["z2"], then_branch=branch([inner], "then2"), else_branch=branch([safe], "else2"))
    level1 = helper.make_node("If", ["c"], ["z"], then_branch=branch([level2], "then1"), else_branch=branch([safe], "else1"))
    nested = helper.make_graph([helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c0", TensorProto.BOOL, [], [True])),
                                level1, helper.make_node("Add", ["x", "z"], ["y"])], "g",
                               [vi("x", TensorProto.FLOAT, [1, 16])], [vi("y", TensorProto.FLOAT, [1, 16])])
    target = RemoteTarget(server, token=TOKEN, **FAST)
    with pytest.raises(CandidateError, match=r"400.*'k0' \(attribute 'value' of Constant node 'k'\).*external file"):
        target.profile(save(top, "const.onnx"), FEED)
    with pytest.raises(CandidateError, match=r"400.*'deep0' \(attribute 'value' of Constant node 'deep'\).*external file"):
        target.profile(save(nested, "nested.onnx"), FEED)


def test_credentials_in_the_url_are_never_shown(server: str, tmp_path: Path) -> None:
    """Catches: a password or token in the profiler URL printed in errors, describe()/identity(), repr or labels."""
    from autosearch.remote import redact_url
    from autosearch.target import target_label

    port = server.rsplit(":", 1)[1]
    secret_url = f"http://alice:s3cret-pw@127.0.0.1:{port}/?token=s3cret-tok"
    assert redact_url(secret_url) == f"http://alice:***@127.0.0.1:{port}/?token=***"
    # a live profiler behind a URL with a query token (user:password@ would replace the Bearer header with Basic)
    query_url = f"http://127.0.0.1:{port}/?token=s3cret-tok"
    target = RemoteTarget(query_url, token=TOKEN, **FAST)
    shown = [repr(target), target_label(target), str(target.describe()), str(target.identity()),
             repr(RemoteTarget(secret_url)), target_label(RemoteTarget(secret_url))]
    assert target.describe()["url"] == target.identity()["url"] == redact_url(query_url)
    assert target.profile(tiny_onnx(tmp_path / "m.onnx"), FEED).runs > 0  # the full URL is what is sent
    for bad in (RemoteTarget(secret_url, token="wrong"), RemoteTarget(secret_url.replace(port, str(_free_port())), token=TOKEN)):
        with pytest.raises(ConfigError) as err:
            bad.describe()
        shown.append(str(err.value))
        with pytest.raises((ConfigError, CandidateError)) as cerr:  # a wrong token is a ConfigError, a dead port not
            bad.profile(tmp_path / "m.onnx", FEED)
        shown.append(str(cerr.value))
    with pytest.raises(ConfigError) as err:
        RemoteTarget("ftp://alice:s3cret-pw@h/?token=s3cret-tok")
    shown.append(str(err.value))
    # the study records the redacted URL; rebuilding its target (export) takes the full one from the environment
    from autosearch.remote import target_from_identity

    with pytest.raises(ConfigError, match="AUTOSEARCH_PROFILER_URL") as err:
        target_from_identity(target.identity())
    shown.append(str(err.value))
    os.environ["AUTOSEARCH_PROFILER_URL"] = query_url
    try:
        assert target_from_identity(target.identity()).url == query_url  # type: ignore[attr-defined]
    finally:
        del os.environ["AUTOSEARCH_PROFILER_URL"]
    assert all("s3cret" not in s for s in shown), [s for s in shown if "s3cret" in s]
    assert any("refused the token" in s for s in shown) and any("did not answer" in s for s in shown)


def test_the_cli_stores_no_credential_and_resumes_with_the_url_from_the_environment(server: str, tmp_path: Path) -> None:
    """A search with ``--profiler`` naming a token in its URL: the study's database holds no byte of the secret
    (its spec keeps the redacted URL); ``resume`` refuses in one line without ``AUTOSEARCH_PROFILER_URL`` and runs
    with it; a bad ``--also-target`` naming the URL does not echo it.

    Catches: ``cli_spec=spec`` stored as given (the token at rest in the study, shown by anyone who reads it)."""
    port = server.rsplit(":", 1)[1]
    url = f"http://127.0.0.1:{port}/?token=s3cret-tok"
    tiny_onnx(tmp_path / "m.onnx")
    env = {**os.environ, "AUTOSEARCH_PROFILER_TOKEN": TOKEN}
    env.pop("AUTOSEARCH_PROFILER_URL", None)

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "autosearch", *args], check=False, capture_output=True, text=True,
                              cwd=tmp_path, timeout=300, env={**env, **extra})

    out = cli("search", "--model", "m.onnx", "--space", "quant", "--study", "r", "--n-trials", "1", "--profiler", url)
    assert out.returncode == 0, out.stderr
    db = (tmp_path / "studies" / "r.db").read_bytes()
    assert b"s3cret" not in db and b"token=***" in db
    out = cli("resume", "r", "--n-trials", "1")
    assert out.returncode == 2 and "AUTOSEARCH_PROFILER_URL" in out.stderr and "s3cret" not in out.stderr, out.stderr
    out = cli("resume", "r", "--n-trials", "1", AUTOSEARCH_PROFILER_URL=url)
    assert out.returncode == 0, out.stderr
    out = cli("search", "--model", "m.onnx", "--study", "r2", "--also-target", f"profiler={url},bogus=1")
    assert out.returncode == 2 and "bogus" in out.stderr and "s3cret" not in out.stderr + out.stdout, out.stderr


def test_threads_over_the_cores_are_clamped_with_one_note(tmp_path: Path) -> None:
    """Catches: `autosearch search --threads 100000` spawning threads for minutes with nothing printed."""
    from autosearch.target import cpu_cores

    tiny_onnx(tmp_path / "m.onnx")
    out = subprocess.run([sys.executable, "-m", "autosearch", "search", "--model", "m.onnx", "--space", "quant", "--study", "t",
                          "--n-trials", "1", "--threads", "100000"], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr
    notes = [ln for ln in out.stderr.splitlines() if "100000 threads asked" in ln]
    assert len(notes) == 1 and f"timing with {cpu_cores()}" in notes[0]
    meta = Study.load("t", studies_dir=tmp_path / "studies").meta["target"]
    assert meta["threads"] == cpu_cores()  # the threads actually used
    assert Target(threads=10**6).identity()["threads"] == cpu_cores()
