"""Regularised Gram solves against explicit SVD pseudo-inverses in float64."""

from __future__ import annotations

import math

import pytest
import torch

from exactgn.linalg import (
    GramFallbackWarning,
    Regularisation,
    _cond_estimate,
    all_finite,
    cholesky_solve,
    gram_solve,
)

F64 = torch.float64


def _wide(rng, rows=9, cols=20, rank=None):
    a = torch.randn(rows, cols, generator=rng, dtype=F64)
    if rank is not None:
        a = torch.randn(rows, rank, generator=rng, dtype=F64) @ torch.randn(
            rank, cols, generator=rng, dtype=F64
        )
    return a


def _svd_pinv(a, cut=0.0, damping=0.0):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    keep = s > cut
    inv = torch.where(keep, s / (s**2 + damping), torch.zeros_like(s))
    return vh.T @ torch.diag(inv) @ u.T


def test_exact_solve_gives_the_pseudo_inverse(rng):
    a = _wide(rng)
    r = torch.randn(9, 4, generator=rng, dtype=F64)
    s, info = gram_solve(a @ a.T, r)
    assert info.method == "cholesky" and info.rank == 9
    ref = torch.linalg.pinv(a) @ r
    assert (a.T @ s - ref).norm() / ref.norm() <= 1e-12


def test_truncation_drops_small_singular_values(rng):
    u, _ = torch.linalg.qr(torch.randn(9, 9, generator=rng, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(20, 9, generator=rng, dtype=F64))
    sigma = torch.logspace(0, -6, 9, dtype=F64)
    a = u @ torch.diag(sigma) @ v.T
    r = torch.randn(9, 3, generator=rng, dtype=F64)
    for rtol, atol in [(1e-2, 0.0), (0.0, 2e-2), (1e-2, 1e-1)]:  # kept part: cond(A) ≤ 100
        s, info = gram_solve(a @ a.T, r, Regularisation(rtol=rtol, atol=atol))
        cut = max(rtol * sigma[0].item(), atol)
        ref = _svd_pinv(a, cut) @ r
        assert info.method == "eigh" and info.rank == int((sigma > cut).sum())
        assert (a.T @ s - ref).norm() / ref.norm() <= 1e-10


@pytest.mark.parametrize("rtol", [0.0, 1e-3])
def test_damping(rng, rtol):
    a = _wide(rng)
    r = torch.randn(9, 2, generator=rng, dtype=F64)
    s, _ = gram_solve(a @ a.T, r, Regularisation(rtol=rtol, damping=0.7))
    cut = rtol * torch.linalg.svdvals(a)[0].item()
    ref = _svd_pinv(a, cut, damping=0.7) @ r
    assert (a.T @ s - ref).norm() / ref.norm() <= 1e-12
    if rtol == 0:  # damped: Aᵀ(AAᵀ + λI)⁻¹R
        assert torch.allclose(s, torch.linalg.solve(a @ a.T + 0.7 * torch.eye(9, dtype=F64), r))


def test_singular_gram_falls_back_with_a_warning(rng):
    a = _wide(rng, rank=5)
    r = torch.randn(9, 2, generator=rng, dtype=F64)
    with pytest.warns(GramFallbackWarning, match="not numerically positive definite"):
        s, info = gram_solve(a @ a.T, r, what="test Gram")
    assert info.method == "eigh-fallback" and info.rank == 5
    ref = torch.linalg.pinv(a) @ r  # the least-squares, minimum-norm answer
    assert (a.T @ s - ref).norm() / ref.norm() <= 1e-8


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_min_norm_solve_of_singular_normal_equations(rng, damping):
    """``MᵀM c = MᵀR`` with a rank-deficient ``M`` is consistent, so a small residual says nothing about
    null-space components; ``min_norm=True`` must return ``(MᵀM + λI)⁺MᵀR``, the minimum-norm solution. ``M =
    [x L, 1]`` with two always-zero pixels in ``x`` is the column Gram route's own case (a rotated null space,
    on which a plain Cholesky solve succeeded with wrong answers in about one draw in nine); 50 draws, of
    which about 40 meet the conditioning precondition."""
    for _ in range(50):
        x = torch.randn(16, 12, generator=rng, dtype=F64)
        x[:, [2, 5]] = 0
        lower = torch.tril(torch.randn(12, 12, generator=rng, dtype=F64))
        m = torch.cat([x @ lower, torch.ones(16, 1, dtype=F64)], 1)
        sv = torch.linalg.svdvals(m)
        if sv[0] / sv[10] > 1e3:  # the precondition of every exactness test here (cond ≤ 1e3 on the range)
            continue  # random triangular factors are often far worse conditioned; the Gram route loses cond²
        r = torch.randn(16, 3, generator=rng, dtype=F64)
        coef, info = gram_solve(m.T @ m, m.T @ r, Regularisation(damping=damping), min_norm=True, warn=False)
        ref = _svd_pinv(m, cut=1e-10 * float(torch.linalg.svdvals(m)[0]), damping=damping) @ r
        assert (coef - ref).norm() / ref.norm() <= 1e-8
        assert (info.method, info.rank) == (("eigh-lstsq", 11) if damping == 0 else ("cholesky-damped", 13))


def test_float64_solve_of_a_float32_gram(rng):
    a = _wide(rng)
    r = torch.randn(9, 2, generator=rng, dtype=F64)
    s, _ = gram_solve((a @ a.T).float(), r.float(), solve_dtype=F64)
    assert s.dtype == torch.float32
    ref = torch.linalg.solve(a @ a.T, r)
    assert (s.double() - ref).norm() / ref.norm() <= 1e-4


@pytest.mark.parametrize("bad", [dict(rtol=-1.0), dict(atol=float("nan")), dict(damping=float("inf"))])
def test_bad_regularisation(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Regularisation(**bad)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cholesky_solve_matches_a_float64_solve(rng, dtype):
    a = _wide(rng, rows=30, cols=50)
    k = a @ a.T
    r = torch.randn(30, 7, generator=rng, dtype=F64)
    lower = torch.linalg.cholesky(k.to(dtype))
    got = cholesky_solve(r.to(dtype), lower)
    ref = torch.linalg.solve(k, r)
    tol = 1e-11 if dtype == F64 else 1e-5  # ≈ u·cond(K) (cond(K) ≈ 60 here); measured ≤ 9e-7 in float32
    assert got.dtype == dtype
    assert (got.double() - ref).norm() / ref.norm() <= tol
    theirs = torch.cholesky_solve(r.to(dtype), lower)
    assert (got - theirs).norm() / theirs.norm() <= tol  # the same two solves, up to rounding order


def test_all_finite_names_each_tensor():
    big = torch.full((4,), 3e38)  # finite, but its float32 sum overflows: checked element by element
    half = torch.full((8,), 6e4, dtype=torch.float16)  # float16 sums would overflow; summed in float32
    tensors = [torch.ones(3), torch.tensor([1.0, float("nan")]), big, torch.tensor([float("-inf")]), half]
    assert all_finite(tensors) == [True, False, True, False, True]
    assert all_finite([]) == []


def test_condition_estimate_of_a_stack(rng):
    mats = []
    for kappa in (1.0, 30.0, 1e4):
        u, _ = torch.linalg.qr(torch.randn(40, 40, generator=rng, dtype=F64))
        v, _ = torch.linalg.qr(torch.randn(60, 40, generator=rng, dtype=F64))
        s = torch.logspace(0, math.log10(kappa), 40, dtype=F64)
        mats.append((u * s) @ v.T)
    lower = torch.linalg.cholesky(torch.stack([m @ m.T for m in mats]))
    est = _cond_estimate(lower)
    for got, kappa in zip(est.tolist(), (1.0, 30.0, 1e4)):
        assert kappa / 1.5 <= got <= kappa * (1 + 1e-9)  # from below, and close
