"""A view of a :class:`~exactgn.RevMLP` whose trainable layers are ``nn.Linear``, for hook-based libraries.

A RevMLP half-layer computes ``φ(u C) Wᵀ + β`` in one module, so a library that finds layers by type and
reads their inputs with hooks (BackPACK, nngeometry, curvlinops' KFAC, Opacus) sees neither a Linear nor the
features ``φ(u C)`` a Linear's weight multiplies. :func:`linear_view` builds a module that computes the same
function with each half-layer split into its fixed part (``u ↦ φ(u C)``) and an ``nn.Linear(h, n)`` whose
``weight`` and ``bias`` **are** the half-layer's parameters (the same ``nn.Parameter`` objects, not copies):
a hook on the Linear sees ``A = φ(u C)`` (``B × h``) and the output cotangent (``B × n``), and whatever
updates the view's parameters updates the RevMLP.

The RevMLP itself is unchanged (its parameter names, checkpoints and autograd-free GN path stay as they are).
The view reads the fixed bottlenecks and readout from the RevMLP at every call, so moving or casting the
RevMLP is seen by the view, and ``view.to(...)`` (``.double()``, ``.cuda()``, …) moves or casts the RevMLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .model import HalfLayer, RevMLP

__all__ = ["LinearHalfLayer", "RevMLPLinearView", "linear_view"]


class LinearHalfLayer(nn.Module):
    """``u ↦ linear(φ(u C))``: a RevMLP half-layer with its trainable part as an ``nn.Linear(h, n)``.

    ``activation`` is ``nn.ReLU`` or ``nn.Identity`` (the half-layer's ``φ``); ``linear.weight`` (``n × h``)
    and ``linear.bias`` (``n``) are the half-layer's ``weight`` and ``bias`` parameters themselves.
    """

    def __init__(self, half: HalfLayer) -> None:
        super().__init__()
        object.__setattr__(self, "_half", half)  # not a submodule: its parameters belong to `linear`
        self.activation = nn.ReLU() if half.activation == "relu" else nn.Identity()
        self.linear = nn.Linear(half.width, half.n, bias=half.bias is not None, device="meta")
        self.linear.weight = half.weight
        if half.bias is not None:
            self.linear.bias = half.bias

    def forward(self, u: Tensor) -> Tensor:
        """``B × n → B × n``."""
        return self.linear(self.activation(self._half.preactivation(u)))


class _LinearBlock(nn.Module):
    def __init__(self, f: HalfLayer, g: HalfLayer) -> None:
        super().__init__()
        self.f = LinearHalfLayer(f)
        self.g = LinearHalfLayer(g)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        a = a + self.f(b)
        return a, b + self.g(a)


class RevMLPLinearView(nn.Module):
    """The function of a RevMLP (``B × d`` or images → logits ``B × k``) with ``nn.Linear`` half-layers.

    Parameter ``blocks.{l}.{f,g}.linear.{weight,bias}`` is the RevMLP's ``blocks.{l}.{f,g}.{weight,bias}``
    (:meth:`source_names`). Build it with :func:`linear_view`.
    """

    def __init__(self, model: RevMLP) -> None:
        super().__init__()
        if not isinstance(model, RevMLP):
            raise TypeError(f"linear_view takes an exactgn.RevMLP, got {type(model).__name__}")
        object.__setattr__(self, "_model", model)
        self.blocks = nn.ModuleList(_LinearBlock(block.f, block.g) for block in model.blocks)

    @property
    def model(self) -> RevMLP:
        """The RevMLP this is a view of."""
        return self._model

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RevMLPLinearView:
        # .to()/.double()/.cuda() act on the RevMLP, which holds the buffers and the very same parameters.
        self._model._apply(fn, recurse)
        return self

    def source_names(self) -> dict[str, str]:
        """View parameter name → the RevMLP's name of the same parameter (e.g. ``blocks.0.f.linear.weight``
        → ``blocks.0.f.weight``)."""
        return {name: name.replace(".linear.", ".") for name, _ in self.named_parameters()}

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``B × k``, equal to ``model(x)``."""
        model = self._model
        a, b = model._split(model.flatten_inputs(x))
        for block in self.blocks:
            a, b = block(a, b)
        return torch.cat([a, b], dim=1) @ model.readout


def linear_view(model: RevMLP) -> RevMLPLinearView:
    """A module computing ``model``'s function whose trainable layers are ``nn.Linear`` sharing ``model``'s
    parameters, for hook-based libraries (see the module docstring).

    Returns a :class:`RevMLPLinearView` mapping ``B × d`` (or images) to logits ``B × k``, with ``2L``
    ``nn.Linear(h, d/2)`` layers whose parameters are the RevMLP's own.

    Example::

        view = exactgn.linear_view(model)
        [m for m in view.modules() if isinstance(m, torch.nn.Linear)]  # 2L layers, weight n × h
        view(x)  # == model(x); view.parameters() are model.parameters()
    """
    return RevMLPLinearView(model)
