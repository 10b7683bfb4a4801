"""GaussNewton as a torch optimiser: the update rule, schedulers, state_dict, refusal of non-finite steps."""

from __future__ import annotations

import pytest
import torch
from conftest import flat, random_model

import exactgn
from exactgn.errors import NonFiniteError

F64 = torch.float64


def _setup(rng, batch=6, **kw):
    model = random_model(rng, in_features=24, num_classes=3, num_blocks=2, hidden=16, **kw)
    x = torch.randn(batch, 24, generator=rng, dtype=F64)
    y = torch.randint(0, 3, (batch,), generator=rng)
    return model, x, y


@pytest.mark.parametrize("inverse", ["right", "pinv"])
def test_step_is_theta_minus_lr_times_direction_plus_decay(rng, inverse):
    model, x, y = _setup(rng)
    before = flat(dict(model.named_parameters()), model).detach().clone()
    direction = flat(exactgn.gn_direction(model, x, y, inverse=inverse, damping=0.1), model)
    opt = exactgn.GaussNewton(model, lr=0.3, inverse=inverse, damping=0.1, weight_decay=0.05)
    loss = opt.step(x, y)
    after = flat(dict(model.named_parameters()), model).detach()
    assert torch.allclose(after, before - 0.3 * (direction + 0.05 * before), rtol=1e-12, atol=1e-14)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(opt.last_result.logits, y).item())
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())


def test_parameter_groups_use_their_own_learning_rates(rng):
    model, x, y = _setup(rng)
    first = [p for n, p in model.named_parameters() if n.startswith("blocks.0")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("blocks.0")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    direction = exactgn.gn_direction(model, x, y)
    opt = exactgn.GaussNewton(model, lr=0.5, params=[{"params": first, "lr": 0.1}, {"params": rest}])
    opt.step(x, y)
    for n, p in model.named_parameters():
        lr = 0.1 if n.startswith("blocks.0") else 0.5
        assert torch.allclose(p, before[n] - lr * direction[n], rtol=1e-12, atol=1e-14), n
    with pytest.raises(ValueError, match="must own every trainable parameter"):
        exactgn.GaussNewton(model, params=first)
    opt = exactgn.GaussNewton(model, params=[{"params": first, "inverse": "pinv"}, {"params": rest}])
    with pytest.raises(ValueError, match="share 'inverse'"):
        opt.step(x, y)


def test_learning_rate_schedulers_drive_the_step(rng):
    model, x, y = _setup(rng)
    opt = exactgn.GaussNewton(model, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for expected in (1.0, 0.5, 0.25):
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)
        before = flat(dict(model.named_parameters()), model).detach().clone()
        direction = flat(exactgn.gn_direction(model, x, y), model)
        opt.step(x, y)
        sched.step()
        after = flat(dict(model.named_parameters()), model).detach()
        assert torch.allclose(after, before - expected * direction, rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip(rng):
    model, x, y = _setup(rng)
    opt = exactgn.GaussNewton(
        model, lr=0.2, inverse="pinv", rtol=1e-3, weight_decay=1e-4, solve_dtype="float64"
    )
    opt.step(x, y)
    saved = opt.state_dict()
    clone = random_model(rng, in_features=24, num_classes=3, num_blocks=2, hidden=16)
    clone.load_state_dict(model.state_dict())
    restored = exactgn.GaussNewton(clone)  # defaults differ: everything must come from the state dict
    restored.load_state_dict(saved)
    for key in ("lr", "inverse", "rtol", "weight_decay", "solve_dtype"):
        assert restored.param_groups[0][key] == opt.param_groups[0][key]
    opt.step(x, y)
    restored.step(x, y)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    assert all(restored.state[p]["step"] == 2 for p in clone.parameters())


def test_noise_is_scaled_to_the_direction(rng):
    model, x, y = _setup(rng, batch=8)
    direction = exactgn.gn_direction(model, x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
    opt = exactgn.GaussNewton(model, lr=1.0, noise=0.5)
    opt.step(x, y)
    standard = []  # every noise draw divided by the standard deviation it should have: 816 draws
    for name, p in model.named_parameters():
        xi = before[name] - p.detach() - direction[name]
        standard.append((xi / (0.5 * direction[name].pow(2).mean().sqrt())).reshape(-1))
    standard = torch.cat(standard)
    assert standard.std().item() == pytest.approx(1.0, abs=0.1)  # sampling error of the std: 2.5%
    assert abs(standard.mean().item()) < 0.15  # sampling error of the mean: 3.5%


def test_a_step_that_would_overflow_changes_nothing(rng):
    model, x, y = _setup(rng)
    before = [p.detach().clone() for p in model.parameters()]
    rows = 1e10 * torch.nn.functional.one_hot(y, 3).to(F64)  # MSE towards huge targets: a huge direction
    assert max(t.abs().max() for t in exactgn.gn_direction(model, x, rows, loss="mse").values()) > 1e9
    opt = exactgn.GaussNewton(model, lr=1e300, loss="mse")  # lr·d overflows float64
    with pytest.raises(NonFiniteError, match="left unchanged"):
        opt.step(x, rows)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all("step" not in opt.state[p] for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), r"lr must be a finite number > 0, got -1.0$"),
        (dict(lr=0.0), r"lr must be a finite number > 0, got 0.0: the optimiser would never move"),
        (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
        (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
        (dict(lr=torch.tensor(0.0)), "lr must be a finite number > 0"),
        (dict(lr="0.1"), "lr must be a finite number > 0, got '0.1'"),
        (dict(lr=True), "lr must be a finite number > 0, got True"),
        (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0, got -0.1"),
        (dict(noise=float("inf")), "noise must be a finite number >= 0, got inf"),
        (dict(inverse="cg"), "inverse must be one of 'right', 'pinv'; got 'cg'"),
        (dict(loss="hinge"), "loss must be one of 'cross_entropy', 'mse'; got 'hinge'"),
        (dict(hessian=None), "hessian must be one of 'exact', 'identity'; got None"),
        (dict(solve_dtype="float16"), "solve_dtype must be None .* got 'float16'; the Gram factorisations"),
        (dict(solve_dtype=torch.bfloat16), "solve_dtype must be None .* got torch.bfloat16"),
        (dict(damping=-1.0), "damping must be a finite number >= 0, got -1.0"),
        (dict(rtol=float("nan")), "rtol must be a finite number >= 0, got nan"),
        (dict(least_squares="yes"), "least_squares must be True or False, got 'yes'"),
    ],
)
def test_bad_hyper_parameters(rng, kwargs, message):
    model, _, _ = _setup(rng)
    with pytest.raises(ValueError, match=message):
        exactgn.GaussNewton(model, **kwargs)
    with pytest.raises(TypeError, match="exists only for an exactgn.RevMLP.*got Linear.*inverse=.pinv."):
        exactgn.GaussNewton(torch.nn.Linear(2, 2), **{**kwargs, "inverse": "right"})  # checked first


def test_a_scheduler_may_anneal_the_rate_to_zero(rng):
    model, x, y = _setup(rng)
    opt = exactgn.GaussNewton(model, lr=0.5)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)  # lr 0 from the start: allowed once built
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.param_groups[0]["lr"] = -0.1
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -0.1"):
        opt.step(x, y)


def test_solve_dtype_may_be_a_torch_dtype_and_is_stored_by_name(rng):
    model, x, y = _setup(rng)
    twin = random_model(rng, in_features=24, num_classes=3, num_blocks=2, hidden=16)
    twin.load_state_dict(model.state_dict())
    model, twin = model.float(), twin.float()
    typed = exactgn.GaussNewton(model, lr=0.5, solve_dtype=F64)
    named = exactgn.GaussNewton(twin, lr=0.5, solve_dtype="torch.float64")
    assert typed.param_groups[0]["solve_dtype"] == named.param_groups[0]["solve_dtype"] == "float64"
    typed.step(x.float(), y)
    named.step(x.float(), y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_take_the_rounded_step(rng, dtype):
    model = random_model(
        rng, in_features=24, num_classes=3, num_blocks=2, hidden=16, init_std=0.1, dtype=dtype
    )
    x = torch.randn(6, 24, generator=rng)
    y = torch.randint(0, 3, (6,), generator=rng)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    direction = exactgn.gn_direction(model, x, y)
    assert all(d.dtype == dtype and torch.isfinite(d).all() for d in direction.values())
    opt = exactgn.GaussNewton(model, lr=0.5)
    opt.step(x, y)
    for name, p in model.named_parameters():
        assert p.dtype == dtype and torch.equal(p, before[name] - 0.5 * direction[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("inverse", ["right", "pinv"])
def test_full_batch_mse_fits_in_a_few_steps(rng, inverse):
    """Over-parameterised (B well below every rank bound) MSE with lr = 1: GN converges quadratically.

    (Worst of 200 draws, measured: 6e-8 of the initial loss after three steps.)
    """
    model = random_model(rng, in_features=40, num_classes=3, num_blocks=2, hidden=32, init_std=1e-3)
    x = torch.randn(6, 40, generator=rng, dtype=F64)
    y = torch.randint(0, 3, (6,), generator=rng)
    opt = exactgn.GaussNewton(model, lr=1.0, loss="mse", inverse=inverse)
    first = opt.step(x, y).item()
    for _ in range(2):
        opt.step(x, y)
    final = exactgn.loss_value(model(x), torch.nn.functional.one_hot(y, 3).to(F64), "mse").item()
    assert final < 1e-4 * first


def test_a_float16_step_that_would_overflow_changes_nothing(rng):
    """The in-place update is taken only when ``max|p| + lr·max|d|`` cannot overflow the parameters' dtype."""
    model = random_model(rng, in_features=24, num_classes=3, num_blocks=2, hidden=16, dtype=torch.float16)
    x = torch.randn(6, 24, generator=rng).half()
    y = torch.randint(0, 3, (6,), generator=rng)
    before = [p.detach().clone() for p in model.parameters()]
    biggest = max(t.abs().max().item() for t in exactgn.gn_direction(model, x, y, inverse="pinv").values())
    opt = exactgn.GaussNewton(model, lr=2 * 65504 / biggest, inverse="pinv")  # lr·d beyond float16's max
    with pytest.raises(NonFiniteError, match="left unchanged"):
        opt.step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt = exactgn.GaussNewton(model, lr=0.5, inverse="pinv")
    opt.step(x, y)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
