"""(Re)generate the tables of RESULTS.md from the committed files under results/ (docs/results.md).

    python scripts/results_tables.py --write     # rewrite every marked table of RESULTS.md
    python scripts/results_tables.py --check     # exit 1 (and show the difference) when RESULTS.md is stale
    python scripts/results_tables.py --print ID  # print one table

A table sits in the markdown file between ``<!-- table: ID -->`` and ``<!-- /table -->``; everything outside
the markers is prose and is never touched. What each ID shows is registered in ``results/tables.toml``::

    [[table]]
    id = "tuning-minibatch"
    kind = "groups"                       # groups | runs | matched | csv
    folders = ["tune-minibatch-cpu"]      # under results/; every run folder below them
    group = ["contender", "optim.lr"]     # groups: one row per distinct value (config keys, or "contender")
    columns = ["final:val_accuracy", "best:test_accuracy", "final:train_loss", "diag:ntk_alignment"]
    where = { "data.val_size" = 5000 }   # optional: only runs whose config has these values

Kinds: ``groups`` (mean ± sd over the runs of each group, with n: seeds), ``runs`` (one row per run),
``curve`` (epochs.csv column ``key`` at the listed ``epochs``, one column per group, mean ± sd of its runs),
``paired`` (``a`` − ``b`` of a ``column`` per seed, for each of ``rows = [{label, folders, where, a?, b?}]``),
``matched`` (diagnostics at matched training loss ``loss = 0.3``, exactgn.lab.evidence; one row per run, or
per ``group`` with mean ± sd over the runs that reach the loss), ``csv`` (a committed
CSV file ``file = "NAME/table.csv"`` as it is). Columns: ``final:KEY`` / ``best:KEY`` (epochs.csv: last row;
best = highest accuracy or lowest loss over epochs >= 1), ``diag:KEY`` (last diagnostics record), ``meta:KEY``
(meta.json), ``config:KEY`` (the run's config). Accuracies are shown in percent.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exactgn.lab import evidence  # noqa: E402
from exactgn.lab.config import flatten, read_toml  # noqa: E402
from exactgn.lab.diagnostics import read_diagnostics  # noqa: E402
from exactgn.lab.rundir import read_meta, read_rows  # noqa: E402

KINDS = ("groups", "runs", "matched", "csv", "curve", "paired")
SOURCES = ("final", "best", "diag", "meta", "config")
_MARK = re.compile(r"(<!-- table: (?P<id>[A-Za-z0-9_.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


class TableError(ValueError):
    """A registry entry or a marked file is wrong; the message names the table."""


# ---------------------------------------------------------------------------- reading results
def find_runs(results: Path, folders: Sequence[str]) -> list[Path]:
    """Every run folder (one with meta.json) below ``results/<folder>`` for each folder, in path order."""
    runs = []
    for folder in folders:
        base = results / folder
        if not base.is_dir():
            raise TableError(
                f"{base} does not exist; collect it first (scripts/collect_results.py SOURCE {folder})"
            )
        runs += sorted(p.parent for p in base.rglob("meta.json"))
    return runs


def _config_value(config: dict[str, Any], key: str) -> Any:
    return evidence.contender(config) if key == "contender" else flatten(config).get(key)


def value(run: Path, column: str) -> Any:
    """One cell's raw value for a run: ``SOURCE:KEY`` (see the module docstring); ``None`` when absent."""
    source, _, key = column.partition(":")
    if source == "config":
        return _config_value(read_toml(run / "config.toml"), key)
    if source == "meta":
        return read_meta(run).get(key)
    if source == "diag":
        path = run / "diagnostics.jsonl"
        records = read_diagnostics(path) if path.is_file() else []
        return records[-1].get(key) if records else None
    rows = [r for r in read_rows(run / "epochs.csv") if isinstance(r.get(key), (int, float))]
    if not rows:
        return None
    if source == "final":
        return rows[-1][key]
    later = [r[key] for r in rows if r["epoch"] >= 1] or [rows[-1][key]]
    return min(later) if "loss" in key else max(later)


def _check_table(spec: dict[str, Any]) -> None:
    tid = spec.get("id")
    if not isinstance(tid, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", tid):
        raise TableError(
            f"results/tables.toml: every [[table]] needs an id of letters, digits, '.', '_', '-'; got {tid!r}"
        )
    if spec.get("kind") not in KINDS:
        raise TableError(f"table {tid}: kind must be one of {', '.join(KINDS)}, got {spec.get('kind')!r}")
    for column in spec.get("columns", []):
        if column.partition(":")[0] not in SOURCES or not column.partition(":")[2]:
            raise TableError(
                f"table {tid}: column {column!r} must be SOURCE:KEY with SOURCE one of {SOURCES}"
            )
    need = {
        "groups": ("folders", "group", "columns"),
        "runs": ("folders", "columns"),
        "matched": ("folders", "loss"),
        "csv": ("file",),
        "curve": ("folders", "group", "key", "epochs"),
        "paired": ("rows", "a", "b", "column"),
    }[spec["kind"]]
    missing = [k for k in need if k not in spec]
    if missing:
        raise TableError(f"table {tid} ({spec['kind']}): missing {', '.join(missing)}")


# ---------------------------------------------------------------------------- formatting
def _is_acc(column: str) -> bool:
    return column.endswith("accuracy")


def fmt(v: Any, column: str = "") -> str:
    """A cell: accuracies in percent with 2 decimals, other numbers with 4 significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if _is_acc(column):
        return f"{100 * v:.2f}"
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def mean_sd(values: Sequence[Any], column: str) -> str:
    """``mean ± sd (n=k)`` over the numbers (sample sd); ``x (n=1)``; ``-`` when there are none."""
    nums = [
        float(v)
        for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
    if not nums:
        return "-"
    if len(nums) == 1:
        return f"{fmt(nums[0], column)} (n=1)"
    return f"{fmt(statistics.mean(nums), column)} ± {fmt(statistics.stdev(nums), column)} (n={len(nums)})"


def _heading(column: str) -> str:
    return column.replace(":", " ") + (" %" if _is_acc(column) else "")


def _markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return evidence.markdown(head, rows)


def _selected(runs: list[Path], where: dict[str, Any]) -> list[Path]:
    return [
        r for r in runs if all(_config_value(read_toml(r / "config.toml"), k) == v for k, v in where.items())
    ]


def _statuses(runs: Sequence[Path]) -> str:
    odd = [read_meta(r).get("status") for r in runs if read_meta(r).get("status") != "finished"]
    return ", ".join(f"{odd.count(s)} {s}" for s in sorted(set(odd), key=str)) or "finished"


def groups_table(results: Path, spec: dict[str, Any]) -> str:
    runs = _selected(find_runs(results, spec["folders"]), spec.get("where", {}))
    groups: dict[tuple, list[Path]] = {}
    for run in runs:
        key = tuple(_config_value(read_toml(run / "config.toml"), k) for k in spec["group"])
        groups.setdefault(key, []).append(run)
    head = [*spec["group"], "runs", *(_heading(c) for c in spec["columns"])]
    rows = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        members = groups[key]
        cells = [mean_sd([value(r, c) for r in members], c) for c in spec["columns"]]
        rows.append([*(fmt(k) for k in key), f"{len(members)} ({_statuses(members)})", *cells])
    return _markdown(head, rows)


def runs_table(results: Path, spec: dict[str, Any]) -> str:
    runs = _selected(find_runs(results, spec["folders"]), spec.get("where", {}))
    head = ["run", "contender", "seed", "status", *(_heading(c) for c in spec["columns"])]
    rows = []
    for run in runs:
        config = read_toml(run / "config.toml")
        rows.append(
            [
                run.relative_to(results).as_posix(),
                evidence.contender(config),
                fmt(config.get("seed")),
                str(read_meta(run).get("status")),
                *(fmt(value(run, c), c) for c in spec["columns"]),
            ]
        )
    return _markdown(head, rows)


MATCHED_KEYS = (
    ("NTK alignment", "ntk_alignment"),
    ("‖W−W0‖/‖W0‖", "weight_rel_change/all"),
    ("CKA b0 vs init", "cka/block0"),
    ("CKA b1 vs init", "cka/block1"),
    ("CKA Δ b0 vs init", "cka_delta/block0"),
    ("CKA Δ b1 vs init", "cka_delta/block1"),
)


def matched_groups_table(results: Path, spec: dict[str, Any], runs: list[Path]) -> str:
    """Per group: how many runs reach the loss, their matched epoch and actual loss, and the diagnostics there
    (mean ± sd over the runs that reached it)."""
    target = float(spec["loss"])
    groups: dict[tuple, list[evidence.Matched]] = {}
    for run in runs:
        key = tuple(_config_value(read_toml(run / "config.toml"), k) for k in spec["group"])
        groups.setdefault(key, []).append(evidence.diagnostics_at_loss(run, target))
    head = [
        *spec["group"],
        f"reached loss ≤ {target:g}",
        "epoch",
        "actual loss",
        *(h for h, _ in MATCHED_KEYS),
    ]
    rows = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        hits = [m for m in groups[key] if m.reached]
        cells = [f"{len(hits)} of {len(groups[key])}", mean_sd([m.epoch for m in hits], "epoch")]
        cells.append(mean_sd([m.train_loss for m in hits], "loss"))
        cells += [mean_sd([m.record.get(k) for m in hits], k) for _, k in MATCHED_KEYS]
        rows.append([*(fmt(k) for k in key), *cells])
    return _markdown(head, rows)


def matched_table(results: Path, spec: dict[str, Any]) -> str:
    runs = _selected(find_runs(results, spec["folders"]), spec.get("where", {}))
    if spec.get("group"):
        return matched_groups_table(results, spec, runs)
    head, rows = evidence.matched_loss_table(runs, float(spec["loss"]))
    for row, run in zip(rows, runs):
        row[0] = run.relative_to(results).as_posix()
    return _markdown(head, rows)


def csv_table(results: Path, spec: dict[str, Any]) -> str:
    import csv

    path = results / spec["file"]
    if not path.is_file():
        raise TableError(f"table {spec['id']}: {path} does not exist")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise TableError(f"table {spec['id']}: {path} is empty")
    return _markdown(rows[0], rows[1:])


def _epoch_value(run: Path, key: str, epoch: int) -> Any:
    rows = [r for r in read_rows(run / "epochs.csv") if r.get("epoch") == epoch]
    return rows[0].get(key) if rows else None


def curve_table(results: Path, spec: dict[str, Any]) -> str:
    """One row per listed epoch, one column per group: mean ± sd of ``key`` over the group's runs."""
    runs = _selected(find_runs(results, spec["folders"]), spec.get("where", {}))
    groups: dict[tuple, list[Path]] = {}
    for run in runs:
        key = tuple(_config_value(read_toml(run / "config.toml"), k) for k in spec["group"])
        groups.setdefault(key, []).append(run)
    order = sorted(groups, key=lambda k: tuple(str(x) for x in k))
    head = ["epoch", *(" ".join(fmt(x) for x in k) + f" {spec['key']}" for k in order)]
    rows = []
    for epoch in spec["epochs"]:
        cells = [
            mean_sd([_epoch_value(r, spec["key"], epoch) for r in groups[k]], spec["key"]) for k in order
        ]
        rows.append([str(epoch), *(c.replace(" (n=", " (").split(" (")[0] for c in cells)])
    counts = ", ".join(f"{' '.join(fmt(x) for x in k)}: {len(groups[k])}" for k in order)
    return _markdown(head, rows) + f"\nRuns per column (mean ± sd over seeds): {counts}.\n"


def paired_table(results: Path, spec: dict[str, Any]) -> str:
    """Per row (a setting): ``a`` − ``b`` of ``column`` for each seed both have, and their mean."""
    column = spec["column"]
    scale = 100.0 if _is_acc(column) else 1.0
    table, seeds_seen = [], set()
    for row in spec["rows"]:
        a, b = row.get("a", spec["a"]), row.get("b", spec["b"])  # a row may compare other contenders
        runs = _selected(find_runs(results, row["folders"]), row.get("where", {}))
        by: dict[tuple[str, Any], Any] = {}
        for run in runs:
            config = read_toml(run / "config.toml")
            by[(evidence.contender(config), config.get("seed"))] = value(run, column)
        seeds = sorted({s for c, s in by if c == a} & {s for c, s in by if c == b}, key=str)
        diffs = {s: scale * (by[(a, s)] - by[(b, s)]) for s in seeds if None not in (by[(a, s)], by[(b, s)])}
        seeds_seen.update(diffs)
        table.append((row["label"], diffs))
    seeds = sorted(seeds_seen, key=str)
    head = ["setting", *(f"seed {s}" for s in seeds), "mean", "min"]
    rows = []
    for label, diffs in table:
        vals = list(diffs.values())
        cells = [f"{diffs[s]:+.2f}" if s in diffs else "-" for s in seeds]
        rows.append(
            [
                label,
                *cells,
                f"**{statistics.mean(vals):+.2f}**" if vals else "-",
                f"{min(vals):+.2f}" if vals else "-",
            ]
        )
    return _markdown(head, rows)


def render(results: Path, spec: dict[str, Any]) -> str:
    """The generated block of one table: the table and a line naming its sources."""
    _check_table(spec)
    make = {
        "groups": groups_table,
        "runs": runs_table,
        "matched": matched_table,
        "csv": csv_table,
        "curve": curve_table,
        "paired": paired_table,
    }[spec["kind"]]
    table = make(results, spec)
    folders = spec.get("folders") or sorted({f for row in spec.get("rows", []) for f in row["folders"]})
    sources = ", ".join(f"results/{f}" for f in folders) or f"results/{spec.get('file')}"
    return f"{table}\n<sub>Generated by scripts/results_tables.py ({spec['id']}) from {sources}.</sub>\n"


# ---------------------------------------------------------------------------- the marked file
def load_registry(path: Path) -> dict[str, dict[str, Any]]:
    """Table id → spec from the registry file (``[[table]]`` entries); ids must be unique."""
    tables = read_toml(path).get("table", []) if path.is_file() else []
    out: dict[str, dict[str, Any]] = {}
    for spec in tables:
        _check_table(spec)
        if spec["id"] in out:
            raise TableError(f"{path}: table id {spec['id']!r} is registered twice")
        out[spec["id"]] = spec
    return out


def regenerate(text: str, registry: dict[str, dict[str, Any]], results: Path) -> str:
    """``text`` with every marked table replaced by its generated block; every marker must be registered and
    every registered table must have a marker."""
    seen = [m.group("id") for m in _MARK.finditer(text)]
    unknown = sorted(set(seen) - set(registry))
    if unknown:
        raise TableError(f"marked table(s) {', '.join(unknown)} are not registered in results/tables.toml")
    dupes = sorted({i for i in seen if seen.count(i) > 1})
    if dupes:
        raise TableError(f"table(s) {', '.join(dupes)} are marked more than once")
    unplaced = sorted(set(registry) - set(seen))
    if unplaced:
        raise TableError(
            f"registered table(s) {', '.join(unplaced)} have no place in the file; add "
            f"'<!-- table: ID -->' and '<!-- /table -->' lines where each belongs"
        )
    if text.count("<!-- table: ") != len(seen):
        raise TableError(
            "a '<!-- table: ID -->' marker has no matching '<!-- /table -->' (or a malformed id)"
        )
    return _MARK.sub(lambda m: m.group(1) + render(results, registry[m.group("id")]) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the marked tables of the file")
    mode.add_argument(
        "--check", action="store_true", help="exit 1 when the file differs from what --write writes"
    )
    mode.add_argument("--print", metavar="ID", help="print one registered table")
    parser.add_argument(
        "--file", type=Path, default=ROOT / "RESULTS.md", help="the marked file (default RESULTS.md)"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="the results folder")
    parser.add_argument("--registry", type=Path, default=None, help="default: RESULTS/tables.toml")
    args = parser.parse_args(argv)
    registry_path = args.registry or args.results / "tables.toml"
    try:
        registry = load_registry(registry_path)
        if args.print:
            if args.print not in registry:
                raise TableError(
                    f"no table {args.print!r} in {registry_path} (registered: {', '.join(registry)})"
                )
            print(render(args.results, registry[args.print]), end="")
            return 0
        text = args.file.read_text(encoding="utf-8")
        new = regenerate(text, registry, args.results)
    except (TableError, FileNotFoundError) as exc:
        print(f"results_tables: {exc}", file=sys.stderr)
        return 2
    if args.write:
        if new != text:
            args.file.write_text(new, encoding="utf-8")
        print(f"{args.file}: {len(registry)} table(s) {'rewritten' if new != text else 'already up to date'}")
        return 0
    if new != text:
        diff = difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(args.file), "generated")
        sys.stdout.writelines(diff)
        print(
            f"\n{args.file} differs from the tables generated from {args.results}; run "
            "python scripts/results_tables.py --write",
            file=sys.stderr,
        )
        return 1
    print(f"{args.file}: {len(registry)} table(s) match {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
