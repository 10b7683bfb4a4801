"""``exactgn compare``: one setting trained with GN, Adam and SGD, then a table of final and best results.

A *setting* is a folder holding ``gn.toml``, ``adam.toml`` and ``sgd.toml``: a shipped one
(``exactgn/lab/configs/experiments/<setting>/``, e.g. ``mnist-fullbatch-cpu``) or any folder given by path.
The runs go to ``OUT/<optimiser>/`` (run folders as in ``docs/run-folder.md``) and the table to
``OUT/comparison.md`` and ``OUT/comparison.csv``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import EXPERIMENTS_DIR, OPTIMISERS, ConfigError, list_settings, load_config
from .rundir import atomic_write_text, log_path, meta_path, read_meta, read_rows, remove_run
from .train import train

__all__ = [
    "setting_optimisers",
    "find_setting",
    "compare",
    "summarise_run",
    "comparison_rows",
    "format_markdown",
    "format_csv",
    "format_cell",
]

NAMES = {"gn": "GN", "adam": "Adam", "sgd": "SGD", "adamw": "AdamW"}
CSV_FIELDS = (
    "optimiser",
    "status",
    "epochs",
    "steps",
    "final_train_loss",
    "final_train_accuracy",
    "final_test_loss",
    "final_test_accuracy",
    "best_train_loss",
    "best_train_accuracy",
    "best_test_loss",
    "best_test_accuracy",
    "best_test_accuracy_epoch",
    "final_mean_loss_change_pct",
    "wall_time_s",
    "run_dir",
)


def setting_optimisers(folder: Path) -> list[str]:
    """The optimisers a setting folder has a file for (``<optimiser>.toml``), in :data:`OPTIMISERS` order."""
    return [o for o in OPTIMISERS if (folder / f"{o}.toml").is_file()]


def find_setting(setting: str | Path) -> Path:
    """The folder of a setting: a path holding ``<optimiser>.toml`` files, or a shipped setting name."""
    path = Path(setting)
    candidates = [path] if path.is_dir() else []
    candidates.append(EXPERIMENTS_DIR / str(setting))
    for folder in candidates:
        if folder.is_dir():
            if not setting_optimisers(folder):
                files = ", ".join(f"{o}.toml" for o in OPTIMISERS)
                raise ConfigError(f"setting {folder}: no optimiser file (a setting holds some of {files})")
            return folder
    raise ConfigError(
        f"setting {str(setting)!r}: no such folder and no shipped setting; "
        f"shipped: {', '.join(list_settings())}"
    )


def summarise_run(run_dir: str | Path) -> dict[str, Any]:
    """Final and best train/test loss and accuracy of one run (best over the trained epochs, 1 on)."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    rows = read_rows(log_path(run_dir, "epochs"))
    trained = [r for r in rows if r["epoch"] >= 1] or rows
    out: dict[str, Any] = {
        "optimiser": meta.get("optimiser"),
        "status": meta.get("status"),
        "epochs": meta.get("epochs_done"),
        "steps": meta.get("global_step"),
        "wall_time_s": meta.get("wall_time_s"),
        "run_dir": str(run_dir),
    }
    if not trained:
        return out
    last = trained[-1]

    def finite(key: str) -> list[dict[str, Any]]:
        return [r for r in trained if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    for split in ("train", "test"):
        out[f"final_{split}_loss"] = last[f"{split}_loss"]
        out[f"final_{split}_accuracy"] = last[f"{split}_accuracy"]
        losses, accs = finite(f"{split}_loss"), finite(f"{split}_accuracy")
        out[f"best_{split}_loss"] = min(r[f"{split}_loss"] for r in losses) if losses else None
        out[f"best_{split}_accuracy"] = max(r[f"{split}_accuracy"] for r in accs) if accs else None
    accs = finite("test_accuracy")
    if accs:
        out["best_test_accuracy_epoch"] = max(accs, key=lambda r: r["test_accuracy"])["epoch"]
    out["final_mean_loss_change_pct"] = last.get("mean_loss_change_pct")
    return out


def comparison_rows(run_dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """One summary row per optimiser (in the order given)."""
    return [summarise_run(d) for d in run_dirs.values()]


def format_cell(value: Any, kind: str) -> str:
    """One table cell: ``kind`` is ``acc`` (in %), ``loss``, ``time`` (seconds) or anything else (as is)."""
    if value is None:
        return "-"
    if kind == "acc":
        return f"{100 * value:.2f}"
    if kind == "loss":
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    if kind == "time":
        return f"{value:.0f}"
    return str(value)


def format_markdown(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """The comparison as a Markdown table (accuracies in %)."""
    head = (
        "| optimiser | status | epochs | final train loss | final train acc % | final test loss | final test "
        "acc % "
        "| best train loss | best train acc % | best test loss | best test acc % (epoch) | time s |"
    )
    lines = ([f"**{title}**", ""] if title else []) + [head, "|" + "---|" * 2 + "---:|" * 10]
    for r in rows:
        best_acc = format_cell(r.get("best_test_accuracy"), "acc")
        if r.get("best_test_accuracy_epoch") is not None:
            best_acc += f" ({r['best_test_accuracy_epoch']})"
        lines.append(
            f"| {NAMES.get(r['optimiser'], r['optimiser'])} | {r['status']} | {r['epochs']} "
            f"| {format_cell(r.get('final_train_loss'), 'loss')} | "
            f"{format_cell(r.get('final_train_accuracy'), 'acc')} "
            f"| {format_cell(r.get('final_test_loss'), 'loss')} | "
            f"{format_cell(r.get('final_test_accuracy'), 'acc')} "
            f"| {format_cell(r.get('best_train_loss'), 'loss')} | "
            f"{format_cell(r.get('best_train_accuracy'), 'acc')} "
            f"| {format_cell(r.get('best_test_loss'), 'loss')} | {best_acc} | "
            f"{format_cell(r.get('wall_time_s'), 'time')} |"
        )
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as CSV (the columns of :data:`CSV_FIELDS`; missing values empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _choose(folder: Path, optimisers: Sequence[str] | None) -> list[str]:
    present = setting_optimisers(folder)
    if optimisers is None:
        return present
    chosen = list(optimisers)
    unknown = [o for o in chosen if o not in OPTIMISERS]
    if unknown or not chosen:
        raise ConfigError(f"optimisers must be some of {', '.join(OPTIMISERS)}, got {chosen}")
    missing = [o for o in chosen if o not in present]
    if missing:
        raise ConfigError(
            f"setting {folder}: no {', '.join(f'{o}.toml' for o in missing)}; it has {', '.join(present)}"
        )
    return chosen


def _comparison_dir(folder: Path, out_dir: str | Path | None, resume: bool) -> Path:
    if out_dir is None:
        if resume:
            raise ValueError("resume needs the folder of the comparison to continue")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path("runs") / f"compare-{folder.name}-{stamp}"
    out_dir = Path(out_dir)
    if not resume and out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; choose another --out, or --resume {out_dir}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _run_one(cfg: Any, run_dir: Path, resume: bool, progress: bool, epoch_lines: bool) -> None:
    """Train one optimiser of a comparison; on resume keep what finished and continue what did not."""
    if resume and meta_path(run_dir).exists():
        if read_meta(run_dir).get("status") in ("finished", "diverged"):
            return
        train(None, resume=run_dir, progress=progress, epoch_lines=epoch_lines)
        return
    if resume and run_dir.exists():
        remove_run(run_dir)  # a run that never wrote meta.json has nothing worth keeping
    train(cfg, run_dir, progress=progress, epoch_lines=epoch_lines)


def _say_result(setting: str, opt: str, run_dir: Path) -> None:
    s = summarise_run(run_dir)
    if s.get("final_train_loss") is not None:
        print(
            f"  {setting} {NAMES.get(opt, opt):>5}: {s['status']}, train loss {s['final_train_loss']:.4f}, "
            f"test accuracy {100 * s['final_test_accuracy']:.2f}% ({s['wall_time_s']:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


def compare(
    setting: str | Path,
    out_dir: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    optimisers: Sequence[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    epoch_lines: bool = True,
) -> Path:
    """Train ``setting`` with each optimiser into ``out_dir/<optimiser>/``, write ``comparison.md``/``.csv``.

    ``optimisers``: a subset of the setting's files (default: all of them). ``overrides`` (``KEY=VALUE``)
    apply to every run. ``resume``: ``out_dir`` holds an earlier, unfinished comparison; finished runs are
    kept, interrupted ones continue from their checkpoints, missing ones start. Returns ``out_dir``. Ctrl-C
    raises :class:`~exactgn.lab.train.TrainingInterrupted` after the run saves.
    """
    folder = find_setting(setting)
    chosen = _choose(folder, optimisers)
    configs = {o: load_config(folder / f"{o}.toml", overrides) for o in chosen}  # all checked before any run
    out_dir = _comparison_dir(folder, out_dir, resume)
    run_dirs = {opt: out_dir / opt for opt in chosen}
    for opt, cfg in configs.items():
        _run_one(cfg, run_dirs[opt], resume, progress, epoch_lines)
        if progress and not epoch_lines:
            _say_result(folder.name, opt, run_dirs[opt])
    rows = comparison_rows(run_dirs)
    title = f"{folder.name}: {configs[chosen[0]].description.rsplit(' (', 1)[0]}"
    atomic_write_text(out_dir / "comparison.md", format_markdown(rows, title))
    atomic_write_text(out_dir / "comparison.csv", format_csv(rows))
    return out_dir
