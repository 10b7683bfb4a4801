"""Run-folder helpers: what a study or sweep does with a folder it meets again (``run_state``)."""

from __future__ import annotations

import json
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
