"""Sharing the CPU cores among exactgn runs started side by side on one host.

Two runs that each use every core slow each other down far more than their share (thread contention: a
2-thread step was measured up to 50× slower beside another job). Sweeps and studies set each run's threads
themselves; runs started by hand do not know of each other. So every training run registers itself, while it
lives, in a per-user folder of live runs (``$EXACTGN_LIVE_RUNS``, default ``<tmp>/exactgn-live-runs-<uid>``),
and a run with ``train.threads = 0`` (auto) takes ``cores // (live runs + 1)`` threads when others are live.

Runs that started earlier keep their thread count (changing it mid-run would change the run's arithmetic), so
the newest run yields; the log says so, and an explicit ``train.threads`` splits the cores evenly.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["available_cores", "live_runs", "LiveRun", "auto_threads", "registry_dir", "pid_alive"]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def registry_dir() -> Path:
    """The folder of live-run records: ``$EXACTGN_LIVE_RUNS``, else one per user in the temporary folder."""
    env = os.environ.get("EXACTGN_LIVE_RUNS")
    if env:
        return Path(env)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"exactgn-live-runs-{uid}"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``), so that a reused PID is not taken for a run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (also when another user owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _is_live(record: dict[str, Any]) -> bool:
    pid = record.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    started = record.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def live_runs() -> list[dict[str, Any]]:
    """The records of the other exactgn runs live on this host (``pid``, ``threads``, ``run_dir``); records
    of processes that are gone are removed."""
    folder = registry_dir()
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being written, or not ours
        if not isinstance(record, dict) or record.get("pid") == os.getpid():
            continue
        if _is_live(record):
            out.append(record)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return out


def auto_threads(cores: int, others: list[dict[str, Any]]) -> int:
    """Threads for a new run with ``train.threads = 0``: an equal share of ``cores`` with the live runs."""
    return max(1, cores // (len(others) + 1))


@dataclass
class LiveRun:
    """This process's record among the live runs; :meth:`release` removes it (at the end of the run)."""

    path: Path | None

    @classmethod
    def register(cls, threads: int, run_dir: str | os.PathLike) -> "LiveRun":
        """Record this process (``threads`` torch threads, training into ``run_dir``) as a live run. A
        registry folder that cannot be written only disables the sharing: the run goes on."""
        folder = registry_dir()
        record = {
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "threads": threads,
            "run_dir": str(Path(run_dir).resolve()),
        }
        path = folder / f"{os.getpid()}.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            return cls(None)
        return cls(path)

    def release(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None
