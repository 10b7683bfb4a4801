"""The report's self-contained HTML page: summary tables, figures embedded, every run's files, environment."""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
from typing import Any, Iterable, Sequence

from ..evidence import matched_loss_table
from ..rundir import meta_value, provenance, run_status, utc_now
from .figures import CrossCKA, Figure, format_number
from .runs import Panel, Run, best_value, final_value

__all__ = ["page"]


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


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(head)
    out = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = "".join(f"<td class='num'>{c}</td>" if n else f"<td>{c}</td>" for c, n in zip(row, numeric))
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _environment() -> dict[str, Any]:
    """The report's own provenance (the keys every writer uses) plus the plotting libraries."""
    import matplotlib  # noqa: PLC0415
    import numpy  # noqa: PLC0415

    env = {**provenance(), "numpy_version": numpy.__version__, "matplotlib_version": matplotlib.__version__}
    env.pop("device", None)
    return {**env, "generated": utc_now()}


def _stat(values: Sequence[float], digits: int = 4) -> str:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return format_number(vals[0], digits)
    mean, lo, hi = statistics.fmean(vals), min(vals), max(vals)
    return f"{format_number(mean, digits)} [{format_number(lo, digits)}, {format_number(hi, digits)}]"


def _summary_rows(panel: Panel) -> list[list[str]]:
    rows = []
    for s in panel.series:
        runs = s.runs
        # a single record at epoch 0 is the initial model, not a final value (alignment 1, change 0)
        last_diag = [r.diagnostics[-1] for r in runs if r.diagnostics and r.diagnostics[-1].get("epoch")]
        statuses = [run_status(r.path, r.meta) for r in runs]

        def diag(key: str, digits: int = 4, last_diag: list = last_diag) -> str:
            return _stat([d.get(key, math.nan) for d in last_diag], digits)

        blocks = [int(m.group(1)) for d in last_diag for k in d if (m := re.fullmatch(r"cka/block(\d+)", k))]
        deepest = f"cka/block{max(blocks)}" if blocks else "cka/block0"
        rows.append(
            [
                _esc(s.label),
                str(len(runs)),
                _esc(
                    ", ".join(
                        f"{k} ×{statuses.count(k)}" if statuses.count(k) > 1 else k
                        for k in dict.fromkeys(statuses)
                    )
                ),
                _stat([final_value(r, "epoch") for r in runs]),
                _stat([final_value(r, "train_loss") for r in runs]),
                _stat([final_value(r, "test_loss") for r in runs]),
                _stat([100 * final_value(r, "test_accuracy") for r in runs], 4),
                _stat([100 * best_value(r, "test_accuracy", True) for r in runs], 4),
                diag("ntk_alignment", 6),
                diag(deepest, 6),
                diag("weight_rel_change/all"),
            ]
        )
    return rows


_SUMMARY_HEAD = [
    "series",
    "runs",
    "status",
    "epochs",
    "final train loss",
    "final test loss",
    "final test acc. (%)",
    "best test acc. (%)",
    "NTK alignment (last)",
    "CKA deepest block vs. init (last)",
    "weight rel. change (last)",
]


def _summary(panels: Sequence[Panel]) -> list[str]:
    parts = ["<h2>Summary</h2>"]
    for panel in panels:
        parts.append(f"<h3>{_esc(panel.title)}</h3>")
        parts.append(
            _table(
                _SUMMARY_HEAD, _summary_rows(panel), [False, True, False] + [True] * (len(_SUMMARY_HEAD) - 3)
            )
        )
    return parts


def _cross_tables(cross: Sequence[CrossCKA]) -> list[str]:
    parts = []
    for c in cross:
        parts.append(
            f"<h3>Linear CKA between final models — {_esc(c.dataset)} ({c.probe_size} probe images)</h3>"
        )
        rows = []
        for i, a in enumerate(c.labels):
            for j in range(i, len(c.labels)):
                cells = [
                    f"{format_number(c.biased[b][i][j], 5)} / {format_number(c.unbiased[b][i][j], 5)}"
                    for b in range(c.blocks)
                ]
                rows.append([_esc(a), _esc(c.labels[j]) if j != i else "(seed vs. seed)"] + cells)
        head = ["series", "against"] + [f"block {b} (biased / unbiased)" for b in range(c.blocks)]
        parts.append(_table(head, rows, [False, False] + [True] * c.blocks))
    return parts


def _figures(figures: Sequence[Figure]) -> list[str]:
    parts = ["<h2>Figures</h2>"]
    for fig in figures:
        b64 = base64.b64encode(fig.data).decode("ascii")
        parts.append(
            f"<figure><h3>{_esc(fig.title)}</h3><img alt='{_esc(fig.title)}' "
            f"src='data:image/png;base64,{b64}'>"
            f"<figcaption>{_esc(fig.caption)} File: <code>{_esc(fig.file)}</code></figcaption></figure>"
        )
    return parts


_RUN_META = (
    "status",
    "epochs_done",
    "git_revision",
    "exactgn_version",
    "torch_version",
    "device",
    "start_time",
    "end_time",
)


def _runs_table(panels: Sequence[Panel]) -> list[str]:
    rows = []
    for panel in panels:
        for s in panel.series:
            for r in s.runs:
                meta = {key: meta_value(r.meta, key) for key in _RUN_META}
                meta["status"] = run_status(r.path, r.meta)
                meta["git_revision"] = meta["git_revision"] or "unknown"
                rows.append(
                    [_esc(r.label), _esc(r.get("name")), _esc(panel.title), _esc(s.label), _esc(r.seed)]
                    + [_esc(meta[key]) for key in _RUN_META]
                    + ["yes" if r.diagnostics else "no"]
                )
    head = [
        "run",
        "name",
        "setting",
        "series",
        "seed",
        "status",
        "epochs done",
        "git revision",
        "exactgn",
        "torch",
        "device",
        "start",
        "end",
        "diagnostics",
    ]
    return ["<h2>Runs</h2>", _table(head, rows)]


def _configurations(runs: Sequence[Run]) -> list[str]:
    parts = ["<h2>Configurations</h2>"]
    for r in runs:
        parts.append(
            f"<details><summary><code>{_esc(r.label)}</code> — <code>{_esc(r.path)}</code></summary>"
            f"<h4>config.toml</h4><pre>{_esc(r.config_text)}</pre>"
            f"<h4>meta.json</h4><pre>{_esc(json.dumps(r.meta, indent=2))}</pre></details>"
        )
    return parts


def matched_section(runs: Sequence[Run], target: float) -> str:
    """The "diagnostics at matched training loss" section (:mod:`exactgn.lab.evidence`); runs without
    diagnostics are named below it."""
    with_diag = [r for r in runs if r.diagnostics]
    parts = [
        f"<h2>Diagnostics at matched training loss (first record with train loss &le; {target:g})</h2>",
        "<p>Each run is read at the first diagnostics record whose full-training-set loss is at or below "
        "the target (no interpolation; the record's actual loss is shown). Runs that never get there are "
        "listed as not reached, with the lowest loss they recorded.</p>",
    ]
    if with_diag:
        head, rows = matched_loss_table([r.path for r in with_diag], target)
        for row, r in zip(rows, with_diag):
            row[0] = r.label
        parts.append(_table(head, [[_esc(c) for c in row] for row in rows], [False] * 4 + [True] * 4))
    missing = [r.label for r in runs if not r.diagnostics]
    if missing:
        parts.append(f"<p>Without diagnostics.jsonl (not in the table): {_esc(', '.join(missing))}.</p>")
    return "\n".join(parts)


def page(
    runs: Sequence[Run],
    panels: Sequence[Panel],
    figures: Sequence[Figure],
    band: str,
    title: str,
    cross: Sequence[CrossCKA] = (),
    matched: str = "",
) -> str:
    """The whole report as one HTML document."""
    band_text = "min–max over seeds" if band == "minmax" else "±1 standard deviation over seeds"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p>{len(runs)} run(s) in {len(panels)} setting(s). Seeds of one setting are drawn as the mean with "
        "a "
        f"band ({band_text}). Table cells with several seeds read <code>mean [min, max]</code>. Generated by "
        "<code>exactgn report</code>.</p>",
    ]
    parts += _summary(panels) + _cross_tables(cross) + [matched] + _figures(figures) + _runs_table(panels)
    parts += _configurations(runs)
    parts.append("<h2>Environment (of this report)</h2>")
    parts.append(_table(["key", "value"], [[_esc(k), _esc(v)] for k, v in _environment().items()]))
    parts.append("</body></html>")
    return "\n".join(parts)
