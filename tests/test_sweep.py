"""``exactgn sweep``: trial generation, sweep-file errors, and Ray Tune against the sequential fall-back."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from exactgn.lab.config import ConfigError
from exactgn.lab.sweep import load_sweep, make_trials, run_sweep

TINY = """
name = "tiny"
base = "demo-minibatch/gn"
{extra}
[set]
"train.epochs" = 2
"data.train_size" = 300
"data.test_size" = 100
"model.hidden" = 48
"train.batch_size" = 100
"train.eval_batch_size" = 300
"""


def _write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_trials_are_the_cartesian_product(tmp_path):
    spec = load_sweep(
        _write(tmp_path, TINY.format(extra="") + '[grid]\nseed = [0, 1, 2]\n"optim.lr" = [0.1, 0.2]\n')
    )
    trials = make_trials(spec)
    assert [t.name for t in trials] == [f"trial-{i:03d}" for i in range(6)]
    assert [t.overrides for t in trials][:3] == [
        {"seed": 0, "optim.lr": 0.1},
        {"seed": 0, "optim.lr": 0.2},
        {"seed": 1, "optim.lr": 0.1},
    ]


def test_random_trials_are_seeded_and_inside_their_ranges(tmp_path):
    text = (
        TINY.format(extra='method = "random"\nsamples = 5\nseed = 3')
        + '[grid]\nseed = [0, 1]\n[random]\n"optim.gn.damping" = { log_uniform = [1e-4, 1e-1] }\n'
        '"optim.gn.inverse" = { choice = ["right", "pinv"] }\n"train.epochs" = { int_uniform = [1, 3] }\n'
    ).replace('"train.epochs" = 2\n', "")
    spec = load_sweep(_write(tmp_path, text))
    trials = make_trials(spec)
    assert len(trials) == 10 and trials == make_trials(load_sweep(tmp_path / "sweep.toml"))
    for t in trials:
        assert 1e-4 <= t.overrides["optim.gn.damping"] <= 1e-1
        assert t.overrides["optim.gn.inverse"] in ("right", "pinv")
        assert t.overrides["train.epochs"] in (1, 2, 3)
    assert len({t.overrides["optim.gn.damping"] for t in trials}) == 10


@pytest.mark.parametrize(
    "extra, message",
    [
        ('[grid]\n"optim.lr" = []\n', r"grid\.optim\.lr: must be a non-empty list"),
        ('[grid]\n"optim.lrr" = [0.1]\n', "optim.lrr"),
        ('[grid]\n"optim.lr" = ["fast"]\n', "optim.lr"),
        ('[random]\n"optim.lr" = { uniform = [0, 1] }\n', "needs method"),
        ('[random]\n"optim.lr" = { gaussian = [0, 1] }\n', r"random\.optim\.lr: must be one of"),
        ("[resources]\ncpus_per_trial = 0\n", "cpus_per_trial"),
        ("[resources]\ngpu = 1\n", "unknown key"),
        ('[grid]\n"train.epochs" = [1, 2]\n', "more than one of"),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_write(tmp_path, TINY.format(extra="") + extra))
    with pytest.raises(ConfigError, match="unknown key"):
        load_sweep(_write(tmp_path, TINY.format(extra="bakend = 'ray'"), "typo.toml"))
    with pytest.raises(ConfigError, match="base"):
        load_sweep(
            _write(tmp_path, TINY.format(extra="").replace("demo-minibatch/gn", "no-such/gn"), "base.toml")
        )


def _comparable(run_dir: Path) -> tuple[list[dict], dict]:
    """Epoch rows without timings, and the final weights."""
    with open(run_dir / "epochs.csv") as fh:
        rows = [{k: v for k, v in r.items() if "time" not in k} for r in csv.DictReader(fh)]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    return rows, state["model"]


@pytest.mark.slow
def test_ray_and_sequential_sweeps_give_the_same_runs(tmp_path):
    import ray  # noqa: F401  (the ray extra is installed by .ci/run; a missing ray must fail, not skip)

    path = _write(tmp_path, TINY.format(extra="") + "[grid]\nseed = [0, 1]\n")
    seq = run_sweep(path, tmp_path / "seq", backend="sequential", progress=False)
    ray_out = run_sweep(path, tmp_path / "ray", backend="ray", progress=False)

    def files(run: Path) -> list[str]:
        # TensorBoard event files are named by time, host and process id: compare their folder, not their
        # names.
        return sorted(
            p.parent.relative_to(run).as_posix() + "/<events>"
            if p.name.startswith("events.out")
            else p.relative_to(run).as_posix()
            for p in run.rglob("*")
            if p.is_file()
        )

    for name in ("trial-000", "trial-001"):
        assert files(seq / name) == files(ray_out / name)
        seq_rows, seq_model = _comparable(seq / name)
        ray_rows, ray_model = _comparable(ray_out / name)
        assert seq_rows == ray_rows and len(seq_rows) == 3  # epochs 0, 1, 2
        assert all(torch.equal(seq_model[k], ray_model[k]) for k in seq_model)
        assert json.loads((ray_out / name / "meta.json").read_text())["status"] == "finished"
    seeds_differ = _comparable(seq / "trial-000")[0] != _comparable(seq / "trial-001")[0]
    assert seeds_differ
    with open(seq / "results.csv") as a, open(ray_out / "results.csv") as b:
        strip = lambda rows: [
            {k: v for k, v in r.items() if k not in ("wall_time_s", "run_dir")} for r in rows
        ]  # noqa: E731
        assert strip(list(csv.DictReader(a))) == strip(list(csv.DictReader(b)))


def test_rerunning_a_sweep_skips_finished_trials_and_refuses_another_sweep(tmp_path):
    path = _write(tmp_path, TINY.format(extra="") + "[grid]\nseed = [0, 1]\n")
    out = run_sweep(path, tmp_path / "out", backend="sequential", progress=False)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")}
    run_sweep(path, out, backend="sequential", progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")} == stamp  # nothing retrained
    other = _write(tmp_path, TINY.format(extra="") + "[grid]\nseed = [5]\n", "other.toml")
    with pytest.raises(ValueError, match="holds a different sweep"):
        run_sweep(other, out, backend="sequential", progress=False)


def test_a_diverged_trial_is_kept_and_the_sweep_goes_on(tmp_path):
    # lr 1e38 on the full batch makes every trial diverge in its first step (as in test_train)
    text = TINY.format(extra="").replace('"train.batch_size" = 100', '"train.batch_size" = 0')
    text += '"optim.lr" = 1e38\n[grid]\nseed = [0, 1]\n'
    path = _write(tmp_path, text)
    out = run_sweep(path, tmp_path / "out", backend="sequential", progress=False)
    metas = [json.loads((out / f"trial-00{i}" / "meta.json").read_text()) for i in (0, 1)]
    assert [m["status"] for m in metas] == ["diverged", "diverged"]
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent.name != "out"}
    run_sweep(path, out, backend="sequential", progress=False)  # rerun: kept, not resumed (that would raise)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    with open(out / "results.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["diverged", "diverged"]


def test_shipped_example_sweeps_are_valid():
    root = Path(__file__).resolve().parents[1] / "exactgn" / "lab" / "configs" / "sweeps"
    files = sorted(root.glob("*.toml"))
    assert files
    for path in files:
        assert make_trials(load_sweep(path))
