"""``exactgn`` on the command line: every sub-command's parser, one small function each.

Nothing imports this module (the ``exactgn`` script and ``python -m exactgn`` run it). It is the only library
module that reaches into the lab (:mod:`exactgn.lab`), and only inside the functions that run a command, so
building the parser loads no training code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["build_parser", "main"]

Sub = Any  # argparse's sub-parser action (a private class)


def _wrap(text: str) -> str:
    return textwrap.fill(text, 79, break_on_hyphens=False)


def _common_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train``, ``compare``, ``study`` (and, in part, ``demo``)."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, e.g. optim.lr=0.5 or train.epochs=10); repeatable",
    )
    p.add_argument(
        "--data-root",
        metavar="DIR",
        help="folder holding MNIST/raw/ and cifar-10-batches-py/ "
        "(default: data.root of the config, else $EXACTGN_DATA)",
    )
    p.add_argument(
        "--download", action="store_true", help="download missing dataset files (needs torchvision)"
    )
    p.add_argument(
        "--device",
        metavar="DEVICE",
        help="auto, cpu, cuda, cuda:N or mps (default: train.device of the config)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` plus the shortcuts ``--data-root``, ``--download``, ``--device`` as overrides."""
    from .lab.config import toml_value

    extra = list(args.overrides)
    if args.data_root:
        extra.append(f"data.root={toml_value(str(Path(args.data_root).resolve()))}")
    if args.download:
        extra.append("data.download=true")
    if args.device:
        extra.append(f"train.device={args.device}")
    return extra


def _say(text: str, file: Any = None) -> None:
    """``print``, but a closed pipe (``| head``, Ctrl-C through ``| tee``) silences the stream instead of
    failing the command."""
    file = file or sys.stdout
    try:
        print(text, file=file, flush=True)
    except (BrokenPipeError, ValueError):
        _silence(file)


def _silence(file: Any) -> None:
    """Point a stream whose reader is gone at /dev/null, so that Python's exit flush cannot fail either."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, file.fileno())
        os.close(devnull)


def _interrupted(command: str, exc: BaseException, *hints: str) -> int:
    _say(f"exactgn {command}: {exc}", sys.stderr)
    for hint in hints:
        _say(f"exactgn {command}: {hint}", sys.stderr)
    return 130


# ---------------------------------------------------------------------------- demo
def _add_demo(sub: Sub) -> None:
    p = sub.add_parser(
        "demo",
        help="start here: GN vs Adam vs SGD on the bundled MNIST subset (CPU, ~2-3 minutes)",
        description="The first thing to run. Trains a RevMLP (L=2, h=1024) on the small MNIST subset bundled "
        "with exactgn (no download) with exact Gauss-Newton, Adam and SGD at the reference study's learning "
        "rates: once full-batch (1024 images, 20 steps) and once with mini-batches (5000 images, batches of "
        "1000/1024, 15 epochs). Prints the two comparison tables (final and best train/test loss and "
        "accuracy). About two to three minutes on two CPU cores.",
    )
    p.add_argument("--out", metavar="DIR", help="folder for the runs (default runs/demo-<time>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every run (e.g. train.epochs=5); repeatable",
    )
    p.add_argument("--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .lab.demo import SETTINGS, reading, run_demo
    from .lab.train import TrainingInterrupted

    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    start = time.perf_counter()
    print(
        "exactgn demo: exact Gauss-Newton vs Adam vs SGD on the bundled MNIST subset "
        "(RevMLP d=784, L=2, h=1024; reference learning rates).",
        flush=True,
    )
    try:
        out = run_demo(args.out, overrides=overrides, progress=not args.quiet)
    except TrainingInterrupted as exc:
        return _interrupted("demo", exc)
    for setting in SETTINGS:
        print()
        print((out / setting / "comparison.md").read_text(), end="")
    text = reading(out)
    if text:
        print()
        print(text)
    print(
        f"\nRuns, logs and tables are in {out}/ (see docs/run-folder.md); demo took "
        f"{time.perf_counter() - start:.0f} s."
    )
    print("Next: exactgn compare mnist-fullbatch-cpu --data-root DIR (real MNIST), exactgn train --help.")
    return 0


# ---------------------------------------------------------------------------- train
def _add_train(sub: Sub) -> None:
    from .lab.config import OPTIMISERS, list_experiments, list_settings
    from .lab.train import RESUMABLE_KEYS

    p = sub.add_parser(
        "train",
        help="train one run (GN, Adam, AdamW or SGD) from a TOML config",
        description=_wrap(
            "Train one run as the TOML file CONFIG says, into a new folder runs/<name>-<optimiser>-<time>/ "
            "(or --out DIR): config.toml, meta.json, steps.csv/jsonl, epochs.csv/jsonl, checkpoints/ "
            "(see docs/run-folder.md). CONFIG is a path or a shipped experiment name such as "
            "mnist-fullbatch/gn. Ctrl-C saves a checkpoint; --resume RUN_DIR continues it."
        ),
        epilog=_wrap(
            f"shipped experiments: SETTING/OPTIMISER ({', '.join(OPTIMISERS)}) for SETTING in "
            + ", ".join(list_settings())
            + f" ({len(list_experiments())} files)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", metavar="CONFIG", help="TOML file or shipped experiment name")
    p.add_argument("--out", metavar="DIR", help="run folder to create (must not exist or be empty)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint "
        f"(--set may then change only: {', '.join(RESUMABLE_KEYS)})",
    )
    _common_options(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .lab.config import load_config
    from .lab.rundir import read_meta
    from .lab.train import TrainingInterrupted, train

    overrides = _overrides(args)
    if args.resume and (args.config or args.out):
        raise ValueError("give either CONFIG (with --out) or --resume RUN_DIR, not both")
    if not args.resume and not args.config:
        raise ValueError(
            "a CONFIG is needed (a TOML file or a shipped experiment such as mnist-small/gn), "
            "or --resume RUN_DIR"
        )
    try:
        if args.resume:
            run_dir = train(None, resume=args.resume, overrides=overrides, progress=not args.quiet)
        else:
            run_dir = train(load_config(args.config, overrides), args.out, progress=not args.quiet)
    except TrainingInterrupted as exc:
        return _interrupted("train", exc)
    meta = read_meta(run_dir)
    _say(
        f"{meta['status']}: {run_dir} ({meta['epochs_done']} epochs, {meta['global_step']} steps, "
        f"{meta['wall_time_s']:.1f} s)"
    )
    return 0 if meta["status"] == "finished" else 1


# ---------------------------------------------------------------------------- compare
def _add_compare(sub: Sub) -> None:
    from .lab.config import OPTIMISERS, list_settings

    p = sub.add_parser(
        "compare",
        help="train one setting with each of its optimisers and tabulate the results",
        description=_wrap(
            "Train the same setting with each optimiser it has a file for (gn.toml, adam.toml, sgd.toml, "
            "...), "
            "one after the other, into OUT/<optimiser>/, then print a table of final and best train/test "
            "loss "
            "and accuracy and write it to OUT/comparison.md and OUT/comparison.csv. SETTING is a shipped "
            "setting or a folder holding the files."
        ),
        epilog=_wrap("shipped settings: " + ", ".join(list_settings())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "setting", metavar="SETTING", help="shipped setting (e.g. mnist-fullbatch-cpu) or a folder"
    )
    p.add_argument(
        "--out", metavar="DIR", help="folder for the runs and tables (default runs/compare-<setting>-<time>)"
    )
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted comparison in DIR")
    p.add_argument(
        "--optimisers",
        default=None,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(OPTIMISERS)} (default: every file of the setting)",
    )
    _common_options(p)
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from .lab.compare import compare
    from .lab.rundir import read_rows
    from .lab.train import TrainingInterrupted

    if args.resume and args.out:
        raise ValueError("give --out for a new comparison or --resume DIR to continue one, not both")
    optimisers = [o.strip() for o in args.optimisers.split(",") if o.strip()] if args.optimisers else None
    try:
        out = compare(
            args.setting,
            args.resume or args.out,
            overrides=_overrides(args),
            optimisers=optimisers,
            resume=bool(args.resume),
            progress=not args.quiet,
        )
    except TrainingInterrupted as exc:
        hint = f"continue the comparison with: exactgn compare {args.setting} --resume {exc.run_dir.parent}"
        return _interrupted("compare", exc, hint)
    print((out / "comparison.md").read_text(), end="")
    print(f"\nwrote {out / 'comparison.md'} and {out / 'comparison.csv'}")
    rows = read_rows(out / "comparison.csv")
    return 0 if all(r["status"] == "finished" for r in rows) else 1


# ---------------------------------------------------------------------------- diagnose
def _add_diagnose(sub: Sub) -> None:
    p = sub.add_parser(
        "diagnose",
        help="NTK, CKA and weight diagnostics of a run, from its epoch checkpoints",
        description="Recompute the diagnostics of DESIGN §5 from RUN_DIR/checkpoints/epoch_NNNN.pt (written "
        "when the run has train.keep_checkpoints = true): exact NTK alignment with the initial NTK and its "
        "rate "
        "of change, the reference's random-probe NTK estimate, linear CKA (biased and unbiased) of every "
        "block against initialisation, and per-half-layer weight change. Writes RUN_DIR/diagnostics.jsonl.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run folder with checkpoints/epoch_0000.pt and later ones"
    )
    p.add_argument(
        "--probe-size",
        type=int,
        default=None,
        help="probe samples B: the first B training images of the run's dataset (default: the run's "
        "diagnostics.probe_size, else 256; the NTK is Bk × Bk)",
    )
    p.add_argument(
        "--every", type=int, default=1, help="use checkpoints whose epoch is a multiple of K (default 1)"
    )
    p.add_argument(
        "--probe",
        metavar="FILE.pt",
        help="use this probe batch instead (a tensor B × d saved with torch.save); --probe-size still caps B",
    )
    p.add_argument(
        "--data-root",
        metavar="DIR",
        help="data root for the probe images (default: the run's data.root, else $EXACTGN_DATA)",
    )
    p.add_argument("--out", metavar="FILE", help="write here instead of RUN_DIR/diagnostics.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing diagnostics file")
    p.add_argument(
        "--dtype",
        choices=("float64", "model"),
        default="float64",
        help="precision of the diagnostics (default float64; 'model' uses the checkpoint's dtype)",
    )
    p.add_argument("--no-ntk", action="store_true", help="skip the NTK metrics (the costliest part)")
    p.set_defaults(func=_run_diagnose)


def _run_diagnose(args: argparse.Namespace) -> int:
    import torch

    from .lab.diagnostics import diagnose_run, read_probe
    from .lab.rundir import diagnostics_path

    start = time.perf_counter()
    probe = read_probe(args.probe) if args.probe else None
    records = diagnose_run(
        args.run_dir,
        probe_size=args.probe_size,
        every=args.every,
        out=args.out,
        overwrite=args.overwrite,
        probe_inputs=probe,
        data_root=args.data_root,
        progress=True,
        dtype=torch.float64 if args.dtype == "float64" else None,
        ntk=not args.no_ntk,
    )
    target = args.out or str(diagnostics_path(args.run_dir))
    last = records[-1]
    keys = ("ntk_alignment", "ntk_probe_cosine", "cka/block0", "weight_rel_change/all")
    summary = ", ".join(f"{k} {last[k]:.6g}" for k in keys if k in last)
    print(
        f"wrote {len(records)} records to {target} in {time.perf_counter() - start:.1f} s; "
        f"epoch {last['epoch']}: {summary}"
    )
    return 0


# ---------------------------------------------------------------------------- report
def _add_report(sub: Sub) -> None:
    p = sub.add_parser(
        "report",
        help="PNG figures and one self-contained HTML page from run folders",
        description="Read run folders (or folders of run folders, searched recursively) and write PNG "
        "figures "
        "and one self-contained HTML page (figures embedded, summary tables, every run's configuration, meta "
        "and git revision, and the environment). Runs are grouped by dataset and full-/mini-batch setting; "
        "seeds of one setting are drawn as mean and band.",
    )
    p.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or folders containing run folders"
    )
    p.add_argument("--out", metavar="DIR", default="report", help="output folder (default ./report)")
    p.add_argument(
        "--band",
        choices=("minmax", "std"),
        default="minmax",
        help="band drawn around the mean over seeds: min–max (default) or ±1 std",
    )
    p.add_argument("--title", default="exactgn report", help="title of the HTML page")
    p.add_argument(
        "--cross-cka",
        action="store_true",
        help="also compute CKA between the final models of every pair of series (optimiser against "
        "optimiser); needs the runs' checkpoints and data",
    )
    p.add_argument("--probe-size", type=int, default=256, help="probe images for --cross-cka (default 256)")
    p.add_argument(
        "--data-root",
        metavar="DIR",
        help="data root for --cross-cka (default: the runs' data.root, else $EXACTGN_DATA)",
    )
    p.add_argument(
        "--matched-loss",
        type=float,
        metavar="LOSS",
        help="with several runs: add a table of each run's diagnostics at the first record whose "
        "training loss is at or below LOSS (comparisons at matched training loss, not matched steps)",
    )
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from .lab.report import make_report

    page = make_report(
        args.run_dirs,
        args.out,
        band=args.band,
        title=args.title,
        cross_cka=args.cross_cka,
        probe_size=args.probe_size,
        data_root=args.data_root,
        matched_loss=args.matched_loss,
    )
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    print(f"wrote {page} and {len(pngs)} figure(s) in {page.parent}")
    return 0


# ---------------------------------------------------------------------------- sweep
def _add_sweep(sub: Sub) -> None:
    from .lab.specs import BACKENDS

    p = sub.add_parser(
        "sweep",
        help="grid or random search over config keys, on Ray Tune or one trial after another",
        description="Run every trial of SWEEP.toml (a base config plus [grid] or [random] keys to vary): "
        "with "
        "Ray Tune when it is installed (one trial per GPU or per cpus_per_trial CPU slots, on a local Ray "
        "instance or the cluster at [ray] address), else one after another. Each trial is a run folder "
        "OUT/trial-NNN; OUT/results.csv holds final and best results. Rerunning skips finished trials and "
        "resumes interrupted ones. `exactgn report OUT` draws the seeds of each setting as mean and band.",
        epilog="example: exactgn sweep $(python -c 'import exactgn.lab.sweep as s; print(s.EXAMPLE)')",
    )
    p.add_argument(
        "sweep", metavar="SWEEP.toml", help="the sweep file (see the module docstring or the README)"
    )
    p.add_argument("--out", metavar="DIR", help="sweep folder (default runs/sweeps/<name>)")
    p.add_argument("--backend", choices=BACKENDS, help="override the file's backend")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verbose", action="store_true", help="Ray Tune's status tables and the trials' output")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from .lab.sweep import run_sweep

    out = run_sweep(args.sweep, args.out, backend=args.backend, progress=not args.quiet, verbose=args.verbose)
    print((out / "results.csv").read_text(), end="")
    print(f"sweep folder: {out}")
    return 0


# ---------------------------------------------------------------------------- study
def _add_study(sub: Sub) -> None:
    from .lab.specs import BACKENDS
    from .lab.study import shipped_lines

    p = sub.add_parser(
        "study",
        help="run an appendix study (a sweep, or a list of dependent runs such as switching optimiser)",
        description="\n\n".join(
            [
                _wrap(
                    "Run a study: a shipped one by name (exactgn study --list) or a TOML file. A study file "
                    "is either a sweep file (base + [grid]/[random], as exactgn sweep reads it: trials go to "
                    "OUT/trial-NNN) or a list of [[run]] tables run one after the other into OUT/<run "
                    "name>/; a "
                    'run with init_from = "NAME" starts from the final weights of the earlier run NAME (or, '
                    "with init_epoch = N, from its checkpoints/epoch_NNNN.pt) with a fresh optimiser: Adam "
                    "for N epochs then GN, and so on."
                ),
                _wrap(
                    "Rerunning the same command skips finished runs and resumes interrupted ones. "
                    "OUT/results.csv "
                    "and OUT/results.md hold final and best results per run (start_epoch: where a switched "
                    "run starts on its source's epoch axis); exactgn report OUT draws the runs. Default OUT: "
                    "runs/studies/<name>."
                ),
            ]
        ),
        epilog="shipped studies:\n" + "\n".join(shipped_lines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("study", nargs="?", metavar="STUDY", help="shipped study name or a TOML file")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="study folder (default runs/studies/<name>); rerun with the same DIR to resume",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="sweep files only: override the file's backend",
    )
    p.add_argument("--list", action="store_true", help="list the shipped studies and exit")
    p.add_argument(
        "--dry-run", action="store_true", help="print the runs (or trials) the study would make, and exit"
    )
    _common_options(p)
    p.set_defaults(func=_run_study)


def _study_overrides(args: argparse.Namespace, kind: str) -> list[str]:
    if kind != "sweep":
        return _overrides(args)
    # Sweep trials read the data root and device from the environment / their own config.
    if args.data_root:
        os.environ["EXACTGN_DATA"] = str(Path(args.data_root).resolve())
    if args.device:
        raise ValueError(
            '--device does not apply to sweep files; set "train.device" in the sweep\'s [set] table'
        )
    return list(args.overrides) + (["data.download=true"] if args.download else [])


def _run_study(args: argparse.Namespace) -> int:
    from .lab.rundir import read_rows
    from .lab.study import plan, run_study, shipped_lines, study_kind
    from .lab.train import TrainingInterrupted

    if args.list:
        print("\n".join(shipped_lines()))
        return 0
    if not args.study:
        raise ValueError("a STUDY is needed: a shipped study name (see exactgn study --list) or a TOML file")
    kind = study_kind(args.study)
    overrides = _study_overrides(args, kind)
    if args.dry_run:
        print(plan(args.study, overrides), end="")
        return 0
    try:
        out = run_study(
            args.study, args.out, overrides=overrides, backend=args.backend, progress=not args.quiet
        )
    except TrainingInterrupted as exc:
        return _interrupted(
            "study", exc, "continue the study with the same command (and --out, if you gave one)"
        )
    if (out / "results.md").is_file() and kind == "runs":
        print((out / "results.md").read_text(), end="")
        print(f"study folder: {out}")
        return 0 if all(r["status"] == "finished" for r in read_rows(out / "results.csv")) else 1
    print((out / "results.csv").read_text(), end="")
    print(f"study folder: {out}")
    return 0


# ---------------------------------------------------------------------------- bench
def _hidden(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _add_bench(sub: Sub) -> None:
    from .precision import DTYPES

    p = sub.add_parser(
        "bench",
        help="time forward, Adam and the GN steps on one model (RevMLP, MLP or ResMLP)",
        description="Time, in one process, the median of repeated steps of: a forward pass, an Adam step "
        "(forward + backward + update), a GN step with the right inverse (RevMLP only) and a GN step with "
        "the minimum-norm inverse (cross-entropy, identity Hessian, random data). Prints a table of medians "
        "and ratios to the Adam step, with the counted FLOPs of each step.",
    )
    p.add_argument(
        "--model",
        choices=("revmlp", "mlp", "resmlp"),
        default="revmlp",
        help="revmlp (default: both GN steps), mlp or resmlp (the minimum-norm GN step only)",
    )
    p.add_argument("--features", type=int, default=784, help="input size d (default 784)")
    p.add_argument(
        "--hidden", type=_hidden, default=1024, help="bottleneck width h, or 'none' (default 1024)"
    )
    p.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=None,
        help="--model mlp: hidden widths (default: two layers matching the RevMLP of --hidden/--blocks "
        "in parameter count)",
    )
    p.add_argument("--blocks", type=int, default=2, help="coupling blocks L (default 2)")
    p.add_argument("--batch", type=int, default=256, help="batch size B (default 256)")
    p.add_argument("--classes", type=int, default=10, help="classes k (default 10)")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu"
    )
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions per step (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument(
        "--solve-dtype",
        choices=tuple(DTYPES),
        default=None,
        help="precision of the Gram factorisations (default: the model's)",
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 matrix products on CUDA")
    p.add_argument(
        "--rtol",
        type=float,
        default=0.0,
        help="truncate both GN steps' solves at rtol·σ_max (default 0: exact; the reference settings "
        "use 1e-2). Truncated solves use eigendecompositions instead of Cholesky factorisations",
    )
    p.add_argument(
        "--atol", type=float, default=0.0, help="absolute truncation (default 0; the reference uses 1e-5)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import json

    from .lab.bench import BenchConfig, format_table, run_bench

    for name in ("features", "blocks", "batch", "classes", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"exactgn bench: --{name} must be at least 1")
    for name in ("rtol", "atol"):
        if not getattr(args, name) >= 0:
            raise SystemExit(f"exactgn bench: --{name} must be a number >= 0 (0 = no truncation)")
    if args.widths is not None and (args.model != "mlp" or min(args.widths) < 1):
        raise SystemExit("exactgn bench: --widths is for --model mlp, each width at least 1")
    cfg = BenchConfig(
        model=args.model,
        widths=args.widths,
        features=args.features,
        hidden=args.hidden,
        blocks=args.blocks,
        batch=args.batch,
        classes=args.classes,
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        dtype=args.dtype,
        solve_dtype=args.solve_dtype,
        tf32=args.tf32,
        rtol=args.rtol,
        atol=args.atol,
        seed=args.seed,
    )
    results = run_bench(cfg)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------- main
COMMANDS: tuple[Callable[[Sub], None], ...] = (
    _add_demo,
    _add_train,
    _add_compare,
    _add_diagnose,
    _add_report,
    _add_sweep,
    _add_study,
    _add_bench,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``exactgn`` parser with every sub-command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="exactgn",
        description="Exact Gauss-Newton optimisation in deep reversible MLPs (RevMLP): exact GN steps, the "
        "experiments of Buffelli et al. (NeurIPS 2024) on MNIST and CIFAR-10, and exact NTK/CKA diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"exactgn {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``exactgn``; returns the exit status. Errors in the user's input print one line and return 2
    (set ``EXACTGN_DEBUG=1`` for the traceback)."""
    from .errors import ExactGNError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader of stdout or stderr is gone: nothing more to say
        _silence(sys.stdout)
        _silence(sys.stderr)
        return 1
    except (ValueError, OSError, ExactGNError) as exc:
        if os.environ.get("EXACTGN_DEBUG"):
            raise
        _say(f"exactgn {args.command}: error: {exc}", sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
