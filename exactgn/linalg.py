"""Regularised solves with a Gram matrix ``K = A Aᵀ`` (DESIGN §3a–c).

Both GN steps need ``A⁺ R = Aᵀ (A Aᵀ)⁻¹ R`` for a wide matrix ``A`` of full row rank: for the right inverse
``A`` is a half-layer's activation matrix (``K`` is ``B × B``), for the minimum-norm step ``A`` is the whole
Jacobian ``J`` (``K`` is the NTK, ``Bk × Bk``). :func:`gram_solve` returns ``S`` with ``Aᵀ S = A⁺ R``.

Regularisation is stated in terms of the singular values ``σ_i = √λ_i(K)`` of ``A``:

* truncation drops ``σ_i ≤ max(rtol·σ_max, atol)``;
* damping replaces ``(AAᵀ)⁻¹`` by ``(AAᵀ + damping·I)⁻¹``.

With both off the solve is a Cholesky factorisation; if ``K`` is not numerically positive definite it falls
back to an eigen-solve that drops eigenvalues below ``n·eps·λ_max`` (the numerical rank of a Gram) and warns.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .precision import unit_roundoff

__all__ = [
    "Regularisation",
    "SolveInfo",
    "GramFallbackWarning",
    "gram_solve",
    "RowFactor",
    "factor_rows",
    "GRAM_MAX_COND",
    "RANK_TOL",
    "cholesky_solve",
    "all_finite",
]


def cholesky_solve(rhs: Tensor, lower: Tensor) -> Tensor:
    """``(LLᵀ)⁻¹ R`` for lower-triangular ``L`` (``n × n``) and ``R`` (``n × m``): two triangular solves.

    The same arithmetic as ``torch.cholesky_solve`` (LAPACK's potrs is these two solves), but about 3× faster
    on the CPU at the sizes of a GN step (measured at ``n = 256``, ``m = 392``, float32, one thread: 2.2 vs
    6.2 ms).
    """
    half = torch.linalg.solve_triangular(lower, rhs, upper=False)
    return torch.linalg.solve_triangular(lower.mT, half, upper=True)


def all_finite(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor holds only finite values, with one device synchronisation.

    A sum is finite only if every summand is, so one reduction per tensor settles the common case; only a
    tensor whose sum is not finite (a NaN or infinity inside, or finite values whose sum overflows) is
    checked element by element.
    """
    if not tensors:
        return []
    sums = torch.stack([t.sum(dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors])
    ok = torch.isfinite(sums).tolist()
    return [True if fine else bool(torch.isfinite(t).all()) for fine, t in zip(ok, tensors)]


class GramFallbackWarning(RuntimeWarning):
    """A Gram matrix that should be positive definite was not; the solve was a least-squares one."""


@dataclass(frozen=True)
class Regularisation:
    """Truncation (``rtol``, ``atol`` on singular values) and damping of the pseudo-inverse. All zero:
    exact."""

    rtol: float = 0.0
    atol: float = 0.0
    damping: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rtol", "atol", "damping"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def truncates(self) -> bool:
        return self.rtol > 0 or self.atol > 0

    @property
    def exact(self) -> bool:
        return not self.truncates and self.damping == 0


@dataclass
class SolveInfo:
    """How one Gram solve went: ``method`` is ``"cholesky"`` (``"cholesky-damped"`` with damping), ``"qr"`` (a
    QR of ``Aᵀ``, :func:`factor_rows`), ``"svd-fallback"`` (``A`` numerically rank-deficient), ``"eigh"``
    (truncation), ``"eigh-fallback"`` (Cholesky failed) or ``"eigh-lstsq"`` (a minimum-norm solve was asked
    for); ``rank`` is how many directions were kept out of ``size``."""

    method: str
    size: int
    rank: int


def gram_solve(
    gram: Tensor,
    rhs: Tensor,
    reg: Regularisation = Regularisation(),
    *,
    solve_dtype: torch.dtype | None = None,
    lower_only: bool = False,
    min_norm: bool = False,
    warn: bool = True,
    what: str = "Gram matrix",
) -> tuple[Tensor, SolveInfo]:
    """Solve ``(K + damping·I) S = R`` for a PSD Gram ``K`` (``n × n``) and ``R`` (``n × m``), regularised.

    ``solve_dtype`` (e.g. ``torch.float64``) is the precision of the factorisation; ``S`` comes back in
    ``R``'s dtype. ``lower_only``: only the lower triangle of ``gram`` is meaningful (the strictly upper part
    may hold anything). ``warn``: warn when the unregularised solve falls back to least squares; ``what``
    names the matrix.

    ``min_norm``: the caller needs the minimum-norm solution of a system that may be singular but is
    consistent (normal equations ``MᵀM c = MᵀR``): there a Cholesky solve can pass the residual check and
    still carry huge null-space components, so the unregularised solve goes straight to the eigen-solve
    without the null space.

    A Cholesky factorisation can succeed on a numerically singular Gram and return a meaningless ``S``, so the
    unregularised solve is accepted only when its residual ``‖K S − R‖`` is below ``√(2u)·‖R‖``, with ``u``
    the unit roundoff of the products (:func:`exactgn.precision.unit_roundoff`: TF32 counts when it is on).
    """
    n = gram.shape[0]
    out_dtype = rhs.dtype
    if solve_dtype is not None and solve_dtype != gram.dtype:
        gram, rhs = gram.to(solve_dtype), rhs.to(solve_dtype)
    if not reg.truncates and not (min_norm and reg.damping == 0):
        system = gram
        if reg.damping:
            system = gram.clone()
            system.diagonal().add_(reg.damping)
        factor, status = torch.linalg.cholesky_ex(system)
        if int(status) == 0:
            sol = cholesky_solve(rhs, factor)
            residual = float(
                (symmetric_matmul(system, sol, lower_only) - rhs).norm() / rhs.norm().clamp_min(1e-300)
            )
            if residual <= (2 * unit_roundoff(system.dtype)) ** 0.5:
                return sol.to(out_dtype), SolveInfo("cholesky-damped" if reg.damping else "cholesky", n, n)
            reason = f"its Cholesky solve leaves a relative residual of {residual:.1e}"
        else:
            reason = f"Cholesky failed at column {int(status)}"
        if warn:
            warnings.warn(
                f"{what} ({n}×{n}) is not numerically positive definite ({reason}); solving by "
                "eigen-decomposition without its null space: this step is a least-squares step, not an exact "
                "one. Use a smaller batch, float64 solves, damping or truncation.",
                GramFallbackWarning,
                stacklevel=3,
            )
    evals, evecs = torch.linalg.eigh(gram)
    lam_max = evals[-1].clamp_min(0)
    if reg.truncates:
        sigma_cut = max(reg.rtol * math.sqrt(float(lam_max)), reg.atol)
        keep = (evals > sigma_cut**2) & (evals > 0)
        method = "eigh"
    else:  # drop the numerically zero eigenvalues: the null space
        keep = evals > n * torch.finfo(evals.dtype).eps * lam_max
        method = "eigh-lstsq" if min_norm else "eigh-fallback"
    inv = torch.where(keep, 1.0 / (evals + reg.damping).where(keep, 1.0), 0.0)
    sol = evecs @ (inv[:, None] * (evecs.T @ rhs))
    return sol.to(out_dtype), SolveInfo(method, n, int(keep.sum()))


def symmetric_matmul(sym: Tensor, x: Tensor, lower_only: bool) -> Tensor:
    """``K x`` for symmetric ``K``; with ``lower_only`` only its lower triangle is read."""
    if not lower_only:
        return sym @ x
    low = torch.tril(sym)
    return low @ x + low.T @ x - sym.diagonal()[:, None] * x


# ---------------------------------------------------------------------------- exact row solves A⁺R (DESIGN
# §3a)
#: Largest estimated ``cond(A)`` at which an exact right-inverse solve goes through the Gram ``AAᵀ``. The
#: Gram's
#: error is ``≈ c·u·cond(A)²`` and a QR factorisation's ``≈ c′·u·cond(A)`` (c, c′ ≈ 0.1–1, measured), so below
#: this cut the Gram's error is within this factor of QR's and both grow like ``u·cond(A)``; above it, QR.
GRAM_MAX_COND = 64.0
#: ``u·cond(A)`` above which a QR factorisation counts ``A`` as numerically rank-deficient: the solve then
#: drops
#: singular values below ``u/RANK_TOL·σ_max`` (an SVD of the small factor) and the step is a least-squares
#: one.
RANK_TOL = 1e-2
_POWER_STEPS = 6


@dataclass
class RowFactor:
    """A factorisation of a wide activation matrix ``A`` (``B × c``) that solves ``A⁺R`` for any ``R``.

    ``method`` ``"cholesky"``: ``lower`` is ``L`` with ``AAᵀ = LLᵀ``, and :meth:`solve` returns ``S`` (``B ×
    m``) with ``A⁺R = AᵀS``. ``"qr"``/``"svd-fallback"``: ``basis`` (``c × r``, orthonormal columns) and
    :meth:`solve` returns ``Y`` (``r × m``) with ``A⁺R = basis·Y``. ``cond`` is the estimated ``cond(A)``.
    """

    method: str
    info: SolveInfo
    cond: float
    lower: Tensor | None = None
    basis: Tensor | None = None
    coef: Tensor | None = None  # svd-fallback: Σ⁺Vᵀ (r × B)

    def solve(self, rhs: Tensor) -> Tensor:
        """``S`` (Gram route) or ``Y`` (basis route) for ``rhs`` (``B × m``), in ``rhs``'s dtype."""
        factor = self.lower if self.lower is not None else self.coef
        x = rhs.to(factor.dtype)
        if self.method == "cholesky":
            out = cholesky_solve(x, self.lower)
        elif self.method == "qr":
            out = torch.linalg.solve_triangular(self.lower, x, upper=False)
        else:
            out = self.coef @ x
        return out.to(rhs.dtype)


def _cond_estimate(lower: Tensor) -> Tensor:
    """Estimated ``cond(A) = √(λ_max/λ_min)`` of ``K = LLᵀ`` for lower-triangular ``L`` (``... × B × B``).

    Block power iterations on ``K`` and on ``K⁻¹`` (triangular solves), from fixed start vectors; like
    LAPACK's condition estimators this is an estimate (it approaches the true value from below), computed on
    the device.
    """
    size = lower.shape[-1]
    idx = torch.arange(size, dtype=lower.dtype, device=lower.device)[:, None]
    start = torch.cat(
        [torch.ones_like(idx), torch.cos(idx * 2.1 + 0.3), torch.sin(idx * 0.77), (-1.0) ** idx], 1
    )
    start = start.expand(*lower.shape[:-2], size, 4)
    # K's power iteration runs on row vectors (xᵀK = (xᵀL)Lᵀ): a few rows times a square matrix is a fast
    # product on the CPU, a square matrix times a few columns (batched) measured 6× slower.
    big, small = start.mT, start
    for _ in range(_POWER_STEPS):
        big = (_unit(big.mT).mT @ lower) @ lower.mT
        small = torch.linalg.solve_triangular(
            lower.mT, torch.linalg.solve_triangular(lower, _unit(small), upper=False), upper=True
        )
    lam_max = big.norm(dim=-1).amax(-1)
    inv_min = small.norm(dim=-2).amax(-1)
    return (lam_max * inv_min).sqrt()


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def factor_rows(
    grams: list[Tensor],
    matrices: list,
    *,
    solve_dtype: torch.dtype | None = None,
    warn: bool = True,
    names: list[str] | None = None,
) -> list[RowFactor]:
    """Factorise wide activation matrices ``A_j`` (``B × c_j``) for exact, unregularised solves ``A_j⁺R``.

    ``grams``: the ``B × B`` Grams ``A_jA_jᵀ`` (only the lower triangle is read); ``matrices``: callables
    giving ``A_j`` itself, called only when the Gram route is not accurate enough. All Grams are
    Cholesky-factorised and their conditioning estimated in one batch, with one device synchronisation; a Gram
    whose Cholesky fails or whose ``cond(A)`` estimate exceeds :data:`GRAM_MAX_COND` is replaced by a QR
    factorisation of ``Aᵀ`` (error ``∝ u·cond(A)`` instead of ``u·cond(A)²``). A numerically rank-deficient
    ``A`` (``u·cond(A) > RANK_TOL``) gets the minimum-norm least-squares solve and, with ``warn``, a
    :class:`GramFallbackWarning`.
    """
    names = names or [f"matrix {j}" for j in range(len(grams))]
    stack = torch.stack(grams)
    if solve_dtype is not None:
        stack = stack.to(solve_dtype)
    lower, status = torch.linalg.cholesky_ex(stack)
    cond = _cond_estimate(lower)
    flags = torch.stack([status.to(cond.dtype), cond]).tolist()  # the one synchronisation
    out = []
    for j, (bad, kappa) in enumerate(zip(*flags)):
        if bad == 0 and math.isfinite(kappa) and kappa <= GRAM_MAX_COND:
            out.append(
                RowFactor(
                    "cholesky", SolveInfo("cholesky", stack.shape[-1], stack.shape[-1]), kappa, lower[j]
                )
            )
        else:
            out.append(_qr_factor(matrices[j](), solve_dtype, warn, names[j]))
    return out


def _qr_factor(a: Tensor, solve_dtype: torch.dtype | None, warn: bool, name: str) -> RowFactor:
    """QR of ``Aᵀ`` (``A``: ``B × c``, ``B ≤ c``); an SVD of ``R`` when ``A`` is numerically
    rank-deficient."""
    if solve_dtype is not None:
        a = a.to(solve_dtype)
    size = a.shape[0]
    q, r = torch.linalg.qr(a.T)
    kappa = float(_cond_estimate(r.T))
    u = unit_roundoff(a.dtype)
    if math.isfinite(kappa) and u * kappa <= RANK_TOL:
        return RowFactor("qr", SolveInfo("qr", size, size), kappa, lower=r.T, basis=q)
    # Aᵀ = Q R = (Q U) Σ Vᵀ, so A⁺ = (Q U) Σ⁺ Vᵀ.
    left, sigma, right_t = torch.linalg.svd(r)
    keep = sigma > sigma[0] * u / RANK_TOL
    rank = int(keep.sum())
    if warn:
        warnings.warn(
            f"{name} ({size} samples) does not have numerically full row rank (estimated condition number "
            f"{kappa:.1e}, {rank} of {size} singular values above {u / RANK_TOL:.0e}·σ_max): solving by "
            "least squares "
            "without its null space: this step is a least-squares step, not an exact one. Use a smaller "
            "batch, float64, damping or truncation.",
            GramFallbackWarning,
            stacklevel=4,
        )
    basis = q @ left[:, keep]
    coef = right_t[keep] / sigma[keep, None]
    return RowFactor("svd-fallback", SolveInfo("svd-fallback", size, rank), kappa, basis=basis, coef=coef)
