"""``exactgn report`` and ``exactgn diagnose`` on genuine tiny training runs, and the report's error
messages."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from conftest import TINY_RUNS

from exactgn.cli import main as cli_main
from exactgn.lab import diagnostics as dg
from exactgn.lab import report as rp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]


def test_report_from_real_runs(tiny_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli_main(["report", str(tiny_runs), "--out", str(out), "--cross-cka", "--probe-size", "8"]) == 0
    assert "index.html" in capsys.readouterr().out
    page_path = out / "index.html"
    assert page_path.is_file() and page_path.stat().st_size > 0
    page = page_path.read_text(encoding="utf-8")
    pngs = sorted(out.glob("*.png"))
    # Two settings (full-batch, mini-batch), each with curves, loss change, NTK, CKA and weights; plus CKA
    # between runs.
    names = {p.name for p in pngs}
    for kind in ("curves", "loss-change", "ntk", "cka", "weights"):
        assert sum(n.startswith(f"{kind}-mnist-small-") for n in names) == 2, (kind, names)
    assert "cka-between-mnist-small.png" in names
    assert len(pngs) == 11
    for p in pngs:
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), p
    # Self-contained: every PNG is embedded byte for byte, and nothing is loaded from elsewhere.
    assert sorted(_embedded_pngs(page)) == sorted(p.read_bytes() for p in pngs)
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    # Every run is named, with its configuration and git revision.
    for folder, *_ in TINY_RUNS:
        assert page.count(folder) >= 2, folder  # runs table and configuration section
        meta = json.loads((tiny_runs / folder / "meta.json").read_text())
        assert str(meta["git_revision"] or "unknown") in page
    assert "gn (lr=0.5) [2 seeds]" in page  # two seeds of one setting form one series
    assert "mini-batch (B=16)" in page and "full-batch (64 images)" in page
    assert "torch" in page and "python" in page  # the environment table


def test_grouping_and_seed_band(tiny_runs):
    runs = [rp.load_run(p) for p in rp.find_runs([tiny_runs])]
    assert sorted(r.path.name for r in runs) == sorted(f for f, *_ in TINY_RUNS)
    panels = {p.setting: p for p in rp.group_runs(runs)}
    assert set(panels) == {"full-batch (64 images)", "mini-batch (B=16)"}
    full = {s.label: s for s in panels["full-batch (64 images)"].series}
    gn = full["gn (lr=0.5) [2 seeds]"]
    assert sorted(r.seed for r in gn.runs) == [0, 1]
    # The drawn mean and band are the mean and min–max (or ±std) over the seeds, epoch by epoch.
    xs, mean, lo, hi = rp.aggregate_seeds([r.epochs for r in gn.runs], "test_loss", "minmax")
    per_seed = [[row["test_loss"] for row in r.epochs] for r in gn.runs]
    assert xs == [0.0, 1.0, 2.0]
    for i in range(3):
        vals = [s[i] for s in per_seed]
        assert mean[i] == pytest.approx(sum(vals) / 2, rel=1e-12)
        assert (lo[i], hi[i]) == (min(vals), max(vals))
    assert vals[0] != vals[1]  # different seeds give different curves, so the band is not empty
    _, mean_s, lo_s, hi_s = rp.aggregate_seeds([r.epochs for r in gn.runs], "test_loss", "std")
    assert hi_s[2] - mean_s[2] == pytest.approx(abs(vals[0] - vals[1]) / 2, rel=1e-9)


def test_gn_keys_label_gn_series_only(tiny_runs, tmp_path):
    folder = tmp_path / "runs"
    shutil.copytree(tiny_runs, folder)
    config = folder / "gn-full-s1" / "config.toml"
    text = config.read_text()
    assert 'inverse = "right"' in text
    config.write_text(text.replace('inverse = "right"', 'inverse = "pinv"'))
    runs = [rp.load_run(p) for p in rp.find_runs([folder])]
    full = next(p for p in rp.group_runs(runs) if p.setting.startswith("full-batch"))
    labels = sorted(s.label for s in full.series)
    assert labels == [
        "adam (lr=0.001)",
        "gn (inverse=pinv, lr=0.5)",
        "gn (inverse=right, lr=0.5)",
    ]  # Adam carries GN's defaults, not its label


def test_aggregate_seeds_hand_built():
    rows = [
        [{"epoch": 0, "x": 1.0}, {"epoch": 1, "x": 4.0}],
        [{"epoch": 0, "x": 3.0}],
        [{"epoch": 0, "x": math.nan}],
    ]
    xs, mean, lo, hi = rp.aggregate_seeds(rows, "x", "minmax")
    assert (xs, mean, lo, hi) == ([0.0, 1.0], [2.0, 4.0], [1.0, 4.0], [3.0, 4.0])
    xs, mean, lo, hi = rp.aggregate_seeds(rows, "x", "std")
    assert (lo, hi) == ([1.0, 4.0], [3.0, 4.0])
    assert rp.aggregate_seeds(rows, "missing", "minmax") is None


def test_training_records_equal_diagnose_from_checkpoints(tiny_runs, tmp_path):
    """Recorded during training and recomputed by ``exactgn diagnose`` from the checkpoints: the same
    numbers."""
    run = tiny_runs / "gn-full-s1"
    recorded = dg.read_diagnostics(run / "diagnostics.jsonl")
    assert [r["epoch"] for r in recorded] == [0, 1, 2]
    assert "ntk_rate" not in recorded[0] and recorded[1]["ntk_rate"] > 0
    assert recorded[2]["ntk_alignment"] < 1 and recorded[2]["weight_rel_change/all"] > 0
    out = tmp_path / "diag.jsonl"
    # No --probe-size: diagnose takes the run's own diagnostics.probe_size (8 here), so the records match.
    assert cli_main(["diagnose", str(run), "--out", str(out)]) == 0
    again = dg.read_diagnostics(out)
    assert len(again) == len(recorded)
    for a, b in zip(again, recorded):
        assert a.keys() == b.keys()
        for key in a:
            if key != "diagnostics_time_s":
                assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-15), key
    # CKA between two runs from their checkpoints: a run against itself is 1, GN against Adam is not.
    assert dg.runs_cka(run, run, probe_size=8) == pytest.approx({"block0": 1.0, "block1": 1.0}, abs=1e-12)
    other = dg.runs_cka(run, tiny_runs / "adam-full-s0", probe_size=8, epoch=2)
    assert all(v < 1 - 1e-9 for v in other.values())


def test_report_errors(tiny_runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(rp.ReportError, match=r"empty.*not a run folder"):
        rp.make_report([empty], tmp_path / "out")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_runs / "adam-mini-s0", broken)
    (broken / "epochs.csv").unlink()
    with pytest.raises(rp.ReportError, match=r"broken lacks epochs.csv"):
        rp.make_report([broken], tmp_path / "out")
    (broken / "epochs.csv").write_text("epoch,train_loss\n0,1.0\n")
    (broken / "meta.json").write_text("{not json")
    assert cli_main(["report", str(broken), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "meta.json" in err and "invalid JSON" in err
    assert cli_main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_training_diagnostics_survive_a_resume(tmp_path):
    """A resumed run rebuilds the initial model from its config: its records equal an uninterrupted run's (the
    first record after the resume has no ntk_rate, whose previous kernel was in the stopped process)."""
    from conftest import TINY_RUN_TOML

    from exactgn.lab.config import loads_config
    from exactgn.lab.train import train

    cfg = loads_config(TINY_RUN_TOML)
    common = ["optim.name='gn'", "optim.lr=0.5", "train.batch_size=0", "diagnostics.every=1"]
    whole = train(cfg, tmp_path / "whole", overrides=common + ["train.epochs=3"], progress=False)
    part = train(cfg, tmp_path / "part", overrides=common + ["train.epochs=2"], progress=False)
    train(None, resume=part, overrides=["train.epochs=3"], progress=False)
    a, b = dg.read_diagnostics(whole / "diagnostics.jsonl"), dg.read_diagnostics(part / "diagnostics.jsonl")
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [0, 1, 2, 3]
    assert "ntk_rate" in a[3] and "ntk_rate" not in b[3]
    for ra, rb in zip(a, b):
        for key in rb:
            if key != "diagnostics_time_s":
                assert rb[key] == pytest.approx(ra[key], rel=1e-9, abs=1e-12), (ra["epoch"], key)


def test_report_has_the_matched_loss_table(tiny_runs, tmp_path):
    from exactgn.lab.evidence import epoch_losses

    target = epoch_losses(tiny_runs / "adam-full-s0")[1]  # Adam reaches it at epoch 1, GN seed 0 at epoch 2
    out = tmp_path / "rep"
    assert cli_main(["report", str(tiny_runs), "--out", str(out), "--matched-loss", repr(target)]) == 0
    page = (out / "index.html").read_text()
    assert f"Diagnostics at matched training loss (first record with train loss &le; {target:g})" in page
    section = page[page.index("Diagnostics at matched training loss") : page.index("<h2>Figures</h2>")]
    assert "adam-full-s0</td><td>adam</td><td>0</td><td>epoch 1 (loss" in section
    assert "gn-full-s0</td><td>jflat</td><td>0</td><td>epoch 2 (loss" in section
    assert "gn-full-s1</td><td>jflat</td><td>1</td><td>not reached (lowest" in section
    single = tmp_path / "one"
    one = ["report", str(tiny_runs / "gn-full-s0"), "--out", str(single), "--matched-loss", "1"]
    assert cli_main(one) == 0
    assert "matched training loss" not in (single / "index.html").read_text()


def test_mini_batch_runs_of_different_sizes_share_one_panel():
    """The demo's and the reference's mini-batch settings: GN at B = 1000, Adam/SGD at B = 1024 — one plot."""

    def run(name: str, opt: str, batch: int) -> rp.Run:
        config = {
            "data": {"dataset": "mnist", "train_size": 5000},
            "optim": {"name": opt, "lr": 0.1},
            "train": {"batch_size": batch},
            "seed": 0,
        }
        meta = {"batch_size": batch, "train_size": 5000}
        return rp.Run(Path(name), name, config, "", meta, [], None, None)

    panels = rp.group_runs([run("gn", "gn", 1000), run("adam", "adam", 1024), run("sgd", "sgd", 1024)])
    assert [p.setting for p in panels] == ["mini-batch (B=1000, 1024)"]
    labels = sorted(s.label for s in panels[0].series)
    assert labels == ["adam (batch_size=1024)", "gn (batch_size=1000)", "sgd (batch_size=1024)"]
