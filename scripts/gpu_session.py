"""Everything a lent GPU is used for, in one call with a time budget (see BENCHMARKS.md, RESULTS.md).

    PYTHONPATH=. python3 scripts/gpu_session.py --data DIR --budget 520 [--out $OUT] [--quick]

Phases, each skipped when too little of the budget is left, results written as they come:

1. ``scripts/gpu_check.py``: float64 exactness on the device, then ``exactgn bench`` at both reference sizes
   (float32, TF32, float64 solves) -> gpu_report.md, bench.json.
2. Epoch times of the reference settings (``exactgn train`` on the shipped reference files, a few epochs each,
   one run at a time so that the times are clean) -> train_times.md. MNIST is the real one under DIR; CIFAR-10
   is *random images in the CIFAR-10 format* when DIR holds none (the files are too large to send to the
   device): the times are the same, the accuracies meaningless and not reported.
3. The faithful comparison of RESULTS.md at the reference size on real MNIST (issue 9): mini-batch J-flat
   truncated as the reference runs it, J+ and Adam at the reference's rates, seed 42 (``--seeds``), all runs
   at once on the one GPU until the budget ends (their epoch logs and diagnostics are kept; runs are compared
   at the last epoch all of them reached) -> runs.tar.gz, holding faithful-minibatch/.

``--quick`` shrinks every size so that the script can be tried on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
START = time.monotonic()

TIMING_RUNS = [  # (config, epochs)
    ("mnist-minibatch/gn", 2),
    ("mnist-minibatch/adam", 2),
    ("mnist-fullbatch/gn", 10),
    ("cifar10-minibatch/gn", 1),
    ("cifar10-minibatch/adam", 1),
    ("cifar10-fullbatch/gn", 10),
]
INVERSE_SET = [  # the reference's mini-batch setting with exactgn's float64 solves and diagnostics
    "optim.gn.least_squares=true",
    "optim.gn.solve_dtype=float64",
    "diagnostics.enabled=true",
    "diagnostics.every=2",
    "train.threads=2",
]
TRUNCATED = [
    "optim.gn.inverse=right",
    "optim.gn.rtol=0.01",
    "optim.gn.atol=1e-5",
]  # as the reference runs J-flat
MIN_NORM = ["optim.gn.inverse=pinv", "optim.gn.rtol=0", "optim.gn.atol=0"]


def inverse_runs(seeds: list[int]) -> list[tuple[str, str, list[str]]]:
    """(name, config, overrides) of the faithful comparison (issue 9): J-flat truncated as the reference,
    J+ and Adam at the reference's rates, per seed (seed 42 first)."""
    out = []
    for seed in seeds:
        out += [
            (f"s{seed}-jflat-trunc", "mnist-minibatch/gn", INVERSE_SET + TRUNCATED + [f"seed={seed}"]),
            (f"s{seed}-jplus", "mnist-minibatch/gn", INVERSE_SET + MIN_NORM + [f"seed={seed}"]),
            (f"s{seed}-adam", "mnist-minibatch/adam", ["train.threads=2", "diagnostics.enabled=true",
                                                       "diagnostics.every=2", f"seed={seed}"]),
        ]  # fmt: skip
    return out


QUICK_SET = [
    "model.hidden=64",
    "model.blocks=2",
    "data.train_size=2000",
    "data.test_size=500",
    "train.batch_size=50",
]


def left(budget: float) -> float:
    return budget - (time.monotonic() - START)


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f} s] {msg}", flush=True)


def fake_cifar(root: Path) -> None:
    """Random uint8 images and labels in the CIFAR-10 pickle format (timing only)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"data": rng.integers(0, 256, (10000, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, 10000).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def train(config: str, out: Path, data: Path, sets: list[str], quiet: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "exactgn", "train", config, "--out", str(out), "--data-root", str(data)]
    for s in sets:
        cmd += ["--set", s]
    if quiet:
        cmd.append("--quiet")
    logf = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def epochs(run: Path) -> list[dict[str, str]]:
    path = run / "epochs.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def timing_phase(args: argparse.Namespace, runs: Path, data: Path, cifar: Path) -> None:
    rows = [
        "| setting | epochs timed | training time per epoch (s) | eval time per epoch (s) | wall per epoch "
        "(s) | "
        "100 epochs, estimated (min) | process wall incl. start (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for config, n in TIMING_RUNS:
        if left(args.budget) < args.budget * 0.45:
            log(f"skip timing of {config}: too little budget left")
            continue
        out = runs / "timing" / config.replace("/", "-")
        out.parent.mkdir(parents=True, exist_ok=True)
        root = cifar if config.startswith("cifar10") else data
        sets = [f"train.epochs={n}", "train.checkpoint_every=0"] + (QUICK_SET if args.quick else [])
        t0 = time.monotonic()
        proc = train(config, out, root, sets)
        try:
            rc = proc.wait(timeout=max(10.0, left(args.budget) - args.budget * 0.4))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = "killed"
        wall = time.monotonic() - t0
        all_rec = epochs(out)
        rec = [r for r in all_rec if int(r["epoch"]) > 0]
        log(f"{config}: rc={rc}, {len(rec)} epochs, {wall:.1f} s")
        if rec:
            ep = sum(float(r["epoch_time_s"]) for r in rec) / len(rec)
            ev = sum(float(r["eval_time_s"]) for r in rec) / len(rec)
            per = (float(rec[-1]["wall_time_s"]) - float(all_rec[0]["wall_time_s"])) / len(rec)
            rows.append(
                f"| {config} | {len(rec)} | {ep:.2f} | {ev:.2f} | {per:.2f} | {100 * per / 60:.1f} | "
                f"{wall:.0f} |"
            )
        else:
            rows.append(f"| {config} | 0 (rc={rc}; see log) | | | | | {wall:.0f} |")
        (args.out / "train_times.md").write_text("\n".join(rows) + "\n")
        for ck in out.glob("checkpoints/*.pt"):
            ck.unlink()


def inverse_phase(args: argparse.Namespace, runs: Path, data: Path) -> None:
    if left(args.budget) < 90:
        log("skip the inverse comparison: too little budget left")
        return
    procs = {}
    for name, config, sets in inverse_runs(args.seeds):
        out = runs / "faithful-minibatch" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        sets = sets + ["train.checkpoint_every=0"]
        if args.quick:
            sets += QUICK_SET + ["train.epochs=3"]
        procs[name] = (out, train(config, out, data, sets))
    log(f"inverse comparison: {len(procs)} runs started")
    deadline = START + args.budget - 25
    while time.monotonic() < deadline and any(p.poll() is None for _, p in procs.values()):
        time.sleep(5)
    for name, (out, p) in procs.items():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        log(f"{name}: {max((int(r['epoch']) for r in epochs(out)), default=-1)} epochs logged")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="folder holding MNIST/raw (and maybe CIFAR-10)"
    )
    parser.add_argument("--budget", type=float, default=520.0, help="seconds for the whole script")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_results")))
    parser.add_argument("--runs", type=Path, default=Path("runs/gpu"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: try the script on a CPU")
    parser.add_argument("--skip-check", action="store_true", help="leave out phase 1")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[42], help="phase 3's seeds, all run at once (default: 42)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.runs.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    os.environ.update(env)

    if not args.skip_check:
        cmd = [sys.executable, str(ROOT / "scripts/gpu_check.py"), "--out", str(args.out), "--repeats", "8"]
        cmd += ["--quick"] if args.quick else []
        log("phase 1: exactness and benchmarks")
        try:
            subprocess.run(cmd, timeout=max(30.0, args.budget * 0.3))
        except subprocess.TimeoutExpired:
            log("phase 1 stopped at its share of the budget (what it wrote is kept)")
    cifar = args.data
    if not (args.data / "cifar-10-batches-py").is_dir():
        cifar = runs / "fake-cifar"
        if not (cifar / "cifar-10-batches-py" / "test_batch").is_file():
            fake_cifar(cifar)
        log("CIFAR-10: random images in the CIFAR-10 format (timing only)")
    log("phase 2: epoch times of the reference settings")
    timing_phase(args, runs, args.data, cifar)
    log("phase 3: J-flat (truncated) vs J+ vs Adam at the reference size, real MNIST")
    inverse_phase(args, runs, args.data)
    with tarfile.open(args.out / "runs.tar.gz", "w:gz") as tar:
        for path in sorted(runs.rglob("*")):
            if (
                path.is_file()
                and "fake-cifar" not in path.parts
                and path.suffix not in (".pt",)
                and "tensorboard" not in path.parts
            ):
                tar.add(path, arcname=str(path.relative_to(runs)))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
