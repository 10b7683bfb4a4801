"""Losses: value, gradient and v = H⁺g against autograd and pinv in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, hessian

from exactgn.errors import NonFiniteError
from exactgn.losses import as_target_rows, loss_gradient, loss_value, newton_target

F64 = torch.float64


def _batch(rng, b=6, k=5, scale=2.0):
    logits = scale * torch.randn(b, k, generator=rng, dtype=F64)
    labels = torch.randint(0, k, (b,), generator=rng)
    return logits, torch.nn.functional.one_hot(labels, k).to(F64)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_value_and_gradient_match_autograd(rng, loss):
    logits, rows = _batch(rng)
    if loss == "cross_entropy":
        ref = torch.nn.functional.cross_entropy(logits, rows.argmax(1))
    else:
        ref = 0.5 * ((logits - rows) ** 2).sum(1).mean()
    assert loss_value(logits, rows, loss).item() == pytest.approx(ref.item(), rel=1e-14)
    g = grad(lambda o: loss_value(o, rows, loss))(logits)
    assert torch.allclose(loss_gradient(logits, rows, loss), g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss, hess", [("mse", "exact"), ("cross_entropy", "exact")])
@pytest.mark.parametrize("soft", [False, True])
def test_v_is_pinv_of_hessian_times_gradient(rng, loss, hess, soft):
    """``v = H⁺g`` against the autograd Hessian: ``Hv = g`` and no component in ``null(H)`` (which define
    ``H⁺g`` when ``g ∈ range(H)``), and equal to ``pinv(H) g`` with the same numerical null space.

    ``pinv``'s default cut-off (``k·eps·λ_max``) can keep the rounded null eigenvalue of the autograd Hessian
    (about one draw in 25 with a small probability): its "reference" then carries a huge ``1`` component.
    """
    logits, rows = _batch(rng)
    if soft:  # probability rows (label smoothing-like) are valid targets too
        rows = torch.softmax(torch.randn(rows.shape, generator=rng, dtype=F64), 1)
    g = grad(lambda o: loss_value(o, rows, loss))(logits)
    h = hessian(lambda o: loss_value(o, rows, loss))(logits)  # B×k×B×k, block-diagonal over samples
    for i in range(logits.shape[0]):
        block = h[i, :, i, :]
        evals, evecs = torch.linalg.eigh(block)
        null = evals.abs() <= 1e-12 * evals.abs().max()
        got = newton_target(logits, rows, loss, hess)[i]
        assert (block @ got - g[i]).norm() <= 1e-12 * evals.abs().max() * got.norm()  # measured worst: 6e-14
        assert (evecs[:, null].T @ got).norm() <= 1e-9 * got.norm()
        ref = torch.linalg.pinv(block, hermitian=True, rtol=1e-12) @ g[i]
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12), (got, ref)
        off = h[i, :, (i + 1) % logits.shape[0], :]
        assert off.abs().max() == 0  # no coupling between samples


def test_identity_hessian_target_is_the_residual(rng):
    logits, rows = _batch(rng)
    v = newton_target(logits, rows, "cross_entropy", "identity")
    assert torch.allclose(v, torch.softmax(logits, 1) - rows, rtol=0, atol=1e-15)


def test_exact_cross_entropy_refuses_a_vanishing_probability():
    logits = torch.tensor([[0.0, -800.0, 0.0]], dtype=F64)  # p of class 1 underflows to 0
    rows = torch.tensor([[0.0, 1.0, 0.0]], dtype=F64)
    with pytest.raises(NonFiniteError, match="hessian='identity'"):
        newton_target(logits, rows, "cross_entropy", "exact")


def test_target_checks():
    like = torch.zeros(3, 4, dtype=F64)
    rows = as_target_rows(torch.tensor([0, 3, 1]), 4, 3, like)
    assert torch.equal(rows, torch.eye(4, dtype=F64)[[0, 3, 1]])
    with pytest.raises(ValueError, match=r"\[0, 3\].*\[4\]"):
        as_target_rows(torch.tensor([0, 4, 1]), 4, 3, like)
    with pytest.raises(ValueError, match="-1"):
        as_target_rows(torch.tensor([0, -1, 1]), 4, 3, like)
    with pytest.raises(ValueError, match="2 class labels for a batch of 3"):
        as_target_rows(torch.tensor([0, 1]), 4, 3, like)
    with pytest.raises(ValueError, match="expected \\(3, 4\\)"):
        as_target_rows(torch.zeros(3, 5), 4, 3, like)
    nan_rows = torch.zeros(3, 4)
    nan_rows[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        as_target_rows(nan_rows, 4, 3, like)
    with pytest.raises(ValueError, match="sum to 1"):
        as_target_rows(2 * torch.eye(4)[:3], 4, 3, like, loss="cross_entropy")
    as_target_rows(2 * torch.eye(4)[:3], 4, 3, like, loss="mse")  # any real rows are fine for MSE
    with pytest.raises(ValueError, match="loss must be one of"):
        loss_value(like, like, "hinge")
    with pytest.raises(ValueError, match="hessian must be one of"):
        newton_target(like, like, "cross_entropy", "fisher")
