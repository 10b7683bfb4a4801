"""Matched-training-loss selection, CKA between runs at matched loss, contender labels
(exactgn.lab.evidence)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from exactgn.lab import evidence as E
from exactgn.lab.diagnostics import block_outputs, linear_cka, load_checkpoint_model, probe_inputs
from exactgn.lab.rundir import read_rows


def hand_run(
    folder: Path,
    losses: dict[int, float],
    records: dict[int, dict],
    *,
    opt: str = "gn",
    seed: int = 0,
    inverse: str = "right",
    rtol: float = 0.0,
) -> Path:
    """A run folder written by hand: config.toml, epochs.csv (train_loss per epoch), diagnostics.jsonl."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(
        f'seed = {seed}\n[data]\ndataset = "mnist-small"\ntrain_size = 64\n[optim]\nname = "{opt}"\n'
        f'[optim.gn]\ninverse = "{inverse}"\nrtol = {rtol}\natol = 0.0\n[diagnostics]\nprobe_size = 8\n'
    )
    lines = ["epoch,train_loss,test_loss"] + [f"{e},{v!r},1.0" for e, v in losses.items()]
    (folder / "epochs.csv").write_text("\n".join(lines) + "\n")
    with open(folder / "diagnostics.jsonl", "w") as fh:
        for epoch, rec in records.items():
            fh.write(json.dumps({"epoch": epoch, **rec}) + "\n")
    return folder


def rec(align: float) -> dict:
    return {
        "ntk_alignment": align,
        "weight_rel_change/all": 1 - align,
        "cka/block0": align,
        "cka/block1": align / 2,
        "cka_delta/block0": 0.5,
        "cka_delta/block1": 0.25,
    }


def test_first_record_at_or_below_the_target_is_picked_and_its_actual_loss_reported(tmp_path):
    # Loss falls, rises, falls again; records every 2 epochs (epoch 3 has a row but no record).
    losses = {0: 2.3, 1: 1.0, 2: 0.5, 3: 0.25, 4: 0.4, 5: 0.1, 6: 0.2}
    run = hand_run(tmp_path / "r", losses, {0: rec(1.0), 2: rec(0.9), 4: rec(0.8), 6: rec(0.7)})
    m = E.diagnostics_at_loss(run, 0.45)
    assert (m.epoch, m.train_loss, m.record["ntk_alignment"]) == (4, 0.4, 0.8)  # not 3: no record there
    assert m.describe() == "epoch 4 (loss 0.4)"
    m = E.diagnostics_at_loss(run, 0.5)  # "at or below": equality counts
    assert (m.epoch, m.train_loss) == (2, 0.5)
    m = E.diagnostics_at_loss(run, 0.15)  # reached only at epoch 5, which has no record: not reached
    assert not m.reached and m.record == {} and (m.lowest_loss, m.lowest_epoch) == (0.2, 6)
    assert m.describe() == "not reached (lowest 0.2 at epoch 6)"
    assert E.diagnostics_at_loss(run, 5.0).epoch == 0
    assert E.first_at_or_below({0: math.nan, 1: 0.3, 2: 0.1}, 0.5) == 1
    assert E.first_at_or_below({0: 2.0, 1: 0.3}, 0.5, epochs=[0, 7]) is None
    with pytest.raises(ValueError, match="finite number"):
        E.first_at_or_below({0: 1.0}, math.nan)


def test_matched_loss_table_keeps_runs_that_never_reach_the_loss(tmp_path):
    gn = hand_run(
        tmp_path / "study" / "gn",
        {0: 2.3, 5: 0.2, 10: 0.01},
        {0: rec(1.0), 5: rec(0.6), 10: rec(0.3)},
        rtol=1e-2,
    )
    adam = hand_run(
        tmp_path / "study" / "adam",
        {0: 2.3, 5: 0.9, 10: 0.5},
        {0: rec(1.0), 5: rec(0.99), 10: rec(0.98)},
        opt="adam",
        seed=1,
    )
    head, rows = E.matched_loss_table([gn, adam], 0.3)
    assert head[3] == "matched at loss <= 0.3" and len(rows) == 2
    assert rows[0] == [
        "study/gn",
        "jflat-trunc",
        "0",
        "epoch 5 (loss 0.2)",
        "0.6",
        "0.4",
        "0.6 / 0.3",
        "0.5 / 0.25",
    ]
    assert rows[1] == ["study/adam", "adam", "1", "not reached (lowest 0.5 at epoch 10)", "-", "-", "-", "-"]
    text = E.markdown(head, rows)
    assert text.splitlines()[1] == "|---|---|---|---|---|---|---|---|" and "not reached" in text
    (adam / "diagnostics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="diagnostics.jsonl: missing"):
        E.matched_loss_table([adam], 0.3)


def test_contender_labels():
    gn = {"optim": {"name": "gn", "gn": {"inverse": "right", "rtol": 1e-2, "atol": 1e-5}}}
    assert E.contender(gn) == "jflat-trunc"
    assert (
        E.contender({"optim": {"name": "gn", "gn": {"inverse": "right", "rtol": 0.0, "atol": 0.0}}})
        == "jflat"
    )
    assert E.contender({"optim": {"name": "gn", "gn": {"inverse": "pinv"}}}) == "jplus"
    assert E.contender({"optim": {"name": "gn", "gn": {"inverse": "pinv", "atol": 1e-5}}}) == "jplus-trunc"
    assert (
        E.contender({"optim": {"name": "adam"}}) == "adam"
        and E.contender({"optim": {"name": "sgd"}}) == "sgd"
    )


def _cka_by_hand(path_a: Path, path_b: Path, probe: torch.Tensor) -> list[float]:
    ma, mb = load_checkpoint_model(path_a)[0].double(), load_checkpoint_model(path_b)[0].double()
    return [linear_cka(xa, xb) for xa, xb in zip(block_outputs(ma, probe), block_outputs(mb, probe))]


def test_cross_cka_at_matched_loss_on_real_runs(tiny_runs):
    gn, adam, mini = tiny_runs / "gn-full-s0", tiny_runs / "adam-full-s0", tiny_runs / "adam-mini-s0"
    assert set(E.checkpoint_epochs(gn)) == {0, 1, 2}
    gl, al = (E.epoch_losses(r) for r in (gn, adam))
    assert gl[0] == al[0]  # same seed: the same initial model
    # At the initial loss both runs match epoch 0: the same model, so CKA between them is 1.
    res = E.cross_cka_at_loss(gn, adam, gl[0] + 1e-12)
    assert res["a"].epoch == res["b"].epoch == 0
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in res["cross"].values()) and len(res["cross"]) == 2
    # Adam's epoch-1 loss: Adam matches there, GN (slower here) at its first checkpoint at or below it.
    target = al[1]
    assert gl[1] > target >= gl[2]
    res = E.cross_cka_at_loss(gn, adam, target)
    assert (res["a"].epoch, res["b"].epoch, res["b"].train_loss, res["a"].train_loss) == (2, 1, target, gl[2])
    probe = probe_inputs(E.read_toml(gn / "config.toml"), 8).double()
    ck, ack = gn / "checkpoints", adam / "checkpoints"
    by_hand = _cka_by_hand(ck / "epoch_0002.pt", ack / "epoch_0001.pt", probe)
    assert list(res["cross"].values()) == pytest.approx(by_hand, abs=1e-12)
    by_hand = _cka_by_hand(ck / "epoch_0002.pt", ck / "epoch_0000.pt", probe)
    assert list(res["a_init"].values()) == pytest.approx(by_hand, abs=1e-12)
    by_hand = _cka_by_hand(ack / "epoch_0001.pt", ack / "epoch_0000.pt", probe)
    assert list(res["b_init"].values()) == pytest.approx(by_hand, abs=1e-12)
    assert res["cross"]["block1"] < 1 - 1e-6  # the models differ
    # Below GN's lowest loss: GN is reported as not reached, and no CKA is computed.
    res = E.cross_cka_at_loss(gn, adam, (gl[2] + al[2]) / 2)
    assert not res["a"].reached and res["b"].epoch == 2 and res["cross"] == {}
    assert res["a"].describe() == f"not reached (lowest {gl[2]:.4g} at epoch 2)"
    # The table: GN seed 0 against both Adam runs of seed 0 (the GN seed-1 run has no partner).
    head, rows = E.cross_cka_table([gn, tiny_runs / "gn-full-s1", adam, mini], target)
    assert [(r[1].split(" ")[0], r[3].split(" ")[0]) for r in rows] == [
        (f"{tiny_runs.name}/gn-full-s0", f"{tiny_runs.name}/adam-full-s0"),
        (f"{tiny_runs.name}/gn-full-s0", f"{tiny_runs.name}/adam-mini-s0"),
    ]
    assert rows[0][2] == f"epoch 2 (loss {gl[2]:.4g})" and rows[0][5] == "8"
    assert len(rows[0][6].split(" / ")) == 2


def test_cross_cka_refuses_runs_on_different_images(tiny_runs, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_runs / "adam-full-s0", other)
    text = (other / "config.toml").read_text().replace("train_size = 64", "train_size = 65")
    (other / "config.toml").write_text(text)
    with pytest.raises(ValueError, match="data.train_size 64 vs 65"):
        E.cross_cka_at_loss(tiny_runs / "gn-full-s0", other, 10.0)
    assert E.pair_runs([tiny_runs / "gn-full-s0", other]) == []
    assert read_rows(other / "epochs.csv")


def test_study_tables_matched_and_cross_cka_commands(tiny_runs, tmp_path):
    import csv
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    target = E.epoch_losses(tiny_runs / "adam-full-s0")[1]
    env = {**os.environ, "PYTHONPATH": str(root)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(root / "scripts" / "study_tables.py"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    out = run("matched", str(tiny_runs), "--matched-loss", repr(target))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("| run | contender | seed | matched at loss <=") and len(lines) == 2 + 4
    assert any("adam-full-s0 | adam | 0 | epoch 1 (loss" in line for line in lines)
    table = tmp_path / "cross.csv"
    out = run("cross-cka", str(tiny_runs), "--matched-loss", repr(target), "--csv", str(table))
    assert out.returncode == 0, out.stderr
    with open(table) as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:3] == ["seed", "GN run", "GN matched"] and len(rows) == 3
    assert rows[1][4].startswith("epoch 1 (loss") and rows[1][2].startswith("epoch 2 (loss")
    assert run("cross-cka", str(tiny_runs)).returncode == 2  # --matched-loss is required
