"""The lab's extension points: a new optimiser is one config table and one stepper (AdamW), a new dataset
one registry entry (Fashion-MNIST, read here from IDX files the test writes)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from exactgn.lab import data as D
from exactgn.lab.config import OPTIMISER_TABLES, ConfigError, loads_config
from exactgn.lab.rundir import read_meta, read_rows
from exactgn.lab.steppers import STEPPERS, build_model, build_stepper
from exactgn.lab.train import train


def test_every_optimiser_table_has_a_stepper_and_back():
    assert set(STEPPERS) == set(OPTIMISER_TABLES)


def test_adamw_stepper_is_torchs_adamw_with_decoupled_decay():
    cfg = loads_config(
        '[optim]\nname = "adamw"\nlr = 0.01\nweight_decay = 0.1\n[optim.adamw]\n'
        "betas = [0.8, 0.99]\neps = 1e-6\n[model]\nhidden = 16\ndtype = 'float64'\n"
    )
    model = build_model(cfg, 12, 3)
    reference = build_model(cfg, 12, 3)
    stepper = build_stepper(cfg, model)
    assert isinstance(stepper.optimizer, torch.optim.AdamW)
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 3, (8,))
    # One AdamW step by hand: θ ← θ(1 − lr·λ) − lr·m̂/(√v̂ + ε), with m̂ = g, v̂ = g² after bias correction.
    loss = torch.nn.functional.cross_entropy(reference(x), y)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    outcome = stepper.step(x, y)
    assert outcome.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    for (name, p), p0, g in zip(model.named_parameters(), reference.parameters(), grads):
        expected = p0.detach() * (1 - 0.01 * 0.1) - 0.01 * g / (g.abs() + 1e-6)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12, msg=name)


def test_adamw_config_is_checked_and_trains(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.adamw\.betas: expected two numbers in \[0, 1\)"):
        loads_config("[optim.adamw]\nbetas = [0.9, 1.5]\n")
    with pytest.raises(ConfigError, match=r"optim\.adamw\.amsgrad: expected true or false"):
        loads_config("[optim.adamw]\namsgrad = 1\n")
    cfg = loads_config(
        'name = "w"\n[optim]\nname = "adamw"\nlr = 1e-3\nweight_decay = 0.01\n'
        "[data]\ntrain_size = 40\ntest_size = 20\n[model]\nhidden = 32\n"
        "[train]\nepochs = 1\nbatch_size = 20\n"
    )
    run = train(cfg, tmp_path / "run", progress=False)
    assert read_meta(run)["status"] == "finished" and read_meta(run)["optimiser"] == "adamw"
    assert len(read_rows(run / "steps.csv")) == 2


def _idx(path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _write_fashion(root, n_train: int = 30, n_test: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    folder = root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for stem, array in arrays.items():
        _idx(folder / f"{stem}.gz", array)
    return arrays


def test_fashion_mnist_reads_its_idx_files_and_normalises_with_its_statistics(tmp_path):
    arrays = _write_fashion(tmp_path)
    split = D.load_dataset("fashion-mnist", tmp_path, train_size=20, dtype=torch.float64)
    assert split.classes[0] == "T-shirt/top" and split.num_classes == 10 and split.features == 784
    assert len(split.train) == 20 and len(split.test) == 12
    pixels = arrays["train-images-idx3-ubyte"][:20].astype(np.float64) / 255.0
    expected = torch.from_numpy((pixels - 0.2860) / 0.3530)[:, None]
    torch.testing.assert_close(split.train.images, expected, rtol=1e-12, atol=1e-12)
    assert split.train.labels.tolist() == arrays["train-labels-idx1-ubyte"][:20].tolist()
    assert loads_config('[data]\ndataset = "fashion-mnist"\n').data.dataset == "fashion-mnist"


def test_fashion_mnist_errors_name_the_files(tmp_path, monkeypatch):
    _write_fashion(tmp_path)
    (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        D.DataError, match=r"Fashion-MNIST: missing t10k-labels-idx1-ubyte\.gz in .*FashionMNIST"
    ):
        D.load_raw("fashion-mnist", tmp_path)
    # --download without torchvision: the error says what to install and which files to place by hand.
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)
    with pytest.raises(D.DataError, match=r"needs torchvision.*FashionMNIST/raw"):
        D.load_raw("fashion-mnist", tmp_path, download=True)
