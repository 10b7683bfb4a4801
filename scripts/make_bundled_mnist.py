#!/usr/bin/env python
"""Make ``exactgn/lab/assets/mnist_small.npz``, the small real MNIST subset bundled with exactgn.

From the official MNIST files (``ROOT/MNIST/raw/*-ubyte.gz``) it takes, in file order, the first
``--train-per-class`` training images of every class and the first ``--test-per-class`` test images of every
class, keeping their original order (classes stay interleaved). It stores uint8 pixels, labels and each
image's index in the original file. The archive is written byte-for-byte reproducibly (fixed zip timestamps),
so its SHA-256 depends only on the inputs and the options; it is printed at the end and must be recorded in
``exactgn.lab.data.BUNDLED_MNIST_SHA256``.

    python scripts/make_bundled_mnist.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

from exactgn.lab.data import BUNDLED_MNIST, read_mnist, resolve_root


def first_per_class(labels: np.ndarray, per_class: int, num_classes: int = 10) -> np.ndarray:
    """Sorted indices of the first ``per_class`` samples of each class."""
    picks = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise SystemExit(f"only {len(idx)} samples of class {c}, {per_class} wanted")
        picks.append(idx)
    return np.sort(np.concatenate(picks))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A .npz that ``np.load`` reads, written reproducibly (fixed entry order and timestamps)."""
    tmp = path.with_suffix(".npz.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root", default=None, help="folder holding MNIST/raw/ (default: $EXACTGN_DATA)"
    )
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=BUNDLED_MNIST)
    args = parser.parse_args(argv)

    raw = read_mnist(resolve_root(args.data_root))
    train_idx = first_per_class(raw.train.labels, args.train_per_class)
    test_idx = first_per_class(raw.test.labels, args.test_per_class)
    arrays = {
        "train_images": raw.train.images[train_idx, 0],
        "train_labels": raw.train.labels[train_idx].astype(np.uint8),
        "train_index": train_idx.astype(np.int32),
        "test_images": raw.test.images[test_idx, 0],
        "test_labels": raw.test.labels[test_idx].astype(np.uint8),
        "test_index": test_idx.astype(np.int32),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(args.out, arrays)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(
        f"wrote {args.out}: {len(train_idx)} train + {len(test_idx)} test images, {args.out.stat().st_size} "
        "bytes"
    )
    print(f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
