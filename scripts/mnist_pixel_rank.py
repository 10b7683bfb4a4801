"""Conditioning of the first block's activation matrices on the first N real MNIST training images.

The identity first block's half-layers see the raw pixel halves: ``[b, 1]`` (F, the bottom half) and, at
initialisation, ``[a, 1]`` (G, the top half; ``a′ = a + F(b)`` with ``F`` tiny at init std 1e-3). The right
inverse ``J♭`` solves through these matrices: their conditioning decides how far it must move the weights.

    EXACTGN_DATA=../shared/data python scripts/mnist_pixel_rank.py --csv results/mnist-pixel-rank/rank.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exactgn.lab.data import load_dataset  # noqa: E402


def rows(sizes: list[int]) -> list[list[str]]:
    """One row per (half, N): the condition number and the numerical rank of ``[half, 1]`` (float64)."""
    n_max = max(sizes)
    data = load_dataset("mnist", train_size=n_max, test_size=10, dtype=torch.float64)
    x = data.train.images[:n_max].reshape(n_max, -1)
    d = x.shape[1] // 2
    out = []
    for label, half in (("top (a, seen by G)", x[:, :d]), ("bottom (b, seen by F)", x[:, d:])):
        for n in sizes:
            s = torch.linalg.svdvals(torch.cat([half[:n], torch.ones(n, 1, dtype=torch.float64)], 1))
            cond = (s[0] / s[-1]).item()
            ranks = [int((s > tol * s[0]).sum()) for tol in (1e-12, 1e-7, 1e-2)]
            out.append([label, str(n), f"{cond:.3g}", *(str(r) for r in ranks)])
    return out


def main() -> None:
    """Print the table (and write it as CSV with ``--csv``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 192, 256])
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    head = [
        "pixel half",
        "images N",
        "cond([half, 1])",
        "rank (σ > 1e-12 σ₁)",
        "rank (> 1e-7 σ₁)",
        "rank (> 1e-2 σ₁, the reference's rtol)",
    ]
    table = rows(args.sizes)
    print(" | ".join(head))
    for row in table:
        print(" | ".join(row))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([head, *table])


if __name__ == "__main__":
    main()
