"""Models beside :class:`~exactgn.RevMLP`: a plain :class:`MLP` and a residual :class:`ResMLP`.

Both are built from ``nn.Linear`` (so hook-based libraries see their layers) and follow RevMLP's init
conventions: every random tensor is drawn in float64 on the CPU from ``seed`` (same seed, same model in every
dtype), biases start at zero, and ``init_std`` sets the standard deviation of the trainable weights.

* ``MLP``: ``d → w_1 → … → w_m → k``, all layers trainable.
* ``ResMLP``: RevMLP's inverted-bottleneck blocks with additive skips, not reversible: block ``l`` maps
  ``z ↦ z + φ(z C_l) W_lᵀ + β_l`` (``C_l`` fixed ``d × h``, ``N(0, 1/h)``; ``W_l`` ``d × h`` trainable), the
  first block with the identity activation, and logits ``z_L U`` with a fixed orthonormal ``U`` (``d × k``).
  A block holds ``d·h + d`` parameters, as a RevMLP block does, so equal ``(d, h, L)`` means equal counts
  (without a bottleneck, ``hidden=None``, a ResMLP block holds ``d² + d``, a RevMLP block ``d²/2 + d``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["MLP", "ResMLP", "mlp_width_for"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity}
_GAINS = {"relu": math.sqrt(2.0), "gelu": math.sqrt(2.0), "tanh": 1.0, "identity": 1.0}


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}")
    return activation


def _flatten(x: Tensor, features: int) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"inputs must be a batch tensor of shape (B, {features}) or images (B, ...)")
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] != features:
        raise ValueError(
            f"inputs of shape {tuple(x.shape)} give {flat.shape[1]} features, the model takes {features}"
        )
    return flat


class MLP(nn.Module):
    """Plain MLP ``d → widths… → k`` of ``nn.Linear`` layers with activation ``φ`` between them.

    Args:
        in_features: ``d``, the flattened input size.
        num_classes: ``k``, the number of logits.
        widths: hidden widths ``w_1 … w_m`` (``m ≥ 0``; ``m = 0`` is a linear model).
        activation: ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"identity"``.
        bias: whether every layer has a trainable bias.
        init_std: standard deviation of every weight; ``None`` (default) scales by fan-in,
            ``gain/√fan_in`` (He for ReLU/GELU, LeCun for tanh/identity).
        seed: seeds every weight.
        dtype: floating dtype of all tensors.

    ``model(x)`` maps ``B × d`` (or images that flatten to ``d``) to logits ``B × k``. ``model.layers`` holds
    the ``nn.Linear`` layers in forward order.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        widths: list[int] | tuple[int, ...],
        *,
        activation: str = "relu",
        bias: bool = True,
        init_std: float | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        sizes = [_check_int("in_features", in_features, 1)]
        sizes += [_check_int("widths[i]", w, 1) for w in widths] + [_check_int("num_classes", num_classes, 1)]
        self.in_features, self.num_classes, self.widths = in_features, num_classes, list(widths)
        self.activation = _check_activation(activation)
        self.init_std = None if init_std is None else float(init_std)
        self.seed = seed
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = ACTIVATIONS[activation]()
        self.to(dtype)
        self.reset_parameters(seed)

    def config(self) -> dict:
        """The constructor arguments (without dtype), enough to rebuild the same architecture."""
        return dict(
            in_features=self.in_features,
            num_classes=self.num_classes,
            widths=list(self.widths),
            activation=self.activation,
            bias=self.layers[0].bias is not None,
            init_std=self.init_std,
            seed=self.seed,
        )

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Weights ``N(0, σ²)`` (σ: ``init_std`` or ``gain/√fan_in``), biases 0; drawn in float64 on the
        CPU."""
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        for layer in self.layers:
            std = (
                self.init_std
                if self.init_std is not None
                else _GAINS[self.activation] / math.sqrt(layer.in_features)
            )
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64) * std)
            if layer.bias is not None:
                layer.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``B × k`` from inputs ``B × d`` (or ``B × …`` flattening to ``d``)."""
        h = _flatten(x, self.in_features)
        for layer in self.layers[:-1]:
            h = self.act(layer(h))
        return self.layers[-1](h)


def mlp_width_for(
    num_params: int, in_features: int, num_classes: int, depth: int, *, bias: bool = True
) -> int:
    """The hidden width ``w`` (same for all ``depth`` hidden layers) whose :class:`MLP` has closest to
    ``num_params``.

    Counts ``(d+b)w + (depth−1)(w+b)w + (w+b)k`` parameters (``b = 1`` with bias); e.g. to match a RevMLP's
    ``sum(p.numel() for p in rev.parameters())``.
    """
    _check_int("depth", depth, 1)
    b = 1 if bias else 0

    def count(w: int) -> int:
        return (in_features + b) * w + (depth - 1) * (w + b) * w + (w + b) * num_classes

    lo, hi = 1, 1
    while count(hi) < num_params:
        hi *= 2
    while hi - lo > 1:  # count is increasing in w
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < num_params else (lo, mid)
    return min((lo, hi), key=lambda w: abs(count(w) - num_params))


class ResBlock(nn.Module):
    """``z ↦ z + φ(z C) Wᵀ + β``: ``proj`` (``d → h``, fixed, no bias) then ``out`` (``h → d``, trainable)."""

    def __init__(self, features: int, hidden: int | None, activation: str, bias: bool) -> None:
        super().__init__()
        width = features if hidden is None else hidden
        self.proj = None if hidden is None else nn.Linear(features, hidden, bias=False).requires_grad_(False)
        self.act = ACTIVATIONS[activation]()
        self.out = nn.Linear(width, features, bias=bias)

    def forward(self, z: Tensor) -> Tensor:
        u = z if self.proj is None else self.proj(z)
        return z + self.out(self.act(u))


class ResMLP(nn.Module):
    """Residual MLP with RevMLP's inverted-bottleneck blocks, additive skips and fixed readout (not
    reversible).

    Args:
        in_features: ``d``, the flattened input size.
        num_classes: ``k``, the number of logits (at most ``d``).
        num_blocks: ``L``, the number of residual blocks.
        hidden: ``h``, the bottleneck width, or ``None`` for blocks ``z + φ(z) Wᵀ + β`` with ``W`` ``d × d``.
        bias: whether every block has a trainable bias.
        init_std: standard deviation of the trainable weights (RevMLP's reference: ``1e-3``).
        seed: seeds the bottlenecks, readout and weights.
        dtype: floating dtype of all tensors.

    ``model(x)``: ``B × d`` (or images) → logits ``B × k``. Trainable: ``blocks[l].out`` only;
    ``blocks[l].proj`` (``C_lᵀ``) and ``readout`` (``Uᵀ``) are frozen ``nn.Linear`` layers.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_blocks: int,
        hidden: int | None,
        *,
        bias: bool = True,
        init_std: float = 1e-3,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        _check_int("in_features", in_features, 1)
        _check_int("num_classes", num_classes, 1)
        _check_int("num_blocks", num_blocks, 1)
        if hidden is not None:
            _check_int("hidden", hidden, 1)
        if num_classes > in_features:
            raise ValueError(
                f"num_classes ({num_classes}) must be at most in_features ({in_features}): "
                "the readout has orthonormal columns"
            )
        self.in_features, self.num_classes, self.num_blocks, self.hidden = (
            in_features,
            num_classes,
            num_blocks,
            hidden,
        )
        self.init_std, self.seed = float(init_std), seed
        self.blocks = nn.ModuleList(
            ResBlock(in_features, hidden, "identity" if l == 0 else "relu", bias) for l in range(num_blocks)
        )
        self.readout = nn.Linear(in_features, num_classes, bias=False).requires_grad_(False)
        self.to(dtype)
        self.reset_parameters(seed)

    def config(self) -> dict:
        """The constructor arguments (without dtype), enough to rebuild the same architecture."""
        return dict(
            in_features=self.in_features,
            num_classes=self.num_classes,
            num_blocks=self.num_blocks,
            hidden=self.hidden,
            bias=self.blocks[0].out.bias is not None,
            init_std=self.init_std,
            seed=self.seed,
        )

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """``C ~ N(0, 1/h)``, ``U`` = Q of a Gaussian's QR, ``W ~ N(0, init_std²)``, ``β = 0`` (float64,
        CPU)."""
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        f64 = dict(generator=gen, dtype=torch.float64)
        for block in self.blocks:
            if block.proj is not None:
                block.proj.weight.copy_(torch.randn(block.proj.weight.shape, **f64) / math.sqrt(self.hidden))
            block.out.weight.copy_(torch.randn(block.out.weight.shape, **f64) * self.init_std)
            if block.out.bias is not None:
                block.out.bias.zero_()
        q, r = torch.linalg.qr(torch.randn(self.in_features, self.num_classes, **f64))
        diag = torch.diagonal(r)
        self.readout.weight.copy_((q * torch.sign(diag).where(diag != 0, 1.0)).T)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``B × k``."""
        z = _flatten(x, self.in_features)
        for block in self.blocks:
            z = block(z)
        return self.readout(z)
