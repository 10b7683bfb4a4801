"""RevMLP: structure, initialisation, exact inverse, input checks."""

from __future__ import annotations

import math

import pytest
import torch

import exactgn
from conftest import random_model

F64 = torch.float64


@pytest.mark.parametrize("hidden", [16, None])
@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_inverse_reconstructs_input(rng, hidden, blocks, bias):
    model = random_model(rng, in_features=30, num_classes=4, num_blocks=blocks, hidden=hidden, bias=bias, init_std=0.5)
    with torch.no_grad():  # biases are zero at init: give them values so that the inverse must undo them
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=rng, dtype=F64))
    x = torch.randn(7, 30, generator=rng, dtype=F64)
    z = model.state(x)
    assert (z - x).norm() / x.norm() > 1e-2  # the blocks really change the state
    assert (model.inverse(z) - x).norm() / x.norm() <= 1e-12
    assert torch.allclose(model(x), z @ model.readout)


def test_images_and_vectors_give_the_same_logits(rng):
    model = random_model(rng, in_features=2 * 3 * 4, num_classes=3, num_blocks=2, hidden=8)
    images = torch.randn(5, 2, 3, 4, generator=rng, dtype=F64)
    assert torch.equal(model(images), model(images.reshape(5, -1)))


def test_only_weights_and_biases_are_trainable():
    model = exactgn.RevMLP(8, 3, 2, 6)
    names = [n for n, _ in model.named_parameters()]
    assert names == [f"blocks.{l}.{s}.{p}" for l in range(2) for s in "fg" for p in ("weight", "bias")]
    assert all(p.requires_grad for p in model.parameters())
    buffers = dict(model.named_buffers())
    assert set(buffers) == {"readout"} | {f"blocks.{l}.{s}.proj" for l in range(2) for s in "fg"}
    assert not any(b.requires_grad for b in buffers.values())
    nobias = exactgn.RevMLP(8, 3, 1, None, bias=False)
    assert [n for n, _ in nobias.named_parameters()] == ["blocks.0.f.weight", "blocks.0.g.weight"]
    assert nobias.blocks[0].f.weight.shape == (4, 4) and nobias.blocks[0].f.proj is None


def test_initialisation_matches_the_reference_distribution():
    model = exactgn.RevMLP(400, 10, 2, 3000, init_std=1e-3, seed=3, dtype=F64)
    f = model.blocks[1].f
    assert f.weight.shape == (200, 3000) and f.proj.shape == (200, 3000)
    assert f.weight.std().item() == pytest.approx(1e-3, rel=0.01)
    assert f.proj.std().item() == pytest.approx(1 / math.sqrt(3000), rel=0.01)
    assert torch.count_nonzero(f.bias) == 0
    u = model.readout
    assert torch.allclose(u.T @ u, torch.eye(10, dtype=F64), atol=1e-13)
    assert [b.f.activation for b in model.blocks] == ["identity", "relu"]


def test_seed_reproduces_the_model_and_dtype_does_not_change_the_draw():
    a, b = exactgn.RevMLP(20, 3, 2, 9, seed=5), exactgn.RevMLP(20, 3, 2, 9, seed=5)
    c = exactgn.RevMLP(20, 3, 2, 9, seed=6)
    d = exactgn.RevMLP(20, 3, 2, 9, seed=5, dtype=F64)
    for (name, ta), tb, tc, td in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), d.state_dict().values()):
        assert torch.equal(ta, tb), name
        assert torch.allclose(ta.double(), td, rtol=1e-6, atol=1e-9), name
        if ta.abs().sum() > 0:
            assert not torch.equal(ta, tc), name


def test_rank_bounds():
    model = exactgn.RevMLP(24, 3, 2, 20)  # identity first block: rank ≤ min(h, d/2) + 1
    assert [h.rank_bound for h in model.half_layers()] == [13, 13, 21, 21]
    assert model.max_exact_batch == 13
    assert exactgn.RevMLP(24, 3, 2, 8).max_exact_batch == 9
    assert exactgn.RevMLP(24, 3, 2, None, bias=False).max_exact_batch == 12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(in_features=7, num_classes=2, num_blocks=1, hidden=4), "even"),
        (dict(in_features=8, num_classes=9, num_blocks=1, hidden=4), "num_classes=9"),
        (dict(in_features=8, num_classes=2, num_blocks=0, hidden=4), "num_blocks"),
        (dict(in_features=8, num_classes=2, num_blocks=1, hidden=0), "hidden"),
        (dict(in_features=8, num_classes=2, num_blocks=1, hidden=4, init_std=float("nan")), "init_std"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        exactgn.RevMLP(**kwargs)


def test_bad_inputs_are_refused():
    model = exactgn.RevMLP(8, 2, 1, 4)
    with pytest.raises(ValueError, match="6 features per sample.*in_features=8"):
        model(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="no batch dimension"):
        model(torch.zeros(8))
    bad = torch.zeros(3, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        exactgn.gn_direction(model, bad, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape \\(B, 8\\)"):
        model.inverse(torch.zeros(3, 6))
