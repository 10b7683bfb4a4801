"""The report's figures (matplotlib, imported when a figure is drawn): per panel, and CKA between series.

Per panel: train/test loss and accuracy per epoch; the per-mini-batch loss change per epoch; and, where the
runs have ``diagnostics.jsonl``: NTK alignment (with the reference's random-probe estimate) and rate of
change, CKA of every block against initialisation, and the weight change of every half-layer (the metrics of
:data:`exactgn.metrics.METRIC_DOC`).
"""

from __future__ import annotations

import io
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ...metrics import block_outputs, linear_cka
from ..diagnostics import load_run_model, probe_inputs
from ..rundir import last_checkpoint
from .runs import Panel, Run, Series, aggregate_seeds

__all__ = ["Figure", "CrossCKA", "panel_figures", "cross_cka", "cross_cka_figure", "format_number"]


def format_number(v: float, digits: int = 4) -> str:
    """``v`` to ``digits`` significant digits; ``–`` for a missing or non-finite value."""
    return "–" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.{digits}g}"


# ---------------------------------------------------------------------------- figures
def _figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width * ncols, 7.5), height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _draw(
    ax,
    series: Sequence[Series],
    rows_of,
    key: str,
    band: str,
    *,
    log: bool = False,
    style: str = "-",
    label_suffix: str = "",
    colours: dict[str, Any],
    scale: float = 1.0,
) -> bool:
    drawn = False
    for s in series:
        curve = aggregate_seeds([rows_of(r) for r in s.runs], key, band)
        if curve is None:
            continue
        xs, mean, lo, hi = ([v * scale for v in part] if i else part for i, part in enumerate(curve))
        if len(xs) == 1:  # one point: its own tick, not an axis of made-up fractional epochs
            ax.set_xticks(xs)
            ax.set_xlim(xs[0] - 1, xs[0] + 1)
        if log and (min(lo + mean) <= 0 or max(hi + mean) / min(lo + mean) < 20):
            log = False  # log scale only for positive values spanning more than a factor of 20
        colour = colours[s.label]
        ax.plot(
            xs, mean, style, color=colour, label=s.label + label_suffix, marker="." if len(xs) < 30 else None
        )
        if len(s.runs) > 1:
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.2, linewidth=0)
        drawn = True
    if drawn and log:
        ax.set_yscale("log")
    return drawn


def _finish(ax, title: str, ylabel: str, drawn: bool) -> None:
    from matplotlib.ticker import FixedLocator, MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    if not isinstance(ax.xaxis.get_major_locator(), FixedLocator):  # a one-point series keeps its tick
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
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncols=min(len(handles), 3),
            fontsize=8,
            frameon=False,
        )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    data = buf.getvalue()
    path.write_bytes(data)
    return data


@dataclass
class Figure:
    """One PNG of the report: its heading, file name, bytes and caption."""

    title: str
    file: str
    data: bytes
    caption: str


Rows = Callable[[Run], list[dict[str, Any]]]


@dataclass
class _Panel:
    """What every figure of one panel needs: the panel, the output folder, colours and the band's wording."""

    panel: Panel
    out: Path
    band: str
    colours: dict[str, Any]

    @property
    def band_text(self) -> str:
        return "mean over seeds, band = " + ("min–max" if self.band == "minmax" else "±1 std")

    def draw(self, ax: Any, series: Sequence[Series], rows: Rows, key: str, **kw: Any) -> bool:
        return _draw(ax, series, rows, key, self.band, colours=self.colours, **kw)

    def save(self, fig: Any, stem: str, title: str, caption: str) -> Figure:
        if any(len(s.runs) > 1 for s in self.panel.series):  # the band's type on the figure itself
            fig.text(0.995, 0.005, self.band_text, ha="right", va="bottom", fontsize=7, color="grey")
        name = f"{stem}-{self.panel.slug}.png"
        return Figure(f"{title} — {self.panel.title}", name, _save(fig, self.out / name), caption)


def _epochs(run: Run) -> list[dict[str, Any]]:
    return run.epochs


def _diagnostics(run: Run) -> list[dict[str, Any]]:
    return run.diagnostics or []


def _loss_change_means(run: Run) -> list[dict[str, Any]]:
    if run.loss_change is not None:
        return run.loss_change
    return [{"epoch": e["epoch"], "mean": e.get("mean_loss_change_pct", math.nan)} for e in run.epochs]


def _curves(ctx: _Panel) -> Figure:
    fig, axes = _figure(4)
    for ax, (key, title, log) in zip(
        axes,
        [
            ("train_loss", "train loss", True),
            ("test_loss", "test loss", True),
            ("train_accuracy", "train accuracy", False),
            ("test_accuracy", "test accuracy", False),
        ],
    ):
        percent = key.endswith("accuracy")  # in percent, as in the CLI tables
        drawn = ctx.draw(ax, ctx.panel.series, _epochs, key, log=log, scale=100.0 if percent else 1.0)
        _finish(ax, title, key.replace("_", " ") + (" (%)" if percent else ""), drawn)
    fig.suptitle(ctx.panel.title, fontsize=11)
    return ctx.save(
        fig, "curves", "Loss and accuracy", f"Per epoch (epoch 0 = before training); {ctx.band_text}."
    )


def _loss_change(ctx: _Panel) -> Figure:
    fig, axes = _figure(2)
    series = ctx.panel.series
    _finish(
        axes[0],
        "mean over the epoch's steps",
        "loss change (%)",
        ctx.draw(axes[0], series, _loss_change_means, "mean"),
    )
    _finish(
        axes[1],
        "median over the epoch's steps",
        "loss change (%)",
        ctx.draw(axes[1], series, lambda r: r.loss_change or [], "median"),
    )
    for ax in axes:
        ax.axhline(0.0, color="black", linewidth=0.6)
    fig.suptitle(
        f"Per-mini-batch loss change 100·(ℓ_after − ℓ_before)/ℓ_before\n{ctx.panel.title}", fontsize=10
    )
    return ctx.save(
        fig,
        "loss-change",
        "Per-mini-batch loss change",
        f"Change of the loss on the same mini-batch across one step, summarised per epoch; {ctx.band_text}.",
    )


def _ntk(ctx: _Panel, series: list[Series]) -> Figure:
    fig, axes = _figure(3)
    d0 = ctx.draw(axes[0], series, _diagnostics, "ntk_alignment")
    ctx.draw(axes[0], series, _diagnostics, "ntk_probe_cosine", style="--", label_suffix=" (probe estimate)")
    _finish(axes[0], "NTK similarity to initialisation", "alignment  (dashed: cos(Θ0w, Θtw))", d0)
    _finish(
        axes[1],
        "NTK rate of change",
        "(1 − alignment(prev, now)) / epoch",
        ctx.draw(axes[1], series, _diagnostics, "ntk_rate", log=True),
    )
    _finish(
        axes[2],
        "NTK relative change",
        "‖Θt − Θ0‖ / ‖Θ0‖",
        ctx.draw(axes[2], series, _diagnostics, "ntk_rel_change"),
    )
    fig.suptitle(f"Exact empirical NTK on the probe batch\n{ctx.panel.title}", fontsize=10)
    return ctx.save(
        fig,
        "ntk",
        "NTK",
        "Kernel alignment ⟨Θ0, Θt⟩/(‖Θ0‖‖Θt‖) of the exact NTK (solid) and the reference's "
        f"random-probe estimate (dashed); rate of change between consecutive records; {ctx.band_text}.",
    )


def _metric_names(series: list[Series]) -> set[str]:
    return {k for s in series for r in s.runs for rec in (r.diagnostics or []) for k in rec}


def _cka(ctx: _Panel, series: list[Series]) -> Figure | None:
    blocks = sorted(
        {int(m.group(1)) for k in _metric_names(series) if (m := re.fullmatch(r"cka/block(\d+)", k))}
    )
    if not blocks:
        return None
    fig, axes = _figure(len(blocks), width=3.6)
    for ax, block in zip(axes, blocks):
        drawn = ctx.draw(ax, series, _diagnostics, f"cka/block{block}")
        ctx.draw(
            ax, series, _diagnostics, f"cka_unbiased/block{block}", style="--", label_suffix=" (unbiased)"
        )
        ctx.draw(ax, series, _diagnostics, f"cka_delta/block{block}", style=":", label_suffix=" (increment)")
        _finish(ax, f"block {block}", "linear CKA vs. init", drawn)
    fig.suptitle(f"Linear CKA of each block's output against initialisation\n{ctx.panel.title}", fontsize=10)
    return ctx.save(
        fig,
        "cka",
        "CKA per block",
        "Biased (solid) and unbiased (dashed) linear CKA of each block's output on the probe batch, "
        "and biased CKA of what the block adds to the state, z_l − z_{l−1} (dotted; without the "
        f"identity skip, which keeps output CKA near 1 when the branches are small); {ctx.band_text}.",
    )


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _weights(ctx: _Panel, series: list[Series]) -> Figure | None:
    prefix = "weight_rel_change/"
    layers = sorted(
        {
            k.removeprefix(prefix)
            for k in _metric_names(series)
            if k.startswith(prefix) and k != prefix + "all"
        },
        key=_natural,
    )
    if not layers:
        return None
    fig, axes = _figure(len(layers), nrows=2, width=3.4, height=2.8)
    for ax, layer in zip(axes[: len(layers)], layers):
        _finish(ax, layer, "‖Wt − W0‖ / ‖W0‖", ctx.draw(ax, series, _diagnostics, f"{prefix}{layer}"))
    for ax, layer in zip(axes[len(layers) :], layers):
        _finish(ax, layer, "cos(Wt, W0)", ctx.draw(ax, series, _diagnostics, f"weight_cosine/{layer}"))
    fig.suptitle(f"Weight change per half-layer (weights only, no bias)\n{ctx.panel.title}", fontsize=10)
    return ctx.save(
        fig,
        "weights",
        "Weight change per half-layer",
        f"Relative change (top) and cosine similarity with the initial weights (bottom); {ctx.band_text}.",
    )


def panel_figures(panel: Panel, out: Path, band: str) -> list[Figure]:
    """Every figure of one panel, written to ``out`` as PNG files."""
    import matplotlib  # noqa: PLC0415 - matplotlib loads only when a report is drawn

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    ctx = _Panel(panel, out, band, {s.label: cycle[i % len(cycle)] for i, s in enumerate(panel.series)})
    figs = [_curves(ctx), _loss_change(ctx)]
    with_diag = [s for s in panel.series if any(r.diagnostics for r in s.runs)]
    if with_diag:
        figs.append(_ntk(ctx, with_diag))
        figs += [f for f in (_cka(ctx, with_diag), _weights(ctx, with_diag)) if f is not None]
    return figs


# ---------------------------------------------------------------------------- CKA between optimisers
@dataclass
class CrossCKA:
    """Linear CKA between the final models of the series of one dataset, per block (matrices series ×
    series)."""

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


def _series_by_dataset(panels: Sequence[Panel]) -> dict[str, list[tuple[str, Series]]]:
    """Per dataset, every series with the runs that have a final checkpoint."""
    by_dataset: dict[str, list[tuple[str, Series]]] = {}
    for panel in panels:
        for s in panel.series:
            runs = [r for r in s.runs if last_checkpoint(r.path).is_file()]
            if runs:
                by_dataset.setdefault(panel.dataset, []).append(
                    (f"{panel.setting}: {s.label}", Series(s.label, runs, s.key))
                )
    return by_dataset


def _pairs(si: Series, sj: Series, same: bool) -> list[tuple[Run, Run]]:
    if same:  # seed against seed within one series: the baseline of run-to-run variation
        return [(a, b) for k, a in enumerate(si.runs) for b in si.runs[k + 1 :]]
    return _pair_runs(si, sj)


def _cka_matrices(
    entries: list[tuple[str, Series]], outs: dict[Path, list[Any]], blocks: int
) -> dict[bool, Any]:
    n = len(entries)
    mats = {ub: [[[math.nan] * n for _ in range(n)] for _ in range(blocks)] for ub in (False, True)}
    for i, (_, si) in enumerate(entries):
        for j in range(i, n):
            pairs = _pairs(si, entries[j][1], i == j)
            for ub in (False, True) if pairs else ():
                for block in range(blocks):
                    v = statistics.fmean(
                        linear_cka(outs[a.path][block], outs[b.path][block], unbiased=ub) for a, b in pairs
                    )
                    mats[ub][block][i][j] = mats[ub][block][j][i] = v
    return mats


def cross_cka(panels: Sequence[Panel], probe_size: int, data_root: str | None) -> list[CrossCKA]:
    """CKA of every block's output between the final models of every pair of series, per dataset."""
    import torch  # noqa: PLC0415

    results = []
    for dataset, entries in _series_by_dataset(panels).items():
        if len(entries) < 2 and all(len(s.runs) < 2 for _, s in entries):
            continue
        probe = probe_inputs(entries[0][1].runs[0].config, probe_size, root=data_root).to(torch.float64)
        outs = {
            r.path: block_outputs(load_run_model(r.path)[0].double(), probe)
            for _, s in entries
            for r in s.runs
        }
        blocks = min(len(o) for o in outs.values())
        mats = _cka_matrices(entries, outs, blocks)
        results.append(
            CrossCKA(dataset, [lab for lab, _ in entries], blocks, mats[False], mats[True], probe.shape[0])
        )
    return results


def cross_cka_figure(c: CrossCKA, out: Path) -> Figure:
    """The CKA matrices of one dataset as heat maps, one per block."""
    n = len(c.labels)
    fig, axes = _figure(c.blocks, width=max(3.2, 0.9 * n + 1.5), height=max(3.0, 0.6 * n + 1.8))
    finite = [v for blk in c.biased for row in blk for v in row if math.isfinite(v)]
    vmin = min(finite + [1.0]) - 1e-3
    for block, ax in enumerate(axes):
        m = c.biased[block]
        ax.imshow(m, vmin=vmin, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(n), [str(k) for k in range(n)])
        ax.set_yticks(range(n), [str(k) for k in range(n)])
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                dark = math.isfinite(v) and (v - vmin) / (1.0 - vmin) < 0.6
                ax.text(
                    j,
                    i,
                    format_number(v, 4),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
        ax.set_title(f"block {block}", fontsize=10)
    fig.suptitle(
        f"Linear CKA between final models (biased; colour scale {vmin:.4g} to 1), {c.dataset}\n"
        + "; ".join(f"{k}: {lab}" for k, lab in enumerate(c.labels)),
        fontsize=8,
    )
    name = f"cka-between-{re.sub(r'[^a-z0-9]+', '-', c.dataset.lower())}.png"
    return Figure(
        f"CKA between optimisers — {c.dataset}",
        name,
        _save(fig, out / name),
        f"Block outputs of the final models on the first {c.probe_size} training images; off the "
        "diagonal, series against series (runs paired by seed, mean over pairs); on the diagonal, seed "
        "against seed within a series (blank with one seed).",
    )
