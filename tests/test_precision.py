"""Accuracy of every precision option against a float64 reference, within exactgn.precision.ERROR_BOUNDS.

TF32 has no effect on the CPU, so it is emulated here: every matrix product's float32 operands are rounded to
TF32's 10-bit mantissa (round to nearest even) and accumulated in float32, as tensor cores do.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import exactgn
from exactgn.precision import ERROR_BOUNDS, matmul_precision, unit_roundoff

F64 = torch.float64
_PRODUCTS = {
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.einsum,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
}


def to_tf32(t):
    """Round float32 values to TF32 (1 sign, 8 exponent, 10 mantissa bits), round to nearest even."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


class EmulatedTF32(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PRODUCTS:
            args = tuple(to_tf32(a) for a in args)
        return func(*args, **(kwargs or {}))


def test_tf32_rounding_emulation():
    x = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-12], dtype=torch.float32)
    assert to_tf32(x).tolist() == [1.0, 1 + 2**-10, 1.0, 1 + 2**-9, 1.0]  # ties to even


def test_matmul_precision_flag_and_unit_roundoff():
    with matmul_precision(True):
        assert unit_roundoff(torch.float32) == 2.0**-11
        assert unit_roundoff(F64) == torch.finfo(F64).eps / 2
    with matmul_precision(False):
        assert unit_roundoff(torch.float32) == torch.finfo(torch.float32).eps / 2


def _well_conditioned(rng):
    """A float32 model and batch whose activation matrices all have cond ≤ 100, with its float64 twin."""
    for _ in range(50):
        seed = int(torch.randint(0, 2**31 - 1, (), generator=rng))
        m32 = exactgn.RevMLP(256, 10, 2, 128, init_std=1e-3, seed=seed)
        x = torch.randn(32, 256, generator=rng)
        _, records = exactgn.RevMLP(256, 10, 2, 128, init_std=1e-3, seed=seed, dtype=F64).trace(x.double())
        conds = []
        for rec in records:
            a = torch.cat([rec.features, torch.ones(32, 1, dtype=F64)], 1)
            s = torch.linalg.svdvals(a)
            conds.append((s[0] / s[-1]).item())
        if max(conds) <= 100:
            m64 = exactgn.RevMLP(256, 10, 2, 128, init_std=1e-3, seed=seed, dtype=F64)
            m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
            return m32, m64, x, torch.randint(0, 10, (32,), generator=rng)
    raise AssertionError("no well-conditioned draw")


@pytest.mark.parametrize("inverse", ["right", "pinv"])
@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("solve_dtype", [None, F64])
def test_float32_and_tf32_directions_stay_within_the_documented_bounds(rng, inverse, tf32, solve_dtype):
    m32, m64, x, y = _well_conditioned(rng)
    ref = exactgn.compute_direction(m64, x.double(), y, inverse=inverse)
    with matmul_precision(tf32):
        if tf32:
            with EmulatedTF32():
                got = exactgn.compute_direction(m32, x, y, inverse=inverse, solve_dtype=solve_dtype)
        else:
            got = exactgn.compute_direction(m32, x, y, inverse=inverse, solve_dtype=solve_dtype)
    assert got.exact  # the accuracy check accepted the Cholesky solves: no fall-back at this precision
    bound = ERROR_BOUNDS["tf32" if tf32 else "float32"]
    direction = {n: t.double() for n, t in got.direction.items()}
    realised = exactgn.jvp_logits(m64, x.double(), direction)
    assert ((realised - ref.v).norm() / ref.v.norm()).item() <= bound
    flat_got = torch.cat([t.reshape(-1) for t in direction.values()])
    flat_ref = torch.cat([t.reshape(-1) for t in ref.direction.values()])
    assert ((flat_got - flat_ref).norm() / flat_ref.norm()).item() <= bound


def test_float64_bound_is_the_design_bound():
    assert ERROR_BOUNDS["float64"] == 1e-10  # DESIGN §4; tests/test_gn.py checks it on every configuration


@pytest.mark.parametrize("batch, bound", [(128, 4e-6), (256, 4e-5)])
def test_float32_right_step_on_real_mnist_batches(rng, batch, bound):
    """Real MNIST (the bundled subset), d = 784, h = 1024, L = 2, float32: the right step realises v to
    u·cond(A), measured in float64. cond(A) is ~1.5e2 at B = 128 and ~1e4 at B = 256 (the identity first
    block), where the Gram-only solves gave 0.8–1.1e-5 and 0.13; these (QR where needed) give ~1e-6 and
    ~5e-6."""
    from exactgn.lab.data import normalise, read_bundled_mnist

    raw = read_bundled_mnist()
    idx = torch.randperm(len(raw.train.labels), generator=rng)[:batch].numpy()
    x = normalise(raw.train.images[idx], "mnist").reshape(batch, -1)
    y = torch.from_numpy(raw.train.labels[idx])
    seed = int(torch.randint(0, 2**31 - 1, (), generator=rng))
    m32 = exactgn.RevMLP(784, 10, 2, 1024, seed=seed)
    m64 = exactgn.RevMLP(784, 10, 2, 1024, seed=seed, dtype=F64)
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    res = exactgn.compute_direction(m32, x, y, inverse="right")
    assert res.exact
    realised = exactgn.jvp_logits(m64, x.double(), {n: t.double() for n, t in res.direction.items()})
    v = res.v.double()
    assert ((realised - v).norm() / v.norm()).item() <= bound
