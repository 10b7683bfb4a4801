"""MLP and ResMLP: shapes, parameter counts matched to RevMLP, init conventions, forward formula, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import exactgn

F64 = torch.float64


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_mlp_layers_and_forward():
    model = exactgn.MLP(12, 3, [7, 5], activation="tanh", seed=1, dtype=F64)
    assert [(l.in_features, l.out_features) for l in model.layers] == [(12, 7), (7, 5), (5, 3)]
    assert all(isinstance(l, nn.Linear) for l in model.layers)
    x = torch.randn(4, 3, 4, dtype=F64)  # images flatten to 12
    flat = x.reshape(4, 12)
    l0, l1, l2 = model.layers
    expected = l2(torch.tanh(l1(torch.tanh(l0(flat)))))
    assert torch.equal(model(x), expected)
    assert _count(model) == 12 * 7 + 7 + 7 * 5 + 5 + 5 * 3 + 3


@pytest.mark.parametrize("activation,gain", [("relu", 2.0**0.5), ("tanh", 1.0)])
def test_mlp_init_scales_by_fan_in_or_init_std(activation, gain):
    model = exactgn.MLP(400, 10, [300], activation=activation, seed=3, dtype=F64)
    std = model.layers[0].weight.std().item()
    assert std == pytest.approx(gain / 400**0.5, rel=0.02)
    assert all(float(l.bias.detach().abs().max()) == 0 for l in model.layers)
    fixed = exactgn.MLP(400, 10, [300], init_std=1e-3, seed=3, dtype=F64)
    assert fixed.layers[1].weight.std().item() == pytest.approx(1e-3, rel=0.05)


def test_same_seed_same_model_in_every_dtype():
    a = exactgn.MLP(20, 4, [16], seed=5, dtype=F64)
    b = exactgn.MLP(**a.config(), dtype=torch.float32)
    c = exactgn.MLP(20, 4, [16], seed=6, dtype=F64)
    assert torch.equal(a.layers[0].weight.float(), b.layers[0].weight)
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)
    r = exactgn.ResMLP(10, 3, 2, 12, seed=5, dtype=F64)
    s = exactgn.ResMLP(**r.config(), dtype=torch.float32)
    assert torch.equal(r.blocks[1].proj.weight.float(), s.blocks[1].proj.weight)


@pytest.mark.parametrize("bias", [True, False])
def test_resmlp_matches_revmlp_parameter_count(bias):
    rev = exactgn.RevMLP(12, 3, 3, 16, bias=bias)
    res = exactgn.ResMLP(12, 3, 3, 16, bias=bias)
    assert _count(res) == _count(rev) == 3 * (12 * 16 + 12 * bias)
    # Without a bottleneck a ResMLP block holds d² weights, a RevMLP block 2·(d/2)².
    assert _count(exactgn.ResMLP(12, 3, 3, None, bias=bias)) == 3 * (144 + 12 * bias)


def test_resmlp_forward_is_the_residual_formula():
    model = exactgn.ResMLP(10, 3, 2, 14, init_std=0.2, seed=2, dtype=F64)
    with torch.no_grad():
        model.blocks[1].out.bias.normal_()
    x = torch.randn(5, 10, dtype=F64)
    z = x
    for l, block in enumerate(model.blocks):
        c, w, b = block.proj.weight.T, block.out.weight, block.out.bias
        u = z @ c
        z = z + (u if l == 0 else torch.relu(u)) @ w.T + b
    u_mat = model.readout.weight.T
    assert torch.allclose(model(x), z @ u_mat, rtol=1e-13, atol=1e-13)
    assert torch.allclose(u_mat.T @ u_mat, torch.eye(3, dtype=F64), atol=1e-14)
    c = model.blocks[0].proj.weight
    assert c.var().item() == pytest.approx(1 / 14, rel=0.3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"blocks.{l}.out.{p}" for l in (0, 1) for p in ("weight", "bias")]


def test_resmlp_without_bottleneck():
    model = exactgn.ResMLP(6, 2, 2, None, init_std=0.3, seed=0, dtype=F64)
    x = torch.randn(3, 6, dtype=F64)
    b0, b1 = model.blocks
    z = x + x @ b0.out.weight.T + b0.out.bias
    z = z + torch.relu(z) @ b1.out.weight.T + b1.out.bias
    assert torch.allclose(model(x), model.readout(z), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_width_for_matches_a_parameter_count(depth):
    target = _count(exactgn.RevMLP(784, 10, 2, 1024))
    width = exactgn.mlp_width_for(target, 784, 10, depth)

    def count(w: int) -> int:
        return _count(exactgn.MLP(784, 10, [w] * depth))

    assert abs(count(width) - target) <= min(abs(count(width - 1) - target), abs(count(width + 1) - target))


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        exactgn.MLP(4, 2, [3], activation="swish")
    with pytest.raises(ValueError, match=r"widths\[i\] must be an integer >= 1"):
        exactgn.MLP(4, 2, [0])
    with pytest.raises(ValueError, match="num_classes .* must be at most in_features"):
        exactgn.ResMLP(4, 6, 1, 8)
    with pytest.raises(ValueError, match="num_blocks must be an integer"):
        exactgn.ResMLP(4, 2, 0, 8)
    with pytest.raises(ValueError, match="give 5 features, the model takes 4"):
        exactgn.MLP(4, 2, [3])(torch.zeros(2, 5))
