"""Reading run folders for a report, grouping them into panels and series, and aggregating seeds.

Runs are grouped into *panels* by dataset and batch setting (full-batch when ``train.batch_size`` is 0 or
covers the whole training set, else mini-batch), and within a panel into *series*: runs whose configurations
are equal apart from seeds (any key ending in ``seed``) and bookkeeping keys (name, description, data root,
device, threads, checkpointing, diagnostics settings). A series of several seeds is drawn as the mean over
seeds with a shaded band: min–max over seeds by default, or ±1 standard deviation (``band="std"``).

Figures per panel: train/test loss and accuracy per epoch; the per-mini-batch loss change per epoch; and,
where the runs have ``diagnostics.jsonl``: NTK alignment (with the reference's random-probe estimate) and rate
of change, CKA of every block against initialisation, and the weight change of every half-layer.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import BOOKKEEPING_KEYS, flatten, ignored_model_keys
from ..diagnostics import loss_change_summary, read_diagnostics
from ..rundir import (
    CONFIG_FILE,
    DIAGNOSTICS_FILE,
    EPOCHS_CSV,
    META_FILE,
    STEPS_CSV,
    config_path,
    diagnostics_path,
    log_path,
    read_meta,
    read_rows,
)

__all__ = [
    "ReportError",
    "Run",
    "Series",
    "Panel",
    "find_runs",
    "load_run",
    "run_labels",
    "group_runs",
    "aggregate_seeds",
    "final_value",
    "best_value",
]

REQUIRED_FILES = (CONFIG_FILE, META_FILE, EPOCHS_CSV)
RUN_MARKERS = REQUIRED_FILES + (STEPS_CSV,)

# Keys that do not define a setting: two runs differing only here are seeds of one setting.
_BOOKKEEPING = set(BOOKKEEPING_KEYS)
_BOOKKEEPING_PREFIXES = ("diagnostics.",)


class ReportError(ValueError):
    """A run folder cannot be read; the message names the folder and the file."""


# ---------------------------------------------------------------------------- reading runs
@dataclass
class Run:
    """One run folder, read: configuration (nested dict and its TOML text), meta, epoch rows, optional
    logs."""

    path: Path
    label: str
    config: dict[str, Any]
    config_text: str
    meta: dict[str, Any]
    epochs: list[dict[str, float]]
    loss_change: list[dict[str, float]] | None
    diagnostics: list[dict[str, Any]] | None

    def get(self, key: str, default: Any = None) -> Any:
        """A dotted configuration key, e.g. ``optim.name``."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def optimiser(self) -> str:
        return str(self.get("optim.name", "?"))

    @property
    def seed(self) -> Any:
        return self.get("seed")


def _is_run(path: Path) -> bool:
    return any((path / f).is_file() for f in RUN_MARKERS)


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders named by ``paths``: a run folder itself, or every run folder found below a folder (a
    sweep).

    A folder is a run when it holds any of the run-folder files; missing ones are reported by
    :func:`load_run`.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"{path} does not exist")
        if not path.is_dir():
            raise ReportError(f"{path} is not a folder; pass a run folder (or a folder of run folders)")
        if _is_run(path):
            found.append(path)
            continue
        below = sorted({p.parent for marker in RUN_MARKERS for p in path.rglob(marker)})
        below = [p for p in below if not any(q != p and q in p.parents for q in below)]  # outermost runs only
        if not below:
            raise ReportError(
                f"{path} is not a run folder (it has none of {', '.join(RUN_MARKERS)}) and no run folder was "
                "found below it; pass the folder that `exactgn train` wrote"
            )
        found.extend(below)
    unique: list[Path] = []
    for p in found:
        if p.resolve() not in {q.resolve() for q in unique}:
            unique.append(p)
    return unique


def _as_numbers(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Log rows for plotting: every cell a float, empty or non-numeric cells ``nan``."""
    return [
        {k: float(v) if isinstance(v, (int, float)) else math.nan for k, v in row.items()} for row in rows
    ]


def _read(run: Path, what: str, reader: Any, *args: Any) -> Any:
    """``reader(*args)`` with its ``ValueError`` turned into a :class:`ReportError` naming ``what``."""
    try:
        return reader(*args)
    except ValueError as exc:
        raise ReportError(f"{run / what}: {exc}" if str(run) not in str(exc) else str(exc)) from exc


def load_run(path: str | os.PathLike, label: str | None = None) -> Run:
    """Read one run folder; a missing or unreadable file is an error naming the folder and the file."""
    run = Path(path)
    missing = [f for f in REQUIRED_FILES if not (run / f).is_file()]
    if missing:
        raise ReportError(
            f"run folder {run} lacks {', '.join(missing)}; a run folder written by `exactgn train` holds "
            f"{', '.join(REQUIRED_FILES)} (see docs/run-folder.md)"
        )
    text = config_path(run).read_text(encoding="utf-8")
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ReportError(f"{config_path(run)}: invalid TOML ({exc})") from exc
    meta = _read(run, META_FILE, read_meta, run)
    epochs = _as_numbers(_read(run, EPOCHS_CSV, read_rows, log_path(run, "epochs"), ("epoch",)))
    steps = log_path(run, "steps")
    loss_change = _read(run, STEPS_CSV, loss_change_summary, steps) if steps.is_file() else None
    diag = diagnostics_path(run)
    diagnostics = _read(run, DIAGNOSTICS_FILE, read_diagnostics, diag) if diag.is_file() else None
    return Run(run, label or run.name, config, text, meta, epochs, loss_change, diagnostics)


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short unique labels: paths relative to their common parent."""
    if len(paths) == 1:
        return [paths[0].resolve().name]
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([str(p) for p in resolved]))
    labels = [str(p.relative_to(common)) if p != common else p.name for p in resolved]
    return labels if len(set(labels)) == len(labels) else [str(p) for p in resolved]


# ---------------------------------------------------------------------------- grouping
def _setting_keys(run: Run) -> dict[str, Any]:
    flat = flatten(run.config)
    ignored = ignored_model_keys(run.config)  # e.g. model.widths of a RevMLP
    return {
        k: v
        for k, v in flat.items()
        if not k.rsplit(".", 1)[-1].endswith("seed")
        and k not in _BOOKKEEPING
        and k not in ignored
        and not k.startswith(_BOOKKEEPING_PREFIXES)
    }


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _batch_size(run: Run) -> Any:
    m_batch = run.meta.get("batch_size")
    return m_batch if isinstance(m_batch, int) else run.get("train.batch_size")


def _panel_key(run: Run) -> tuple[str, str]:
    """``(dataset, setting)``: full-batch when the batch covers the training set (as ``meta.json`` records the
    actual sizes, else as ``train.batch_size = 0`` or ``>= data.train_size`` says), otherwise mini-batch — one
    panel for every mini-batch size (GN at B = 1000 beside Adam at B = 1024, as the reference settings have
    it); the panel's title lists the sizes, and series of different sizes say theirs."""
    dataset = str(run.get("data.dataset", "?"))
    batch = run.get("train.batch_size")
    train_size = run.get("data.train_size", 0) or 0
    m_batch, m_train = run.meta.get("batch_size"), run.meta.get("train_size")
    if isinstance(m_batch, int) and isinstance(m_train, int) and m_train > 0:
        if m_batch >= m_train:
            return dataset, f"full-batch ({m_train} images)"
        return dataset, "mini-batch"
    if batch is None:
        setting = "?"
    elif batch == 0 or (train_size and batch >= train_size):
        setting = f"full-batch ({train_size} images)" if train_size else "full-batch"
    else:
        setting = "mini-batch"
    return dataset, setting


@dataclass
class Series:
    """Runs of one setting (equal configuration apart from seeds), drawn as one line with a band."""

    label: str
    runs: list[Run]
    key: tuple = ()


@dataclass
class Panel:
    """A dataset and batch setting, with its series."""

    dataset: str
    setting: str
    series: list[Series] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.dataset} · {self.setting}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.dataset}-{self.setting}".lower()).strip("-")


def group_runs(runs: Sequence[Run]) -> list[Panel]:
    """Panels (dataset × batch setting, in first-seen order), each with series of seeds of one setting."""
    panels: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        panels.setdefault(_panel_key(run), []).append(run)
    out = []
    for (dataset, setting), members in panels.items():
        groups: dict[tuple, list[Run]] = {}
        for run in members:
            key = tuple(sorted((k, _freeze(v)) for k, v in _setting_keys(run).items()))
            groups.setdefault(key, []).append(run)
        # Label each series by its optimiser and the keys that differ between the panel's series.
        settings = [dict(k) for k in groups]
        differing = sorted(
            {k for s in settings for k in s if len({repr(t.get(k)) for t in settings}) > 1} - {"optim.name"}
        )
        panel = Panel(dataset, _panel_setting(setting, members))
        for key, group in groups.items():
            label = _series_label(group, dict(key), differing)
            panel.series.append(Series(label, sorted(group, key=lambda r: (str(r.seed), r.label)), key))
        panel.series.sort(key=lambda s: s.label)
        out.append(panel)
    return out


def _panel_setting(setting: str, members: Sequence[Run]) -> str:
    """A mini-batch panel's title lists the batch sizes of its runs."""
    if setting != "mini-batch":
        return setting
    sizes = sorted({b for b in (_batch_size(r) for r in members) if isinstance(b, int)})
    return f"mini-batch (B={', '.join(map(str, sizes))})" if sizes else setting


def _series_label(group: Sequence[Run], s: dict[str, Any], differing: Sequence[str]) -> str:
    """The optimiser and the keys that differ between the panel's series. GN's own keys say nothing about an
    Adam or SGD run (they are defaults there), so they label GN only; keys a run does not have (e.g.
    model.widths of a RevMLP) say nothing about it either."""
    gn = group[0].optimiser == "gn"
    own = [k for k in differing if k in s and (gn or not k.startswith("optim.gn."))]
    extras = ", ".join(f"{_short(k, differing)}={_fmt_value(s.get(k))}" for k in own)
    label = group[0].optimiser + (f" ({extras})" if extras else "")
    return label + (f" [{len(group)} seeds]" if len(group) > 1 else "")


def _short(key: str, keys: Sequence[str]) -> str:
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------- aggregation
def aggregate_seeds(
    rows_per_run: Sequence[Sequence[dict[str, Any]]], key: str, band: str
) -> tuple[list[float], list[float], list[float], list[float]] | None:
    """Mean and band of ``key`` against ``epoch`` over the runs of one series: ``(epochs, mean, lo, hi)``.

    ``rows_per_run``: one list of records (with ``epoch`` and ``key``) per run. At each epoch, the runs that
    have a finite value there are used. ``band``: ``"minmax"`` (lo, hi = min, max over runs) or ``"std"``
    (mean ± population standard deviation). ``None`` when no run has the key.
    """
    values: dict[float, list[float]] = {}
    for rows in rows_per_run:
        for row in rows:
            v, e = row.get(key), row.get("epoch")
            if (
                isinstance(v, (int, float))
                and isinstance(e, (int, float))
                and math.isfinite(v)
                and math.isfinite(e)
            ):
                values.setdefault(float(e), []).append(float(v))
    if not values:
        return None
    xs = sorted(values)
    mean = [statistics.fmean(values[x]) for x in xs]
    if band == "std":
        sd = [statistics.pstdev(values[x]) if len(values[x]) > 1 else 0.0 for x in xs]
        lo, hi = [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)]
    else:
        lo, hi = [min(values[x]) for x in xs], [max(values[x]) for x in xs]
    return xs, mean, lo, hi


def final_value(run: Run, key: str) -> float:
    """The last finite value of ``key`` in the run's epoch rows, else ``nan``."""
    for row in reversed(run.epochs):
        v = row.get(key, math.nan)
        if math.isfinite(v):
            return v
    return math.nan


def best_value(run: Run, key: str, highest: bool) -> float:
    """The highest (or lowest) finite value of ``key`` over the run's epoch rows, else ``nan``."""
    vals = [r[key] for r in run.epochs if key in r and math.isfinite(r[key])]
    if not vals:
        return math.nan
    return max(vals) if highest else min(vals)
