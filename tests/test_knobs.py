"""Knobs are plug-ins: one contract every knob keeps, and a new knob needs its own module and a YAML only."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import wildlike as W
import yaml

from autosearch.candidate import Candidate
from autosearch.errors import ConfigError
from autosearch.knobs import Knob, knob, knob_names, knobs, unregister

# A toy knob as a user would write it: its own module, registered on import. "fuse" marks the Relu nodes it is
# set on (doc_string), so a test can see it ran in the build; 0 leaves a node alone.
TOY = '''
from autosearch.knobs import Knob, register


class Fuse(Knob):
    name = "fuse"
    neutral = 0
    order = 50

    def check(self, value):
        if value not in (0, 1):
            raise ValueError(f"{value!r}; allowed: 0, 1")
        return int(value)

    def find_units(self, source):
        return [n.name for n in source.onnx_model.graph.node if n.op_type == "Relu"], []

    def apply(self, state, values):
        proto = state.proto.__deepcopy__()
        for node in proto.graph.node:
            if node.name in values:
                node.doc_string = "fused"
        state.proto = proto


register(Fuse())
'''


@pytest.fixture()
def toy_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "toy_fuse_knob.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "toy_fuse_knob"
    unregister("fuse")
    sys.modules.pop("toy_fuse_knob", None)


def test_a_new_knob_is_one_module_and_a_yaml(toy_plugin: str, tmp_path: Path) -> None:
    """The space loads the plug-in; units, sampling, build, study, summary, dashboard and export take it."""
    from autosearch import search
    from autosearch.target import Target

    model = W.minus_one_batch_mlp(tmp_path / "mlp.onnx")
    space = tmp_path / "fuse.yaml"
    space.write_text(textwrap.dedent(f"""
        plugins: [{toy_plugin}]
        knobs:
          fuse: [0, 1]
          bits: [32, 8]
        quantization:
          mode: [dynamic]
        strategy:
          analysis: false
          remeasure_front: false
        budget:
          n_trials: 6
        sampler:
          name: random
    """))
    target = Target(threads=1, warmup=2, min_runs=10, max_runs=50, max_seconds=0.2, lock_path=str(tmp_path / "lock"))
    study = search(str(model), space=str(space), target=target, study_name="toy", studies_dir=tmp_path / "studies",
                   verbose=False)
    relus = [n.name for n in onnx.load(str(model)).graph.node if n.op_type == "Relu"]
    assert relus and study.meta["units"]["fuse"] == relus
    trials = [t for t in study.optuna_study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 6
    fused = [t for t in trials if t.user_attrs["candidate"].get("fuse")]
    assert fused, "the random sampler set fuse=1 on some unit in 6 trials"
    assert all(f"{r}.fuse" in t.params for t in trials for r in relus)
    for t in fused:
        built = onnx.load(t.user_attrs["onnx_path"])
        on = {n.name for n in built.graph.node if n.doc_string == "fused"}
        assert on == set(t.user_attrs["candidate"]["fuse"])  # the knob's apply step ran in the build
        assert "fuse" in t.user_attrs["summary"]
    html = study.dashboard(tmp_path / "d.html").read_text()
    assert "fuse" in html
    report = study.export(tmp_path / "out", pick=fused[0].number)
    config = yaml.safe_load(report.files["config"].read_text())
    assert config["candidate"]["fuse"] == fused[0].user_attrs["candidate"]["fuse"]
    assert {u: v["fuse"] for u, v in config["units"].items() if "fuse" in v} == {
        r: fused[0].user_attrs["candidate"]["fuse"].get(r, 0) for r in relus}


def test_unknown_knob_names_the_registered_ones_and_plugins() -> None:
    from autosearch.space import SearchSpace

    with pytest.raises(ConfigError, match=r"unknown knob 'knobs.fuse'; allowed: bits, prune, rank .*plugins"):
        SearchSpace.from_dict({"knobs": {"fuse": [0, 1]}})
    with pytest.raises(ConfigError, match=r"unknown knob 'width'; registered knobs: prune, rank, bits"):
        Candidate(width={"a": 1})


@pytest.fixture(params=["prune", "rank", "bits", "fuse"])
def any_knob(request, toy_plugin: str) -> Knob:
    __import__(toy_plugin)
    return knob(request.param)


def test_contract_every_knob_keeps(any_knob: Knob, small_source) -> None:
    """What the space, candidate, sampler and build rely on, for each registered knob (plug-ins included)."""
    k = any_knob
    assert k.name in knob_names() and k in knobs()
    assert k.check(k.neutral) == k.neutral and not k.active(k.neutral)
    with pytest.raises(ValueError):
        k.check("not a value")
    units, notes = k.find_units(small_source)
    assert isinstance(units, list) and all(isinstance(u, str) for u in units) and isinstance(notes, list)
    # a candidate that sets every unit to neutral changes nothing: no options, same key as the float model
    neutral = Candidate(**{k.name: {u: k.neutral for u in units}})
    assert neutral.to_dict() == Candidate().to_dict() and neutral.key("f") == Candidate().key("f")
    assert k.summary({u: k.neutral for u in units}, {}) in (None, "float")
    if units:
        mild = k.mildest([k.neutral, *[v for v in _choices(k) if v != k.neutral]])
        assert mild is not None and k.active(mild)
        active = Candidate(**{k.name: {units[0]: mild}})
        assert active.active(k.name) == {units[0]: mild} and active.key("f") != Candidate().key("f")
        assert Candidate.from_dict(active.to_dict()) == active


def _choices(k: Knob) -> list:
    return {"prune": [0.25, 0.5], "rank": [0.5, 0.25], "bits": [8, 16], "fuse": [1]}[k.name]
