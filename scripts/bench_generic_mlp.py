"""Time exactgn's minimum-norm GN step on a plain MLP against Adam and an explicit torch.func Jacobian, in
one process.

    PYTHONPATH=. python scripts/bench_generic_mlp.py [--batch 256] [--threads 1 2] [--baseline-batch 16]

For each thread count: medians of a forward pass, an Adam step (forward, backward, update) and
``exactgn.gn_direction(..., inverse="pinv")`` on MLP 784→1024→1024→10 (float32), their ratios to the Adam
step, and the ratio the FLOP count (:func:`exactgn.gn_step_flops`) predicts; "of floor" = measured ratio /
counted ratio.

The alternative a user has without exactgn: ``J`` by ``vmap(jacrev)`` per sample, ``JJᵀ``, a Cholesky solve
and ``Jᵀu``. At ``B = 256`` its ``J`` alone is ``2560 × 1.86M`` floats (19 GB), so it is timed in full at
``--baseline-batch`` and, at ``--batch``, extrapolated from its pieces timed on one chunk of that size
(Jacobian and ``Jᵀu`` ∝ B, the Gram ∝ B², the Cholesky timed at full size). Accuracy: relative distance of
each float32 step to a float64 exactgn step (exact to 1e-8 against jacrev + pinv in the tests).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.func import functional_call, jacrev, vmap

import exactgn

WIDTHS = [1024, 1024]


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def explicit_jacobian(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``J`` (``Bk × P``) by ``vmap(jacrev)`` over samples: what a user writes with torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(ps: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, ps, (xi.unsqueeze(0),))[0]

    jac = vmap(jacrev(one), in_dims=(None, 0))(params, x)
    rows = x.shape[0] * 10
    return torch.cat([jac[n].reshape(rows, -1) for n in params], dim=1)


def explicit_step(model: torch.nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J⁺v = Jᵀ (JJᵀ)⁻¹ v`` by an explicit Jacobian and a Cholesky solve (flat, ``P``)."""
    jac = explicit_jacobian(model, x)
    factor = torch.linalg.cholesky(jac @ jac.T)
    return jac.T @ torch.cholesky_solve(v.reshape(-1, 1), factor)[:, 0]


def flat(direction: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in direction.values()])


def exactgn_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> exactgn.GNResult:
    return exactgn.compute_direction(model, x, y, inverse="pinv")


def measure(threads: int, batch: int, small: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    model = exactgn.MLP(784, 10, WIDTHS, seed=0)
    ref_model = exactgn.MLP(784, 10, WIDTHS, seed=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 784, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    adam = torch.optim.Adam(model.parameters(), lr=0.0)  # lr 0: the model stays the same for every repeat

    def adam_step() -> None:
        adam.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        adam.step()

    with torch.no_grad():
        t_fwd = median_time(lambda: model(x), repeats)
    t_adam = median_time(adam_step, repeats)
    t_gn = median_time(lambda: exactgn_step(model, x, y), repeats)
    flops = exactgn.gn_step_flops(model, x)
    out = {
        "threads": threads,
        "batch": batch,
        "forward_s": t_fwd,
        "adam_s": t_adam,
        "gn_pinv_s": t_gn,
        "gn_over_adam": t_gn / t_adam,
        "counted_gn_over_adam": flops["gn_pinv_step"] / flops["adam_step"],
        "gflop": {k: v / 1e9 for k, v in flops.items()},
    }
    out["of_floor"] = out["gn_over_adam"] / out["counted_gn_over_adam"]
    out.update(baseline(model, ref_model, x, y, small, repeats))
    return out


def baseline(model, ref_model, x, y, small: int, repeats: int) -> dict:
    """The explicit-Jacobian step: in full at ``small``, extrapolated to ``B`` from its pieces."""
    xs, ys = x[:small], y[:small]
    ours = exactgn_step(model, xs, ys)
    ref = flat(exactgn_step(ref_model, xs.double(), ys).direction)
    explicit = explicit_step(model, xs, ours.v)
    t_small = median_time(lambda: explicit_step(model, xs, ours.v), max(2, repeats // 2))
    t_ours_small = median_time(lambda: exactgn_step(model, xs, ys), repeats)
    jac = explicit_jacobian(model, xs)
    t_jac = median_time(lambda: explicit_jacobian(model, xs), 2)
    t_gram = median_time(lambda: jac @ jac.T, 2)
    u = torch.randn(jac.shape[0])
    t_jtu = median_time(lambda: jac.T @ u, 2)
    size = x.shape[0] * 10
    spd = torch.randn(size, size)
    spd = spd @ spd.T + size * torch.eye(size)
    t_chol = median_time(lambda: torch.cholesky_solve(torch.ones(size, 1), torch.linalg.cholesky(spd)), 2)
    scale = x.shape[0] / small
    t_full = scale * (t_jac + t_jtu) + scale**2 * t_gram + t_chol
    return {
        "baseline_batch": small,
        "explicit_small_s": t_small,
        "gn_pinv_small_s": t_ours_small,
        "explicit_over_ours_small": t_small / t_ours_small,
        "explicit_extrapolated_s": t_full,
        "explicit_pieces_s": {"jacobian": t_jac, "gram": t_gram, "jtu": t_jtu, "cholesky_full": t_chol},
        "rel_err_exactgn_f32": float((flat(ours.direction).double() - ref).norm() / ref.norm()),
        "rel_err_explicit_f32": float((explicit.double() - ref).norm() / ref.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--baseline-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for threads in args.threads:
        res = measure(threads, args.batch, args.baseline_batch, args.repeats)
        res["explicit_over_ours"] = res["explicit_extrapolated_s"] / res["gn_pinv_s"]
        print(json.dumps(res, indent=1), flush=True)


if __name__ == "__main__":
    main()
