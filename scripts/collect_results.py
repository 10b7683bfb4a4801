"""Copy the small files behind a result from a run (or study, sweep, compare) folder into ``results/<name>/``.

    python scripts/collect_results.py runs/studies/tune-minibatch-cpu tune-minibatch-cpu
    python scripts/collect_results.py RUN_DIR NAME [--results DIR] [--max-bytes N] [--force] [--replace]

What is copied, keeping the folder structure below SOURCE (docs/results.md):

* in every folder: ``config.toml``, ``meta.json``, ``epochs.csv``, ``epochs.jsonl``, ``diagnostics.jsonl``,
  and the listings of studies, sweeps and comparisons (``study.json``, ``sweep.json``, ``results.csv``,
  ``results.md``, ``comparison.csv``, ``comparison.md``);
* ``steps.csv`` as it is when it is at most ``--max-bytes``, else gzipped to ``steps.csv.gz``;
* at the top of SOURCE, any other ``*.csv``, ``*.md``, ``*.json`` (e.g. a table written by
  ``study_tables.py cross-cka --csv``);
* the study file that ``study.json`` names (its ``study_file``), as ``study-file.toml``, when it still exists.

Never copied: checkpoints (``*.pt``, ``checkpoints/``), TensorBoard and Ray folders, ``steps.jsonl`` (the same
rows as ``steps.csv``). A file larger than ``--max-bytes`` (default 1 MB) stops the whole collection before
anything is copied, unless ``--force``. ``results/<name>/COLLECTED.json`` records the source, the time and
every file's size and SHA-256.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import json
import shutil
import sys
from pathlib import Path

SMALL_FILES = {
    "config.toml",
    "meta.json",
    "epochs.csv",
    "epochs.jsonl",
    "diagnostics.jsonl",
    "study.json",
    "sweep.json",
    "results.csv",
    "results.md",
    "comparison.csv",
    "comparison.md",
}
TOP_SUFFIXES = (".csv", ".md", ".json")
SKIP_DIRS = {"checkpoints", "tensorboard", "ray", "__pycache__"}
MANIFEST = "COLLECTED.json"
STUDY_FILE = "study-file.toml"
DEFAULT_MAX_BYTES = 1_000_000


class CollectError(Exception):
    """Nothing was copied; the message says why and what to do."""


def plan(source: Path, max_bytes: int) -> list[tuple[Path, Path, bool]]:
    """``(file, relative destination, gzip?)`` for every file to copy from ``source``, in a stable order."""
    out = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if not path.is_file() or any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if path.suffix == ".pt":
            continue
        if path.name == "steps.csv":
            big = path.stat().st_size > max_bytes
            out.append((path, rel.with_name("steps.csv.gz") if big else rel, big))
        elif path.name in SMALL_FILES or (len(rel.parts) == 1 and path.suffix in TOP_SUFFIXES):
            out.append((path, rel, False))
    study_file = _study_file(source)
    if study_file is not None:
        out.append((study_file, Path(STUDY_FILE), False))
    return out


def _study_file(source: Path) -> Path | None:
    """The study file that ``source/study.json`` names, when it still exists (copied as ``study-file.toml``,
    so that the exact runs can be rerun from the results folder)."""
    try:
        named = json.loads((source / "study.json").read_text(encoding="utf-8")).get("study_file")
    except (OSError, ValueError, AttributeError):
        return None
    path = Path(named) if isinstance(named, str) else None
    return path if path is not None and path.is_file() else None


def _gzip_bytes(path: Path) -> bytes:
    # mtime=0: the same file gives the same bytes, so re-collecting does not change the repository.
    return gzip.compress(path.read_bytes(), compresslevel=9, mtime=0)


def collect(
    source: str | Path,
    name: str,
    *,
    results: str | Path = "results",
    max_bytes: int = DEFAULT_MAX_BYTES,
    force: bool = False,
    replace: bool = False,
) -> Path:
    """Copy the small files of ``source`` into ``results/name``; returns that folder (see the module
    docstring)."""
    source, dest = Path(source), Path(results) / name
    if not source.is_dir():
        raise CollectError(f"{source} is not a folder; give a run folder or a study/sweep/compare folder")
    if not name or Path(name).name != name or name.startswith("."):
        raise CollectError(f"the result name must be one folder name (no slashes), got {name!r}")
    files = plan(source, max_bytes)
    if not any(p.name == "meta.json" for p, _, _ in files):
        raise CollectError(f"{source} holds no run folder (no meta.json below it); nothing to collect")
    payloads = [(rel, _gzip_bytes(p) if gz else p.read_bytes(), p) for p, rel, gz in files]
    large = [f"{p} ({len(data)} bytes)" for rel, data, p in payloads if len(data) > max_bytes]
    if large and not force:
        raise CollectError(
            f"{len(large)} file(s) exceed {max_bytes} bytes: {', '.join(large)}; results/ holds small "
            "files only. Leave them out of the run, raise --max-bytes, or pass --force"
        )
    if dest.exists():
        if not replace:
            raise CollectError(
                f"{dest} exists; pass --replace to collect it afresh (its files are removed first)"
            )
        shutil.rmtree(dest)
    manifest = {
        "source": str(source.resolve()),
        "collected": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {},
    }
    for rel, data, _ in payloads:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        manifest["files"][rel.as_posix()] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="a run folder, or a study / sweep / compare output folder")
    parser.add_argument("name", help="the folder to write under results/")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "results",
        help="the results folder (default: the repository's results/)",
    )
    parser.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest file copied (default 1 MB)"
    )
    parser.add_argument("--force", action="store_true", help="copy files larger than --max-bytes too")
    parser.add_argument("--replace", action="store_true", help="replace an existing results/NAME")
    args = parser.parse_args(argv)
    try:
        dest = collect(
            args.source,
            args.name,
            results=args.results,
            max_bytes=args.max_bytes,
            force=args.force,
            replace=args.replace,
        )
    except CollectError as exc:
        print(f"collect_results: {exc}", file=sys.stderr)
        return 1
    files = json.loads((dest / MANIFEST).read_text())["files"]
    print(f"collected {len(files)} files ({sum(f['bytes'] for f in files.values())} bytes) into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
