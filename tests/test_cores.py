"""Sharing the cores among runs started side by side (exactgn.lab.cores, train.threads = 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from exactgn.lab import cores
from exactgn.lab import train as T
from exactgn.lab.config import loads_config
from exactgn.lab.rundir import read_meta

TINY = """
name = "tiny"
seed = 5
[data]
dataset = "mnist-small"
train_size = 100
test_size = 20
[model]
hidden = 16
[optim]
name = "adam"
lr = 1e-3
[train]
epochs = 1
batch_size = 50
threads = {threads}
"""


@pytest.fixture
def registry(tmp_path, monkeypatch):
    folder = tmp_path / "live"
    monkeypatch.setenv("EXACTGN_LIVE_RUNS", str(folder))
    return folder


@pytest.fixture
def other_run(registry):
    """A live process registered as an exactgn run with 2 threads."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    registry.mkdir(parents=True, exist_ok=True)
    record = {"pid": proc.pid, "process_start": cores._process_start(proc.pid), "threads": 2, "run_dir": "x"}
    (registry / f"{proc.pid}.json").write_text(json.dumps(record))
    yield proc
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_live_runs_keeps_live_processes_and_prunes_dead_ones(registry, other_run):
    dead = _dead_pid()
    (registry / f"{dead}.json").write_text(json.dumps({"pid": dead, "threads": 1}))
    (registry / f"{os.getpid()}.json").write_text(json.dumps({"pid": os.getpid(), "threads": 1}))
    assert [r["pid"] for r in cores.live_runs()] == [other_run.pid]  # not this process, not the dead one
    assert not (registry / f"{dead}.json").exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times are read from /proc")
def test_a_reused_pid_is_not_a_live_run(registry, other_run):
    path = registry / f"{other_run.pid}.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "process_start": "1"}))  # the PID now belongs to another process
    assert cores.live_runs() == []


@pytest.mark.parametrize(
    "cores_here, others, expected", [(2, 0, 2), (2, 1, 1), (4, 1, 2), (4, 3, 1), (1, 5, 1)]
)
def test_auto_threads_is_an_equal_share(cores_here, others, expected):
    assert cores.auto_threads(cores_here, [{}] * others) == expected


def test_a_run_with_auto_threads_takes_its_share_beside_a_live_run(
    tmp_path, registry, other_run, monkeypatch, capsys, keep_threads
):
    monkeypatch.setattr(T, "available_cores", lambda: 4)
    run = T.train(loads_config(TINY.format(threads=0)), tmp_path / "auto", progress=False)
    assert read_meta(run)["threads"] == 2
    err = capsys.readouterr().err
    assert "threads: 2 of 4 cores" in err and f"PID {other_run.pid} (2 threads)" in err
    T.train(loads_config(TINY.format(threads=1)), tmp_path / "explicit", progress=False)
    assert read_meta(tmp_path / "explicit")["threads"] == 1
    assert "threads:" not in capsys.readouterr().err  # an explicit count is taken as given


def test_a_run_with_auto_threads_alone_keeps_torchs_default(tmp_path, registry, keep_threads):
    default = torch.get_num_threads()
    run = T.train(loads_config(TINY.format(threads=0)), tmp_path / "alone", progress=False)
    assert read_meta(run)["threads"] == default


class _SeeRegistry:
    def __init__(self):
        self.seen = []

    def on_epoch_end(self, epoch, model, optimizer):
        self.seen += [json.loads(p.read_text()) for p in cores.registry_dir().glob("*.json")]


def test_a_run_is_registered_while_it_lives(tmp_path, registry, keep_threads):
    spy = _SeeRegistry()
    T.train(loads_config(TINY.format(threads=1)), tmp_path / "r", callbacks=[spy], progress=False)
    assert [(r["pid"], r["threads"]) for r in spy.seen] == [(os.getpid(), 1)] * 2  # epochs 0 and 1
    assert spy.seen[0]["run_dir"] == str((tmp_path / "r").resolve())
    assert list(registry.glob("*.json")) == []  # released when the run ended
