"""Several worker processes on one study in a real PostgreSQL server (tests/pg.py): no trial lost or
run twice, the warm start run once, one seed per worker, and a worker killed with SIGKILL mid-trial
recovered through the heartbeat (its trial FAIL, queued again with the same parameters, run by another).
The warm-start claim, on SQLite and PostgreSQL: made by exactly one of several racing processes, and taken
over (the analysis run by the taker) when its holder is SIGKILLed, lets its lease lapse or releases it."""

from __future__ import annotations

import os
import signal
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

# a short heartbeat, so a dead worker's trial is stale after 3 s (the default is 10 s / 60 s)
ENV = {**os.environ, "AUTOSEARCH_HEARTBEAT_S": "1", "AUTOSEARCH_GRACE_S": "3", "OMP_NUM_THREADS": "1"}

SPACE = {
    "name": "workers",
    "knobs": {"bits": {"choices": [32, 8]}},
    "quantization": {"mode": ["static", "dynamic"], "activation_type": ["uint8", "int8"], "per_channel": [True, False],
                     "calibration_samples": 16},
    "constraints": {"max_accuracy_drop": 0.05},
    "sampler": {"name": "random", "seed": 0},
    "strategy": {"analysis": False, "remeasure_front": False},
}


@pytest.fixture()
def problem(tmp_path: Path) -> Path:
    model = tiny_onnx(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    import onnxruntime as ort

    y = ort.InferenceSession(str(model)).run(None, {"x": x})[0].argmax(1)
    np.savez(tmp_path / "val.npz", x=x, y=y)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return tmp_path


def _worker(cwd: Path, study: str, url: str, n: int, index: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "autosearch", "worker", "--index", str(index), "--model", "mlp.onnx", "--data", "val.npz",
         "--space", "space.yaml", "--study", study, "--storage", url, "--n-trials", str(n)],
        cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen[str], timeout: float = 240) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


def test_four_workers_share_one_study(problem: Path, postgres_url: str) -> None:
    procs = [_worker(problem, "four", postgres_url, 5, i) for i in range(4)]
    outs = [_finish(p) for p in procs]
    st = optuna.load_study(study_name="four", storage=postgres_url)
    trials = st.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    assert len(finished) == 20 and len({t.number for t in trials}) == len(trials)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in finished), [(t.number, t.state) for t in finished]
    # the warm start ran once: one claim, one worker that says it ran it, its queued trials each run once
    ws = st.user_attrs["warm_started"]
    assert ws["by"] == st.user_attrs["warm_start_claim"]
    assert sum("ran the warm start" in o for o in outs) == 1
    assert ws["queued"] >= 2  # float and uniform int8
    params = [tuple(sorted(t.params.items())) for t in finished if "fixed_params" in t.system_attrs]
    assert len(params) == len(set(params)) == ws["queued"]
    # four workers, four seeds, each recorded with its trials
    workers = {t.user_attrs["worker"]["id"]: t.user_attrs["worker"]["seed"] for t in finished}
    assert len(workers) == 4 and len(set(workers.values())) == 4
    # the shared candidate store: every finished trial's model is a whole ONNX file
    import onnx

    for t in finished:
        onnx.checker.check_model(onnx.load(str(problem / t.user_attrs["onnx_path"])))
    assert not list((problem / "studies" / "four" / "candidates").glob("*/.build-*"))


SLOW = """
import sys, time
import autosearch.store as store
from autosearch.cli import main

def slow(self, cand, floor):
    print("SLOW-TRIAL-STARTED", flush=True)
    time.sleep(600)

store.CandidateStore._measure = slow
sys.exit(main(sys.argv[1:]))
"""


def test_killed_worker_trial_fails_and_is_retried(problem: Path, postgres_url: str) -> None:
    (problem / "slow.py").write_text(textwrap.dedent(SLOW))
    args = ["worker", "--model", "mlp.onnx", "--data", "val.npz", "--space", "space.yaml", "--study", "kill",
            "--storage", postgres_url]
    doomed = subprocess.Popen([sys.executable, "slow.py", *args, "--index", "0", "--n-trials", "3"], cwd=problem, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    other = _worker(problem, "kill", postgres_url, 3, 1)
    try:
        assert doomed.stdout is not None
        for line in doomed.stdout:  # the doomed worker is inside a trial (its heartbeat thread beating)
            if "SLOW-TRIAL-STARTED" in line:
                break
        else:
            pytest.fail("the slow worker ended before its trial started")
        st = optuna.load_study(study_name="kill", storage=postgres_url)
        running = [t for t in st.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING
                   and t.user_attrs.get("worker", {}).get("id", "").endswith("#0")]
        assert len(running) == 1
        victim = running[0]
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(timeout=30)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    _finish(other)
    time.sleep(4)  # past the grace period: the next trial started marks the victim FAIL and queues it again
    _finish(_worker(problem, "kill", postgres_url, 2, 2))
    st = optuna.load_study(study_name="kill", storage=postgres_url)
    trials = st.get_trials(deepcopy=False)
    dead = trials[victim.number]
    assert dead.state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    # nothing else lost: the two live workers' 5 trials all finished, the victim the only failure (the doomed worker
    # may have finished a trial first, from a candidate the other worker had measured: the store's cache needs no _measure)
    live = [t for t in trials if not t.user_attrs.get("worker", {}).get("id", "").endswith("#0")]
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in live) == 5
    assert [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL] == [victim.number]
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]


def test_worker_bad_storage_is_one_line(problem: Path) -> None:
    for url, says in (("postgresql+nosuchdriver://u@h/db", "unknown database"),
                      ("postgresql+psycopg://postgres@127.0.0.1:1/none", "cannot open the study storage")):
        p = _worker(problem, "bad", url, 1, 0)
        out = _finish_rc(p)
        lines = [ln for ln in out.strip().splitlines() if ln.startswith("autosearch: error:")]
        assert len(lines) == 1 and says in lines[0] and "Traceback" not in out, out[-2000:]


def _finish_rc(p: subprocess.Popen[str]) -> str:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2, out[-2000:]
    return out


def test_the_analysis_runs_once_for_all_workers(problem: Path, postgres_url: str) -> None:
    (problem / "space.yaml").write_text(yaml.safe_dump({**SPACE, "strategy": {"analysis": True, "remeasure_front": False}}))
    procs = [_worker(problem, "analysed", postgres_url, 2, i) for i in range(2)]
    outs = [_finish(p) for p in procs]
    assert sum("[autosearch] analysis:" in o for o in outs) == 1, [o[-1500:] for o in outs]
    st = optuna.load_study(study_name="analysed", storage=postgres_url)
    assert st.user_attrs["analysis"] and st.user_attrs["warm_started"]["by"] == st.user_attrs["warm_start_claim"]
    assert sum(t.state.is_finished() for t in st.trials) == 4


# ---------------------------------------------------------------------------- the warm-start claim and its lease
@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A storage URL of each kind workers share: a SQLite file (one machine) and the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'claims.db'}"
    return str(request.getfixturevalue("postgres_url"))


RACE = """
import sys, time
from pathlib import Path
from autosearch.claim import try_claim
from autosearch.study import _storage

stor = _storage(sys.argv[1])
stor.get_all_studies()  # connected
go = Path(sys.argv[3])
(go.parent / f"ready-{sys.argv[4]}").touch()
while not go.exists():
    time.sleep(0.002)
print("WON" if try_claim(stor, sys.argv[2], 1, sys.argv[4]) is not None else "LOST", flush=True)
"""


def test_exactly_one_process_makes_a_claim(any_url: str, tmp_path: Path) -> None:
    """Four processes, connected and released together, try to make the same claim: one makes it, three are told it exists, and the
    claim names the winner. Catches: a claim test that is not atomic (e.g. "read the attribute, then set it"
    instead of creating the claim study, which several processes then all win)."""
    from autosearch.study import _storage

    name = f"race-{tmp_path.name}"
    _storage(any_url)  # Optuna's tables made before the race (as the study is, before any worker claims)
    (tmp_path / "race.py").write_text(RACE)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "race.py"), any_url, name, str(go), f"p{i}"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < 4 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()  # all four connected and polling: they try at once
    outs = [p.communicate(timeout=120)[0].strip().splitlines()[-1:] for p in procs]
    outs = [o[0] if o else "" for o in outs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(outs) == ["LOST"] * 3 + ["WON"], outs
    from autosearch.claim import latest_claim

    stor = _storage(any_url)
    gen, cid = latest_claim(stor, name)
    assert gen == 1 and cid is not None
    assert stor.get_study_user_attrs(cid)["owner"] == f"p{outs.index('WON')}"


def test_a_claim_whose_lease_lapses_is_taken_over(tmp_path: Path) -> None:
    """A holder on another machine (its process cannot be checked from here) keeps the claim while its beat
    advances, loses it once the beat stops for the lease time, and a released claim is taken over at once.
    Catches: the lease never lapsing (a dead remote holder blocks the others until their wait ends), or lapsing
    while the holder still beats (the analysis run twice)."""
    import threading

    from autosearch.claim import Lease, acquire, latest_claim, try_claim
    from autosearch.study import _storage

    stor = _storage(f"sqlite:///{tmp_path / 'lease.db'}")
    cid = try_claim(stor, "lease", 1, "far:1")
    assert cid is not None
    stor.set_study_user_attr(cid, "host", "a-machine-elsewhere")
    said: list[str] = []
    stop = threading.Event()

    def beat() -> None:
        n = 0
        while not stop.wait(0.2):
            n += 1
            stor.set_study_user_attr(cid, "beat", n)

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        got = acquire(stor, "lease", "near:2", done=lambda: False, say=said.append, lease_s=3.0, beat_s=0.2, wait_s=6.0)
    finally:
        stop.set()
        beating.join()
    assert got is None and latest_claim(stor, "lease")[0] == 1, said  # waited its limit: the holder was alive
    assert not any("took over" in s for s in said)
    got = acquire(stor, "lease", "near:2", done=lambda: False, say=said.append, lease_s=3.0, beat_s=0.2, wait_s=60.0)
    assert isinstance(got, Lease) and got.generation == 2 and "no beat of its lease" in said[-1], said
    assert stor.get_study_user_attrs(got.claim_id)["owner"] == "near:2"
    with pytest.raises(RuntimeError), got:
        raise RuntimeError("the analysis failed")
    third = acquire(stor, "lease", "third:3", done=lambda: False, say=said.append, lease_s=600.0, beat_s=0.2, wait_s=60.0)
    assert third is not None and third.generation == 3 and "it released the claim" in said[-1]


HOLDS_THE_CLAIM = """
import sys, time
import autosearch.steps.warm_start as ws
from autosearch.cli import main

def stuck(*args, **kwargs):
    print("ANALYSIS-STARTED", flush=True)
    time.sleep(600)

ws.analyze = stuck
sys.exit(main(sys.argv[1:]))
"""


def test_a_worker_killed_holding_the_claim_is_taken_over(problem: Path, any_url: str) -> None:
    """A worker SIGKILLed inside the analysis (holding the warm-start claim) is taken over by the worker waiting
    for it, which runs the analysis itself, once, and records the warm start (claim 2, by itself); its trials then
    run. Catches: a waiter that only waits for ``warm_started`` (it sits out its whole wait, then samples without a
    warm start: no "took over", no analysis)."""
    (problem / "space.yaml").write_text(yaml.safe_dump({**SPACE, "strategy": {"analysis": True, "remeasure_front": False}}))
    (problem / "holds.py").write_text(textwrap.dedent(HOLDS_THE_CLAIM))
    study = f"takeover-{problem.name}"
    env = {**ENV, "AUTOSEARCH_WARM_WAIT_S": "120"}
    args = ["worker", "--model", "mlp.onnx", "--data", "val.npz", "--space", "space.yaml", "--study", study,
            "--storage", any_url, "--n-trials", "2"]
    doomed = subprocess.Popen([sys.executable, "holds.py", *args, "--index", "0"], cwd=problem, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    waiter: subprocess.Popen[str] | None = None
    before: list[str] = []
    try:
        assert doomed.stdout is not None
        for line in doomed.stdout:
            before.append(line)
            if "ANALYSIS-STARTED" in line:
                break
        else:
            pytest.fail("the first worker ended before its analysis: " + "".join(before)[-2000:])
        waiter = subprocess.Popen([sys.executable, "-m", "autosearch", *args, "--index", "1"], cwd=problem, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert waiter.stdout is not None
        for line in waiter.stdout:  # the second worker waits on the live holder
            before.append(line)
            if "waiting for it" in line:
                break
        else:
            pytest.fail("the second worker did not wait for the claim: " + "".join(before)[-2000:])
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(timeout=30)
        out = _finish(waiter)
    finally:
        for p in (doomed, waiter):
            if p is not None and p.poll() is None:
                p.kill()
    assert "took over the warm start" in out, out[-3000:]
    assert out.count("[autosearch] analysis:") == 1, out[-3000:]  # the analysis ran again here, once
    st = optuna.load_study(study_name=study, storage=any_url)
    ws = st.user_attrs["warm_started"]
    assert ws["by"].endswith("#1") and ws["claim"] == 2 and ws["by"] == st.user_attrs["warm_start_claim"]
    assert st.user_attrs["analysis"]
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in st.trials) == 2


def test_a_trial_killed_before_its_heartbeat_started_is_marked_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna makes a trial (and samples it) before its heartbeat thread starts, and fail_stale_trials skips a trial
    with no heartbeat: a process killed in that window left it RUNNING forever (benchmarks/faults.py saw 2 in 10 kills).
    The next search marks such a trial FAIL with the reason; a RUNNING trial whose objective started (it has
    attributes) is left to the heartbeat. Catches: dropping _fail_unstarted, or failing live trials too."""
    from autosearch import search
    from autosearch.target import Target

    monkeypatch.setenv("AUTOSEARCH_HEARTBEAT_S", "1")
    monkeypatch.setenv("AUTOSEARCH_GRACE_S", "1")
    model = tiny_onnx(tmp_path / "m.onnx")
    url = f"sqlite:///{tmp_path / 'o.db'}"
    kw = {"space": {"knobs": {"bits": [32, 8]}, "strategy": {"analysis": False, "remeasure_front": False},
                    "sampler": {"name": "random"}},
          "target": Target(threads=1, warmup=1, min_runs=3, max_runs=5, max_seconds=0.05), "study_name": "o",
          "storage": url, "studies_dir": tmp_path / "s", "verbose": False}
    search(str(model), n_trials=1, **kw)
    stor = optuna.storages.get_storage(url)
    sid = stor.get_study_id_from_name("o")
    orphan = stor.create_new_trial(sid)  # RUNNING, never beat, no attributes: what a kill inside ask() leaves
    live = stor.create_new_trial(sid)
    stor.set_trial_user_attr(live, "candidate", {})  # its objective started: the heartbeat's business, not this
    time.sleep(1.5)
    search(str(model), n_trials=1, **kw)
    st = optuna.load_study(study_name="o", storage=url)
    by_id = {t._trial_id: t for t in st.trials}
    assert by_id[orphan].state.name == "FAIL" and "before the trial started" in by_id[orphan].user_attrs["fail_reason"]
    assert by_id[live].state.name == "RUNNING"
