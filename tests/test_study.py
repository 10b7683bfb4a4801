"""Starting a run from another run's weights (``model.init_from``), ``exactgn study``, and the shipped
appendix studies: each one, shrunk to tiny sizes, does what its file says."""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import pytest
import torch

from exactgn.cli import main as cli_main
from exactgn.gn import jvp_logits
from exactgn.lab import train as T
from exactgn.lab.checkpoint import load_checkpoint
from exactgn.lab.config import (
    ConfigError,
    apply_overrides,
    dumps,
    from_dict,
    load_config,
    loads_config,
    to_dict,
)
from exactgn.lab.diagnostics import read_diagnostics
from exactgn.lab.rundir import read_meta, read_rows
from exactgn.lab.steppers import build_model, build_optimizer
from exactgn.lab.study import STUDIES_DIR, list_studies, load_study, plan, run_config, run_study, study_kind
from exactgn.lab.sweep import load_sweep, make_trials, run_sweep

TINY_RUN = """
name = "tiny"
seed = 5
[data]
dataset = "mnist-small"
train_size = 96
test_size = 64
[model]
hidden = 64
[optim]
name = "{opt}"
lr = {lr}
[train]
epochs = {epochs}
batch_size = 32
checkpoint_every = 1
keep_checkpoints = true
"""
LR = {"gn": 0.2, "adam": 1e-3, "sgd": 0.05}

# Overrides that shrink a shipped study to seconds: the bundled MNIST subset, a narrow model, batches of 32.
TINY = {
    "data.dataset": "mnist-small",
    "data.train_size": 64,
    "data.test_size": 64,
    "model.hidden": 64,
    "train.batch_size": 32,
    "train.eval_batch_size": 64,
    "diagnostics.probe_size": 8,
}


def tiny_run(opt: str = "adam", epochs: int = 2, extra: dict | None = None):
    cfg = loads_config(TINY_RUN.format(opt=opt, lr=LR[opt], epochs=epochs))
    return from_dict(apply_overrides(to_dict(cfg), extra or {})) if extra else cfg


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- model.init_from
def test_init_from_starts_from_the_checkpoint_with_a_fresh_optimiser(tmp_path):
    source = T.train(tiny_run("adam", epochs=2), tmp_path / "adam", progress=False)
    ckpt = source / "checkpoints" / "epoch_0001.pt"
    run = T.train(
        tiny_run("gn", epochs=1, extra={"model.init_from": str(ckpt), "seed": 9}),
        tmp_path / "gn",
        progress=False,
    )
    # Epoch 0 of the new run is the source's epoch 1: weights, bottlenecks and readout (although the seeds
    # differ).
    assert same(model_state(run / "checkpoints" / "epoch_0000.pt"), model_state(ckpt))
    assert read_rows(run / "epochs.csv")[0]["train_loss"] == read_rows(source / "epochs.csv")[1]["train_loss"]
    meta = read_meta(run)
    src = meta["init_from"]
    assert src["path"] == str(ckpt.resolve()) and src["epoch"] == 1 and src["run"] == str(source.resolve())
    assert src["run_name"] is None and len(src["sha256"]) == 64  # epoch checkpoints carry no config
    assert load_config(run / "config.toml").model.init_from == str(
        ckpt.resolve()
    )  # absolute: reruns from anywhere
    opt_state = load_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]["state"]
    assert {s["step"] for s in opt_state.values()} == {3}  # GN's own 3 steps; nothing carried over from Adam
    # A run folder means its last.pt, which records the optimiser and the run's name.
    run2 = T.train(
        tiny_run("sgd", epochs=1, extra={"model.init_from": str(source)}), tmp_path / "sgd", progress=False
    )
    src2 = read_meta(run2)["init_from"]
    assert src2["path"] == str((source / "checkpoints" / "last.pt").resolve())
    assert (src2["epoch"], src2["global_step"], src2["optimiser"], src2["run_name"]) == (2, 6, "adam", "tiny")
    assert same(
        model_state(run2 / "checkpoints" / "epoch_0000.pt"),
        model_state(source / "checkpoints" / "epoch_0002.pt"),
    )


def test_init_from_errors_name_the_problem_and_create_nothing(tmp_path):
    source = T.train(tiny_run("adam", epochs=1), tmp_path / "src", progress=False)
    cases = [
        ({"model.init_from": str(tmp_path / "nope.pt")}, "does not exist"),
        ({"model.init_from": str(tmp_path)}, "folder without checkpoints/last.pt"),
        ({"model.init_from": str(source / "config.toml")}, "cannot read"),
        (
            {"model.init_from": str(source), "model.hidden": 32},
            r"hidden: checkpoint 64, this config 32 \(set by model.hidden",
        ),
        ({"model.init_from": str(source), "model.blocks": 3}, "num_blocks: checkpoint 2, this config 3"),
        (
            {"model.init_from": str(source), "model.bottleneck": False},
            "hidden: checkpoint 64, this config None",
        ),
    ]
    for i, (extra, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message):
            T.train(tiny_run("gn", epochs=1, extra=extra), tmp_path / f"bad{i}", progress=False)
        assert not (tmp_path / f"bad{i}").exists()
    torch.save({"model": {}, "weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match="not an exactgn checkpoint"):
        T.train(
            tiny_run("gn", epochs=1, extra={"model.init_from": str(tmp_path / "foreign.pt")}),
            tmp_path / "f",
            progress=False,
        )
    with pytest.raises(ConfigError, match="surrounding spaces"):
        tiny_run("gn", extra={"model.init_from": " x.pt"})


def test_init_from_resume_is_bit_identical_without_the_source(tmp_path):
    """A run started from another's weights resumes bit-identically, and its diagnostics keep measuring
    against the weights it started from, even when the source checkpoint has gone."""
    source = T.train(tiny_run("adam", epochs=1), tmp_path / "src", progress=False)
    extra = {
        "model.init_from": str(source),
        "diagnostics.enabled": True,
        "diagnostics.probe_size": 8,
        "optim.gn.noise": 0.1,
    }
    cfg = tiny_run("gn", epochs=3, extra=extra)
    whole = T.train(cfg, tmp_path / "whole", progress=False)

    class StopAfterEpoch1:
        def on_epoch_end(self, epoch, model, optimizer):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(T.TrainingInterrupted):
        T.train(cfg, tmp_path / "part", callbacks=[StopAfterEpoch1()], progress=False)
    (source / "checkpoints" / "last.pt").rename(source / "moved.pt")  # the source is gone
    part = T.train(None, resume=tmp_path / "part", progress=False)
    assert (
        read_meta(part)["status"] == "finished"
        and read_meta(part)["init_from"] == read_meta(whole)["init_from"]
    )
    assert same(
        load_checkpoint(whole / "checkpoints" / "last.pt")["model"],
        load_checkpoint(part / "checkpoints" / "last.pt")["model"],
    )
    # noqa: E731
    keep = lambda recs: [{k: v for k, v in r.items() if "time" not in k and k != "ntk_rate"} for r in recs]
    a, b = read_diagnostics(whole / "diagnostics.jsonl"), read_diagnostics(part / "diagnostics.jsonl")
    assert [r["epoch"] for r in b] == [0, 1, 2, 3] and keep(a) == keep(b)
    assert a[0]["ntk_alignment"] == pytest.approx(1.0, abs=1e-12) and a[0]["weight_rel_change/all"] == 0.0
    assert a[3]["weight_rel_change/all"] > 0


# ---------------------------------------------------------------------------- study files
def _study(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TWO_RUNS = """
name = "two"
[set]
"data.dataset" = "mnist-small"
"data.train_size" = 64
"data.test_size" = 64
"model.hidden" = 64
"train.batch_size" = 32
"train.epochs" = 2
"train.keep_checkpoints" = true
"train.checkpoint_every" = 1
[[run]]
name = "first"
config = "mnist-minibatch-cpu/{first}"
{first_extra}
[[run]]
name = "second"
config = "mnist-minibatch-cpu/gn"
init_from = "first"
{second_extra}
"""


@pytest.mark.parametrize(
    "first_extra, second_extra, message",
    [
        ("", 'init_from = "third"', "init_from must name an earlier run"),
        ("", "init_epoch = 1", None),
        ("", "init_epoch = 3", "beyond the 2 epochs"),
        (
            'set = { "train.keep_checkpoints" = false }',
            "init_epoch = 1",
            "will not keep checkpoints/epoch_0001.pt",
        ),
        (
            'set = { "train.checkpoint_every" = 2 }',
            "init_epoch = 1",
            "will not keep checkpoints/epoch_0001.pt",
        ),
        ('set = { "model.hidden" = 32 }', "", "model.hidden is 64 but the source run 'first' has 32"),
        ('set = { "model.bottleneck" = false }', "", "model.bottleneck is True"),
        ('set = { "data.dataset" = "cifar10" }', "", "data.dataset is 'mnist-small'"),
        ("", 'set = { "model.init_from" = "x.pt" }', "not both"),
        ("", 'set = { "optim.lrr" = 1 }', r"run 2 \(second\).*optim.lrr"),
        ("colour = 1", "", r"run\[0\]\.colour: unknown key; the keys of \[run\[0\]\] are: name, config, set"),
    ],
)
def test_study_files_are_checked_before_anything_runs(tmp_path, first_extra, second_extra, message):
    text = TWO_RUNS.format(first="adam", first_extra=first_extra, second_extra=second_extra)
    if second_extra.startswith("init_from"):
        text = text.replace('init_from = "first"\n', "", 1)
    path = _study(tmp_path, text)
    if message is None:
        spec = load_study(path)
        assert [r.name for r in spec.runs] == ["first", "second"] and spec.runs[1].init_epoch == 1
        return
    with pytest.raises(ConfigError, match=message):
        load_study(path)


def test_more_study_file_errors(tmp_path):
    dup = TWO_RUNS.format(first="adam", first_extra="", second_extra="").replace(
        'name = "second"', 'name = "first"'
    )
    with pytest.raises(ConfigError, match="used by an earlier run"):
        load_study(_study(tmp_path, dup))
    with pytest.raises(ConfigError, match="no shipped experiment"):
        load_study(_study(tmp_path, TWO_RUNS.format(first="rmsprop", first_extra="", second_extra="")))
    with pytest.raises(ConfigError, match="either 'base'"):
        study_kind(_study(tmp_path, 'name = "x"\n'))
    with pytest.raises(ConfigError, match="did you mean switch-optimiser"):
        load_study("switch-optimizer")


def test_a_study_runs_in_order_resumes_and_skips_dependants_of_a_failed_run(tmp_path, capsys):
    path = _study(tmp_path, TWO_RUNS.format(first="sgd", first_extra="", second_extra="init_epoch = 1"))
    out = run_study(path, tmp_path / "out", progress=False)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["run"], r["init_from"], r["start_epoch"], r["status"]) for r in rows] == [
        ("first", "", "", "finished"),
        ("second", "first", "1", "finished"),
    ]
    assert same(
        model_state(out / "second" / "checkpoints" / "epoch_0000.pt"),
        model_state(out / "first" / "checkpoints" / "epoch_0001.pt"),
    )
    assert json.loads((out / "study.json").read_text())["runs"][1]["init_from"] == "first"
    assert "| second | first (1) | gn | finished |" in (out / "results.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")}
    run_study(path, out, progress=False)  # again: nothing is retrained
    assert {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")} == stamps
    with pytest.raises(ValueError, match=r"does not match.*optim.lr = 0.1 there, 0.3 in the study"):
        run_study(path, out, overrides=["optim.lr=0.3"], progress=False)
    # A dependant of a source that was retrained differently is stale: the checkpoint's SHA-256 says so.
    source_ckpt = out / "first" / "checkpoints" / "epoch_0001.pt"
    original = source_ckpt.read_bytes()
    torch.save({**torch.load(source_ckpt, weights_only=True), "epoch": 1, "note": "retrained"}, source_ckpt)
    with pytest.raises(ValueError, match="another version of first's epoch_0001.pt"):
        run_study(path, out, progress=False)
    source_ckpt.write_bytes(original)
    # An interrupted run is resumed from its checkpoint; a folder without one is started afresh.
    meta = read_meta(out / "second")
    meta["status"] = "interrupted"
    (out / "second" / "meta.json").write_text(json.dumps(meta))
    (out / "first" / "checkpoints" / "last.pt").unlink()
    (out / "first" / "meta.json").unlink()
    run_study(path, out, progress=False)
    assert (
        read_meta(out / "second")["status"] == "finished" and len(read_meta(out / "second")["resumed"]) == 1
    )
    assert read_meta(out / "first")["resumed"] == [] and (out / "first" / "checkpoints" / "last.pt").is_file()
    # A diverging source: its dependant is skipped and the command says so.
    bad = _study(
        tmp_path,
        TWO_RUNS.format(first="sgd", first_extra='set = { "optim.lr" = 1e30 }', second_extra=""),
        "bad.toml",
    )
    assert cli_main(["study", str(bad), "--out", str(tmp_path / "bad"), "--quiet"]) == 1
    text = capsys.readouterr().out
    assert "| first | - | sgd | diverged |" in text and "skipped (first is diverged)" in text
    assert not (tmp_path / "bad" / "second").exists()


def test_cli_lists_plans_and_explains(capsys):
    assert cli_main(["study", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in list_studies():
        assert name in listed
    assert cli_main(["study", "switch-optimiser-cpu", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "adam-then-gn: gn lr 0.2, 5 epochs, starting from adam's epoch 5" in text
    assert cli_main(["study", "init-scale-cpu", "--dry-run"]) == 0
    assert "trial-002: model.init_std=1e-06" in capsys.readouterr().out
    assert cli_main(["study", "init-scale-cpu", "--set", "train.epochs=1"]) == 2
    assert "put overrides in its [set] table" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["study", "--help"])
    help_text = capsys.readouterr().out
    for word in ("init_from", "init_epoch", "[[run]]", "sweep file", "results.csv", "switch-optimiser-cpu"):
        assert word in help_text


# ---------------------------------------------------------------------------- the shipped studies
APPENDIX = (
    "long-training",
    "switch-optimiser",
    "init-scale",
    "gn-lr",
    "weight-decay",
    "gn-regularisation",
    "no-bottleneck",
)


# Issue 9's evidence studies exist only CPU-sized: tuning on the CPU twins and its follow-ups (they load
# below).
CPU_ONLY = (
    "tuning/architecture-minibatch-cpu",
    "tuning/architecture-fullbatch-cpu",
    "tuning/minibatch-cpu",
    "tuning/fullbatch-cpu",
    "tuning/cifar10-fullbatch-cpu",
    "tuning/final-minibatch-cpu",
    "tuning/final-fullbatch-cpu",
    "tuning/final-cifar10-fullbatch-cpu",
    "main/cifar10-minibatch-cpu",  # at the reference size: exactgn compare cifar10-minibatch --set seed=N
    "long-minibatch-cpu",
    "architecture-long-cpu",
    "inverse/fullbatch-b128-cpu",
    "inverse/faithful-cpu",
)


def test_every_appendix_study_ships_in_both_sizes_and_loads():
    names = set(list_studies())
    for study in APPENDIX:
        assert {study, f"{study}-cpu"} <= names, study
    for name in names:
        if name in CPU_ONLY:
            continue
        assert (name + "-cpu" in names) if not name.endswith("-cpu") else (name[:-4] in names), name
        path = STUDIES_DIR / f"{name}.toml"
        if study_kind(path) == "sweep":
            assert make_trials(load_sweep(path))
        else:
            assert load_study(path).runs
        assert plan(path)
    # pyproject ships them
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "configs/**/*.toml" in pyproject["tool"]["setuptools"]["package-data"]["exactgn.lab"]


def _tiny_sweep(tmp_path: Path, name: str, extra: dict | None = None) -> Path:
    """A copy of a shipped sweep file with the tiny sizes added to its [set] table (same grid, same base)."""
    data = tomllib.loads((STUDIES_DIR / f"{name}.toml").read_text())
    data["set"] = {**data.get("set", {}), **TINY, **(extra or {})}
    data["backend"] = "sequential"
    path = tmp_path / f"{name.replace('/', '-')}.toml"
    path.write_text(dumps(data))
    return path


def test_init_scale_sweep_yields_those_init_scales(tmp_path):
    sweep = _tiny_sweep(tmp_path, "init-scale-cpu", {"train.epochs": 1})
    out = run_sweep(sweep, tmp_path / "out", progress=False)
    seen = {}
    for trial in make_trials(load_sweep(sweep)):
        ckpt = torch.load(out / trial.name / "checkpoints" / "epoch_0000.pt", weights_only=True)
        weights = torch.cat([v.reshape(-1) for k, v in ckpt["model"].items() if k.endswith(".weight")])
        std = trial.overrides["model.init_std"]
        assert ckpt["model_config"]["init_std"] == std
        assert float(weights.std()) == pytest.approx(std, rel=0.02)  # 4 x 392 x 64 draws
        seen[std] = read_diagnostics(out / trial.name / "diagnostics.jsonl")
    assert sorted(seen) == [1e-6, 1e-3, 1e-2]
    assert all(recs[-1]["epoch"] == 1 and recs[-1]["ntk_alignment"] < 1 for recs in seen.values())


def test_gn_lr_sweep_scales_the_same_step(tmp_path):
    """One full-batch step from the same initialisation: the parameter change is lr times one fixed
    direction."""
    sweep = _tiny_sweep(tmp_path, "gn-lr-cpu", {"train.epochs": 1, "train.batch_size": 0})
    out = run_sweep(sweep, tmp_path / "out", progress=False)
    trials = make_trials(load_sweep(sweep))
    init = model_state(out / trials[0].name / "checkpoints" / "epoch_0000.pt")
    directions = []
    for trial in trials:
        lr = trial.overrides["optim.lr"]
        assert [r["lr"] for r in read_rows(out / trial.name / "steps.csv")] == [lr]
        final = load_checkpoint(out / trial.name / "checkpoints" / "last.pt")["model"]
        directions.append(
            torch.cat([((final[k] - init[k]) / lr).reshape(-1) for k in init if k.endswith("weight")])
        )
    assert len({t.overrides["optim.lr"] for t in trials}) == 6
    for d in directions[1:]:
        assert torch.allclose(d, directions[0], rtol=1e-3, atol=1e-6 * float(directions[0].abs().max()))


def test_weight_decay_sweep_shrinks_the_weights_by_lr_times_wd(tmp_path):
    sweep = _tiny_sweep(tmp_path, "weight-decay-cpu", {"train.epochs": 1, "train.batch_size": 0})
    out = run_sweep(sweep, tmp_path / "out", progress=False)
    trials = make_trials(load_sweep(sweep))
    assert [t.overrides["optim.weight_decay"] for t in trials] == [0.0, 1e-4, 1e-3, 1e-2, 1e-1]
    init = model_state(out / trials[0].name / "checkpoints" / "epoch_0000.pt")
    plain = load_checkpoint(out / trials[0].name / "checkpoints" / "last.pt")["model"]
    for trial in trials[1:]:
        wd = trial.overrides["optim.weight_decay"]
        final = load_checkpoint(out / trial.name / "checkpoints" / "last.pt")["model"]
        for k in init:
            if k.endswith("weight"):
                # theta_wd - theta_0 = -lr * wd * theta_init after one step with the same direction (lr = 0.2)
                assert torch.allclose(final[k] - plain[k], -0.2 * wd * init[k], rtol=1e-3, atol=5e-9)


def _one_step(cfg, x, y, *, dtype=torch.float64):
    cfg = from_dict(apply_overrides(to_dict(cfg), {"model.dtype": "float64"}))
    model = build_model(cfg, 784, 10)
    opt = build_optimizer(cfg, model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.manual_seed(0)
    opt.step(x.to(dtype), y)
    delta = {k: v.detach() - before[k] for k, v in model.named_parameters()}
    model.load_state_dict({**model.state_dict(), **before})
    return model, opt, delta


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(v.square().sum() for v in delta.values())))


def test_regularisation_study_varies_one_knob_at_a_time():
    from exactgn.lab.data import load_dataset

    spec = load_study("gn-regularisation-cpu", TINY)
    data = load_dataset("mnist-small", train_size=32, test_size=10, dtype=torch.float64)
    x, y = data.train.images, data.train.labels
    steps = {run.name: _one_step(run_config(spec, run, check_only=True), x, y) for run in spec.runs}
    cfgs = {run.name: run_config(spec, run, check_only=True).optim for run in spec.runs}
    assert (
        cfgs["least-squares"].gn.least_squares
        and cfgs["least-squares"].gn.rtol == 0
        and cfgs["reference"].gn.rtol == 1e-2
    )
    ranks = {
        n: sum(s.rank for s in steps[n][1].last_result.solves)
        for n in ("truncation-1e-3", "reference", "truncation-1e-1")
    }
    assert ranks["truncation-1e-3"] >= ranks["reference"] > ranks["truncation-1e-1"]
    ls = steps["least-squares"][1].last_result.solves
    assert all(s.method in ("cholesky", "qr") and s.rank == s.size for s in ls)  # 32 images: the exact step
    norms = [_norm(steps[n][2]) for n in ("least-squares", "damping-0.1", "damping-10", "damping-1000")]
    assert norms[0] > norms[1] > norms[2] > norms[3]
    ref = steps["reference"][2]
    for name, level in (("noise-0.1", 0.1), ("noise-1", 1.0)):
        noisy = steps[name][2]
        for k in ref:
            if k.endswith("weight"):
                rms = float((noisy[k] - ref[k]).square().mean().sqrt()) / float(ref[k].square().mean().sqrt())
                assert rms == pytest.approx(level, rel=0.05)


def test_no_bottleneck_study_trains_the_square_variant(tmp_path):
    out = run_study(
        "no-bottleneck-cpu",
        tmp_path / "nb",
        overrides=[
            f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in {**TINY, "train.epochs": 1}.items()
        ],
        progress=False,
    )
    for run in ("gn", "adam", "sgd", "gn-with-bottleneck"):
        ckpt = torch.load(out / run / "checkpoints" / "epoch_0000.pt", weights_only=True)
        square = run != "gn-with-bottleneck"
        assert ckpt["model_config"]["hidden"] == (None if square else 64)
        assert ckpt["model"]["blocks.1.f.weight"].shape == ((392, 392) if square else (392, 64))
        assert read_meta(out / run)["status"] == "finished"
        epochs = read_rows(out / run / "epochs.csv")
        assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_switch_optimiser_study_starts_each_run_from_the_other_optimisers_weights(tmp_path):
    overrides = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in TINY.items()]
    out = run_study("switch-optimiser-cpu", tmp_path / "sw", overrides=overrides, progress=False)
    for run, source, opt, source_opt in (
        ("adam-then-gn", "adam", "gn", "adam"),
        ("gn-then-adam", "gn", "adam", "gn"),
    ):
        start = out / source / "checkpoints" / "epoch_0005.pt"
        assert same(model_state(out / run / "checkpoints" / "epoch_0000.pt"), model_state(start))
        meta, source_meta = read_meta(out / run), read_meta(out / source)
        assert meta["optimiser"] == opt and source_meta["optimiser"] == source_opt
        assert meta["init_from"]["path"] == str(start.resolve()) and meta["init_from"]["epoch"] == 5
        assert meta["epochs_done"] == 5 and source_meta["epochs_done"] == 10
        # The switched run's epoch 0 is its source's epoch 5, seen by the same evaluation.
        assert (
            read_rows(out / run / "epochs.csv")[0]["test_loss"]
            == read_rows(out / source / "epochs.csv")[5]["test_loss"]
        )
        # Diagnostics measure against the weights the run started from.
        assert read_diagnostics(out / run / "diagnostics.jsonl")[0]["weight_rel_change/all"] == 0.0
    rows = {r["run"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["adam-then-gn"]["start_epoch"] == "5" and rows["gn-then-adam"]["optimiser"] == "adam"


def test_long_training_trains_each_optimiser_longer_than_the_main_runs():
    for name, main_epochs in (("long-training", 100), ("long-training-cpu", 10)):
        spec = load_study(name)
        cfgs = {run.name: run_config(spec, run, check_only=True) for run in spec.runs}
        assert sorted(c.optim.name for c in cfgs.values()) == ["adam", "gn", "sgd"]
        assert all(c.train.epochs >= 5 * main_epochs and c.diagnostics.enabled for c in cfgs.values())
        # Same data, model and batch setting for all three (only the optimiser differs).
        keys = lambda c: (to_dict(c.data), to_dict(c.model), c.train.epochs)  # noqa: E731
        assert len({repr(keys(c)) for c in cfgs.values()}) == 1


# ---------------------------------------------------------------------------- is it the inverse?
INVERSE_FILES = ("minibatch", "minibatch-truncated", "fullbatch", "fullbatch-truncated")


@pytest.mark.parametrize("size", ["", "-cpu"])
def test_inverse_sweeps_pair_the_two_inverses_and_differ_only_in_truncation(size):
    specs = {f: load_sweep(STUDIES_DIR / "inverse" / f"{f}{size}.toml") for f in INVERSE_FILES}
    for name, spec in specs.items():
        assert spec.grid["optim.gn.inverse"] == ["right", "pinv"] and len(spec.grid["seed"]) >= 3
        truncated = name.endswith("truncated")
        assert (spec.fixed["optim.gn.rtol"], spec.fixed["optim.gn.atol"]) == (
            (1e-2, 1e-5) if truncated else (0.0, 0.0)
        )
    for setting in ("minibatch", "fullbatch"):
        a, b = specs[setting], specs[f"{setting}-truncated"]
        assert a.base == b.base and a.grid == b.grid
        # noqa: E731
        strip = lambda d: {k: v for k, v in d.items() if k not in ("optim.gn.rtol", "optim.gn.atol")}
        assert strip(a.fixed) == strip(b.fixed)


def test_inverse_cpu_trials_make_the_same_function_step_with_different_parameter_steps():
    """The premise of the comparison, on the shipped CPU trials (shrunk): per seed, right and pinv change the
    logits of the batch by the same J·Δθ = lr·v, and pinv's parameter step is the shorter (minimum norm)."""
    from exactgn.lab.data import load_dataset

    spec = load_sweep(STUDIES_DIR / "inverse" / "minibatch-cpu.toml")
    data = load_dataset("mnist-small", train_size=32, test_size=10, dtype=torch.float64)
    x, y = data.train.images, data.train.labels
    by_seed: dict[int, dict[str, tuple]] = {}
    for trial in make_trials(spec):
        cfg = load_config(spec.base, {**spec.fixed, **trial.overrides, "model.hidden": 64})
        model, opt, delta = _one_step(cfg, x, y)
        assert opt.last_result.exact
        by_seed.setdefault(trial.overrides["seed"], {})[trial.overrides["optim.gn.inverse"]] = (
            jvp_logits(model, x, delta),
            delta,
        )
    for seed, pair in by_seed.items():
        (j_right, d_right), (j_pinv, d_pinv) = pair["right"], pair["pinv"]
        assert float((j_right - j_pinv).norm()) <= 1e-10 * float(j_pinv.norm())  # DESIGN §4's float64 bound
        assert _norm(d_pinv) < _norm(d_right)
        cos = sum(float((d_right[k] * d_pinv[k]).sum()) for k in d_right) / (_norm(d_right) * _norm(d_pinv))
        assert cos < 0.999  # different parameter steps
