"""Run folders written before the library/lab split stay readable and resumable.

The fixture is a genuine tiny run rewritten into the old format: its ``config.toml`` and ``last.pt`` lack the
``[optim.adamw]`` table (added since), and its ``meta.json`` has only the provenance keys the old code wrote,
with the git revision under an older alias (``git_rev``), as some early folders have it.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import torch

from exactgn.cli import main as cli_main
from exactgn.lab import report as rp
from exactgn.lab.config import dumps, loads_config
from exactgn.lab.rundir import meta_value, read_meta, read_rows
from exactgn.lab.train import train

OLD_META_KEYS = (
    "exactgn_version",
    "torch_version",
    "python_version",
    "device",
    "device_name",
    "hostname",
    "threads",
    "start_time",
    "end_time",
    "status",
    "epochs_done",
    "global_step",
    "epochs",
    "name",
    "optimiser",
    "dataset",
    "data_source",
    "train_size",
    "test_size",
    "batch_size",
    "steps_per_epoch",
    "message",
    "resumed",
    "wall_time_s",
)
TOML = """
name = "old"
[data]
train_size = 48
test_size = 32
[model]
hidden = 64
dtype = "float64"
[optim]
name = "sgd"
lr = 0.05
[optim.sgd]
momentum = 0.9
[train]
epochs = 1
batch_size = 16
checkpoint_every = 1
"""


def make_old_run_folder(run: Path) -> None:
    """Train one epoch, then rewrite the folder as the pre-split code wrote it."""
    train(loads_config(TOML), run, progress=False)
    config = tomllib.loads((run / "config.toml").read_text())
    del config["optim"]["adamw"]
    (run / "config.toml").write_text(
        dumps(config, header="Resolved configuration of this run (exactgn 0.1.0).")
    )
    meta = read_meta(run)
    old = {key: meta[key] for key in OLD_META_KEYS if key in meta}
    old["git_rev"] = "0123abc"
    (run / "meta.json").write_text(json.dumps(old, indent=2))
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    del payload["config"]["optim"]["adamw"]
    torch.save(payload, run / "checkpoints" / "last.pt")


def test_an_old_run_folder_resumes_and_reports(tmp_path):
    run = tmp_path / "old-run"
    make_old_run_folder(run)
    assert "adamw" not in (run / "config.toml").read_text()
    assert meta_value(read_meta(run), "git_revision") == "0123abc"  # the old alias is read
    assert cli_main(["train", "--resume", str(run), "--set", "train.epochs=2", "--quiet"]) == 0
    meta = read_meta(run)
    assert meta["status"] == "finished" and meta["epochs_done"] == 2 and len(meta["resumed"]) == 1
    assert [r["epoch"] for r in read_rows(run / "epochs.csv")] == [0, 1, 2]
    assert [r["global_step"] for r in read_rows(run / "steps.csv")] == list(range(1, 7))
    page = rp.make_report([run], tmp_path / "report")
    text = page.read_text()
    assert "0123abc" in text and "old-run" in text
