"""The run-folder contract (exactgn.lab.rundir): run states, the one log reader, paths, provenance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from exactgn.lab.rundir import run_state


def _folder(tmp_path: Path, status: str | None, checkpoint: bool, meta: str | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('name = "x"\n')
    if meta is not None:
        (run / "meta.json").write_text(meta)
    elif status is not None:
        (run / "meta.json").write_text(json.dumps({"status": status}))
    if checkpoint:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.pt").write_bytes(b"x")
    return run


def test_missing_and_empty_folders_are_new(tmp_path):
    assert run_state(tmp_path / "nothing") == "new"
    (tmp_path / "empty").mkdir()
    assert run_state(tmp_path / "empty") == "new"


@pytest.mark.parametrize(
    "status, checkpoint, expected",
    [
        ("finished", True, "finished"),
        ("diverged", True, "stopped"),  # resuming would only diverge again
        ("running", True, "resume"),
        ("interrupted", True, "resume"),
        ("running", False, "restart"),
        (None, False, "restart"),
    ],
)
def test_states(tmp_path, status, checkpoint, expected):
    assert run_state(_folder(tmp_path, status, checkpoint)) == expected


def test_a_corrupt_meta_file_falls_back_to_the_checkpoint(tmp_path):
    assert run_state(_folder(tmp_path, None, True, meta="{not json")) == "resume"


# ---------------------------------------------------------------------------- the one reader of logs
def test_csv_rows_numbers_empty_cells_and_a_torn_last_line(tmp_path):
    path = tmp_path / "epochs.csv"
    path.write_text("epoch,train_loss,note\n0,1.5,\n1,nan,ok\n2,0.2")  # the last row was cut short
    from exactgn.lab.rundir import read_rows

    rows = read_rows(path)
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["note"] is None and rows[1]["note"] == "ok"
    assert isinstance(rows[0]["epoch"], int) and rows[0]["train_loss"] == 1.5
    assert math.isnan(rows[1]["train_loss"])
    path.write_text("epoch,train_loss\n0,1.5\n1\n2,0.5\n")  # a short row in the middle: corrupt, not torn
    with pytest.raises(ValueError, match=r"epochs\.csv, line 3: 1 cells under 2 columns"):
        read_rows(path)
    with pytest.raises(ValueError, match=r"lacks the columns 'loss_change_pct'"):
        read_rows(tmp_path / "epochs.csv", required=("loss_change_pct",))
    assert read_rows(tmp_path / "missing.csv") == []


def test_json_lines_skip_a_torn_last_line_and_refuse_a_corrupt_one(tmp_path):
    from exactgn.lab.rundir import read_jsonl

    path = tmp_path / "steps.jsonl"
    path.write_text('{"a": 1}\n\n{"a": null}\n{"a": 3')
    assert read_jsonl(path) == [{"a": 1}, {"a": None}]
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"steps\.jsonl, line 2: not valid JSON"):
        read_jsonl(path)


def test_run_folder_paths_and_provenance_keys(tmp_path):
    from exactgn.lab import rundir

    run = tmp_path / "run"
    assert rundir.last_checkpoint(run) == run / "checkpoints" / "last.pt"
    assert rundir.epoch_checkpoint(run, 7) == run / "checkpoints" / "epoch_0007.pt"
    assert rundir.run_of_checkpoint(rundir.epoch_checkpoint(run, 7)) == run
    (run / "checkpoints").mkdir(parents=True)
    for name in ("epoch_0002.pt", "epoch_0010.pt", "last.pt", "epoch_x.pt"):
        (run / "checkpoints" / name).write_bytes(b"")
    assert list(rundir.epoch_checkpoints(run)) == [2, 10]
    keys = set(rundir.provenance())
    assert {"exactgn_version", "git_revision", "torch_version", "python_version", "device_name"} <= keys
    old = {"git_rev": "abc", "torch": "2.0", "exactgn_version": ""}
    assert (
        rundir.meta_value(old, "git_revision") == "abc" and rundir.meta_value(old, "torch_version") == "2.0"
    )
    assert rundir.meta_value(old, "exactgn_version") is None
