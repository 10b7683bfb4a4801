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

__all__ = ["Regularisation", "SolveInfo", "GramFallbackWarning", "gram_solve"]


class GramFallbackWarning(RuntimeWarning):
    """A Gram matrix that should be positive definite was not; the solve was a least-squares one."""


@dataclass(frozen=True)
class Regularisation:
    """Truncation (``rtol``, ``atol`` on singular values) and damping of the pseudo-inverse. All zero: exact."""

    rtol: float = 0.0
    atol: float = 0.0
    damping: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rtol", "atol", "damping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def truncates(self) -> bool:
        return self.rtol > 0 or self.atol > 0

    @property
    def exact(self) -> bool:
        return not self.truncates and self.damping == 0


@dataclass
class SolveInfo:
    """How one Gram solve went: ``method`` is ``"cholesky"``, ``"eigh"`` (truncation asked for),
    ``"eigh-fallback"`` (Cholesky failed) or ``"eigh-lstsq"`` (a minimum-norm solve was asked for);
    ``rank`` is how many directions were kept out of ``size``."""

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
    may hold anything). ``warn``: warn when the unregularised solve falls back to least squares; ``what`` names the matrix.

    ``min_norm``: the caller needs the minimum-norm solution of a system that may be singular but is consistent
    (normal equations ``MᵀM c = MᵀR``): there a Cholesky solve can pass the residual check and still carry huge
    null-space components, so the unregularised solve goes straight to the eigen-solve without the null space.

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
            sol = torch.cholesky_solve(rhs, factor)
            residual = float((_symmetric_matmul(system, sol, lower_only) - rhs).norm() / rhs.norm().clamp_min(1e-300))
            if residual <= (2 * unit_roundoff(system.dtype)) ** 0.5:
                return sol.to(out_dtype), SolveInfo("cholesky", n, n)
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


def _symmetric_matmul(sym: Tensor, x: Tensor, lower_only: bool) -> Tensor:
    """``K x`` for symmetric ``K``; with ``lower_only`` only its lower triangle is read."""
    if not lower_only:
        return sym @ x
    low = torch.tril(sym)
    return low @ x + low.T @ x - sym.diagonal()[:, None] * x
