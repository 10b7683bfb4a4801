"""``exactgn report``: PNG figures and one self-contained HTML page from run folders (docs/run-folder.md).

Runs are grouped into *panels* by dataset and batch setting (full-batch when ``train.batch_size`` is 0 or
covers the whole training set, else mini-batch), and within a panel into *series*: runs whose configurations
are equal apart from seeds (any key ending in ``seed``) and bookkeeping keys
(``exactgn.lab.config.BOOKKEEPING_KEYS``, and the diagnostics settings). A series of several seeds is drawn as
the mean over seeds with a shaded band: min–max over seeds by default, or ±1 standard deviation
(``band="std"``).

:mod:`.runs` reads and groups, :mod:`.figures` draws, :mod:`.html` writes the page.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from .figures import Figure, cross_cka_figure, panel_figures
from .figures import cross_cka as compute_cross_cka
from .html import matched_section
from .html import page as html_page
from .runs import (
    Panel,
    ReportError,
    Run,
    Series,
    aggregate_seeds,
    find_runs,
    group_runs,
    load_run,
    run_labels,
)

__all__ = [
    "ReportError",
    "Run",
    "Series",
    "Panel",
    "find_runs",
    "load_run",
    "group_runs",
    "aggregate_seeds",
    "make_report",
]


def make_report(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    band: str = "minmax",
    title: str = "exactgn report",
    cross_cka: bool = False,
    probe_size: int = 256,
    data_root: str | None = None,
    matched_loss: float | None = None,
) -> Path:
    """Write ``out/index.html`` (self-contained: figures embedded) and the figures as ``out/*.png``; returns
    the HTML path. ``paths``: run folders or folders that contain run folders. ``band``: ``"minmax"`` or
    ``"std"``.

    ``cross_cka``: also compute linear CKA between the final models (``checkpoints/last.pt``) of every pair of
    series of a dataset, on its first ``probe_size`` training images (needs the data; root ``data_root``, else
    the runs' ``data.root``, else ``$EXACTGN_DATA``).

    ``matched_loss``: with several runs, add the table "diagnostics at matched training loss" (each run's
    first diagnostics record at or below that training loss, :mod:`exactgn.lab.evidence`).
    """
    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    if not paths:
        raise ReportError("no run folders given")
    if matched_loss is not None and not math.isfinite(matched_loss):
        raise ReportError(f"--matched-loss must be a finite training loss, got {matched_loss!r}")
    run_paths = find_runs(paths)
    runs = [load_run(p, label) for p, label in zip(run_paths, run_labels(run_paths))]
    panels = group_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    for panel in panels:
        figures.extend(panel_figures(panel, out, band))
    cross = compute_cross_cka(panels, probe_size, data_root) if cross_cka else []
    figures.extend(cross_cka_figure(c, out) for c in cross)
    page = out / "index.html"
    tmp = out / ".index.html.tmp"
    matched = matched_section(runs, matched_loss) if matched_loss is not None and len(runs) > 1 else ""
    tmp.write_text(html_page(runs, panels, figures, band, title, cross, matched), encoding="utf-8")
    os.replace(tmp, page)
    return page
