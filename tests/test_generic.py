"""Exact minimum-norm GN for any nn.Module (exactgn.generic) against brute force in float64.

``J`` is built with ``torch.func.jacrev`` over the trainable parameters; ``J⁺v`` with ``torch.linalg.pinv``.
Every check draws a fresh model and batch (the ``rng`` fixture).
"""

from __future__ import annotations

import pytest
import torch
from conftest import relative
from torch import nn
from torch.func import functional_call, jacrev

import exactgn
from exactgn.generic import MemoryBoundError, UnsupportedModelError

F64 = torch.float64


def _seed(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (), generator=rng))


def brute_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Bk × P`` over the trainable parameters, rows ``i·k + c``, columns in ``named_parameters`` order."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    jac = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)
    rows = model(x).numel()
    return torch.cat([jac[n].reshape(rows, -1) for n in params], dim=1)


def flat_trainable(direction: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    return torch.cat([direction[n].reshape(-1) for n, p in model.named_parameters() if p.requires_grad])


# ------------------------------------------------------------ models the library did not define
class Bare(nn.Module):
    """No layers at all: two bare parameters, ``tanh(x W) * s``."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, k, dtype=F64) / d**0.5)
        self.s = nn.Parameter(torch.randn(k, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w) * self.s


class OverSequence(nn.Module):
    """A Linear applied over a sequence dimension (per-sample path), then a Linear on ``B × features``."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B × T × 5
        return self.head(torch.relu(self.token(x)).mean(1))


class Tied(nn.Module):
    """One weight in two Linear modules (tied): the per-sample path must take it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.out = nn.Linear(6, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Reused(nn.Module):
    """A Linear module called twice (weight sharing through repeated calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.mid(torch.tanh(self.mid(h)))))


def _user_sequential(rng):
    torch.manual_seed(_seed(rng))
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 10), nn.SiLU(), nn.Linear(10, 10), nn.Softplus(), nn.Linear(10, 4)
    )
    net[3].requires_grad_(False)  # a frozen layer in the middle
    return net.double(), torch.randn(7, 3, 4, generator=rng, dtype=F64)


def _mlp(activation, bias):
    def make(rng):
        model = exactgn.MLP(12, 3, [10, 9], activation=activation, bias=bias, seed=_seed(rng), dtype=F64)
        return model, torch.randn(6, 12, generator=rng, dtype=F64)

    return make


def _resmlp(hidden):
    def make(rng):
        model = exactgn.ResMLP(8, 3, 2, hidden, init_std=0.3, seed=_seed(rng), dtype=F64)
        return model, torch.randn(6, 8, generator=rng, dtype=F64)

    return make


def _layernorm_mlp(rng):
    torch.manual_seed(_seed(rng))
    net = nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4)).double()
    with torch.no_grad():  # non-trivial affine parameters
        net[1].weight.normal_(1.0, 0.3)
        net[1].bias.normal_(0.0, 0.3)
    return net, torch.randn(8, 10, generator=rng, dtype=F64)


def _conv(batchnorm):
    def make(rng):
        torch.manual_seed(_seed(rng))
        layers = [nn.Conv2d(1, 3, 3, padding=1)]
        layers += [nn.BatchNorm2d(3)] if batchnorm else []
        layers += [nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 5)]
        net = nn.Sequential(*layers).double()
        if batchnorm:
            with torch.no_grad():
                net[1].running_mean.normal_(0.0, 0.1)  # mild: a large shift can kill a channel
                net[1].running_var.uniform_(0.5, 2.0)
            net.eval()
        return net, torch.randn(8, 1, 8, 8, generator=rng, dtype=F64)

    return make


def _bare(rng):
    torch.manual_seed(_seed(rng))
    return Bare(9, 4), torch.randn(5, 9, generator=rng, dtype=F64)


def _simple(cls, shape):
    def make(rng):
        torch.manual_seed(_seed(rng))
        return cls().double(), torch.randn(*shape, generator=rng, dtype=F64)

    return make


MODELS = {
    "mlp-relu-bias": _mlp("relu", True),
    "mlp-relu-nobias": _mlp("relu", False),
    "mlp-tanh-bias": _mlp("tanh", True),
    "mlp-gelu-nobias": _mlp("gelu", False),
    "resmlp": _resmlp(12),
    "resmlp-nobottleneck": _resmlp(None),
    "mlp-layernorm": _layernorm_mlp,
    "convnet": _conv(False),
    "convnet-batchnorm-eval": _conv(True),
    "user-sequential": _user_sequential,
    "bare-parameters": _bare,
    "linear-over-sequence": _simple(OverSequence, (6, 4, 5)),
    "tied-weights": _simple(Tied, (5, 6)),
    "reused-linear": _simple(Reused, (5, 6)),
}


def _targets(rng, batch, k, loss):
    if loss == "mse":
        return torch.randn(batch, k, generator=rng, dtype=F64)
    return torch.randint(0, k, (batch,), generator=rng)


@pytest.mark.parametrize("name", MODELS)
def test_ntk_gram_is_j_jt(rng, name):
    model, x = MODELS[name](rng)
    jac = brute_jacobian(model, x)
    assert relative(exactgn.ntk_gram(model, x), jac @ jac.T) <= 1e-8


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "loss,hessian", [("cross_entropy", "identity"), ("cross_entropy", "exact"), ("mse", "exact")]
)
def test_pinv_step_is_the_moore_penrose_step(rng, name, loss, hessian):
    for _ in range(10):  # precondition: J of full row rank, cond ≤ 1e4 (a ReLU net can draw dead units)
        model, x = MODELS[name](rng)
        jac = brute_jacobian(model, x)
        sv = torch.linalg.svdvals(jac)
        if sv[-1] > 0 and sv[0] / sv[-1] <= 1e4:
            break
    else:
        pytest.fail(f"{name}: no well-conditioned draw in 10")
    k = model(x).shape[1]
    y = _targets(rng, x.shape[0], k, loss)
    result = exactgn.compute_direction(model, x, y, loss=loss, hessian=hessian, inverse="pinv")
    expected = torch.linalg.pinv(jac) @ result.v.reshape(-1)
    assert result.exact
    assert relative(flat_trainable(result.direction, model), expected) <= 1e-8
    rows = exactgn.loss_value(model(x), result.targets, loss)
    assert torch.allclose(result.loss, rows)


def test_direction_names_shapes_and_jvp(rng):
    model, x = _user_sequential(rng)
    direction = exactgn.gn_direction(
        model, x, torch.randint(0, 4, (x.shape[0],), generator=rng), inverse="pinv"
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(direction) == list(trainable)
    assert all(direction[n].shape == p.shape and direction[n].dtype == F64 for n, p in trainable.items())
    delta = {n: torch.randn(p.shape, generator=rng, dtype=F64) for n, p in trainable.items()}
    jvp = exactgn.jvp_logits(model, x, delta)
    assert relative(jvp.reshape(-1), brute_jacobian(model, x) @ flat_trainable(delta, model)) <= 1e-10


def _svd_pinv(a, cut):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    inv = torch.where(s > cut, 1.0 / s, torch.zeros_like(s))
    return vh.T @ (inv[:, None] * u.T)


@pytest.mark.parametrize("reg", [dict(rtol=0.05), dict(atol=0.5), dict(damping=0.3)])
@pytest.mark.parametrize("name", ["mlp-relu-bias", "convnet"])
def test_regularised_step_matches_explicit_svd(rng, name, reg):
    model, x = MODELS[name](rng)
    k = model(x).shape[1]
    result = exactgn.compute_direction(
        model, x, _targets(rng, x.shape[0], k, "mse"), loss="mse", inverse="pinv", **reg
    )
    jac = brute_jacobian(model, x)
    v = result.v.reshape(-1)
    if "damping" in reg:
        expected = jac.T @ torch.linalg.solve(
            jac @ jac.T + reg["damping"] * torch.eye(jac.shape[0], dtype=F64), v
        )
    else:
        smax = torch.linalg.matrix_norm(jac, 2)
        expected = _svd_pinv(jac, max(reg.get("rtol", 0) * smax, reg.get("atol", 0))) @ v
    assert relative(flat_trainable(result.direction, model), expected) <= 1e-8


def test_least_squares_above_the_parameter_count_is_the_pseudo_inverse(rng):
    torch.manual_seed(_seed(rng))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()  # 26 parameters
    x = torch.randn(20, 3, generator=rng, dtype=F64)  # 40 rows
    y = torch.randn(20, 2, generator=rng, dtype=F64)
    with pytest.raises(exactgn.InexactStepError, match="only 26 trainable parameters"):
        exactgn.gn_direction(model, x, y, loss="mse", inverse="pinv")
    result = exactgn.compute_direction(model, x, y, loss="mse", inverse="pinv", least_squares=True)
    expected = torch.linalg.pinv(brute_jacobian(model, x)) @ result.v.reshape(-1)
    assert result.solves[0].rank == 26
    assert relative(flat_trainable(result.direction, model), expected) <= 1e-8


def test_float64_solves_of_a_float32_model(rng):
    model64 = exactgn.MLP(12, 3, [10, 9], seed=_seed(rng), dtype=F64)
    model32 = exactgn.MLP(**model64.config(), dtype=torch.float32)
    x = torch.randn(6, 12, generator=rng, dtype=F64)
    y = torch.randint(0, 3, (6,), generator=rng)
    ref = flat_trainable(exactgn.gn_direction(model64, x, y, inverse="pinv"), model64)
    got = exactgn.gn_direction(model32, x.float(), y, inverse="pinv", solve_dtype=F64)
    assert all(t.dtype == torch.float32 for t in got.values())
    assert relative(flat_trainable(got, model32).double(), ref) <= exactgn.precision.ERROR_BOUNDS["float32"]


@pytest.mark.parametrize("bound", [9000, 20000, 50000])
def test_memory_bound_chunks_give_the_same_gram(rng, bound):
    model, x = _conv(False)(rng)
    y = torch.randint(0, 5, (x.shape[0],), generator=rng)
    jac = brute_jacobian(model, x)
    gram = exactgn.generic_ntk_gram(model, x, memory_bound=bound)
    assert relative(gram, jac @ jac.T) <= 1e-8
    result = exactgn.generic_direction(model, x, y, memory_bound=bound)
    expected = torch.linalg.pinv(jac) @ result.v.reshape(-1)
    assert relative(flat_trainable(result.direction, model), expected) <= 1e-8


def test_structured_false_gives_the_same_step(rng):
    model, x = _mlp("relu", True)(rng)
    y = torch.randint(0, 3, (x.shape[0],), generator=rng)
    a = exactgn.generic_direction(model, x, y).direction
    b = exactgn.generic_direction(model, x, y, structured=False).direction
    assert relative(flat_trainable(a, model), flat_trainable(b, model)) <= 1e-10


def test_gauss_newton_optimiser_steps_an_mlp(rng):
    model, x = _layernorm_mlp(rng)
    y = torch.randint(0, 4, (x.shape[0],), generator=rng)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    jac, logits = brute_jacobian(model, x), model(x).detach()
    v = exactgn.newton_target(logits, torch.nn.functional.one_hot(y, 4).double(), "cross_entropy", "identity")
    opt = exactgn.GaussNewton(model, lr=0.5, inverse="pinv")
    loss = opt.step(x, y)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert relative(before - after, 0.5 * torch.linalg.pinv(jac) @ v.reshape(-1)) <= 1e-8
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, y))


# ------------------------------------------------------------ what cannot be exact: clear errors
def test_batchnorm_in_training_mode_is_refused(rng):
    model, x = _conv(True)(rng)
    model.train()
    with pytest.raises(
        UnsupportedModelError, match=r"module '1' \(BatchNorm2d\) is in training mode.*model.eval"
    ):
        exactgn.gn_direction(model, x, torch.zeros(8, dtype=torch.long), inverse="pinv")
    with pytest.raises(UnsupportedModelError, match="BatchNorm2d"):
        exactgn.ntk_gram(model, x)


def test_dropout_in_training_mode_is_refused(rng):
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2)).double()
    with pytest.raises(UnsupportedModelError, match=r"'1' \(Dropout, p=0.2\).*model.eval"):
        exactgn.ntk_gram(model, torch.randn(3, 4, generator=rng, dtype=F64))
    model.eval()
    x = torch.randn(3, 4, generator=rng, dtype=F64)
    jac = brute_jacobian(model, x)
    assert relative(exactgn.ntk_gram(model, x), jac @ jac.T) <= 1e-8


class Centred(nn.Module):
    """Subtracts the batch mean after a per-sample parameter: samples interact."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(5, dtype=F64))
        self.out = nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x * self.scale)
        return self.out(h - h.mean(0))


def test_interacting_samples_are_refused(rng):
    with pytest.raises(UnsupportedModelError, match="samples interact"):
        exactgn.ntk_gram(Centred(), torch.randn(4, 5, generator=rng, dtype=F64))


class FunctionalReuse(nn.Module):
    """A Linear whose weight is also used outside its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5).double()
        self.out = nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        return self.out(h + torch.tanh(h @ self.lin.weight.T))


def test_weights_used_outside_their_layer_are_caught(rng):
    model, x = FunctionalReuse(), torch.randn(4, 5, generator=rng, dtype=F64)
    with pytest.raises(UnsupportedModelError, match=r"nn.Linear 'lin'.*structured=False"):
        exactgn.ntk_gram(model, x)
    jac = brute_jacobian(model, x)
    assert relative(exactgn.generic_ntk_gram(model, x, structured=False), jac @ jac.T) <= 1e-8


def test_unmeetable_memory_bound(rng):
    model, x = _conv(False)(rng)
    with pytest.raises(
        MemoryBoundError, match=r"'0.weight' \(\(3, 1, 3, 3\)\) needs 2160 bytes.*memory_bound=2000"
    ):
        exactgn.generic_ntk_gram(model, x, memory_bound=2000)
    with pytest.raises(ValueError, match="memory_bound must be a positive"):
        exactgn.generic_ntk_gram(model, x, memory_bound=0)


def test_right_inverse_is_refused_for_other_models(rng):
    model, x = _mlp("relu", True)(rng)
    y = torch.zeros(x.shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match="inverse='right'.*only for an exactgn.RevMLP.*inverse='pinv'"):
        exactgn.gn_direction(model, x, y)
    with pytest.raises(ValueError, match="inverse='right'.*only for an exactgn.RevMLP.*inverse='pinv'"):
        exactgn.GaussNewton(model)


def test_bad_models_and_inputs(rng):
    x = torch.randn(3, 4, generator=rng, dtype=F64)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        exactgn.ntk_gram(lambda t: t, x)
    frozen = nn.Linear(4, 2).double().requires_grad_(False)
    with pytest.raises(UnsupportedModelError, match="no trainable parameters"):
        exactgn.ntk_gram(frozen, x)
    with pytest.raises(UnsupportedModelError, match=r"logits of shape \(B, k\) = \(3, k\); got \(3, 2, 1\)"):
        exactgn.ntk_gram(nn.Sequential(nn.Linear(4, 2), nn.Unflatten(1, (2, 1))).double(), x)
    with pytest.raises(ValueError, match="NaN"):
        exactgn.ntk_gram(nn.Linear(4, 2).double(), torch.full((3, 4), float("nan")))
    with pytest.raises(ValueError, match="non-empty batch"):
        exactgn.ntk_gram(nn.Linear(4, 2).double(), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="class labels must lie"):
        exactgn.gn_direction(nn.Linear(4, 2).double(), x, torch.tensor([0, 1, 2]), inverse="pinv")
    with pytest.raises(KeyError, match="nope"):
        exactgn.jvp_logits(nn.Linear(4, 2).double(), x, {"nope": torch.zeros(1)})


def test_gn_step_flops_of_an_mlp():
    model = exactgn.MLP(30, 4, [20, 16])
    batch, k = 12, 4
    flops = exactgn.gn_step_flops(model, torch.randn(batch, 30))
    layers = [(30, 20), (20, 16), (16, 4)]
    forward = sum(2 * batch * a * b for a, b in layers)
    backward = forward + sum(2 * batch * a * b for a, b in layers[1:])
    tri, size = 9 / 16, batch * k
    grams = sum(2 * batch**2 * a * tri + batch**2 for a, _ in layers)
    grams += sum(2 * size**2 * b * tri + size**2 * tri for _, b in layers[:2])
    check = sum(2 * size * b for _, b in layers[:2]) + sum(2 * batch * a * b for a, b in layers)
    gn = forward + k * (backward - forward) + backward + grams + check + size**3 / 3 + 8 * size**2
    assert flops == pytest.approx({"forward": forward, "adam_step": forward + backward, "gn_pinv_step": gn})
