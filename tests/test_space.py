"""Search-space files: presets load, every bad key or value is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from autosearch.errors import ConfigError
from autosearch.space import SearchSpace, load_space, preset_path


@pytest.mark.parametrize("name", sorted(p.stem for p in preset_path("cnn").parent.glob("*.yaml")))
def test_every_preset_loads(name: str) -> None:
    space = load_space(name)
    assert space.objectives[0] == "accuracy"
    assert "bits" in space.knobs


def test_fingerprint_ignores_budget_but_not_choices() -> None:
    a = SearchSpace.from_dict({"knobs": {"bits": [32, 8]}, "budget": {"n_trials": 5}})
    b = SearchSpace.from_dict({"knobs": {"bits": [32, 8]}, "budget": {"n_trials": 50}})
    c = SearchSpace.from_dict({"knobs": {"bits": [32, 8, 16]}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"knob": {}}, r"unknown key 'knob'.*allowed top-level keys"),
        ({"knobs": {"width": [1]}}, r"unknown knob 'knobs.width'; allowed: bits, prune, rank"),
        ({"knobs": {"bits": [32, 7]}}, r"'knobs.bits.choices' has 7; allowed: 32, 16, 8, 4"),
        ({"knobs": {"prune": [0.0, 1.5]}}, r"'knobs.prune.choices' has 1.5.*\[0, 1\)"),
        ({"knobs": {"rank": [0.0]}}, r"'knobs.rank.choices' has 0.0.*\(0, 1\]"),
        ({"knobs": {"bits": {"choices": [8], "inclde": ["*"]}}}, r"unknown key 'knobs.bits.inclde'"),
        ({"quantization": {"activation_type": "int4"}}, r"'quantization.activation_type' has value 'int4'; allowed: 'uint8', 'int8'"),
        ({"quantization": {"per_chanel": [True]}}, r"unknown key 'quantization.per_chanel'"),
        ({"objectives": ["accuracy", "speed"]}, r"unknown objective 'speed'"),
        ({"constraints": {"max_drop": 0.1}}, r"unknown key 'constraints.max_drop'"),
        ({"budget": {"n_trials": 0}}, r"'budget.n_trials' must be a positive integer"),
        ({"sampler": {"name": "cmaes"}}, r"'sampler.name' is 'cmaes'; allowed: nsga2, tpe, random"),
        ({"recovery": {"bn": True}}, r"unknown key 'recovery.bn'"),
        ({"recovery": {"reconstruct": "always"}}, r"'recovery.reconstruct' has value 'always'; allowed: 'auto', True, False"),
        # strict types: a quoted "no" is not a boolean (bool("no") would keep recalibration on)
        ({"recovery": {"bn_recalibration": "no"}}, r"'recovery.bn_recalibration' has value 'no'; allowed: True, False"),
        ({"recovery": {"distill_steps": [0, 1.5]}}, r"'recovery.distill_steps' is .*valid integer"),
        ({"recovery": {"calibration_samples": 0}}, r"'recovery.calibration_samples' is 0: input should be greater than or equal to 1"),
        ({"strategy": {"narrow": "yes"}}, r"'strategy.narrow' has value 'yes'; allowed: True, False"),
        ({"strategy": {"analysis_budget": 1.5}}, r"'strategy.analysis_budget' is 1.5: input should be less than 1"),
        ({"strategy": {"warm_start": [1]}}, r"unknown key 'strategy.warm_start'"),
        ({"version": 2}, r"'version' is 2; this AutoSearch reads version 1"),
        ({"plugins": ["no_such_module_xyz"]}, r"plugin module 'no_such_module_xyz' cannot be imported"),
        ({"knobs": {"prune": {"choices": [0.0], "by_unit": {"*.attn": [0.0, 1.0]}}}}, r"'knobs.prune.by_unit.\*.attn' has 1.0"),
        ({"knobs": {"prune": {"choices": [0.0], "by_unit": [0.5]}}}, r"'knobs.prune.by_unit' must map a unit-name pattern"),
        ({"quantization": {"int4_block_size": [48]}}, r"'quantization.int4_block_size' has value 48; allowed: 16, 32, 64, 128, 256"),
    ],
)
def test_bad_values_are_named(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_dict(data)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_text("knobs:\n  bits: [32, 9]\n")
    with pytest.raises(ConfigError, match=r"in .*mine.yaml"):
        load_space(f)
    f.write_text("knobs: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(f)
    with pytest.raises(ConfigError, match="neither a file nor a preset; presets: cnn"):
        load_space("no-such-space")


def test_include_exclude_and_share() -> None:
    space = SearchSpace.from_dict(
        {"knobs": {"bits": {"choices": [32, 8], "include": ["layer*"], "exclude": ["layer3.*"], "share": {"l1": ["layer1.*"]}}}}
    )
    spec = space.knobs["bits"]
    assert spec.applies("layer1.0.conv1") and not spec.applies("layer3.0.conv1") and not spec.applies("stem.0")
    assert spec.group_of("layer1.1.conv2") == "l1" and spec.group_of("layer2.0.conv1") is None


def test_fingerprint_leaves_out_options_at_their_default() -> None:
    """A space that spells out a default is the same space (and a new option does not orphan old studies)."""
    a = SearchSpace.from_dict({"knobs": {"bits": [32, 8]}})
    b = SearchSpace.from_dict({"knobs": {"bits": [32, 8]}, "quantization": {"int4_block_size": 32, "per_channel": [True]}})
    c = SearchSpace.from_dict({"knobs": {"bits": [32, 8]}, "quantization": {"int4_block_size": [32, 128]}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_by_unit_choices_per_pattern_are_sampled_per_unit(tmp_path: Path) -> None:
    import optuna

    from autosearch.candidate import SpaceUnits, candidate_params, sample_candidate

    space = SearchSpace.from_dict({
        "knobs": {
            "prune": {"choices": [0.0, 0.25, 0.5], "by_unit": {"*.attn": [0.0, 0.25], "*.fixed": [0.0]}},
            "bits": {"choices": [32, 8, 4], "by_unit": {"conv*": [32, 8]}},
        },
        "quantization": {"int4_block_size": [32, 128], "mode": ["static", "dynamic"]},
    })
    spec = space.knobs["prune"]
    assert spec.choices_for("b0.attn") == (0.0, 0.25) and spec.choices_for("b0.ffn") == (0.0, 0.25, 0.5)
    assert spec.all_choices == (0.0, 0.25, 0.5)
    units = SpaceUnits(bits=("conv1", "fc"), prune=("b0.attn", "b0.ffn", "b0.fixed"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_attn, saw_int4_opts, saw_plain_int8 = set(), False, False
    for _ in range(60):
        trial = study.ask()
        cand = sample_candidate(trial, space, units)
        seen_attn.add(cand.prune["b0.attn"])
        assert cand.prune["b0.fixed"] == 0.0 and "b0.fixed.prune" not in trial.params  # one choice: no parameter
        assert cand.bits["conv1"] in (32, 8)
        has4 = 4 in cand.bits.values()
        assert ("int4_block_size" in cand.quant) == has4  # int4 options only when a unit takes 4 bits
        saw_int4_opts |= has4
        saw_plain_int8 |= cand.quantized and not has4
        assert candidate_params(cand, space, units) == trial.params  # enqueue reproduces the sample
        study.tell(trial, 0.0)
    assert seen_attn == {0.0, 0.25}
    assert saw_int4_opts and saw_plain_int8


def test_config_round_trips_through_a_dict_with_its_version() -> None:
    """to_dict -> from_dict gives the same space (same fingerprint, same typed sections)."""
    for name in ("cnn", "quant", "transformer"):
        space = load_space(name)
        d = space.to_dict()
        assert d["version"] == 1
        back = SearchSpace.from_dict(d)
        assert back.fingerprint() == space.fingerprint()
        assert back.quant == space.quant and back.recovery == space.recovery and back.strategy == space.strategy
        assert back.to_dict() == d


def test_one_default_per_option_reaches_the_build() -> None:
    """The candidate's options are read through the same declaration the space's defaults come from."""
    from autosearch.config import QuantSetting, RecoverySetting

    space = SearchSpace.from_dict({"knobs": {"bits": [32, 8]}})
    assert space.quant_first() == {k: v for k, v in QuantSetting(per_channel=True).model_dump().items()
                                   if not k.startswith("int4")}
    assert space.recovery_with() == RecoverySetting().model_dump()
    # a candidate that names no option gets the declared defaults (dynamic: per-tensor, ORT's own default)
    assert QuantSetting.of({"mode": "dynamic"}).per_channel_in("dynamic") is False
    assert QuantSetting.of({}).per_channel_in("static") is True


def test_post_units_are_float_where_the_quant_options_leave_them_float() -> None:
    """Under dynamic or weighted-ops quantization a ``post:`` unit (ops after the last weighted layer) is not
    quantized whatever was sampled: the candidate says float there, and a candidate whose only int8 unit is one is
    the float model (no quant options), not a build that fails with "no node of the units set to quantize".
    Catches: dropping the ``effective()`` pass in sample_candidate (the post unit stays 8 and the candidate quantized)."""
    import optuna

    from autosearch.candidate import SpaceUnits, sample_candidate

    space = SearchSpace.from_dict({"knobs": {"bits": [32, 8]},
                                   "quantization": {"mode": ["static", "dynamic"], "op_scope": ["all", "weighted"]}})
    units = SpaceUnits(bits=("conv1", "post:logits"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(80):
        trial = study.ask()
        cand = sample_candidate(trial, space, units)
        p = trial.params
        if p.get("post:logits.bits") == 8:
            keeps = p.get("quant.mode") == "static" and p.get("quant.op_scope") == "all"
            assert cand.bits["post:logits"] == (8 if keeps else 32), (p, cand.to_dict())
            if p.get("conv1.bits") == 32 and not keeps:
                assert not cand.quantized and cand.quant == {}, cand.to_dict()
                seen.add("float")
            seen.add(keeps)
        study.tell(trial, 0.0)
    assert seen == {True, False, "float"}


def test_a_shipped_preset_pattern_that_matches_nothing_is_a_note_a_users_is_an_error(tmp_path: Path) -> None:
    """``--space cnn`` on a model without a unit named ``fc`` (the preset's rank exclude): a note, units found;
    the same YAML as the user's own file: the one-line error naming the key and the model's units.

    Catches: ``_check_patterns`` raising for every space (the preset refuses most models), or never raising
    (a typo in a user's pattern silently searches what it meant to exclude)."""
    import shutil

    from conftest import tiny_onnx

    from autosearch.model import import_model
    from autosearch.steps.units import discover_units

    src = import_model(str(tiny_onnx(tmp_path / "m.onnx")))  # rank units fc1_matmul, fc2: none is "fc"
    preset = load_space("cnn")
    assert "fc" in preset.knobs["rank"].exclude
    units, notes = discover_units(src, preset)
    assert units.of("rank") and units.of("bits"), units
    assert any("exclude pattern 'fc' matches no rank unit" in n for n in notes), notes
    mine = tmp_path / "mycnn.yaml"
    shutil.copy(preset.source, mine)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'knobs.rank.exclude' pattern 'fc' in .*mycnn.yaml matches no rank unit.*fc1_matmul"):
        discover_units(src, load_space(mine))
