"""Both GN directions and the NTK against brute force in float64 (DESIGN §4).

Every check draws a fresh model and batch (see the ``rng`` fixture). ``J`` is built with
``torch.func.jacrev``.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from conftest import flat, jacobian, param_names, random_model, relative
from torch.func import functional_call, grad

import exactgn
from exactgn.errors import InexactStepError, NonFiniteError
from exactgn.linalg import GramFallbackWarning
from exactgn.losses import loss_value

F64 = torch.float64
D, K = 24, 3  # d/2 = 12 ≥ h, so the bound of the identity first block is not the binding one
TARGETS = [("mse", "exact"), ("cross_entropy", "exact"), ("cross_entropy", "identity")]


def _activations(model, x):
    """Explicit activation matrices A_j = [φ(u C), 1] from a plain re-implementation of the forward pass."""
    n = model.in_features // 2
    a, b = x[:, :n], x[:, n:]
    mats = []
    for block in model.blocks:
        for layer, which in ((block.f, "f"), (block.g, "g")):
            u = b if which == "f" else a
            pre = u if layer.proj is None else u @ layer.proj
            feats = pre if layer.activation == "identity" else torch.relu(pre)
            cols = [feats] + ([torch.ones(len(x), 1, dtype=x.dtype)] if layer.bias is not None else [])
            mats.append(torch.cat(cols, 1))
            out = feats @ layer.weight.T + (0 if layer.bias is None else layer.bias)
            if which == "f":
                a = a + out
            else:
                b = b + out
    return mats


MAX_COND = 1e3


def _cond(a):
    """2-norm condition number of a wide matrix (inf when rank-deficient; torch.linalg.cond can give -inf)."""
    s = torch.linalg.svdvals(a)
    return (s[0] / s[-1]).item() if s[-1] > 0 else float("inf")


def draw(rng, batch, *, kink=False, attempts=200, **kw):
    """A fresh (model, x, y) whose activation matrices all have full row rank: the precondition of exactness.

    Full rank numerically: every ``A_j`` has condition number at most ``MAX_COND``. The Gram route of DESIGN
    §3a loses ``cond(A)²`` (relative error ≈ ``eps·cond(A)²``, pinned by
    ``test_right_inverse_error_follows_the_conditioning``), so ``1e-10`` in float64 needs ``cond(A) ≲ 3·10³``.
    With ``kink=True`` one sample is all zeros, so that every ReLU pre-activation of it is exactly 0.
    """
    for _ in range(attempts):
        model = random_model(rng, in_features=D, num_classes=K, **kw)
        x = torch.randn(batch, D, generator=rng, dtype=F64)
        if kink:
            x[0] = 0
        if all(_cond(a) <= MAX_COND for a in _activations(model, x)):
            y = torch.randint(0, K, (batch,), generator=rng)
            return model, x, y
    raise AssertionError("could not draw a model whose activation matrices have full row rank")


CASES = list(itertools.product([8, None], [True, False], [1, 2, 3], TARGETS))


def _batches(model):
    top = model.max_exact_batch
    return sorted({1, (top + 1) // 2, top})


@pytest.mark.parametrize("hidden, bias, blocks, target", CASES)
def test_right_inverse_realises_v(rng, hidden, bias, blocks, target):
    loss, hess = target
    for batch in _batches(exactgn.RevMLP(D, K, blocks, hidden, bias=bias)):
        model, x, y = draw(rng, batch, hidden=hidden, bias=bias, num_blocks=blocks, kink=bias and batch > 1)
        res = exactgn.compute_direction(model, x, y, loss=loss, hessian=hess, inverse="right")
        assert res.exact
        jd = jacobian(model, x) @ flat(res.direction, model)
        assert relative(jd, res.v.reshape(-1)) <= 1e-10, batch


def test_right_inverse_error_follows_the_conditioning(rng):
    """Without a conditioning precondition: on any full-rank draw the error grows like u·cond(A), not
    u·cond(A)² (the Gram route is kept only for cond(A) ≤ GRAM_MAX_COND = 64, a QR of Aᵀ beyond). The
    Gram-only solves this replaced gave 1.3e-10 at cond(A) = 5.4e3, above this bound (7.7e-11). A solve that
    falls back warns once, naming its half-layer (asserted: a warning exactly for each fall-back, none below
    cond = 10³)."""
    u = torch.finfo(F64).eps / 2
    checked, worst = 0, 0.0
    while checked < 20:
        model = random_model(rng, in_features=D, num_classes=K, num_blocks=2, hidden=8)
        x = torch.randn(9, D, generator=rng, dtype=F64)
        conds = [_cond(a) for a in _activations(model, x)]
        cond = max(conds)
        if cond > 1e6:  # numerically singular: the fall-back path, tested separately
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = torch.randint(0, K, (9,), generator=rng)
            res = exactgn.compute_direction(model, x, y, inverse="right")
        names = model.half_layer_names()
        fell_back = [name for name, s in zip(names, res.solves) if s.method.endswith("fallback")]
        assert [str(w.message).split(" activation Gram")[0] for w in caught] == fell_back
        assert all(w.category is GramFallbackWarning for w in caught)
        assert all(c > 1e3 for c, s in zip(conds, res.solves) if s.method.endswith("fallback")), conds
        err = relative(jacobian(model, x) @ flat(res.direction, model), res.v.reshape(-1))
        assert res.exact and err <= 64 * u * cond, (err, cond)
        checked, worst = checked + 1, max(worst, cond)
    assert worst > 64  # some draws took the QR route


# ---------------------------------------------------------------------------- the reference's rule,
# independently
def _half_layer_fn(layer):
    """``u ↦ φ(u C) Wᵀ + β`` in plain torch (not exactgn's code), and its activation matrix ``[φ(u C),
    1]``."""

    def act(u):
        pre = u if layer.proj is None else u @ layer.proj
        feats = pre if layer.activation == "identity" else torch.relu(pre)
        ones = [torch.ones(len(u), 1, dtype=u.dtype)] if layer.bias is not None else []
        return torch.cat([feats] + ones, 1)

    def fn(u):
        pre = u if layer.proj is None else u @ layer.proj
        feats = pre if layer.activation == "identity" else torch.relu(pre)
        return feats @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    return fn, act


def _svd_pinv_reg(a, rtol=0.0, atol=0.0, damping=0.0):
    """Regularised pseudo-inverse by an explicit SVD: drop σ ≤ max(rtol·σ_max, atol) (and the numerical null
    space, σ ≤ 1e-10·σ_max), then σ/(σ² + damping)."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    keep = s > max(rtol * s[0].item(), atol, 1e-10 * s[0].item())
    inv = s[keep] / (s[keep] ** 2 + damping)
    return vh[keep].T @ (inv[:, None] * u[:, keep].T)


def _reference_rule(model, x, v, *, asked=False, **reg):
    """The reference's step J♭v, written out plainly in float64: blocks from last to first, F's step from the
    pseudo-inverse of A_F, G's target δb' minus the change through G of what F's step makes (``asked``: of
    δa', the rule exactgn had before), the block below handed the JVP of the block's inverse; divided by L."""
    n, blocks = model.in_features // 2, list(model.blocks)
    with torch.no_grad():
        a, b = x[:, :n], x[:, n:]
        inputs = []
        for block in blocks:
            f, _ = _half_layer_fn(block.f)
            g, _ = _half_layer_fn(block.g)
            inputs.append((b, a + f(b)))
            a = a + f(b)
            b = b + g(a)
        dz = v @ torch.linalg.pinv(model.readout)
        da, db = dz[:, :n], dz[:, n:]
        step = {}
        for l in reversed(range(len(blocks))):
            (f, act_f), (g, act_g) = _half_layer_fn(blocks[l].f), _half_layer_fn(blocks[l].g)
            b_in, a_out = inputs[l]
            a_f, a_g = act_f(b_in), act_g(a_out)
            theta_f = _svd_pinv_reg(a_f, **reg) @ da
            made = da if asked else a_f @ theta_f
            jvp_g = lambda t: torch.func.jvp(g, (a_out,), (t,))[1]  # noqa: E731
            theta_g = _svd_pinv_reg(a_g, **reg) @ (db - jvp_g(made))
            for name, theta in ((f"blocks.{l}.f", theta_f), (f"blocks.{l}.g", theta_g)):
                has_bias = f"{name}.bias" in dict(model.named_parameters())
                step[f"{name}.weight"] = (theta[:-1] if has_bias else theta).T / len(blocks)
                if has_bias:
                    step[f"{name}.bias"] = theta[-1] / len(blocks)
            db = db - jvp_g(da)
            da = da - torch.func.jvp(f, (b_in,), (db,))[1]
    return step


def _above_rank(rng, blocks, hidden=20, batch=16, k=K):
    """A batch above the identity first block's rank bound d/2 + 1 = 13 (the ReLU blocks' is 21)."""
    model = random_model(rng, in_features=D, num_classes=k, num_blocks=blocks, hidden=hidden)
    return (
        model,
        torch.randn(batch, D, generator=rng, dtype=F64),
        torch.randint(0, k, (batch,), generator=rng),
    )


@pytest.mark.parametrize(
    "hidden, bias, blocks", [(8, True, 1), (8, True, 3), (None, False, 2), (8, False, 2)]
)
def test_right_step_is_the_reference_rule_on_exact_batches(rng, hidden, bias, blocks):
    """Where every solve is exact the two rules agree, and exactgn's step is both."""
    model, x, y = draw(rng, model_batch(hidden, bias, blocks), hidden=hidden, bias=bias, num_blocks=blocks)
    res = exactgn.compute_direction(model, x, y, inverse="right")
    got = flat(res.direction, model)
    assert res.exact
    assert relative(got, flat(_reference_rule(model, x, res.v), model)) <= 1e-10
    assert relative(got, flat(_reference_rule(model, x, res.v, asked=True), model)) <= 1e-10


def model_batch(hidden, bias, blocks):
    return exactgn.RevMLP(D, K, blocks, hidden, bias=bias).max_exact_batch


@pytest.mark.parametrize("case", ["rtol", "atol", "damping", "above-rank", "above-rank-truncated"])
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_right_step_is_the_reference_rule_when_solves_are_not_exact(rng, case, blocks):
    """Truncated, damped and least-squares (above the rank bound) steps follow the reference's rule, which
    here differs from the rule that discounted the asked change of a'."""
    reg = {
        "rtol": dict(rtol=0.3),
        "atol": {},
        "damping": dict(damping=0.3),
        "above-rank": {},
        "above-rank-truncated": dict(rtol=1e-2, atol=1e-5),
    }[case]
    if case.startswith("above-rank"):
        model, x, y = _above_rank(rng, blocks)
    else:
        model, x, y = draw(rng, 8, hidden=8, bias=True, num_blocks=blocks)
    if case == "atol":  # an absolute cut between the singular values of the last block's A_F
        sigma = torch.linalg.svdvals(_activations(model, x)[-2])
        reg["atol"] = ((sigma[3] + sigma[4]) / 2).item()
    res = exactgn.compute_direction(model, x, y, inverse="right", least_squares=True, **reg)
    got = flat(res.direction, model)
    assert not res.exact
    assert relative(got, flat(_reference_rule(model, x, res.v, **reg), model)) <= 1e-10
    assert relative(got, flat(_reference_rule(model, x, res.v, asked=True, **reg), model)) > 1e-6


@pytest.mark.parametrize("case", ["rtol", "above-rank", "above-rank-truncated"])
def test_reference_rule_fits_v_better(rng, case):
    """With one block and k = d (the readout is orthogonal), the error of the block's state change splits into
    (I − P_G)(δb' − ∂G·made) and, for the asked-change rule only, the orthogonal P_G ∂G(δa' − made): the
    reference's rule never fits v worse. Brute-force J."""
    reg = {"rtol": dict(rtol=0.3), "above-rank": {}, "above-rank-truncated": dict(rtol=1e-2, atol=1e-5)}[case]
    for _ in range(5):
        if case == "rtol":
            model = random_model(rng, in_features=D, num_classes=D, num_blocks=1, hidden=8)
            x = torch.randn(8, D, generator=rng, dtype=F64)
            y = torch.randint(0, D, (8,), generator=rng)
        else:
            model, x, y = _above_rank(rng, 1, k=D)
        res = exactgn.compute_direction(model, x, y, inverse="right", least_squares=True, **reg)
        jac, v = jacobian(model, x), res.v.reshape(-1)
        new = (jac @ flat(res.direction, model) - v).norm()
        old = (jac @ flat(_reference_rule(model, x, res.v, asked=True, **reg), model) - v).norm()
        assert new <= old * (1 + 1e-12), (new, old)


@pytest.mark.parametrize("hidden, bias, blocks, target", CASES)
def test_pinv_is_the_moore_penrose_step(rng, hidden, bias, blocks, target):
    loss, hess = target
    for batch in _batches(exactgn.RevMLP(D, K, blocks, hidden, bias=bias)):
        model, x, y = draw(rng, batch, hidden=hidden, bias=bias, num_blocks=blocks, kink=bias and batch > 1)
        res = exactgn.compute_direction(model, x, y, loss=loss, hessian=hess, inverse="pinv")
        ref = torch.linalg.pinv(jacobian(model, x)) @ res.v.reshape(-1)
        assert relative(flat(res.direction, model), ref) <= 1e-8, batch


@pytest.mark.parametrize("hidden, bias, blocks", [c[:3] for c in CASES[:: len(TARGETS)]])
def test_ntk_gram_and_jvp_match_the_jacobian(rng, hidden, bias, blocks):
    model, x, _ = draw(rng, 7, hidden=hidden, bias=bias, num_blocks=blocks, kink=bias)
    jac = jacobian(model, x)
    ntk = exactgn.ntk_gram(model, x)
    assert ntk.shape == (7 * K, 7 * K)
    assert relative(ntk, jac @ jac.T) <= 1e-12
    assert torch.equal(ntk, ntk.T)
    delta = {name: torch.randn(p.shape, generator=rng, dtype=F64) for name, p in model.named_parameters()}
    assert relative(exactgn.jvp_logits(model, x, delta).reshape(-1), jac @ flat(delta, model)) <= 1e-12


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_the_two_inverses_differ_and_pinv_is_shorter(rng, blocks):
    model, x, y = draw(rng, 6, hidden=8, bias=True, num_blocks=blocks)
    right = flat(exactgn.gn_direction(model, x, y, inverse="right"), model)
    pinv = flat(exactgn.gn_direction(model, x, y, inverse="pinv"), model)
    assert pinv.norm() <= right.norm() * (1 + 1e-12)
    assert torch.dot(right, pinv) / (right.norm() * pinv.norm()) < 0.999


@pytest.mark.parametrize("inverse", ["right", "pinv"])
@pytest.mark.parametrize("target", TARGETS)
def test_direction_is_a_descent_direction_with_the_predicted_slope(rng, inverse, target):
    """⟨∇θℓ, Δθ⟩ = gᵀ J Δθ = gᵀ v, which is positive."""
    loss, hess = target
    model, x, y = draw(rng, 5, hidden=8, bias=True, num_blocks=2)
    res = exactgn.compute_direction(model, x, y, loss=loss, hessian=hess, inverse=inverse)
    params = {name: p.detach() for name, p in model.named_parameters()}
    gradient = grad(lambda ps: loss_value(functional_call(model, ps, (x,)), res.targets, loss))(params)
    slope = torch.dot(flat(gradient, model), flat(res.direction, model))
    g = torch.autograd.functional.jacobian(lambda o: loss_value(o, res.targets, loss), res.logits)
    expected = (g * res.v).sum()
    assert expected > 0
    assert slope.item() == pytest.approx(expected.item(), rel=1e-10)


def test_direction_has_the_parameters_names_shapes_and_dtype(rng):
    model, x, y = draw(rng, 4, hidden=8, bias=True, num_blocks=2)
    for inverse in ("right", "pinv"):
        direction = exactgn.gn_direction(model, x, y.tolist() and y, inverse=inverse)
        assert list(direction) == param_names(model)
        for name, p in model.named_parameters():
            assert direction[name].shape == p.shape and direction[name].dtype == p.dtype


def test_one_hot_and_index_targets_agree(rng):
    model, x, y = draw(rng, 5, hidden=8, bias=True, num_blocks=2)
    rows = torch.nn.functional.one_hot(y, K).to(F64)
    for inverse in ("right", "pinv"):
        a = flat(exactgn.gn_direction(model, x, y, inverse=inverse), model)
        b = flat(exactgn.gn_direction(model, x, rows, inverse=inverse), model)
        assert torch.equal(a, b)


def _svd_pinv(a, cut):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    keep = s > cut
    return vh[keep].T @ torch.diag(1 / s[keep]) @ u[:, keep].T


def _damped_pinv(a, lam):
    return a.T @ torch.linalg.inv(a @ a.T + lam * torch.eye(len(a), dtype=a.dtype))


@pytest.mark.parametrize(
    "reg", [dict(rtol=0.4), dict(atol="median"), dict(damping=0.5), dict(rtol=0.4, damping=0.5)]
)
def test_regularised_pinv_step_matches_explicit_svd(rng, reg):
    model, x, y = draw(rng, 6, hidden=8, bias=True, num_blocks=2)
    jac = jacobian(model, x)
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    if reg.get("atol") == "median":  # an absolute cut that falls between singular values
        reg["atol"] = ((s[8] + s[9]) / 2).item()
    res = exactgn.compute_direction(model, x, y, inverse="pinv", **reg)
    cut = max(reg.get("rtol", 0) * s[0].item(), reg.get("atol", 0))
    keep = s > cut
    inv = s[keep] / (s[keep] ** 2 + reg.get("damping", 0))
    ref = vh[keep].T @ (inv * (u[:, keep].T @ res.v.reshape(-1)))
    assert 0 < keep.sum() < len(s) or reg.keys() == {"damping"}  # the truncation really truncates
    assert relative(flat(res.direction, model), ref) <= 1e-8


@pytest.mark.parametrize(
    "reg",
    [
        dict(rtol=0.05),
        dict(atol=0.3),
        dict(damping=0.5),
        dict(),
        dict(lstsq="tall"),
        dict(lstsq="factored"),
        dict(lstsq="deficient"),
        dict(lstsq="factored", rtol=0.05),
        dict(lstsq="tall", damping=0.5),
    ],
)
def test_single_block_right_step_matches_explicit_pseudo_inverses(rng, reg):
    """For L = 1, J♭v is (A_F⁺ δa')ᵀ and (A_G⁺ (δb' − (∂G/∂a')·A_F A_F⁺ δa'))ᵀ, built here from explicit SVDs:
    G's target discounts the change of a' that F's step makes (the reference's rule), not the one it was asked
    for.

    ``lstsq``: batches above the rank bound with ``least_squares=True``: "tall" (h = 8 < d/2: A has more rows
    than columns), "factored" (h = 20 > d/2 = 12: A = [uC, 1] has rank 13 < 16 rows and 21 columns),
    "deficient" (as "factored", with four input pixels that are always zero, as MNIST's borders are: rank 9).
    """
    lstsq = reg.pop("lstsq", None)
    hidden, batch = {None: (8, 6), "tall": (8, 11), "factored": (20, 16), "deficient": (20, 16)}[lstsq]
    if lstsq is None:
        model, x, y = draw(rng, batch, hidden=hidden, bias=True, num_blocks=1)
    else:
        model = random_model(rng, in_features=D, num_classes=K, num_blocks=1, hidden=hidden)
        x = torch.randn(batch, D, generator=rng, dtype=F64)
        if lstsq == "deficient":
            x[:, [2, 5, 13, 20]] = 0  # two pixels in each half
        y = torch.randint(0, K, (batch,), generator=rng)
    res = exactgn.compute_direction(model, x, y, inverse="right", least_squares=lstsq is not None, **reg)
    if lstsq is not None:
        assert all(s.method.endswith("-columns") for s in res.solves)
    a_f, a_g = _activations(model, x)

    def pinv(a):
        if "damping" in reg:
            return _damped_pinv(a, reg["damping"])
        s0 = torch.linalg.svdvals(a)[0].item()
        cut = max(reg.get("rtol", 0) * s0, reg.get("atol", 0), 0 if not lstsq else 1e-10 * s0)
        return _svd_pinv(a, cut)

    n = D // 2
    dz = res.v @ model.readout.T
    da, db = dz[:, :n], dz[:, n:]
    g = model.blocks[0].g
    expect_f = (pinv(a_f) @ da).T
    m = (a_f @ expect_f.T) @ g.proj @ g.weight.T  # identity activation in the first block
    expect_g = (pinv(a_g) @ (db - m)).T
    got_f = torch.cat([res.direction["blocks.0.f.weight"], res.direction["blocks.0.f.bias"][:, None]], 1)
    got_g = torch.cat([res.direction["blocks.0.g.weight"], res.direction["blocks.0.g.bias"][:, None]], 1)
    assert relative(got_f, expect_f) <= 1e-8
    assert relative(got_g, expect_g) <= 1e-8


def test_right_inverse_refuses_a_batch_above_the_rank_bound(rng):
    model = random_model(rng, in_features=D, num_classes=K, num_blocks=2, hidden=8)
    x = torch.randn(10, D, generator=rng, dtype=F64)
    y = torch.randint(0, K, (10,), generator=rng)
    with pytest.raises(InexactStepError, match=r"batch <= 9 here; got batch 10.*least_squares=True"):
        exactgn.gn_direction(model, x, y, inverse="right")
    wide = random_model(
        rng, in_features=D, num_classes=K, num_blocks=2, hidden=40
    )  # identity block binds: 12 + 1
    x = torch.randn(14, D, generator=rng, dtype=F64)
    with pytest.raises(InexactStepError, match=r"batch <= 13.*blocks.0.f.*identity activation"):
        exactgn.gn_direction(wide, x, torch.zeros(14, dtype=torch.long), inverse="right")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GramFallbackWarning)
        direction = exactgn.gn_direction(
            wide, x, torch.zeros(14, dtype=torch.long), inverse="right", least_squares=True
        )
    assert all(torch.isfinite(t).all() for t in direction.values())


def test_pinv_refuses_more_rows_than_parameters(rng):
    model = random_model(rng, in_features=4, num_classes=4, num_blocks=1, hidden=1, bias=False)  # P = 4
    x = torch.randn(2, 4, generator=rng, dtype=F64)
    with pytest.raises(InexactStepError, match="8 rows.*only 4 trainable parameters"):
        exactgn.gn_direction(model, x, torch.zeros(2, dtype=torch.long), inverse="pinv")


def test_a_dead_relu_column_is_reported_not_hidden(rng):
    model, x, y = draw(rng, 9, hidden=8, bias=True, num_blocks=2)
    with torch.no_grad():
        model.blocks[1].f.proj[:, 0] = 0  # feature 0 of blocks.1.f is zero for every sample: rank 8 < 9
    with pytest.warns(GramFallbackWarning, match="blocks.1.f activation matrix.*8 of 9"):
        res = exactgn.compute_direction(model, x, y, inverse="right")
    assert not res.exact and [s.method for s in res.solves][2] == "svd-fallback"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(inverse="left"), ValueError, "inverse must be one of"),
        (dict(loss="hinge"), ValueError, "loss must be one of"),
        (dict(hessian="fisher"), ValueError, "hessian must be one of"),
        (dict(rtol=-1.0), ValueError, "rtol"),
    ],
)
def test_bad_options(rng, kwargs, error, message):
    model, x, y = draw(rng, 3, hidden=8, bias=True, num_blocks=1)
    with pytest.raises(error, match=message):
        exactgn.gn_direction(model, x, y, **kwargs)


def test_bad_batches(rng):
    model, x, y = draw(rng, 3, hidden=8, bias=True, num_blocks=1)
    with pytest.raises(ValueError, match="lie in \\[0, 2\\]"):
        exactgn.gn_direction(model, x, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="20 features per sample"):
        exactgn.gn_direction(model, x[:, :20], y)
    with pytest.raises(TypeError, match="RevMLP"):
        exactgn.gn_direction(torch.nn.Linear(3, 3), x, y)
    rows = torch.nn.functional.one_hot(y, K).to(F64)
    rows[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        exactgn.gn_direction(model, x, rows, loss="mse")


@pytest.mark.parametrize("how", ["double", "to", "load_state_dict"])
def test_right_inverse_stays_exact_after_a_cast(rng, how):
    """A float32 readout cast to float64 is orthonormal only to ~1e-7: the step must still realise v to 1e-10
    (it was 1e-8 while Uᵀ served as the readout's inverse)."""
    seed = int(torch.randint(0, 2**31 - 1, (), generator=rng))
    m32 = exactgn.RevMLP(D, K, 2, 8, init_std=0.3, seed=seed)
    if how == "double":
        model = m32.double()
    elif how == "to":
        model = m32.to(torch.float64)
    else:
        model = exactgn.RevMLP(D, K, 2, 8, init_std=0.3, seed=seed + 1, dtype=F64)
        model.load_state_dict(m32.state_dict())
    u = model.readout
    assert model.readout.dtype == F64 and (u.T @ u - torch.eye(K, dtype=F64)).norm() > 1e-9
    x = torch.randn(5, D, generator=rng, dtype=F64)
    res = exactgn.compute_direction(model, x, torch.randint(0, K, (5,), generator=rng), inverse="right")
    assert res.exact
    assert relative(jacobian(model, x) @ flat(res.direction, model), res.v.reshape(-1)) <= 1e-10


# ---------------------------------------------------------------------------- precision and scale
def _low_precision_draw(rng, dtype):
    """A ``dtype`` model and batch whose activation matrices have cond ≤ 100, and its exact float64 twin."""
    for _ in range(50):
        seed = int(torch.randint(0, 2**31 - 1, (), generator=rng))
        low = exactgn.RevMLP(256, 10, 2, 128, init_std=1e-3, seed=seed, dtype=dtype)
        x = torch.randn(32, 256, generator=rng).to(dtype)
        twin = exactgn.RevMLP(256, 10, 2, 128, init_std=1e-3, seed=seed, dtype=F64)
        twin.load_state_dict({k: v.double() for k, v in low.state_dict().items()})
        _, records = twin.trace(x.double())
        if all(_cond(torch.cat([r.features, torch.ones(32, 1, dtype=F64)], 1)) <= 100 for r in records):
            return low, twin, x, torch.randint(0, 10, (32,), generator=rng)
    raise AssertionError("no well-conditioned draw")


@pytest.mark.parametrize("inverse", ["right", "pinv"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_get_the_exact_step_rounded_to_their_dtype(rng, dtype, inverse):
    """The step of a float16/bfloat16 model is computed in float32 and rounded once, so against the exact
    float64 step of the same parameters and inputs: relative error ≤ u (rounding) + the float32 bound in
    parameter space, and ≤ u·‖J‖₂‖Δθ‖/‖v‖ + the float32 bound in function space (‖Jδ‖ ≤ ‖J‖₂‖δ‖ for the
    rounding error δ).

    Measured (3 draws each): parameter error 0.42u, function error 0.04u (pinv) to 0.18u (right).
    """
    u, f32_bound = torch.finfo(dtype).eps / 2, exactgn.precision.ERROR_BOUNDS["float32"]
    low, twin, x, y = _low_precision_draw(rng, dtype)
    got = exactgn.compute_direction(low, x, y, inverse=inverse)
    assert got.exact and all(t.dtype == dtype for t in got.direction.values())
    ref = exactgn.compute_direction(twin, x.double(), y, inverse=inverse)
    step = {name: t.double() for name, t in got.direction.items()}
    ref_flat = flat(ref.direction, twin)
    assert relative(flat(step, twin), ref_flat) <= u + f32_bound
    j_norm = torch.linalg.eigvalsh(exactgn.ntk_gram(twin, x.double()))[-1].sqrt()
    lever = float(j_norm * ref_flat.norm() / ref.v.norm())
    assert lever < 10  # the bound below is a few u, not vacuous
    assert relative(exactgn.jvp_logits(twin, x.double(), step), ref.v) <= u * lever + f32_bound
    ntk = exactgn.ntk_gram(low, x)
    assert ntk.dtype == torch.float32 and relative(ntk.double(), exactgn.ntk_gram(twin, x.double())) <= 1e-5


def test_solve_dtype_is_a_name_or_a_torch_dtype(rng):
    model, x, y = draw(rng, 6, hidden=8, bias=True, num_blocks=2)
    model = model.float()
    x = x.float()
    for inverse in ("right", "pinv"):
        named = flat(exactgn.gn_direction(model, x, y, inverse=inverse, solve_dtype="float64"), model)
        typed = flat(exactgn.gn_direction(model, x, y, inverse=inverse, solve_dtype=F64), model)
        single = flat(exactgn.gn_direction(model, x, y, inverse=inverse, solve_dtype=None), model)
        assert torch.equal(named, typed)
        assert not torch.equal(named, single)  # the name really selected float64 solves
    for bad in ("float16", torch.bfloat16, "double", 64):
        with pytest.raises(ValueError, match=r"solve_dtype must be None .*'float32' or 'float64'.*got"):
            exactgn.gn_direction(model, x, y, solve_dtype=bad)


@pytest.mark.parametrize("inverse", ["right", "pinv"])
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e20), (torch.float32, 1e30), (F64, 1e160)])
def test_inputs_whose_grams_overflow_raise_a_non_finite_error(rng, inverse, dtype, scale):
    model = random_model(rng, in_features=D, num_classes=K, num_blocks=2, hidden=8, dtype=dtype)
    x = scale * torch.randn(5, D, generator=rng, dtype=dtype)
    y = torch.randint(0, K, (5,), generator=rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GramFallbackWarning)  # refused before any solve: no fall-back warning
        message = rf"activation Gram A Aᵀ of half-layer blocks.0.f overflows {dtype}.*rescale the inputs"
        with pytest.raises(NonFiniteError, match=message):
            exactgn.gn_direction(model, x, y, inverse=inverse)


def test_logits_that_overflow_raise_a_non_finite_error(rng):
    model = random_model(rng, in_features=D, num_classes=K, num_blocks=2, hidden=8, dtype=torch.float32)
    with torch.no_grad():
        model.readout.mul_(1e38)  # a finite readout whose products overflow float32: |z·U_c| > 3.4 suffices
    x = 1e3 * torch.randn(5, D, generator=rng)  # small for the Grams (1e6·h), large for the logits
    for inverse in ("right", "pinv"):
        with pytest.raises(NonFiniteError, match="logits overflow torch.float32 in the forward.*rescale"):
            exactgn.gn_direction(model, x, torch.randint(0, K, (5,), generator=rng), inverse=inverse)


def test_a_failed_gram_solve_becomes_a_non_finite_error(rng):
    """Weights of 1e20 in the last half-layer: features stay small, but the output cotangents square to ∞ in
    the NTK; torch's LinAlgError comes back as exactgn's NonFiniteError, with the scales that caused it."""
    model = random_model(rng, in_features=D, num_classes=K, num_blocks=2, hidden=16, dtype=torch.float32)
    with torch.no_grad():
        model.blocks[-1].g.weight.mul_(1e20)
    x = torch.randn(6, D, generator=rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GramFallbackWarning)  # the Cholesky of the infinite NTK fails first
        message = r"Gram solve failed \(linalg.eigh.*weights up to [0-9.]+e\+(19|20)"
        with pytest.raises(NonFiniteError, match=message):
            exactgn.gn_direction(model, x, torch.randint(0, K, (6,), generator=rng), inverse="pinv")


def test_a_direction_that_overflows_the_model_dtype_raises(rng):
    model = random_model(rng, in_features=D, num_classes=K, num_blocks=2, hidden=16, dtype=torch.float16)
    x = torch.randn(6, D, generator=rng)
    rows = 1e7 * torch.nn.functional.one_hot(torch.randint(0, K, (6,), generator=rng), K).float()
    for inverse in ("right", "pinv"):
        with pytest.raises(NonFiniteError, match=r"direction of \['blocks.*not finite in torch.float16"):
            exactgn.gn_direction(model, x, rows, loss="mse", inverse=inverse)
