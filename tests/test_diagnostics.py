"""Diagnostics (DESIGN §5) against float64 brute-force references: kernel alignment, CKA, weights, recorder,
diagnose."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import jacobian, random_model

import exactgn
from exactgn.cli import main as cli_main
from exactgn.lab import diagnostics as dg

F64 = torch.float64


def _psd(rng: torch.Generator, n: int, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(n, rank or n, generator=rng, dtype=F64)
    return a @ a.T


def _orthogonal(rng: torch.Generator, p: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(p, p, generator=rng, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


# ---------------------------------------------------------------------------- kernel alignment and NTK rate
def test_kernel_alignment_self_scaling_and_different(rng):
    k = _psd(rng, 12)
    assert dg.kernel_alignment(k, k) == pytest.approx(1.0, abs=1e-14)
    for scale in (1e-6, 0.37, 5.0, 1e6):
        assert dg.kernel_alignment(k, scale * k) == pytest.approx(1.0, abs=1e-14)
        assert dg.kernel_alignment(scale * k, k) == pytest.approx(1.0, abs=1e-14)
    other = _psd(rng, 12)
    value = dg.kernel_alignment(k, other)
    brute = float(torch.trace(k @ other) / torch.sqrt(torch.trace(k @ k) * torch.trace(other @ other)))
    assert value == pytest.approx(brute, rel=1e-12)
    assert value < 1 - 1e-3
    assert dg.kernel_alignment(k, -k) == pytest.approx(-1.0, abs=1e-14)


def test_one_minus_alignment_is_accurate_near_one(rng):
    # Lazy training moves the NTK by tiny amounts, so 1 − alignment (the rate of change) must be accurate
    # where the
    # alignment is within ~1e-13 of 1. Reference without cancellation: with a, b the flattened kernels,
    # 1 − cos = s/(1 + cos) where s = sin² = Σ_{i<j}(a_i b_j − a_j b_i)² / (‖a‖²‖b‖²) (Lagrange's identity).
    k = _psd(rng, 4)
    kt = k + 1e-6 * _psd(rng, 4)
    a, b = k.reshape(-1), kt.reshape(-1)
    cross = (a[:, None] * b[None, :] - a[None, :] * b[:, None]).square().sum() / 2
    sin2 = float(cross / (a.square().sum() * b.square().sum()))
    cos = math.sqrt(1 - sin2)
    want = sin2 / (1 + cos)
    assert 1e-16 < want < 1e-10
    assert dg.ntk_rate(k, kt, 1) == pytest.approx(
        want, rel=1e-6
    )  # 1 − alignment, computed without cancellation
    assert 1 - dg.kernel_alignment(k, kt) == pytest.approx(
        want, abs=1e-15
    )  # the alignment itself: to rounding
    assert dg.kernel_alignment(k, k) == 1.0 and dg.weight_cosine(k, k) == 1.0


def test_kernel_alignment_rejects_bad_shapes(rng):
    with pytest.raises(ValueError, match="same shape"):
        dg.kernel_alignment(_psd(rng, 3), _psd(rng, 4))
    with pytest.raises(ValueError, match="square"):
        dg.kernel_alignment(torch.ones(3, 4), torch.ones(3, 4))


def test_ntk_rate_is_one_minus_alignment_per_epoch(rng):
    k0, k1 = _psd(rng, 8), _psd(rng, 8)
    align = dg.kernel_alignment(k0, k1)
    assert dg.ntk_rate(k0, k1, 1) == pytest.approx(1 - align, rel=1e-12)
    assert dg.ntk_rate(k0, k1, 4) == pytest.approx((1 - align) / 4, rel=1e-12)
    assert dg.ntk_rate(k0, 3.0 * k0, 2) == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(ValueError, match="epochs_elapsed"):
        dg.ntk_rate(k0, k1, 0)


def test_ntk_probe_cosine_matches_explicit_vector(rng):
    k0, kt = _psd(rng, 10), _psd(rng, 10)
    w = torch.randn(10, generator=rng, dtype=F64)
    a, b = k0 @ w, kt @ w
    assert dg.ntk_probe_cosine(k0, kt, w) == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-12)
    # Default vector: the seeded probe_vector; an estimate, so it differs from the alignment.
    w0 = dg.probe_vector(10, seed=3)
    assert dg.ntk_probe_cosine(k0, kt, seed=3) == pytest.approx(dg.ntk_probe_cosine(k0, kt, w0), rel=1e-14)
    assert dg.ntk_probe_cosine(k0, kt, seed=3) != pytest.approx(dg.kernel_alignment(k0, kt), abs=1e-6)
    assert dg.ntk_probe_cosine(k0, 2.5 * k0, w) == pytest.approx(1.0, abs=1e-14)


# ---------------------------------------------------------------------------- linear CKA
def _cka_brute(x: torch.Tensor, y: torch.Tensor) -> float:
    """Biased linear CKA from explicit HSIC with the centring matrix H = I − 11ᵀ/n (float64)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=F64) - torch.full((n, n), 1.0 / n, dtype=F64)
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def _hsic_u_statistic(k: torch.Tensor, l: torch.Tensor) -> float:
    """Unbiased HSIC as the U-statistic over distinct index tuples (the definition of Song et al. 2012):

    E[k_ij l_ij] + E[k_ij] E[l_qr] − 2 E[k_ij l_iq], each average over tuples of distinct indices.
    """
    n = k.shape[0]
    idx = range(n)
    t1 = sum(float(k[i, j] * l[i, j]) for i, j in itertools.permutations(idx, 2)) / math.perm(n, 2)
    t2 = sum(float(k[i, j] * l[q, r]) for i, j, q, r in itertools.permutations(idx, 4)) / math.perm(n, 4)
    t3 = sum(float(k[i, j] * l[i, q]) for i, j, q in itertools.permutations(idx, 3)) / math.perm(n, 3)
    return t1 + t2 - 2 * t3


@pytest.mark.parametrize("p,q", [(3, 5), (40, 70)])  # features fewer / more than samples: both code paths
def test_linear_cka_matches_brute_force(rng, p, q):
    n = 20
    x = torch.randn(n, p, generator=rng, dtype=F64) + 3.0  # offset: centring must matter
    y = x[:, :1] * torch.randn(1, q, generator=rng, dtype=F64) + torch.randn(n, q, generator=rng, dtype=F64)
    assert dg.linear_cka(x, y) == pytest.approx(_cka_brute(x, y), rel=1e-12)
    assert dg.linear_cka(y, x) == pytest.approx(dg.linear_cka(x, y), rel=1e-12)


def test_unbiased_cka_matches_u_statistic(rng):
    n = 7
    x = torch.randn(n, 3, generator=rng, dtype=F64)
    y = x @ torch.randn(3, 4, generator=rng, dtype=F64) + 0.5 * torch.randn(n, 4, generator=rng, dtype=F64)
    k, l = (
        x @ x.T,
        y @ y.T,
    )  # the unbiased HSIC is invariant to centring the features: uncentred Grams are fine
    brute = _hsic_u_statistic(k, l) / math.sqrt(_hsic_u_statistic(k, k) * _hsic_u_statistic(l, l))
    assert dg.linear_cka(x, y, unbiased=True) == pytest.approx(brute, rel=1e-10)


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_invariances(rng, unbiased):
    n, p = 30, 12
    x = torch.randn(n, p, generator=rng, dtype=F64)
    q = _orthogonal(rng, p)
    assert dg.linear_cka(x, x @ q, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)
    assert dg.linear_cka(x, 7.5 * (x @ q) + 2.0, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)
    assert dg.linear_cka(x, 1e-4 * x, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)
    # Not invariant to a general (anisotropic) linear map: a check that can fail.
    scale = torch.ones(p, dtype=F64)
    scale[0] = 30.0
    assert dg.linear_cka(x, x * scale, unbiased=unbiased) < 0.99


def test_unbiased_cka_near_zero_for_independent_gaussians(rng):
    # n = p = q = 256 independent N(0, 1) entries. The biased CKA concentrates near p/(p + n) = 0.5 (its HSIC
    # has a
    # positive bias of order p·q/n that does not shrink with p), measured over 200 draws: mean 0.500, minimum
    # 0.490.
    # The unbiased estimator has mean 0 and a standard deviation of about 0.006 at this size (largest |value|
    # over
    # 200 draws 0.015), so |value| < 0.05 is an 8-sigma bound, and biased > 0.4 holds by a margin of ~15
    # sigma.
    n = p = 256
    x = torch.randn(n, p, generator=rng, dtype=F64)
    y = torch.randn(n, p, generator=rng, dtype=F64)
    assert abs(dg.linear_cka(x, y, unbiased=True)) < 0.05
    assert dg.linear_cka(x, y) > 0.4


def test_linear_cka_errors_and_degenerate(rng):
    with pytest.raises(ValueError, match="same samples"):
        dg.linear_cka(torch.randn(5, 2, dtype=F64), torch.randn(6, 2, dtype=F64))
    with pytest.raises(ValueError, match="at least 4"):
        dg.linear_cka(torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64), unbiased=True)
    assert math.isnan(dg.linear_cka(torch.ones(5, 3, dtype=F64), torch.randn(5, 2, generator=rng, dtype=F64)))


# ---------------------------------------------------------------------------- block outputs and
# representation CKA
def test_block_outputs_are_the_states(rng):
    model = random_model(rng, in_features=12, num_classes=3, num_blocks=3, hidden=16)
    x = torch.randn(9, 12, generator=rng, dtype=F64)
    outs = dg.block_outputs(model, x)
    assert len(outs) == 3 and all(o.shape == (9, 12) for o in outs)
    torch.testing.assert_close(outs[-1], model.state(x), rtol=0, atol=0)
    incs = dg.block_increments(model, x)
    torch.testing.assert_close(x + sum(incs), outs[-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(incs[1], outs[1] - outs[0], rtol=0, atol=0)
    # The first block's output by hand: a' = a + F(b), b' = b + G(a').
    a, b = x[:, :6], x[:, 6:]
    blk = model.blocks[0]
    a1 = a + (b @ blk.f.proj) @ blk.f.weight.T + blk.f.bias
    b1 = b + (a1 @ blk.g.proj) @ blk.g.weight.T + blk.g.bias  # identity activation in the first block
    torch.testing.assert_close(outs[0], torch.cat([a1, b1], 1), rtol=1e-12, atol=1e-12)


def test_representation_cka_between_models(rng):
    m1 = random_model(rng, in_features=10, num_classes=2, num_blocks=2, hidden=12)
    m2 = random_model(rng, in_features=10, num_classes=2, num_blocks=2, hidden=12)
    x = torch.randn(15, 10, generator=rng, dtype=F64)
    same = dg.representation_cka(m1, m1, x)
    assert same == pytest.approx({"block0": 1.0, "block1": 1.0}, abs=1e-12)
    other = dg.representation_cka(m1, m2, x, unbiased=True)
    o1, o2 = dg.block_outputs(m1, x), dg.block_outputs(m2, x)
    assert other["block1"] == pytest.approx(dg.linear_cka(o1[1], o2[1], unbiased=True), rel=1e-12)
    deeper = random_model(rng, in_features=10, num_classes=2, num_blocks=3, hidden=12)
    with pytest.raises(ValueError, match="different depths"):
        dg.representation_cka(m1, deeper, x)


# ---------------------------------------------------------------------------- weights
def test_weight_metrics_hand_built():
    w0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    wt = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    assert dg.weight_rel_change(wt, w0) == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert dg.weight_cosine(wt, w0) == pytest.approx(3 / (math.sqrt(5) * math.sqrt(2)), rel=1e-15)
    assert dg.weight_rel_change(-w0, w0) == pytest.approx(2.0)
    assert dg.weight_cosine(-w0, w0) == pytest.approx(-1.0)
    assert dg.weight_rel_change(3 * w0, w0) == pytest.approx(2.0)
    assert dg.weight_cosine(3 * w0, w0) == pytest.approx(1.0)
    orth = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)
    assert dg.weight_cosine(orth, w0) == pytest.approx(0.0, abs=1e-15)
    assert dg.weight_rel_change(w0 + orth, w0) == pytest.approx(1.0)
    assert dg.weight_rel_change(w0, torch.zeros(2, 2, dtype=F64)) == math.inf
    assert math.isnan(dg.weight_rel_change(torch.zeros(2, 2), torch.zeros(2, 2)))
    assert math.isnan(dg.weight_cosine(w0, torch.zeros(2, 2, dtype=F64)))
    with pytest.raises(ValueError, match="same shape"):
        dg.weight_cosine(w0, torch.zeros(3, 2))


def test_weight_metrics_per_half_layer_excludes_bias(rng):
    m0 = random_model(rng, in_features=8, num_classes=2, num_blocks=2, hidden=6)
    mt = exactgn.RevMLP(**m0.config(), dtype=F64)
    mt.load_state_dict(m0.state_dict())
    with torch.no_grad():
        mt.blocks[0].f.weight.mul_(3.0)  # rel change 2, cosine 1
        w = mt.blocks[1].g.weight
        w.copy_(-w)  # rel change 2, cosine -1
        for layer in mt.half_layers():
            layer.bias.add_(10.0)  # biases are excluded: no effect
    out = dg.weight_metrics(mt, m0)
    assert out["weight_rel_change/blocks.0.f"] == pytest.approx(2.0, rel=1e-12)
    assert out["weight_cosine/blocks.0.f"] == pytest.approx(1.0, rel=1e-12)
    assert out["weight_rel_change/blocks.1.g"] == pytest.approx(2.0, rel=1e-12)
    assert out["weight_cosine/blocks.1.g"] == pytest.approx(-1.0, rel=1e-12)
    for name in ("blocks.0.g", "blocks.1.f"):
        assert out[f"weight_rel_change/{name}"] == 0.0
        assert out[f"weight_cosine/{name}"] == pytest.approx(1.0, abs=1e-14)
    n0f, n1g = m0.blocks[0].f.weight.detach().norm() ** 2, m0.blocks[1].g.weight.detach().norm() ** 2
    total = sum(layer.weight.detach().norm() ** 2 for layer in m0.half_layers())
    assert out["weight_rel_change/all"] == pytest.approx(
        float(torch.sqrt((4 * n0f + 4 * n1g) / total)), rel=1e-12
    )
    # State dicts work too and give the same numbers.
    assert dg.weight_metrics(mt.state_dict(), m0.state_dict()) == pytest.approx(out, rel=1e-15)


# ---------------------------------------------------------------------------- per-batch loss change
def test_loss_change_summary_per_epoch(tmp_path, rng):
    values = {1: torch.randn(17, generator=rng, dtype=F64).tolist(), 2: [-50.0, -10.0, 5.0]}
    rows = [
        {"epoch": str(e), "step": str(i), "loss_change_pct": repr(v)}
        for e, vs in values.items()
        for i, v in enumerate(vs)
    ]
    rows.append(
        {"epoch": "2", "step": "9", "loss_change_pct": ""}
    )  # a step without a measured change: skipped
    path = tmp_path / "steps.csv"
    with open(path, "w") as fh:
        fh.write("epoch,step,loss_change_pct\n")
        for r in rows:
            fh.write(f"{r['epoch']},{r['step']},{r['loss_change_pct']}\n")
    summary = dg.loss_change_summary(path)
    assert [s["epoch"] for s in summary] == [1, 2]
    for s in summary:
        vals = np.array(values[s["epoch"]])
        assert s["count"] == len(vals)
        assert s["mean"] == pytest.approx(vals.mean(), rel=1e-12)
        assert s["std"] == pytest.approx(vals.std(), rel=1e-12)
        assert s["median"] == pytest.approx(np.median(vals), rel=1e-12)
        for q in (5, 25, 75, 95):
            assert s[f"q{q:02d}"] == pytest.approx(np.quantile(vals, q / 100), rel=1e-12)
        assert (s["min"], s["max"]) == (vals.min(), vals.max())
    assert summary[1]["median"] == -10.0
    with pytest.raises(FileNotFoundError, match="steps.csv"):
        dg.loss_change_summary(tmp_path / "nope" / "steps.csv")


# ---------------------------------------------------------------------------- recorder
def _perturb(model: exactgn.RevMLP, rng: torch.Generator, size: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(size * torch.randn(p.shape, generator=rng, dtype=F64).to(p.dtype))


def test_recorder_matches_ntk_gram_and_brute_force(rng):
    m0 = random_model(rng, in_features=10, num_classes=3, num_blocks=2, hidden=14)
    probe = torch.randn(6, 10, generator=rng, dtype=F64)
    rec = dg.DiagnosticsRecorder(m0, probe, probe_seed=5)
    k0 = exactgn.ntk_gram(m0, probe)
    outs0 = dg.block_outputs(m0, probe)
    m1 = random_model(rng, in_features=10, num_classes=3, num_blocks=2, hidden=14)
    m1.load_state_dict(m0.state_dict())
    _perturb(m1, rng, 0.1)
    r1 = rec.on_epoch_end(1, m1, None)
    k1 = exactgn.ntk_gram(m1, probe)
    assert r1["ntk_alignment"] == pytest.approx(dg.kernel_alignment(k0, k1), rel=1e-12)
    assert r1["ntk_alignment"] < 1 - 1e-6
    # Brute force: the NTK from an explicit Jacobian.
    j0, j1 = jacobian(m0, probe), jacobian(m1, probe)
    assert r1["ntk_alignment"] == pytest.approx(dg.kernel_alignment(j0 @ j0.T, j1 @ j1.T), rel=1e-10)
    assert r1["ntk_rate"] == pytest.approx(1 - dg.kernel_alignment(k0, k1), rel=1e-9)
    assert r1["ntk_rel_change"] == pytest.approx(float((k1 - k0).norm() / k0.norm()), rel=1e-10)
    assert r1["ntk_probe_cosine"] == pytest.approx(
        dg.ntk_probe_cosine(k0, k1, dg.probe_vector(18, 5)), rel=1e-12
    )
    outs1 = dg.block_outputs(m1, probe)
    for l in range(2):
        assert r1[f"cka/block{l}"] == pytest.approx(dg.linear_cka(outs0[l], outs1[l]), rel=1e-12)
        assert r1[f"cka_unbiased/block{l}"] == pytest.approx(
            dg.linear_cka(outs0[l], outs1[l], unbiased=True), rel=1e-12
        )
        prev0, prev1 = (probe, probe) if l == 0 else (outs0[l - 1], outs1[l - 1])
        assert r1[f"cka_delta/block{l}"] == pytest.approx(
            dg.linear_cka(outs0[l] - prev0, outs1[l] - prev1), rel=1e-10
        )
    assert {k: v for k, v in r1.items() if k.startswith("weight_")} == pytest.approx(
        dg.weight_metrics(m1, m0), rel=1e-12
    )
    assert r1["diagnostics_time_s"] > 0 and r1["epoch"] == 1 and r1["probe_size"] == 6
    assert all(isinstance(v, (int, float)) for v in r1.values())
    json.dumps(r1, allow_nan=False)  # JSON-friendly
    # Three epochs later: the rate is against the previous record, per epoch.
    _perturb(m1, rng, 0.1)
    r4 = rec.on_epoch_end(4, m1, None)
    k4 = exactgn.ntk_gram(m1, probe)
    assert r4["ntk_rate"] == pytest.approx((1 - dg.kernel_alignment(k1, k4)) / 3, rel=1e-9)
    assert r4["ntk_alignment"] == pytest.approx(dg.kernel_alignment(k0, k4), rel=1e-12)


def test_recorder_options_every_and_no_side_effects(rng):
    m0 = random_model(rng, in_features=8, num_classes=2, num_blocks=2, hidden=10)
    probe = torch.randn(5, 8, generator=rng, dtype=F64)
    rec = dg.DiagnosticsRecorder(m0, probe, ntk=False, weights=False, every=2)
    before = {k: v.clone() for k, v in m0.state_dict().items()}
    assert rec.on_epoch_end(1, m0, None) == {}
    r0 = rec.on_epoch_end(2, m0, None)
    assert not any(k.startswith(("ntk", "weight")) for k in r0)
    assert r0["cka/block0"] == pytest.approx(1.0, abs=1e-12)
    for k, v in m0.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="every"):
        dg.DiagnosticsRecorder(m0, probe, every=0)


def test_recorder_float64_of_float32_model(rng):
    """A float32 model is diagnosed in float64 (default): the same numbers as a float64 copy of it."""
    seed = int(torch.randint(0, 2**31 - 1, (), generator=rng))
    m32 = exactgn.RevMLP(8, 2, 2, 10, init_std=0.3, seed=seed)
    m64 = exactgn.RevMLP(8, 2, 2, 10, init_std=0.3, seed=seed, dtype=F64)
    m64.load_state_dict(m32.state_dict())  # the same (float32-rounded) initial weights
    probe = torch.randn(6, 8, generator=rng)
    rec32, rec64 = dg.DiagnosticsRecorder(m32, probe), dg.DiagnosticsRecorder(m64, probe.double())
    _perturb(m32, rng, 0.05)
    m64.load_state_dict(m32.state_dict())
    r32, r64 = rec32.on_epoch_end(1, m32), rec64.on_epoch_end(1, m64)
    assert m32.readout.dtype == torch.float32  # the model itself is untouched
    for key in r64:
        if key != "diagnostics_time_s":
            assert r32[key] == pytest.approx(r64[key], rel=1e-12, abs=1e-14), key


# ---------------------------------------------------------------------------- diagnose from checkpoints
def _save_ckpt(run, model, epoch):
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": model.state_dict(), "model_config": model.config(), "epoch": epoch},
        run / "checkpoints" / f"epoch_{epoch:04d}.pt",
    )


def _fake_checkpoint_run(tmp_path, rng, epochs=3):
    run = tmp_path / "run"
    model = random_model(rng, in_features=8, num_classes=2, num_blocks=2, hidden=10)
    models = []
    for e in range(epochs + 1):
        if e:
            _perturb(model, rng, 0.05)
        _save_ckpt(run, model, e)
        copy = exactgn.RevMLP(**model.config(), dtype=F64)
        copy.load_state_dict(model.state_dict())
        models.append(copy)
    return run, models


def test_diagnose_run_from_checkpoints(tmp_path, rng):
    run, models = _fake_checkpoint_run(tmp_path, rng)
    probe = torch.randn(6, 8, generator=rng, dtype=F64)
    records = dg.diagnose_run(run, probe_inputs=probe, probe_size=6, every=2)
    assert [r["epoch"] for r in records] == [0, 2]
    k0, k2 = (exactgn.ntk_gram(models[e], probe) for e in (0, 2))
    assert records[1]["ntk_alignment"] == pytest.approx(dg.kernel_alignment(k0, k2), rel=1e-12)
    assert records[1]["ntk_rate"] == pytest.approx((1 - dg.kernel_alignment(k0, k2)) / 2, rel=1e-9)
    written = dg.read_diagnostics(run / dg.DIAGNOSTICS_FILE)
    assert len(written) == 2
    for got, want in zip(written, records):
        assert got == pytest.approx(want, rel=1e-15)
    with pytest.raises(FileExistsError, match="overwrite"):
        dg.diagnose_run(run, probe_inputs=probe, probe_size=6)
    again = dg.diagnose_run(run, probe_inputs=probe, probe_size=6, overwrite=True)
    assert [r["epoch"] for r in again] == [0, 1, 2, 3]


def test_diagnose_cli(tmp_path, rng, capsys):
    run, models = _fake_checkpoint_run(tmp_path, rng, epochs=2)
    probe = torch.randn(7, 8, generator=rng, dtype=F64)
    torch.save(probe, tmp_path / "probe.pt")
    assert cli_main(["diagnose", str(run), "--probe", str(tmp_path / "probe.pt"), "--probe-size", "5"]) == 0
    assert "wrote 3 records" in capsys.readouterr().out
    recs = dg.read_diagnostics(run / "diagnostics.jsonl")
    k0, k2 = exactgn.ntk_gram(models[0], probe[:5]), exactgn.ntk_gram(models[2], probe[:5])
    assert recs[-1]["probe_size"] == 5
    assert recs[-1]["ntk_alignment"] == pytest.approx(dg.kernel_alignment(k0, k2), rel=1e-12)
    # Missing initial checkpoint: a one-line error naming the file and how to get it.
    (run / "checkpoints" / "epoch_0000.pt").unlink()
    assert cli_main(["diagnose", str(run), "--probe", str(tmp_path / "probe.pt"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "epoch_0000.pt" in err and "keep_checkpoints" in err


def test_load_checkpoint_errors(tmp_path):
    bad = tmp_path / "epoch_0001.pt"
    torch.save({"model": {}}, bad)
    with pytest.raises(ValueError, match="model_config"):
        dg.load_checkpoint_model(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dg.load_checkpoint_model(tmp_path / "missing.pt")
