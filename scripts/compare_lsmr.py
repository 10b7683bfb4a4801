"""exactgn's minimum-norm GN step against curvlinops' Jacobian operator solved by LSMR, on a plain MLP.

    pip install curvlinops-for-pytorch "torch==2.13.0"     # not an exactgn dependency; pin torch, and
    pip uninstall -y torchvision                            # if pip brought it: it fails beside the CPU torch
    PYTHONPATH=. python scripts/compare_lsmr.py [--batch 64 256] [--threads 1] [--json FILE]

The step is ``δ = J⁺v`` (``v = H⁺g``, cross-entropy with the identity Hessian; :func:`exactgn.gn_direction`
with ``inverse="pinv"``). A matrix-free user solves ``min ‖Jδ − v‖`` with LSMR on curvlinops'
``JacobianLinearOperator`` (one JVP and one VJP per iteration); started from zero, LSMR converges to the
minimum-norm solution, the same ``δ``. Reference: exactgn's step in float64. For each LSMR tolerance
(``atol = btol``) the script reports iterations, time and the relative error ``‖δ − δ_ref‖ / ‖δ_ref‖``;
the headline is the first tolerance that reaches relative error 1e-3. Times are medians of ``--repeats``
runs, beside an Adam step and exactgn's float32 step measured in the same process.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from curvlinops import JacobianLinearOperator
from scipy.sparse.linalg import lsmr

import exactgn

TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
TARGET = 1e-3


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def flat(direction: dict[str, torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([direction[n].reshape(-1).double() for n, _ in model.named_parameters()])


def adam_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return median_time(step, repeats)[0]


def lsmr_rows(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, ref: torch.Tensor,
              repeats: int) -> list[dict[str, float]]:  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    op = JacobianLinearOperator(model, params, [(x, y)], check_deterministic=False).to_scipy(np.float64)
    rhs = v.reshape(-1).double().numpy()  # rows (n, c), as exactgn's v
    rows = []
    for tol in TOLERANCES:
        seconds, out = median_time(lambda: lsmr(op, rhs, atol=tol, btol=tol, maxiter=20000), repeats)
        sol, itn = torch.from_numpy(out[0]), int(out[2])
        rows.append(
            {
                "tol": tol,
                "iterations": itn,
                "seconds": seconds,
                "rel_error": float((sol - ref).norm() / ref.norm()),
            }
        )
        if rows[-1]["rel_error"] <= TARGET / 10:
            break
    return rows


def batch_of(data: str, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``random``: Gaussian inputs and random labels; ``mnist``: the first ``batch`` MNIST training images,
    normalised as exactgn trains on them (``EXACTGN_DATA`` or ``--data-root``)."""
    if data == "random":
        return torch.randn(batch, 784, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    from exactgn.lab.data import load_dataset

    train = load_dataset("mnist", train_size=batch, test_size=1).train
    return train.images.reshape(batch, -1), train.labels


def compare(
    batch: int, widths: list[int], repeats: int, seed: int, data: str = "random"
) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    model = exactgn.models.MLP(784, 10, widths, seed=seed)
    x, y = batch_of(data, batch, gen)
    ref_model = copy.deepcopy(model).double()
    ref_res = exactgn.gn.compute_direction(ref_model, x.double(), y, inverse="pinv")
    ref = flat(ref_res.direction, ref_model)
    gn_s, res = median_time(lambda: exactgn.gn.compute_direction(model, x, y, inverse="pinv"), repeats)
    rows = lsmr_rows(model, x, y, ref_res.v, ref, repeats)
    hit = next((r for r in rows if r["rel_error"] <= TARGET), None)
    return {
        "batch": batch,
        "data": data,
        "widths": widths,
        "parameters": sum(p.numel() for p in model.parameters()),
        "adam_step_s": adam_time(model, x, y, repeats),
        "exactgn_step_s": gn_s,
        "exactgn_rel_error": float((flat(res.direction, model) - ref).norm() / ref.norm()),
        "lsmr": rows,
        "lsmr_at_1e-3": hit,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 1024])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument(
        "--data",
        choices=["random", "mnist"],
        default="random",
        help="random inputs (default) or the first B MNIST training images (EXACTGN_DATA)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for batch in args.batch:
        r = compare(batch, args.widths, args.repeats, args.seed, args.data)
        results.append(r)
        adam = r["adam_step_s"]
        print(f"B={batch} ({args.data}), MLP 784→{'→'.join(map(str, args.widths))}→10 "
              f"({r['parameters']:,} parameters), "
              f"{args.threads} thread(s): Adam step {adam * 1e3:.1f} ms")  # fmt: skip
        print(f"  exactgn J⁺v (float32): {r['exactgn_step_s']:.3f} s = {r['exactgn_step_s'] / adam:.1f} Adam "
              f"steps, rel. error {r['exactgn_rel_error']:.1e}")  # fmt: skip
        for row in r["lsmr"]:
            print(f"  LSMR tol {row['tol']:.0e}: {row['iterations']} it, {row['seconds']:.3f} s = "
                  f"{row['seconds'] / adam:.1f} Adam steps, rel. error {row['rel_error']:.1e}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"threads": args.threads, "torch": torch.__version__, "data": args.data, "results": results},
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
