"""Honest figures: speedups against a float timing taken near each trial, the front recomputed on the
interleaved re-measure, a `loaded` flag relative to the machine before the run, int4 compute type searched."""

from __future__ import annotations

from pathlib import Path

import onnx
import optuna
from conftest import tiny_onnx

from autosearch import Candidate, Study, search
from autosearch.build import build_candidate
from autosearch.model import import_model
from autosearch.target import Target

FAST = {"warmup": 2, "min_runs": 10, "max_runs": 60, "max_seconds": 0.2}


def test_each_speedup_divides_by_a_float_timing_taken_near_it(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    space = {"knobs": {"bits": [32, 8]}, "quantization": {"mode": ["dynamic", "static"], "per_channel": [True, False],
             "reduce_range": [False, True]}, "strategy": {"analysis": False, "remeasure_front": False},
             "sampler": {"name": "random"}}
    study = search(str(model), space=space, target=Target(threads=1, **FAST), study_name="clock",
                   studies_dir=tmp_path / "s", n_trials=12, verbose=False)
    done = [t for t in study.optuna_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    fresh = [t for t in done if not t.user_attrs.get("cached")]
    assert len(fresh) >= 6
    for t in done:  # by construction: the float figure the trial divides by is the one it records
        assert t.user_attrs["speedup"] == t.user_attrs["baseline_latency_ms"] / t.user_attrs["latency_ms"]
    bases = {t.user_attrs["baseline_latency_ms"] for t in fresh}
    assert len(bases) >= 2, "the float model was re-timed during the search"
    assert study.baseline["latency_ms"] in bases  # the first trials divide by the baseline itself


def _study(rows: list[tuple[float, float, float | None]], load_before: float | None = None, loads: list[float] | None = None) -> Study:
    ost = optuna.create_study(directions=["maximize", "minimize"])
    ost.set_user_attr("autosearch", {"objectives": ["accuracy", "latency_ms"], "units": {"bits": ["a"]}})
    base: dict = {"accuracy": 1.0, "latency_ms": 10.0}
    if load_before is not None:
        base["load_before"] = load_before
    ost.set_user_attr("baseline", base)
    rem = {}
    for i, (acc, lat, again) in enumerate(rows):
        ua = {"accuracy": acc, "latency_ms": lat, "feasible": True, "summary": "x", "candidate": {},
              "latency": {"load_avg": (loads or [0.0] * len(rows))[i]}}
        ost.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, values=[acc, lat], user_attrs=ua))
        if again is not None:
            rem[str(i)] = {"latency_ms": again, "speedup": 10.0 / again}
    if rem:
        ost.set_user_attr("front_remeasured", {"float_ms": 10.0, "trials": rem})
    return Study(ost)


def test_the_front_is_recomputed_on_the_remeasured_latencies() -> None:
    # trial 1 looked faster than trial 0 at the same accuracy's neighbour, but re-timed interleaved it is slower
    # than trial 0 and less accurate: dominated
    st = _study([(0.99, 5.0, 4.0), (0.98, 4.5, 4.6), (0.90, 2.0, 2.0)])
    assert list(st.front(remeasured=False)["trial"]) == [2, 1, 0]
    assert list(st.front()["trial"]) == [2, 0]
    assert list(_study([(0.99, 5.0, None), (0.98, 4.5, None)]).front()["trial"]) == [1, 0]  # nothing re-measured


def test_loaded_means_busier_than_before_the_run() -> None:
    st = _study([(0.9, 1.0, None), (0.8, 0.5, None)], load_before=3.0, loads=[3.5, 4.5])
    assert list(st.trials()["loaded"]) == [False, True]  # 3.5 on a machine at 3.0 is this search; 4.5 is more


def test_int4_accuracy_level_reaches_matmulnbits(tmp_path: Path) -> None:
    src = import_model(str(tiny_onnx(tmp_path / "m.onnx", hidden=64)))
    for level in (0, 4):
        cand = Candidate(bits={"fc1_matmul": 4}, quant={"mode": "static", "int4_block_size": 16, "int4_accuracy_level": level})
        built = build_candidate(src, cand, tmp_path / f"l{level}", bits_units=["fc1_matmul", "fc2"], calibration=[])
        nbits = [n for n in onnx.load(str(built.path)).graph.node if n.op_type == "MatMulNBits"]
        got = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
        assert len(nbits) == 1 and got.get("accuracy_level", 0) == level


def test_int4_accuracy_level_is_a_searched_parameter(tmp_path: Path) -> None:
    from autosearch.candidate import SpaceUnits, sample_candidate
    from autosearch.space import SearchSpace

    space = SearchSpace.from_dict({"knobs": {"bits": [32, 4]}, "quantization": {"int4_accuracy_level": [0, 4]}})
    units = SpaceUnits(bits=("fc1_matmul", "fc2"))
    st = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        trial = st.ask()
        cand = sample_candidate(trial, space, units)
        if 4 in cand.bits.values():
            seen.add(cand.quant["int4_accuracy_level"])
            assert trial.params["quant.int4_accuracy_level"] == cand.quant["int4_accuracy_level"]
        st.tell(trial, 0.0)
    assert seen == {0, 4}


def test_two_targets_in_one_study_give_per_target_latencies_and_fronts(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    space = {"knobs": {"bits": [32, 8]}, "quantization": {"mode": ["dynamic"], "per_channel": [True, False]},
             "strategy": {"analysis": False}, "sampler": {"name": "random"}}
    one, two = Target(threads=1, **FAST), Target(threads=2, **FAST)
    study = search(str(model), space=space, target=[one, two], study_name="two", studies_dir=tmp_path / "s",
                   n_trials=4, verbose=False)
    assert study.targets() == ["cpu-2t"]
    df = study.trials(include_failed=False)
    assert len(df) == 4 and df["latency_ms@cpu-2t"].gt(0).all() and (df["latency_ms@cpu-2t"] != df["latency_ms"]).all()
    assert "latency_ms@cpu-2t" in study.baseline
    for t in study.optuna_study.trials:  # each further target's speedup divides by its own float reading near the trial
        if t.state.name == "COMPLETE":
            assert t.user_attrs["speedup@cpu-2t"] > 0
    front2 = study.front(target="cpu-2t")
    # the second front is the Pareto set of (accuracy, latency on 2 threads)
    pts = df[["accuracy", "latency_ms@cpu-2t"]].to_numpy()
    for row in front2.itertuples():
        assert not any(a >= row.accuracy and lat <= row.latency_ms and (a > row.accuracy or lat < row.latency_ms)
                       for a, lat in pts)
    assert (front2["latency_ms"] == front2["latency_ms@cpu-2t"]).all()
    assert study.meta["target"]["also"]["cpu-2t"]["threads"] == 2
    from autosearch.dashboard import dashboard_data, figures

    data = dashboard_data(study)
    assert list(data.target_fronts) == ["cpu-2t"] and "targets" in figures(data)
    assert [t.name for t in figures(data)["targets"].data] == ["first target", "cpu-2t"]
    report = study.export(tmp_path / "exp", pick=int(front2["trial"][0]))
    m = report.measured
    assert m["latency_ms@cpu-2t"] > 0 and m["speedup@cpu-2t"] > 0  # re-timed on the second target too
    assert report.study_figures["latency_ms@cpu-2t"] == front2["latency_ms@cpu-2t"][0]
    assert "on cpu-2t: " in report.table()
    # resuming with only the first target is another set of targets: refused
    import pytest

    from autosearch.errors import StudyMismatchError

    with pytest.raises(StudyMismatchError, match="target"):
        search(str(model), space=space, target=[one], study_name="two", studies_dir=tmp_path / "s", n_trials=1, verbose=False)


def test_cli_also_target_and_front_per_target(tmp_path: Path) -> None:
    import subprocess
    import sys

    tiny_onnx(tmp_path / "m.onnx")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "autosearch", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, check=False)

    out = cli("search", "--model", "m.onnx", "--study", "t", "--n-trials", "2", "--no-analysis", "--also-target", "threads=2")
    assert out.returncode == 0, out.stderr
    out = cli("front", "t", "--target", "cpu-2t")
    assert out.returncode == 0 and "front of study 't' on cpu-2t" in out.stdout and "speedup@cpu-2t" in out.stdout
    out = cli("front", "t", "--target", "cpu-4t")
    assert out.returncode == 2 and "was not timed on 'cpu-4t'; its targets: cpu-2t" in out.stderr
    out = cli("search", "--model", "m.onnx", "--study", "u", "--also-target", "thread=2")
    assert out.returncode == 2 and "'thread=2' is not threads=N, provider=NAME or profiler=URL" in out.stderr


def test_progress_counts_this_runs_trials_after_the_earlier_ones(tmp_path: Path, capsys) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    space = {"knobs": {"bits": [32, 8]}, "quantization": {"mode": ["dynamic"], "per_channel": [True, False]},
             "strategy": {"analysis": False, "remeasure_front": False}, "sampler": {"name": "random"}}
    kw = {"space": space, "target": Target(threads=1, **FAST), "study_name": "p", "studies_dir": tmp_path / "s"}
    search(str(model), n_trials=3, **kw)
    capsys.readouterr()
    search(str(model), n_trials=2, **kw)
    heads = [line.split("]")[0] + "]" for line in capsys.readouterr().out.splitlines() if line.startswith("[ ")]
    assert heads == ["[  4/5]", "[  5/5]"]


def test_ctrl_c_leaves_a_failed_trial_with_its_reason_and_names_the_study(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    tiny_onnx(tmp_path / "m.onnx", hidden=6000)
    proc = subprocess.Popen([sys.executable, "-m", "autosearch", "search", "--model", "m.onnx", "--study", "sig",
                             "--n-trials", "30", "--no-analysis"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"sqlite:///{tmp_path / 'studies' / 'sig.db'}"
    running = None
    deadline = time.time() + 120
    while running is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            st = optuna.load_study(study_name="sig", storage=url)
        except Exception:  # noqa: BLE001 - not created yet
            continue
        running = next((t.number for t in st.get_trials(deepcopy=False)  # a trial inside its build or measurement
                        if t.state.name == "RUNNING" and t.number >= 1 and "onnx_path" in t.user_attrs), None)
    assert running is not None, "no trial was seen running"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "resume with `autosearch resume sig`" in err, (proc.returncode, err[-3000:])
    t = optuna.load_study(study_name="sig", storage=url).trials[running]
    assert t.state.name == "FAIL" and "interrupted (Ctrl-C)" in t.user_attrs["fail_reason"]
    assert Path(t.user_attrs["onnx_path"]).is_absolute()
