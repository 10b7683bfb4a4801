"""Writing and reading a run folder (``docs/run-folder.md``): CSV + JSON-lines logs, TensorBoard, ``meta.json``.

Every row is flushed as it is written, so a crash loses at most the row being written; readers skip a torn
last line. ``meta.json`` is replaced atomically.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "STEP_FIELDS",
    "EPOCH_FIELDS",
    "RunLog",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_meta",
    "read_meta",
    "read_rows",
    "read_jsonl",
    "truncate_logs",
]

STEP_FIELDS = (
    "epoch", "step", "global_step", "batch_size", "lr", "loss", "accuracy", "loss_after", "loss_change_pct",
    "step_time_s",
)
EPOCH_FIELDS = (
    "epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s", "wall_time_s",
    "mean_loss_change_pct", "eval_time_s", "global_step", "val_loss", "val_accuracy",
)


# ---------------------------------------------------------------------------- atomic files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; the CSV keeps them as nan/inf
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 4 MiB pieces (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_meta(run_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / "meta.json", json.dumps(_json_safe(meta), indent=2, sort_keys=False) + "\n")


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a run; a clear error when it is missing or unreadable."""
    path = Path(run_dir) / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: no such file; {run_dir} is not an exactgn run folder") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt JSON ({exc})") from exc


def run_state(run_dir: str | os.PathLike) -> str:
    """What a study or sweep should do with a run folder it is about to (re)run.

    ``"new"`` (no folder, or an empty one), ``"finished"``, ``"stopped"`` (the run diverged: keep it as it is,
    resuming would only repeat the divergence), ``"resume"`` (a checkpoint and config to continue from) or
    ``"restart"`` (a folder with nothing to continue from, e.g. interrupted before its first checkpoint).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new"
    try:
        status = read_meta(run_dir).get("status")
    except (FileNotFoundError, ValueError):
        status = None
    if status == "finished":
        return "finished"
    if status == "diverged":
        return "stopped"
    if (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "config.toml").is_file():
        return "resume"
    return "restart"


# ---------------------------------------------------------------------------- reading logs
def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() and "n" not in text.lower() else value


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a run's CSV log as dicts of numbers (empty cells → ``None``); a torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        for cells in reader:
            if len(cells) != len(header):
                continue
            rows.append({k: _number(v) for k, v in zip(header, cells)})
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _csv_text(fields: Iterable[str], rows: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    fields = list(fields)
    writer.writerow(fields)
    for row in rows:
        writer.writerow([_format_cell(row.get(f)) for f in fields])
    return buf.getvalue()


def truncate_logs(run_dir: str | os.PathLike, global_step: int, epochs_done: int) -> None:
    """Drop log rows written after a checkpoint (steps past ``global_step``, epochs and diagnostics past
    ``epochs_done``), so that a resumed run's logs read as if it had never stopped."""
    run_dir = Path(run_dir)
    keep_step = lambda r: isinstance(r.get("global_step"), int) and r["global_step"] <= global_step  # noqa: E731
    keep_epoch = lambda r: isinstance(r.get("epoch"), int) and r["epoch"] <= epochs_done  # noqa: E731
    for name, fields, keep in (("steps", STEP_FIELDS, keep_step), ("epochs", EPOCH_FIELDS, keep_epoch)):
        csv_path = run_dir / f"{name}.csv"
        if csv_path.exists():
            atomic_write_text(csv_path, _csv_text(fields, [r for r in read_rows(csv_path) if keep(r)]))
        jsonl_path = run_dir / f"{name}.jsonl"
        if jsonl_path.exists():
            kept = [r for r in read_jsonl(jsonl_path) if keep(r)]
            atomic_write_text(jsonl_path, "".join(json.dumps(r) + "\n" for r in kept))
    diag = run_dir / "diagnostics.jsonl"
    if diag.exists():
        kept = [r for r in read_jsonl(diag) if keep_epoch(r)]
        atomic_write_text(diag, "".join(json.dumps(r) + "\n" for r in kept))


# ---------------------------------------------------------------------------- writing logs
class _Table:
    """One CSV file plus its JSON-lines twin, appended row by row."""

    def __init__(self, run_dir: Path, name: str, fields: tuple[str, ...]) -> None:
        self.fields = fields
        csv_path = run_dir / f"{name}.csv"
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        self.csv = open(csv_path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.csv, lineterminator="\n")
        if new:
            self.writer.writerow(fields)
            self.csv.flush()
        self.jsonl = open(run_dir / f"{name}.jsonl", "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow([_format_cell(row.get(f)) for f in self.fields])
        self.csv.flush()
        self.jsonl.write(json.dumps(_json_safe({f: row.get(f) for f in self.fields})) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.csv.close()
        self.jsonl.close()


class RunLog:
    """The logs of one run folder: ``steps``, ``epochs``, ``diagnostics.jsonl`` and (when tensorboard is
    installed) TensorBoard event files. ``purge_step``: TensorBoard drops events from that step on (resume)."""

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.steps = _Table(self.run_dir, "steps", STEP_FIELDS)
        self.epochs = _Table(self.run_dir, "epochs", EPOCH_FIELDS)
        self.diagnostics: Any = None  # opened on the first record, so runs without diagnostics have no file
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                pass
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def step(self, row: dict[str, Any]) -> None:
        self.steps.write(row)
        if self.tb is not None:
            for key in ("loss", "accuracy", "loss_after", "loss_change_pct", "lr", "step_time_s"):
                if row.get(key) is not None:
                    self.tb.add_scalar(f"step/{key}", row[key], row["global_step"])

    def epoch(self, row: dict[str, Any]) -> None:
        self.epochs.write(row)
        if self.tb is not None:
            for key in EPOCH_FIELDS[1:]:
                if key != "global_step" and row.get(key) is not None:
                    self.tb.add_scalar(f"epoch/{key}", row[key], row["epoch"])
            self.tb.flush()

    def diagnostic(self, record: dict[str, Any]) -> None:
        if self.diagnostics is None:
            self.diagnostics = open(self.run_dir / "diagnostics.jsonl", "a", encoding="utf-8")
        self.diagnostics.write(json.dumps(_json_safe(record)) + "\n")
        self.diagnostics.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"diagnostics/{key}", value, record["epoch"])

    def close(self) -> None:
        self.steps.close()
        self.epochs.close()
        if self.diagnostics is not None:
            self.diagnostics.close()
        if self.tb is not None:
            self.tb.close()
