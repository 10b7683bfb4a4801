"""RevMLP: structure, initialisation, exact inverse, input checks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_model

import exactgn

F64 = torch.float64


@pytest.mark.parametrize("hidden", [16, None])
@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_inverse_reconstructs_input(rng, hidden, blocks, bias):
    model = random_model(
        rng, in_features=30, num_classes=4, num_blocks=blocks, hidden=hidden, bias=bias, init_std=0.5
    )
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
    for (name, ta), tb, tc, td in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), d.state_dict().values()
    ):
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


@pytest.mark.parametrize("shape", [(0, 8), (0, 2, 4)])
def test_an_empty_batch_is_refused_by_name(shape):
    model = exactgn.RevMLP(8, 2, 1, 4)
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, .*pass at least one sample"):
        model(torch.zeros(shape))
    with pytest.raises(ValueError, match="empty batch"):
        exactgn.gn_direction(model, torch.zeros(shape), torch.zeros(0, dtype=torch.long))


def test_complex_inputs_are_refused_not_made_real():
    model = exactgn.RevMLP(8, 2, 1, 4)
    x = torch.randn(3, 8, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"complex \(torch.complex64\).*real network.*x.real"):
        model(x)
    with pytest.raises(TypeError, match="complex"):
        exactgn.gn_direction(model, x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"targets are complex.*integer class indices"):
        exactgn.gn_direction(model, x.real, torch.zeros(3, dtype=torch.complex64))


def test_inputs_that_overflow_the_model_dtype_are_named():
    model = exactgn.RevMLP(8, 2, 1, 4, dtype=torch.float16)
    x = torch.ones(3, 8)
    x[1, 3] = 1e5  # finite in float32, beyond float16's 65504
    message = r"overflow the model's dtype torch.float16 \(largest \|x\| = 1e\+05.*rescale the inputs"
    with pytest.raises(ValueError, match=message):
        model(x)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="contain NaN or infinite"):
        model(x)


def test_dtype_may_be_named_and_must_be_a_supported_float():
    assert exactgn.RevMLP(8, 2, 1, 4, dtype="float64").readout.dtype == F64
    assert exactgn.RevMLP(8, 2, 1, 4, dtype="torch.bfloat16").blocks[0].f.weight.dtype == torch.bfloat16
    for bad in (torch.complex64, torch.int32, "float8", "double precision", None):
        with pytest.raises(ValueError, match="dtype must be one of float64, float32, float16, bfloat16"):
            exactgn.RevMLP(8, 2, 1, 4, dtype=bad)


def _per_sample_ntk(model, x, unsqueeze):
    """``JJᵀ`` from per-sample Jacobians: ``vmap`` over samples of ``jacrev`` of a ``functional_call``."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def logits(ps, sample):
        if unsqueeze:  # the functorch recipe: a batch of one inside the vmap
            return torch.func.functional_call(model, ps, (sample.unsqueeze(0),)).squeeze(0)
        return torch.func.functional_call(model, ps, (sample,))

    jac = torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(params, x)  # name → B × k × shape
    rows = x.shape[0] * model.num_classes
    flat_jac = torch.cat([jac[name].reshape(rows, -1) for name in params], dim=1)
    return flat_jac @ flat_jac.T


@pytest.mark.parametrize("unsqueeze", [False, True])
@pytest.mark.parametrize("hidden", [16, None])
def test_vmap_of_jacrev_over_samples_gives_the_ntk(rng, unsqueeze, hidden):
    model = random_model(rng, in_features=30, num_classes=4, num_blocks=3, hidden=hidden)
    x = torch.randn(6, 30, generator=rng, dtype=F64)
    ntk = exactgn.ntk_gram(model, x)
    assert (_per_sample_ntk(model, x, unsqueeze) - ntk).norm() / ntk.norm() <= 1e-12


def test_vmap_over_samples_matches_the_batched_forward_and_eager_checks_remain(rng):
    model = random_model(rng, in_features=24, num_classes=3, num_blocks=2, hidden=10)
    x = torch.randn(5, 24, generator=rng, dtype=F64)
    assert torch.allclose(torch.func.vmap(model)(x), model(x), rtol=1e-14, atol=1e-14)
    images = x.reshape(5, 1, 2, 12)  # a per-sample image is passed as a batch of one
    assert torch.allclose(torch.func.vmap(model)(images)[:, 0], model(x), rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="no batch dimension"):  # outside a transform a sample needs a batch
        model(x[0])


def test_functional_call_uses_the_given_parameters_and_buffers(rng):
    model = random_model(rng, in_features=24, num_classes=3, num_blocks=2, hidden=10)
    other = random_model(rng, in_features=24, num_classes=3, num_blocks=2, hidden=10)
    x = torch.randn(5, 24, generator=rng, dtype=F64)
    swapped = torch.func.functional_call(model, dict(other.state_dict()), (x,))
    assert torch.equal(swapped, other(x))
    assert (swapped - model(x)).norm() > 1e-3 * swapped.norm()  # the call really used other's tensors
    params = dict(other.named_parameters())
    grads = torch.func.grad(lambda ps: torch.func.functional_call(other, ps, (x,)).sum())(params)
    other(x).sum().backward()
    for name, p in params.items():
        assert torch.allclose(grads[name], p.grad, rtol=1e-12, atol=1e-14), name
