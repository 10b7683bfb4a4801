"""Data readers: formats written by the tests themselves, every kind of bad file, the bundled subset, the real
data."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_root

from exactgn.lab import data as D

# The SHA-256 of exactgn/lab/assets/mnist_small.npz, recorded here as well as in the package: changing the
# bundle
# must be a deliberate change of both.
BUNDLED_SHA256 = "a92864861dbffded480439dd76ab960e2d417ce75070fc285763bd8050b399b8"


def real_root() -> Path:
    root = data_root()
    if root is None or not (root / "MNIST" / "raw").is_dir():
        pytest.fail(
            "the real MNIST/CIFAR-10 files are needed for this test: set EXACTGN_DATA to the folder holding "
            "MNIST/raw/*-ubyte.gz and cifar-10-batches-py/ (CI uses ../shared/data)"
        )
    return root


# ---------------------------------------------------------------------------- writers of small files
def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int = 30, n_test: int = 12, *, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, stem in D.MNIST_FILES.items():
        blob = idx_bytes(arrays[key], 2051 if "images" in key else 2049)
        if gz:
            (raw / f"{stem}.gz").write_bytes(gzip.compress(blob))
        else:
            (raw / stem).write_bytes(blob)
    return arrays


def cifar_batch(
    n: int, rng: np.random.Generator, *, py2_layout: bool = True
) -> tuple[dict, np.ndarray, list[int]]:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    if py2_layout:  # what the official files unpickle to with encoding="bytes"
        obj = {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"f"] * n}
    else:
        obj = {"batch_label": "x", "labels": labels, "data": data}
    return obj, data, labels


def write_cifar(
    folder: Path, n: int = 4, seed: int = 0, *, py2_layout: bool = True
) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    train_data, train_labels = [], []
    for name in D.CIFAR_TRAIN:
        obj, data, labels = cifar_batch(n, rng, py2_layout=py2_layout)
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))
        train_data.append(data)
        train_labels += labels
    obj, test_data, test_labels = cifar_batch(n + 1, rng, py2_layout=py2_layout)
    (d / "test_batch").write_bytes(pickle.dumps(obj, protocol=2))
    return np.concatenate(train_data), train_labels, test_data, test_labels


# ---------------------------------------------------------------------------- formats
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_read_exactly(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    raw = D.read_mnist(tmp_path)
    assert raw.train.images.shape == (30, 1, 28, 28) and raw.test.images.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(raw.train.images[:, 0], arrays["train_images"])
    np.testing.assert_array_equal(raw.test.images[:, 0], arrays["test_images"])
    np.testing.assert_array_equal(raw.train.labels, arrays["train_labels"])
    np.testing.assert_array_equal(raw.test.labels, arrays["test_labels"])
    assert raw.train.labels.dtype == np.int64


@pytest.mark.parametrize("py2_layout", [True, False])
def test_cifar_batches_read_exactly(tmp_path, py2_layout):
    train_data, train_labels, test_data, test_labels = write_cifar(tmp_path, py2_layout=py2_layout)
    raw = D.read_cifar10(tmp_path)
    assert raw.train.images.shape == (20, 3, 32, 32) and raw.test.images.shape == (5, 3, 32, 32)
    assert raw.train.labels.tolist() == train_labels and raw.test.labels.tolist() == test_labels
    # Rows are channel-major: the first 1024 bytes are the red plane, row by row.
    np.testing.assert_array_equal(raw.train.images[0, 0].reshape(-1), train_data[0, :1024])
    np.testing.assert_array_equal(raw.train.images[7, 2, 3, 5], train_data[7, 2048 + 3 * 32 + 5])
    np.testing.assert_array_equal(raw.test.images.reshape(5, -1), test_data)


def test_data_root_from_argument_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EXACTGN_DATA", str(tmp_path / "env"))
    assert D.resolve_root(None) == tmp_path / "env"
    assert D.resolve_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("EXACTGN_DATA")
    with pytest.raises(D.DataError, match="--data-root.*EXACTGN_DATA"):
        D.resolve_root("")
    write_mnist(tmp_path / "env")
    monkeypatch.setenv("EXACTGN_DATA", str(tmp_path / "env"))
    assert len(D.load_dataset("mnist").train) == 30


# ---------------------------------------------------------------------------- bad files
def _mnist_file(tmp_path: Path, key: str) -> Path:
    return tmp_path / "MNIST" / "raw" / f"{D.MNIST_FILES[key]}.gz"


def _corrupt(tmp_path: Path, key: str, blob: bytes, *, compress: bool = True) -> Path:
    path = _mnist_file(tmp_path, key)
    path.write_bytes(gzip.compress(blob) if compress else blob)
    return path


BAD_MNIST = {
    # case: (file, how to make the bad bytes from the good IDX bytes, expected message)
    "bad magic": ("train_images", lambda b: (1234).to_bytes(4, "big") + b[4:], "bad magic number"),
    "html instead of idx": ("test_labels", lambda b: b"<html><body>404</body></html>", "bad magic number"),
    "truncated pixels": ("train_images", lambda b: b[:-100], "truncated"),
    "trailing bytes": ("train_labels", lambda b: b + b"\x00\x01", "longer than its header says"),
    "tiny file": ("train_labels", lambda b: b[:5], "too short for an IDX header"),
    "labels where images belong": ("train_images", None, "holds labels"),
    "count mismatch": ("test_labels", None, "holds 12 images but .* holds 11 labels"),
    "label out of range": ("train_labels", None, "labels must lie in 0..9"),
    "wrong image size": ("test_images", None, "27×27, MNIST's are 28×28"),
}


@pytest.mark.parametrize("case", list(BAD_MNIST))
def test_bad_mnist_files_are_named(tmp_path, case):
    arrays = write_mnist(tmp_path)
    key, edit, message = BAD_MNIST[case]
    good = idx_bytes(arrays[key], 2051 if "images" in key else 2049)
    if case == "labels where images belong":
        blob = idx_bytes(arrays["train_labels"], 2049)
    elif case == "count mismatch":
        blob = idx_bytes(arrays["test_labels"][:11], 2049)
    elif case == "label out of range":
        blob = idx_bytes(np.where(np.arange(30) == 3, 10, arrays["train_labels"]), 2049)
    elif case == "wrong image size":
        blob = idx_bytes(arrays["test_images"][:, :27, :27], 2051)
    else:
        blob = edit(good)
    path = _corrupt(tmp_path, key, blob)
    with pytest.raises(D.DataError, match=message) as err:
        D.read_mnist(tmp_path)
    assert path.name in str(err.value)


def test_truncated_and_corrupt_gzip_are_named(tmp_path):
    arrays = write_mnist(tmp_path)
    path = _mnist_file(tmp_path, "train_images")
    whole = gzip.compress(idx_bytes(arrays["train_images"], 2051))
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(D.DataError, match=r"truncated \(the compressed stream ends early\)") as err:
        D.read_mnist(tmp_path)
    assert str(path) in str(err.value)
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(D.DataError, match="not a valid gzip file") as err:
        D.read_mnist(tmp_path)
    assert str(path) in str(err.value)


def test_missing_files_say_what_to_place_and_where(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    _mnist_file(tmp_path, "test_labels").unlink()
    with pytest.raises(D.DataError, match=r"missing t10k-labels-idx1-ubyte\.gz in .*MNIST/raw") as err:
        D.load_raw("mnist", tmp_path)
    assert err.value.missing and "--download" in str(err.value)
    # --download without torchvision: the error names every file to place and where.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(D.DataError, match=r"needs torchvision.*pip install 'exactgn\[vision\]'") as err:
        D.load_raw("mnist", tmp_path, download=True)
    for stem in D.MNIST_FILES.values():
        assert str(tmp_path / "MNIST" / "raw" / f"{stem}.gz") in str(err.value)
    with pytest.raises(D.DataError, match=r"cifar-10-batches-py.*data_batch_1..5, test_batch"):
        D.load_raw("cifar10", tmp_path, download=True)
    with pytest.raises(D.DataError, match="missing data_batch_1, .*test_batch in"):
        D.load_raw("cifar10", tmp_path)


class _Evil:
    def __reduce__(self):
        return (subprocess.call, (["false"],))


BAD_CIFAR = {
    "truncated": (lambda good: good[: len(good) // 3], "truncated: the pickle ends early"),
    "garbage": (lambda good: b"\x00garbage" * 10, "not a valid CIFAR-10 batch pickle"),
    "not a dict": (
        lambda good: pickle.dumps([1, 2, 3], protocol=2),
        "a CIFAR-10 batch is a pickled dict, got list",
    ),
    "no data": (lambda good: pickle.dumps({b"labels": [1]}, protocol=2), "has no 'data' entry"),
    "wrong shape": (
        lambda good: pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, protocol=2),
        r"'data' must be a uint8 array of shape \(N, 3072\)",
    ),
    "float data": (
        lambda good: pickle.dumps({b"data": np.zeros((2, 3072)), b"labels": [1, 2]}, protocol=2),
        "got float64",
    ),
    "label count": (
        lambda good: pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2]}, protocol=2),
        "3 images but 2 labels",
    ),
    "label range": (
        lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 12]}, protocol=2),
        "labels must lie in 0..9",
    ),
    "code in the pickle": (
        lambda good: pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2),
        r"refers to \w+\.call, which a CIFAR-10 batch never contains",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CIFAR))
def test_bad_cifar_files_are_named(tmp_path, case):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    edit, message = BAD_CIFAR[case]
    path.write_bytes(edit(path.read_bytes()))
    with pytest.raises(D.DataError, match=message) as err:
        D.read_cifar10(tmp_path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------- bundled subset
def test_bundled_mnist_shape_balance_and_checksum():
    digest = hashlib.sha256(D.BUNDLED_MNIST.read_bytes()).hexdigest()
    assert digest == BUNDLED_SHA256 == D.BUNDLED_MNIST_SHA256
    assert D.BUNDLED_MNIST.stat().st_size <= 2 * 1024 * 1024
    raw = D.read_bundled_mnist()
    assert raw.train.images.shape == (5000, 1, 28, 28) and raw.train.images.dtype == np.uint8
    assert raw.test.images.shape == (1000, 1, 28, 28)
    assert np.bincount(raw.train.labels, minlength=10).tolist() == [500] * 10
    assert np.bincount(raw.test.labels, minlength=10).tolist() == [100] * 10
    assert raw.train.images.max() == 255 and raw.train.images.min() == 0


def test_bundled_mnist_checksum_is_enforced(tmp_path, monkeypatch):
    copy = tmp_path / "mnist_small.npz"
    blob = bytearray(D.BUNDLED_MNIST.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    copy.write_bytes(bytes(blob))
    monkeypatch.setattr(D, "BUNDLED_MNIST", copy)
    with pytest.raises(D.DataError, match="SHA-256 .* differs from the recorded"):
        D.read_bundled_mnist()


def test_bundled_mnist_is_real_mnist_and_its_script_reproduces_it(tmp_path):
    root = real_root()
    real = D.read_mnist(root)
    with np.load(D.BUNDLED_MNIST) as npz:
        for split, full in (("train", real.train), ("test", real.test)):
            idx = npz[f"{split}_index"]
            np.testing.assert_array_equal(npz[f"{split}_images"], full.images[idx, 0])
            np.testing.assert_array_equal(npz[f"{split}_labels"], full.labels[idx])
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_bundled_mnist.py"
    out = tmp_path / "again.npz"
    subprocess.run(
        [sys.executable, str(script), "--data-root", str(root), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert hashlib.sha256(out.read_bytes()).hexdigest() == BUNDLED_SHA256


# ---------------------------------------------------------------------------- preparation
def test_real_data_normalisation_matches_the_reference_statistics():
    root = real_root()
    mnist = D.load_dataset("mnist", root)
    assert len(mnist.train) == 60000 and len(mnist.test) == 10000 and mnist.features == 784
    x = mnist.train.images.double()
    assert abs(x.mean().item()) < 2e-4 and abs(x.std().item() - 1) < 2e-4
    cifar = D.load_dataset("cifar10", root, train_size=1024)
    assert cifar.train.images.shape == (1024, 3, 32, 32) and len(cifar.test) == 10000
    raw = D.read_cifar10(root)
    x = D.normalise(raw.train.images, "cifar10", torch.float64)
    assert x.mean((0, 2, 3)).abs().max().item() < 2e-4
    assert (x.std((0, 2, 3)) - 1).abs().max().item() < 2e-3
    # The full-batch subset is the first N training images by default, as in the reference.
    assert torch.equal(cifar.train.labels, torch.from_numpy(raw.train.labels[:1024]))
    assert cifar.classes[6] == "frog" and int(cifar.train.labels[0]) == 6  # data_batch_1[0] is a frog


def test_subsets_first_and_balanced():
    labels = np.repeat(np.arange(10), 30)[np.random.default_rng(0).permutation(300)]
    np.testing.assert_array_equal(D.select_subset(labels, 25), np.arange(25))
    np.testing.assert_array_equal(D.select_subset(labels, 0), np.arange(300))
    a = D.select_subset(labels, 57, "balanced", seed=3)
    counts = np.bincount(labels[a], minlength=10)
    assert len(a) == 57 == len(set(a.tolist())) and counts.min() == 5 and counts.max() == 6
    np.testing.assert_array_equal(a, D.select_subset(labels, 57, "balanced", seed=3))
    assert not np.array_equal(a, D.select_subset(labels, 57, "balanced", seed=4))
    assert np.all(np.diff(a) > 0)
    scarce = np.concatenate([np.zeros(5, np.int64), np.repeat(np.arange(1, 10), 30)])
    with pytest.raises(ValueError, match="needs 10 samples of class 0, but only 5 exist"):
        D.select_subset(scarce, 100, "balanced")
    with pytest.raises(ValueError, match="'first' or 'balanced'"):
        D.select_subset(labels, 10, "random")


def test_one_hot_and_normalise_mnist():
    y = torch.tensor([3, 0, 9])
    rows = D.one_hot(y, 10)
    assert rows.shape == (3, 10) and rows.sum().item() == 3 and rows[0, 3] == 1 and rows[2, 9] == 1
    img = np.full((1, 1, 28, 28), 255, np.uint8)
    assert torch.allclose(D.normalise(img, "mnist"), torch.full((1, 1, 28, 28), (1 - 0.1307) / 0.3081))


# ---------------------------------------------------------------------------- augmentation
def ramps(n: int, size: int) -> torch.Tensor:
    """``n`` two-channel images: channel 0 holds each pixel centre's x, channel 1 its y."""
    coords = torch.arange(size, dtype=torch.float64) + 0.5
    return torch.cat(
        [
            coords.view(1, 1, 1, size).expand(n, 1, size, size),
            coords.view(1, 1, size, 1).expand(n, 1, size, size),
        ],
        1,
    ).contiguous()


def crop_boxes(out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(left, top, width, height) of each crop, read off resampled ramps. Output column j samples
    x = left + (j + 0.5)·w/size; columns 8 and size−9 never sample beyond the outer pixel centres."""
    size = out.shape[-1]
    a, b = 8, size - 9
    x, y = out[:, 0, 0], out[:, 1, :, 0]
    w = (x[:, b] - x[:, a]) / (b - a) * size
    h = (y[:, b] - y[:, a]) / (b - a) * size
    return x[:, a] - (a + 0.5) * w / size, y[:, a] - (a + 0.5) * h / size, w, h


def test_random_resized_crop_geometry():
    """On linear ramps, bilinear resampling is exact, so the output reveals each crop box: every box must lie
    in the image, with area fraction in ``scale`` and aspect ratio in ``ratio``."""
    n, size = 64, 32
    images = ramps(n, size)
    scale, ratio = (0.2, 0.6), (0.5, 2.0)
    out = D.random_resized_crop(images, torch.Generator().manual_seed(1), scale, ratio)
    assert out.shape == images.shape
    left, top, w, h = crop_boxes(out)
    for t in (w, h, left, top):  # whole pixels
        assert torch.allclose(t, t.round(), atol=1e-6)
    area = w * h / size**2
    assert (area >= scale[0] - 0.03).all() and (area <= scale[1] + 0.03).all()
    assert (w / h >= ratio[0] * 0.9).all() and (w / h <= ratio[1] * 1.1).all()
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= size).all() and (top + h <= size).all()
    assert len(set(left.tolist())) > 5  # boxes are placed at random
    again = D.random_resized_crop(images, torch.Generator().manual_seed(1), scale, ratio)
    assert torch.equal(out, again)


def test_random_resized_crop_whole_image_is_identity_and_falls_back_to_centre():
    x = torch.randn(5, 3, 32, 32)
    assert torch.allclose(
        D.random_resized_crop(x, torch.Generator().manual_seed(0), (1.0, 1.0), (1.0, 1.0)), x, atol=1e-6
    )
    # A box of the whole area with aspect ratio 4 never fits: the fall-back is the full-width box of ratio 4
    # (32 × 8), centred (top 12).
    out = D.random_resized_crop(ramps(3, 32), torch.Generator().manual_seed(0), (1.0, 1.0), (4.0, 4.0))
    left, top, w, h = crop_boxes(out)
    for t, value in ((left, 0.0), (top, 12.0), (w, 32.0), (h, 8.0)):
        assert torch.allclose(t, torch.full_like(t, value), atol=1e-6)


def test_asking_for_more_images_than_exist_is_an_error():
    with pytest.raises(
        D.DataError, match=r"data.train_size = 6000 exceeds the 5000 images of mnist-small's training set"
    ):
        D.load_dataset("mnist-small", train_size=6000)
    with pytest.raises(
        D.DataError, match=r"data.test_size = 1001 exceeds the 1000 images of mnist-small's test set"
    ):
        D.load_dataset("mnist-small", test_size=1001)
    assert len(D.load_dataset("mnist-small", train_size=5000, test_size=1000).train) == 5000


# ---------------------------------------------------------------------------- validation split
@pytest.mark.parametrize("subset", ["first", "balanced"])
def test_validation_split_is_disjoint_seeded_and_leaves_the_training_subset_alone(subset):
    labels = np.repeat(np.arange(10), 40)[np.random.default_rng(1).permutation(400)]
    plain = D.select_subset(labels, 120, subset, seed=5)
    train, val = D.split_indices(labels, 120, subset, 5, val_size=70, val_seed=2)
    np.testing.assert_array_equal(train, plain)  # turning validation on never changes the training images
    assert len(val) == 70 == len(set(val.tolist())) and np.all(np.diff(val) > 0)
    assert not set(val.tolist()) & set(train.tolist()) and val.min() >= 0 and val.max() < 400
    again_train, again_val = D.split_indices(labels, 120, subset, 5, val_size=70, val_seed=2)
    np.testing.assert_array_equal(again_val, val)
    np.testing.assert_array_equal(again_train, train)
    other = D.split_indices(labels, 120, subset, 5, val_size=70, val_seed=3)[1]
    assert not np.array_equal(other, val) and not set(other.tolist()) & set(train.tolist())
    # Uniform over the pool of images outside the training subset: every pool image can be drawn.
    seen = set()
    for seed in range(60):
        seen |= set(D.split_indices(labels, 120, subset, 5, val_size=70, val_seed=seed)[1].tolist())
    assert seen == set(range(400)) - set(train.tolist())


def test_validation_split_of_the_whole_training_file_gives_training_the_rest():
    labels = np.arange(50) % 10
    train, val = D.split_indices(labels, 0, val_size=12, val_seed=7)
    assert len(val) == 12 and len(train) == 38
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(50))
    train0, val0 = D.split_indices(labels, 0)
    np.testing.assert_array_equal(train0, np.arange(50))
    assert len(val0) == 0


def test_a_validation_set_that_does_not_fit_is_refused_with_the_keys_to_change():
    labels = np.arange(100) % 10
    with pytest.raises(
        D.DataError,
        match=r"data.val_size = 31 is too large: "
        r"data.train_size = 70 leaves 30 .*"
        r"use data.val_size <= 30",
    ):
        D.split_indices(labels, 70, val_size=31)
    with pytest.raises(D.DataError, match=r"data.val_size = 100 is too large: .*use data.val_size <= 99"):
        D.split_indices(labels, 0, val_size=100)
    with pytest.raises(D.DataError, match="data.val_size must be an integer >= 0"):
        D.split_indices(labels, 10, val_size=-1)
    assert len(D.split_indices(labels, 70, val_size=30)[1]) == 30
    with pytest.raises(D.DataError, match="data.val_size = 4001 is too large"):
        D.load_dataset("mnist-small", train_size=1000, val_size=4001)


def test_load_dataset_validation_images_come_from_the_training_file_only():
    raw = D.read_bundled_mnist()
    split = D.load_dataset("mnist-small", train_size=256, test_size=100, val_size=300, val_seed=4)
    plain = D.load_dataset("mnist-small", train_size=256, test_size=100)
    assert split.val is not None and plain.val is None and len(split.val) == 300
    assert torch.equal(split.train.images, plain.train.images)
    assert torch.equal(split.test.images, plain.test.images)
    np.testing.assert_array_equal(split.train.index.numpy(), np.arange(256))
    idx = split.val.index.numpy()
    assert idx.min() >= 256 and not set(idx.tolist()) & set(split.train.index.tolist())
    # The validation tensors are the training file's images and labels at those positions, normalised.
    assert torch.equal(split.val.images, D.normalise(raw.train.images[idx], "mnist-small"))
    assert torch.equal(split.val.labels, torch.from_numpy(raw.train.labels[idx]))
    # No validation image is (pixel for pixel) a test image of the run.
    val_flat = {bytes(raw.train.images[i].tobytes()) for i in idx}
    assert not val_flat & {bytes(raw.test.images[i].tobytes()) for i in range(100)}
