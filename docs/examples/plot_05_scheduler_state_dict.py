"""
``GaussNewton`` with a learning-rate scheduler and ``state_dict``
=================================================================

:class:`exactgn.GaussNewton` is a :class:`torch.optim.Optimizer`: parameter groups, schedulers and
``state_dict``/``load_state_dict`` work as they do for torch's optimisers. The one difference is that
``step(inputs, targets)`` takes the batch and returns the loss before the step; there is no ``backward()``.
Here we decay the learning rate with :class:`torch.optim.lr_scheduler.StepLR`, save everything after three
steps, and check that resuming from the saved state continues bit for bit.
"""

import io

import torch

import exactgn

torch.manual_seed(0)
x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def make():
    """A fresh model, optimiser (with gradient noise, so the global RNG matters) and scheduler."""
    model = exactgn.RevMLP(32, 10, num_blocks=2, hidden=64, seed=0)
    opt = exactgn.GaussNewton(model, lr=1.0, inverse="pinv", damping=1e-4, noise=0.1, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def run(model, opt, sched, steps):
    """Take ``steps`` GN steps over the batches, stepping the scheduler after each; print loss and lr."""
    for _ in range(steps):
        xb, yb = batches[sched.last_epoch % len(batches)]
        loss = opt.step(xb, yb)
        print(f"  step {sched.last_epoch}: lr {opt.param_groups[0]['lr']:.3f}  loss before {loss.item():.4f}")
        sched.step()


model, opt, sched = make()
# The batches are random and unrelated, so each step fits its own batch and the loss on the next one need
# not fall: what matters here is that the resumed run repeats the uninterrupted one.
print("first three steps:")
run(model, opt, sched, 3)
buffer = io.BytesIO()  # a file in practice
torch.save(
    {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "rng": torch.get_rng_state(),
    },
    buffer,
)
print("three more:")
run(model, opt, sched, 3)
finished = {n: p.detach().clone() for n, p in model.named_parameters()}

# %%
# Resume from the saved state in fresh objects
# --------------------------------------------
buffer.seek(0)
saved = torch.load(buffer)
model2, opt2, sched2 = make()
model2.load_state_dict(saved["model"])
opt2.load_state_dict(saved["opt"])
sched2.load_state_dict(saved["sched"])
torch.set_rng_state(saved["rng"])  # the noise is drawn from torch's global generator
print("the same three, resumed:")
run(model2, opt2, sched2, 3)
same = all(torch.equal(finished[n], p) for n, p in model2.named_parameters())
print("bit-identical to the uninterrupted run:", same)
assert same

# %%
# The optimiser's options can be inspected and changed per parameter group like any torch optimiser's:
print({k: v for k, v in opt2.param_groups[0].items() if k != "params"})
