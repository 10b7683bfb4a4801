"""
A small full-batch comparison: GN, Adam and SGD
===============================================

The setting of the study's full-batch MNIST experiment, shrunk to run in seconds: one batch of 128 bundled
MNIST images is the whole training set, and each optimiser takes 20 steps on it. :class:`exactgn.GaussNewton`
is a :class:`torch.optim.Optimizer` whose ``step`` takes the batch (no ``backward()``); Adam and SGD are
torch's own. Every model starts from the same weights (``seed=0``). The learning rates are this page's
choices, not tuned; ``exactgn compare mnist-fullbatch-cpu`` runs the real comparison and ``RESULTS.md``
has its numbers.
"""

import copy
import warnings

import matplotlib.pyplot as plt
import torch

import exactgn
from exactgn.lab.data import read_bundled_mnist

raw = read_bundled_mnist()


def images(split, n):
    """The first ``n`` images of a split as ``n × 784`` standardised floats, and their labels."""
    x = torch.as_tensor(split.images[:n], dtype=torch.float32).reshape(n, -1) / 255.0
    return (x - 0.1307) / 0.3081, torch.as_tensor(split.labels[:n])


x, y = images(raw.train, 128)
x_test, y_test = images(raw.test, 1000)
start = exactgn.RevMLP(784, 10, num_blocks=2, hidden=256, seed=0)
STEPS = 20


def accuracy(model, inputs, labels):
    """Fraction of ``labels`` the model's arg-max logit gets right."""
    with torch.no_grad():
        return (model(inputs).argmax(1) == labels).float().mean().item()


def train(make_optimizer):
    """Train a copy of ``start`` for ``STEPS`` full-batch steps: per-step train loss and test accuracy."""
    model = copy.deepcopy(start)
    opt = make_optimizer(model)
    losses, test_acc = [], []
    for _ in range(STEPS):
        if isinstance(opt, exactgn.GaussNewton):
            loss = opt.step(x, y)  # the loss before the step
        else:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        losses.append(loss.item())
        test_acc.append(accuracy(model, x_test, y_test))
    return losses, test_acc


contenders = {
    "GN, minimum norm J⁺": lambda m: exactgn.GaussNewton(m, lr=1.0, inverse="pinv"),
    "GN, right inverse J♭": lambda m: exactgn.GaussNewton(m, lr=1.0, inverse="right", least_squares=True),
    "Adam (lr 1e-3)": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "SGD (lr 0.1)": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
}
with warnings.catch_warnings():
    # Real images: the first block's activations are rank-deficient (constant border pixels), so J♭ falls
    # back to least squares there (GramFallbackWarning); see the user guide on exactness.
    warnings.simplefilter("ignore", exactgn.GramFallbackWarning)
    runs = {name: train(make) for name, make in contenders.items()}
for name, (losses, acc) in runs.items():
    print(f"{name:22s} train loss {losses[0]:.3f} → {losses[-1]:.4f}   test accuracy {acc[-1]:.3f}")
assert runs["GN, minimum norm J⁺"][0][-1] < 0.1 * runs["GN, minimum norm J⁺"][0][0]

# %%
# The figure: training loss (before each step) and test accuracy (after it).
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
for name, (losses, acc) in runs.items():
    style = "--" if "J♭" in name else "-"  # the two GN losses nearly coincide: J♭ dashed
    left.plot(range(STEPS), losses, style, label=name)
    right.plot(range(1, STEPS + 1), acc, style, label=name)
left.set(yscale="log", xlabel="step", ylabel="training loss (cross-entropy)")
right.set(xlabel="step", ylabel="test accuracy (1000 images)")
left.legend(fontsize=8)
fig.tight_layout()

# %%
# Every optimiser drives the training loss down on this one batch. With cross-entropy and the identity in
# place of its Hessian (the study's choice, ``hessian="identity"``), a GN step with ``lr = 1`` asks the
# linearised logits to move by ``v = p − y``, a step that shrinks as the predictions become confident, so GN's
# loss levels off where Adam's keeps falling; ``hessian="exact"`` takes the Newton step instead. One batch of
# 128 images says little about test accuracy: ``RESULTS.md`` compares the optimisers on more data and
# several seeds.
