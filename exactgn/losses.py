"""Losses on the logits and their Gauss–Newton targets ``v = H⁺ g`` (DESIGN §3).

Both losses are averaged over the batch: ``ℓ = (1/B) Σ_i ℓ_i(o_i)``.

* ``"mse"``: ``ℓ_i = ½‖o_i − y_i‖²``, so ``g_i = (o_i − y_i)/B``, ``H_i = I/B`` and ``v_i = o_i − y_i``.
* ``"cross_entropy"``: ``ℓ_i = −Σ_c y_ic log p_ic`` with ``p_i = softmax(o_i)``, ``g_i = (p_i − y_i)/B``.
  With ``hessian="exact"``, ``H_i = (diag p_i − p_i p_iᵀ)/B`` and the minimum-norm solution is
  ``v_i = mean(y_i/p_i)·1 − y_i/p_i``; with ``hessian="identity"`` (the reference runs), ``v_i = p_i − y_i``.

The normalisation of the loss cancels in ``v``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import NonFiniteError

__all__ = ["LOSSES", "HESSIANS", "as_target_rows", "loss_value", "loss_gradient", "newton_target", "accuracy"]

LOSSES = ("cross_entropy", "mse")
HESSIANS = ("exact", "identity")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def as_target_rows(targets: Tensor, num_classes: int, batch: int, like: Tensor, loss: str = "mse") -> Tensor:
    """Targets as ``B × k`` rows in ``like``'s dtype and device.

    ``targets`` are class indices (integer, shape ``B``) or rows (floating, shape ``B × k``: one-hot, or
    any real targets for MSE; for cross-entropy, rows must be probability vectors).
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_complex():
        raise TypeError(
            f"targets are complex ({targets.dtype}); pass integer class indices of shape (B,) or real rows "
            f"of shape (B, {num_classes})"
        )
    if targets.dim() == 1 and not targets.is_floating_point():
        if targets.dtype == torch.bool:
            raise ValueError("targets must be integer class indices or floating rows, got a bool tensor")
        if targets.shape[0] != batch:
            raise ValueError(f"got {targets.shape[0]} class labels for a batch of {batch} inputs")
        if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
            bad = targets[(targets < 0) | (targets >= num_classes)]
            raise ValueError(
                f"class labels must lie in [0, {num_classes - 1}] for a model with "
                f"num_classes={num_classes}; "
                f"got {bad[:5].tolist()}"
            )
        return torch.nn.functional.one_hot(targets.to(like.device).long(), num_classes).to(like.dtype)
    if targets.dim() == 2 and targets.is_floating_point():
        if tuple(targets.shape) != (batch, num_classes):
            raise ValueError(
                f"target rows of shape {tuple(targets.shape)} do not match the batch: expected ({batch}, "
                f"{num_classes})"
            )
        rows = targets.to(device=like.device, dtype=like.dtype)
        if not torch.isfinite(rows).all():
            raise ValueError("targets contain NaN or infinite values")
        if loss == "cross_entropy":
            if (rows < 0).any():
                raise ValueError("cross-entropy targets must be non-negative (one-hot or probability rows)")
            sums = rows.sum(1)
            if not torch.allclose(
                sums, torch.ones_like(sums), atol=1e-6 if rows.dtype == torch.float64 else 1e-4
            ):
                raise ValueError(
                    "cross-entropy target rows must sum to 1 (one-hot or probability rows); "
                    f"row sums range over [{sums.min().item():.4g}, {sums.max().item():.4g}]"
                )
        return rows
    raise ValueError(
        "targets must be integer class indices of shape (B,) or floating rows of shape (B, k); "
        f"got dtype {targets.dtype} and shape {tuple(targets.shape)}"
    )


def loss_value(logits: Tensor, rows: Tensor, loss: str) -> Tensor:
    """Mean loss over the batch (scalar). ``logits``, ``rows``: ``B × k``."""
    check_choice("loss", loss, LOSSES)
    if loss == "mse":
        return 0.5 * (logits - rows).pow(2).sum(1).mean()
    return -(rows * torch.log_softmax(logits, dim=1)).sum(1).mean()


def loss_gradient(logits: Tensor, rows: Tensor, loss: str) -> Tensor:
    """``g = ∂ℓ/∂o`` of the mean loss (``B × k``)."""
    check_choice("loss", loss, LOSSES)
    residual = logits - rows if loss == "mse" else torch.softmax(logits, dim=1) - rows
    return residual / logits.shape[0]


def newton_target(logits: Tensor, rows: Tensor, loss: str, hessian: str = "exact") -> Tensor:
    """``v = H⁺ g`` (``B × k``): the function-space Gauss–Newton step on the batch.

    Raises :class:`NonFiniteError` when it is not finite (exact cross-entropy with a vanishing probability).
    """
    check_choice("loss", loss, LOSSES)
    check_choice("hessian", hessian, HESSIANS)
    if loss == "mse":
        return logits - rows
    p = torch.softmax(logits, dim=1)
    if hessian == "identity":
        return p - rows
    ratio = rows / p
    v = ratio.mean(1, keepdim=True) - ratio
    if not torch.isfinite(v).all():
        raise NonFiniteError(
            "cross-entropy with hessian='exact': v = H⁺g is not finite because a target class has a "
            f"probability that underflows (smallest p = {p.min().item():.3g} in {p.dtype}). "
            "Use hessian='identity', float64, or a smaller step."
        )
    return v


def accuracy(logits: Tensor, rows: Tensor) -> Tensor:
    """Fraction of samples whose largest logit is the largest target entry (scalar)."""
    return (logits.argmax(1) == rows.argmax(1)).to(logits.dtype).mean()
