"""From a run configuration to a model and an optimiser that takes one step on a batch.

:func:`build_model` makes the RevMLP of ``[model]``; :func:`build_stepper` the :class:`Stepper` of
``[optim]``. A stepper hides how an optimiser steps (GN takes the batch and needs no ``backward()``; gradient
optimisers need the loss's gradient), so the training loop never asks which optimiser it drives. Each
optimiser is one entry of :data:`STEPPERS`, next to its ``[optim.<name>]`` table in :mod:`exactgn.lab.config`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from ..errors import InexactStepError, NonFiniteError
from ..gn import check_exactness
from ..linalg import GramFallbackWarning
from ..losses import as_target_rows, loss_value
from ..model import RevMLP
from ..models import MLP, ResMLP
from ..optim import GaussNewton
from ..precision import dtype_from_name
from .config import ConfigError, ModelConfig, RunConfig

__all__ = [
    "Diverged",
    "StepOutcome",
    "Stepper",
    "GNStepper",
    "GradientStepper",
    "STEPPERS",
    "MODEL_BUILDERS",
    "build_model",
    "build_stepper",
    "build_optimizer",
    "check_gn_batch",
]


class Diverged(Exception):
    """A step produced a non-finite loss or parameters; the message says which."""


@dataclass
class StepOutcome:
    """What one step saw: the batch ``loss`` before the step (a scalar), the ``logits`` (``B × k``) it was
    computed from, and the warnings raised during the step (Gram fall-backs included)."""

    loss: Tensor
    logits: Tensor
    caught: list[warnings.WarningMessage]


class Stepper(Protocol):
    """One optimiser step on a batch ``x`` (``B × d``), ``y`` (``B`` labels); raises :class:`Diverged`."""

    optimizer: torch.optim.Optimizer

    def step(self, x: Tensor, y: Tensor) -> StepOutcome: ...


class GNStepper:
    """:class:`exactgn.GaussNewton`: the step takes the batch itself."""

    def __init__(self, optimizer: GaussNewton) -> None:
        self.optimizer = optimizer

    def step(self, x: Tensor, y: Tensor) -> StepOutcome:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", GramFallbackWarning)
                before = self.optimizer.step(x, y)
        except NonFiniteError as exc:
            raise Diverged(str(exc)) from exc
        return StepOutcome(before, self.optimizer.last_result.logits, list(caught))


class GradientStepper:
    """Any ``torch.optim`` optimiser: loss, ``backward()``, ``step()``; checks the result is finite."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: RevMLP, loss: str) -> None:
        self.optimizer, self.model, self.loss = optimizer, model, loss

    def step(self, x: Tensor, y: Tensor) -> StepOutcome:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        rows = as_target_rows(y, self.model.num_classes, y.shape[0], logits, self.loss)
        before = loss_value(logits, rows, self.loss)
        if not torch.isfinite(before):
            raise Diverged(
                f"the batch loss is {before.item()} before the step; the parameters were left unchanged"
            )
        before.backward()
        self.optimizer.step()
        sums = torch.stack([p.detach().sum() for p in self.model.parameters()])
        if not torch.isfinite(sums).all():
            raise Diverged("the step made some parameters non-finite")
        return StepOutcome(before, logits, [])


def _gn(cfg: RunConfig, model: RevMLP) -> Stepper:
    o, g = cfg.optim, cfg.optim.gn
    opt = GaussNewton(
        model,
        lr=o.lr,
        loss=cfg.train.loss,
        hessian=g.hessian,
        inverse=g.inverse,
        rtol=g.rtol,
        atol=g.atol,
        damping=g.damping,
        least_squares=g.least_squares,
        weight_decay=o.weight_decay,
        noise=g.noise,
        solve_dtype=None if g.solve_dtype == "model" else g.solve_dtype,
    )
    return GNStepper(opt)


def _adam(cfg: RunConfig, model: RevMLP) -> Stepper:
    o = cfg.optim
    opt = torch.optim.Adam(
        model.parameters(), lr=o.lr, betas=tuple(o.adam.betas), eps=o.adam.eps, weight_decay=o.weight_decay
    )
    return GradientStepper(opt, model, cfg.train.loss)


def _adamw(cfg: RunConfig, model: RevMLP) -> Stepper:
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=o.lr,
        betas=tuple(o.adamw.betas),
        eps=o.adamw.eps,
        weight_decay=o.weight_decay,
        amsgrad=o.adamw.amsgrad,
    )
    return GradientStepper(opt, model, cfg.train.loss)


def _sgd(cfg: RunConfig, model: RevMLP) -> Stepper:
    o = cfg.optim
    opt = torch.optim.SGD(
        model.parameters(),
        lr=o.lr,
        momentum=o.sgd.momentum,
        nesterov=o.sgd.nesterov,
        weight_decay=o.weight_decay,
    )
    return GradientStepper(opt, model, cfg.train.loss)


#: Optimiser name (``optim.name``) → the function making its stepper; one entry per ``[optim.<name>]`` table.
STEPPERS: dict[str, Callable[[RunConfig, RevMLP], Stepper]] = {
    "gn": _gn,
    "adam": _adam,
    "adamw": _adamw,
    "sgd": _sgd,
}


def _revmlp(m: ModelConfig, features: int, num_classes: int, seed: int) -> nn.Module:
    hidden = m.hidden if m.bottleneck else None
    return RevMLP(
        features, num_classes, m.blocks, hidden, bias=m.bias, init_std=m.init_std, seed=seed,
        dtype=dtype_from_name(m.dtype),
    )  # fmt: skip


def _mlp(m: ModelConfig, features: int, num_classes: int, seed: int) -> nn.Module:
    init_std = m.init_std if m.init == "std" else None
    return MLP(
        features, num_classes, m.widths, activation=m.activation, bias=m.bias, init_std=init_std, seed=seed,
        dtype=dtype_from_name(m.dtype),
    )  # fmt: skip


def _resmlp(m: ModelConfig, features: int, num_classes: int, seed: int) -> nn.Module:
    hidden = m.hidden if m.bottleneck else None
    return ResMLP(
        features, num_classes, m.blocks, hidden, bias=m.bias, init_std=m.init_std, seed=seed,
        dtype=dtype_from_name(m.dtype),
    )  # fmt: skip


#: ``model.kind`` → the function building that model from ``[model]``; one entry per kind of
#: :data:`exactgn.lab.config.MODEL_KINDS`.
MODEL_BUILDERS: dict[str, Callable[[ModelConfig, int, int, int], nn.Module]] = {
    "revmlp": _revmlp,
    "mlp": _mlp,
    "resmlp": _resmlp,
}


def build_model(cfg: RunConfig, features: int, num_classes: int) -> nn.Module:
    """The model of ``cfg.model`` (``model.kind``: RevMLP, MLP or ResMLP) for inputs of ``features`` and
    ``num_classes`` outputs, on the CPU."""
    try:
        return MODEL_BUILDERS[cfg.model.kind](cfg.model, features, num_classes, cfg.seed)
    except ValueError as exc:  # e.g. a ResMLP with more classes than features
        raise ConfigError(f"model: cannot build a {cfg.model.kind} for this dataset: {exc}") from None


def build_stepper(cfg: RunConfig, model: RevMLP) -> Stepper:
    """The :class:`Stepper` of ``cfg.optim.name`` for ``model``."""
    return STEPPERS[cfg.optim.name](cfg, model)


def build_optimizer(cfg: RunConfig, model: RevMLP) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that ``cfg.optim`` describes (the stepper's optimiser)."""
    return build_stepper(cfg, model).optimizer


def _check_rows(batch: int, k: int, params: int) -> None:
    """J⁺ of any model is exact only while J (``batch·k`` rows) can have full row rank."""
    if batch * k > params:
        raise InexactStepError(
            f"J has batch·k = {batch * k} rows but the model only {params} trainable parameters, so it "
            "cannot have full row rank."
        )


def check_gn_batch(cfg: RunConfig, model: RevMLP, batch: int) -> None:
    """Refuse up front, naming the config keys, a GN step that the engine would refuse at the first step
    (:func:`exactgn.gn.check_exactness`, reworded for a configuration)."""
    g = cfg.optim.gn
    if cfg.optim.name != "gn":
        return
    lenient = g.least_squares or bool(g.rtol or g.atol or g.damping)
    try:
        if isinstance(model, RevMLP):
            check_exactness(model, batch, g.inverse, lenient)
        elif not lenient:
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            _check_rows(batch, model.num_classes, params)
    except InexactStepError as exc:
        fix = (
            "Set optim.gn.least_squares = true (least-squares step), turn on truncation (optim.gn.rtol/atol) "
            "or damping, or use a smaller train.batch_size"
        )
        raise ConfigError(
            f"optim.gn: batches of {batch} are too large for an exact step: {exc} {fix}"
        ) from None


def finite_loss(value: Any) -> float:
    """``float(value)``, or :class:`Diverged` when it is not finite."""
    loss = float(value)
    if not math.isfinite(loss):
        raise Diverged(f"the batch loss is {loss}")
    return loss
