"""Device check for a CUDA machine: exactness on the GPU, then the reference-size benchmarks.

Usage (one call on a GPU machine, from the repository root; results land in $OUT or ./gpu_results):

    PYTHONPATH=. python3 scripts/gpu_check.py [--quick] [--out DIR]

1. float64 exactness on CUDA: both GN directions and the NTK agree with the CPU computation, and the
   right inverse realises v (J·Δθ = v) to 1e-10, on small random RevMLPs.
2. `exactgn bench` at the two reference sizes (CIFAR-10: d=3072 h=8000 L=6 B=1000; MNIST: d=784 h=8000 L=2
   B=1000) in float32, with TF32 products, truncated as the reference settings are (eigendecompositions), and
   with float64 solves; all results in one JSON file (bench.json,
   keyed "<size>-<setting>") and the tables in gpu_report.md.
``--quick`` shrinks everything so that the script can be tried on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import exactgn
from exactgn.lab.bench import BenchConfig, format_table, run_bench

REFERENCE = {
    "cifar10": dict(features=3072, hidden=8000, blocks=6, batch=1000),
    "mnist": dict(features=784, hidden=8000, blocks=2, batch=1000),
}
QUICK = {
    "cifar10": dict(features=96, hidden=64, blocks=3, batch=32),
    "mnist": dict(features=64, hidden=64, blocks=2, batch=32),
}


def exactness(device: torch.device) -> list[str]:
    lines = []
    gen = torch.Generator().manual_seed(0)
    for hidden, blocks in ((64, 1), (64, 3), (None, 2)):
        model = exactgn.RevMLP(96, 5, blocks, hidden, init_std=0.3, seed=blocks, dtype=torch.float64)
        x = torch.randn(20, 96, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (20,), generator=gen)
        gpu = exactgn.RevMLP(96, 5, blocks, hidden, init_std=0.3, seed=blocks, dtype=torch.float64).to(device)
        for inverse in ("right", "pinv"):
            cpu_dir = exactgn.gn_direction(model, x, y, inverse=inverse)
            gpu_dir = exactgn.gn_direction(gpu, x.to(device), y.to(device), inverse=inverse)
            diff = max(((gpu_dir[n].cpu() - cpu_dir[n]).norm() / cpu_dir[n].norm()).item() for n in cpu_dir)
            res = exactgn.compute_direction(gpu, x.to(device), y.to(device), inverse=inverse)
            fn = exactgn.jvp_logits(gpu, x.to(device), res.direction)
            err = ((fn - res.v).norm() / res.v.norm()).item()
            ok = diff <= 1e-10 and err <= 1e-10
            lines.append(
                f"h={hidden} L={blocks} {inverse}: |gpu-cpu|={diff:.1e} |J·d-v|={err:.1e} "
                f"{'OK' if ok else 'FAIL'}"
            )
        ntk_diff = (
            (exactgn.ntk_gram(gpu, x.to(device)).cpu() - exactgn.ntk_gram(model, x)).norm()
            / exactgn.ntk_gram(model, x).norm()
        ).item()
        lines.append(
            f"h={hidden} L={blocks} ntk: |gpu-cpu|={ntk_diff:.1e} {'OK' if ntk_diff <= 1e-12 else 'FAIL'}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (try the script on a CPU)")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_results"))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        print("no CUDA device: run with --quick to try the script on a CPU", file=sys.stderr)
        return 2
    report = [
        f"# exactgn GPU check ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"torch {torch.__version__}, {device}",
    ]
    if device.type == "cuda":
        report.append(f"device: {torch.cuda.get_device_name(0)}")
    report += ["", "## float64 exactness on the device", ""] + [f"    {l}" for l in exactness(device)]
    sizes = QUICK if args.quick else REFERENCE
    settings = {
        "fp32": dict(),
        "tf32": dict(tf32=True),
        "fp32-truncated": dict(rtol=1e-2, atol=1e-5),
        "fp32-f64solve": dict(solve_dtype="float64"),
    }
    all_results: dict[str, object] = {}
    # The settings that matter most first, both sizes each, so that a cut-short call still has them.
    for label, extra in settings.items():
        for name, size in sizes.items():
            if device.type == "cpu" and label == "tf32":
                continue
            print(f"bench {name} {label} ...", flush=True)
            cfg = BenchConfig(**size, classes=10, device=device.type, repeats=args.repeats, warmup=2, **extra)
            try:
                res = run_bench(cfg)
            except torch.cuda.OutOfMemoryError as exc:  # report, do not lose the rest
                report += ["", f"## {name} {label}: out of memory: {exc}"]
                continue
            all_results[f"{name}-{label}"] = res
            (out / "bench.json").write_text(json.dumps(all_results, indent=2))
            report += ["", f"## {name} ({label})", "", format_table(res)]
            (out / "gpu_report.md").write_text("\n".join(report) + "\n")
    (out / "gpu_report.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
