"""
A GN step and its exactness check against ``torch.func``
========================================================

:func:`exactgn.gn_direction` returns the Gauss–Newton direction of a :class:`~exactgn.RevMLP` on a batch as a
``{parameter name: tensor}`` dict. Here we check it against brute force: the full Jacobian ``J = ∂o/∂θ``
(``Bk × P``) from :func:`torch.func.jacrev`, and ``J⁺v`` from :func:`torch.linalg.pinv`. Both exact steps
(the right inverse ``J♭`` and the minimum-norm ``J⁺``) solve ``J·δ = v``, where ``v = H⁺g`` is the
function-space step (:func:`exactgn.newton_target`); only ``J⁺`` is the minimum-norm solution.
"""

import torch
from torch.func import functional_call, jacrev

import exactgn

torch.manual_seed(0)
B, d, k = 8, 16, 4  # batch, input size, classes
model = exactgn.RevMLP(d, k, num_blocks=2, hidden=32, init_std=0.3, seed=0, dtype=torch.float64)
x = torch.randn(B, d, dtype=torch.float64)
y = torch.randint(0, k, (B,))
print(model)
print("largest batch with an exact right-inverse step:", model.max_exact_batch)

# %%
# The two exact directions
# ------------------------
# ``inverse="right"`` is the study's tractable ``J♭``; ``inverse="pinv"`` solves the ``Bk × Bk`` NTK Gram.
# The update is ``θ ← θ − lr·direction``.
right = exactgn.gn_direction(model, x, y, loss="cross_entropy", inverse="right")
pinv = exactgn.gn_direction(model, x, y, loss="cross_entropy", inverse="pinv")
for name, t in pinv.items():
    print(f"{name:28s} {tuple(t.shape)}")

# %%
# Brute force: ``J`` by ``torch.func.jacrev``
# -------------------------------------------
# Rows of ``J`` are ``i·k + c`` (sample ``i``, class ``c``), columns follow ``named_parameters()``.
params = {n: p.detach() for n, p in model.named_parameters()}
jac = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)
J = torch.cat([jac[n].reshape(B * k, -1) for n in params], dim=1)
print("J:", tuple(J.shape))


def flat(direction):
    """A direction dict as one vector, in ``named_parameters()`` order."""
    return torch.cat([direction[n].reshape(-1) for n in params])


# ``v = H⁺g`` for cross-entropy with the identity Hessian (the study's choice): ``p − y``.
logits = model(x)
rows = torch.nn.functional.one_hot(y, k).to(torch.float64)
v = exactgn.newton_target(logits, rows, "cross_entropy", hessian="identity").reshape(-1)
brute = torch.linalg.pinv(J) @ v

for name, step in [("right (J♭)", flat(right)), ("pinv (J⁺)", flat(pinv))]:
    residual = (J @ step - v).norm() / v.norm()
    print(f"{name:10s}  ‖Jδ − v‖/‖v‖ = {residual:.1e}   ‖δ‖ = {step.norm():.4f}")
    assert residual < 1e-10, f"{name} is not exact"
print(f"pinv against torch.linalg.pinv(J) v: relative error {(flat(pinv) - brute).norm() / brute.norm():.1e}")
print(f"minimum norm ‖J⁺v‖ = {brute.norm():.4f}")
assert torch.allclose(flat(pinv), brute, rtol=1e-10, atol=1e-12)

# %%
# Both directions move the linearised logits by exactly ``v`` on the batch; the minimum-norm one agrees with
# ``torch.linalg.pinv`` to rounding. :func:`exactgn.jvp_logits` computes ``J·δ`` without forming ``J``:
print(f"jvp_logits(right) − v: {(exactgn.jvp_logits(model, x, right).reshape(-1) - v).abs().max():.1e}")

# %%
# Taking the step
# ---------------
# With ``lr = 1`` the linearised model fits ``v`` on the batch; the real loss drops accordingly.
before = exactgn.loss_value(logits, rows, "cross_entropy")
with torch.no_grad():
    for n, p in model.named_parameters():
        p -= 1.0 * pinv[n]
after = exactgn.loss_value(model(x), rows, "cross_entropy")
print(f"loss {before:.4f} → {after:.4f}")
