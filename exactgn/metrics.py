"""Pure NTK, CKA and weight-space metrics of a :class:`~exactgn.RevMLP`, :class:`~exactgn.models.MLP` or
:class:`~exactgn.models.ResMLP` (DESIGN §5): torch only.

A "block" is a RevMLP coupling block, a ResMLP residual block, or an MLP hidden layer (its output after the
activation); weights are every trainable weight matrix (a RevMLP's half-layer weights ``W``).

Kernel (NTK) on a fixed probe batch, computed exactly by :func:`exactgn.gn.ntk_gram`:

* :func:`kernel_alignment` — ``⟨Θ_0, Θ_t⟩_F / (‖Θ_0‖_F ‖Θ_t‖_F)``, 1 when the kernel has not moved
  (up to scale).
* :func:`ntk_rate` — the rate of change between two records ``(1 − alignment(Θ_prev, Θ_t)) / Δepochs``.
* :func:`ntk_probe_cosine` — the reference study's cheaper *estimate*: the cosine between ``Θ_0 w`` and
  ``Θ_t w`` for one fixed random probe vector ``w``.

Representations: :func:`linear_cka` (biased, or the unbiased HSIC of Song et al. 2012), :func:`block_outputs`,
:func:`block_increments`, :func:`representation_cka`. Weights: :func:`weight_rel_change`,
:func:`weight_cosine`, :func:`weight_metrics` (weights ``W`` only; biases start at zero, so their relative
change is undefined).
:data:`METRIC_DOC` is the catalogue of every metric name a recorder emits (``exactgn.lab.diagnostics``).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import Tensor, nn

from .model import RevMLP
from .models import MLP, ResMLP

__all__ = [
    "METRIC_DOC",
    "kernel_alignment",
    "ntk_rate",
    "ntk_probe_cosine",
    "probe_vector",
    "linear_cka",
    "block_outputs",
    "block_increments",
    "representation_cka",
    "weight_rel_change",
    "weight_cosine",
    "weight_metrics",
    "half_layer_weights",
    "trainable_weights",
    "compare_weights",
    "as_float64",
]

#: Every metric name the recorder can emit (``{block}`` is 0-based, ``{layer}`` is a half-layer name).
METRIC_DOC: dict[str, str] = {
    "epoch": "epoch of the record (0 = before training)",
    "probe_size": "number of probe samples B (the NTK is Bk × Bk)",
    "ntk_alignment": "kernel alignment ⟨Θ0, Θt⟩/(‖Θ0‖‖Θt‖) of the exact probe NTK with the NTK at "
    "initialisation",
    "ntk_rate": "(1 − alignment(Θ_prev, Θ_t)) / (epochs since the previous record); absent on the first "
    "record",
    "ntk_rel_change": "‖Θt − Θ0‖_F / ‖Θ0‖_F (alignment ignores scale; this does not)",
    "ntk_probe_cosine": "ESTIMATE (the reference's): cosine between Θ0·w and Θt·w for a fixed random w ~ "
    "N(0, I)",
    "cka/block{block}": "linear CKA (biased, centred HSIC) of block {block}'s output now vs. at "
    "initialisation (an MLP's block {block} is its hidden layer {block}, after the activation)",
    "cka_unbiased/block{block}": "the same with the unbiased (debiased HSIC) estimator",
    "cka_delta/block{block}": "linear CKA (biased) of what block {block} adds to the state (z_l − z_{l−1}) "
    "now vs. at "
    "initialisation: the residual branch alone, without the identity skip that keeps block-output CKA near 1 "
    "(RevMLP and ResMLP; an MLP's layers change width, so it has none)",
    "weight_rel_change/{layer}": "‖W_t − W_0‖_F / ‖W_0‖_F of a trainable weight matrix (a RevMLP's "
    "half-layer; bias excluded)",
    "weight_cosine/{layer}": "⟨W_t, W_0⟩_F / (‖W_t‖‖W_0‖) of a trainable weight matrix (bias excluded)",
    "weight_rel_change/all": "the same relative change over all trainable weight matrices together",
    "diagnostics_time_s": "wall time spent computing this record (seconds)",
}


# ---------------------------------------------------------------------------- helpers
def as_float64(t: Tensor) -> Tensor:
    """``t`` detached, in float64."""
    return t.detach().to(torch.float64)


def _cosine_gap(a: Tensor, b: Tensor) -> float:
    """``1 − cos(a, b)`` of two tensors (flattened), in float64, accurate to rounding even when tiny.

    Computed as ``‖â − b̂‖²/2`` from the unit vectors (``2 − ‖â + b̂‖²/2`` for negative cosines), with no
    cancellation where ``1 − cos`` is small (the NTK rate of change of lazy training); ``nan`` for a zero
    input.
    """
    a, b = as_float64(a).reshape(-1), as_float64(b).reshape(-1)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0 or not (torch.isfinite(na) and torch.isfinite(nb)):
        return math.nan
    ua, ub = a / na, b / nb
    if float(ua @ ub) >= 0:
        gap = 0.5 * float((ua - ub).square().sum())
    else:
        gap = 2.0 - 0.5 * float((ua + ub).square().sum())
    return min(2.0, max(0.0, gap))


def _cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two tensors (flattened) in float64, ``1 − _cosine_gap``: exactly 1 for equal inputs."""
    return 1.0 - _cosine_gap(a, b)


def _check_square(name: str, k: Tensor) -> None:
    if not isinstance(k, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(k).__name__}")
    if k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"{name} must be a square kernel matrix (N × N), got shape {tuple(k.shape)}")


# ---------------------------------------------------------------------------- NTK
def kernel_alignment(k0: Tensor, kt: Tensor) -> float:
    """Kernel alignment ``⟨Θ_0, Θ_t⟩_F / (‖Θ_0‖_F ‖Θ_t‖_F)`` of two ``N × N`` kernels (computed in float64).

    1 for a kernel against a positive multiple of itself; ``nan`` if either kernel is zero.
    """
    _check_square("k0", k0)
    _check_square("kt", kt)
    if k0.shape != kt.shape:
        raise ValueError(f"kernels must have the same shape, got {tuple(k0.shape)} and {tuple(kt.shape)}")
    return _cosine(k0, kt)


def ntk_rate(k_prev: Tensor, k_t: Tensor, epochs_elapsed: float) -> float:
    """NTK rate of change between consecutive records: ``(1 − alignment(Θ_prev, Θ_t)) / epochs_elapsed``.

    0 when the kernel did not move (up to scale); per epoch, so records taken every few epochs are comparable.
    Computed without cancellation, so it stays accurate when the alignment is within rounding of 1.
    """
    if not epochs_elapsed > 0:
        raise ValueError(f"epochs_elapsed must be > 0, got {epochs_elapsed!r}")
    kernel_alignment(k_prev, k_t)  # shape checks
    return _cosine_gap(k_prev, k_t) / float(epochs_elapsed)  # 1 − alignment without cancellation


def probe_vector(size: int, seed: int = 0) -> Tensor:
    """The fixed random probe ``w ~ N(0, I)`` (float64, length ``size``) of :func:`ntk_probe_cosine`."""
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ntk_probe_cosine(k0: Tensor, kt: Tensor, w: Tensor | None = None, *, seed: int = 0) -> float:
    """ESTIMATE of NTK similarity used by the reference study: ``cos(Θ_0 w, Θ_t w)`` for one random vector
    ``w``.

    Cheaper than :func:`kernel_alignment` when only kernel-vector products are available, but it depends on
    the draw of ``w`` and is not the alignment. ``w`` (length ``N``) defaults to :func:`probe_vector` ``(N,
    seed)``.
    """
    _check_square("k0", k0)
    _check_square("kt", kt)
    if k0.shape != kt.shape:
        raise ValueError(f"kernels must have the same shape, got {tuple(k0.shape)} and {tuple(kt.shape)}")
    if w is None:
        w = probe_vector(k0.shape[0], seed)
    w = as_float64(w).reshape(-1).to(k0.device)
    if w.numel() != k0.shape[0]:
        raise ValueError(
            f"probe vector has {w.numel()} entries, the kernels are {k0.shape[0]} × {k0.shape[0]}"
        )
    return _cosine(as_float64(k0) @ w, as_float64(kt) @ w)


# ---------------------------------------------------------------------------- CKA
def _as_rows(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be samples × features (N × p), got shape {tuple(x.shape)}")
    return as_float64(x.reshape(x.shape[0], -1))


def _hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:
    """Unbiased HSIC (Song et al. 2012) of two ``n × n`` Gram matrices, ``n ≥ 4``:

    ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))`` with ``K̃, L̃`` the Grams with zero
    diagonal.
    """
    n = k.shape[0]
    kt = k - torch.diag(torch.diagonal(k))
    lt = l - torch.diag(torch.diagonal(l))
    k_row, l_row = kt.sum(1), lt.sum(1)
    value = (
        (kt * lt).sum() + k_row.sum() * l_row.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k_row @ l_row)
    )
    return value / (n * (n - 3))


def linear_cka(x: Tensor, y: Tensor, *, unbiased: bool = False) -> float:
    """Linear CKA between representations ``x`` (``n × p``) and ``y`` (``n × q``) of the same ``n`` samples.

    Biased: ``‖Ȳᵀ X̄‖²_F / (‖X̄ᵀ X̄‖_F ‖Ȳᵀ Ȳ‖_F)`` with column-centred ``X̄, Ȳ`` (the centred-HSIC form of
    Kornblith et al. 2019). ``unbiased=True``: the same ratio with the unbiased HSIC estimator of Song et al.
    2012 (as in Nguyen et al. 2021), which removes the positive bias of the biased one at small ``n`` / large
    ``p``; needs ``n ≥ 4`` and can be slightly negative. Inputs with more dimensions are flattened per sample.
    Computed in float64; ``nan`` when a representation has no variance.
    """
    xs, ys = _as_rows("x", x), _as_rows("y", y)
    n = xs.shape[0]
    if ys.shape[0] != n:
        raise ValueError(f"x and y must describe the same samples, got {n} and {ys.shape[0]} rows")
    if n < (4 if unbiased else 2):
        raise ValueError(
            f"linear CKA needs at least {4 if unbiased else 2} samples{' (unbiased)' if unbiased else ''}, "
            f"got {n}"
        )
    xs = xs - xs.mean(0)
    ys = ys.to(xs.device)
    ys = ys - ys.mean(0)
    if not unbiased:
        # Feature-space form when features are fewer than samples, Gram form otherwise: same value.
        if xs.shape[1] * ys.shape[1] <= n * n:
            cross = (ys.T @ xs).square().sum()
            den = (xs.T @ xs).norm() * (ys.T @ ys).norm()
        else:
            kx, ky = xs @ xs.T, ys @ ys.T
            cross = (kx * ky).sum()
            den = kx.norm() * ky.norm()
        return math.nan if den == 0 else float(cross / den)
    kx, ky = xs @ xs.T, ys @ ys.T
    den = _hsic_unbiased(kx, kx) * _hsic_unbiased(ky, ky)
    if not den > 0:
        return math.nan
    return float(_hsic_unbiased(kx, ky) / den.sqrt())


@torch.no_grad()
def _hooked(model: nn.Module, x: Tensor, modules: list[nn.Module]) -> list[tuple[Tensor, Tensor]]:
    """``(input, output)`` of every call of ``modules`` during ``model(x)``, in call order."""
    seen: list[tuple[Tensor, Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, a, o: seen.append((a[0], o))) for m in modules]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _revmlp_outputs(model: RevMLP, x: Tensor) -> list[Tensor]:
    z = model.flatten_inputs(x)
    n = model.in_features // 2
    a, b = z[:, :n], z[:, n:]
    outs = []
    for block in model.blocks:
        a, b = block(a, b)
        outs.append(torch.cat([a, b], dim=1))
    return outs


def block_outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Each block's output (``B × width``) on inputs ``x``: a RevMLP's state ``z_l = [a_l, b_l]`` after
    coupling block ``l``, a ResMLP's state after residual block ``l``, an MLP's hidden layer ``l`` after the
    activation."""
    if isinstance(model, RevMLP):
        return _revmlp_outputs(model, x)
    if isinstance(model, MLP):  # model.act runs once per hidden layer
        return [out for _, out in _hooked(model, x, [model.act])]
    if isinstance(model, ResMLP):
        return [out for _, out in _hooked(model, x, list(model.blocks))]
    raise TypeError(f"block_outputs needs an exactgn RevMLP, MLP or ResMLP, got {type(model).__name__}")


def block_increments(model: nn.Module, x: Tensor) -> list[Tensor]:
    """What each block adds to the state, ``z_l − z_{l−1}`` (``B × d``, ``z_{−1}`` = the input); a RevMLP or
    ResMLP (an MLP's layers change width: it has no increments).

    The block outputs carry the input through the identity skip, so their CKA against initialisation stays
    near 1 whenever the residual branches are small; the increments show the branches alone.
    """
    if isinstance(model, ResMLP):
        return [out - inp for inp, out in _hooked(model, x, list(model.blocks))]
    if not isinstance(model, RevMLP):
        raise TypeError(f"block_increments needs an exactgn RevMLP or ResMLP, got {type(model).__name__}")
    z = model.flatten_inputs(x)
    outs = block_outputs(model, z)
    return [out - prev for prev, out in zip([z] + outs[:-1], outs)]


def representation_cka(
    model_a: nn.Module, model_b: nn.Module, inputs: Tensor, *, unbiased: bool = False
) -> dict[str, float]:
    """Linear CKA of every block's output, ``model_a`` against ``model_b`` on the same ``inputs``.

    Returns ``{"block0": ..., "block1": ...}``; for two runs (optimiser against optimiser) or a model against
    its initialisation. The models need the same number of blocks (widths may differ).
    """
    out_a, out_b = block_outputs(model_a, inputs), block_outputs(model_b, inputs)
    if len(out_a) != len(out_b):
        raise ValueError(f"models have different depths: {len(out_a)} and {len(out_b)} blocks")
    return {
        f"block{l}": linear_cka(xa, xb, unbiased=unbiased) for l, (xa, xb) in enumerate(zip(out_a, out_b))
    }


# ---------------------------------------------------------------------------- weights
def weight_rel_change(w_t: Tensor, w_0: Tensor) -> float:
    """``‖W_t − W_0‖_F / ‖W_0‖_F`` (float64); ``inf`` if ``W_0 = 0`` and ``W_t ≠ W_0``, ``nan`` if both are
    0."""
    if w_t.shape != w_0.shape:
        raise ValueError(f"weights must have the same shape, got {tuple(w_t.shape)} and {tuple(w_0.shape)}")
    a, b = as_float64(w_t), as_float64(w_0).to(w_t.device)
    num, den = (a - b).norm(), b.norm()
    if den == 0:
        return math.nan if num == 0 else math.inf
    return float(num / den)


def weight_cosine(w_t: Tensor, w_0: Tensor) -> float:
    """Cosine similarity ``⟨W_t, W_0⟩_F / (‖W_t‖_F ‖W_0‖_F)`` (float64); ``nan`` if either is zero."""
    if w_t.shape != w_0.shape:
        raise ValueError(f"weights must have the same shape, got {tuple(w_t.shape)} and {tuple(w_0.shape)}")
    return _cosine(w_t, w_0.to(w_t.device))


def half_layer_weights(model: RevMLP | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Half-layer name → weight ``W`` from a model or a ``state_dict`` (biases excluded)."""
    if isinstance(model, RevMLP):
        return {
            name: layer.weight.detach() for name, layer in zip(model.half_layer_names(), model.half_layers())
        }
    if isinstance(model, Mapping):
        out = {}
        for key, value in model.items():
            m = re.fullmatch(r"(blocks\.\d+\.[fg])\.weight", key)
            if m:
                out[m.group(1)] = value.detach()
        if not out:
            raise ValueError("the state dict holds no half-layer weights ('blocks.<l>.<f|g>.weight')")
        return out
    raise TypeError(f"expected a RevMLP or a state dict, got {type(model).__name__}")


def trainable_weights(model: nn.Module) -> dict[str, Tensor]:
    """Name → every trainable weight matrix: a RevMLP's half-layer weights (:func:`half_layer_weights`), or
    any other model's trainable parameters of two or more dimensions (``"layers.0"`` for
    ``layers.0.weight``)."""
    if isinstance(model, RevMLP):
        return half_layer_weights(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return {
        name.removesuffix(".weight"): p.detach()
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() >= 2
    }


def compare_weights(now: Mapping[str, Tensor], init: Mapping[str, Tensor]) -> dict[str, float]:
    """``weight_rel_change/<name>``, ``weight_cosine/<name>`` and ``weight_rel_change/all`` between two dicts
    of weights with the same names (e.g. :func:`trainable_weights` now and at initialisation)."""
    if now.keys() != init.keys():
        raise ValueError(f"the two models have different weights: {sorted(now)} and {sorted(init)}")
    out: dict[str, float] = {}
    for name in now:
        out[f"weight_rel_change/{name}"] = weight_rel_change(now[name], init[name])
    for name in now:
        out[f"weight_cosine/{name}"] = weight_cosine(now[name], init[name])
    num = sum(float((as_float64(now[n]) - as_float64(init[n]).to(now[n].device)).square().sum()) for n in now)
    den = sum(float(as_float64(init[n]).square().sum()) for n in now)
    out["weight_rel_change/all"] = (math.nan if num == 0 else math.inf) if den == 0 else math.sqrt(num / den)
    return out


def weight_metrics(
    model_t: nn.Module | Mapping[str, Tensor], model_0: nn.Module | Mapping[str, Tensor]
) -> dict[str, float]:
    """Per weight matrix ``weight_rel_change/<name>`` and ``weight_cosine/<name>``, plus
    ``weight_rel_change/all`` (:func:`compare_weights`).

    Weights ``W`` only; biases are excluded (they start at zero). Either argument may be a model (every
    trainable weight matrix, :func:`trainable_weights`) or a RevMLP's state dict (its half-layer weights).
    """

    def weights(m: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
        return trainable_weights(m) if isinstance(m, nn.Module) else half_layer_weights(m)

    return compare_weights(weights(model_t), weights(model_0))
