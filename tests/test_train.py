"""The training loop: logs as the run-folder contract says, determinism, resume, Ctrl-C, divergence, the
CLI."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import data_root

from exactgn.cli import main as cli_main
from exactgn.lab import train as T
from exactgn.lab.checkpoint import load_checkpoint
from exactgn.lab.config import ConfigError, load_config, loads_config, to_dict
from exactgn.lab.rundir import EPOCH_FIELDS, STEP_FIELDS, read_jsonl, read_meta, read_rows
from exactgn.lab.steppers import build_model

TINY = """
name = "tiny"
seed = 3
[data]
dataset = "mnist-small"
train_size = 300
test_size = 100
[model]
hidden = 96
[optim]
name = "{opt}"
lr = {lr}
[optim.gn]
rtol = 1e-2
atol = 1e-5
[train]
epochs = {epochs}
batch_size = 128
checkpoint_every = 1
"""
LR = {"gn": 0.2, "adam": 1e-3, "sgd": 0.05}


def tiny(opt: str = "gn", epochs: int = 2, overrides: list[str] | None = None):
    return loads_config(TINY.format(opt=opt, lr=LR[opt], epochs=epochs), overrides or [])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_rows(run_dir / "steps.csv")]


# ---------------------------------------------------------------------------- the run folder
def test_run_folder_follows_the_contract(tmp_path):
    cfg = tiny("gn", epochs=2, overrides=["train.keep_checkpoints=true"])
    run = T.train(cfg, tmp_path / "run", progress=False)
    meta = read_meta(run)
    assert meta["status"] == "finished" and meta["epochs_done"] == 2 and meta["global_step"] == 6
    for key in (
        "exactgn_version",
        "git_revision",
        "torch_version",
        "device",
        "hostname",
        "start_time",
        "end_time",
    ):
        assert key in meta
    assert to_dict(load_config(run / "config.toml")) == to_dict(cfg)  # the resolved config reproduces the run
    steps = read_rows(run / "steps.csv")
    assert list(steps[0]) == list(STEP_FIELDS) and len(steps) == 6  # ceil(300/128) = 3 steps per epoch
    assert [r["batch_size"] for r in steps[:3]] == [128, 128, 44]
    assert [(r["epoch"], r["step"], r["global_step"]) for r in steps[2:4]] == [(1, 3, 3), (2, 1, 4)]
    for r in steps:
        assert r["loss_change_pct"] == pytest.approx(
            100 * (r["loss_after"] - r["loss"]) / r["loss"], rel=1e-9
        )
        assert 0 <= r["accuracy"] <= 1 and r["lr"] == 0.2 and r["step_time_s"] > 0
    epochs = read_rows(run / "epochs.csv")
    assert list(epochs[0])[: len(EPOCH_FIELDS)] == list(EPOCH_FIELDS) and [r["epoch"] for r in epochs] == [
        0,
        1,
        2,
    ]
    assert epochs[0]["mean_loss_change_pct"] is None and epochs[0]["epoch_time_s"] == 0
    assert epochs[1]["mean_loss_change_pct"] == pytest.approx(
        sum(r["loss_change_pct"] for r in steps[:3]) / 3
    )
    assert epochs[2]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[2]["wall_time_s"] > epochs[1]["wall_time_s"] > 0
    # JSON lines hold the same rows.
    assert [r["loss"] for r in read_jsonl(run / "steps.jsonl")] == [r["loss"] for r in steps]
    assert [r["test_accuracy"] for r in read_jsonl(run / "epochs.jsonl")] == [
        r["test_accuracy"] for r in epochs
    ]
    check_checkpoints(run, cfg)


def check_checkpoints(run: Path, cfg) -> None:
    """The checkpoints of a finished two-epoch run with train.keep_checkpoints = true."""
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt"]
    epoch_ckpt = torch.load(run / "checkpoints" / "epoch_0002.pt", weights_only=True)
    assert set(epoch_ckpt) == {"model", "model_config", "epoch"} and epoch_ckpt["epoch"] == 2
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert all(torch.equal(epoch_ckpt["model"][k], last["model"][k]) for k in last["model"])
    assert set(last["rng"]) == {"torch", "cuda", "numpy", "python", "data"}
    assert not (run / "diagnostics.jsonl").exists()  # no diagnostics asked for
    # The epoch-0 checkpoint is the untrained model.
    fresh = build_model(cfg, 784, 10)
    init = torch.load(run / "checkpoints" / "epoch_0000.pt", weights_only=True)["model"]
    assert all(torch.equal(init[k], v) for k, v in fresh.state_dict().items())


def test_runs_are_deterministic_and_seeded(tmp_path):
    a = T.train(tiny("adam"), tmp_path / "a", progress=False)
    b = T.train(tiny("adam"), tmp_path / "b", progress=False)
    c = T.train(tiny("adam", overrides=["seed=4"]), tmp_path / "c", progress=False)
    assert losses(a) == losses(b) and same_weights(a, b)
    assert losses(a) != losses(c)


def test_full_batch_and_data_order(tmp_path):
    run = T.train(tiny("sgd", overrides=["train.batch_size=0"]), tmp_path / "fb", progress=False)
    assert [r["batch_size"] for r in read_rows(run / "steps.csv")] == [300, 300]
    run = T.train(tiny("sgd", overrides=["train.drop_last=true"]), tmp_path / "dl", progress=False)
    assert [r["batch_size"] for r in read_rows(run / "steps.csv")] == [128] * 4


def test_callbacks_write_diagnostics(tmp_path):
    seen = []

    class Probe:
        def on_epoch_end(self, epoch, model, optimizer):
            seen.append((epoch, type(optimizer).__name__, model.training))
            return {"norm": float(model.blocks[0].f.weight.detach().norm())} if epoch != 1 else {}

    run = T.train(tiny("gn"), tmp_path / "run", callbacks=[Probe()], progress=False)
    assert [s[:2] for s in seen] == [(0, "GaussNewton"), (1, "GaussNewton"), (2, "GaussNewton")]
    records = read_jsonl(run / "diagnostics.jsonl")
    assert [r["epoch"] for r in records] == [0, 2] and all(r["diagnostics_time_s"] >= 0 for r in records)
    assert records[0]["norm"] != records[1]["norm"]


# ---------------------------------------------------------------------------- resume and Ctrl-C
@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test (other libraries, e.g. Ray Tune, may leave theirs installed):
    the training loop takes Ctrl-C over only from the default handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _interrupt_at(monkeypatch, global_step: int, *, hard: bool = False) -> None:
    """Make the ``global_step``-th step send SIGINT to this process (a real Ctrl-C), or raise
    KeyboardInterrupt from inside the step (``hard``: as a second Ctrl-C would)."""
    original = T._Run._take_step
    count = {"n": 0}

    def step(self, x, y):
        count["n"] += 1
        if count["n"] == global_step:
            if hard:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, x, y)

    monkeypatch.setattr(T._Run, "_take_step", step)


@pytest.mark.parametrize("opt", ["gn", "adam", "sgd"])
def test_ctrl_c_mid_epoch_then_resume_is_bit_identical(tmp_path, monkeypatch, opt, default_sigint):
    extra = {"gn": ["optim.gn.noise=0.1"], "adam": [], "sgd": ["optim.sgd.momentum=0.9"]}[opt]
    cfg = tiny(opt, epochs=3, overrides=["data.augment=true", "train.checkpoint_every=2"] + extra)
    whole = T.train(cfg, tmp_path / "whole", progress=False)
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)
        with pytest.raises(T.TrainingInterrupted) as err:
            T.train(cfg, tmp_path / "part", progress=False)
    part = tmp_path / "part"
    assert err.value.saved and err.value.global_step == 5 and isinstance(err.value, KeyboardInterrupt)
    meta = read_meta(part)
    assert meta["status"] == "interrupted" and "--resume" in meta["message"]
    position = load_checkpoint(part / "checkpoints" / "last.pt")["position"]
    assert (position["epoch"], position["steps_done"], position["epochs_done"]) == (2, 2, 1)
    T.train(None, resume=part, progress=False)
    assert read_meta(part)["status"] == "finished" and len(read_meta(part)["resumed"]) == 1
    assert same_weights(whole, part)
    assert losses(whole) == losses(part)
    # noqa: E731
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]
    assert strip(read_rows(whole / "epochs.csv")) == strip(read_rows(part / "epochs.csv"))


def test_hard_interrupt_keeps_the_last_checkpoint_and_resumes_identically(
    tmp_path, monkeypatch, default_sigint
):
    cfg = tiny("gn", epochs=3, overrides=["train.checkpoint_every=2"])
    whole = T.train(cfg, tmp_path / "whole", progress=False)
    with monkeypatch.context() as m:
        _interrupt_at(m, 8, hard=True)  # inside a step of epoch 3, after the checkpoint of epoch 2
        with pytest.raises(T.TrainingInterrupted) as err:
            T.train(cfg, tmp_path / "part", progress=False)
    part = tmp_path / "part"
    assert not err.value.saved and err.value.epochs_done == 2
    assert load_checkpoint(part / "checkpoints" / "last.pt")["position"]["epochs_done"] == 2
    assert len(read_rows(part / "steps.csv")) == 7
    T.train(None, resume=part, progress=False)
    assert same_weights(whole, part) and losses(whole) == losses(part)
    assert [r["epoch"] for r in read_rows(part / "epochs.csv")] == [0, 1, 2, 3]


def test_interrupt_at_epoch_end_and_train_longer(tmp_path):
    class StopAfterEpoch1:
        def on_epoch_end(self, epoch, model, optimizer):
            if epoch == 1:
                raise KeyboardInterrupt

    whole = T.train(tiny("sgd", epochs=3), tmp_path / "whole", progress=False)
    part = tmp_path / "part"
    with pytest.raises(T.TrainingInterrupted):
        T.train(tiny("sgd", epochs=2), part, callbacks=[StopAfterEpoch1()], progress=False)
    T.train(None, resume=part, progress=False)  # finishes epoch 2
    assert read_meta(part)["epochs_done"] == 2
    with pytest.raises(ValueError, match="already finished all 2 epochs.*--set train.epochs"):
        T.train(None, resume=part, progress=False)
    T.train(None, resume=part, overrides=["train.epochs=3"], progress=False)
    assert same_weights(whole, part)
    assert load_config(part / "config.toml").train.epochs == 3


def test_resume_refuses_changes_that_would_make_another_run(tmp_path):
    run = T.train(tiny("sgd", epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match=r"--set optim.lr: cannot be changed when resuming"):
        T.train(None, resume=run, overrides=["optim.lr=1"], progress=False)
    text = (run / "config.toml").read_text().replace("lr = 0.05", "lr = 0.5")
    (run / "config.toml").write_text(text)
    with pytest.raises(ValueError, match=r"optim.lr is 0.5 but the checkpoint was made with 0.05"):
        T.train(None, resume=run, overrides=["train.epochs=2"], progress=False)
    with pytest.raises(FileExistsError, match="already exists and is not empty.*--resume"):
        T.train(tiny("sgd"), run, progress=False)
    with pytest.raises(FileNotFoundError, match="not an exactgn run folder"):
        T.train(None, resume=tmp_path, progress=False)


# ---------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("opt, lr", [("gn", 1e38), ("sgd", 1e30)])
def test_a_diverging_run_stops_cleanly_and_keeps_its_last_good_checkpoint(tmp_path, opt, lr, capsys):
    cfg = tiny(opt, epochs=3, overrides=[f"optim.lr={lr}", "train.batch_size=0"])
    run = T.train(cfg, tmp_path / "run", progress=False)
    meta = read_meta(run)
    assert meta["status"] == "diverged" and "diverged" in meta["message"] and "optim.lr" in meta["message"]
    assert "exactgn: run diverged" in capsys.readouterr().err
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")  # intact and loadable
    good = ckpt["position"]["epochs_done"]
    assert meta["epochs_done"] == good < 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [r["epoch"] for r in read_rows(run / "epochs.csv")] == list(range(good + 1))
    with pytest.raises(ValueError, match="diverged; resuming would repeat"):
        T.train(None, resume=run, progress=False)


def test_gn_batch_above_the_rank_bound_is_refused_up_front(tmp_path):
    cfg = loads_config(
        TINY.format(opt="gn", lr=0.2, epochs=1),
        [
            "optim.gn.rtol=0.0",
            "optim.gn.atol=0.0",
            "data.train_size=500",
            "train.batch_size=0",
            "model.hidden=600",
        ],
    )
    with pytest.raises(ConfigError, match=r"batches of 500 .*batch <= 393.*optim.gn.least_squares = true"):
        T.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing is created for a refused config


# ---------------------------------------------------------------------------- real MNIST, full-batch GN
@pytest.mark.slow
@pytest.mark.parametrize("inverse", ["right", "pinv"])
def test_full_batch_gn_fits_real_mnist_in_three_steps(tmp_path, inverse):
    """Over-parameterised (h = 512 ≥ B = 300, B ≤ 393), MSE, lr = 1: each GN step fits the linearised model to
    the targets, and a few steps cut the training loss by at least 99%."""
    root = data_root()
    if root is None or not (root / "MNIST" / "raw").is_dir():
        pytest.fail(
            "the real MNIST files are needed: set EXACTGN_DATA to the folder holding MNIST/raw/ (CI: "
            "../shared/data)"
        )
    cfg = loads_config(f"""
name = "fit"
[data]
dataset = "mnist"
root = "{root}"
train_size = 300
test_size = 500
[model]
blocks = 2
hidden = 512
[optim]
name = "gn"
lr = 1.0
[optim.gn]
inverse = "{inverse}"
# the identity block's A = [b, 1] is numerically rank-deficient on MNIST
least_squares = {"true" if inverse == "right" else "false"}
[train]
loss = "mse"
epochs = 3
batch_size = 0
""")
    run = T.train(cfg, tmp_path / inverse, progress=False)
    epochs = read_rows(run / "epochs.csv")
    assert read_meta(run)["status"] == "finished"
    start, end = epochs[0]["train_loss"], epochs[-1]["train_loss"]
    assert end <= 0.01 * start, f"training loss {start:.4g} → {end:.4g} in 3 steps"
    assert epochs[-1]["train_accuracy"] == 1.0


# ---------------------------------------------------------------------------- command line
def _tiny_setting(folder: Path) -> Path:
    folder.mkdir()
    for opt in ("gn", "adam", "sgd"):
        (folder / f"{opt}.toml").write_text(TINY.format(opt=opt, lr=LR[opt], epochs=1))
    return folder


def test_cli_train_and_errors(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY.format(opt="adam", lr=1e-3, epochs=1))
    assert (
        cli_main(["train", str(cfg), "--out", str(tmp_path / "r"), "--set", "train.epochs=2", "--quiet"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("finished: ") and "2 epochs, 6 steps" in out
    assert read_meta(tmp_path / "r")["epochs_done"] == 2
    assert cli_main(["train", "--resume", str(tmp_path / "r"), "--set", "train.epochs=3", "--quiet"]) == 0
    assert read_meta(tmp_path / "r")["epochs_done"] == 3
    for argv, message in (
        (["train", str(cfg), "--set", "optim.lr=abc"], "optim.lr: expected a number, got 'abc'"),
        (["train", str(cfg), "--set", "optim.lrr=1"], "optim.lrr: unknown key (did you mean 'lr'?)"),
        (["train", "no-such-experiment"], "no shipped experiment of that name"),
        (["train"], "a CONFIG is needed"),
        (["train", str(cfg), "--resume", str(tmp_path / "r")], "not both"),
        (["train", str(cfg), "--out", str(tmp_path / "r")], "already exists and is not empty"),
        (
            ["train", "mnist-fullbatch-cpu/gn", "--data-root", str(tmp_path / "nothing")],
            "missing train-images-idx3-ubyte.gz",
        ),
    ):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("exactgn train: error: ") and message in err and "\n" not in err


def test_cli_compare_writes_the_table(tmp_path, capsys):
    setting = _tiny_setting(tmp_path / "tiny-setting")
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(setting), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for name in ("| GN |", "| Adam |", "| SGD |", "final test acc %", "best test acc % (epoch)"):
        assert name in printed
    assert (out / "comparison.md").read_text() in printed
    rows = read_rows(out / "comparison.csv")
    assert [r["optimiser"] for r in rows] == ["gn", "adam", "sgd"]
    for r in rows:
        epochs = read_rows(out / r["optimiser"] / "epochs.csv")
        assert r["final_test_accuracy"] == epochs[-1]["test_accuracy"]
        assert r["best_train_loss"] == min(e["train_loss"] for e in epochs[1:])
        assert r["status"] == "finished" and r["epochs"] == 1
    # An interrupted comparison continues: finished runs are kept, missing ones are trained.
    import shutil

    shutil.rmtree(out / "sgd")
    (out / "comparison.md").unlink()
    mtime = (out / "gn" / "meta.json").stat().st_mtime_ns
    assert cli_main(["compare", str(setting), "--resume", str(out), "--quiet"]) == 0
    assert (out / "gn" / "meta.json").stat().st_mtime_ns == mtime and read_meta(out / "sgd")[
        "status"
    ] == "finished"
    capsys.readouterr()
    assert cli_main(["compare", "no-such-setting"]) == 2
    assert "shipped: " in capsys.readouterr().err


@pytest.mark.slow
def test_cli_demo_runs_on_the_bundled_data(tmp_path, capsys):
    """The demo's own settings, shortened to one epoch."""
    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--set", "train.epochs=1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| GN |") == 2 and "demo-fullbatch" in printed and "demo-minibatch" in printed
    assert "Full batch: GN's training loss ended at" in printed
    for setting in ("demo-fullbatch", "demo-minibatch"):
        for opt in ("gn", "adam", "sgd"):
            meta = read_meta(tmp_path / "demo" / setting / opt)
            assert meta["status"] == "finished" and meta["dataset"] == "mnist-small"


def test_help_explains_each_command(capsys):
    for command, words in (
        ("train", ["--resume", "--set", "mnist-fullbatch/gn", "Ctrl-C"]),
        ("compare", ["gn.toml", "comparison.md", "mnist-fullbatch-cpu"]),
        ("demo", ["bundled", "minutes"]),
    ):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        text = capsys.readouterr().out
        for w in words:
            assert w in text, (command, w)


def test_tensorboard_events_when_installed_and_none_otherwise(tmp_path, monkeypatch):
    import importlib.util
    import sys

    run = T.train(tiny("sgd", epochs=1), tmp_path / "tb", progress=False)
    if importlib.util.find_spec("tensorboard") is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        logged = [(e.step, e.value) for e in acc.Scalars("epoch/test_loss")]
        expected = [(r["epoch"], r["test_loss"]) for r in read_rows(run / "epochs.csv")]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(logged, expected))
        assert len(acc.Scalars("step/loss_change_pct")) == 3
    else:
        assert not (run / "tensorboard").exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    run = T.train(tiny("sgd", epochs=1), tmp_path / "no-tb", progress=False)
    assert not (run / "tensorboard").exists() and read_meta(run)["status"] == "finished"


def test_validation_split_is_logged_and_does_not_change_training(tmp_path):
    from exactgn.lab.data import load_dataset
    from exactgn.lab.diagnostics import load_checkpoint_model, probe_inputs

    plain = T.train(tiny("adam", epochs=2), tmp_path / "plain", progress=False)
    cfg = tiny("adam", epochs=2, overrides=["data.val_size=150", "data.val_seed=9"])
    run = T.train(cfg, tmp_path / "val", progress=False)
    assert same_weights(plain, run)  # the training subset (first 300 images) is the same with validation on
    epochs, before = read_rows(run / "epochs.csv"), read_rows(plain / "epochs.csv")
    assert all(r["val_loss"] is None and r["val_accuracy"] is None for r in before)
    assert read_meta(run)["val_size"] == 150 and read_meta(plain)["val_size"] == 0
    data = load_dataset("mnist-small", train_size=300, test_size=100, val_size=150, val_seed=9)
    model, epoch = load_checkpoint_model(run / "checkpoints" / "last.pt")
    loss, acc = T.evaluate(model, data.val.images, data.val.labels, "cross_entropy", 2000)
    assert epoch == 2 and epochs[-1]["val_loss"] == pytest.approx(loss, rel=1e-12)
    assert epochs[-1]["val_accuracy"] == acc
    assert epochs[-1]["val_loss"] != pytest.approx(epochs[-1]["test_loss"], rel=1e-6)
    logged = [r["val_accuracy"] for r in read_jsonl(run / "epochs.jsonl")]
    assert logged == [r["val_accuracy"] for r in epochs]
    # With train_size = 0 the probe batch of the diagnostics skips the held-out images, as training does.
    cfg = tiny("adam", overrides=["data.train_size=0", "data.val_size=4000", "data.val_seed=1"])
    full = load_dataset("mnist-small", val_size=4000, val_seed=1)
    assert torch.equal(probe_inputs(cfg, 16), full.train.images[:16].reshape(16, -1))
    with pytest.raises(ConfigError, match="data.val_size: must be >= 0"):
        tiny("adam", overrides=["data.val_size=-5"])
