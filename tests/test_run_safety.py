"""Run-folder safety with real ``exactgn train`` processes: concurrent runs, kills between checkpoint
writes, a kill before the first checkpoint, SIGTERM, a closed output pipe, and resume warnings."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from exactgn.cli import main as cli_main
from exactgn.lab import train as T
from exactgn.lab.checkpoint import load_checkpoint
from exactgn.lab.config import ConfigError, loads_config
from exactgn.lab.rundir import RunInUse, RunLock, lock_holder, read_meta, read_rows, run_status, write_meta

ROOT = Path(__file__).resolve().parents[1]
TINY = """
name = "tiny"
seed = 5
[data]
dataset = "mnist-small"
train_size = 200
test_size = 50
[model]
hidden = 32
[optim]
name = "adam"
lr = 1e-3
[train]
epochs = {epochs}
batch_size = 50
checkpoint_every = 1
keep_checkpoints = true
threads = 1
"""


def _config(folder: Path, epochs: int = 2) -> Path:
    path = folder / f"tiny{epochs}.toml"
    path.write_text(TINY.format(epochs=epochs))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    env.pop("EXACTGN_TEST_KILL_AT", None)
    env.update(extra)
    return env


def _exactgn(*args: str, **popen) -> subprocess.Popen:
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    popen.setdefault("env", _env())
    return subprocess.Popen([sys.executable, "-m", "exactgn", *map(str, args)], text=True, **popen)


def _run(*args: str, **popen) -> subprocess.CompletedProcess:
    proc = _exactgn(*args, **popen)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _leftovers(run: Path) -> list[str]:
    return [p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if ".tmp-" in p.name]


# ---------------------------------------------------------------------------- 1: concurrent runs
def test_two_concurrent_trains_into_one_folder_one_is_refused(tmp_path):
    cfg, out = _config(tmp_path), tmp_path / "same"
    procs = [_exactgn("train", cfg, "--out", out, "--quiet") for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    refused = next(r for r in results if r[2] == 2)[1]
    assert "in use by process" in refused or "already exists and is not empty" in refused
    steps = [r["global_step"] for r in read_rows(out / "steps.csv")]
    assert steps == list(range(1, 9))  # every step once
    assert read_meta(out)["status"] == "finished" and not (out / ".lock").exists()


def test_a_live_run_refuses_a_second_train_and_a_resume_naming_its_process(tmp_path):
    cfg, out = _config(tmp_path, epochs=400), tmp_path / "live"
    first = _exactgn("train", cfg, "--out", out, "--quiet")
    try:
        _wait_for(lambda: len(read_rows(out / "steps.csv")) > 0)
        for argv in (("train", cfg, "--out", out), ("train", "--resume", out)):
            second = _run(*argv, "--quiet")
            assert second.returncode == 2
            assert f"is in use by process {first.pid}" in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait()
    steps = [r["global_step"] for r in read_rows(out / "steps.csv")]
    assert steps == list(range(1, len(steps) + 1))


def test_runs_without_out_started_together_get_their_own_folders(tmp_path):
    cfg = _config(tmp_path, epochs=1)
    procs = [_exactgn("train", cfg, "--quiet", cwd=tmp_path) for _ in range(2)]
    for proc in procs:
        proc.communicate(timeout=300)
    assert [p.returncode for p in procs] == [0, 0]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert [r["global_step"] for r in read_rows(run / "steps.csv")] == [1, 2, 3, 4]


def test_a_stale_lock_of_a_dead_process_is_reported_and_replaced(tmp_path, capsys, keep_threads):
    run = tmp_path / "r"
    T.train(loads_config(TINY.format(epochs=1)), run, progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    RunLock(run).acquire()  # this process's lock ...
    lock = (run / ".lock").read_text()
    (run / ".lock").write_text(lock.replace(f'"pid": {os.getpid()}', f'"pid": {dead.pid}'))
    T.train(None, resume=run, overrides=["train.epochs=2"], progress=False)
    assert f"removing a stale lock of process {dead.pid}" in capsys.readouterr().err
    assert read_meta(run)["epochs_done"] == 2 and not (run / ".lock").exists()
    with RunLock(run), pytest.raises(RunInUse, match=f"in use by process {os.getpid()}"):
        T.train(None, resume=run, overrides=["train.epochs=3"], progress=False)


def _stale_lock(run, dead_pid):
    """A lock on ``run`` that looks as if the dead process ``dead_pid`` had taken it."""
    run.mkdir(exist_ok=True)
    RunLock(run).acquire()
    lock = (run / ".lock").read_text()
    (run / ".lock").write_text(lock.replace(f'"pid": {os.getpid()}', f'"pid": {dead_pid}'))


def _dead_pid():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_a_stale_lock_replaced_meanwhile_is_not_removed_again(tmp_path, capsys):
    """Two processes find the same stale lock; the first replaces it; the second, acting on what it read
    before, must not remove the first one's live lock (the double-removal race)."""
    run = tmp_path / "r"
    _stale_lock(run, _dead_pid())
    seen_by_second = lock_holder(run)
    assert seen_by_second["alive"] is False
    first = RunLock(run).acquire()  # replaces the stale lock
    assert RunLock(run).remove_stale(seen_by_second) is False
    assert lock_holder(run)["pid"] == os.getpid() and first.held
    with pytest.raises(RunInUse, match=f"in use by process {os.getpid()}"):
        RunLock(run).acquire()
    assert capsys.readouterr().err.count("removing a stale lock") == 1


def test_a_breaker_left_by_a_dead_process_is_cleared(tmp_path):
    run = tmp_path / "r"
    _stale_lock(run, _dead_pid())
    (run / ".lock.break").write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    lock = RunLock(run).acquire()
    assert lock.held and lock_holder(run)["pid"] == os.getpid() and not (run / ".lock.break").exists()


def test_a_live_breaker_keeps_others_from_removing_the_stale_lock(tmp_path):
    run = tmp_path / "r"
    dead = _dead_pid()
    _stale_lock(run, dead)
    (run / ".lock.break").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live remover
    with pytest.raises(RunInUse, match="could not take the lock"):
        RunLock(run).acquire()
    assert lock_holder(run)["pid"] == dead  # left to the live remover


# ---------------------------------------------------------------------------- 2, 3: kills between writes
@pytest.mark.parametrize(
    "point",
    [
        "after-write:last.pt:2",  # epoch 1's last.pt is written (and, in this order, its epoch file)
        "after-write:epoch_0001.pt",  # the epoch file is written, last.pt is not yet
        "before-rename:epoch_0001.pt",  # the epoch file's temporary is complete, not yet renamed
        "before-rename:last.pt:2",
        "before-rename:last.pt:1",  # before the first checkpoint: the resume restarts the run
    ],
)
def test_a_kill_between_checkpoint_writes_loses_nothing(tmp_path, point):
    cfg = _config(tmp_path)
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _run("train", cfg, "--out", whole, "--quiet").returncode == 0
    killed = _run("train", cfg, "--out", part, "--quiet", env=_env(EXACTGN_TEST_KILL_AT=point))
    assert killed.returncode == -signal.SIGKILL
    assert bool(_leftovers(part)) == point.startswith("before-rename")
    again = _run("train", "--resume", part)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == [
        "epoch_0000.pt",
        "epoch_0001.pt",
        "epoch_0002.pt",
        "last.pt",
    ]
    assert not _leftovers(part) and _same_weights(whole, part)
    assert [r["global_step"] for r in read_rows(part / "steps.csv")] == list(range(1, 9))
    assert [r["epoch"] for r in read_rows(part / "epochs.csv")] == [0, 1, 2]
    if point.endswith("last.pt:1"):
        assert "restarting it from the beginning" in again.stderr
    else:
        assert "resuming at epoch" in again.stderr


# ---------------------------------------------------------------------------- 4: SIGTERM, closed pipes
def test_sigterm_stops_like_ctrl_c_and_the_resume_says_where_it_continues(tmp_path):
    cfg, run = _config(tmp_path, epochs=400), tmp_path / "r"
    proc = _exactgn("train", cfg, "--out", run, "--quiet")
    _wait_for(lambda: len(read_rows(run / "steps.csv")) >= 6)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    meta = read_meta(run)
    assert meta["status"] == "interrupted" and "--resume" in meta["message"]
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    logged = len(read_rows(run / "steps.csv"))
    assert saved["global_step"] == logged  # the exact position, not the last epoch's checkpoint
    pos = saved["position"]
    epoch = pos["epoch"] if pos["epoch"] is not None else pos["epochs_done"] + 1
    done = pos["epochs_done"] + 1
    again = _run("train", "--resume", run, "--set", f"train.epochs={done}")
    assert again.returncode == 0, again.stderr
    assert f"resuming at epoch {epoch}, step {logged} of {done * 4}" in again.stderr


def test_a_closed_output_pipe_neither_fails_nor_rewinds_a_run(tmp_path):
    cfg, run = _config(tmp_path, epochs=400), tmp_path / "r"
    read, write = os.pipe()
    proc = _exactgn("train", cfg, "--out", run, stdout=write, stderr=write)  # ... | tee log
    os.close(write)
    _wait_for(lambda: len(read_rows(run / "steps.csv")) >= 2)
    os.close(read)  # tee is gone
    seen = len(read_rows(run / "steps.csv"))
    _wait_for(lambda: len(read_rows(run / "steps.csv")) >= seen + 12)  # the progress bar wrote meanwhile
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode == 130
    meta = read_meta(run)
    assert meta["status"] == "interrupted", meta["message"]
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["global_step"]
    assert saved == len(read_rows(run / "steps.csv"))


# ---------------------------------------------------------------------------- 5, 6: threads
def test_resume_with_other_threads_warns(tmp_path, capsys, keep_threads):
    run = tmp_path / "r"
    T.train(loads_config(TINY.format(epochs=1)), run, progress=False)
    T.train(None, resume=run, overrides=["train.epochs=2"], progress=False)
    assert "threads" not in capsys.readouterr().err
    T.train(None, resume=run, overrides=["train.epochs=3", "train.threads=2"], progress=False)
    err = capsys.readouterr().err
    assert "used 1 torch threads and resumes with 2" in err and "not be bit-identical" in err
    assert read_meta(run)["threads"] == 2


def test_threads_beyond_the_machine_are_refused_before_the_folder_is_used(tmp_path):
    cfg = loads_config(TINY.format(epochs=1), ["train.threads=100000"])
    with pytest.raises(ConfigError, match=r"train.threads = 100000 exceeds the \d+ cores"):
        T.train(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- 10, 11: diagnose, report
def test_diagnose_without_kept_checkpoints_refuses_with_the_way_out(tmp_path, capsys, keep_threads):
    run = tmp_path / "r"
    T.train(loads_config(TINY.format(epochs=2), ["train.keep_checkpoints=false"]), run, progress=False)
    assert cli_main(["diagnose", str(run), "--probe-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "kept: epoch_0000.pt" in err and "--set train.keep_checkpoints=true" in err
    assert not (run / "diagnostics.jsonl").exists()
    from exactgn.lab.diagnostics import diagnose_run

    with pytest.raises(ValueError, match="keeps no epoch checkpoints after the initial one"):  # the API too
        diagnose_run(run, probe_size=8, out=False)


def test_report_shows_each_runs_status_and_flags_a_dead_running_run(tmp_path, capsys, keep_threads):
    runs = tmp_path / "runs"
    for name in ("done", "killed", "live"):
        T.train(loads_config(TINY.format(epochs=1), [f'name="{name}"']), runs / name, progress=False)
    for name in ("killed", "live"):  # as a SIGKILLed / a live run leaves it
        meta = read_meta(runs / name)
        write_meta(runs / name, {**meta, "status": "running"})
    # a single diagnostics record at epoch 0 (the initial model) is not a final value
    (runs / "done" / "diagnostics.jsonl").write_text('{"epoch": 0, "ntk_alignment": 1.0}\n')
    assert run_status(runs / "killed", read_meta(runs / "killed")) == "running (process gone)"
    with RunLock(runs / "live"):
        assert run_status(runs / "live", read_meta(runs / "live")) == "running"
        assert cli_main(["report", str(runs), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    summary = page[page.index("<h2>Summary</h2>") : page.index("<h2>Runs</h2>")]
    row = summary[summary.index("<tr><td>") :].split("</tr>")[0]
    cells = [c.split(">", 1)[1] for c in row.split("</td>")[:-1]]
    assert cells[1:3] == ["3", "finished, running (process gone), running"]
    assert cells[8] == "–"  # NTK alignment (last): no final record, not the initial 1
    assert 1 < float(cells[6].split()[0]) <= 100  # final test accuracy, in percent


# ---------------------------------------------------------------------------- 8: config and disk errors
def test_config_errors_name_the_file_the_key_and_the_override(tmp_path, capsys):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    good = _config(tmp_path, epochs=1)
    for argv, message in (
        (["train", str(bad)], f"{bad}: not UTF-8 text (byte 11); save it as UTF-8"),
        (["train", str(good), "--set", "optim.lr=0"], "optim.lr: must be > 0"),
        (["train", str(good), "--set", "seed=1e20"], "seed: "),
        (["train", str(good), "--set", "train.epochs=abc"], "--set train.epochs: "),
    ):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        if "--set" in argv:
            assert err.startswith("exactgn train: error: --set ") and "not in" in err, err
    cfg = loads_config(TINY.format(epochs=1), ["seed=4611686018427387904"])  # 2**62: the largest allowed
    assert cfg.seed == 2**62


def test_a_full_disk_names_the_file_and_the_way_to_resume(tmp_path, monkeypatch, keep_threads):
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up while epoch 1's weights are written
        if ".epoch_0001.pt.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "r"
    pattern = r"while writing .*epoch_0001\.pt; .*exactgn train --resume .*r$"
    with pytest.raises(OSError, match=pattern) as err:
        T.train(loads_config(TINY.format(epochs=2)), run, progress=False)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert read_meta(run)["status"] == "failed" and not _leftovers(run)
    T.train(None, resume=run, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[:3] == [
        "epoch_0000.pt",
        "epoch_0001.pt",
        "epoch_0002.pt",
    ]


# ---------------------------------------------------------------------------- 12: sweeps
SWEEP = """
name = "quiet"
base = "demo-minibatch/gn"
backend = "ray"
[set]
"train.epochs" = 1
"data.train_size" = 200
"data.test_size" = 50
"model.hidden" = 32
"train.batch_size" = 100
[grid]
seed = [0, 1]
"""


def test_a_ray_sweep_is_quiet_by_default_says_its_threads_and_writes_under_runs(
    tmp_path, monkeypatch, capfd, keep_threads
):
    from exactgn.lab.sweep import run_sweep

    (tmp_path / "s.toml").write_text(SWEEP)
    monkeypatch.chdir(tmp_path)
    out = run_sweep(tmp_path / "s.toml")
    assert out == tmp_path / "runs" / "sweeps" / "quiet"
    assert [read_meta(out / t)["status"] for t in ("trial-000", "trial-001")] == ["finished"] * 2
    err = capfd.readouterr().err
    assert "sweep quiet: 2 trials (ray), up to" in err and "each trial uses 1 torch thread(s)" in err
    assert "2/2" in err  # the progress bar over trials
    assert "Trial status" not in err and "Trial name" not in err and len(err.splitlines()) < 30, err


# ---------------------------------------------------------------------------- 6: memory
@pytest.mark.parametrize("override", ["model.blocks=1000000000", "model.hidden=100000000000"])
def test_a_model_that_cannot_fit_is_refused_with_the_numbers(tmp_path, override, keep_threads):
    cfg = loads_config(TINY.format(epochs=1), [override])
    pattern = r"needs about [\d.e+]+ GiB \(parameters .* GiB are free on cpu; make"
    with pytest.raises(ConfigError, match=pattern):
        T.train(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("bottleneck", [True, False])
def test_the_memory_estimate_counts_the_models_tensors(bottleneck):
    from exactgn.lab.steppers import build_model

    cfg = loads_config(TINY.format(epochs=1), [f"model.bottleneck={str(bottleneck).lower()}"])
    model = build_model(cfg, 784, 10)
    tensors = [*model.parameters(), *model.buffers()]
    parts = T.estimate_memory(cfg, 784, 10, 50)
    assert parts["parameters"] == sum(t.numel() * t.element_size() for t in tensors)
    assert parts["gradients"] == sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------------- 11: figures
def test_figures_state_the_band_show_accuracy_in_percent_and_one_point_on_its_own_tick(
    tmp_path, monkeypatch, keep_threads
):
    from exactgn.lab.report import figures, make_report

    runs = tmp_path / "runs"
    for seed in (0, 1):
        T.train(loads_config(TINY.format(epochs=1), [f"seed={seed}"]), runs / f"s{seed}", progress=False)
        (runs / f"s{seed}" / "diagnostics.jsonl").write_text('{"epoch": 0, "ntk_alignment": 1.0}\n')
    drawn = {}
    original = figures._save

    def keep(fig, path):
        drawn[path.name.split("-")[0]] = fig
        return original(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    make_report([runs], tmp_path / "rep", band="minmax")
    curves = drawn["curves"]
    assert "mean over seeds, band = min–max" in [t.get_text() for t in curves.texts]
    accuracy = next(ax for ax in curves.axes if ax.get_ylabel() == "test accuracy (%)")
    values = [y for line in accuracy.get_lines() for y in line.get_ydata()]
    assert 1 < max(values) <= 100
    ntk = drawn["ntk"].axes[0]
    assert list(ntk.get_xticks()) == [0] and ntk.get_xlim() == (-1, 1)


def test_a_study_or_sweep_never_deletes_a_folder_a_live_run_holds(tmp_path):
    from exactgn.lab.rundir import remove_run

    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "steps.csv").write_text("epoch\n")
    with RunLock(run), pytest.raises(RunInUse, match=f"in use by process {os.getpid()}"):
        remove_run(run)
    assert (run / "steps.csv").exists()
    remove_run(run)
    assert not run.exists()


def test_a_lock_is_never_seen_half_written(tmp_path, monkeypatch):
    """A lock is created with its record in one step: a second taker that arrives while the first is still
    writing must find a live lock, never an empty one that it would take for stale and remove (two runs in one
    folder; seen once in a real concurrent pair)."""
    import threading
    import time as _time

    from exactgn.lab import rundir

    real_now = rundir.utc_now
    monkeypatch.setattr(rundir, "utc_now", lambda: (_time.sleep(0.3), real_now())[1])  # a slow record
    run = tmp_path / "r"
    run.mkdir()
    first = rundir.RunLock(run)
    taker = threading.Thread(target=first.acquire)
    taker.start()
    _time.sleep(0.1)  # the first taker is building its record now
    with pytest.raises(rundir.RunInUse, match="in use by process"):
        rundir.RunLock(run).acquire()
    taker.join()
    assert first.held and rundir.lock_holder(run)["pid"] == os.getpid()
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # no private record left behind
    first.release()
