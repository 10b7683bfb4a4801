"""The Gauss–Newton mathematics of exactgn, in one place (DESIGN §3).

* :func:`gn_direction` — the GN direction ``J♭v`` (tractable right inverse, §3a) or ``J⁺v`` (minimum
  norm, §3b) with ``v = H⁺g``; the update is ``θ ← θ − lr·direction``.
* :func:`ntk_gram` — the exact empirical NTK ``JJᵀ`` of a batch, ``Bk × Bk``, row ``i·k + c``.
* :func:`output_cotangents` — ``M_j = ∂o/∂(output of half-layer j)`` for every half-layer, from ``k`` batched
  backward passes.
* :func:`jvp_logits` — ``J·δθ``, the first-order change of the logits for a parameter change ``δθ``.

Everything runs on :meth:`RevMLP.trace` records, without autograd. The optimiser, the diagnostics and the
benchmarks all call these functions.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .core import INVERSES, GNResult, chunk_edges, symmetrise_lower
from .errors import InexactStepError, NonFiniteError
from .generic import generic_direction, generic_jvp_logits, generic_ntk_gram
from .linalg import (
    Regularisation,
    RowFactor,
    SolveInfo,
    all_finite,
    factor_rows,
    gram_solve,
    symmetric_matmul,
)
from .losses import HESSIANS, LOSSES, as_target_rows, check_choice, loss_value, newton_target
from .model import HalfLayerRecord, RevMLP
from .precision import as_solve_dtype, working_dtype

__all__ = [
    "INVERSES",
    "check_exactness",
    "GNResult",
    "gn_direction",
    "compute_direction",
    "ntk_gram",
    "output_cotangents",
    "activation_gram",
    "jvp_logits",
]


# ---------------------------------------------------------------------------- shared pieces
def activation_gram(record: HalfLayerRecord, *, lower: bool = False) -> Tensor:
    """``K_j = A_j A_jᵀ`` (``B × B``) with ``A_j = [φ(u C), 1]`` (the ones column only with a bias).

    ``lower=True`` computes only the lower block triangle, in row chunks of whole samples (about 45% less
    work); the strictly upper part of the result is then meaningless, which is all a Cholesky factorisation
    needs.
    """
    feats = record.features
    if lower:
        gram = feats.new_zeros(feats.shape[0], feats.shape[0])
        edges = chunk_edges(feats.shape[0])
        for lo, hi in zip(edges[:-1], edges[1:]):
            torch.mm(feats[lo:hi], feats[:hi].T, out=gram[lo:hi, :hi])
    else:
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


def _with_ones(x: Tensor, bias: bool) -> Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if bias else x


def _column_step(
    record: HalfLayerRecord, rhs: Tensor, reg: Regularisation, solve_dtype: torch.dtype | None
) -> tuple[dict[str, Tensor], SolveInfo, Tensor]:
    """``ΔΘ = (A⁺ R)ᵀ`` through a small column Gram, for a batch larger than the rank bound of ``A``.

    ``A`` (``B × (h+1)``) is replaced by a matrix ``M`` (``B × c``, ``c`` = the rank bound) with the same
    singular values and ``A⁺ = P M⁺`` for a map ``P`` with orthonormal columns: ``M = A`` when ``A`` has at
    most ``c`` columns; for the identity activation with ``h > n``, ``A = [u, 1]·diag(C, 1) = [u L, 1]·diag(Q,
    1)`` with ``C = L Q`` (:meth:`HalfLayer.proj_lq`), so ``M = [u L, 1]`` and ``P = diag(Qᵀ, 1)``. The
    regularised ``M⁺R = (MᵀM + λI)⁻¹MᵀR`` (or truncated) is then a ``c × c`` solve, and its singular-value
    cut-offs mean what they mean for ``A``. ``M`` is often rank-deficient (constant pixels, dead features),
    and the normal equations are consistent, so a Cholesky solve would pass its residual check while adding
    null-space components of any size: the unregularised solve is the minimum-norm eigen-solve
    (``min_norm=True``).

    Also returns ``A ΔΘᵀ = M M⁺R`` (``B × n``), the change of the half-layer's output the step makes.
    """
    layer, bias, name = record.layer, record.layer.bias is not None, record.name
    factored = layer.activation == "identity" and layer.proj is not None and layer.width > layer.n
    if factored:
        lower, q = layer.proj_lq()
        cols = _with_ones(record.inputs @ lower, bias)
    else:
        cols = _with_ones(record.features, bias)
    coef, info = gram_solve(
        cols.T @ cols,
        cols.T @ rhs,
        reg,
        solve_dtype=solve_dtype,
        min_norm=True,
        warn=False,
        what=f"{name} column Gram",
    )
    top = coef[:-1] if bias else coef
    out = {f"{name}.weight": top.T @ q if factored else top.T}
    if bias:
        out[f"{name}.bias"] = coef[-1]
    return out, SolveInfo(f"{info.method}-columns", info.size, info.rank), cols @ coef


def _basis_step(record: HalfLayerRecord, full: Tensor) -> dict[str, Tensor]:
    """Split ``ΔΘ`` (``n × (width + 1)`` with a bias, ``n × width`` without) into the half-layer's
    parameters."""
    if record.layer.bias is None:
        return {f"{record.name}.weight": full}
    return {f"{record.name}.weight": full[:, :-1], f"{record.name}.bias": full[:, -1]}


def _made(record: HalfLayerRecord, step: dict[str, Tensor]) -> Tensor:
    """``A ΔΘᵀ`` (``B × n``): the change of the half-layer's output that its parameter change ``step``
    makes."""
    out = record.features @ step[f"{record.name}.weight"].T
    bias = step.get(f"{record.name}.bias")
    return out if bias is None else out + bias


def _half_layer_step(
    record: HalfLayerRecord,
    rhs: Tensor,
    reg: Regularisation,
    solve_dtype: torch.dtype | None,
    warn: bool,
    factor: RowFactor | None,
) -> tuple[dict[str, Tensor], SolveInfo, Tensor | None]:
    """``(A⁺ R)ᵀ`` (regularised) for one half-layer, and ``A ΔΘᵀ``, the output change it makes (``None``:
    ``R``).

    Exact solves use ``factor`` (:func:`exactgn.linalg.factor_rows`: the ``B × B`` Gram, or a QR of ``Aᵀ``
    where the Gram would lose accuracy); regularised ones the ``B × B`` Gram's eigen-decomposition or damped
    Cholesky; a batch above the rank bound of ``A`` the smaller column Gram (a least-squares step).
    """
    if rhs.shape[0] > record.layer.rank_bound:
        return _column_step(record, rhs, reg, solve_dtype)
    if factor is not None:
        sol = factor.solve(rhs)
        if factor.method == "cholesky":
            return _param_step(record, sol), factor.info, None
        step = _basis_step(record, (factor.basis @ sol.to(factor.basis.dtype)).T.to(rhs.dtype))
        return step, factor.info, None if factor.method == "qr" else _made(record, step)
    gram = activation_gram(record, lower=True)
    coeffs, info = gram_solve(
        gram,
        rhs,
        reg,
        solve_dtype=solve_dtype,
        lower_only=True,
        warn=warn,
        what=f"{record.name} activation Gram",
    )
    return _param_step(record, coeffs), info, symmetric_matmul(gram, coeffs, True)


def _row_factors(
    records: list[HalfLayerRecord],
    batch: int,
    reg: Regularisation,
    solve_dtype: torch.dtype | None,
    warn: bool,
) -> dict[int, RowFactor]:
    """Factorisations for the exact solves of every half-layer that can take one, in one batch (one sync)."""
    if not reg.exact:
        return {}
    idx = [j for j, rec in enumerate(records) if batch <= rec.layer.rank_bound]
    if not idx:
        return {}
    grams = [activation_gram(records[j], lower=True) for j in idx]
    mats = [lambda rec=records[j]: _with_ones(rec.features, rec.layer.bias is not None) for j in idx]
    names = [f"{records[j].name} activation matrix" for j in idx]
    return dict(zip(idx, factor_rows(grams, mats, solve_dtype=solve_dtype, warn=warn, names=names)))


def _split(model: RevMLP, z: Tensor) -> tuple[Tensor, Tensor]:
    n = model.in_features // 2
    return z[..., :n], z[..., n:]


def output_cotangents(model: RevMLP, records: list[HalfLayerRecord]) -> list[Tensor]:
    """``M_j`` for every half-layer (forward order), each ``k × B × n``: ``M_j[c, i] = ∂o_{i,c}/∂y_{j,i}``.

    ``y_j`` is the output of half-layer ``j`` (what it adds to its half of the state). Samples do not
    interact, so one backward pass per class, batched over the ``k`` classes, gives all of them.
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


def _ntk_lower(records: list[HalfLayerRecord], cotangents: list[Tensor]) -> Tensor:
    """Lower triangle of ``JJᵀ = Σ_j (K_j ⊗ 1_{k×k}) ∘ (M_j M_jᵀ)``, ``Bk × Bk``.

    Row ``i·k + c``. Only the lower triangle is meaningful (a Cholesky or eigen-solve reads nothing else);
    computing the lower block triangle in row chunks of whole samples saves about 45% of the work.
    """
    k, batch, n = cotangents[0].shape
    size = batch * k
    ntk = cotangents[0].new_zeros(size, size)
    edges = chunk_edges(batch)
    for rec, m in zip(records, cotangents):
        gram = activation_gram(rec, lower=True)
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
    return ntk


def _lift(model: RevMLP, v: Tensor) -> Tensor:
    """``δz`` (``B × d``) with ``δz U = v`` exactly: the minimum-norm ``v (UᵀU)⁻¹Uᵀ``.

    ``U`` has orthonormal columns only to the precision it was drawn in (``Uᵀ`` is not its inverse after a
    float32 → float64 cast or checkpoint load), so the lift solves with ``UᵀU`` (``k × k``).
    """
    u = model.readout
    return v @ torch.linalg.solve(u.T @ u, u.T)


def _right_inverse(
    model: RevMLP,
    records: list[HalfLayerRecord],
    v: Tensor,
    reg: Regularisation,
    solve_dtype: torch.dtype | None,
    warn: bool,
) -> tuple[dict[str, Tensor], list[SolveInfo]]:
    """``J♭ v`` (DESIGN §3a, the reference's rule), including the ``1/L``.

    Walking from the last block to the first, each block ``l`` targets the state change ``δz_l`` that realises
    ``δz_L`` with everything else fixed: F solves for ``δa'``; G for what is left of ``δb'`` once the change
    of ``a'`` that F's step *makes* (``A_F ΔΘ_Fᵀ``, equal to ``δa'`` when F's solve is exact) has passed
    through G; the block below gets the JVP of this block's inverse applied to the asked ``δz_l``.
    """
    direction: dict[str, Tensor] = {}
    solves: list[SolveInfo] = []
    factors = _row_factors(records, v.shape[0], reg, solve_dtype, warn)
    d_a, d_b = _split(model, _lift(model, v))
    for l in reversed(range(model.num_blocks)):
        rec_f, rec_g = records[2 * l], records[2 * l + 1]
        step, info_f, made = _half_layer_step(rec_f, d_a, reg, solve_dtype, warn, factors.get(2 * l))
        direction.update(step)
        asked = rec_g.layer.jvp(d_a, rec_g.mask) if made is None or l > 0 else None
        through_g = asked if made is None else rec_g.layer.jvp(made, rec_g.mask)
        step, info_g, _ = _half_layer_step(
            rec_g, d_b - through_g, reg, solve_dtype, warn, factors.get(2 * l + 1)
        )
        direction.update(step)
        solves[:0] = [info_f, info_g]
        if l > 0:  # the input change of this block that the blocks below must realise
            d_b = d_b - asked
            d_a = d_a - rec_f.layer.jvp(d_b, rec_f.mask)
    scale = 1.0 / model.num_blocks
    return {name: t.mul_(scale) for name, t in direction.items()}, solves


def _min_norm(
    model: RevMLP,
    records: list[HalfLayerRecord],
    v: Tensor,
    reg: Regularisation,
    solve_dtype: torch.dtype | None,
    warn: bool,
) -> tuple[dict[str, Tensor], list[SolveInfo]]:
    """``J⁺ v = Jᵀ (JJᵀ)⁻¹ v`` (DESIGN §3b)."""
    cotangents = output_cotangents(model, records)
    ntk = _ntk_lower(records, cotangents)
    batch, k = v.shape
    u, info = gram_solve(
        ntk,
        v.reshape(batch * k, 1),
        reg,
        solve_dtype=solve_dtype,
        lower_only=True,
        warn=warn,
        what="NTK Gram JJᵀ",
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


def check_exactness(model: RevMLP, batch: int, inverse: str, least_squares: bool = False) -> None:
    """The exactness rule (DESIGN §3): raise :class:`InexactStepError` when a GN step of ``inverse`` on a
    batch of ``batch`` samples cannot be exact for ``model`` (unless ``least_squares`` accepts that)."""
    if least_squares:
        return
    if inverse == "right" and batch > model.max_exact_batch:
        worst = min(zip(model.half_layers(), model.half_layer_names()), key=lambda p: p[0].rank_bound)
        layer, name = worst
        why = (
            f"{layer.width} ReLU features"
            if layer.activation == "relu"
            else f"identity activation: rank at most min(h={layer.width}, d/2={layer.n})"
        )
        raise InexactStepError(
            "inverse='right' is exact only when every half-layer's activation matrix A = [φ(uC), 1] has full "
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
                f"inverse='pinv' needs J (batch·k = {rows} rows) to have full row rank, but the model has "
                f"only {params} trainable parameters. Use a batch of at most {params // model.num_classes}, "
                "or pass least_squares=True to accept the least-squares step."
            )


def _working_model(model: RevMLP) -> RevMLP:
    """``model`` itself, or a float32 copy of a float16/bfloat16 model."""
    dtype = working_dtype(model.readout.dtype)
    return model if dtype == model.readout.dtype else copy.deepcopy(model).to(dtype)


_RESCALE = "rescale the inputs (e.g. standardise them), or use a float64 model; nothing was changed"


def _check_scale(logits: Tensor, records: list[HalfLayerRecord]) -> None:
    """:class:`NonFiniteError` before any solve if the logits or an activation Gram ``A Aᵀ`` overflow."""
    dtype = logits.dtype
    if not torch.isfinite(logits).all():
        raise NonFiniteError(f"the logits overflow {dtype} in the forward pass: no GN step; {_RESCALE}")
    top = torch.finfo(dtype).max
    peaks = torch.stack([torch.maximum(r.features.amax(), -r.features.amin()) for r in records]).tolist()
    for rec, biggest in zip(records, peaks):
        feats = rec.features
        if biggest * biggest * feats.shape[1] <= top:  # no row's sum of squares can overflow
            continue
        if not torch.isfinite(feats.pow(2).sum(1)).all():  # the diagonal of A Aᵀ
            raise NonFiniteError(
                f"the activation Gram A Aᵀ of half-layer {rec.name} overflows {dtype}: its features reach "
                f"{biggest:.3g}, whose squares summed over {feats.shape[1]} features exceed {top:.3g}; "
                + _RESCALE
            )


def _solve_failure(err: Exception, records: list[HalfLayerRecord]) -> NonFiniteError:
    """The exactgn error for a ``LinAlgError`` of a Gram solve (LAPACK fails on NaN or infinite entries)."""
    features = max(float(r.features.abs().max()) for r in records)
    weights = max(float(r.layer.weight.abs().max()) for r in records)
    return NonFiniteError(
        f"a Gram solve failed ({str(err).splitlines()[0]}), which happens when a Gram matrix holds NaN or "
        f"infinite entries (largest |feature| {features:.3g}, weights up to {weights:.3g}): the Grams "
        "overflow at this scale; rescale the inputs, restart from weights that have not diverged, or use a "
        "float64 model; nothing was changed"
    )


def _check_direction(direction: dict[str, Tensor]) -> None:
    finite = all_finite(list(direction.values()))
    bad = [name for name, ok in zip(direction, finite) if not ok]
    if bad:
        dtype = next(iter(direction.values())).dtype
        raise NonFiniteError(
            f"the GN direction of {bad[:4]} is not finite in {dtype} "
            f"(largest finite {torch.finfo(dtype).max:.3g}): "
            "v is too large for these parameters or a Gram is numerically singular; nothing was changed. "
            "Add damping or truncation (rtol/atol), use smaller targets, or a wider model dtype."
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
    solve_dtype: torch.dtype | str | None = None,
) -> GNResult:
    """:func:`gn_direction` with everything it computed on the way (logits, loss, ``v``, solve reports).

    Same arguments as :func:`gn_direction`; returns a :class:`GNResult` (``direction`` shaped like the
    parameters, ``logits`` and ``v``: ``B × k``).

    For a float16/bfloat16 model, ``logits``, ``targets``, ``v`` and ``loss`` are in float32 (the precision
    the step was computed in); the direction is in the model's dtype.
    """
    if not isinstance(model, RevMLP):  # any other module: exactgn.generic (inverse="pinv" only)
        return generic_direction(
            model,
            inputs,
            targets,
            loss=loss,
            hessian=hessian,
            inverse=inverse,
            rtol=rtol,
            atol=atol,
            damping=damping,
            least_squares=least_squares,
            solve_dtype=as_solve_dtype(solve_dtype),
        )
    model = _check_model(model)
    check_choice("loss", loss, LOSSES)
    check_choice("hessian", hessian, HESSIANS)
    check_choice("inverse", inverse, INVERSES)
    solve_dtype = as_solve_dtype(solve_dtype)
    reg = Regularisation(rtol, atol, damping)
    work = _working_model(model)
    # A float16/bfloat16 model sees its inputs rounded to its dtype: check and round them before the upcast.
    logits, records = work.trace(inputs if work is model else model.flatten_inputs(inputs))
    batch = logits.shape[0]
    rows = as_target_rows(targets, model.num_classes, batch, logits, loss)
    check_exactness(model, batch, inverse, least_squares or not reg.exact)
    _check_scale(logits, records)
    with torch.no_grad():
        v = newton_target(logits, rows, loss, hessian)
        solver = _right_inverse if inverse == "right" else _min_norm
        try:
            direction, solves = solver(work, records, v, reg, solve_dtype, not least_squares)
        except torch.linalg.LinAlgError as err:
            raise _solve_failure(err, records) from err
        value = loss_value(logits, rows, loss)
    dtype = model.readout.dtype
    ordered = {name: direction[name].to(dtype) for name, _ in model.named_parameters()}
    _check_direction(ordered)
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
    solve_dtype: torch.dtype | str | None = None,
) -> dict[str, Tensor]:
    """The Gauss–Newton direction on a batch; the update is ``θ ← θ − lr·direction``.

    Args:
        model: a :class:`RevMLP`, or any ``torch.nn.Module`` mapping ``B × …`` to logits ``B × k`` with
            ``inverse="pinv"`` (see :mod:`exactgn.generic`).
        inputs: ``B × d`` (or images that flatten to ``d``).
        targets: class indices (``B``, integer) or rows (``B × k``, floating).
        loss: ``"cross_entropy"`` or ``"mse"``.
        hessian: ``"exact"`` or ``"identity"`` (cross-entropy only; MSE's Hessian is the identity).
        inverse: ``"right"`` — the tractable right inverse ``J♭`` scaled by ``1/L`` so that
            ``J·direction = v`` (DESIGN §3a), the reference's rule: the reference's step is ``c·L·direction``
            with ``c = 1`` for cross-entropy with the identity Hessian and ``c = 2`` for MSE (its target is
            the gradient ``2(o − y)``, not ``H⁺g = o − y``), so a reference MSE learning rate ``lr`` is
            ``2·L·lr`` here; ``"pinv"`` — the minimum-norm step ``J⁺v`` (§3b).
        rtol, atol: truncate singular values ``≤ max(rtol·σ_max, atol)`` of each pseudo-inverse.
        damping: ``λ`` in ``Aᵀ(AAᵀ + λI)⁻¹``.
        least_squares: accept a batch too large for the step to be exact (otherwise that is an error).
        solve_dtype: dtype of the Gram factorisations, ``torch.float32``/``torch.float64`` or its name
            (``"float64"``); default: the model's.

    Returns:
        parameter name (as in ``model.named_parameters()``) → tensor shaped like that parameter.

    A float16/bfloat16 model's step is computed on a float32 copy (its Grams would overflow float16, and torch
    has no half-precision Cholesky) and rounded to the model's dtype: ``J·direction = v`` up to that rounding.

    Raises:
        InexactStepError: the batch is too large for an exact step and ``least_squares`` is off.
        NonFiniteError: the logits, a Gram matrix or the direction is not finite (e.g. inputs so large that
            the Grams overflow); nothing is changed.
    """
    return compute_direction(
        model,
        inputs,
        targets,
        loss=loss,
        hessian=hessian,
        inverse=inverse,
        rtol=rtol,
        atol=atol,
        damping=damping,
        least_squares=least_squares,
        solve_dtype=solve_dtype,
    ).direction


def ntk_gram(model: RevMLP, inputs: Tensor) -> Tensor:
    """The exact empirical NTK ``JJᵀ`` of the logits on a batch (``Bk × Bk``, row/column ``i·k + c``).

    In the model's dtype, float32 for a float16/bfloat16 model (computed on a float32 copy).
    """
    if not isinstance(model, RevMLP):
        return generic_ntk_gram(model, inputs)
    model = _check_model(model)
    work = _working_model(model)
    with torch.no_grad():
        _, records = work.trace(inputs if work is model else model.flatten_inputs(inputs))
        return symmetrise_lower(_ntk_lower(records, output_cotangents(work, records)))


def jvp_logits(model: RevMLP, inputs: Tensor, delta: dict[str, Tensor]) -> Tensor:
    """``J·δθ`` (``B × k``): the first-order change of the logits when the parameters change by ``δθ``.

    ``delta`` maps parameter names to tensors shaped like the parameters (missing names count as zero).
    In the model's dtype, float32 for a float16/bfloat16 model (computed on a float32 copy).
    """
    if not isinstance(model, RevMLP):
        return generic_jvp_logits(model, inputs, delta)
    model = _check_model(model)
    unknown = set(delta) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise KeyError(f"delta names parameters the model does not have: {sorted(unknown)}")
    work = _working_model(model)
    delta = {name: t.to(work.readout.dtype) for name, t in delta.items()}
    with torch.no_grad():
        _, records = work.trace(inputs if work is model else model.flatten_inputs(inputs))
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
        return torch.cat([d_a, d_b], dim=1) @ work.readout
