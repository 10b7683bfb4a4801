"""``exactgn demo``: the first command to run. GN, Adam and SGD on the bundled MNIST subset, on the CPU.

Two comparisons (the shipped settings ``demo-fullbatch`` and ``demo-minibatch``), about two to three minutes
on two CPU cores, no download: full-batch training on 1024 images, where exact GN drives the training loss
down far faster than Adam and SGD, and mini-batch training on 5000 images, where the reference study found
GN's progress saturating. Prints both tables and where the runs are.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Sequence

from .compare import compare, comparison_rows
from .rundir import log_path, read_rows

__all__ = ["SETTINGS", "run_demo", "reading"]

SETTINGS = ("demo-fullbatch", "demo-minibatch")


def reading(out: Path) -> str:
    """A few plain sentences on what the tables show (computed from the runs, not assumed)."""
    lines = []
    fb = {
        r["optimiser"]: r
        for r in comparison_rows({o: out / "demo-fullbatch" / o for o in ("gn", "adam", "sgd")})
    }
    if all(r.get("final_train_loss") is not None for r in fb.values()):
        best_other = min(("adam", "sgd"), key=lambda o: fb[o]["final_train_loss"])
        lines.append(
            f"Full batch: GN's training loss ended at {fb['gn']['final_train_loss']:.3g}, against "
            f"{fb[best_other]['final_train_loss']:.3g} for "
            f"{best_other.upper() if best_other == 'sgd' else 'Adam'} "
            f"after the same number of steps."
        )
    mb = {
        r["optimiser"]: r
        for r in comparison_rows({o: out / "demo-minibatch" / o for o in ("gn", "adam", "sgd")})
    }
    if all(r.get("best_test_accuracy") is not None for r in mb.values()):
        rows = read_rows(log_path(out / "demo-minibatch" / "gn", "epochs"))
        changes = [r["mean_loss_change_pct"] for r in rows if r.get("mean_loss_change_pct") is not None]
        lines.append(
            f"Mini-batch: best test accuracy GN {100 * mb['gn']['best_test_accuracy']:.1f}%, Adam "
            f"{100 * mb['adam']['best_test_accuracy']:.1f}%, SGD "
            f"{100 * mb['sgd']['best_test_accuracy']:.1f}%."
            + (
                f" Each GN step changed its own mini-batch's loss by {changes[0]:+.1f}% on average in the "
                "first epoch "
                f"and {changes[-1]:+.1f}% in the last."
                if changes
                else ""
            )
        )
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path | None = None, *, overrides: Sequence[str] = (), progress: bool = True
) -> Path:
    """Run both demo comparisons into ``out_dir`` (default ``runs/demo-<time>``); returns it."""
    if out_dir is None:
        out_dir = Path("runs") / f"demo-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(out_dir)
    for setting in SETTINGS:
        compare(setting, out_dir / setting, overrides=overrides, progress=progress, epoch_lines=False)
    return out_dir
