"""The dashboard: its data without rendering, then the HTML in a real headless Chromium.

The browser test needs Debian's ``chromium``; tests/browser.py INSTALLS IT with apt-get when it is
missing (root only; AUTOSEARCH_NO_APT=1 skips instead).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import browser
import numpy as np
import optuna
import pytest

from autosearch import Study, Target, search
from autosearch.dashboard import dashboard_data, figures, hypervolume_2d, write_dashboard

SPACE = {"knobs": {"bits": {"choices": [32, 8]}}, "quantization": {"mode": ["static"], "activation_type": ["uint8", "int8"]},
         "strategy": {"analysis": False, "remeasure_front": False}}  # keep the test fast
C, F, P = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED


def handmade_study(rows: list[dict[str, Any]], *, analysis: Any = None) -> Study:
    """An in-memory study with given trials (no model needed)."""
    ost = optuna.create_study(directions=["maximize", "minimize"])
    ost.set_user_attr("autosearch", {"objectives": ["accuracy", "latency_ms"], "evaluator": "accuracy",
                                     "units": {"bits": ["conv1", "conv2", "fc"], "prune": ["conv1"], "rank": []},
                                     "space": {"knobs": {"bits": {"choices": [32, 8]}, "prune": {"choices": [0.0, 0.5]}}},
                                     "target": {"providers": ["CPUExecutionProvider"], "threads": 1}})
    ost.set_user_attr("baseline", {"accuracy": 0.95, "latency_ms": 10.0, "size_mb": 4.0})
    if analysis is not None:
        ost.set_user_attr("analysis", analysis)
    for r in rows:
        state = r.get("state", C)
        ua: dict[str, Any] = {"summary": r.get("summary", "cfg"), "candidate": r.get("cand", {})}
        if state == C:
            ua.update(accuracy=r["acc"], latency_ms=r["lat"], size_mb=r.get("size", 1.0), feasible=r.get("feasible", True),
                      accuracy_drop=0.95 - r["acc"], speedup=10.0 / r["lat"])
        elif state == F:
            ua["fail_reason"] = r["reason"]
        else:
            ua["accuracy"] = r["acc"]
        ost.add_trial(optuna.trial.create_trial(state=state, values=[r["acc"], r["lat"]] if state == C else None, user_attrs=ua))
    return Study(ost)


ROWS = [
    {"acc": 0.95, "lat": 10.0, "size": 4.0},                                            # 0 front (float)
    {"acc": 0.94, "lat": 4.0, "size": 1.0, "cand": {"bits": {"conv1": 8, "fc": 8}, "quant": {"mode": "static"}}},  # 1 front
    {"acc": 0.90, "lat": 2.0, "size": 1.0, "feasible": False},                          # 2 infeasible
    {"state": F, "acc": None, "lat": None, "reason": "ONNX Runtime cannot load the model: bad QDQ"},  # 3 failed
    {"acc": 0.93, "lat": 6.0, "size": 2.0},                                             # 4 feasible, dominated
    {"state": P, "acc": 0.5, "lat": None},                                              # 5 stopped early
    {"acc": 0.945, "lat": 5.0, "size": 1.5, "cand": {"bits": {"conv2": 8}, "prune": {"conv1": 0.5}}},  # 6 front
]


def test_hypervolume_2d_by_hand() -> None:
    assert hypervolume_2d([[1.0, 3.0], [2.0, 1.0]], [4.0, 4.0]) == pytest.approx(3 * 1 + 2 * 2)
    assert hypervolume_2d([[1.0, 3.0], [2.0, 1.0], [3.0, 3.5]], [4.0, 4.0]) == pytest.approx(7.0)  # dominated point adds nothing
    assert hypervolume_2d([[5.0, 1.0]], [4.0, 4.0]) == 0.0 and hypervolume_2d([], [1.0, 1.0]) == 0.0


def test_dashboard_data_categories_failures_knobs_and_hypervolume() -> None:
    study = handmade_study(ROWS)
    data = dashboard_data(study)
    cats = dict(zip(data.points["trial"], data.points["category"]))
    assert cats == {0: "front", 1: "front", 2: "infeasible", 4: "feasible", 6: "front"}
    assert data.counts() == {"front": 3, "feasible": 1, "infeasible": 1, "failed": 2}
    failed = data.failed.set_index("trial")
    assert list(failed.index) == [3, 5]
    assert failed.at[3, "state"] == "FAIL" and "bad QDQ" in failed.at[3, "reason"]
    assert failed.at[5, "state"] == "PRUNED" and "stopped early" in failed.at[5, "reason"]
    hover = data.points.set_index("trial").at[6, "hover"]
    assert "trial 6" in hover and "conv1: prune 0.5" in hover and "conv2: bits 8" in hover
    # knob matrices: units x front trials, fastest first, neutral values where untouched
    bits = data.knobs["bits"]
    assert bits.trials == (1, 6, 0) and bits.units == ("conv1", "conv2", "fc")
    assert bits.values.tolist() == [[8, 32, 32], [32, 8, 32], [8, 32, 32]]
    assert data.knobs["prune"].values.tolist() == [[0.0, 0.5, 0.0]] and "rank" not in data.knobs
    # hypervolume over feasible trials, objectives scaled between best and worst, reference 1.1
    hv = dict(zip(data.hypervolume["trial"], data.hypervolume["hypervolume"]))
    assert list(hv) == [0, 1, 2, 3, 4, 5, 6]
    assert all(b >= a for a, b in zip(list(hv.values()), list(hv.values())[1:]))  # never decreases
    # feasible points: acc 0.93..0.95, lat 4..10 -> trial 0 at (0, 1), trial 1 at (0.5, 0) in (1-acc, lat) scaled
    assert hv[0] == pytest.approx(1.1 * 0.1)
    assert hv[1] == pytest.approx(hypervolume_2d([[0.0, 1.0], [0.5, 0.0]], [1.1, 1.1]))
    assert hv[2] == hv[1] and hv[4] == hv[1]  # infeasible and dominated trials change nothing
    assert data.analysis is None
    figs = figures(data)
    assert set(figs) == {"pareto", "knobs_bits", "knobs_prune", "hypervolume"}
    pareto_points = sum(len(t.x) for t in figs["pareto"].data)
    assert pareto_points == 5  # every complete trial, failed ones listed apart


def test_analysis_panels_when_the_study_has_one() -> None:
    analysis = {"units": [
        {"knob": "bits", "unit": "conv1", "latency_share": 0.6, "drop@8": 0.01},
        {"knob": "bits", "unit": "fc", "latency_share": 0.1, "drop@8": 0.002},
        {"knob": "prune", "unit": "conv1", "latency_share": 0.6, "drop@0.5": 0.05},
    ], "uniform": [{"quant": {"mode": "static"}, "accuracy": 0.94, "latency_ms": 4.0, "speedup": 2.5}]}
    data = dashboard_data(handmade_study(ROWS, analysis=analysis))
    assert list(data.analysis["unit"]) == ["conv1", "fc", "conv1"] and len(data.uniform) == 1
    figs = figures(data)
    assert {"analysis_latency", "analysis_sensitivity"} <= set(figs)
    z = np.array(figs["analysis_sensitivity"].data[0].z, dtype=float)
    assert z.shape == (2, 2) and z[0, 1] == pytest.approx(0.05) and np.isnan(z[1, 1])
    odd = dashboard_data(handmade_study(ROWS, analysis={"something": "else"}))
    assert odd.analysis is None and any("analysis panel skipped" in n for n in odd.notes)


@pytest.fixture(scope="module")
def real_study(small_problem, tmp_path_factory: pytest.TempPathFactory) -> Study:
    model, ev, example = small_problem
    home = tmp_path_factory.mktemp("dash_study")
    target = Target(threads=1, warmup=3, min_runs=20, max_runs=200, max_seconds=0.3, lock_path=str(home / "lock"))
    return search(model, ev, example_inputs=example, space=SPACE, target=target, study_name="dash", n_trials=6,
                  studies_dir=home / "studies", verbose=False)


def _digest(study: Study) -> str:
    st = study.optuna_study
    blob = repr((sorted(st.user_attrs.items()),
                 [(t.number, t.state, t.values, sorted(t.user_attrs.items()), t.params) for t in st.get_trials(deepcopy=False)]))
    return hashlib.sha256(blob.encode()).hexdigest()


def test_dashboard_renders_in_headless_chromium(real_study: Study, tmp_path: Path) -> None:
    chromium = browser.chromium_or_skip()
    before = _digest(Study.load("dash", studies_dir=real_study.dir.parent))
    page = write_dashboard(real_study, tmp_path / "dash.html")
    assert _digest(Study.load("dash", studies_dir=real_study.dir.parent)) == before  # the study is only read
    text = page.read_text()
    assert not re.search(r"<script[^>]*\ssrc=", text)  # plotly.js inlined, nothing fetched: works offline
    data = dashboard_data(real_study)
    n_complete = len(data.points)
    assert n_complete >= 1 and n_complete == int((real_study.trials()["state"] == "COMPLETE").sum())
    ids = {name.replace("_", "-") for name in figures(data)}
    assert {"pareto", "knobs-bits", "hypervolume"} <= ids
    dom = browser.dump_dom(chromium, page)
    found, main_svg, points = browser.count_figure_elements(dom, ids)
    assert found == ids
    assert all(main_svg[i] >= 1 for i in ids), main_svg  # every figure was drawn
    assert points["pareto"] == n_complete  # one SVG point per complete trial
    assert "front-table" in dom
    png = browser.screenshot(chromium, page, tmp_path / "dash.png")
    img = browser.read_png(png)
    colours = np.unique(img.reshape(-1, img.shape[2])[:, :3], axis=0)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert len(colours) > 20, "the screenshot is (nearly) one colour: nothing rendered"
    assert (img[..., :3] < 200).any(axis=2).mean() > 0.005  # some ink on the page


def test_cli_dashboard(real_study: Study, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "autosearch", "dashboard", "dash", "-o", str(tmp_path / "d.html"),
                          "--studies-dir", str(real_study.dir.parent)], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "d.html").stat().st_size > 1_000_000 and "wrote" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "autosearch", "dashboard", "nope", "--studies-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("autosearch: error:") and "Traceback" not in bad.stderr
