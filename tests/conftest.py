"""Shared fixtures and the brute-force float64 references (DESIGN §4). References live here, not in the package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, jacrev

import exactgn


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_root() -> Path | None:
    """The real MNIST/CIFAR-10 root: ``EXACTGN_DATA`` or ``../shared/data``; ``None`` if absent."""
    root = Path(os.environ.get("EXACTGN_DATA", SHARED_DATA))
    return root if root.is_dir() else None


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh, randomly seeded generator: every check draws new inputs and weights. The seed is printed on failure."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item()) if "EXACTGN_TEST_SEED" not in os.environ else int(os.environ["EXACTGN_TEST_SEED"])
    print(f"test seed: {seed}")
    return torch.Generator().manual_seed(seed)


def random_model(rng: torch.Generator, **kw) -> exactgn.RevMLP:
    """A float64 RevMLP with a random seed and (by default) weights large enough to be non-linear."""
    kw.setdefault("init_std", 0.3)
    kw.setdefault("dtype", torch.float64)
    seed = int(torch.randint(0, 2**31 - 1, (), generator=rng))
    return exactgn.RevMLP(seed=seed, **kw)


def param_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def flat(direction: dict[str, torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([direction[name].reshape(-1) for name in param_names(model)])


def jacobian(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``J = ∂o/∂θ`` by ``torch.func.jacrev``: ``Bk × P``, rows ``i·k + c``, columns in ``named_parameters`` order."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    jac = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)
    rows = x.shape[0] * model.num_classes
    return torch.cat([jac[name].reshape(rows, -1) for name in params], dim=1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())
