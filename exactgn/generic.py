"""Exact minimum-norm Gauss–Newton for any ``torch.nn.Module`` that maps one input per sample to ``k`` logits.

``J⁺v = Jᵀ(JJᵀ)⁻¹v`` needs the NTK Gram ``JJᵀ`` (``Bk × Bk``, row ``i·k + c``). Its parameters split in two:

* **structured**: the trainable weight and bias of every ``nn.Linear`` applied once per forward pass to a
  ``B × in`` matrix (one row per sample). Forward hooks record its input ``A`` (``B × in``) and output ``y``;
  one batched backward pass over the ``k`` classes gives ``M[c, i] = ∂o_{i,c}/∂y_i`` (``k × B × out``) and the
  layer adds ``(AAᵀ + 1 ⊗ 1_{k×k}) ∘ (M Mᵀ)`` to the Gram (the ``1`` only with a trainable bias).
* **per-sample**: every other trainable parameter (LayerNorm affine, Conv2d, a bare ``nn.Parameter``, a Linear
  over a sequence, a Linear called twice): ``torch.func`` per-sample Jacobians, ``vmap(jacrev)``, in sample
  and parameter chunks whose Jacobian blocks stay under ``memory_bound`` bytes, adding ``J_p J_pᵀ``.

The step ``Δθ = Jᵀu`` is one ordinary backward pass with cotangent ``u``; for the structured layers it is also
formed from ``A`` and ``M``, and the two must agree (this catches tied weights and rows that are not samples).
Per-sample forward passes must reproduce the batch's logits (this catches samples that interact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

from .core import INVERSES, GNResult, chunk_edges, symmetrise_lower
from .errors import ExactGNError, InexactStepError
from .linalg import Regularisation, gram_solve
from .losses import HESSIANS, LOSSES, as_target_rows, check_choice, loss_value, newton_target

__all__ = [
    "DEFAULT_MEMORY_BOUND",
    "UnsupportedModelError",
    "MemoryBoundError",
    "RightInverseError",
    "generic_direction",
    "generic_ntk_gram",
    "generic_jvp_logits",
    "gn_step_flops",
]

#: Default bound (bytes) on the per-sample Jacobian blocks held at once.
DEFAULT_MEMORY_BOUND = 2**30


class UnsupportedModelError(ExactGNError, ValueError):
    """The model cannot have an exact per-sample GN step as it stands (e.g. samples interact)."""


class RightInverseError(ExactGNError, TypeError, ValueError):
    """``inverse="right"`` was asked of a model that is not a :class:`~exactgn.RevMLP`."""


def check_right_inverse(model: object, inverse: str) -> None:
    """Raises :class:`RightInverseError` for ``inverse="right"`` on anything but a RevMLP."""
    if inverse == "right":
        raise RightInverseError(
            f"inverse='right' (the tractable right inverse J♭) exists only for an exactgn.RevMLP, whose "
            f"coupling blocks can be inverted; got {type(model).__name__}. Use inverse='pinv' (the exact "
            "minimum-norm step J⁺v)."
        )


class MemoryBoundError(ExactGNError, MemoryError):
    """The per-sample Jacobian of a parameter does not fit under the memory bound even one sample at a
    time."""


@dataclass
class _Linear:
    """One structured ``nn.Linear`` application: input ``A`` (``B × in``, detached), output ``y`` (in the
    graph)."""

    name: str
    module: nn.Linear
    inputs: Tensor
    output: Tensor
    weight: bool
    bias: bool
    is_logits: bool


@dataclass
class _Capture:
    logits: Tensor
    linears: list[_Linear]
    per_sample: dict[str, nn.Parameter]
    trainable: dict[str, nn.Parameter]


# ------------------------------------------------------------ checks
def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"exactgn's GN steps need a torch.nn.Module, got {type(model).__name__}")
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            raise UnsupportedModelError(
                f"module {name!r} ({type(mod).__name__}) is in training mode: it normalises with batch "
                "statistics, so every sample's output depends on the others and J has no per-sample rows. "
                "Call model.eval() (running statistics) for the GN step, or use LayerNorm/GroupNorm "
                "instead."
            )
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training and mod.p > 0:
            raise UnsupportedModelError(
                f"module {name!r} ({type(mod).__name__}, p={mod.p}) is in training mode: the model is "
                "random, so it has no Jacobian to invert exactly. Call model.eval() for the GN step."
            )
    return model


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no trainable parameters (requires_grad=True)"
        )
    return params


def _prepare_inputs(inputs: Tensor, like: Tensor) -> Tensor:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs must hold a non-empty batch along dimension 0, got shape {tuple(inputs.shape)}"
        )
    if not inputs.is_floating_point():
        return inputs.to(like.device)
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs contain NaN or infinite values")
    return inputs.to(device=like.device, dtype=like.dtype)


def _check_exactness(batch: int, k: int, params: int, lenient: bool) -> None:
    rows = batch * k
    if rows > params and not lenient:
        raise InexactStepError(
            f"inverse='pinv' needs J (batch·k = {rows} rows) to have full row rank, but the model has only "
            f"{params} trainable parameters. Use a batch of at most {params // k}, or pass "
            "least_squares=True to accept the least-squares step."
        )


# ------------------------------------------------------------ forward with hooks
def _capture(model: nn.Module, inputs: Tensor, structured: bool) -> _Capture:
    """Forward pass recording every trainable ``nn.Linear`` application; splits parameters into the two
    paths."""
    trainable = _trainable(model)
    seen: dict[str, list[tuple[Tensor | None, Tensor]]] = {}
    hooks = _register_hooks(model, seen) if structured else []
    try:
        with torch.enable_grad():
            logits = model(inputs)
    finally:
        for h in hooks:
            h.remove()
    _check_logits(model, logits, inputs.shape[0])
    linears = _structured_linears(model, seen, logits)
    covered = {id(p) for lin in linears for p in lin.module.parameters(recurse=False) if p.requires_grad}
    per_sample = {name: p for name, p in trainable.items() if id(p) not in covered}
    return _Capture(logits, linears, per_sample, trainable)


def _register_hooks(model: nn.Module, seen: dict) -> list:
    """Forward hooks on every ``nn.Linear`` with a trainable parameter; a call appends ``(input, output)``."""
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(p.requires_grad for p in mod.parameters(recurse=False)):

            def hook(m: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                seen.setdefault(name, []).append((args[0] if args else None, out))

            hooks.append(mod.register_forward_hook(hook))
    return hooks


def _check_logits(model: nn.Module, logits: object, batch: int) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise UnsupportedModelError(
            f"{type(model).__name__}(inputs) must return logits of shape (B, k) = ({batch}, k); got {shape}. "
            "Wrap the model so that it returns one row of outputs per sample."
        )
    if not logits.requires_grad:
        raise UnsupportedModelError(
            f"{type(model).__name__}'s logits do not depend on any trainable parameter"
        )


def _structured_linears(model: nn.Module, seen: dict, logits: Tensor) -> list[_Linear]:
    """The hooked Linear applications that qualify: called once, on ``B × in``, parameters not shared."""
    modules = dict(model.named_modules())
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    batch = logits.shape[0]
    out = []
    for name, calls in seen.items():
        mod = modules[name]
        if not _qualifies(mod, calls, batch, uses):
            continue
        x, y = calls[0]
        bias = mod.bias is not None and mod.bias.requires_grad
        out.append(_Linear(name, mod, x.detach(), y, mod.weight.requires_grad, bias, y is logits))
    return out


def _qualifies(mod: nn.Module, calls: list, batch: int, uses: dict[int, int]) -> bool:
    """One call, on a ``B × in`` matrix, with parameters no other module holds."""
    if len(calls) != 1 or calls[0][0] is None:
        return False
    x, y = calls[0]
    shared = any(uses[id(p)] > 1 for p in mod.parameters(recurse=False) if p.requires_grad)
    return x.dim() == 2 and y.dim() == 2 and x.shape[0] == batch and not shared


# ------------------------------------------------------------ the structured Gram
def _cotangents(capture: _Capture, k: int) -> list[Tensor | None]:
    """``M`` (``k × B × out``) per structured layer from one batched backward pass; ``None`` for the logits
    layer."""
    logits = capture.logits
    wanted = [lin.output for lin in capture.linears if not lin.is_logits]
    result: list[Tensor | None] = [None] * len(capture.linears)
    if not wanted:
        return result
    eye = torch.eye(k, dtype=logits.dtype, device=logits.device)
    seeds = eye[:, None, :].expand(k, logits.shape[0], k).contiguous()
    grads = torch.autograd.grad(
        logits, wanted, seeds, retain_graph=True, is_grads_batched=True, allow_unused=True
    )
    it = iter(grads)
    for idx, lin in enumerate(capture.linears):
        if not lin.is_logits:
            g = next(it)
            result[idx] = (
                torch.zeros((k, *lin.output.shape), dtype=logits.dtype, device=logits.device)
                if g is None
                else g.detach()
            )
    return result


def _input_gram(lin: _Linear, edges: list[int]) -> Tensor:
    """Lower block triangle of ``AAᵀ`` (if the weight trains) ``+ 1`` (if the bias trains), ``B × B``."""
    a = lin.inputs
    gram = a.new_zeros(a.shape[0], a.shape[0])
    if lin.weight:
        for lo, hi in zip(edges[:-1], edges[1:]):
            torch.mm(a[lo:hi], a[:hi].T, out=gram[lo:hi, :hi])
    if lin.bias:
        gram += 1.0
    return gram


def _structured_gram(capture: _Capture, cots: list[Tensor | None], k: int, ntk: Tensor) -> None:
    """Adds the lower block triangle of ``Σ_layers (AAᵀ ⊗ 1_{k×k}) ∘ (M Mᵀ)`` to ``ntk`` in place."""
    batch = capture.logits.shape[0]
    size, edges = batch * k, chunk_edges(batch)
    eye = torch.eye(k, dtype=ntk.dtype, device=ntk.device)
    for lin, m in zip(capture.linears, cots):
        gram = _input_gram(lin, edges)
        if m is None:  # the layer's output is the logits: M[c, i] = e_c, so M Mᵀ = 1_{B×B} ⊗ I_k
            for lo, hi in zip(edges[:-1], edges[1:]):
                block = gram[lo:hi, None, :hi, None] * eye[None, :, None, :]
                ntk[lo * k : hi * k, : hi * k] += block.reshape((hi - lo) * k, hi * k)
            continue
        rows = m.transpose(0, 1).reshape(size, -1)
        for lo, hi in zip(edges[:-1], edges[1:]):
            block = rows[lo * k : hi * k] @ rows[: hi * k].T
            block.view(hi - lo, k, hi, k).mul_(gram[lo:hi, None, :hi, None])
            ntk[lo * k : hi * k, : hi * k] += block


# ------------------------------------------------------------ the per-sample Jacobian path
def _param_blocks(params: dict[str, nn.Parameter], row_bytes: int, bound: int) -> list[list[str]]:
    """Groups of parameter names whose whole-batch Jacobian (``row_bytes`` per column) fits under
    ``bound``."""
    blocks: list[list[str]] = []
    size = 0
    for name, p in params.items():
        if blocks and (size + p.numel()) * row_bytes <= bound:
            blocks[-1].append(name)
            size += p.numel()
        else:
            blocks.append([name])
            size = p.numel()
    return blocks


class _PerSampleJacobian:
    """Rows ``i·k + c`` of ``∂o/∂θ`` for a block of parameters, ``(hi − lo)·k × p``, by ``vmap(jacrev)``."""

    def __init__(
        self, model: nn.Module, params: dict[str, nn.Parameter], names: list[str], logits: Tensor
    ) -> None:
        self.model, self.names, self.logits = model, names, logits.detach()
        self.values = {n: params[n].detach() for n in names}

        def one(ps: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
            out = functional_call(model, ps, (x.unsqueeze(0),))[0]
            return out, out

        self._jac = vmap(jacrev(one, has_aux=True), in_dims=(None, 0))

    def __call__(self, inputs: Tensor, lo: int, hi: int) -> Tensor:
        with torch.no_grad():
            jac, out = self._jac(self.values, inputs[lo:hi])
        _check_samples_independent(self.model, out, self.logits[lo:hi])
        rows = (hi - lo) * out.shape[1]
        return torch.cat([jac[n].reshape(rows, -1) for n in self.names], dim=1)


def _check_samples_independent(model: nn.Module, alone: Tensor, batched: Tensor) -> None:
    err = float((alone - batched).norm())
    tol = 100 * math.sqrt(torch.finfo(batched.dtype).eps) * (float(batched.norm()) + 1e-30)
    if err > tol:
        raise UnsupportedModelError(
            f"{type(model).__name__} gives different logits for a sample alone than inside the batch "
            f"(difference {err:.2e}, logits norm {float(batched.norm()):.2e}): its samples interact (batch "
            "statistics, in-place state, or dropout), so J has no per-sample rows. Call model.eval() or "
            "remove the interaction."
        )


def _per_sample_gram(
    model: nn.Module, inputs: Tensor, capture: _Capture, k: int, ntk: Tensor, bound: int
) -> None:
    """Adds ``J_p J_pᵀ`` of the per-sample parameters to ``ntk`` (lower block triangle at least), in
    chunks."""
    params = capture.per_sample
    if not params:
        return
    batch = inputs.shape[0]
    itemsize = next(iter(params.values())).element_size()
    for names in _param_blocks(params, batch * k * itemsize, bound):
        width = sum(params[n].numel() for n in names)
        jac = _PerSampleJacobian(model, params, names, capture.logits)
        if batch * k * width * itemsize <= bound:
            full = jac(inputs, 0, batch)
            ntk += full @ full.T
            continue
        chunk = bound // (2 * k * width * itemsize)
        if chunk < 1:
            raise MemoryBoundError(
                f"parameter {names[0]!r} ({tuple(params[names[0]].shape)}) needs {2 * k * width * itemsize} "
                f"bytes for the per-sample Jacobian of two samples, above memory_bound={bound}. Raise "
                "memory_bound, freeze the parameter (requires_grad_(False)), or make its layer an nn.Linear "
                "applied to a B × features matrix (the structured path needs no per-sample Jacobian)."
            )
        edges = list(range(0, batch, chunk)) + [batch]
        for a_lo, a_hi in zip(edges[:-1], edges[1:]):
            ja = jac(inputs, a_lo, a_hi)
            for b_lo, b_hi in zip(edges[:-1], edges[1:]):
                if b_lo > a_lo:
                    break
                jb = ja if b_lo == a_lo else jac(inputs, b_lo, b_hi)
                ntk[a_lo * k : a_hi * k, b_lo * k : b_hi * k] += ja @ jb.T


# ------------------------------------------------------------ Jᵀu, checked
def _transpose_product(capture: _Capture, cots: list[Tensor | None], u: Tensor) -> dict[str, Tensor]:
    """``Jᵀu`` by one backward pass; the structured layers' share is checked against ``A`` and ``M``."""
    names = list(capture.trainable)
    grads = torch.autograd.grad(capture.logits, [capture.trainable[n] for n in names], u, allow_unused=True)
    out = {n: torch.zeros_like(capture.trainable[n]) if g is None else g for n, g in zip(names, grads)}
    name_of = {id(p): n for n, p in capture.trainable.items()}
    for lin, m in zip(capture.linears, cots):
        coeffs = u if m is None else torch.einsum("cbn,bc->bn", m, u)
        mine = []
        if lin.weight:
            mine.append((lin.module.weight, coeffs.T @ lin.inputs))
        if lin.bias:
            mine.append((lin.module.bias, coeffs.sum(0)))
        for p, expected in mine:
            _check_agree(lin.name, out[name_of[id(p)]], expected)
    return out


def _check_agree(name: str, backward: Tensor, structured: Tensor) -> None:
    err = float((backward - structured).norm())
    tol = (
        100 * math.sqrt(torch.finfo(backward.dtype).eps) * (float(backward.norm()) + float(structured.norm()))
    )
    if err > tol + 1e-300:
        raise UnsupportedModelError(
            f"nn.Linear {name!r}: the backward pass and the layer's recorded inputs disagree on Jᵀu "
            f"(difference {err:.2e}): its parameters are used outside its forward (tied weights, functional "
            "use) or the rows of its input are not the samples. Pass structured=False to "
            "exactgn.generic_direction / generic_ntk_gram to treat every parameter with per-sample "
            "Jacobians."
        )


# ------------------------------------------------------------ public API
def _gram(model: nn.Module, inputs: Tensor, capture: _Capture, bound: int) -> tuple[Tensor, list]:
    k = capture.logits.shape[1]
    size = inputs.shape[0] * k
    cots = _cotangents(capture, k)
    ntk = capture.logits.new_zeros(size, size)
    with torch.no_grad():
        _structured_gram(capture, cots, k, ntk)
    _per_sample_gram(model, inputs, capture, k, ntk, bound)
    return ntk, cots


def _check_bound(memory_bound: int) -> None:
    if isinstance(memory_bound, bool) or not isinstance(memory_bound, int) or memory_bound < 1:
        raise ValueError(f"memory_bound must be a positive number of bytes, got {memory_bound!r}")


def generic_direction(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss: str = "cross_entropy",
    hessian: str = "identity",
    inverse: str = "pinv",
    rtol: float = 0.0,
    atol: float = 0.0,
    damping: float = 0.0,
    least_squares: bool = False,
    solve_dtype: torch.dtype | None = None,
    memory_bound: int = DEFAULT_MEMORY_BOUND,
    structured: bool = True,
) -> GNResult:
    """The minimum-norm GN step ``J⁺v`` of any module, with everything computed on the way.

    Args:
        model: maps inputs ``B × …`` to logits ``B × k``; samples must not interact (no BatchNorm in training
            mode). Its trainable parameters (``requires_grad``) are the ones stepped.
        inputs, targets, loss, hessian, rtol, atol, damping, least_squares, solve_dtype: as in
            :func:`exactgn.gn_direction`.
        inverse: must be ``"pinv"`` (the right inverse ``J♭`` exists only for a :class:`~exactgn.RevMLP`).
        memory_bound: bytes of per-sample Jacobian held at once (parameters outside structured ``nn.Linear``).
        structured: ``False`` sends every parameter through per-sample Jacobians (slow; for tied weights).

    Returns:
        a :class:`~exactgn.gn.GNResult`: ``direction`` maps each trainable parameter's name to a tensor shaped
        like it (the step is ``θ − lr·direction``), with logits, targets, ``v`` (``B × k``), loss and the
        solve.
    """
    model = _check_model(model)
    check_choice("loss", loss, LOSSES)
    check_choice("hessian", hessian, HESSIANS)
    check_choice("inverse", inverse, INVERSES)
    check_right_inverse(model, inverse)
    reg = Regularisation(rtol, atol, damping)
    _check_bound(memory_bound)
    trainable = _trainable(model)
    inputs = _prepare_inputs(inputs, next(iter(trainable.values())))
    capture = _capture(model, inputs, structured)
    logits = capture.logits
    batch, k = logits.shape
    rows = as_target_rows(targets, k, batch, logits.detach(), loss)
    _check_exactness(batch, k, sum(p.numel() for p in trainable.values()), least_squares or not reg.exact)
    with torch.no_grad():
        v = newton_target(logits.detach(), rows, loss, hessian)
    ntk, cots = _gram(model, inputs, capture, memory_bound)
    u, info = gram_solve(
        ntk,
        v.reshape(batch * k, 1),
        reg,
        solve_dtype=solve_dtype,
        lower_only=True,
        warn=not least_squares,
        what="NTK Gram JJᵀ",
    )
    direction = _transpose_product(capture, cots, u.view(batch, k))
    with torch.no_grad():
        value = loss_value(logits.detach(), rows, loss)
    return GNResult(direction, logits.detach(), rows, v, value, [info])


def generic_ntk_gram(
    model: nn.Module, inputs: Tensor, *, memory_bound: int = DEFAULT_MEMORY_BOUND, structured: bool = True
) -> Tensor:
    """The exact empirical NTK ``JJᵀ`` of any module's logits on a batch (``Bk × Bk``, row/column ``i·k +
    c``).

    The structured layers are checked with ``Jᵀu`` for a fixed pseudo-random ``u`` (one extra backward pass).
    """
    model = _check_model(model)
    _check_bound(memory_bound)
    trainable = _trainable(model)
    inputs = _prepare_inputs(inputs, next(iter(trainable.values())))
    capture = _capture(model, inputs, structured)
    ntk, cots = _gram(model, inputs, capture, memory_bound)
    probe = torch.randn(capture.logits.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _transpose_product(capture, cots, probe.to(capture.logits))
    return symmetrise_lower(ntk)


def generic_jvp_logits(model: nn.Module, inputs: Tensor, delta: dict[str, Tensor]) -> Tensor:
    """``J·δθ`` (``B × k``) for any module, by forward-mode AD; ``delta`` names trainable parameters."""
    model = _check_model(model)
    trainable = _trainable(model)
    unknown = set(delta) - set(trainable)
    if unknown:
        raise KeyError(
            f"delta names parameters the model does not have (or that do not train): {sorted(unknown)}"
        )
    inputs = _prepare_inputs(inputs, next(iter(trainable.values())))
    primals = {n: p.detach() for n, p in trainable.items()}
    tangents = {n: delta[n].to(p) if n in delta else torch.zeros_like(p) for n, p in primals.items()}
    with torch.no_grad():
        _, out = jvp(lambda ps: functional_call(model, ps, (inputs,)), (primals,), (tangents,))
    return out


# ------------------------------------------------------------ floating-point work
def gn_step_flops(model: nn.Module, inputs: Tensor) -> dict[str, float]:
    """Floating-point operations (multiply and add counted separately) of each step on this batch, as
    implemented.

    Counts the ``nn.Linear`` products, Grams and factorisations; elementwise work is left out. Parameters
    outside structured layers add only their Gram ``2(Bk)²p``: their per-sample Jacobians are not counted.
    Returns ``forward``, ``adam_step`` (forward + backward) and ``gn_pinv_step``.
    """
    model = _check_model(model)
    inputs = _prepare_inputs(inputs, next(iter(_trainable(model).values())))
    calls: list[tuple[nn.Linear, Tensor, Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda m, a, o: calls.append((m, a[0], o)))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        capture = _capture(model, inputs, True)
    finally:
        for h in hooks:
            h.remove()
    batch, k = capture.logits.shape
    size = batch * k
    q = min(8, batch)
    tri = (q + 1) / (2 * q)  # share of a Gram's blocks in its lower block triangle (row chunks)
    forward = sum(2 * x.numel() * m.out_features for m, x, _ in calls)
    input_grad = sum(2 * x.numel() * m.out_features for m, x, _ in calls if x.requires_grad)
    weight_grad = sum(2 * x.numel() * m.out_features for m, x, _ in calls if m.weight.requires_grad)
    backward = input_grad + weight_grad
    gn = forward + k * input_grad + backward  # forward, k batched cotangents, Jᵀu by backward
    for lin in capture.linears:
        b, n_in, n_out = batch, lin.inputs.shape[1], lin.output.shape[1]
        gn += 2 * b * b * n_in * tri * lin.weight + b * b  # AAᵀ (+1)
        gn += 0 if lin.is_logits else 2 * size * size * n_out * tri + size * size * tri  # M Mᵀ, ∘
        gn += (0 if lin.is_logits else 2 * size * n_out) + 2 * b * n_out * n_in  # the check of Jᵀu
    gn += sum(2 * size * size * p.numel() for p in capture.per_sample.values())
    gn += size**3 / 3 + 4 * size**2 + 4 * size**2  # Cholesky, two triangular solves, residual check
    return {"forward": float(forward), "adam_step": float(forward + backward), "gn_pinv_step": float(gn)}
