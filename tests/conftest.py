"""Shared fixtures and the brute-force float64 references (DESIGN §4). References live here, not in the
package."""

from __future__ import annotations

import os
import zlib
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


@pytest.fixture(scope="session", autouse=True)
def private_live_runs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The tests' runs (and the processes they start) register in a folder of their own, so that exactgn runs
    elsewhere on the machine do not change the thread count of a test run with ``train.threads = 0``."""
    os.environ["EXACTGN_LIVE_RUNS"] = str(tmp_path_factory.mktemp("live-runs"))


@pytest.fixture
def keep_threads():
    """Restore torch's thread count after a test whose run sets it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> torch.Generator:
    """A seeded generator, one stream per test: every check draws its own inputs and weights.

    By default the seed is a hash of the test's id, so CI and every rerun see the same draws; set
    ``EXACTGN_TEST_SEED`` to an integer to replay a seed, or to ``random`` to explore new draws (the seed is
    printed and shown on failure)."""
    env = os.environ.get("EXACTGN_TEST_SEED", "")
    if env == "random":
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    else:
        seed = int(env) if env else zlib.crc32(request.node.nodeid.encode())
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
    """``J = ∂o/∂θ`` by ``torch.func.jacrev``: ``Bk × P``, rows ``i·k + c``, columns in ``named_parameters``
    order."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    jac = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)
    rows = x.shape[0] * model.num_classes
    return torch.cat([jac[name].reshape(rows, -1) for name in params], dim=1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---------------------------------------------------------------------------- tiny genuine runs (diagnostics,
# report)
TINY_RUN_TOML = """
name = "tiny"
[data]
dataset = "mnist-small"
train_size = 64
test_size = 64
[model]
blocks = 2
hidden = 96
init_std = 0.01
dtype = "float64"
[train]
epochs = 2
keep_checkpoints = true
checkpoint_every = 1
[diagnostics]
enabled = true
probe_size = 8
"""

# (folder, optimiser, seed, batch size (0 = full batch), learning rate)
TINY_RUNS = (
    ("gn-full-s0", "gn", 0, 0, 0.5),
    ("gn-full-s1", "gn", 1, 0, 0.5),
    ("adam-full-s0", "adam", 0, 0, 1e-3),
    ("adam-mini-s0", "adam", 0, 16, 1e-3),
)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep folder of four genuine ``exactgn train`` runs on the bundled MNIST (64 images, 2 epochs,
    diagnostics on, epoch checkpoints kept): GN full-batch with seeds 0 and 1, Adam full-batch and Adam
    mini-batch (B=16)."""
    from exactgn.lab.config import loads_config
    from exactgn.lab.train import train

    sweep = tmp_path_factory.mktemp("sweep")
    base = loads_config(TINY_RUN_TOML)
    for folder, opt, seed, batch, lr in TINY_RUNS:
        overrides = [
            f"name='{folder}'",
            f"optim.name='{opt}'",
            f"seed={seed}",
            f"train.batch_size={batch}",
            f"optim.lr={lr}",
        ]
        train(base, sweep / folder, overrides=overrides, progress=False)
    return sweep
