"""The run-folder contract of ``docs/run-folder.md`` in code: the one owner of a run folder's layout.

Paths (:func:`config_path`, :func:`meta_path`, :func:`last_checkpoint`, :func:`epoch_checkpoint`, ...), the
CSV + JSON-lines logs (:class:`RunLog` writes, :func:`read_rows` / :func:`read_jsonl` read), ``meta.json``
(:func:`write_meta`, :func:`read_meta`, :func:`meta_value`) and the provenance every writer records
(:func:`provenance`, one set of key names). Every row is flushed as it is written, so a crash loses at most
the row being written; readers skip a torn last line. ``meta.json`` is replaced atomically.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from .cores import pid_alive

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "STEPS_CSV",
    "EPOCHS_CSV",
    "DIAGNOSTICS_FILE",
    "CHECKPOINTS",
    "config_path",
    "meta_path",
    "log_path",
    "diagnostics_path",
    "checkpoint_dir",
    "last_checkpoint",
    "epoch_checkpoint",
    "epoch_checkpoints",
    "run_of_checkpoint",
    "is_run",
    "provenance",
    "utc_now",
    "git_revision",
    "device_name",
    "meta_value",
    "file_sha256",
    "run_state",
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
    "LOCK_FILE",
    "RunInUse",
    "RunLock",
    "create_run_dir",
    "clean_temporaries",
    "lock_holder",
    "run_status",
    "remove_run",
    "test_kill_point",
]

STEP_FIELDS = (
    "epoch",
    "step",
    "global_step",
    "batch_size",
    "lr",
    "loss",
    "accuracy",
    "loss_after",
    "loss_change_pct",
    "step_time_s",
)
EPOCH_FIELDS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "epoch_time_s",
    "wall_time_s",
    "mean_loss_change_pct",
    "eval_time_s",
    "global_step",
    "val_loss",
    "val_accuracy",
)


CONFIG_FILE = "config.toml"
META_FILE = "meta.json"
STEPS_CSV = "steps.csv"
EPOCHS_CSV = "epochs.csv"
DIAGNOSTICS_FILE = "diagnostics.jsonl"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"
_LAST = "last.pt"
_EPOCH_RE = re.compile(r"epoch_(\d+)\.pt")


# ---------------------------------------------------------------------------- paths
def config_path(run_dir: str | os.PathLike) -> Path:
    """``RUN/config.toml``: the resolved configuration."""
    return Path(run_dir) / CONFIG_FILE


def meta_path(run_dir: str | os.PathLike) -> Path:
    """``RUN/meta.json``: status and provenance."""
    return Path(run_dir) / META_FILE


def log_path(run_dir: str | os.PathLike, table: str, suffix: str = "csv") -> Path:
    """``RUN/<table>.<suffix>`` for ``table`` in ``steps``, ``epochs`` and ``suffix`` in ``csv``,
    ``jsonl``."""
    return Path(run_dir) / f"{table}.{suffix}"


def diagnostics_path(run_dir: str | os.PathLike) -> Path:
    """``RUN/diagnostics.jsonl``."""
    return Path(run_dir) / DIAGNOSTICS_FILE


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """``RUN/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS


def last_checkpoint(run_dir: str | os.PathLike) -> Path:
    """``RUN/checkpoints/last.pt``: the resumable checkpoint."""
    return checkpoint_dir(run_dir) / _LAST


def epoch_checkpoint(run_dir: str | os.PathLike, epoch: int) -> Path:
    """``RUN/checkpoints/epoch_NNNN.pt``: the weights after ``epoch`` epochs."""
    return checkpoint_dir(run_dir) / f"epoch_{epoch:04d}.pt"


def epoch_checkpoints(run_dir: str | os.PathLike) -> dict[int, Path]:
    """Epoch → path of every ``checkpoints/epoch_NNNN.pt`` present, sorted by epoch (empty when none)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return {}
    found = {int(m.group(1)): p for p in folder.glob("epoch_*.pt") if (m := _EPOCH_RE.fullmatch(p.name))}
    return dict(sorted(found.items()))


def run_of_checkpoint(file: str | os.PathLike) -> Path:
    """The run folder a checkpoint file belongs to (``RUN`` of ``RUN/checkpoints/x.pt``, else its folder)."""
    file = Path(file)
    return file.parent.parent if file.parent.name == CHECKPOINTS else file.parent


def is_run(path: str | os.PathLike, required: Iterable[str] = (CONFIG_FILE, META_FILE, EPOCHS_CSV)) -> bool:
    """Whether ``path`` is a run folder holding every file of ``required``."""
    return all((Path(path) / name).is_file() for name in required)


# ---------------------------------------------------------------------------- provenance
# Older run folders spelled some keys differently; readers accept these aliases (writers use the first name).
_META_ALIASES: dict[str, tuple[str, ...]] = {
    "git_revision": ("git_revision", "git_rev", "git", "revision", "git_commit"),
    "exactgn_version": ("exactgn_version", "exactgn", "version"),
    "torch_version": ("torch_version", "torch"),
    "python_version": ("python_version", "python"),
    "start_time": ("start_time", "started", "start"),
    "end_time": ("end_time", "ended", "end"),
}


def meta_value(meta: dict[str, Any], key: str) -> Any:
    """``meta[key]``, or its value under an older alias; ``None`` when absent or empty."""
    for name in _META_ALIASES.get(key, (key,)):
        if meta.get(name) not in (None, ""):
            return meta[name]
    return None


def git_revision() -> str | None:
    """The git commit of the exactgn checkout, or ``None`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: Any = "cpu") -> str:
    """The GPU's name, or the CPU model (``/proc/cpuinfo``, else ``platform``)."""
    import torch  # noqa: PLC0415 - rundir's readers work without torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def utc_now() -> str:
    """The current time, ISO 8601 in UTC to the second (``start_time``, ``end_time``)."""
    import datetime as dt  # noqa: PLC0415

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def provenance(device: Any = "cpu") -> dict[str, Any]:
    """Where and with what a result was produced, under the one set of key names every writer uses:
    ``exactgn_version, git_revision, torch_version, python_version, cuda_version, platform, machine,
    hostname, device, device_name, threads``."""
    import torch  # noqa: PLC0415

    from .. import __version__  # noqa: PLC0415

    return {
        "exactgn_version": __version__,
        "git_revision": git_revision(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cuda_version": torch.version.cuda,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------- atomic files
_KILL_COUNTS: dict[str, int] = {}


def test_kill_point(point: str, name: str) -> None:
    """Test hook: SIGKILL this process at ``point`` (``before-rename`` or ``after-write``) of the ``n``-th
    write of file ``name`` when ``EXACTGN_TEST_KILL_AT`` is ``point:name[:n]``, so that tests can kill a real
    run between two writes."""
    wanted = os.environ.get("EXACTGN_TEST_KILL_AT")
    if not wanted:
        return
    key = f"{point}:{name}"
    _KILL_COUNTS[key] = _KILL_COUNTS.get(key, 0) + 1
    target, _, nth = wanted.rpartition(":") if wanted.count(":") == 2 else (wanted, "", "1")
    if target == key and str(_KILL_COUNTS[key]) == nth:
        import signal  # noqa: PLC0415

        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        test_kill_point("before-rename", path.name)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OSError(exc.errno, f"no space left on the device while writing {path}") from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    test_kill_point("after-write", path.name)


_TMP_RE = re.compile(r"\..+\.tmp-(\d+)")


def clean_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (``.NAME.tmp-PID``) that a killed writer left in a run folder and its
    ``checkpoints/``; returns what was removed. Call it only while holding the run's lock."""
    removed = []
    for folder in (Path(run_dir), checkpoint_dir(run_dir)):
        if folder.is_dir():
            for path in folder.iterdir():
                if _TMP_RE.fullmatch(path.name) and path.is_file():
                    path.unlink()
                    removed.append(path)
    return removed


# ---------------------------------------------------------------------------- the run lock
class RunInUse(FileExistsError):
    """Another live process holds the run folder's lock."""


def lock_holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The record in ``RUN/.lock`` (``pid``, ``hostname``, ``start_time``, ``command``) plus ``alive``
    (``True``, ``False``, or ``None`` when it was taken on another host); ``None`` when there is no lock."""
    path = Path(run_dir) / LOCK_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    pid = record.get("pid")
    if record.get("hostname") != socket.gethostname():
        record["alive"] = None if isinstance(pid, int) else False
    else:
        record["alive"] = isinstance(pid, int) and pid_alive(pid)
    return record


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"process {holder.get('pid')} on {holder.get('hostname')} "
        f"(started {holder.get('start_time')}: {holder.get('command')})"
    )


def _identity(holder: dict[str, Any]) -> tuple:
    return tuple(holder.get(key) for key in ("pid", "hostname", "start_time", "command"))


def _clear_dead_breaker(breaker: Path) -> None:
    """Remove ``RUN/.lock.break`` if the process that made it died while removing a stale lock."""
    try:
        pid, host = breaker.read_text(encoding="utf-8").split()
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        pid, host = "", socket.gethostname()  # made but not yet written: judged on its age below
    if host != socket.gethostname():
        return
    if pid.isdigit() and pid_alive(int(pid)):
        return
    with contextlib.suppress(OSError):
        if pid or time.time() - breaker.stat().st_mtime > 5.0:
            breaker.unlink()


class RunLock:
    """An exclusive lock on a run folder, held for the life of a run: ``RUN/.lock``, created with
    ``O_EXCL``, holds the owner's PID. A lock whose process is gone (same host) is stale: it is reported
    on stderr and replaced. Use as a context manager or call :meth:`acquire` / :meth:`release`."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def _create(self) -> bool:
        """Create the lock with its record in one step: the record is written to a private file that is then
        hard-linked to ``.lock`` (which fails if the lock exists), so no other process can ever read a lock
        that is still empty and take it for a stale one."""
        record = {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "start_time": utc_now(),
            "command": " ".join(sys.argv)[:300],
        }
        private = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.{id(self)}")
        private.write_text(json.dumps(record) + "\n", encoding="utf-8")
        try:
            os.link(private, self.path)
        except FileExistsError:
            return False
        finally:
            private.unlink()
        return True

    def acquire(self) -> "RunLock":
        """Take the lock, or raise :class:`RunInUse` naming the process that holds it."""
        for attempt in range(20):
            if attempt:
                time.sleep(0.01 * attempt)  # another process may be replacing a stale lock meanwhile
            if self._create():
                self.held = True
                return self
            holder = lock_holder(self.path.parent)
            if holder is None:
                continue  # released meanwhile
            if holder["alive"] is not False:
                raise RunInUse(
                    f"{self.path.parent} is in use by {_describe(holder)}; wait for it to end or stop it"
                    + (
                        ""
                        if holder["alive"]
                        else f" (it runs on another host: if it is gone, delete {self.path})"
                    )
                )
            self.remove_stale(holder)
        raise RunInUse(f"{self.path.parent}: could not take the lock {self.path}; try again")

    def remove_stale(self, holder: dict[str, Any]) -> bool:
        """Remove the lock if it still holds the record ``holder`` of a dead process (``False``: it does not).

        Two processes can find the same stale lock; the first replaces it with its own. The second must then
        not remove the new, live lock, so removal happens under ``RUN/.lock.break`` (created exclusively: one
        remover at a time) and only after re-reading the lock and finding the same record.
        """
        breaker = self.path.with_name(LOCK_FILE + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _clear_dead_breaker(breaker)
            return False
        try:
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            os.close(fd)
            current = lock_holder(self.path.parent)
            same = current is not None and _identity(current) == _identity(holder)
            if not same or current["alive"] is not False:
                return False
            print(
                f"exactgn: {self.path.parent}: removing a stale lock of {_describe(holder)}, "
                "which is no longer running",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                breaker.unlink()

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def run_status(run_dir: str | os.PathLike, meta: dict[str, Any]) -> str:
    """``meta.json``'s status, except that a ``running`` run whose process is gone (no live lock) reads
    ``running (process gone)``: it was killed, and ``exactgn train --resume`` continues it."""
    status = str(meta.get("status") or "unknown")
    if status == "running":
        holder = lock_holder(run_dir)
        if holder is None or holder["alive"] is False:
            return "running (process gone)"
    return status


def remove_run(run_dir: str | os.PathLike) -> None:
    """Delete a run folder that holds nothing worth keeping (a study or sweep restarting it), but never one
    that a live process is training into (:class:`RunInUse`)."""
    with RunLock(run_dir):
        for path in Path(run_dir).iterdir():
            if path.name != LOCK_FILE:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    Path(run_dir).rmdir()


def create_run_dir(run_dir: str | os.PathLike) -> RunLock:
    """Create a new run folder exclusively and lock it: its parents are made, the folder itself must be new
    or empty (a stale lock aside). Raises :class:`FileExistsError` (with the way on) when it holds anything,
    :class:`RunInUse` when a live run holds it."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(run_dir)
    except FileExistsError:
        if not run_dir.is_dir():
            raise FileExistsError(f"{run_dir} exists and is not a folder; choose another --out") from None
    lock = RunLock(run_dir).acquire()
    if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        lock.release()
        hint = " (it holds a run: continue it with --resume)" if meta_path(run_dir).exists() else ""
        raise FileExistsError(f"{run_dir} already exists and is not empty{hint}; choose another --out")
    return lock


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` (JSON has no NaN; the CSV keeps nan/inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; the CSV keeps them as nan/inf
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 4 MiB pieces (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_meta(run_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Replace ``meta.json`` atomically (non-finite numbers become ``null``)."""
    atomic_write_text(meta_path(run_dir), json.dumps(json_safe(meta), indent=2, sort_keys=False) + "\n")


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a run; a clear error when it is missing or unreadable."""
    path = meta_path(run_dir)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: no such file; {run_dir} is not an exactgn run folder") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return meta


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
    if last_checkpoint(run_dir).is_file() and config_path(run_dir).is_file():
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
    return (
        int(value)
        if value.is_integer() and "." not in text and "e" not in text.lower() and "n" not in text.lower()
        else value
    )


def _torn(path: Path, number: int, last: int, what: str) -> None:
    """A malformed last line is a write cut short by a crash: skipped. Anywhere else it is an error."""
    if number != last:
        raise ValueError(
            f"{path}, line {number}: {what}; the file is corrupt (only a torn last line is skipped)"
        )


def read_rows(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Rows of a run's CSV log as dicts of numbers (empty cells → ``None``, text stays text).

    A missing file gives no rows; a torn last line is skipped; the ``required`` columns must be present.
    """
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        lines = list(csv.reader(fh))
    if not lines:
        return []
    header, body = lines[0], lines[1:]
    lacking = [c for c in required if c not in header]
    if lacking:
        raise ValueError(f"{path} lacks the columns {', '.join(map(repr, lacking))} (see docs/run-folder.md)")
    rows = []
    for number, cells in enumerate(body, 2):
        if len(cells) != len(header):
            _torn(path, number, len(lines), f"{len(cells)} cells under {len(header)} columns")
            continue
        rows.append({k: _number(v) for k, v in zip(header, cells)})
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (``null`` stays ``None``); a torn last line is skipped, blank lines
    too."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            _torn(path, number, len(lines), f"not valid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object")
        records.append(record)
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
    # noqa: E731
    keep_step = lambda r: isinstance(r.get("global_step"), int) and r["global_step"] <= global_step
    keep_epoch = lambda r: isinstance(r.get("epoch"), int) and r["epoch"] <= epochs_done  # noqa: E731
    for name, fields, keep in (("steps", STEP_FIELDS, keep_step), ("epochs", EPOCH_FIELDS, keep_epoch)):
        csv_path = log_path(run_dir, name)
        if csv_path.exists():
            atomic_write_text(csv_path, _csv_text(fields, [r for r in read_rows(csv_path) if keep(r)]))
        jsonl_path = log_path(run_dir, name, "jsonl")
        if jsonl_path.exists():
            kept = [r for r in read_jsonl(jsonl_path) if keep(r)]
            atomic_write_text(jsonl_path, "".join(json.dumps(r) + "\n" for r in kept))
    diag = diagnostics_path(run_dir)
    if diag.exists():
        kept = [r for r in read_jsonl(diag) if keep_epoch(r)]
        atomic_write_text(diag, "".join(json.dumps(r) + "\n" for r in kept))


# ---------------------------------------------------------------------------- writing logs
class _Table:
    """One CSV file plus its JSON-lines twin, appended row by row."""

    def __init__(self, run_dir: Path, name: str, fields: tuple[str, ...]) -> None:
        self.fields = fields
        csv_path = log_path(run_dir, name)
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        self.csv = open(csv_path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.csv, lineterminator="\n")
        if new:
            self.writer.writerow(fields)
            self.csv.flush()
        self.jsonl = open(log_path(run_dir, name, "jsonl"), "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow([_format_cell(row.get(f)) for f in self.fields])
        self.csv.flush()
        self.jsonl.write(json.dumps(json_safe({f: row.get(f) for f in self.fields})) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.csv.close()
        self.jsonl.close()


class RunLog:
    """The logs of one run folder: ``steps``, ``epochs``, ``diagnostics.jsonl`` and (when tensorboard is
    installed) TensorBoard event files. ``purge_step``: TensorBoard drops events from that step on
    (resume)."""

    def __init__(
        self, run_dir: str | os.PathLike, *, tensorboard: bool = True, purge_step: int | None = None
    ) -> None:
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
            self.diagnostics = open(diagnostics_path(self.run_dir), "a", encoding="utf-8")
        self.diagnostics.write(json.dumps(json_safe(record)) + "\n")
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
