"""Faults say what happened and waste nothing: a trial the heartbeat fails says which worker, when it last beat and
what it was retried as; a trial of a dead process of this machine is failed and retried at the next start; SIGTERM
stops a search as Ctrl-C does (exit 143); a profiler outage is waited out (announced, bounded) instead of failing
trials; a study refuses to resume under another toolchain. Real processes, SQLite, a real profiler server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from conftest import tiny_onnx

from autosearch.cli import main

SPACE = {
    "name": "faults",
    "knobs": {"bits": {"choices": [32, 8]}},
    "quantization": {"mode": ["static", "dynamic"], "activation_type": ["uint8", "int8"], "per_channel": [True, False],
                     "calibration_samples": 16},
    "sampler": {"name": "random", "seed": 0},
    "strategy": {"analysis": False, "remeasure_front": False},
}
ENV = {**os.environ, "AUTOSEARCH_HEARTBEAT_S": "1", "AUTOSEARCH_GRACE_S": "3", "OMP_NUM_THREADS": "1",
       "PYTHONWARNINGS": "ignore"}

# every candidate measured from the SLOW_FROM-th on (default the first) hangs inside its trial until killed
SLOW = """
import os, sys, time
import autosearch.store as store
from autosearch.cli import main

orig, calls = store.CandidateStore._measure, [0]

def slow(self, cand, floor):
    calls[0] += 1
    if calls[0] >= int(os.environ.get("SLOW_FROM", "1")):
        print("SLOW-TRIAL-STARTED", flush=True)
        time.sleep(600)
    return orig(self, cand, floor)

store.CandidateStore._measure = slow
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture()
def problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    model = tiny_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((48, 16)).astype(np.float32)
    import onnxruntime as ort

    y = ort.InferenceSession(str(model)).run(None, {"x": x})[0].argmax(1)
    np.savez(tmp_path / "val.npz", x=x, y=y)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    (tmp_path / "slow.py").write_text(textwrap.dedent(SLOW))
    monkeypatch.chdir(tmp_path)
    for k in ("AUTOSEARCH_HEARTBEAT_S", "AUTOSEARCH_GRACE_S"):
        monkeypatch.setenv(k, ENV[k])
    return tmp_path


def _args(study: str, n: int, *extra: str) -> list[str]:
    return ["search", "--model", "mlp.onnx", "--data", "val.npz", "--space", "space.yaml", "--study", study,
            "--n-trials", str(n), *extra]


def _until(proc: subprocess.Popen[str], marker: str, seen: list[str]) -> None:
    """Read the process's output until a line holds ``marker`` (fails the test if it ends first)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return
    pytest.fail(f"the process ended before {marker!r}: " + "".join(seen)[-3000:])


def _study(problem: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{problem / 'studies' / f'{name}.db'}")


def test_sigterm_fails_the_running_trial_and_exits_143(problem: Path) -> None:
    """SIGTERM to `autosearch search` inside a trial: that trial FAIL "stopped by SIGTERM", the finished one kept,
    nothing left RUNNING, one line and exit 143. Catches: SIGTERM killing the process outright (the trial left
    RUNNING, no line) or being reported as Ctrl-C."""
    p = subprocess.Popen([sys.executable, "slow.py", *_args("term", 3)], cwd=problem, env={**ENV, "SLOW_FROM": "2"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        _until(p, "SLOW-TRIAL-STARTED", seen)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err[-2000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "autosearch resume term" in lines[0], err
    trials = _study(problem, "term").get_trials(deepcopy=False)
    assert [t.state.name for t in trials if t.state.is_finished()] == ["COMPLETE", "FAIL"], [(t.number, t.state) for t in trials]
    assert trials[-1].user_attrs["fail_reason"] == "stopped by SIGTERM"
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


def test_dead_and_silent_workers_trials_say_why_and_are_retried(problem: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two workers SIGKILLed inside their trials. One is a process of this machine: the next start fails its trial
    at once ("is gone", no wait for the heartbeat). The other's trial is recorded as run on another machine (its
    process cannot be checked from here): the heartbeat fails it after the grace period. Both reasons name the
    worker (host:pid) and the trial they were retried as, which ran with the same parameters; the run says so in
    one line each. Catches: waiting out the grace period for a known-dead process, a heartbeat failure with no
    reason (Optuna's own callback writes none), or a retry that is not the one the reason names."""
    url = f"sqlite:///{problem / 'studies' / 'dead.db'}"
    main(_args("dead", 1))  # the study and its baseline exist before the workers start
    capsys.readouterr()
    workers = [subprocess.Popen([sys.executable, "slow.py", "worker", *_args("dead", 3)[1:], "--storage", url, "--index", str(i)],
                                cwd=problem, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    seen: list[str] = []
    try:
        for w in workers:
            _until(w, "SLOW-TRIAL-STARTED", seen)
        st = _study(problem, "dead")
        running = {t.user_attrs["worker"]["pid"]: t for t in st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
        assert set(running) == {w.pid for w in workers}, running
        here, far = running[workers[0].pid], running[workers[1].pid]
        st._storage.set_trial_user_attr(far._trial_id, "worker", {**far.user_attrs["worker"], "host": "elsewhere"})
        for w in workers:
            os.kill(w.pid, signal.SIGKILL)
            w.wait(timeout=30)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    killed = time.time()
    assert main(["resume", "dead", "--n-trials", "1"]) == 0
    first = capsys.readouterr().out
    by_number = {t.number: t for t in _study(problem, "dead").get_trials(deepcopy=False)}
    assert by_number[here.number].state.name == "FAIL"
    reason = by_number[here.number].user_attrs["fail_reason"]
    assert f"its worker {socket.gethostname()}:{workers[0].pid} is gone" in reason, reason
    time.sleep(max(0.0, killed + 3.5 - time.time()))  # the far worker's trial is stale by now
    assert main(["resume", "dead", "--n-trials", "1"]) == 0
    out = first + capsys.readouterr().out
    trials = _study(problem, "dead").get_trials(deepcopy=False)
    for victim, says in ((here, "is gone"), (far, "stopped beating")):
        dead = trials[victim.number]
        assert dead.state.name == "FAIL", (victim.number, dead.state)
        reason = dead.user_attrs["fail_reason"]
        host = socket.gethostname() if victim is here else "elsewhere"
        assert f"its worker {host}:{victim.user_attrs['worker']['pid']} {says}" in reason and "last beat" in reason, reason
        retry = trials[dead.user_attrs["retried_as"]]
        assert f"retried as trial {retry.number}" in reason
        assert retry.system_attrs["failed_trial"] == victim.number and retry.params == victim.params
        assert retry.state.name == "COMPLETE"
        assert sum(f"[autosearch] trial {victim.number} FAIL: its worker" in ln for ln in out.splitlines()) == 1, out
    assert "grace period 3 s" in trials[far.number].user_attrs["fail_reason"]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]


def test_resume_under_another_toolchain_is_refused(problem: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A study records the versions that built and timed it; resumed with another ONNX Runtime (its recorded version
    edited in the storage) it is refused in one line naming both versions and the fix, exit 2. A study made before
    versions were recorded resumes, with one note, once. Catches: the toolchain left out of the identity (an upgrade's
    figures mixed into the old front), or old studies refused."""
    import onnxruntime as ort

    from autosearch.study import Study

    assert main(_args("tools", 1)) == 0
    st = _study(problem, "tools")
    meta = st.user_attrs["autosearch"]
    assert meta["target"]["toolchain"]["onnxruntime"] == ort.__version__ and "autosearch" in meta["target"]["toolchain"]
    st.set_user_attr("autosearch", {**meta, "target": {**meta["target"], "toolchain": {**meta["target"]["toolchain"],
                                                                                      "onnxruntime": "1.0.0"}}})
    capsys.readouterr()
    assert main(["resume", "tools", "--n-trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"onnxruntime 1.0.0 -> {ort.__version__}" in err[0] and "new study name" in err[0], err
    assert len(Study.load("tools").trials()) == 1  # refused before any trial
    st.set_user_attr("autosearch", {**meta, "target": {k: v for k, v in meta["target"].items() if k != "toolchain"}})
    assert main(["resume", "tools", "--n-trials", "1"]) == 0
    assert capsys.readouterr().out.count("did not record the versions") == 1
    assert main(["resume", "tools", "--n-trials", "1"]) == 0
    assert "did not record the versions" not in capsys.readouterr().out
    assert _study(problem, "tools").user_attrs["autosearch"]["target"]["toolchain"]["onnxruntime"] == ort.__version__


def test_the_store_keys_records_by_toolchain(problem: Path) -> None:
    """A record measured under other versions is not this toolchain's record. Catches: the store's key ignoring the
    toolchain (an upgrade reading the old figures back as its own)."""
    from autosearch import Candidate, LabelledEvaluator
    from autosearch.model import import_model
    from autosearch.store import CandidateStore
    from autosearch.target import Target
    from autosearch.toolchain import toolchain

    src = import_model(str(problem / "mlp.onnx"))
    data = np.load(problem / "val.npz")
    ev = LabelledEvaluator(data["x"], data["y"])
    now = toolchain(src, {})
    assert set(now) == {"onnxruntime", "autosearch"}  # an ONNX model that is not pruned: no torch in its making
    folders = [CandidateStore(problem, src, {}, [], ev, Target(), 1.0, toolchain=tools).folder(Candidate(bits={"fc2": 8}))
               for tools in (now, {**now, "onnxruntime": "1.0.0"}, {})]
    assert folders[0] != folders[1] and folders[2] == folders[0]  # the default is this toolchain


# ---------------------------------------------------------------------------- a profiler that stops answering
def _profiler(tmp: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    from test_remote import _start

    return _start(tmp, *(("--port", str(port)) if port else ()))


def _remote_search(problem: Path, url: str, study: str, n: int, *, attempts: int) -> subprocess.Popen[str]:
    from test_remote import TOKEN

    env = {**ENV, "AUTOSEARCH_PROFILER_TOKEN": TOKEN, "AUTOSEARCH_PROFILER_RETRY_S": "0.5",
           "AUTOSEARCH_PROFILER_ATTEMPTS": str(attempts)}
    return subprocess.Popen([sys.executable, "-m", "autosearch", *_args(study, n, "--profiler", url)], cwd=problem, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_profiler_outage_is_waited_out_not_spent_on_failed_trials(problem: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The profiler stops after the baseline and comes back on the same port: the search announces each wait
    ("not answering; retrying in ... (attempt k of N)"), then runs every trial it was asked for, none FAIL.
    Catches: an outage spent as FAIL trials (each stored as the candidate's failure, never retried), or an
    unannounced wait."""
    srv_dir = tmp_path_factory.mktemp("srv")
    server, url = _profiler(srv_dir)
    port = int(url.rsplit(":", 1)[1])
    p = _remote_search(problem, url, "outage", 3, attempts=60)
    seen: list[str] = []
    try:
        _until(p, "[autosearch] float model:", seen)
        server.terminate()
        server.wait(timeout=30)
        _until(p, f"profiler at {url} not answering; retrying in", seen)
        _until(p, "(attempt 3 of 60)", seen)
        server, _ = _profiler(srv_dir, port)
        out, _ = p.communicate(timeout=120)
    finally:
        for proc in (p, server):
            if proc.poll() is None:
                proc.terminate()
    out = "".join(seen) + out
    assert p.returncode == 0, out[-3000:]
    assert f"profiler at {url} not answering; retrying in 0.5 s (attempt 2 of 60)" in out
    trials = _study(problem, "outage").get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3, out[-3000:]


def test_a_profiler_gone_for_the_whole_wait_stops_the_search_and_resume_runs_the_trial(
        problem: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The profiler stops for good: after its bounded wait the search stops with one line (exit 75), the trial it
    was in FAIL with the reason, the finished trial kept; resumed once the profiler answers, that trial is queued
    again and runs. Catches: a wait that never ends, an outage that kills the study, or its trial never retried."""
    srv_dir = tmp_path_factory.mktemp("srv")
    server, url = _profiler(srv_dir)
    port = int(url.rsplit(":", 1)[1])
    p = _remote_search(problem, url, "gone", 3, attempts=3)
    seen: list[str] = []
    try:
        _until(p, "[  1/", seen)  # one trial finished
        server.terminate()
        server.wait(timeout=30)
        out, _ = p.communicate(timeout=120)
    finally:
        for proc in (p, server):
            if proc.poll() is None:
                proc.terminate()
    out = "".join(seen) + out
    assert p.returncode == 75, out[-3000:]
    stops = [ln for ln in out.splitlines() if ln.startswith("autosearch: stopped:")]
    assert len(stops) == 1 and f"the profiler at {url} did not answer (3 attempts" in stops[0], out[-3000:]
    assert "(attempt 3 of 3)" in out and "Traceback" not in out
    trials = _study(problem, "gone").get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(done) >= 1 and len(failed) == 1 and failed[0].user_attrs["unreachable"] == url, [t.state for t in trials]
    server, _ = _profiler(srv_dir, port)
    try:
        from test_remote import TOKEN

        r = subprocess.run([sys.executable, "-m", "autosearch", "resume", "gone", "--n-trials", "1"], cwd=problem,
                           env={**ENV, "AUTOSEARCH_PROFILER_TOKEN": TOKEN}, capture_output=True, text=True, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    trials = _study(problem, "gone").get_trials(deepcopy=False)
    retry = trials[trials[failed[0].number].user_attrs["retried_as"]]
    assert retry.system_attrs["failed_trial"] == failed[0].number and retry.params == failed[0].params
    assert retry.state.name == "COMPLETE", (r.stdout + r.stderr)[-3000:]
