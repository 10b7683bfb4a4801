"""Markdown tables for RESULTS.md from run folders: diagnostics per run, and seeds as mean ± std per setting.

    python scripts/study_tables.py diagnostics RUN_DIR...   # one row per run: NTK, CKA, weights (last record)
    python scripts/study_tables.py seeds SWEEP_DIR...       # per (inverse) setting: mean ± std over seeds
    python scripts/study_tables.py summary STUDY_DIR...     # one row per run of a study
    python scripts/study_tables.py matched --matched-loss 0.3 DIR...    # diagnostics at matched training loss
    python scripts/study_tables.py cross-cka --matched-loss 0.3 DIR...  # CKA GN vs Adam/SGD (same seed)

``matched`` and ``cross-cka`` take run folders or folders of run folders and follow the rule of
exactgn.lab.evidence: each run at its first record (or kept checkpoint, for cross-cka) whose training loss is
at or below the target; runs that never get there are rows saying so. ``--csv FILE`` also writes the table as
CSV (e.g. for results/).

Reads only the run-folder files of docs/run-folder.md (config.toml, meta.json, epochs.csv, steps.csv,
diagnostics.jsonl).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from exactgn.lab.config import read_toml
from exactgn.lab.diagnostics import read_diagnostics
from exactgn.lab.rundir import read_meta, read_rows


def _config(run: Path) -> dict[str, Any]:
    return read_toml(run / "config.toml")


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def diagnostics_table(runs: Sequence[Path]) -> str:
    """Initial vs final NTK alignment, rate, CKA and increment CKA per block, weight change per half-layer."""
    lines = []
    for run in runs:
        recs = read_diagnostics(run / "diagnostics.jsonl")
        first, last = recs[0], recs[-1]
        rates = [r["ntk_rate"] for r in recs if not math.isnan(r.get("ntk_rate", math.nan))]
        blocks = sorted(int(k[len("cka/block") :]) for k in last if k.startswith("cka/block"))
        layers = [
            k.split("/", 1)[1] for k in last if k.startswith("weight_rel_change/") and not k.endswith("/all")
        ]
        meta = read_meta(run)
        lines.append(
            f"**{run.parent.name}/{run.name}** ({meta['optimiser']}, "
            f"epochs {first['epoch']}→{last['epoch']}, "
            f"probe {last['probe_size']})"
        )
        lines.append("")
        lines.append("| metric | initial | final |")
        lines.append("|---|---:|---:|")
        for key in ("ntk_alignment", "ntk_probe_cosine", "ntk_rel_change"):
            lines.append(f"| {key} | {_fmt(first[key])} | {_fmt(last[key])} |")
        if rates:
            lines.append(f"| ntk_rate (first / last record) | {_fmt(rates[0])} | {_fmt(rates[-1])} |")
        for b in blocks:
            for key in (f"cka/block{b}", f"cka_unbiased/block{b}", f"cka_delta/block{b}"):
                lines.append(f"| {key} | {_fmt(first[key])} | {_fmt(last[key])} |")
        for layer in layers + ["all"]:
            lines.append(
                f"| weight_rel_change/{layer} | {_fmt(first[f'weight_rel_change/{layer}'])} "
                f"| {_fmt(last[f'weight_rel_change/{layer}'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def _ms(values: Sequence[float], digits: int = 4, scale: float = 1.0) -> str:
    vals = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return _fmt(vals[0], digits)
    return f"{_fmt(statistics.mean(vals), digits)} ± {_fmt(statistics.stdev(vals), digits)}"


def _setting(cfg: dict[str, Any]) -> tuple[str, str]:
    """(``right``/``pinv`` for GN, else the optimiser's name; ``exact``/``truncated``/``-``, plus ``full
    batch``
    when the run trains on the full batch, so that one folder may hold several settings)."""
    batch = " (full batch)" if cfg["train"]["batch_size"] == 0 else ""
    if cfg["optim"]["name"] != "gn":
        return cfg["optim"]["name"] + batch, "-"
    gn = cfg["optim"]["gn"]
    trunc = "truncated" if (gn["rtol"] or gn["atol"]) else "exact"
    return gn["inverse"] + batch, trunc


SEEDS_HEAD = [
    "| sweep | inverse | seeds | final test acc % | best test acc % | final train loss | final test loss "
    "| loss change % (epoch 1 / last) | NTK alignment | CKA b0 / b1 | CKA Δ b0 / b1 | ‖W−W0‖/‖W0‖ "
    "| fall-backs |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def _grouped(folder: Path) -> list[tuple[tuple[str, str], list[Path]]]:
    """The runs of a sweep folder by (inverse, truncation), right-inverse groups first."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for run in sorted(p.parent for p in folder.glob("*/meta.json")):
        groups.setdefault(_setting(_config(run)), []).append(run)
    return sorted(groups.items(), key=lambda kv: (not kv[0][0].startswith("right"), kv[0][0]))


def _up_to(runs: list[Path], epoch: int | None, what: str) -> tuple[list[list], list[list]]:
    """Each run's epoch rows and diagnostics records, cut at ``epoch`` (which every run must reach)."""
    ep = [read_rows(r / "epochs.csv") for r in runs]
    dg = [read_diagnostics(r / "diagnostics.jsonl") for r in runs]
    if epoch is None:
        return ep, dg
    ep = [[row for row in e if row["epoch"] <= epoch] for e in ep]
    dg = [[rec for rec in d if rec["epoch"] <= epoch] for d in dg]
    if any(e[-1]["epoch"] != epoch for e in ep):
        raise SystemExit(f"{what}: not every run reached epoch {epoch}")
    return ep, dg


def _seeds_row(folder: Path, inverse: str, runs: list[Path], ep: list[list], dg: list[list]) -> str:
    fin = [e[-1] for e in ep]
    statuses = {read_meta(r)["status"] for r in runs}
    status = "" if statuses == {"finished"} else " " + "/".join(sorted(statuses))
    fallbacks = sum(read_meta(r).get("gram_fallback_steps", 0) for r in runs)

    def last(key: str, digits: int = 4) -> str:
        return _ms([d[-1][key] for d in dg], digits)

    first_change = _ms([e[1]["mean_loss_change_pct"] for e in ep], 2)
    change = f"{first_change} / {_ms([f['mean_loss_change_pct'] for f in fin], 2)}"
    cells = [
        f"{folder.name}",
        inverse,
        f"{len(runs)}{status}",
        _ms([f["test_accuracy"] for f in fin], 2, 100),
        _ms([max(r["test_accuracy"] for r in e[1:]) for e in ep], 2, 100),
        _ms([f["train_loss"] for f in fin]),
        _ms([f["test_loss"] for f in fin]),
        change,
        last("ntk_alignment"),
        f"{last('cka/block0')} / {last('cka/block1')}",
        f"{last('cka_delta/block0', 3)} / {last('cka_delta/block1', 3)}",
        last("weight_rel_change/all", 2),
        str(fallbacks),
    ]
    return "| " + " | ".join(cells) + " |"


def seeds_table(folders: Sequence[Path], epoch: int | None = None) -> str:
    """One row per (sweep folder, inverse): mean ± std over the seeds (trial folders) of final metrics.

    With ``epoch``, every run is read up to that epoch only (runs stopped at different epochs compare there).
    """
    rows = list(SEEDS_HEAD)
    for folder in folders:
        for (inverse, trunc), runs in _grouped(folder):
            ep, dg = _up_to(runs, epoch, f"{folder} {inverse}/{trunc}")
            rows.append(_seeds_row(folder, inverse, runs, ep, dg))
    return "\n".join(rows) + "\n"


def curves_table(
    folders: Sequence[Path], key: str = "test_accuracy", every: int = 1, scale: float = 100.0
) -> str:
    """Per epoch, mean ± std over seeds of ``key`` for each (sweep, inverse)."""
    series = {}
    for folder in folders:
        groups: dict[tuple[str, str], list[Path]] = {}
        for run in sorted(p.parent for p in folder.glob("*/meta.json")):
            groups.setdefault(_setting(_config(run)), []).append(run)
        for (inverse, trunc), runs in groups.items():
            series[f"{folder.name} {inverse}"] = [read_rows(r / "epochs.csv") for r in runs]
    names = list(series)
    epochs = [r["epoch"] for r in next(iter(series.values()))[0]]
    lines = ["| epoch | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, e in enumerate(epochs):
        if e % every and e != epochs[-1]:
            continue
        cells = [
            _ms([rows[i][key] for rows in series[n] if i < len(rows)], 2 if scale == 100 else 4, scale)
            for n in names
        ]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_table(folders: Sequence[Path]) -> str:
    """One row per run of each study folder: what differs, final/best accuracy, losses, last diagnostics."""
    import csv

    rows = [
        "| study | run | optimiser | epochs | final train loss | final test loss | final test acc % "
        "| best test acc % (epoch) | NTK alignment | CKA Δ b0 / b1 | ‖W−W0‖/‖W0‖ |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for folder in folders:
        with open(folder / "results.csv") as f:
            results = list(csv.DictReader(f))
        for r in results:
            run = Path(r["run_dir"])
            if not run.is_absolute() and not run.exists():
                run = folder / run.name
            name = r.get("run") or r.get("overrides") or r.get("trial")
            opt = r.get("optimiser") or _config(run)["optim"]["name"]
            diag = (
                read_diagnostics(run / "diagnostics.jsonl") if (run / "diagnostics.jsonl").is_file() else []
            )
            last = diag[-1] if diag else {}
            num = lambda key, d=4: _fmt(float(r[key]), d) if r.get(key) not in (None, "") else "-"  # noqa: E731
            acc = lambda key: f"{100 * float(r[key]):.2f}" if r.get(key) not in (None, "") else "-"  # noqa: E731
            status = "" if r["status"] == "finished" else f" ({r['status']})"
            rows.append(
                f"| {folder.name} | {name} | {opt}{status} "
                f"| {r['epochs']} | {num('final_train_loss')} | {num('final_test_loss')} "
                f"| {acc('final_test_accuracy')} "
                f"| {acc('best_test_accuracy')} ({r['best_test_accuracy_epoch']}) "
                f"| {_fmt(last.get('ntk_alignment'))} "
                f"| {_fmt(last.get('cka_delta/block0'), 3)} / {_fmt(last.get('cka_delta/block1'), 3)} "
                f"| {_fmt(last.get('weight_rel_change/all'), 2)} |"
            )
    return "\n".join(rows) + "\n"


def _write_csv(path: Path, head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(head)
        writer.writerows(rows)


def matched_tables(
    kind: str,
    paths: Sequence[Path],
    target: float,
    probe_size: int | None = None,
    csv_path: Path | None = None,
) -> str:
    """``matched`` or ``cross-cka`` at training loss ``target`` (exactgn.lab.evidence), as markdown."""
    from exactgn.lab import evidence
    from exactgn.lab.report import find_runs

    runs = find_runs(paths)
    if kind == "matched":
        head, rows = evidence.matched_loss_table(runs, target)
    else:
        head, rows = evidence.cross_cka_table(runs, target, probe_size=probe_size)
        if not rows:
            raise SystemExit(
                "cross-cka: no (GN, Adam/SGD) pair with the same seed and training images among "
                + ", ".join(str(r) for r in runs)
            )
    if csv_path is not None:
        _write_csv(csv_path, head, rows)
    return evidence.markdown(head, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=("diagnostics", "seeds", "curves", "summary", "matched", "cross-cka"))
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--key", default="test_accuracy")
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--epoch", type=int, default=None, help="seeds: compare the runs at this epoch")
    parser.add_argument(
        "--matched-loss",
        type=float,
        metavar="LOSS",
        help="matched, cross-cka: the target training loss (first record at or below it)",
    )
    parser.add_argument(
        "--probe-size",
        type=int,
        default=None,
        help="cross-cka: probe images (default: the GN run's diagnostics.probe_size)",
    )
    parser.add_argument(
        "--csv", type=Path, default=None, help="matched, cross-cka: also write the table here"
    )
    args = parser.parse_args()
    if args.kind in ("matched", "cross-cka"):
        if args.matched_loss is None:
            parser.error(f"{args.kind} needs --matched-loss LOSS")
        print(matched_tables(args.kind, args.paths, args.matched_loss, args.probe_size, args.csv), end="")
    elif args.kind == "diagnostics":
        print(diagnostics_table(args.paths))
    elif args.kind == "summary":
        print(summary_table(args.paths))
    elif args.kind == "seeds":
        print(seeds_table(args.paths, args.epoch))
    else:
        print(curves_table(args.paths, args.key, args.every, 100.0 if "accuracy" in args.key else 1.0))


if __name__ == "__main__":
    main()
