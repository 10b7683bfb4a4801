"""``exactgn report``: PNG figures and one self-contained HTML page from run folders (docs/run-folder.md).

Runs are grouped into *panels* by dataset and batch setting (full-batch when ``train.batch_size`` is 0 or covers the
whole training set, else mini-batch), and within a panel into *series*: runs whose configurations are equal apart
from seeds (any key ending in ``seed``) and bookkeeping keys (name, description, data root, device, threads,
checkpointing, diagnostics settings). A series of several seeds is drawn as the mean over seeds with a shaded
band: min–max over seeds by default, or ±1 standard deviation (``band="std"``).

Figures per panel: train/test loss and accuracy per epoch; the per-mini-batch loss change per epoch; and, where the
runs have ``diagnostics.jsonl``: NTK alignment (with the reference's random-probe estimate) and rate of change, CKA
of every block against initialisation, and the weight change of every half-layer.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import os
import platform
import re
import socket
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .config import flatten
from .diagnostics import DIAGNOSTICS_FILE, loss_change_summary, read_diagnostics

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["ReportError", "Run", "Series", "Panel", "find_runs", "load_run", "group_runs", "aggregate_seeds", "make_report", "add_parser"]

REQUIRED_FILES = ("config.toml", "meta.json", "epochs.csv")
RUN_MARKERS = REQUIRED_FILES + ("steps.csv",)

# Keys that do not define a setting: two runs differing only here are seeds of one setting.
_BOOKKEEPING = {
    "name", "description", "data.root", "data.download", "train.device", "train.threads",
    "train.checkpoint_every", "train.keep_checkpoints", "train.eval_batch_size",
}
_BOOKKEEPING_PREFIXES = ("diagnostics.",)


class ReportError(ValueError):
    """A run folder cannot be read; the message names the folder and the file."""


# ---------------------------------------------------------------------------- reading runs
@dataclass
class Run:
    """One run folder, read: configuration (nested dict and its TOML text), meta, epoch rows, optional logs."""

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
    """Run folders named by ``paths``: a run folder itself, or every run folder found below a folder (a sweep).

    A folder is a run when it holds any of the run-folder files; missing ones are reported by :func:`load_run`.
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
                f"{path} is not a run folder (it has none of {', '.join(RUN_MARKERS)}) and no run folder was found "
                "below it; pass the folder that `exactgn train` wrote"
            )
        found.extend(below)
    unique: list[Path] = []
    for p in found:
        if p.resolve() not in {q.resolve() for q in unique}:
            unique.append(p)
    return unique


def _read_csv_numbers(path: Path) -> list[dict[str, float]]:
    """CSV rows as floats (empty or non-numeric cells → nan); a torn last line is skipped."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise ReportError(f"{path} is empty (no header row); see docs/run-folder.md")
        rows = []
        for cells in reader:
            if len(cells) != len(header):
                continue
            row = {}
            for key, cell in zip(header, cells):
                try:
                    row[key] = float(cell)
                except ValueError:
                    row[key] = math.nan
            rows.append(row)
    return rows


def load_run(path: str | os.PathLike, label: str | None = None) -> Run:
    """Read one run folder; a missing or unreadable file is an error naming the folder and the file."""
    run = Path(path)
    missing = [f for f in REQUIRED_FILES if not (run / f).is_file()]
    if missing:
        raise ReportError(
            f"run folder {run} lacks {', '.join(missing)}; a run folder written by `exactgn train` holds "
            f"{', '.join(REQUIRED_FILES)} (see docs/run-folder.md)"
        )
    text = (run / "config.toml").read_text(encoding="utf-8")
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ReportError(f"{run / 'config.toml'}: invalid TOML ({exc})") from exc
    try:
        meta = json.loads((run / "meta.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{run / 'meta.json'}: invalid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ReportError(f"{run / 'meta.json'}: expected a JSON object")
    epochs = _read_csv_numbers(run / "epochs.csv")
    if epochs and "epoch" not in epochs[0]:
        raise ReportError(f"{run / 'epochs.csv'} has no 'epoch' column; see docs/run-folder.md")
    loss_change = None
    if (run / "steps.csv").is_file():
        try:
            loss_change = loss_change_summary(run / "steps.csv")
        except ValueError as exc:
            raise ReportError(str(exc)) from exc
    diagnostics = None
    if (run / DIAGNOSTICS_FILE).is_file():
        try:
            diagnostics = read_diagnostics(run / DIAGNOSTICS_FILE)
        except ValueError as exc:
            raise ReportError(str(exc)) from exc
    return Run(run, label or run.name, config, text, meta, epochs, loss_change, diagnostics)


def _labels(paths: Sequence[Path]) -> list[str]:
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
    return {
        k: v for k, v in flat.items()
        if not k.rsplit(".", 1)[-1].endswith("seed") and k not in _BOOKKEEPING and not k.startswith(_BOOKKEEPING_PREFIXES)
    }


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _panel_key(run: Run) -> tuple[str, str]:
    """``(dataset, setting)``: full-batch when the batch covers the training set (as ``meta.json`` records the actual
    sizes, else as ``train.batch_size = 0`` or ``>= data.train_size`` says), otherwise mini-batch."""
    dataset = str(run.get("data.dataset", "?"))
    batch = run.get("train.batch_size")
    train_size = run.get("data.train_size", 0) or 0
    m_batch, m_train = run.meta.get("batch_size"), run.meta.get("train_size")
    if isinstance(m_batch, int) and isinstance(m_train, int) and m_train > 0:
        if m_batch >= m_train:
            return dataset, f"full-batch ({m_train} images)"
        return dataset, f"mini-batch (B={m_batch})"
    if batch is None:
        setting = "?"
    elif batch == 0 or (train_size and batch >= train_size):
        setting = f"full-batch ({train_size} images)" if train_size else "full-batch"
    else:
        setting = f"mini-batch (B={batch})"
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
        differing = sorted({k for s in settings for k in s if len({repr(t.get(k)) for t in settings}) > 1} - {"optim.name"})
        panel = Panel(dataset, setting)
        for key, group in groups.items():
            s = dict(key)
            # GN's own keys say nothing about an Adam or SGD run (they are defaults there), so they label GN only.
            own = [k for k in differing if group[0].optimiser == "gn" or not k.startswith("optim.gn.")]
            extras = ", ".join(f"{_short(k, differing)}={_fmt_value(s.get(k))}" for k in own)
            label = group[0].optimiser + (f" ({extras})" if extras else "")
            if len(group) > 1:
                label += f" [{len(group)} seeds]"
            panel.series.append(Series(label, sorted(group, key=lambda r: (str(r.seed), r.label)), key))
        panel.series.sort(key=lambda s: s.label)
        out.append(panel)
    return out


def _short(key: str, keys: Sequence[str]) -> str:
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------- aggregation
def aggregate_seeds(rows_per_run: Sequence[Sequence[dict[str, Any]]], key: str, band: str) -> tuple[list[float], list[float], list[float], list[float]] | None:
    """Mean and band of ``key`` against ``epoch`` over the runs of one series: ``(epochs, mean, lo, hi)``.

    ``rows_per_run``: one list of records (with ``epoch`` and ``key``) per run. At each epoch, the runs that have a
    finite value there are used. ``band``: ``"minmax"`` (lo, hi = min, max over runs) or ``"std"`` (mean ± population
    standard deviation). ``None`` when no run has the key.
    """
    values: dict[float, list[float]] = {}
    for rows in rows_per_run:
        for row in rows:
            v, e = row.get(key), row.get("epoch")
            if isinstance(v, (int, float)) and isinstance(e, (int, float)) and math.isfinite(v) and math.isfinite(e):
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


def _final(run: Run, key: str) -> float:
    for row in reversed(run.epochs):
        v = row.get(key, math.nan)
        if math.isfinite(v):
            return v
    return math.nan


def _best(run: Run, key: str, highest: bool) -> float:
    vals = [r[key] for r in run.epochs if key in r and math.isfinite(r[key])]
    if not vals:
        return math.nan
    return max(vals) if highest else min(vals)


# ---------------------------------------------------------------------------- figures
def _figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width * ncols, 7.5), height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _draw(ax, series: Sequence[Series], rows_of, key: str, band: str, *, log: bool = False,
          style: str = "-", label_suffix: str = "", colours: dict[str, Any]) -> bool:
    drawn = False
    for s in series:
        curve = aggregate_seeds([rows_of(r) for r in s.runs], key, band)
        if curve is None:
            continue
        xs, mean, lo, hi = curve
        if log and (min(lo + mean) <= 0 or max(hi + mean) / min(lo + mean) < 20):
            log = False  # log scale only for positive values spanning more than a factor of 20
        colour = colours[s.label]
        ax.plot(xs, mean, style, color=colour, label=s.label + label_suffix, marker="." if len(xs) < 30 else None)
        if len(s.runs) > 1:
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.2, linewidth=0)
        drawn = True
    if drawn and log:
        ax.set_yscale("log")
    return drawn


def _finish(ax, title: str, ylabel: str, drawn: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def _save(fig, path: Path) -> bytes:
    # One legend for the whole figure, below the panels, so that long series labels cover no curve.
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 3),
                   fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    data = buf.getvalue()
    path.write_bytes(data)
    return data


@dataclass
class _Figure:
    title: str
    file: str
    data: bytes
    caption: str


def _panel_figures(panel: Panel, out: Path, band: str) -> list[_Figure]:
    import matplotlib

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {s.label: cycle[i % len(cycle)] for i, s in enumerate(panel.series)}
    band_text = "mean over seeds, band = min–max" if band == "minmax" else "mean over seeds, band = ±1 std"
    figs: list[_Figure] = []

    # Loss and accuracy per epoch.
    fig, axes = _figure(4)
    for ax, (key, title, log) in zip(axes, [
        ("train_loss", "train loss", True), ("test_loss", "test loss", True),
        ("train_accuracy", "train accuracy", False), ("test_accuracy", "test accuracy", False),
    ]):
        drawn = _draw(ax, panel.series, lambda r: r.epochs, key, band, log=log, colours=colours)
        _finish(ax, title, key.replace("_", " "), drawn)
    fig.suptitle(panel.title, fontsize=11)
    name = f"curves-{panel.slug}.png"
    figs.append(_Figure(f"Loss and accuracy — {panel.title}", name, _save(fig, out / name),
                        f"Per epoch (epoch 0 = before training); {band_text}."))

    # Per-mini-batch loss change.
    fig, axes = _figure(2)
    def lc_rows(r: Run) -> list[dict[str, Any]]:
        if r.loss_change is not None:
            return r.loss_change
        return [{"epoch": e["epoch"], "mean": e.get("mean_loss_change_pct", math.nan)} for e in r.epochs]
    d0 = _draw(axes[0], panel.series, lc_rows, "mean", band, colours=colours)
    _finish(axes[0], "mean over the epoch's steps", "loss change (%)", d0)
    d1 = _draw(axes[1], panel.series, lambda r: r.loss_change or [], "median", band, colours=colours)
    _finish(axes[1], "median over the epoch's steps", "loss change (%)", d1)
    for ax in axes:
        ax.axhline(0.0, color="black", linewidth=0.6)
    fig.suptitle(f"Per-mini-batch loss change 100·(ℓ_after − ℓ_before)/ℓ_before\n{panel.title}", fontsize=10)
    name = f"loss-change-{panel.slug}.png"
    figs.append(_Figure(f"Per-mini-batch loss change — {panel.title}", name, _save(fig, out / name),
                        f"Change of the loss on the same mini-batch across one step, summarised per epoch; {band_text}."))

    with_diag = [s for s in panel.series if any(r.diagnostics for r in s.runs)]
    if not with_diag:
        return figs
    diag = lambda r: r.diagnostics or []  # noqa: E731

    # NTK.
    fig, axes = _figure(3)
    d0 = _draw(axes[0], with_diag, diag, "ntk_alignment", band, colours=colours)
    _draw(axes[0], with_diag, diag, "ntk_probe_cosine", band, style="--", label_suffix=" (probe estimate)", colours=colours)
    _finish(axes[0], "NTK similarity to initialisation", "alignment  (dashed: cos(Θ0w, Θtw))", d0)
    d1 = _draw(axes[1], with_diag, diag, "ntk_rate", band, log=True, colours=colours)
    _finish(axes[1], "NTK rate of change", "(1 − alignment(prev, now)) / epoch", d1)
    d2 = _draw(axes[2], with_diag, diag, "ntk_rel_change", band, colours=colours)
    _finish(axes[2], "NTK relative change", "‖Θt − Θ0‖ / ‖Θ0‖", d2)
    fig.suptitle(f"Exact empirical NTK on the probe batch\n{panel.title}", fontsize=10)
    name = f"ntk-{panel.slug}.png"
    figs.append(_Figure(f"NTK — {panel.title}", name, _save(fig, out / name),
                        "Kernel alignment ⟨Θ0, Θt⟩/(‖Θ0‖‖Θt‖) of the exact NTK (solid) and the reference's random-probe "
                        f"estimate (dashed); rate of change between consecutive records; {band_text}."))

    # CKA per block.
    blocks = sorted({int(m.group(1)) for s in with_diag for r in s.runs for rec in (r.diagnostics or [])
                     for k in rec if (m := re.fullmatch(r"cka/block(\d+)", k))})
    if blocks:
        fig, axes = _figure(len(blocks), width=3.6)
        for ax, l in zip(axes, blocks):
            d = _draw(ax, with_diag, diag, f"cka/block{l}", band, colours=colours)
            _draw(ax, with_diag, diag, f"cka_unbiased/block{l}", band, style="--", label_suffix=" (unbiased)", colours=colours)
            _draw(ax, with_diag, diag, f"cka_delta/block{l}", band, style=":", label_suffix=" (increment)", colours=colours)
            _finish(ax, f"block {l}", "linear CKA vs. init", d)
        fig.suptitle(f"Linear CKA of each block's output against initialisation\n{panel.title}", fontsize=10)
        name = f"cka-{panel.slug}.png"
        figs.append(_Figure(f"CKA per block — {panel.title}", name, _save(fig, out / name),
                            "Biased (solid) and unbiased (dashed) linear CKA of each block's output on the probe batch, "
                            "and biased CKA of what the block adds to the state, z_l − z_{l−1} (dotted; without the "
                            f"identity skip, which keeps output CKA near 1 when the branches are small); {band_text}."))

    # Weight change per half-layer.
    layers = sorted({k.split("/", 1)[1] for s in with_diag for r in s.runs for rec in (r.diagnostics or [])
                     for k in rec if k.startswith("weight_rel_change/") and k != "weight_rel_change/all"},
                    key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    if layers:
        fig, axes = _figure(len(layers), nrows=2, width=3.4, height=2.8)
        for ax, layer in zip(axes[: len(layers)], layers):
            d = _draw(ax, with_diag, diag, f"weight_rel_change/{layer}", band, colours=colours)
            _finish(ax, layer, "‖Wt − W0‖ / ‖W0‖", d)
        for ax, layer in zip(axes[len(layers):], layers):
            d = _draw(ax, with_diag, diag, f"weight_cosine/{layer}", band, colours=colours)
            _finish(ax, layer, "cos(Wt, W0)", d)
        fig.suptitle(f"Weight change per half-layer (weights only, no bias)\n{panel.title}", fontsize=10)
        name = f"weights-{panel.slug}.png"
        figs.append(_Figure(f"Weight change per half-layer — {panel.title}", name, _save(fig, out / name),
                            f"Relative change (top) and cosine similarity with the initial weights (bottom); {band_text}."))
    return figs


# ---------------------------------------------------------------------------- CKA between optimisers
@dataclass
class _CrossCKA:
    dataset: str
    labels: list[str]
    blocks: int
    biased: list[list[list[float]]]  # block → row → column
    unbiased: list[list[list[float]]]
    probe_size: int


def _pair_runs(a: Series, b: Series) -> list[tuple[Run, Run]]:
    """Runs of two series paired by seed where seeds match, else in order."""
    by_seed = {str(r.seed): r for r in b.runs}
    if all(str(r.seed) in by_seed for r in a.runs):
        return [(r, by_seed[str(r.seed)]) for r in a.runs]
    return list(zip(a.runs, b.runs))


def _cross_cka(panels: Sequence[Panel], probe_size: int, data_root: str | None) -> list[_CrossCKA]:
    """CKA of every block's output between the final models of every pair of series, per dataset."""
    import torch

    from .diagnostics import block_outputs, linear_cka, load_run_model, probe_inputs

    by_dataset: dict[str, list[tuple[str, Series]]] = {}
    for panel in panels:
        for s in panel.series:
            runs = [r for r in s.runs if (r.path / "checkpoints" / "last.pt").is_file()]
            if runs:
                by_dataset.setdefault(panel.dataset, []).append((f"{panel.setting}: {s.label}", Series(s.label, runs, s.key)))
    results = []
    for dataset, entries in by_dataset.items():
        if len(entries) < 2 and all(len(s.runs) < 2 for _, s in entries):
            continue
        probe = probe_inputs(entries[0][1].runs[0].config, probe_size, root=data_root).to(torch.float64)
        outs: dict[Path, list[Tensor]] = {}
        for _, s in entries:
            for r in s.runs:
                model, _ = load_run_model(r.path)
                outs[r.path] = block_outputs(model.double(), probe)
        blocks = min(len(o) for o in outs.values())
        n = len(entries)
        mats = {ub: [[[math.nan] * n for _ in range(n)] for _ in range(blocks)] for ub in (False, True)}
        for i, (_, si) in enumerate(entries):
            for j, (_, sj) in enumerate(entries):
                if j < i:
                    continue
                if i == j:  # seed against seed within one series: the baseline of run-to-run variation
                    pairs = [(a, b) for k, a in enumerate(si.runs) for b in si.runs[k + 1:]]
                else:
                    pairs = _pair_runs(si, sj)
                if not pairs:
                    continue
                for ub in (False, True):
                    for l in range(blocks):
                        v = statistics.fmean(linear_cka(outs[a.path][l], outs[b.path][l], unbiased=ub) for a, b in pairs)
                        mats[ub][l][i][j] = mats[ub][l][j][i] = v
        results.append(_CrossCKA(dataset, [lab for lab, _ in entries], blocks, mats[False], mats[True], probe.shape[0]))
    return results


def _cross_cka_figure(c: _CrossCKA, out: Path) -> _Figure:
    fig, axes = _figure(c.blocks, width=max(3.2, 0.9 * len(c.labels) + 1.5), height=max(3.0, 0.6 * len(c.labels) + 1.8))
    finite = [v for blk in c.biased for row in blk for v in row if math.isfinite(v)]
    vmin = min(finite + [1.0]) - 1e-3
    for l, ax in enumerate(axes):
        m = c.biased[l]
        ax.imshow(m, vmin=vmin, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(c.labels)), [str(k) for k in range(len(c.labels))])
        ax.set_yticks(range(len(c.labels)), [str(k) for k in range(len(c.labels))])
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                dark = math.isfinite(v) and (v - vmin) / (1.0 - vmin) < 0.6
                ax.text(j, i, _num(v, 4), ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.set_title(f"block {l}", fontsize=10)
    fig.suptitle(f"Linear CKA between final models (biased; colour scale {vmin:.4g} to 1), {c.dataset}\n" +
                 "; ".join(f"{k}: {lab}" for k, lab in enumerate(c.labels)), fontsize=8)
    name = f"cka-between-{re.sub(r'[^a-z0-9]+', '-', c.dataset.lower())}.png"
    return _Figure(f"CKA between optimisers — {c.dataset}", name, _save(fig, out / name),
                   f"Block outputs of the final models on the first {c.probe_size} training images; off the diagonal, "
                   "series against series (runs paired by seed, mean over pairs); on the diagonal, seed against seed "
                   "within a series (blank with one seed).")


# ---------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; } figure { margin: 1em 0 2em; }
figcaption { font-size: 0.9em; color: #555; } pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
details { margin: 0.3em 0; } code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _num(v: float, digits: int = 4) -> str:
    return "–" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.{digits}g}"


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(head)
    out = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = "".join(f"<td class='num'>{c}</td>" if n else f"<td>{c}</td>" for c, n in zip(row, numeric))
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _meta_get(meta: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if meta.get(k) not in (None, ""):
            return meta[k]
    return None


def _environment() -> dict[str, str]:
    import matplotlib
    import numpy
    import torch

    from . import __version__

    env = {
        "exactgn": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": numpy.__version__, "matplotlib": matplotlib.__version__, "platform": platform.platform(),
        "machine": platform.machine(), "hostname": socket.gethostname(), "cpu count": str(os.cpu_count()),
        "cuda": torch.version.cuda or "none",
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return env


def _stat(values: Sequence[float], digits: int = 4) -> str:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return _num(vals[0], digits)
    return f"{_num(statistics.fmean(vals), digits)} [{_num(min(vals), digits)}, {_num(max(vals), digits)}]"


def _summary_rows(panel: Panel) -> list[list[str]]:
    rows = []
    for s in panel.series:
        runs = s.runs
        last_diag = [r.diagnostics[-1] for r in runs if r.diagnostics]
        diag = lambda key, digits=4: _stat([d.get(key, math.nan) for d in last_diag], digits)  # noqa: E731
        blocks = [int(m.group(1)) for d in last_diag for k in d if (m := re.fullmatch(r"cka/block(\d+)", k))]
        deepest = f"cka/block{max(blocks)}" if blocks else "cka/block0"
        rows.append([
            _esc(s.label), str(len(runs)), _stat([_final(r, "epoch") for r in runs]),
            _stat([_final(r, "train_loss") for r in runs]), _stat([_final(r, "test_loss") for r in runs]),
            _stat([_final(r, "test_accuracy") for r in runs]), _stat([_best(r, "test_accuracy", True) for r in runs]),
            diag("ntk_alignment", 6), diag(deepest, 6), diag("weight_rel_change/all"),
        ])
    return rows


def _html(runs: Sequence[Run], panels: Sequence[Panel], figures: Sequence[_Figure], band: str, title: str,
          cross: Sequence[_CrossCKA] = (), matched: str = "") -> str:
    env = _environment()
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p>{len(runs)} run(s) in {len(panels)} setting(s). Seeds of one setting are drawn as the mean with a band "
        f"({'min–max over seeds' if band == 'minmax' else '±1 standard deviation over seeds'}). Table cells with "
        "several seeds read <code>mean [min, max]</code>. Generated by <code>exactgn report</code>.</p>",
        "<h2>Summary</h2>",
    ]
    head = ["series", "runs", "epochs", "final train loss", "final test loss", "final test acc.", "best test acc.",
            "NTK alignment (last)", "CKA deepest block vs. init (last)", "weight rel. change (last)"]
    for panel in panels:
        parts.append(f"<h3>{_esc(panel.title)}</h3>")
        parts.append(_table(head, _summary_rows(panel), [False] + [True] * (len(head) - 1)))
    for c in cross:
        parts.append(f"<h3>Linear CKA between final models — {_esc(c.dataset)} ({c.probe_size} probe images)</h3>")
        rows = []
        for i, a in enumerate(c.labels):
            for j, b in enumerate(c.labels):
                if j < i:
                    continue
                rows.append([_esc(a), _esc(b) if j != i else "(seed vs. seed)"]
                            + [f"{_num(c.biased[l][i][j], 5)} / {_num(c.unbiased[l][i][j], 5)}" for l in range(c.blocks)])
        parts.append(_table(["series", "against"] + [f"block {l} (biased / unbiased)" for l in range(c.blocks)], rows,
                            [False, False] + [True] * c.blocks))
    parts.append(matched)
    parts.append("<h2>Figures</h2>")
    for fig in figures:
        b64 = base64.b64encode(fig.data).decode("ascii")
        parts.append(
            f"<figure><h3>{_esc(fig.title)}</h3><img alt='{_esc(fig.title)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{_esc(fig.caption)} File: <code>{_esc(fig.file)}</code></figcaption></figure>"
        )
    parts.append("<h2>Runs</h2>")
    run_rows = []
    for panel in panels:
        for s in panel.series:
            for r in s.runs:
                m = r.meta
                run_rows.append([
                    _esc(r.label), _esc(r.get("name")), _esc(panel.title), _esc(s.label), _esc(r.seed),
                    _esc(_meta_get(m, "status")), _esc(_meta_get(m, "epochs_done")),
                    _esc(_meta_get(m, "git_revision", "git_rev", "git", "revision", "git_commit") or "unknown"),
                    _esc(_meta_get(m, "exactgn_version", "exactgn", "version")),
                    _esc(_meta_get(m, "torch_version", "torch")), _esc(_meta_get(m, "device")),
                    _esc(_meta_get(m, "start_time", "started", "start")), _esc(_meta_get(m, "end_time", "ended", "end")),
                    "yes" if r.diagnostics else "no",
                ])
    parts.append(_table(["run", "name", "setting", "series", "seed", "status", "epochs done", "git revision",
                         "exactgn", "torch", "device", "start", "end", "diagnostics"], run_rows))
    parts.append("<h2>Configurations</h2>")
    for r in runs:
        parts.append(
            f"<details><summary><code>{_esc(r.label)}</code> — <code>{_esc(r.path)}</code></summary>"
            f"<h4>config.toml</h4><pre>{_esc(r.config_text)}</pre>"
            f"<h4>meta.json</h4><pre>{_esc(json.dumps(r.meta, indent=2))}</pre></details>"
        )
    parts.append("<h2>Environment (of this report)</h2>")
    parts.append(_table(["key", "value"], [[_esc(k), _esc(v)] for k, v in env.items()]))
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------- entry point
def _matched_section(runs: Sequence[Run], target: float) -> str:
    """The "diagnostics at matched training loss" section (exactgn.evidence); runs without diagnostics are
    named below it."""
    from .evidence import matched_loss_table

    with_diag = [r for r in runs if r.diagnostics]
    parts = [f"<h2>Diagnostics at matched training loss (first record with train loss &le; {target:g})</h2>",
             "<p>Each run is read at the first diagnostics record whose full-training-set loss is at or below "
             "the target (no interpolation; the record's actual loss is shown). Runs that never get there are "
             "listed "
             "as not reached, with the lowest loss they recorded.</p>"]
    if with_diag:
        head, rows = matched_loss_table([r.path for r in with_diag], target)
        for row, r in zip(rows, with_diag):
            row[0] = r.label
        parts.append(_table(head, [[_esc(c) for c in row] for row in rows], [False] * 4 + [True] * 4))
    missing = [r.label for r in runs if not r.diagnostics]
    if missing:
        parts.append(f"<p>Without diagnostics.jsonl (not in the table): {_esc(', '.join(missing))}.</p>")
    return "\n".join(parts)


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
    """Write ``out/index.html`` (self-contained: figures embedded) and the figures as ``out/*.png``; returns the
    HTML path. ``paths``: run folders or folders that contain run folders. ``band``: ``"minmax"`` or ``"std"``.

    ``cross_cka``: also compute linear CKA between the final models (``checkpoints/last.pt``) of every pair of
    series of a dataset, on its first ``probe_size`` training images (needs the data; root ``data_root``, else the
    runs' ``data.root``, else ``$EXACTGN_DATA``).

    ``matched_loss``: with several runs, add the table "diagnostics at matched training loss" (each run's
    first diagnostics record at or below that training loss, :mod:`exactgn.evidence`).
    """
    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    if not paths:
        raise ReportError("no run folders given")
    run_paths = find_runs(paths)
    runs = [load_run(p, label) for p, label in zip(run_paths, _labels(run_paths))]
    panels = group_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[_Figure] = []
    for panel in panels:
        figures.extend(_panel_figures(panel, out, band))
    cross = _cross_cka(panels, probe_size, data_root) if cross_cka else []
    figures.extend(_cross_cka_figure(c, out) for c in cross)
    page = out / "index.html"
    tmp = out / ".index.html.tmp"
    if matched_loss is not None and not math.isfinite(matched_loss):
        raise ReportError(f"--matched-loss must be a finite training loss, got {matched_loss!r}")
    matched = _matched_section(runs, matched_loss) if matched_loss is not None and len(runs) > 1 else ""
    tmp.write_text(_html(runs, panels, figures, band, title, cross, matched), encoding="utf-8")
    os.replace(tmp, page)
    return page


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="PNG figures and one self-contained HTML page from run folders",
        description="Read run folders (or folders of run folders, searched recursively) and write PNG figures and "
        "one self-contained HTML page (figures embedded, summary tables, every run's configuration, meta and git "
        "revision, and the environment). Runs are grouped by dataset and full-/mini-batch setting; seeds of one "
        "setting are drawn as mean and band.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or folders containing run folders")
    p.add_argument("--out", metavar="DIR", default="report", help="output folder (default ./report)")
    p.add_argument("--band", choices=("minmax", "std"), default="minmax",
                   help="band drawn around the mean over seeds: min–max (default) or ±1 std")
    p.add_argument("--title", default="exactgn report", help="title of the HTML page")
    p.add_argument("--cross-cka", action="store_true",
                   help="also compute CKA between the final models of every pair of series (optimiser against "
                   "optimiser); needs the runs' checkpoints and data")
    p.add_argument("--probe-size", type=int, default=256, help="probe images for --cross-cka (default 256)")
    p.add_argument("--data-root", metavar="DIR", help="data root for --cross-cka (default: the runs' data.root, "
                   "else $EXACTGN_DATA)")
    p.add_argument("--matched-loss", type=float, metavar="LOSS",
                   help="with several runs: add a table of each run's diagnostics at the first record whose "
                   "training loss is at or below LOSS (comparisons at matched training loss, not matched "
                   "steps)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    page = make_report(args.run_dirs, args.out, band=args.band, title=args.title, cross_cka=args.cross_cka,
                       probe_size=args.probe_size, data_root=args.data_root, matched_loss=args.matched_loss)
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    print(f"wrote {page} and {len(pngs)} figure(s) in {page.parent}")
    return 0
