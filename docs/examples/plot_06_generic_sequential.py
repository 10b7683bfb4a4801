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
