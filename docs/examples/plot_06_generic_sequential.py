"""
Exact GN on your own ``nn.Sequential``
======================================

The minimum-norm step ``J⁺v`` does not need a reversible network: :func:`exactgn.generic_direction` computes
it for any module that maps one input per sample to ``k`` logits, through the exact NTK Gram ``JJᵀ``
(``Bk × Bk``). ``nn.Linear`` layers are handled in closed form from their inputs and output cotangents;
every other trainable parameter (here a ``LayerNorm``) through per-sample Jacobians from ``torch.func``.
:class:`exactgn.GaussNewton` uses the same path when given such a model with ``inverse="pinv"``.
"""

import torch
from torch import nn
from torch.func import functional_call, jacrev

import exactgn

torch.manual_seed(0)
model = nn.Sequential(
    nn.Linear(20, 64), nn.Tanh(), nn.LayerNorm(64), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 5)
).double()
x, y = torch.randn(12, 20, dtype=torch.float64), torch.randint(0, 5, (12,))

res = exactgn.generic_direction(model, x, y, loss="cross_entropy", hessian="exact")
print("direction:", {n: tuple(t.shape) for n, t in res.direction.items()})
print("logits:", tuple(res.logits.shape), " v = H⁺g:", tuple(res.v.shape))

# %%
# Against brute force
# -------------------
# ``J`` by ``torch.func.jacrev`` (``Bk × P``, rows ``i·k + c``) and ``torch.linalg.pinv``.
params = {n: p.detach() for n, p in model.named_parameters()}
jac = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)
J = torch.cat([jac[n].reshape(12 * 5, -1) for n in params], dim=1)
step = torch.cat([res.direction[n].reshape(-1) for n in params])
brute = torch.linalg.pinv(J) @ res.v.reshape(-1)
print(f"J: {tuple(J.shape)}; relative error against pinv(J) v: {(step - brute).norm() / brute.norm():.1e}")
gram = exactgn.generic_ntk_gram(model, x)
print(f"NTK Gram {tuple(gram.shape)}; max |Gram − JJᵀ| = {(gram - J @ J.T).abs().max():.1e}")
assert torch.allclose(step, brute, rtol=1e-9, atol=1e-12)
assert torch.allclose(gram, J @ J.T, rtol=1e-10, atol=1e-10)

# %%
# Training with ``GaussNewton``
# -----------------------------
# Only the minimum-norm inverse exists for a general model; ``inverse="right"`` raises
# :class:`exactgn.RightInverseError`. (A full step with ``hessian="exact"`` can overshoot far enough for a
# target's probability to underflow, which :class:`exactgn.NonFiniteError` reports; the identity Hessian, the
# study's choice, asks for the gentler ``v = p − y``.)
opt = exactgn.GaussNewton(model, lr=1.0, inverse="pinv", hessian="identity")
for i in range(5):
    print(f"step {i}: loss before {opt.step(x, y).item():.3e}")
try:
    exactgn.GaussNewton(model, inverse="right").step(x, y)
except exactgn.RightInverseError as err:
    print("inverse='right':", str(err)[:110], "…")

# %%
# Models whose samples interact (BatchNorm in training mode, attention across the batch) are refused with
# :class:`exactgn.UnsupportedModelError`. :func:`exactgn.gn_step_flops` counts the work of a step on a batch.
print(exactgn.gn_step_flops(model, x))

# %%
# A RevMLP seen as ``nn.Linear`` layers
# -------------------------------------
# A RevMLP's half-layer ``φ(uC)Wᵀ + β`` is one module, so hook-based libraries (BackPACK, curvlinops' KFAC,
# nngeometry) do not see a Linear in it. :func:`exactgn.linear_view` computes the same function with
# ``nn.Linear`` half-layers that hold the RevMLP's own parameters. A forward hook on such a Linear reads the
# features ``A = φ(uC)`` and a backward hook the output cotangent ``G``; ``G_iᵀ A_i`` is sample ``i``'s
# gradient — what those libraries compute. And the generic step on the view (found by hooks) equals the
# RevMLP's own, autograd-free step: two independent computations of ``J⁺v``.
rev = exactgn.RevMLP(20, 5, num_blocks=2, hidden=24, init_std=0.3, seed=1, dtype=torch.float64)
view = exactgn.linear_view(rev)
layers = {name: m for name, m in view.named_modules() if isinstance(m, torch.nn.Linear)}
print("Linear layers of the view:", {n: (m.in_features, m.out_features) for n, m in layers.items()})
seen: dict[torch.nn.Module, list[torch.Tensor]] = {}


def keep_input(mod, inp, out):
    """Forward hook: keep the Linear's input (a hook that returned something would replace the output)."""
    seen[mod] = [inp[0]]


def keep_cotangent(mod, grad_in, grad_out):
    """Backward hook: keep the cotangent of the Linear's output."""
    seen[mod].append(grad_out[0])


hooks = [
    h
    for m in layers.values()
    for h in (m.register_forward_hook(keep_input), m.register_full_backward_hook(keep_cotangent))
]
xr = x.clone().requires_grad_(True)
torch.nn.functional.cross_entropy(view(xr), y, reduction="sum").backward()
feats, cot = seen[layers["blocks.1.g.linear"]]
per_sample = torch.einsum("bn,bh->bnh", cot, feats)  # B × (d/2) × h
for h in hooks:
    h.remove()
err = (per_sample.sum(0) - rev.blocks[1].g.weight.grad).abs().max()
print(f"per-sample gradients of blocks.1.g {tuple(per_sample.shape)}; their sum vs .grad: {err:.1e}")
on_view = exactgn.gn_direction(view, x, y, inverse="pinv")
on_rev = exactgn.gn_direction(rev, x, y, inverse="pinv")
gap = max(float((on_view[v] - on_rev[r]).norm() / on_rev[r].norm()) for v, r in view.source_names().items())
print(f"J⁺v by hooks on the view vs RevMLP's own path: max relative difference {gap:.1e}")
assert gap < 1e-9
