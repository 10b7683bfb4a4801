"""``exactgn study STUDY``: the appendix studies of the reference paper, each one TOML file and one command.

A *study file* is either

* a **sweep file** (it has ``base``; see :mod:`exactgn.lab.sweep`): a grid or random search, run by
  :func:`exactgn.lab.sweep.run_sweep` into ``OUT/trial-NNN``; or
* a **list of runs** (``[[run]]`` tables), run one after the other into ``OUT/<run name>/``, where a run may
start
  from the weights of an earlier run of the same study (switching optimiser mid-run)::

    name = "switch-optimiser-cpu"
    description = "Adam for 5 epochs, then GN from Adam's weights (and the other way round)"

    [set]                                   # overrides for every run (optional)
    "train.keep_checkpoints" = true

    [[run]]
    name = "adam"                           # the run's folder: OUT/adam
    config = "mnist-minibatch-cpu/adam"     # shipped experiment, or a TOML path relative to this file
    set = { "train.epochs" = 10 }           # this run's own overrides (optional)

    [[run]]
    name = "adam-then-gn"
    config = "mnist-minibatch-cpu/gn"
    init_from = "adam"                      # an earlier run of this study: start from its weights ...
    init_epoch = 5                          # ... at epoch 5 (its checkpoints/epoch_0005.pt); default: its
    final weights set = { "train.epochs" = 5 }

``init_from`` sets the run's ``model.init_from`` to the source's checkpoint (weights, fixed bottlenecks and
readout; a fresh optimiser); the source must finish first, so runs are listed in dependency order. Every run's
configuration is checked when the file is read (keys, values, matching architectures, the epoch checkpoint
being kept), before anything trains.

Running the same study again skips finished runs, resumes interrupted ones and starts missing ones; a run
folder made with a different configuration is an error (choose another ``--out``). When a run diverges or
fails, the runs that start from it are skipped. ``OUT/study.json`` lists the runs; ``OUT/results.csv`` and
``OUT/results.md`` hold the final and best results per run, with ``start_epoch`` (the source epoch a switched
run starts from) so that its curve can be placed after its source's.

Shipped studies live in ``exactgn/lab/configs/studies/`` (``exactgn study --list``), each as a reference-size
file and a CPU-sized ``*-cpu`` twin.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .compare import format_cell, summarise_run
from .config import (
    EXECUTION_KEYS,
    EXPERIMENTS_DIR,
    ConfigError,
    RunConfig,
    find_config,
    find_shipped,
    flatten,
    load_config,
    parse_override,
    read_toml,
    to_dict,
    toml_value,
)
from .rundir import (
    EPOCHS_CSV,
    META_FILE,
    atomic_write_text,
    config_path,
    epoch_checkpoint,
    file_sha256,
    is_run,
    last_checkpoint,
    meta_path,
    read_meta,
    remove_run,
    run_state,
)
from .schema import validate_table
from .specs import StudyFile, StudyRunTable
from .sweep import describe_overrides, load_sweep, make_trials, run_sweep
from .train import train

__all__ = [
    "STUDIES_DIR",
    "StudyRun",
    "StudySpec",
    "find_study",
    "list_studies",
    "study_kind",
    "load_study",
    "run_config",
    "run_study",
]

STUDIES_DIR = Path(__file__).resolve().parent / "configs" / "studies"

# Keys that may differ between a run folder and the study without making it another run (paths, devices,
# speed).
_IGNORED_KEYS = EXECUTION_KEYS


@dataclass
class StudyRun:
    """One run of a study: its folder name, base config, overrides, and the earlier run it starts from."""

    name: str
    config: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    init_epoch: int | None = None
    description: str = ""


@dataclass
class StudySpec:
    """A parsed list-of-runs study file."""

    name: str
    path: Path
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    runs: list[StudyRun] = field(default_factory=list)


# ---------------------------------------------------------------------------- finding and reading
def list_studies() -> list[str]:
    """Names of the shipped studies (``exactgn/lab/configs/studies/<name>.toml``)."""
    return sorted(p.relative_to(STUDIES_DIR).with_suffix("").as_posix() for p in STUDIES_DIR.rglob("*.toml"))


def find_study(name: str | Path) -> Path:
    """A study file: an existing path, else a shipped study name (``.toml`` optional)."""
    return find_shipped(name, STUDIES_DIR, list_studies(), "study", ("study", "studies"))


def study_kind(path: str | Path) -> str:
    """``"sweep"`` (the file has ``base``) or ``"runs"`` (it has ``[[run]]`` tables)."""
    path = find_study(path)
    return _kind(path, read_toml(path))


def _kind(path: Path, data: dict[str, Any]) -> str:
    if "base" in data and "run" not in data:
        return "sweep"
    if "run" in data and "base" not in data:
        return "runs"
    raise ConfigError(
        f"{path}: a study file has either 'base' (a sweep file, see exactgn sweep --help) or [[run]] "
        "tables (a list of runs), not both and not neither"
    )


def _fail(path: Path, where: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {message}" if where else f"{path}: {message}")


def _config_path(path: Path, value: str) -> Path:
    """``config`` of a run: a TOML path relative to the study file (or absolute), else a shipped
    experiment."""
    candidate = Path(value)
    if not candidate.is_absolute() and (path.parent / candidate).is_file():
        return (path.parent / candidate).resolve()
    return find_config(candidate).resolve()


def _run_of(path: Path, spec: StudySpec, table: StudyRunTable, extra: dict[str, Any]) -> StudyRun:
    """One ``[[run]]`` table as a :class:`StudyRun`, checked against the runs before it."""
    where = f"run {len(spec.runs) + 1} ({table.name})"
    earlier = [x.name for x in spec.runs]
    if table.name in earlier:
        raise _fail(path, where, f"the name {table.name!r} is used by an earlier run; names must be unique")
    if table.init_from is not None and table.init_from not in earlier:
        hint = f"earlier runs: {', '.join(earlier)}" if earlier else "it is the first run"
        raise _fail(
            path,
            where,
            f"init_from must name an earlier run of this study ({hint}), got "
            f"{table.init_from!r}; to start from a checkpoint outside the study, set "
            "model.init_from instead",
        )
    try:
        config = _config_path(path, table.config)
    except ConfigError as exc:
        raise _fail(path, where, str(exc)) from exc
    overrides = {**spec.fixed, **table.fixed, **extra}
    if table.init_from is not None and "model.init_from" in overrides:
        raise _fail(
            path, where, "give either init_from (an earlier run) or model.init_from (a path), not both"
        )
    return StudyRun(table.name, config, overrides, table.init_from, table.init_epoch, table.description)


def load_study(path: str | Path, overrides: Sequence[str] | dict[str, Any] = ()) -> StudySpec:
    """Read and check a list-of-runs study file; ``overrides`` (``KEY=VALUE``) apply to every run, last.

    The file's shape is :class:`exactgn.lab.specs.StudyFile`. Every run's configuration is built and validated
    here and dependencies are checked (the source is an earlier run, architectures match, an ``init_epoch``
    checkpoint will be kept), so that mistakes surface before any training.
    """
    path = find_study(path).resolve()
    data = read_toml(path)
    if _kind(path, data) != "runs":
        raise _fail(path, "", "this is a sweep file; run it with exactgn study (or exactgn sweep)")
    try:
        file = validate_table(StudyFile, data)
    except ConfigError as exc:
        raise _fail(path, "", str(exc)) from None
    spec = StudySpec(file.name, path, file.description, dict(file.fixed))
    extra = dict(overrides) if isinstance(overrides, dict) else dict(parse_override(o) for o in overrides)
    for table in file.run:
        spec.runs.append(_run_of(path, spec, table, extra))
    configs = {}
    for i, run in enumerate(spec.runs):
        try:
            configs[run.name] = run_config(spec, run, check_only=True)
        except ConfigError as exc:
            raise _fail(path, f"run {i + 1} ({run.name})", str(exc)) from exc
    for i, run in enumerate(spec.runs):
        if run.init_from is not None:
            _check_dependency(
                path, f"run {i + 1} ({run.name})", run, configs[run.name], configs[run.init_from]
            )
    return spec


def _check_dependency(path: Path, where: str, run: StudyRun, cfg: RunConfig, source: RunConfig) -> None:
    """The source run will produce weights this run can load."""
    if cfg.data.dataset != source.data.dataset:
        raise _fail(
            path,
            where,
            f"data.dataset is {cfg.data.dataset!r} but the source run {run.init_from!r} trains on "
            f"{source.data.dataset!r}; weights carry over only between runs of the same input size",
        )
    a, b = cfg.model, source.model
    if a.kind == "mlp" or b.kind == "mlp":
        keys: tuple[str, ...] = ("kind", "widths", "activation", "bias")
    else:
        keys = ("kind", "blocks", "bottleneck", "bias") + (("hidden",) if a.bottleneck else ())
    for key in keys:
        if getattr(a, key) != getattr(b, key):
            raise _fail(
                path,
                where,
                f"model.{key} is {getattr(a, key)!r} but the source run {run.init_from!r} has "
                f"{getattr(b, key)!r}; a run that starts from another's weights needs its architecture",
            )
    if run.init_epoch is not None:
        t = source.train
        if run.init_epoch > t.epochs:
            raise _fail(
                path,
                where,
                f"init_epoch = {run.init_epoch} is beyond the {t.epochs} epochs of the source run "
                f"{run.init_from!r}",
            )
        saved = run.init_epoch in (0, t.epochs) or (
            t.checkpoint_every > 0 and run.init_epoch % t.checkpoint_every == 0
        )
        if run.init_epoch != 0 and not (t.keep_checkpoints and saved):
            raise _fail(
                path,
                where,
                f"the source run {run.init_from!r} will not keep checkpoints/epoch_{run.init_epoch:04d}.pt: "
                f"give it train.keep_checkpoints = true and a train.checkpoint_every that divides "
                f"{run.init_epoch} (now keep_checkpoints = {toml_value(t.keep_checkpoints)}, "
                f"checkpoint_every = {t.checkpoint_every})",
            )


def _source_checkpoint(out: Path, run: StudyRun) -> Path:
    source = out / str(run.init_from)
    return last_checkpoint(source) if run.init_epoch is None else epoch_checkpoint(source, run.init_epoch)


def run_config(
    spec: StudySpec, run: StudyRun, out: Path | None = None, *, check_only: bool = False
) -> RunConfig:
    """The resolved configuration of ``run``: its config file with the study's and the run's overrides, and,
    for a run with ``init_from``, ``model.init_from`` set to the source's checkpoint in ``out`` (which must
    exist unless ``check_only``, where a placeholder stands in)."""
    overrides = dict(run.overrides)
    if run.init_from is not None and not check_only:
        if out is None:
            raise ValueError("run_config: the study folder is needed for a run with init_from")
        overrides["model.init_from"] = str(_source_checkpoint(out.resolve(), run))
    return load_config(run.config, overrides)


# ---------------------------------------------------------------------------- running
def _differences(run_dir: Path, cfg: RunConfig, run: StudyRun) -> list[str]:
    """Keys whose value in ``run_dir/config.toml`` differs from ``cfg`` (ignoring paths, devices and speed),
    and, for a run started from an earlier run, whether that source checkpoint has changed since (its
    SHA-256)."""
    saved = flatten(to_dict(load_config(config_path(run_dir))))
    now = flatten(to_dict(cfg))
    ignored = _IGNORED_KEYS + (
        ("model.init_from",) if run.init_from is not None else ()
    )  # the study folder may move
    diffs = [
        f"{k} = {toml_value(saved.get(k))} there, {toml_value(now[k])} in the study"
        for k in now
        if k not in ignored and saved.get(k) != now[k]
    ]
    if run.init_from is not None:
        recorded = (read_meta(run_dir).get("init_from") or {}).get("sha256")
        source = Path(cfg.model.init_from)
        if recorded and source.is_file() and file_sha256(source) != recorded:
            diffs.append(
                f"it started from another version of {run.init_from}'s {source.name} (SHA-256 differs; "
                f"{run.init_from} was retrained since)"
            )
    return diffs


RESULT_FIELDS = (
    "run",
    "init_from",
    "start_epoch",
    "optimiser",
    "status",
    "epochs",
    "final_train_loss",
    "final_train_accuracy",
    "final_test_loss",
    "final_test_accuracy",
    "best_test_accuracy",
    "best_test_accuracy_epoch",
    "final_mean_loss_change_pct",
    "wall_time_s",
    "run_dir",
)


def _result_row(spec: StudySpec, run: StudyRun, run_dir: Path, status: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"run": run.name, "init_from": run.init_from or "", "run_dir": str(run_dir)}
    if run.init_from is not None:
        if run.init_epoch is not None:
            row["start_epoch"] = run.init_epoch
        else:
            source = run_dir.parent / run.init_from
            row["start_epoch"] = read_meta(source).get("epochs_done") if meta_path(source).is_file() else None
    if is_run(run_dir, (META_FILE, EPOCHS_CSV)):
        row.update(summarise_run(run_dir))
    if status is not None:
        row["status"] = status
    return row


def _write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if r.get(k) is None else r.get(k)) for k in RESULT_FIELDS} for r in rows])
    atomic_write_text(out / "results.csv", buf.getvalue())
    lines = [
        "| run | from (epoch) | optimiser | status | epochs | final train loss | final test loss | final "
        "test acc % "
        "| best test acc % (epoch) | loss change % | time s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        start = f"{r['init_from']} ({r.get('start_epoch')})" if r.get("init_from") else "-"
        best = format_cell(r.get("best_test_accuracy"), "acc")
        if r.get("best_test_accuracy_epoch") is not None:
            best += f" ({r['best_test_accuracy_epoch']})"
        change = r.get("final_mean_loss_change_pct")
        lines.append(
            f"| {r['run']} | {start} | {r.get('optimiser') or '-'} | {r.get('status') or '-'} "
            f"| {r.get('epochs') if r.get('epochs') is not None else '-'} "
            f"| {format_cell(r.get('final_train_loss'), 'loss')} | "
            f"{format_cell(r.get('final_test_loss'), 'loss')} "
            f"| {format_cell(r.get('final_test_accuracy'), 'acc')} | {best} "
            f"| {'-' if change is None else f'{change:.2f}'} | {format_cell(r.get('wall_time_s'), 'time')} |"
        )
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def _run_list(spec: StudySpec, out: Path, progress: bool) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    listing = {
        "name": spec.name,
        "study_file": str(spec.path),
        "description": spec.description,
        "runs": [
            {
                "name": r.name,
                "config": str(r.config),
                "overrides": r.overrides,
                "init_from": r.init_from,
                "init_epoch": r.init_epoch,
            }
            for r in spec.runs
        ],
    }
    atomic_write_text(out / "study.json", json.dumps(listing, indent=2) + "\n")
    rows: list[dict[str, Any]] = []
    outcome: dict[str, str] = {}
    for i, run in enumerate(spec.runs, 1):
        run_dir = out / run.name
        head = f"[{i}/{len(spec.runs)}] {run.name}"
        if run.init_from is not None and outcome.get(run.init_from) != "finished":
            status = f"skipped ({run.init_from} is {outcome.get(run.init_from)})"
            _say(progress, f"{head}: {status}")
            outcome[run.name] = "skipped"
            rows.append(_result_row(spec, run, run_dir, status))
            continue
        cfg = run_config(spec, run, out)
        state = run_state(run_dir)
        if state in ("finished", "stopped", "resume"):
            diffs = _differences(run_dir, cfg, run)
            if diffs:
                raise ValueError(
                    f"{run_dir} does not match what the study asks for now "
                    f"({'; '.join(diffs[:3])}{' ...' if len(diffs) > 3 else ''}); choose another --out "
                    f"(or delete {run_dir} to rerun that run)"
                )
        if state == "restart":  # a folder without checkpoint or config: nothing worth keeping
            remove_run(run_dir)
            state = "new"
        source = f" from {run.init_from}" + (f" epoch {run.init_epoch}" if run.init_epoch is not None else "")
        if state == "finished":
            _say(progress, f"{head}: finished earlier, kept")
        elif state == "stopped":
            _say(progress, f"{head}: {read_meta(run_dir).get('status')} earlier, kept")
        elif state == "resume":
            _say(progress, f"{head}: resuming{source if run.init_from else ''}")
            train(None, resume=run_dir, progress=progress)
        else:
            _say(
                progress,
                f"{head}: {cfg.optim.name}, {cfg.train.epochs} epochs{source if run.init_from else ''}",
            )
            train(cfg, run_dir, progress=progress)
        outcome[run.name] = read_meta(run_dir).get("status") or "unknown"
        rows.append(_result_row(spec, run, run_dir))
    _write_results(out, rows)
    return rows


def run_study(
    study: str | Path,
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    backend: str | None = None,
    progress: bool = True,
) -> Path:
    """Run a study file (shipped name or path) into ``out`` (default ``runs/studies/<name>``); returns that
    folder.

    A sweep file goes to :func:`exactgn.lab.sweep.run_sweep` (``backend`` applies; ``overrides`` are refused:
    put them in the sweep's ``[set]``); a list of runs is run in order (``overrides`` apply to every run).
    """
    path = find_study(study).resolve()
    if study_kind(path) == "sweep":
        if overrides:
            raise ValueError(
                f"{path} is a sweep file: --set does not apply to it; put overrides in its [set] table "
                "(only --data-root and --device are passed on, through the environment)"
            )
        name = load_sweep(path).name
        return run_sweep(
            path, Path(out) if out else Path("runs") / "studies" / name, backend=backend, progress=progress
        )
    if backend is not None:
        raise ValueError(
            f"{path} is a list of runs, which run one after the other: --backend applies to sweep files only"
        )
    spec = load_study(path, overrides)
    folder = Path(out) if out else Path("runs") / "studies" / spec.name
    _run_list(spec, folder, progress)
    return folder


def _config_name(path: Path) -> str:
    """A shipped experiment's name (``setting/optimiser``), else the path."""
    try:
        return path.resolve().relative_to(EXPERIMENTS_DIR).with_suffix("").as_posix()
    except ValueError:
        return str(path)


def plan(study: str | Path, overrides: Sequence[str] = ()) -> str:
    """What :func:`run_study` would run, one line per run or trial (``--dry-run``)."""
    path = find_study(study).resolve()
    if study_kind(path) == "sweep":
        sweep = load_sweep(path)
        lines = [
            f"sweep {sweep.name} ({len(make_trials(sweep))} trials of {sweep.base}): {sweep.description}"
        ]
        lines += [f"  {t.name}: {describe_overrides(t.overrides)}" for t in make_trials(sweep)]
        return "\n".join(lines) + "\n"
    spec = load_study(path, overrides)
    lines = [f"study {spec.name} ({len(spec.runs)} runs): {spec.description}"]
    for run in spec.runs:
        cfg = run_config(spec, run, check_only=True)
        where = ""
        if run.init_from:
            where = f", starting from {run.init_from}'s " + (
                "final weights" if run.init_epoch is None else f"epoch {run.init_epoch}"
            )
        sets = ", ".join(f"{k}={toml_value(v)}" for k, v in run.overrides.items())
        lines.append(
            f"  {run.name}: {cfg.optim.name} lr {cfg.optim.lr:g}, {cfg.train.epochs} epochs{where} "
            f"[{_config_name(run.config)}{'; ' + sets if sets else ''}]"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- CLI
def shipped_lines() -> list[str]:
    lines = []
    for name in list_studies():
        path = STUDIES_DIR / f"{name}.toml"
        try:
            data = read_toml(path)
            desc, kind = str(data.get("description", "")), _kind(path, data)
        except ConfigError:
            desc, kind = "(unreadable)", "?"
        lines.append(f"  {name:<28} [{kind}] {desc}")
    return lines
