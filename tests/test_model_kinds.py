"""``model.kind``: MLP and ResMLP runs through the lab (config, builder, checkpoints, diagnostics, report).

Diagnostics are checked against brute force in float64: the NTK from ``torch.func.jacrev``, block outputs from
an explicit forward pass, weight changes from the parameters themselves.
"""

from __future__ import annotations

import json
import math
import tomllib

import pytest
import torch
from torch.func import functional_call, jacrev

import exactgn
from exactgn.cli import main as cli_main
from exactgn.lab import diagnostics as dg
from exactgn.lab import report as rp
from exactgn.lab.checkpoint import load_init_weights, load_model, model_config, save_weights
from exactgn.lab.config import ConfigError, dumps, loads_config, with_overrides
from exactgn.lab.evidence import contender
from exactgn.lab.steppers import build_model
from exactgn.lab.train import train
from exactgn.metrics import linear_cka
from exactgn.models import MLP, ResMLP

MLP_TOML = """
[model]
kind = "mlp"
widths = [32, 16]
activation = "tanh"
dtype = "float64"
[optim.gn]
inverse = "pinv"
"""
RESMLP_TOML = """
[model]
kind = "resmlp"
blocks = 2
hidden = 16
init_std = 0.05
dtype = "float64"
[optim.gn]
inverse = "pinv"
"""
TINY_TRAIN = """
[data]
dataset = "mnist-small"
train_size = 48
test_size = 32
[train]
epochs = 2
batch_size = 0
keep_checkpoints = true
checkpoint_every = 1
[diagnostics]
enabled = true
probe_size = 8
"""


# ---------------------------------------------------------------------------- config and builder
def test_kind_defaults_to_revmlp_and_builds_each_model():
    assert loads_config("").model.kind == "revmlp"
    assert type(build_model(loads_config(""), 20, 3)) is exactgn.RevMLP
    mlp = build_model(loads_config(MLP_TOML, ["seed=3"]), 20, 3)
    want = MLP(20, 3, [32, 16], activation="tanh", seed=3, dtype=torch.float64)
    assert mlp.config() == want.config()
    assert all(torch.equal(a, b) for a, b in zip(mlp.state_dict().values(), want.state_dict().values()))
    std = build_model(loads_config(MLP_TOML, ["model.init='std'", "model.init_std=0.5"]), 20, 3)
    assert std.config()["init_std"] == 0.5
    res = build_model(loads_config(RESMLP_TOML), 20, 3)
    assert type(res) is ResMLP and res.config()["hidden"] == 16 and res.config()["num_blocks"] == 2
    assert build_model(loads_config(RESMLP_TOML, ["model.bottleneck=false"]), 20, 3).hidden is None


def test_config_errors_name_the_key_and_the_way_out():
    with pytest.raises(ConfigError, match=r"optim\.gn\.inverse: 'right'.*model\.kind = 'mlp'.*\"pinv\""):
        loads_config('[model]\nkind = "mlp"\n')
    with pytest.raises(ConfigError, match=r"optim\.gn\.inverse: 'right'.*'resmlp'"):
        loads_config('[model]\nkind = "resmlp"\n[optim.gn]\ninverse = "right"\n')
    # Adam does not read optim.gn: the default inverse is no error there.
    assert loads_config('[model]\nkind = "mlp"\n[optim]\nname = "adam"\n').model.kind == "mlp"
    with pytest.raises(
        ConfigError, match=r"model\.kind: must be one of 'revmlp', 'mlp', 'resmlp'; got 'cnn'"
    ):
        loads_config('[model]\nkind = "cnn"\n')
    with pytest.raises(ConfigError, match=r"model\.widths: every width must be an integer >= 1"):
        loads_config(MLP_TOML, ["model.widths=[8, 0]"])
    with pytest.raises(ConfigError, match=r"model\.activation: must be one of"):
        loads_config(MLP_TOML, ["model.activation='swish'"])
    with pytest.raises(ConfigError, match=r"model: cannot build a resmlp.*at most in_features"):
        build_model(loads_config(RESMLP_TOML), 4, 10)


def test_contender_labels_name_the_kind():
    assert contender({"optim": {"name": "gn", "gn": {"inverse": "pinv"}}}) == "jplus"
    assert contender(json.loads(json.dumps(loads_config(MLP_TOML).model_dump()))) == "jplus-mlp"
    cfg = loads_config(RESMLP_TOML, ["optim.name='adam'"]).model_dump()
    assert contender(cfg) == "adam-resmlp"


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("toml", [MLP_TOML, RESMLP_TOML, ""])
def test_weights_round_trip_through_the_one_loader(tmp_path, toml):
    model = build_model(loads_config(toml, ["seed=5"]), 20, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    save_weights(tmp_path / "w.pt", model, 4)
    again, epoch = load_model(tmp_path / "w.pt")
    assert epoch == 4 and type(again) is type(model) and again.config() == model.config()
    assert model_config(again) == model_config(model)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert next(again.parameters()).dtype == next(model.parameters()).dtype
    assert ("kind" in model_config(model)) == (toml != "")  # RevMLP checkpoints keep their old form


def test_init_from_refuses_another_kind(tmp_path):
    mlp = build_model(loads_config(MLP_TOML), 784, 10)
    save_weights(tmp_path / "mlp.pt", mlp, 0)
    res = build_model(loads_config(RESMLP_TOML), 784, 10)
    with pytest.raises(ConfigError, match=r"does not match.*kind: checkpoint 'mlp', this config 'resmlp'"):
        load_init_weights(res, tmp_path / "mlp.pt")
    wider = build_model(loads_config(MLP_TOML, ["model.widths=[32, 17]"]), 784, 10)
    with pytest.raises(ConfigError, match=r"widths: checkpoint \[32, 16\], this config \[32, 17\]"):
        load_init_weights(wider, tmp_path / "mlp.pt")
    other_seed = build_model(loads_config(MLP_TOML, ["seed=9"]), 784, 10)
    load_init_weights(other_seed, tmp_path / "mlp.pt")  # the seed is no part of the architecture
    assert torch.equal(other_seed.layers[0].weight, mlp.layers[0].weight)


def _strip_new_model_keys(cfg: dict) -> dict:
    for key in ("kind", "widths", "activation", "init"):
        del cfg["model"][key]
    return cfg


def test_an_old_run_folder_without_model_kind_loads_as_revmlp(tmp_path):
    run = tmp_path / "old"
    base = "[model]\nhidden = 24\ndtype = 'float64'\n[optim]\nname = 'sgd'\nlr = 0.05\n" + TINY_TRAIN
    train(loads_config(base), run, progress=False)
    config = _strip_new_model_keys(tomllib.loads((run / "config.toml").read_text()))
    (run / "config.toml").write_text(dumps(config))
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    _strip_new_model_keys(payload["config"])
    torch.save(payload, run / "checkpoints" / "last.pt")
    assert "kind" not in (run / "config.toml").read_text()
    model, epoch = load_model(run)
    assert type(model) is exactgn.RevMLP and epoch == 2 and model.hidden == 24
    assert cli_main(["train", "--resume", str(run), "--set", "train.epochs=3", "--quiet"]) == 0
    assert type(load_model(run)[0]) is exactgn.RevMLP and load_model(run)[1] == 3
    assert cli_main(["diagnose", str(run), "--overwrite"]) == 0
    assert [r["epoch"] for r in dg.read_diagnostics(run / "diagnostics.jsonl")] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- diagnostics vs brute force
def _ntk(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    jac = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)
    rows = x.shape[0] * model.num_classes
    j = torch.cat([jac[n].reshape(rows, -1) for n in params], dim=1)
    return j @ j.T


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[list, list]:
    """Block outputs and increments by an explicit forward pass."""
    outs, incs = [], []
    if isinstance(model, MLP):
        h = x
        for layer in model.layers[:-1]:
            h = torch.tanh(layer(h)) if model.activation == "tanh" else torch.relu(layer(h))
            outs.append(h)
        return outs, incs
    z = x
    for block in model.blocks:
        u = z @ block.proj.weight.T
        nz = z + (u if block is model.blocks[0] else torch.relu(u)) @ block.out.weight.T + block.out.bias
        outs.append(nz)
        incs.append(nz - z)
        z = nz
    return outs, incs


@pytest.mark.parametrize("toml", [MLP_TOML, RESMLP_TOML])
def test_recorder_matches_brute_force(rng, toml):
    init = build_model(loads_config(toml), 20, 3)
    x = torch.randn(9, 20, generator=rng, dtype=torch.float64)
    recorder = dg.DiagnosticsRecorder(init, x)
    now = build_model(loads_config(toml), 20, 3)
    with torch.no_grad():
        for p in now.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=rng, dtype=p.dtype))
    rec = recorder.on_epoch_end(2, now)
    k0, kt = _ntk(init, x), _ntk(now, x)
    assert rec["ntk_alignment"] == pytest.approx(float((k0 * kt).sum() / k0.norm() / kt.norm()), rel=1e-12)
    assert rec["ntk_rel_change"] == pytest.approx(float((kt - k0).norm() / k0.norm()), rel=1e-10)
    _check_cka(rec, _outputs(init, x), _outputs(now, x))
    _check_weight_metrics(rec, init, now)


def _check_cka(rec: dict, at_init: tuple, at_now: tuple) -> None:
    (o0, i0), (ot, it) = at_init, at_now
    assert len(o0) == 2
    for l in range(2):
        assert rec[f"cka/block{l}"] == pytest.approx(linear_cka(o0[l], ot[l]), rel=1e-12)
        assert rec[f"cka/block{l}"] < 1 - 1e-6
    assert [k for k in rec if k.startswith("cka_delta/")] == [f"cka_delta/block{l}" for l in range(len(i0))]
    for l in range(len(i0)):
        assert rec[f"cka_delta/block{l}"] == pytest.approx(linear_cka(i0[l], it[l]), rel=1e-12)


def _check_weight_metrics(rec: dict, init: torch.nn.Module, now: torch.nn.Module) -> None:
    at_init = dict(init.named_parameters())
    weights = {
        n.removesuffix(".weight"): (p.detach(), at_init[n].detach())
        for n, p in now.named_parameters()
        if p.requires_grad and p.dim() == 2
    }
    assert {k.split("/")[1] for k in rec if k.startswith("weight_cosine/")} == set(weights)
    for name, (wt, w0) in weights.items():
        assert rec[f"weight_rel_change/{name}"] == pytest.approx(
            float((wt - w0).norm() / w0.norm()), rel=1e-12
        )
    num = sum(float((wt - w0).square().sum()) for wt, w0 in weights.values())
    den = sum(float(w0.square().sum()) for _, w0 in weights.values())
    assert rec["weight_rel_change/all"] == pytest.approx(math.sqrt(num / den), rel=1e-12)


# ---------------------------------------------------------------------------- real runs
@pytest.mark.parametrize("toml", [MLP_TOML, RESMLP_TOML], ids=["mlp", "resmlp"])
def test_train_diagnose_report_for_each_kind(tmp_path, toml):
    kind = tomllib.loads(toml)["model"]["kind"]
    runs = tmp_path / "runs"
    for opt, lr in (("gn", 0.5), ("adam", 1e-3)):
        cfg = loads_config(toml + TINY_TRAIN, [f"optim.name='{opt}'", f"optim.lr={lr}", f"name='{kind}'"])
        train(cfg, runs / f"{kind}-{opt}", progress=False)
    gn_run = runs / f"{kind}-gn"
    recorded = dg.read_diagnostics(gn_run / "diagnostics.jsonl")
    assert [r["epoch"] for r in recorded] == [0, 1, 2]
    assert recorded[2]["ntk_alignment"] < 1 and recorded[2]["weight_rel_change/all"] > 0
    assert recorded[2]["cka/block1"] < 1
    model, _ = load_model(gn_run)
    assert model_config(model)["kind"] == kind
    out = tmp_path / "diag.jsonl"
    assert cli_main(["diagnose", str(gn_run), "--out", str(out)]) == 0
    again = dg.read_diagnostics(out)
    assert [a.keys() for a in again] == [r.keys() for r in recorded]
    for a, b in zip(again, recorded):
        for key in a:
            if key != "diagnostics_time_s":
                assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-13), key
    cross = dg.runs_cka(gn_run, runs / f"{kind}-adam", probe_size=8)
    assert set(cross) == {"block0", "block1"} and all(v < 1 - 1e-9 for v in cross.values())
    assert cli_main(["report", str(runs), "--out", str(tmp_path / "report"), "--cross-cka"]) == 0
    names = {p.name for p in (tmp_path / "report").glob("*.png")}
    for fig in ("curves", "ntk", "cka", "weights"):
        assert any(n.startswith(f"{fig}-") for n in names), (fig, names)
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert f"{kind}-gn" in page and f"{kind}-adam" in page
    assert rp.load_run(gn_run).config["model"]["kind"] == kind


def test_gauss_newton_on_a_resmlp_owns_only_its_trainable_parameters(rng):
    model = ResMLP(12, 3, 2, 6, init_std=0.1, dtype=torch.float64)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = exactgn.GaussNewton(model, lr=1.0, inverse="pinv")
    x, y = torch.randn(4, 12, generator=rng, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    before = model(x).detach()
    opt.step(x, y)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert not torch.equal(model(x).detach(), before)
    assert sum(len(g["params"]) for g in opt.param_groups) == 4  # two blocks' out.weight and out.bias


def test_report_labels_name_only_the_keys_a_model_kind_reads(tmp_path):
    from pathlib import Path

    from exactgn.lab.config import ignored_model_keys

    def run(toml: str, name: str) -> rp.Run:
        cfg = loads_config(toml, ["optim.name='adam'", "data.train_size=64"]).model_dump()
        return rp.Run(Path(name), name, cfg, "", {}, [], None, None)

    mlp, res, rev = run(MLP_TOML, "a"), run(RESMLP_TOML, "b"), run("", "c")
    assert ignored_model_keys(rev.config) == {"model.widths", "model.activation", "model.init"}
    assert ignored_model_keys(mlp.config) == {
        "model.blocks",
        "model.hidden",
        "model.bottleneck",
        "model.init_std",
    }
    assert "model.init_std" not in ignored_model_keys(
        loads_config(MLP_TOML, ["model.init='std'"]).model_dump()
    )
    assert ignored_model_keys({"model": {"hidden": 8}}) == set()  # an old run's config: a RevMLP's keys
    series = [s for p in rp.group_runs([mlp, res, rev]) for s in p.series]
    labels = {s.runs[0].config["model"]["kind"]: s.label for s in series}
    assert len(series) == 3 and "widths=(32, 16)" in labels["mlp"] and "hidden" not in labels["mlp"]
    assert "kind=resmlp" in labels["resmlp"] and "hidden=16" in labels["resmlp"]
    assert "kind=revmlp" in labels["revmlp"] and "hidden=1024" in labels["revmlp"]
    assert not any(word in labels[k] for k in ("resmlp", "revmlp") for word in ("widths", "activation"))


def test_a_batch_too_large_for_an_exact_step_of_any_kind_is_refused_up_front():
    from exactgn.lab.steppers import check_gn_batch

    cfg = loads_config(MLP_TOML, ["model.widths=[2]"])
    model = build_model(cfg, 20, 3)  # 51 trainable parameters
    check_gn_batch(cfg, model, 17)  # 51 rows
    with pytest.raises(ConfigError, match=r"optim\.gn: batches of 18 are too large.*54 rows.*only 51"):
        check_gn_batch(cfg, model, 18)
    check_gn_batch(with_overrides(cfg, {"optim.gn.least_squares": True}), model, 18)
