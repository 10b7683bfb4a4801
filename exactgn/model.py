"""RevMLP: the reversible MLP of DESIGN §2.

State ``z`` (``B × d``) is split into halves ``(a, b)``. Block ``l`` applies two half-layers::

    a' = a + F_l(b)      F(u) = φ(u C) Wᵀ + β
    b' = b + G_l(a')     G(u) = φ(u C') W'ᵀ + β'

``C`` is a fixed random "inverted bottleneck" (``d/2 × h``); ``W`` (``d/2 × h``) and ``β`` are trained.
``φ`` is ReLU, except in the first block, where it is the identity. Logits are ``z_L U`` with a fixed
``U`` (``d × k``) of orthonormal columns. The coupling is inverted exactly, without any solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["HalfLayer", "CouplingBlock", "RevMLP", "HalfLayerRecord", "activation_rank_bound"]


def activation_rank_bound(n: int, width: int, activation: str, bias: bool) -> int:
    """Largest possible rank of a half-layer's activation matrix ``A = [φ(u C), 1]`` (``u``: ``B × n``,
    ``C``: ``n × width``): a ReLU can lift the rank of ``u C`` up to ``width``; the identity cannot exceed
    ``n``. The right inverse of DESIGN §3a is exact only for batches no larger than this."""
    cols = width if activation == "relu" else min(width, n)
    return cols + (1 if bias else 0)


@dataclass
class HalfLayerRecord:
    """What one half-layer saw in a forward pass; enough for every GN computation.

    inputs: ``B × n``, the half of the state the half-layer reads (``u``).
    features: ``B × width``, ``φ(u C)`` (the activation matrix ``A`` without its column of ones).
    mask: ``B × width`` boolean ReLU mask ``u C > 0``, or ``None`` for the identity activation.
    """

    layer: "HalfLayer"
    name: str
    inputs: Tensor
    features: Tensor
    mask: Tensor | None


class HalfLayer(nn.Module):
    """One half-layer ``u ↦ φ(u C) Wᵀ + β`` mapping ``B × n`` to ``B × n`` (``n = d/2``).

    ``proj`` (buffer, ``n × h``) is the fixed bottleneck ``C``, or ``None`` without a bottleneck, in
    which case ``W`` is ``n × n``. ``weight`` is ``n × width`` and ``bias`` is ``n`` (or ``None``).
    """

    def __init__(self, n: int, hidden: int | None, activation: str, bias: bool) -> None:
        super().__init__()
        if activation not in ("relu", "identity"):
            raise ValueError(f"activation must be 'relu' or 'identity', got {activation!r}")
        self.n = n
        self.activation = activation
        width = n if hidden is None else hidden
        self.width = width
        self.weight = nn.Parameter(torch.zeros(n, width))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None
        self.register_buffer("proj", None if hidden is None else torch.zeros(n, hidden))

    @property
    def rank_bound(self) -> int:
        """Largest possible rank of the activation matrix ``A = [φ(u C), 1]`` over any batch.

        A ReLU can lift the rank of ``u C`` up to its width ``h``; the identity cannot exceed ``n``.
        The right inverse of DESIGN §3a is exact only for batches no larger than this.
        """
        return activation_rank_bound(self.n, self.width, self.activation, self.bias is not None)

    def proj_lq(self) -> tuple[Tensor, Tensor]:
        """``C = L Q`` with ``L`` (``n × n``, lower triangular) and ``Q`` (``n × h``, orthonormal rows); ``h ≥
        n``.

        Cached until ``proj`` is modified or moved (``C`` is fixed, so normally it is computed once).
        """
        proj = self.proj
        if proj is None or self.width < self.n:
            raise ValueError(
                f"proj_lq needs a bottleneck at least as wide as its input (h={self.width}, n={self.n})"
            )
        key = (proj.data_ptr(), proj._version, proj.dtype, proj.device)
        cached = getattr(self, "_lq_cache", None)
        if cached is None or cached[0] != key:
            q, r = torch.linalg.qr(proj.T)  # Cᵀ = Q̃ R̃  →  C = R̃ᵀ Q̃ᵀ
            cached = (key, r.T, q.T)
            self._lq_cache = cached
        return cached[1], cached[2]

    def preactivation(self, u: Tensor) -> Tensor:
        """``u C`` (or ``u`` without a bottleneck): ``B × n → B × width``."""
        return u if self.proj is None else u @ self.proj

    def features(self, u: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(φ(u C), mask)``: the activation matrix without its ones column, and the ReLU mask."""
        pre = self.preactivation(u)
        if self.activation == "identity":
            return pre, None
        mask = pre > 0
        return pre * mask, mask

    def apply_features(self, feats: Tensor) -> Tensor:
        """``feats Wᵀ + β``: the half-layer's output from its features."""
        out = feats @ self.weight.T
        return out if self.bias is None else out + self.bias

    def forward(self, u: Tensor) -> Tensor:
        return self.apply_features(self.features(u)[0])

    def jvp(self, du: Tensor, mask: Tensor | None) -> Tensor:
        """``(∂F/∂u) du`` at fixed weights, for the input whose ReLU mask is ``mask``.

        ``du``: ``(..., B, n)`` (leading dimensions broadcast over the mask's ``B × width``).
        """
        t = self.preactivation(du)
        if mask is not None:
            t = t * mask
        return t @ self.weight.T

    def vjp(self, dy: Tensor, mask: Tensor | None) -> Tensor:
        """``dy (∂F/∂u)``: the cotangent of the input from the cotangent ``dy`` (``(..., B, n)``) of the
        output."""
        if dy.dim() >= 2 and dy.stride(-2) == 0:  # the same row for every sample: multiply once, broadcast
            t = dy[..., :1, :] @ self.weight
        else:
            t = dy @ self.weight
        if mask is not None:
            t = t * mask
        return t if self.proj is None else t @ self.proj.T

    def extra_repr(self) -> str:
        return f"n={self.n}, width={self.width}, activation={self.activation}, bias={self.bias is not None}"


class CouplingBlock(nn.Module):
    """``(a, b) ↦ (a + F(b), b + G(a + F(b)))``, with its exact inverse."""

    def __init__(self, n: int, hidden: int | None, activation: str, bias: bool) -> None:
        super().__init__()
        self.f = HalfLayer(n, hidden, activation, bias)
        self.g = HalfLayer(n, hidden, activation, bias)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        a = a + self.f(b)
        return a, b + self.g(a)

    def inverse(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        b = b - self.g(a)
        return a - self.f(b), b


class RevMLP(nn.Module):
    """Reversible MLP with a fixed inverted bottleneck and a fixed orthonormal readout.

    Args:
        in_features: ``d``, the flattened input size; must be even (the state is split in halves).
        num_classes: ``k``, the number of logits; at most ``d``.
        num_blocks: ``L``, the number of coupling blocks (``2L`` half-layers).
        hidden: ``h``, the bottleneck width, or ``None`` for the variant without a bottleneck.
        bias: whether every half-layer has a trainable bias.
        init_std: standard deviation of the trainable weights at initialisation (reference: ``1e-3``).
        seed: seeds every random tensor (bottlenecks, readout, weights); same seed, same model.
        dtype: dtype of all tensors: float64, float32, float16 or bfloat16 (a ``torch.dtype`` or its name).
            The GN steps of float16/bfloat16 models are computed in float32 (:func:`exactgn.gn_direction`).

    ``model(x)`` maps images or flat vectors (``B × d`` after flattening) to logits (``B × k``).
    ``model.state(x)`` gives the final state ``z_L`` and ``model.inverse(z_L)`` recovers ``x`` exactly.
    Only the ``weight`` and ``bias`` of each half-layer are parameters; ``proj`` and ``readout`` are buffers.
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
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        super().__init__()
        _check_int("in_features", in_features, 2)
        if in_features % 2:
            raise ValueError(
                f"in_features must be even (the state is split into two halves), got {in_features}; "
                "pad the input with one zero feature to make it even"
            )
        _check_int("num_classes", num_classes, 1)
        if num_classes > in_features:
            raise ValueError(
                f"num_classes={num_classes} exceeds in_features={in_features}: the readout needs "
                "orthonormal columns, so k must be at most d"
            )
        _check_int("num_blocks", num_blocks, 1)
        if hidden is not None:
            _check_int("hidden", hidden, 1)
        if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")
        dtype = _model_dtype(dtype)

        self.in_features = in_features
        self.num_classes = num_classes
        self.num_blocks = num_blocks
        self.hidden = hidden
        self.init_std = float(init_std)
        self.seed = seed
        n = in_features // 2
        self.blocks = nn.ModuleList(
            CouplingBlock(n, hidden, "identity" if l == 0 else "relu", bias) for l in range(num_blocks)
        )
        self.register_buffer("readout", torch.zeros(in_features, num_classes))
        self.to(dtype)
        self.reset_parameters(seed)

    # ------------------------------------------------------------------ construction
    def config(self) -> dict:
        """The constructor arguments (without dtype), enough to rebuild the same architecture."""
        return dict(
            in_features=self.in_features,
            num_classes=self.num_classes,
            num_blocks=self.num_blocks,
            hidden=self.hidden,
            bias=self.blocks[0].f.bias is not None,
            init_std=self.init_std,
            seed=self.seed,
        )

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Draw bottlenecks ``C ~ N(0, 1/h)``, readout ``U`` = Q of a Gaussian's QR, weights ``N(0,
        init_std²)``, biases 0.

        Drawn in float64 on the CPU from ``seed`` so that every dtype and device gets the same model.
        """
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        f64 = dict(generator=gen, dtype=torch.float64)
        for layer in self.half_layers():
            if layer.proj is not None:
                layer.proj.copy_(torch.randn(layer.proj.shape, **f64) / math.sqrt(layer.width))
            layer.weight.copy_(torch.randn(layer.weight.shape, **f64) * self.init_std)
            if layer.bias is not None:
                layer.bias.zero_()
        q, r = torch.linalg.qr(torch.randn(self.in_features, self.num_classes, **f64))
        # Fix the signs so that the draw is unique (QR is unique only up to column signs).
        self.readout.copy_(q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0))

    # ------------------------------------------------------------------ structure
    def half_layers(self) -> list[HalfLayer]:
        """The ``2L`` half-layers in forward order: ``F_1, G_1, F_2, G_2, ...``."""
        return [h for block in self.blocks for h in (block.f, block.g)]

    def half_layer_names(self) -> list[str]:
        """Module names of the half-layers, e.g. ``blocks.0.f``, in forward order."""
        return [f"blocks.{l}.{s}" for l in range(self.num_blocks) for s in ("f", "g")]

    @property
    def max_exact_batch(self) -> int:
        """Largest batch for which every activation matrix can have full row rank (DESIGN §3a)."""
        return min(h.rank_bound for h in self.half_layers())

    # ------------------------------------------------------------------ input handling
    def flatten_inputs(self, x: Tensor) -> Tensor:
        """Images ``B × ...`` or vectors ``B × d`` → ``B × d`` in the model's dtype, with checks.

        Under a ``torch.func`` transform (``vmap``, ``jacrev``, ...) the checks on values (NaN, overflow) are
        skipped: ``vmap`` cannot branch on them. Checks on types and shapes always run.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
        if x.is_complex():
            raise TypeError(
                f"inputs are complex ({x.dtype}) but RevMLP is a real network; pass real inputs, e.g. "
                "x.real, or torch.view_as_real(x).flatten(1) to use both parts as features"
            )
        if x.dim() == 0:
            raise ValueError("inputs must have a batch dimension, got a scalar")
        if x.dim() == 1:
            raise ValueError(
                f"inputs of shape {tuple(x.shape)} have no batch dimension; "
                f"pass a batch of shape (B, {self.in_features}) (use x.unsqueeze(0) for one sample)"
            )
        if x.shape[0] == 0:
            raise ValueError(f"inputs hold an empty batch (shape {tuple(x.shape)}); pass at least one sample")
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"inputs of shape {tuple(x.shape)} give {flat.shape[1]} features per sample, but the model "
                f"takes in_features={self.in_features}"
            )
        ref = self.readout
        cast = flat.to(device=ref.device, dtype=ref.dtype)
        if not _under_functorch() and not torch.isfinite(cast).all():
            raise ValueError(_non_finite_message(flat, ref.dtype))
        return cast

    # ------------------------------------------------------------------ passes
    def _split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        n = self.in_features // 2
        return z[:, :n], z[:, n:]

    def state(self, x: Tensor) -> Tensor:
        """Final state ``z_L`` (``B × d``) of the coupling blocks."""
        a, b = self._split(self.flatten_inputs(x))
        for block in self.blocks:
            a, b = block(a, b)
        return torch.cat([a, b], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``z_L U`` (``B × k``).

        Under ``torch.func.vmap`` over samples, ``x`` may also be one flat sample of shape ``d`` (logits
        ``k``), so that ``vmap(jacrev(lambda p, x: functional_call(model, p, (x,))), (None, 0))`` gives
        per-sample Jacobians; a per-sample image is passed as a batch of one (``x.unsqueeze(0)``).
        """
        if isinstance(x, Tensor) and x.dim() == 1 and _under_functorch():
            return (self.state(x.unsqueeze(0)) @ self.readout).squeeze(0)
        return self.state(x) @ self.readout

    def inverse(self, z: Tensor) -> Tensor:
        """Undo the coupling blocks: ``inverse(state(x)) == x`` up to rounding. ``z``: ``B × d``."""
        if z.dim() != 2 or z.shape[1] != self.in_features:
            raise ValueError(f"inverse takes a state of shape (B, {self.in_features}), got {tuple(z.shape)}")
        a, b = self._split(z.to(device=self.readout.device, dtype=self.readout.dtype))
        for block in reversed(self.blocks):
            a, b = block.inverse(a, b)
        return torch.cat([a, b], dim=1)

    @torch.no_grad()
    def trace(self, x: Tensor) -> tuple[Tensor, list[HalfLayerRecord]]:
        """Forward pass without autograd that records every half-layer's features and ReLU mask.

        Returns ``(logits B × k, records)`` with one :class:`HalfLayerRecord` per half-layer, forward order.
        """
        a, b = self._split(self.flatten_inputs(x))
        records: list[HalfLayerRecord] = []
        names = iter(self.half_layer_names())
        for block in self.blocks:
            feats, mask = block.f.features(b)
            records.append(HalfLayerRecord(block.f, next(names), b, feats, mask))
            a = a + block.f.apply_features(feats)
            feats, mask = block.g.features(a)
            records.append(HalfLayerRecord(block.g, next(names), a, feats, mask))
            b = b + block.g.apply_features(feats)
        return torch.cat([a, b], dim=1) @ self.readout, records


def _under_functorch() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, jvp, ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _non_finite_message(flat: Tensor, dtype: torch.dtype) -> str:
    """Why inputs ``B × d`` are not finite in ``dtype``: NaN/inf given, or values the cast overflows."""
    if flat.is_floating_point() and not torch.isfinite(flat).all():
        return "inputs contain NaN or infinite values"
    biggest = float(flat.abs().max())
    return (
        f"inputs overflow the model's dtype {dtype} (largest |x| = {biggest:.3g}, largest finite "
        f"{torch.finfo(dtype).max:.3g}); rescale the inputs (e.g. standardise them) or use a wider dtype"
    )


MODEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _model_dtype(dtype: object) -> torch.dtype:
    """``dtype`` (a ``torch.dtype`` or its name, e.g. ``"float64"``) checked against :data:`MODEL_DTYPES`."""
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if value not in MODEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in MODEL_DTYPES)
        raise ValueError(f"dtype must be one of {names} (a torch.dtype or its name), got {dtype!r}")
    return value


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
