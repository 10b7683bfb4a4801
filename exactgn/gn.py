"""The Gauss–Newton mathematics of exactgn, in one place (DESIGN §3).

* :func:`gn_direction` — the GN direction ``J♭v`` (tractable right inverse, §3a) or ``J⁺v`` (minimum norm, §3b)
  with ``v = H⁺g``; the update is ``θ ← θ − lr·direction``.
* :func:`ntk_gram` — the exact empirical NTK ``JJᵀ`` of a batch, ``Bk × Bk``, row ``i·k + c``.
* :func:`output_cotangents` — ``M_j = ∂o/∂(output of half-layer j)`` for every half-layer, from ``k`` batched
  backward passes.
* :func:`jvp_logits` — ``J·δθ``, the first-order change of the logits for a parameter change ``δθ``.

Everything runs on :meth:`RevMLP.trace` records, without autograd. The optimiser, the diagnostics and the
benchmarks all call these functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import InexactStepError
from .linalg import Regularisation, SolveInfo, gram_solve
from .losses import HESSIANS, LOSSES, as_target_rows, check_choice, loss_value, newton_target
from .model import HalfLayerRecord, RevMLP

__all__ = [
    "INVERSES",
    "GNResult",
    "gn_direction",
    "compute_direction",
    "ntk_gram",
    "output_cotangents",
    "activation_gram",
    "jvp_logits",
]

INVERSES = ("right", "pinv")


@dataclass
class GNResult:
    """Everything one GN direction computation produced.

    direction: parameter name → tensor shaped like the parameter (the step is ``θ − lr·direction``).
    logits: ``B × k`` at the current parameters; targets: ``B × k`` rows; v: ``B × k``, ``H⁺g``.
    loss: the mean loss on the batch before the step (0-dim tensor).
    solves: one :class:`SolveInfo` per Gram solve (``2L`` for the right inverse, 1 for pinv).
    """

    direction: dict[str, Tensor]
    logits: Tensor
    targets: Tensor
    v: Tensor
    loss: Tensor
    solves: list[SolveInfo] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when every solve was an unregularised Cholesky solve."""
        return all(s.method == "cholesky" for s in self.solves)


# ---------------------------------------------------------------------------- shared pieces
def activation_gram(record: HalfLayerRecord) -> Tensor:
    """``K_j = A_j A_jᵀ`` (``B × B``) with ``A_j = [φ(u C), 1]`` (the ones column only with a bias)."""
    feats = record.features
    gram = feats @ feats.T
    if record.layer.bias is not None:
        gram += 1.0
    return gram


def _param_step(record: HalfLayerRecord, coeffs: Tensor) -> dict[str, Tensor]:
    """``ΔΘ = coeffsᵀ A``: the parameter change of a half-layer from per-sample output coefficients.

    ``coeffs``: ``B × n``. Returns ``{name.weight: n × width, name.bias: n}``.
    """
    out = {f"{record.name}.weight": coeffs.T @ record.features}
    if record.layer.bias is not None:
        out[f"{record.name}.bias"] = coeffs.sum(0)
    return out


def _split(model: RevMLP, z: Tensor) -> tuple[Tensor, Tensor]:
    n = model.in_features // 2
    return z[..., :n], z[..., n:]


def output_cotangents(model: RevMLP, records: list[HalfLayerRecord]) -> list[Tensor]:
    """``M_j`` for every half-layer (forward order), each ``k × B × n``: ``M_j[c, i] = ∂o_{i,c}/∂y_{j,i}``.

    ``y_j`` is the output of half-layer ``j`` (what it adds to its half of the state). Samples do not interact,
    so one backward pass per class, batched over the ``k`` classes, gives all of them.
    """
    k, batch = model.num_classes, records[0].features.shape[0]
    u_a, u_b = _split(model, model.readout.T)  # k × n each: the cotangent of the state for class c
    a_bar = u_a[:, None, :].expand(k, batch, -1)
    b_bar = u_b[:, None, :].expand(k, batch, -1)
    cotangents: list[Tensor] = [None] * len(records)  # type: ignore[list-item]
    for l in reversed(range(model.num_blocks)):
        rec_f, rec_g = records[2 * l], records[2 * l + 1]
        cotangents[2 * l + 1] = b_bar
        a_bar = a_bar + rec_g.layer.vjp(b_bar, rec_g.mask)
        cotangents[2 * l] = a_bar
        if l > 0:
            b_bar = b_bar + rec_f.layer.vjp(a_bar, rec_f.mask)
    return cotangents


def _ntk_lower(records: list[HalfLayerRecord], cotangents: list[Tensor], chunks: int = 8) -> Tensor:
    """Lower triangle of ``JJᵀ = Σ_j (K_j ⊗ 1_{k×k}) ∘ (M_j M_jᵀ)``, ``Bk × Bk``.

    Row ``i·k + c``. The strictly upper triangle is zero: a Cholesky or eigen-solve reads only the
    lower triangle, and computing it in row chunks (whole samples each) saves about 40% of the work.
    """
    k, batch, n = cotangents[0].shape
    size = batch * k
    ntk = cotangents[0].new_zeros(size, size)
    edges = torch.linspace(0, batch, min(chunks, batch) + 1).round().long().tolist()
    for rec, m in zip(records, cotangents):
        gram = activation_gram(rec)
        if m.stride(1) == 0:  # the same cotangent for every sample (the last half-layer): a k × k Gram
            per_class = m[:, 0] @ m[:, 0].T
            for lo, hi in zip(edges[:-1], edges[1:]):
                block = gram[lo:hi, None, :hi, None] * per_class[None, :, None, :]
                ntk[lo * k : hi * k, : hi * k] += block.reshape((hi - lo) * k, hi * k)
            continue
        rows = m.transpose(0, 1).reshape(size, n)
        for lo, hi in zip(edges[:-1], edges[1:]):
            block = rows[lo * k : hi * k] @ rows[: hi * k].T
            block.view(hi - lo, k, hi, k).mul_(gram[lo:hi, None, :hi, None])
            ntk[lo * k : hi * k, : hi * k] += block
    for lo, hi in zip(edges[:-1], edges[1:]):  # diagonal blocks were computed whole: clear their upper part
        diag = ntk[lo * k : hi * k, lo * k : hi * k]
        diag.copy_(torch.tril(diag))
    return ntk


def _symmetrise_lower(lower: Tensor) -> Tensor:
    """Full symmetric matrix from its lower triangle."""
    return torch.tril(lower) + torch.tril(lower, -1).T


def _right_inverse(
    model: RevMLP, records: list[HalfLayerRecord], v: Tensor, reg: Regularisation, solve_dtype: torch.dtype | None,
    warn: bool,
) -> tuple[dict[str, Tensor], list[SolveInfo]]:
    """``J♭ v`` (DESIGN §3a), including the ``1/L``."""
    direction: dict[str, Tensor] = {}
    solves: list[SolveInfo] = []
    d_a, d_b = _split(model, v @ model.readout.T)
    for l in reversed(range(model.num_blocks)):
        rec_f, rec_g = records[2 * l], records[2 * l + 1]
        coeffs, info = gram_solve(activation_gram(rec_f), d_a, reg, solve_dtype=solve_dtype, warn=warn, what=f"{rec_f.name} activation Gram")
        direction.update(_param_step(rec_f, coeffs))
        block_solves = [info]
        # G must produce what is left of δb' once the change δa' of its input is accounted for.
        d_b = d_b - rec_g.layer.jvp(d_a, rec_g.mask)
        coeffs, info = gram_solve(activation_gram(rec_g), d_b, reg, solve_dtype=solve_dtype, warn=warn, what=f"{rec_g.name} activation Gram")
        direction.update(_param_step(rec_g, coeffs))
        solves[:0] = block_solves + [info]
        if l > 0:  # the input change of this block that the blocks below must realise
            d_a = d_a - rec_f.layer.jvp(d_b, rec_f.mask)
    scale = 1.0 / model.num_blocks
    return {name: t.mul_(scale) for name, t in direction.items()}, solves


def _min_norm(
    model: RevMLP, records: list[HalfLayerRecord], v: Tensor, reg: Regularisation, solve_dtype: torch.dtype | None,
    warn: bool,
) -> tuple[dict[str, Tensor], list[SolveInfo]]:
    """``J⁺ v = Jᵀ (JJᵀ)⁻¹ v`` (DESIGN §3b)."""
    cotangents = output_cotangents(model, records)
    ntk = _ntk_lower(records, cotangents)
    batch, k = v.shape
    u, info = gram_solve(
        ntk, v.reshape(batch * k, 1), reg, solve_dtype=solve_dtype, lower_only=True, warn=warn, what="NTK Gram JJᵀ"
    )
    u = u.view(batch, k)
    direction: dict[str, Tensor] = {}
    for rec, m in zip(records, cotangents):
        # Jᵀu for this half-layer: per-sample output cotangent Σ_c u_ic M_j[c, i], then ΔΘ = coeffsᵀ A.
        coeffs = torch.einsum("cbn,bc->bn", m, u)
        direction.update(_param_step(rec, coeffs))
    return direction, [info]


# ---------------------------------------------------------------------------- public API
def _check_model(model: object) -> RevMLP:
    if not isinstance(model, RevMLP):
        raise TypeError(f"exactgn's GN steps need an exactgn.RevMLP, got {type(model).__name__}")
    return model


def _check_exactness(model: RevMLP, batch: int, inverse: str, least_squares: bool) -> None:
    if least_squares:
        return
    if inverse == "right" and batch > model.max_exact_batch:
        worst = min(zip(model.half_layers(), model.half_layer_names()), key=lambda p: p[0].rank_bound)
        layer, name = worst
        why = (
            f"{layer.width} ReLU features" if layer.activation == "relu"
            else f"identity activation: rank at most min(h={layer.width}, d/2={layer.n})"
        )
        raise InexactStepError(
            f"inverse='right' is exact only when every half-layer's activation matrix A = [φ(uC), 1] has full "
            f"row rank, i.e. batch <= {model.max_exact_batch} here; got batch {batch}. Half-layer {name} has "
            f"rank at most {layer.rank_bound} ({why}{', plus bias' if layer.bias is not None else ''}). "
            "Use a batch of at most that size, inverse='pinv' (exact while JJᵀ is invertible), or pass "
            "least_squares=True to accept the least-squares right-inverse step."
        )
    if inverse == "pinv":
        params = sum(p.numel() for p in model.parameters())
        rows = batch * model.num_classes
        if rows > params:
            raise InexactStepError(
                f"inverse='pinv' needs J (batch·k = {rows} rows) to have full row rank, but the model has only "
                f"{params} trainable parameters. Use a batch of at most {params // model.num_classes}, or pass "
                "least_squares=True to accept the least-squares step."
            )


def compute_direction(
    model: RevMLP,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss: str = "cross_entropy",
    hessian: str = "identity",
    inverse: str = "right",
    rtol: float = 0.0,
    atol: float = 0.0,
    damping: float = 0.0,
    least_squares: bool = False,
    solve_dtype: torch.dtype | None = None,
) -> GNResult:
    """:func:`gn_direction` with everything it computed on the way (logits, loss, ``v``, solve reports)."""
    model = _check_model(model)
    check_choice("loss", loss, LOSSES)
    check_choice("hessian", hessian, HESSIANS)
    check_choice("inverse", inverse, INVERSES)
    reg = Regularisation(rtol, atol, damping)
    logits, records = model.trace(inputs)
    batch = logits.shape[0]
    rows = as_target_rows(targets, model.num_classes, batch, logits, loss)
    _check_exactness(model, batch, inverse, least_squares or not reg.exact)
    with torch.no_grad():
        v = newton_target(logits, rows, loss, hessian)
        solver = _right_inverse if inverse == "right" else _min_norm
        direction, solves = solver(model, records, v, reg, solve_dtype, not least_squares)
        value = loss_value(logits, rows, loss)
    ordered = {name: direction[name] for name, _ in model.named_parameters()}
    return GNResult(ordered, logits, rows, v, value, solves)


def gn_direction(
    model: RevMLP,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss: str = "cross_entropy",
    hessian: str = "identity",
    inverse: str = "right",
    rtol: float = 0.0,
    atol: float = 0.0,
    damping: float = 0.0,
    least_squares: bool = False,
    solve_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The Gauss–Newton direction on a batch; the update is ``θ ← θ − lr·direction``.

    Args:
        model: a :class:`RevMLP`.
        inputs: ``B × d`` (or images that flatten to ``d``).
        targets: class indices (``B``, integer) or rows (``B × k``, floating).
        loss: ``"cross_entropy"`` or ``"mse"``.
        hessian: ``"exact"`` or ``"identity"`` (cross-entropy only; MSE's Hessian is the identity).
        inverse: ``"right"`` — the tractable right inverse ``J♭`` scaled by ``1/L`` so that
            ``J·direction = v`` (DESIGN §3a); ``"pinv"`` — the minimum-norm step ``J⁺v`` (§3b).
        rtol, atol: truncate singular values ``≤ max(rtol·σ_max, atol)`` of each pseudo-inverse.
        damping: ``λ`` in ``Aᵀ(AAᵀ + λI)⁻¹``.
        least_squares: accept a batch too large for the step to be exact (otherwise that is an error).
        solve_dtype: dtype of the Gram factorisations (e.g. ``torch.float64``); default: the model's.

    Returns:
        parameter name (as in ``model.named_parameters()``) → tensor shaped like that parameter.
    """
    return compute_direction(
        model, inputs, targets, loss=loss, hessian=hessian, inverse=inverse, rtol=rtol, atol=atol,
        damping=damping, least_squares=least_squares, solve_dtype=solve_dtype,
    ).direction


def ntk_gram(model: RevMLP, inputs: Tensor) -> Tensor:
    """The exact empirical NTK ``JJᵀ`` of the logits on a batch (``Bk × Bk``, row/column ``i·k + c``)."""
    model = _check_model(model)
    with torch.no_grad():
        _, records = model.trace(inputs)
        return _symmetrise_lower(_ntk_lower(records, output_cotangents(model, records)))


def jvp_logits(model: RevMLP, inputs: Tensor, delta: dict[str, Tensor]) -> Tensor:
    """``J·δθ`` (``B × k``): the first-order change of the logits when the parameters change by ``δθ``.

    ``delta`` maps parameter names to tensors shaped like the parameters (missing names count as zero).
    """
    model = _check_model(model)
    unknown = set(delta) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise KeyError(f"delta names parameters the model does not have: {sorted(unknown)}")
    with torch.no_grad():
        _, records = model.trace(inputs)
        batch = records[0].features.shape[0]
        n = model.in_features // 2
        d_a = records[0].features.new_zeros(batch, n)
        d_b = torch.zeros_like(d_a)
        for idx, rec in enumerate(records):
            d_in = d_b if idx % 2 == 0 else d_a  # F reads b, G reads a'
            change = rec.layer.jvp(d_in, rec.mask)
            if f"{rec.name}.weight" in delta:
                change = change + rec.features @ delta[f"{rec.name}.weight"].T
            if f"{rec.name}.bias" in delta:
                change = change + delta[f"{rec.name}.bias"]
            if idx % 2 == 0:
                d_a = d_a + change
            else:
                d_b = d_b + change
        return torch.cat([d_a, d_b], dim=1) @ model.readout
