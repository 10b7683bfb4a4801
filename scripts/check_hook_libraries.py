"""Check that hook-based libraries see a RevMLP's layers through ``exactgn.linear_view`` (issue 11).

    pip install backpack-for-pytorch curvlinops-for-pytorch --no-deps   # keep torch==2.13.0 (CPU)
    PYTHONPATH=. python scripts/check_hook_libraries.py

Not part of the test suite (the libraries are not dependencies). In float64 on a small RevMLP:

* BackPACK ``BatchGrad`` (per-sample gradients from its Linear hooks) on the view against ``torch.func``
  per-sample gradients of the RevMLP itself; and what BackPACK gives on the RevMLP without the view.
* curvlinops ``KFACLinearOperator`` (type-2 Fisher = GGN) on the view for one sample, where Kronecker
  factorisation is exact: each weight's KFAC block against the exact GGN block ``J_wᵀ H J_w``
  (``torch.func``).

Prints one line per check with the largest relative error; exits 1 if any exceeds 1e-10.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import exactgn

F64 = torch.float64
TOL = 1e-10


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def model_and_batch(batch: int) -> tuple[exactgn.RevMLP, torch.Tensor, torch.Tensor]:
    model = exactgn.RevMLP(10, 4, num_blocks=2, hidden=12, init_std=0.3, seed=3, dtype=F64)
    gen = torch.Generator().manual_seed(4)
    return (
        model,
        torch.randn(batch, 10, generator=gen, dtype=F64),
        torch.randint(0, 4, (batch,), generator=gen),
    )


def backpack_check() -> float:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    model, x, y = model_and_batch(6)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(ps, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, ps, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    want = vmap(grad(sample_loss), (None, 0, 0))(params, x, y)
    view = extend(exactgn.linear_view(model))
    with backpack(BatchGrad()):
        nn.functional.cross_entropy(view(x), y, reduction="sum").backward()
    source = dict(model.named_parameters())
    worst = max(relative(p.grad_batch, want[view.source_names()[n]]) for n, p in view.named_parameters())
    print(f"BackPACK BatchGrad on linear_view(RevMLP): {len(source)} parameters, max rel. error {worst:.2e}")
    for p in model.parameters():  # the view's run left grad_batch on these very parameters
        p.grad, p.grad_batch = None, None
    bare = extend(model)
    with backpack(BatchGrad()):
        nn.functional.cross_entropy(bare(x), y, reduction="sum").backward()
    found = sum(getattr(p, "grad_batch", None) is not None for p in bare.parameters())
    print(f"BackPACK BatchGrad on the RevMLP itself: per-sample gradients for {found} of {len(source)}")
    return worst


def kfac_check() -> float:
    from curvlinops import KFACLinearOperator

    model, x, y = model_and_batch(1)
    view = exactgn.linear_view(model)
    params = list(view.parameters())
    kfac = KFACLinearOperator(
        view, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="type-2", check_deterministic=False
    )
    dense = kfac @ torch.eye(sum(p.numel() for p in params), dtype=F64)
    jac = jacrev(lambda ps: functional_call(view, ps, (x,)))(
        {n: p.detach() for n, p in view.named_parameters()}
    )
    probs = torch.softmax(view(x).detach(), dim=1)[0]
    hess = torch.diag(probs) - torch.outer(probs, probs)
    worst, start = 0.0, 0
    for name, p in view.named_parameters():
        j = jac[name].reshape(4, -1)
        if name.endswith("weight"):
            block = dense[start : start + p.numel(), start : start + p.numel()]
            worst = max(worst, relative(block, j.T @ hess @ j))
        start += p.numel()
    print(f"curvlinops KFAC (type-2, one sample) on linear_view(RevMLP): max rel. error {worst:.2e}")
    return worst


def main() -> int:
    warnings.filterwarnings("ignore", message=".*(does not have an extension|Full backward hook).*")
    errors = [backpack_check(), kfac_check()]
    return 0 if max(errors) <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
