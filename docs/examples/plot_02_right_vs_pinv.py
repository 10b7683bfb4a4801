"""
``J♭`` against ``J⁺`` on one batch
==================================

Both exact steps make the linearised network move its logits by exactly ``v`` on the batch, but they are
different vectors in parameter space. ``J⁺v`` is the shortest such vector; the right inverse ``J♭v`` of the
study is built block by block from the last to the first (DESIGN §3a) and is longer. On one batch of the
bundled MNIST subset we compare their cosine, their norms and where each puts its step (the norm per
half-layer).
"""

import matplotlib.pyplot as plt
import torch

import exactgn
from exactgn.lab.data import read_bundled_mnist

raw = read_bundled_mnist()
B = 48
x = torch.as_tensor(raw.train.images[:B], dtype=torch.float64).reshape(B, -1) / 255.0
x = (x - 0.1307) / 0.3081
y = torch.as_tensor(raw.train.labels[:B])
model = exactgn.RevMLP(784, 10, num_blocks=3, hidden=256, seed=0, dtype=torch.float64)
print(f"x: {tuple(x.shape)}, exact right-inverse steps up to B = {model.max_exact_batch}")

# %%
# Both directions, with everything they computed (:func:`exactgn.compute_direction`).
res = {inv: exactgn.compute_direction(model, x, y, inverse=inv) for inv in ("right", "pinv")}
names = [n for n, _ in model.named_parameters()]
flat = {inv: torch.cat([r.direction[n].reshape(-1) for n in names]) for inv, r in res.items()}
cos = torch.dot(flat["right"], flat["pinv"]) / (flat["right"].norm() * flat["pinv"].norm())
print(f"‖J♭v‖ = {flat['right'].norm():.4g}   ‖J⁺v‖ = {flat['pinv'].norm():.4g}")
print(f"ratio ‖J♭v‖/‖J⁺v‖ = {flat['right'].norm() / flat['pinv'].norm():.3g}   cosine = {cos:.4f}")
v = res["pinv"].v
for inv in ("right", "pinv"):
    fit = exactgn.jvp_logits(model, x, res[inv].direction) - v
    print(f"{inv:5s}: max |J·δ − v| = {fit.abs().max():.1e}  ({len(res[inv].solves)} Gram solve(s))")
    assert fit.abs().max() < 1e-8 * v.abs().max()
assert flat["pinv"].norm() <= flat["right"].norm()  # J⁺v is the minimum-norm solution

# %%
# Where each step goes
# --------------------
# The norm of each half-layer's part of the step (weights and bias together), first block at the left.
half_layers = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))


def per_half_layer(direction):
    """Norm of each half-layer's share of a direction."""
    parts = [
        torch.cat([t.reshape(-1) for n, t in direction.items() if n.startswith(h + ".")]) for h in half_layers
    ]
    return [float(p.norm()) for p in parts]


for h, r, p in zip(
    half_layers, per_half_layer(res["right"].direction), per_half_layer(res["pinv"].direction)
):
    print(f"{h:10s}  J♭: {r:.3g}   J⁺: {p:.3g}")

fig, ax = plt.subplots(figsize=(7, 3.2))
width = 0.4
pos = torch.arange(len(half_layers), dtype=torch.float64)
ax.bar(pos - width / 2, per_half_layer(res["right"].direction), width, label="right inverse J♭v")
ax.bar(pos + width / 2, per_half_layer(res["pinv"].direction), width, label="minimum norm J⁺v")
ax.set_xticks(pos.tolist(), [h.replace("blocks.", "") for h in half_layers])
ax.set_xlabel("half-layer (block.F / block.G)")
ax.set_ylabel("norm of the step")
ax.legend()
fig.tight_layout()

# %%
# ``J♭`` gives every block an equal ``1/L`` share of the wanted change of the state (DESIGN §3a), so its step
# is spread evenly over the half-layers. ``J⁺`` is free to let the blocks share the work unevenly: here it
# puts about as much into the first block (identity activation) and much less into the ReLU blocks, and is
# the shorter vector overall. At the same learning rate both steps move the batch's logits identically to
# first order, yet they move the weights differently, which is what the full-batch comparison and RESULTS
# follow up.
