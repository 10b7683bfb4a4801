"""``GaussNewton``: a ``torch.optim.Optimizer`` taking exact GN steps on a :class:`RevMLP`.

Adam and SGD are torch's own; this module adds only GN.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from .errors import NonFiniteError
from .generic import check_right_inverse
from .gn import INVERSES, GNResult, compute_direction
from .linalg import Regularisation, all_finite
from .losses import HESSIANS, LOSSES, check_choice
from .model import RevMLP
from .precision import as_solve_dtype

__all__ = ["GaussNewton"]

# Settings that define the GN direction itself: one value for the whole model.
_DIRECTION_KEYS = ("loss", "hessian", "inverse", "rtol", "atol", "damping", "least_squares", "solve_dtype")


class GaussNewton(torch.optim.Optimizer):
    """Exact Gauss–Newton: ``θ ← θ − lr·(Δθ + weight_decay·θ + ξ)`` with ``Δθ`` from
    :func:`exactgn.gn_direction`.

    Unlike torch's optimisers, :meth:`step` takes the batch: ``opt.step(inputs, targets)``, inputs ``B × d``,
    targets ``B`` (class indices) or ``B × k``. It needs no ``backward()``. Learning-rate schedulers and
    ``state_dict``/``load_state_dict`` work as usual.

    Args:
        model: the :class:`RevMLP` to train, or any ``torch.nn.Module`` with ``inverse="pinv"``
            (:mod:`exactgn.generic`).
        lr: learning rate. With ``lr=1`` the linearised model fits ``v`` exactly on the batch.
        params: optional parameter groups (each with its own ``lr``, ``weight_decay``, ``noise``); together
            they must hold every trainable parameter of ``model``, since the GN direction moves all of them.
        loss, hessian, inverse, rtol, atol, damping, least_squares: as in :func:`exactgn.gn_direction`.
        weight_decay: adds ``weight_decay·θ`` to the direction (so it decays by ``lr·weight_decay`` a step).
        noise: adds Gaussian noise with standard deviation ``noise × RMS(Δθ)`` per parameter tensor to the
            direction (DESIGN §3c), drawn from torch's global generator.
        solve_dtype: ``"float64"`` (or ``torch.float64``) to factorise the Gram matrices in double precision,
            ``"float32"``, or ``None`` for the model's; stored by name (``"float64"``) in the parameter
            groups.

    A float16/bfloat16 model's step is computed in float32, then rounded to its dtype (see ``gn_direction``).

    After each step, ``opt.last_result`` holds the :class:`~exactgn.gn.GNResult` (logits, ``v``, solve
    reports).
    """

    def __init__(
        self,
        model: RevMLP,
        lr: float = 1.0,
        *,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        loss: str = "cross_entropy",
        hessian: str = "identity",
        inverse: str = "right",
        rtol: float = 0.0,
        atol: float = 0.0,
        damping: float = 0.0,
        least_squares: bool = False,
        weight_decay: float = 0.0,
        noise: float = 0.0,
        solve_dtype: str | torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"GaussNewton needs a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(model, RevMLP):
            check_right_inverse(model, inverse)
        _check_lr_positive(lr)
        defaults = dict(
            lr=lr,
            loss=loss,
            hessian=hessian,
            inverse=inverse,
            rtol=rtol,
            atol=atol,
            damping=damping,
            least_squares=least_squares,
            weight_decay=weight_decay,
            noise=noise,
            solve_dtype=solve_dtype,
        )
        _check_group(defaults)
        default = [p for p in model.parameters() if p.requires_grad]  # frozen tensors (ResMLP) take no step
        super().__init__(default if params is None else params, defaults)
        self.model = model
        self.last_result: GNResult | None = None
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
        if missing:
            raise ValueError(
                "GaussNewton must own every trainable parameter of the model (the GN direction moves them "
                "all); "
                f"missing: {missing[:4]}{' ...' if len(missing) > 4 else ''}"
            )
        if len(owned) != len(trainable):
            raise ValueError("GaussNewton was given tensors that are not trainable parameters of the model")
        for group in self.param_groups:
            _check_group(group)

    def _direction_settings(self) -> dict[str, Any]:
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            for key in _DIRECTION_KEYS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"all parameter groups must share {key!r} (it defines the GN direction); "
                        f"got {first[key]!r} and {group[key]!r}"
                    )
        return {key: first[key] for key in _DIRECTION_KEYS}

    @torch.no_grad()
    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        """One GN step on the batch ``(inputs, targets)``; returns the batch loss *before* the step.

        ``inputs``: ``B × d`` (or images that flatten to ``d``); ``targets``: class indices (``B``) or rows
        (``B × k``); the loss is a 0-dim tensor.

        If the step would make any parameter NaN or infinite, no parameter changes and
        :class:`~exactgn.NonFiniteError` is raised.
        """
        for group in self.param_groups:
            _check_group(group)
        settings = self._direction_settings()
        result = compute_direction(self.model, inputs, targets, **settings)
        name_of = {p: name for name, p in self.model.named_parameters()}
        moves: list[tuple[Tensor, Tensor, float]] = []
        for group in self.param_groups:
            lr, wd, noise = group["lr"], group["weight_decay"], group["noise"]
            for p in group["params"]:
                d = result.direction[name_of[p]]
                if noise:
                    rms = d.pow(2).mean().sqrt()
                    d = d + noise * rms * torch.randn_like(d)
                if wd:
                    d = d + wd * p
                moves.append((p, d, lr))
        if _cannot_overflow(moves):
            for p, d, lr in moves:
                p.add_(d, alpha=-lr)
        else:
            _apply_if_finite(moves, name_of, result.loss)
        for p, _, _ in moves:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
        self.last_result = result
        return result.loss


def _cannot_overflow(moves: list[tuple[Tensor, Tensor, float]]) -> bool:
    """``max|p| + lr·max|d|`` is finite and far below the dtype's largest value for every ``p − lr·d``.

    Then no entry of any update can be NaN or infinite and the step can be applied in place; one device
    synchronisation.
    """
    if not moves:
        return True
    if any(lr > 0.5 * torch.finfo(p.dtype).max for p, _, lr in moves):  # alpha itself must fit the dtype
        return False

    def excess(p: Tensor, d: Tensor, lr: float) -> Tensor:
        # aminmax, not vector_norm(inf): the latter measured 20× slower on the CPU
        size = torch.stack([*torch.aminmax(p), *torch.aminmax(d)]).double().abs()
        return size[:2].max() + lr * size[2:].max() - 0.5 * torch.finfo(p.dtype).max

    bounds = torch.stack([excess(p, d, lr) for p, d, lr in moves])
    return bool((bounds <= 0).all())  # NaN compares False


def _apply_if_finite(moves: list[tuple[Tensor, Tensor, float]], name_of: dict, loss: Tensor) -> None:
    """Compute every ``p − lr·d``; apply them all only if every entry is finite, else raise naming the
    parameters."""
    updated = [(p, p - lr * d) for p, d, lr in moves]
    finite = all_finite([new for _, new in updated])
    bad = [name_of[p] for (p, _), ok in zip(updated, finite) if not ok]
    if bad:
        raise NonFiniteError(
            f"the GN step would make {bad[:4]} non-finite (batch loss before the step: {loss.item():.4g}); "
            "the parameters were left unchanged. Lower the learning rate or add damping/truncation."
        )
    for p, new in updated:
        p.copy_(new)


def _check_lr_positive(lr: object) -> None:
    """The constructor's ``lr`` must be > 0 (a scheduler may later anneal a group's rate to 0)."""
    value = float(lr) if isinstance(lr, Tensor) and lr.numel() == 1 else lr
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        never = ": the optimiser would never move the parameters" if number and value == 0 else ""
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}{never}")


def _check_group(group: dict[str, Any]) -> None:
    """Validate a parameter group's settings; stores ``solve_dtype`` by name (``None``, float32, float64)."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        lr = float(lr) if lr.numel() == 1 else lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {group['lr']!r}")
    check_choice("loss", group["loss"], LOSSES)
    check_choice("hessian", group["hessian"], HESSIANS)
    check_choice("inverse", group["inverse"], INVERSES)
    Regularisation(group["rtol"], group["atol"], group["damping"])
    for key in ("weight_decay", "noise"):
        value = group[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    solve = as_solve_dtype(group["solve_dtype"])
    group["solve_dtype"] = None if solve is None else str(solve).removeprefix("torch.")
    if not isinstance(group["least_squares"], bool):
        raise ValueError(f"least_squares must be True or False, got {group['least_squares']!r}")
