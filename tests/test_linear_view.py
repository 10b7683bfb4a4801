"""exactgn.linear_view: a RevMLP's function with nn.Linear half-layers sharing its parameters.

Checked in float64 against the RevMLP itself, against ``torch.func`` per-sample gradients (what a hook-based
library computes from the Linear's input and output cotangent), and against exactgn's autograd-free GN path:
the generic (hook) path on the view and the RevMLP path on the model must give the same ``J⁺v`` and NTK.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_model, relative
from torch import nn
from torch.func import functional_call, grad, vmap

import exactgn

F64 = torch.float64


def _batch(rng: torch.Generator, b: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, d, generator=rng, dtype=F64), torch.randint(0, 4, (b,), generator=rng)


@pytest.mark.parametrize("hidden,bias", [(12, True), (12, False), (None, True)])
def test_view_computes_the_model_with_its_own_parameters(rng, hidden, bias):
    model = random_model(rng, in_features=8, num_classes=4, num_blocks=3, hidden=hidden, bias=bias)
    view = exactgn.linear_view(model)
    x, _ = _batch(rng, 5, 8)
    assert relative(view(x), model(x)) < 1e-14
    # The same Parameter objects, in the same order, under the names source_names gives.
    assert [id(p) for p in view.parameters()] == [id(p) for p in model.parameters()]
    names = view.source_names()
    model_params = dict(model.named_parameters())
    assert all(model_params[names[n]] is p for n, p in view.named_parameters())
    linears = [m for m in view.modules() if isinstance(m, nn.Linear)]
    width = 4 if hidden is None else hidden
    assert len(linears) == 6
    assert all(
        m.in_features == width and m.out_features == 4 and (m.bias is not None) == bias for m in linears
    )


def test_hooks_on_the_view_give_exact_per_sample_gradients(rng):
    """What BackPACK/Opacus/KFAC read: a Linear's input A (B × h) and its output cotangent G (B × n); the
    per-sample weight gradient is G_iᵀ A_i. Against torch.func per-sample gradients of the RevMLP."""
    model = random_model(rng, in_features=8, num_classes=4, num_blocks=2, hidden=10)
    view = exactgn.linear_view(model)
    x, y = _batch(rng, 6, 8)
    x.requires_grad_(True)  # so that the first Linear's full backward hook has an input gradient to fire on
    seen: dict[nn.Module, list[torch.Tensor]] = {}
    hooks = []
    for m in view.modules():
        if isinstance(m, nn.Linear):
            hooks.append(
                m.register_forward_hook(lambda mod, inp, out: seen.setdefault(mod, []).append(inp[0]))
            )
            hooks.append(m.register_full_backward_hook(lambda mod, gin, gout: seen[mod].append(gout[0])))
    nn.functional.cross_entropy(view(x), y, reduction="sum").backward()
    for h in hooks:
        h.remove()

    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(ps, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, ps, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), (None, 0, 0))(params, x, y)
    names = view.source_names()
    for name, mod in view.named_modules():
        if isinstance(mod, nn.Linear):
            feats, cot = seen[mod]
            source = names[f"{name}.weight"]
            assert relative(torch.einsum("bn,bh->bnh", cot, feats), per_sample[source]) < 1e-12
            assert relative(cot, per_sample[source.replace("weight", "bias")]) < 1e-12


def test_generic_path_on_the_view_matches_the_revmlp_path(rng):
    """Two independent computations of J⁺v and JJᵀ: hooks on the view's Linears (exactgn.generic) and the
    RevMLP's autograd-free records (exactgn.gn)."""
    model = random_model(rng, in_features=10, num_classes=4, num_blocks=2, hidden=12)
    view = exactgn.linear_view(model)
    x, y = _batch(rng, 7, 10)
    assert relative(exactgn.ntk_gram(view, x), exactgn.ntk_gram(model, x)) < 1e-10
    kw = dict(loss="cross_entropy", hessian="exact", inverse="pinv")
    on_view = exactgn.gn_direction(view, x, y, **kw)
    on_model = exactgn.gn_direction(model, x, y, **kw)
    for name, source in view.source_names().items():
        assert relative(on_view[name], on_model[source]) < 1e-9


def test_updates_through_the_view_reach_the_model_and_casts_reach_the_view(rng):
    model = random_model(rng, in_features=8, num_classes=4, num_blocks=2, hidden=10)
    view = exactgn.linear_view(model)
    x, y = _batch(rng, 5, 8)
    before = model(x).detach()
    opt = torch.optim.SGD(view.parameters(), lr=0.5)
    nn.functional.cross_entropy(view(x), y).backward()
    opt.step()
    after = model(x).detach()
    assert relative(after, before) > 1e-3  # the model moved ...
    assert relative(view(x), after) < 1e-14  # ... exactly as the view did
    model.to(torch.float32)
    out = view(x)
    assert out.dtype == torch.float32 and relative(out.double(), after) < 1e-5
    view.double()  # casts the RevMLP it views: parameters and buffers alike
    assert model.readout.dtype == F64 and all(p.dtype == F64 for p in model.parameters())
    assert [id(p) for p in view.parameters()] == [id(p) for p in model.parameters()]
    assert relative(view(x), model(x)) < 1e-14


def test_view_of_something_else_is_refused():
    with pytest.raises(TypeError, match="linear_view takes an exactgn.RevMLP, got Sequential"):
        exactgn.linear_view(nn.Sequential(nn.Linear(4, 2)))
