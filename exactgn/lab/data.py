"""MNIST, Fashion-MNIST and CIFAR-10 from their standard files, the bundled small MNIST, subsets and
augmentation.

Files are read with numpy alone (torchvision is needed only for ``download=True``), in the layout that
torchvision uses under a data root::

    ROOT/MNIST/raw/train-images-idx3-ubyte.gz   (or uncompressed, without .gz)
    ROOT/MNIST/raw/train-labels-idx1-ubyte.gz
    ROOT/MNIST/raw/t10k-images-idx3-ubyte.gz
    ROOT/MNIST/raw/t10k-labels-idx1-ubyte.gz
    ROOT/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch
    ROOT/FashionMNIST/raw/  (Fashion-MNIST: the same four file names as MNIST)

The root is the ``root`` argument, else the environment variable ``EXACTGN_DATA``. Every file is checked as it
is read: a truncated, corrupt or mismatched file raises :class:`DataError` naming the file and what is wrong.

``mnist-small`` is a class-balanced subset of the real MNIST shipped inside the package
(``exactgn/lab/assets/mnist_small.npz``, made by ``scripts/make_bundled_mnist.py``); it needs no download.

Images come out as float tensors ``N × C × H × W`` normalised with the reference statistics, labels as
``int64`` class indices ``N`` (:func:`one_hot` gives ``N × k`` rows).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import ExactGNError
from .rundir import file_sha256

__all__ = [
    "DATASETS",
    "REGISTRY",
    "DatasetEntry",
    "read_fashion_mnist",
    "read_idx_dataset",
    "DataError",
    "RawSplit",
    "RawData",
    "Dataset",
    "DataSplit",
    "BUNDLED_MNIST",
    "BUNDLED_MNIST_SHA256",
    "resolve_root",
    "read_idx",
    "read_mnist",
    "read_cifar10",
    "read_cifar_batch",
    "read_bundled_mnist",
    "load_raw",
    "normalise",
    "select_subset",
    "split_indices",
    "load_dataset",
    "one_hot",
    "random_resized_crop",
]

SUBSETS = ("first", "balanced")  # how data.train_size images are chosen

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)

BUNDLED_MNIST = Path(__file__).resolve().parent / "assets" / "mnist_small.npz"
# SHA-256 of the committed bundle; the loader and the tests check it. Regenerate with
# scripts/make_bundled_mnist.py (deterministic) and update this value only together with the file.
BUNDLED_MNIST_SHA256 = "a92864861dbffded480439dd76ab960e2d417ce75070fc285763bd8050b399b8"

_IDX_IMAGES, _IDX_LABELS = 2051, 2049


class DataError(ExactGNError, ValueError):
    """A dataset file is missing, truncated, corrupt or inconsistent; the message names the file.

    ``missing`` is true when files are absent (as opposed to present but bad).
    """

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass
class RawSplit:
    """One split as stored: ``images`` uint8 ``N × C × H × W``, ``labels`` int64 ``N``."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class RawData:
    """Both splits of a dataset as stored on disk (uint8 pixels), with where they came from."""

    name: str
    train: RawSplit
    test: RawSplit
    source: str


@dataclass
class Dataset:
    """A normalised split: ``images`` float ``N × C × H × W``, ``labels`` int64 ``N``; ``index`` holds each
    image's position in the original file (``N``)."""

    images: Tensor
    labels: Tensor
    index: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def features(self) -> int:
        """``d = C·H·W``, the flattened input size."""
        return int(math.prod(self.images.shape[1:]))

    def to(self, device: torch.device | str) -> "Dataset":
        return Dataset(self.images.to(device), self.labels.to(device), self.index)


@dataclass
class DataSplit:
    """What training needs: the normalised train and test sets, the class names and where the data came from;
    ``val``: the validation images held out of the training file (``None`` without ``data.val_size``)."""

    name: str
    train: Dataset
    test: Dataset
    classes: tuple[str, ...]
    source: str
    val: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def features(self) -> int:
        return self.train.features


# ---------------------------------------------------------------------------- locating files
def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data root: ``root`` if given (non-empty), else ``$EXACTGN_DATA``; an error says how to set it."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get("EXACTGN_DATA", "")
    if env:
        return Path(env).expanduser()
    raise DataError(
        "no data root given: pass --data-root DIR (or set data.root in the config), or set the environment "
        "variable EXACTGN_DATA to the folder that holds MNIST/raw/ and cifar-10-batches-py/; "
        "dataset 'mnist-small' (bundled with exactgn) needs no data root"
    )


def _idx_dirs(root: Path, folder: str) -> list[Path]:
    return [root / folder / "raw", root]


def _find_idx_file(root: Path, folder: str, stem: str) -> Path | None:
    for folder in _idx_dirs(root, folder):
        for name in (stem + ".gz", stem):
            path = folder / name
            if path.is_file():
                return path
    return None


def _missing_message(name: str, root: Path, missing: list[str], folder: Path) -> str:
    files = ", ".join(missing)
    how = (
        "pass --download (needs torchvision: pip install 'exactgn[vision]' and a network), or copy the "
        "official "
        "files there (MNIST: the four *-ubyte.gz files from the MNIST release; CIFAR-10: the extracted "
        "cifar-10-python.tar.gz)"
    )
    return f"{name}: missing {files} in {folder} (data root {root}); {how}"


# ---------------------------------------------------------------------------- MNIST (IDX files)
def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz; errors name the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        # gzip raises EOFError on a truncated stream and BadGzipFile (an OSError) on a bad header.
        what = (
            "truncated (the compressed stream ends early)"
            if isinstance(exc, EOFError)
            else f"not a valid gzip file ({exc})"
        )
        raise DataError(f"{path}: {what}; replace it with a fresh copy of the official file") from exc


def read_idx(path: str | os.PathLike, *, kind: str | None = None) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not: images ``N × rows × cols`` or labels ``N``, uint8.

    ``kind`` (``"images"`` or ``"labels"``) is what the file must hold. Every size is checked against the
    header.
    """
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 8:
        raise DataError(f"{path}: only {len(buf)} bytes, too short for an IDX header (truncated?)")
    magic = int.from_bytes(buf[:4], "big")
    if magic not in (_IDX_IMAGES, _IDX_LABELS):
        raise DataError(
            f"{path}: bad magic number {magic:#010x}; an MNIST IDX file starts with 0x00000803 (images) or "
            "0x00000801 (labels). Is this really an MNIST file, and not e.g. an HTML error page?"
        )
    found = "images" if magic == _IDX_IMAGES else "labels"
    if kind is not None and kind != found:
        raise DataError(
            f"{path}: holds {found} (magic {magic}), but {kind} were expected here; are the files swapped?"
        )
    if found == "labels":
        n = int.from_bytes(buf[4:8], "big")
        offset, shape = 8, (n,)
    else:
        if len(buf) < 16:
            raise DataError(f"{path}: only {len(buf)} bytes, too short for an IDX image header (truncated?)")
        n, rows, cols = (int.from_bytes(buf[i : i + 4], "big") for i in (4, 8, 12))
        offset, shape = 16, (n, rows, cols)
    expected = offset + math.prod(shape)
    if len(buf) != expected:
        state = "truncated" if len(buf) < expected else "longer than its header says"
        raise DataError(
            f"{path}: {state}: the header announces {n} {found} of shape {shape[1:] or '()'}, i.e. "
            f"{expected} bytes, "
            f"but the (uncompressed) file has {len(buf)} bytes"
        )
    return np.frombuffer(buf, np.uint8, offset=offset).reshape(shape)


def read_idx_dataset(root: str | os.PathLike, folder: str = "MNIST", name: str = "mnist") -> RawData:
    """A dataset in MNIST's IDX layout (the four ``*-ubyte[.gz]`` files of MNIST's names, 28×28 images, 10
    classes) from ``root/<folder>/raw`` (or ``root`` itself), checked for consistency."""
    root = Path(root)
    paths = {key: _find_idx_file(root, folder, stem) for key, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[key] + ".gz" for key, p in paths.items() if p is None]
    if missing:
        raise DataError(
            _missing_message(REGISTRY[name].title, root, missing, root / folder / "raw"), missing=True
        )
    splits = {}
    for split in ("train", "test"):
        img_path, lab_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images = read_idx(img_path, kind="images")
        labels = read_idx(lab_path, kind="labels")
        if images.shape[1:] != (28, 28):
            raise DataError(
                f"{img_path}: images are {images.shape[1]}×{images.shape[2]}, "
                f"{REGISTRY[name].title}'s are 28×28"
            )
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels; "
                "the two files of a split must match (mixed train/test files or a truncated download?)"
            )
        _check_labels(labels, 10, lab_path)
        splits[split] = RawSplit(images[:, None, :, :], labels.astype(np.int64))
    return RawData(name, splits["train"], splits["test"], str(root / folder / "raw"))


def read_mnist(root: str | os.PathLike) -> RawData:
    """MNIST from ``root/MNIST/raw`` (or ``root`` itself), gzipped or not, checked for consistency."""
    return read_idx_dataset(root, "MNIST", "mnist")


def read_fashion_mnist(root: str | os.PathLike) -> RawData:
    """Fashion-MNIST (MNIST's file names and format) from ``root/FashionMNIST/raw`` (or ``root`` itself)."""
    return read_idx_dataset(root, "FashionMNIST", "fashion-mnist")


def _check_labels(labels: np.ndarray, k: int, path: Path) -> None:
    if labels.size and int(labels.max()) >= k:
        bad = labels[labels >= k]
        raise DataError(f"{path}: labels must lie in 0..{k - 1}, found {sorted(set(bad[:5].tolist()))}")
    if labels.size and int(labels.min()) < 0:
        raise DataError(f"{path}: labels must lie in 0..{k - 1}, found negative values")


# ---------------------------------------------------------------------------- CIFAR-10 (pickles)
def _allowed_global(module: str, name: str):  # noqa: ANN202
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
        try:
            from numpy._core.multiarray import _reconstruct  # type: ignore[attr-defined]
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct  # type: ignore[attr-defined,no-redef]
        return _reconstruct
    if module == "_codecs" and name == "encode":  # how Python 3 writes bytes into a protocol-2 pickle
        import codecs

        return codecs.encode
    if module == "numpy" and name == "ndarray":
        return np.ndarray
    if module == "numpy" and name == "dtype":
        return np.dtype
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
        try:
            from numpy._core.multiarray import scalar  # type: ignore[attr-defined]
        except ImportError:
            from numpy.core.multiarray import scalar  # type: ignore[attr-defined,no-redef]
        return scalar
    raise pickle.UnpicklingError(
        f"the pickle refers to {module}.{name}, which a CIFAR-10 batch never contains"
    )


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201
        return _allowed_global(module, name)


def read_cifar_batch(path: str | os.PathLike) -> RawSplit:
    """One CIFAR-10 batch file (a Python-2 pickle): images uint8 ``N × 3 × 32 × 32``, labels ``N``.

    Only numpy arrays and plain containers are unpickled (nothing else can be executed).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types on garbage input
        if isinstance(exc, EOFError) or "truncated" in str(exc):
            raise DataError(
                f"{path}: truncated: the pickle ends early ({len(raw)} bytes); replace the file"
            ) from exc
        raise DataError(f"{path}: not a valid CIFAR-10 batch pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: a CIFAR-10 batch is a pickled dict, got {type(obj).__name__}")
    entries = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    for key in ("data", "labels"):
        if key not in entries:
            raise DataError(f"{path}: the batch has no '{key}' entry (keys: {sorted(map(str, entries))})")
    data = entries["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(
            f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {dtype} of shape {shape}"
        )
    try:
        labels = np.asarray(entries["labels"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'labels' is not a list of integers ({exc})") from exc
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(
            f"{path}: {data.shape[0]} images but {labels.reshape(-1).shape[0]} labels; the batch is "
            "inconsistent"
        )
    _check_labels(labels, 10, path)
    # Rows are channel-major (1024 red, 1024 green, 1024 blue values, each row by row).
    return RawSplit(data.reshape(-1, 3, 32, 32), labels)


def read_cifar10(root: str | os.PathLike) -> RawData:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (or ``root`` itself when it holds the batches)."""
    root = Path(root)
    folder = root / CIFAR_DIR
    if not folder.is_dir() and (root / "test_batch").is_file():
        folder = root
    names = CIFAR_TRAIN + CIFAR_TEST
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(_missing_message("CIFAR-10", root, missing, root / CIFAR_DIR), missing=True)
    train = [read_cifar_batch(folder / n) for n in CIFAR_TRAIN]
    test = read_cifar_batch(folder / CIFAR_TEST[0])
    return RawData(
        "cifar10",
        RawSplit(np.concatenate([b.images for b in train]), np.concatenate([b.labels for b in train])),
        test,
        str(folder),
    )


# ---------------------------------------------------------------------------- bundled MNIST
def read_bundled_mnist(path: str | os.PathLike | None = None, *, check: bool = True) -> RawData:
    """The small MNIST subset shipped with exactgn (``exactgn/lab/assets/mnist_small.npz``),
    checksum-verified."""
    path = BUNDLED_MNIST if path is None else Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: the bundled MNIST subset is missing from this installation; reinstall exactgn, or "
            "regenerate it with scripts/make_bundled_mnist.py"
        )
    if check and path == BUNDLED_MNIST:
        digest = file_sha256(path)
        if digest != BUNDLED_MNIST_SHA256:
            raise DataError(
                f"{path}: SHA-256 {digest} differs from the recorded {BUNDLED_MNIST_SHA256}; the file is "
                "corrupt or was regenerated without updating exactgn.lab.data.BUNDLED_MNIST_SHA256"
            )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from exc
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or labels is None:
            raise DataError(f"{path}: missing {split}_images or {split}_labels (found {sorted(arrays)})")
        if (
            images.dtype != np.uint8
            or images.ndim != 3
            or images.shape[1:] != (28, 28)
            or len(images) != len(labels)
        ):
            raise DataError(
                f"{path}: {split} arrays have unexpected shapes {images.shape} and {labels.shape}"
            )
        _check_labels(labels, 10, path)
        splits[split] = RawSplit(images[:, None], labels.astype(np.int64))
    return RawData("mnist-small", splits["train"], splits["test"], str(path))


# ---------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class DatasetEntry:
    """One dataset: how to read it from a data root, its normalisation, its classes and how to fetch it.

    ``read(root)`` returns uint8 arrays; ``mean``/``std`` are per-channel statistics of the pixels in [0, 1]
    (``(x − mean)/std`` is what the model sees); ``torchvision`` names the ``torchvision.datasets`` class that
    ``--download`` uses (``None``: nothing to download); ``files`` says which files to place by hand.
    """

    title: str
    read: Callable[[Path], RawData]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    torchvision: str | None
    files: Callable[[Path], str]
    needs_root: bool = True


_MNIST_STATS = ((0.1307,), (0.3081,))


def _idx_files(folder: str) -> Callable[[Path], str]:
    return lambda root: ", ".join(str(root / folder / "raw" / f"{stem}.gz") for stem in MNIST_FILES.values())


_DIGITS = tuple(str(i) for i in range(10))

#: Dataset name (``data.dataset``) → its entry. Adding a dataset is adding an entry here.
REGISTRY: dict[str, DatasetEntry] = {
    "mnist": DatasetEntry("MNIST", read_mnist, *_MNIST_STATS, _DIGITS, "MNIST", _idx_files("MNIST")),
    "cifar10": DatasetEntry(
        "CIFAR-10",
        read_cifar10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        "CIFAR10",
        lambda root: (
            f"{root / CIFAR_DIR}/{{data_batch_1..5, test_batch}} (the extracted cifar-10-python.tar.gz)"
        ),
    ),
    "mnist-small": DatasetEntry(
        "mnist-small",
        lambda root: read_bundled_mnist(),
        *_MNIST_STATS,
        _DIGITS,
        None,
        lambda root: "nothing (bundled with exactgn)",
        needs_root=False,
    ),
    "fashion-mnist": DatasetEntry(
        "Fashion-MNIST",
        read_fashion_mnist,
        (0.2860,),
        (0.3530,),
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        "FashionMNIST",
        _idx_files("FashionMNIST"),
    ),
}
DATASETS = tuple(REGISTRY)
#: Reference normalisation per dataset, ``(mean, std)`` per channel (from :data:`REGISTRY`).
MEAN_STD = {name: (entry.mean, entry.std) for name, entry in REGISTRY.items()}
#: Class names per dataset (from :data:`REGISTRY`).
CLASSES = {name: entry.classes for name, entry in REGISTRY.items()}


def _download(name: str, root: Path) -> None:
    entry = REGISTRY[name]
    try:
        from torchvision import datasets  # type: ignore[import-not-found]  # noqa: PLC0415
    except ImportError as exc:
        raise DataError(
            f"--download needs torchvision, which is not installed (pip install 'exactgn[vision]'). "
            f"Without it, place these files yourself: {entry.files(root)}"
        ) from exc
    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(datasets, str(entry.torchvision))
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise DataError(f"downloading {name} into {root} failed ({type(exc).__name__}: {exc})") from exc


def load_raw(name: str, root: str | os.PathLike | None = None, *, download: bool = False) -> RawData:
    """Read a dataset's files (a name of :data:`REGISTRY`) as uint8 arrays; ``download`` fetches missing
    ones."""
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    entry = REGISTRY[name]
    if not entry.needs_root:
        return entry.read(Path())
    path = resolve_root(root)
    try:
        return entry.read(path)
    except DataError as exc:
        if not download or not exc.missing or entry.torchvision is None:
            raise
    _download(name, path)
    return entry.read(path)


# ---------------------------------------------------------------------------- preparation
def normalise(images: np.ndarray | Tensor, dataset: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``N × C × H × W`` → float ``(x/255 − mean_c)/std_c`` with the reference statistics."""
    mean, std = MEAN_STD[dataset]
    x = torch.as_tensor(np.asarray(images)).to(dtype) / 255.0
    if x.shape[1] != len(mean):
        raise ValueError(f"{dataset} images have {len(mean)} channel(s), got shape {tuple(x.shape)}")
    m = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1)
    return (x - m) / s


def select_subset(
    labels: np.ndarray, size: int, method: str = "first", seed: int = 0, num_classes: int = 10
) -> np.ndarray:
    """Indices (sorted, int64) of a subset of ``size`` samples; ``size <= 0`` or ``>= N`` keeps all.

    ``"first"``: the first ``size`` samples (what the reference does). ``"balanced"``: a seeded draw of
    ``size // k`` samples per class (the remainder spread over randomly chosen classes).
    """
    n = len(labels)
    if size <= 0 or size >= n:
        if method not in SUBSETS:
            raise ValueError(f"data.subset must be 'first' or 'balanced', got {method!r}")
        return np.arange(n, dtype=np.int64)
    if method == "first":
        return np.arange(size, dtype=np.int64)
    if method != "balanced":
        raise ValueError(f"data.subset must be 'first' or 'balanced', got {method!r}")
    rng = np.random.default_rng(seed)
    per_class = np.full(num_classes, size // num_classes)
    per_class[rng.choice(num_classes, size % num_classes, replace=False)] += 1
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class[c]:
            raise ValueError(
                f"a balanced subset of {size} needs {per_class[c]} samples of class {c}, but only "
                f"{len(pool)} exist"
            )
        chosen.append(rng.choice(pool, per_class[c], replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_indices(
    labels: np.ndarray,
    train_size: int = 0,
    subset: str = "first",
    subset_seed: int = 0,
    *,
    val_size: int = 0,
    val_seed: int = 0,
    num_classes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted, int64) into the training file of the training subset and of the validation images.

    The rule (validation never touches the test file):

    * ``train_size > 0``: the training subset is exactly what it is without validation
      (:func:`select_subset`: the first ``train_size`` images, or the seeded balanced draw), so turning
      validation on never changes what a run trains on; the ``val_size`` validation images are a uniform draw
      without replacement, seeded by ``val_seed``, from the images *outside* that subset. Needs ``train_size +
      val_size <= N``.
    * ``train_size = 0`` (all images): the validation images are that uniform draw from all ``N`` images, and
      the training set is every other image (``N - val_size`` of them).

    ``val_size = 0`` gives an empty validation set and the training subset of :func:`select_subset`.
    """
    n = len(labels)
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise DataError(f"data.val_size must be an integer >= 0, got {val_size!r}")
    room = max(n - train_size, 0) if train_size > 0 else n - 1  # training keeps at least one image
    if val_size > room:
        what = (
            f"data.train_size = {train_size} leaves {room} of the {n} training-file images"
            if train_size > 0
            else f"the training file has {n} images and training needs at least one"
        )
        raise DataError(
            f"data.val_size = {val_size} is too large: {what}; use data.val_size <= {room} "
            "(or a smaller data.train_size)"
        )
    empty = np.zeros(0, dtype=np.int64)
    if val_size == 0:
        return select_subset(labels, train_size, subset, subset_seed, num_classes), empty
    rng = np.random.default_rng(val_seed)
    if train_size > 0:
        train_idx = select_subset(labels, train_size, subset, subset_seed, num_classes)
        pool = np.setdiff1d(np.arange(n, dtype=np.int64), train_idx)
        return train_idx, np.sort(rng.choice(pool, val_size, replace=False)).astype(np.int64)
    select_subset(labels, 0, subset, subset_seed, num_classes)  # checks the subset method
    val_idx = np.sort(rng.choice(n, val_size, replace=False)).astype(np.int64)
    return np.setdiff1d(np.arange(n, dtype=np.int64), val_idx), val_idx


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    train_size: int = 0,
    test_size: int = 0,
    subset: str = "first",
    subset_seed: int = 0,
    val_size: int = 0,
    val_seed: int = 0,
    download: bool = False,
    dtype: torch.dtype = torch.float32,
) -> DataSplit:
    """Load, subset and normalise a dataset.

    ``train_size``/``test_size``: keep that many samples (0 = all); the training subset is chosen by
    ``subset`` (see :func:`select_subset`), the test subset is always the first ``test_size``.
    ``val_size``/``val_seed``: hold that many training-file images out as a validation set (see
    :func:`split_indices` for the exact rule); ``DataSplit.val`` is ``None`` when ``val_size`` is 0.
    """
    raw = load_raw(name, root, download=download)
    for key, size, split in (("train_size", train_size, raw.train), ("test_size", test_size, raw.test)):
        if size > len(split.labels):
            raise DataError(
                f"data.{key} = {size} exceeds the {len(split.labels)} images of {name}'s "
                f"{'training' if key == 'train_size' else 'test'} set; use at most {len(split.labels)}, or 0 "
                "for all"
            )
    train_idx, val_idx = split_indices(
        raw.train.labels, train_size, subset, subset_seed, val_size=val_size, val_seed=val_seed
    )
    test_idx = select_subset(raw.test.labels, test_size, "first")

    def make(split: RawSplit, idx: np.ndarray) -> Dataset:
        return Dataset(
            normalise(split.images[idx], name, dtype),
            torch.from_numpy(split.labels[idx].copy()),
            torch.from_numpy(idx),
        )

    val = make(raw.train, val_idx) if val_size else None
    train, test = make(raw.train, train_idx), make(raw.test, test_idx)
    return DataSplit(name, train, test, CLASSES[name], raw.source, val)


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Class indices ``N`` → one-hot rows ``N × k``."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(dtype)


# ---------------------------------------------------------------------------- augmentation
def random_resized_crop(
    images: Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Tensor:
    """Random-resized-crop of every image of a batch ``N × C × H × W``, back to ``H × W`` (bilinear).

    Per image: draw an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio`` until the box
    fits (up to ``attempts`` draws; otherwise the largest centred box with the ratio clamped to ``ratio``),
    place it uniformly, crop and resize. The same recipe as torchvision's ``RandomResizedCrop``, written in
    torch: random numbers come from ``generator`` (a CPU generator), so a seeded run is reproducible on any
    device.
    """
    n, _, height, width = images.shape
    area = height * width
    f64 = dict(generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, **f64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, attempts, **f64))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), -1)
    rows = torch.arange(n)
    cw, ch = w[rows, first.clamp_min(0)], h[rows, first.clamp_min(0)]
    # Fall-back: the whole image, cropped to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = float(round(height * ratio[1])), float(height)
    else:
        fw, fh = float(width), float(height)
    none = first < 0
    cw = torch.where(none, torch.full_like(cw, fw), cw)
    ch = torch.where(none, torch.full_like(ch, fh), ch)
    u = torch.rand(n, 2, **f64)
    top = torch.floor(u[:, 0] * (height - ch + 1))
    left = torch.floor(u[:, 1] * (width - cw + 1))
    top = torch.where(none, torch.floor((height - ch) / 2), top)
    left = torch.where(none, torch.floor((width - cw) / 2), left)
    # Affine map from the output grid ([-1, 1], pixel edges) to the crop box in the input.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cw / width
    theta[:, 0, 2] = (2 * left + cw) / width - 1
    theta[:, 1, 1] = ch / height
    theta[:, 1, 2] = (2 * top + ch) / height - 1
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
