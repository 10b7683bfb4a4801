"""Write the architecture study files: exact GN (J⁺) vs Adam vs SGD on MLP, ResMLP and RevMLP.

    PYTHONPATH=. python scripts/make_architecture_study.py            # rewrite the shipped files

Writes ``exactgn/lab/configs/studies/architecture-cpu.toml`` (h = 1024), ``architecture.toml`` (h = 8000, a
GPU) and the CPU tuning studies ``studies/tuning/architecture-{minibatch,fullbatch}-cpu.toml``. The three
models have matched trainable parameter counts: ResMLP and RevMLP with the same (d, h, L) hold the same count;
the MLP has two hidden layers of the width :func:`exactgn.models.mlp_width_for` gives for that count. The
header of each file is :data:`HEADERS` plus the measured CPU time (``--timing`` text, kept in the script).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import exactgn  # noqa: E402
from exactgn.lab.config import toml_value  # noqa: E402
from exactgn.models import mlp_width_for  # noqa: E402

STUDIES = ROOT / "exactgn" / "lab" / "configs" / "studies"
KINDS = ("mlp", "resmlp", "revmlp")
OPTIMISERS = ("gn", "adam", "sgd")
SEEDS = (42, 43, 44)
#: Setting → (base setting folder, "-cpu" added for the CPU twin, keys of the setting). Mini-batch twin: the
#: first 10000 images, B = 128, 15 epochs; full-batch twin: the first 256 images, 100 steps. Validation
#: images as the tuning studies.
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mb": (
        "mnist-minibatch",
        {
            "data.train_size": 10000,
            "data.val_size": 5000,
            "train.batch_size": 128,
            "train.drop_last": True,
            "train.epochs": 15,
            "train.checkpoint_every": 3,
            "diagnostics.every": 3,
        },
    ),
    "fb": (
        "mnist-fullbatch",
        {
            "data.train_size": 256,
            "data.val_size": 1000,
            "train.batch_size": 0,
            "train.epochs": 100,
            "train.checkpoint_every": 10,
            "diagnostics.every": 10,
        },
    ),
}
#: Learning-rate grids of the tuning studies. Grown at the top wherever a model chose the top value (an
#: optimum at a grid's edge is not a tuned rate): Adam 3e-3 and SGD 1.0 after the first three-value grids,
#: then full batch GN 10 and Adam 1e-2. The mini-batch GN grid stops at 1.0, the full function-space step.
GRIDS = {
    ("mb", "gn"): (0.05, 0.2, 1.0),
    ("fb", "gn"): (0.3, 1.0, 3.0, 10.0),
    ("mb", "adam"): (1e-4, 3e-4, 1e-3, 3e-3),
    ("fb", "adam"): (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    ("mb", "sgd"): (0.03, 0.1, 0.3, 1.0),
    ("fb", "sgd"): (0.03, 0.1, 0.3, 1.0),
}
#: Rates of the study, chosen by scripts/tune.py on the tuning studies' validation split (seed 42; logs in
#: results/tune-arch-{mb,fb}-cpu-*): (setting, optimiser) → model kind → learning rate.
TUNED = {
    ("mb", "gn"): {"mlp": 1.0, "resmlp": 1.0, "revmlp": 1.0},
    ("mb", "adam"): {"mlp": 1e-3, "resmlp": 3e-4, "revmlp": 3e-4},
    ("mb", "sgd"): {"mlp": 0.3, "resmlp": 0.1, "revmlp": 0.1},
    ("fb", "gn"): {"mlp": 10.0, "resmlp": 1.0, "revmlp": 3.0},
    ("fb", "adam"): {"mlp": 3e-3, "resmlp": 1e-3, "revmlp": 3e-4},
    ("fb", "sgd"): {"mlp": 0.3, "resmlp": 0.1, "revmlp": 0.3},
}
COMMON = {
    "optim.gn.solve_dtype": "float64",
    "optim.gn.least_squares": False,
    "train.threads": 1,
}


def model_keys(kind: str, hidden: int) -> dict[str, Any]:
    """The ``[model]`` keys of ``kind`` at bottleneck width ``hidden`` (MLP: matched parameter count)."""
    if kind == "mlp":
        rev = exactgn.RevMLP(784, 10, 2, hidden)
        count = sum(p.numel() for p in rev.parameters() if p.requires_grad)
        width = mlp_width_for(count, 784, 10, 2)
        return {"model.kind": "mlp", "model.widths": [width, width]}
    return {"model.kind": kind, "model.hidden": hidden}


def run_keys(setting: str, kind: str, opt: str, hidden: int, lr: float, seed: int) -> dict[str, Any]:
    keys = {**SETTINGS[setting][1], **model_keys(kind, hidden)}
    if opt == "gn":
        keys.update({"optim.gn.inverse": "pinv", "optim.gn.rtol": 0.0, "optim.gn.atol": 0.0})
    return {**keys, "optim.lr": lr, "seed": seed}


def runs(settings: tuple[str, ...], hidden: int, tuning: bool) -> list[dict[str, Any]]:
    """Every run; the CPU twins' configs at h = 1024, the reference configs (the twins' sources) otherwise."""
    suffix = "-cpu" if hidden == 1024 else ""
    out = []
    for setting in settings:
        for kind in KINDS:
            for opt in OPTIMISERS:
                pairs = (
                    [(lr, 42) for lr in GRIDS[setting, opt]]
                    if tuning
                    else [(TUNED[setting, opt][kind], s) for s in SEEDS]
                )
                for lr, seed in pairs:
                    tag = f"lr{lr:g}" if tuning else f"s{seed}"
                    out.append(
                        {
                            "name": f"{setting}-{kind}-{opt}-{tag}",
                            "config": f"{SETTINGS[setting][0]}{suffix}/{opt}",
                            "set": run_keys(setting, kind, opt, hidden, lr, seed),
                        }
                    )
    return out


def long_runs() -> list[dict[str, Any]]:
    """The 100-epoch mini-batch follow-up: J⁺ and Adam on the MLP and the ResMLP, seed 42, tuned rates (the
    RevMLP's 100-epoch runs are long-minibatch-cpu.toml's, at the same rates)."""
    longer = {"train.epochs": 100, "train.checkpoint_every": 5, "diagnostics.every": 5}
    out = []
    for kind in ("mlp", "resmlp"):
        for opt in ("gn", "adam"):
            keys = run_keys("mb", kind, opt, 1024, TUNED["mb", opt][kind], 42)
            out.append(
                {
                    "name": f"long-{kind}-{opt}-s42",
                    "config": "mnist-minibatch-cpu/" + opt,
                    "set": {**keys, **longer},
                }
            )
    return out


def study_text(header: str, name: str, description: str, fixed: dict[str, Any], items: list[dict]) -> str:
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    lines += [f"name = {toml_value(name)}", f"description = {toml_value(description)}", "", "[set]"]
    lines += [f"{toml_value(k)} = {toml_value(v)}" for k, v in fixed.items()]
    for item in items:
        body = ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in item["set"].items())
        lines += [
            "",
            "[[run]]",
            f"name = {toml_value(item['name'])}",
            f"config = {toml_value(item['config'])}",
        ]
        lines.append(f"set = {{ {body} }}")
    return "\n".join(lines) + "\n"


HEADERS = {
    "architecture-cpu": """
Architecture study, CPU-sized: exact GN (J⁺, untruncated, float64 solves) vs Adam vs SGD on an MLP, a
ResMLP and a RevMLP with matched trainable parameter counts (1,607,200: RevMLP and ResMLP d = 784, h = 1024,
L = 2; MLP 784 → 931 → 931 → 10, 1,607,847, He init), on the MNIST mini-batch twin (mb-: first 10000
images, B = 128, 15 epochs) and full-batch twin (fb-: first 256 images, 100 steps); seeds 42, 43, 44;
diagnostics (NTK, CKA per block / hidden layer, weights) and kept epoch checkpoints. Validation split as
the tuning studies (data.val_size; the training images do not change with it). Test set: all 10000 images.
The RevMLP's right inverse J♭ exists only for RevMLP, so GN is J⁺ for every model here.
Learning rates: tuned on the validation split (studies/tuning/architecture-*-cpu.toml, seed 42; logs and
tables in results/tune-arch-{mb,fb}-cpu-* and RESULTS.md section 7), the choice of scripts/tune.py, MLP /
ResMLP / RevMLP (the mini-batch J⁺ grid tops out at 1.0 by design):
{rates}  exactgn study architecture-cpu --out runs/studies/architecture-cpu
Regenerate with scripts/make_architecture_study.py (do not edit by hand).
""",
    "architecture": """
Architecture study, reference-size (a GPU): as architecture-cpu.toml (same data, epochs, seeds, optimisers and
learning rates) with the reference width h = 8000: RevMLP and ResMLP d = 784, h = 8000, L = 2 (12,545,568
trainable parameters), MLP 784 → 3166 → 3166 → 10 (12,543,702). train.device is auto (CUDA when present).
The rates are the CPU twin's (tuned at h = 1024); a rate need not transfer across widths, so for a tuned
comparison at this size rerun the tuning files with this file's overrides and fill the rates with
scripts/tune.py --template (as the tuning files' headers show).
Regenerate with scripts/make_architecture_study.py (do not edit by hand).
""",
    "architecture-long-cpu": """
Architecture study, 100 epochs with mini-batches (one seed): how does the gap between exact GN (J⁺) and tuned
Adam on the plain MLP and the ResMLP change over 100 epochs? (The RevMLP's, at the same rates: -0.26 points
at epoch 15, -0.23 at epoch 100; long-minibatch-cpu.toml, RESULTS.md section 5.) The mb- runs of
architecture-cpu.toml for 100 epochs (7800 steps), seed 42, J⁺ and Adam on the MLP and the ResMLP, diagnostics
every 5 epochs.
  exactgn study architecture-long-cpu --out runs/studies/architecture-long-cpu
Regenerate with scripts/make_architecture_study.py (do not edit by hand).
""",
    "tuning-mb": """
Tuning for the architecture study: learning rate per contender (jplus/adam/sgd × mlp/resmlp/revmlp; labels
exactgn.lab.evidence.contender, e.g. jplus-mlp) on the MNIST mini-batch twin of architecture-cpu.toml
(first 10000 images, B = 128, 15 epochs), seed 42, on a validation split of 5000 images from outside the
training subset (never the test set; the test set here: first 2000 images, not used for selection).
Grids: GN (J⁺) 0.05, 0.2, 1.0 (1.0, the full function-space step, is the top by design); Adam 1e-4 … 3e-3;
SGD 0.03 … 1.0 (the top values were added after the first grids' top was chosen).
  exactgn study exactgn/lab/configs/studies/tuning/architecture-minibatch-cpu.toml \\
      --out runs/studies/tune-arch-mb-cpu
  python scripts/tune.py runs/studies/tune-arch-mb-cpu        # the table and the chosen rates
Selection (scripts/tune.py): highest validation accuracy at the final epoch; diverged runs are out.
Regenerate with scripts/make_architecture_study.py (do not edit by hand).
""",
    "tuning-fb": """
Tuning for the architecture study: learning rate per contender (jplus/adam/sgd × mlp/resmlp/revmlp) on the
MNIST full-batch twin of architecture-cpu.toml (first 256 images, 100 steps), seed 42, on a validation split
of 1000 images from outside the training subset (test set: first 1000 images, not used for selection).
Grids: GN (J⁺) 0.3, 1.0, 3.0, 10; Adam 1e-4 … 1e-2; SGD 0.03 … 1.0 (grown at the top after the first grids'
top values were chosen).
  exactgn study exactgn/lab/configs/studies/tuning/architecture-fullbatch-cpu.toml \\
      --out runs/studies/tune-arch-fb-cpu
  python scripts/tune.py runs/studies/tune-arch-fb-cpu
Regenerate with scripts/make_architecture_study.py (do not edit by hand).
""",
}
_MEASURED = """
CPU time, 1 thread per run, two runs side by side on an otherwise idle 2-core machine (AMD EPYC; wall_time_s
of the committed runs, results/architecture-cpu-* and results/tune-arch-*), minutes per run J⁺ / Adam / SGD:
  mini-batch (78 steps, 15 epochs, diagnostics every 3): MLP 3.7 / 1.3 / 0.9, ResMLP 3.6 / 1.2 / 1.2,
    RevMLP 3.6 / 1.4 / 1.3: 18 min per seed.
  full batch (100 steps of 256 images, diagnostics every 10): MLP 2.0 / 1.0 / 1.1, ResMLP 2.4 / 1.5 / 1.5,
    RevMLP 2.6 / 1.8 / 1.7: 15.5 min per seed.
"""
#: Measured CPU time (1 thread) appended to each header.
TIMING = {
    "architecture-cpu": _MEASURED
    + "54 runs: 101 core-min; as two halves side by side, 44 and 58 min (measured).\n",
    "architecture": "Not measured on a GPU. On a CPU (not its place) h = 8000 holds 7.8× the parameters of\n"
    "architecture-cpu.toml's models; expect at least that factor over its ~100 core-min.\n",
    "architecture-long-cpu": "4 runs, 1 thread each, two side by side on an idle 2-core machine: J⁺ 24 and\n"
    "Adam 8 CPU-minutes per run (measured; 63 core-min, 32 min on 2 cores).\n",
    "tuning-mb": _MEASURED + "33 runs (no diagnostics, 2000 test images): 48 core-min (measured).\n",
    "tuning-fb": _MEASURED + "39 runs (no diagnostics, 1000 test images): 25 core-min (measured).\n",
}


def rates_text() -> str:
    """The tuned rates of :data:`TUNED`, one line per setting and optimiser, for the study's header."""
    names = {"mb": "mini-batch", "fb": "full batch", "gn": "J⁺", "adam": "Adam", "sgd": "SGD"}
    return "".join(
        f"  {names[setting]:<11} {names[opt]:<5} "
        + " / ".join(f"{TUNED[setting, opt][k]:g}" for k in KINDS)
        + "\n"
        for setting, opt in TUNED
    )


def main() -> int:
    final = {
        **COMMON,
        "data.test_size": 0,
        "train.keep_checkpoints": True,
        "diagnostics.enabled": True,
        "diagnostics.probe_size": 128,
    }
    gpu = {k: v for k, v in final.items() if k != "train.threads"}
    files = {
        STUDIES / "architecture-cpu.toml": (
            "architecture-cpu",
            "Exact GN (J+) vs Adam vs SGD on MLP, ResMLP, RevMLP at matched parameter counts (h = 1024): "
            "MNIST mini-batch (10000 images, B = 128) and full-batch (256 images) twins, 3 seeds, "
            "diagnostics",
            final,
            runs(("mb", "fb"), 1024, tuning=False),
        ),
        STUDIES / "architecture.toml": (
            "architecture",
            "Exact GN (J+) vs Adam vs SGD on MLP, ResMLP, RevMLP at matched parameter counts (h = 8000): "
            "MNIST mini-batch (10000 images, B = 128) and full-batch (256 images) twins, 3 seeds, "
            "diagnostics",
            gpu,
            runs(("mb", "fb"), 8000, tuning=False),
        ),
        STUDIES / "tuning" / "architecture-minibatch-cpu.toml": (
            "tune-arch-mb-cpu",
            "Learning-rate tuning on a validation split for the architecture study: mini-batch twin, "
            "J+/Adam/SGD x MLP/ResMLP/RevMLP x 3-4 rates",
            {**COMMON, "data.test_size": 2000},
            runs(("mb",), 1024, tuning=True),
        ),
        STUDIES / "tuning" / "architecture-fullbatch-cpu.toml": (
            "tune-arch-fb-cpu",
            "Learning-rate tuning on a validation split for the architecture study: full-batch twin, "
            "J+/Adam/SGD x MLP/ResMLP/RevMLP x 4-5 rates",
            {**COMMON, "data.test_size": 1000},
            runs(("fb",), 1024, tuning=True),
        ),
        STUDIES / "architecture-long-cpu.toml": (
            "architecture-long-cpu",
            "Exact GN (J+) vs Adam on MLP and ResMLP for 100 epochs with mini-batches (h = 1024), one seed",
            final,
            long_runs(),
        ),
    }
    keys = ("architecture-cpu", "architecture", "tuning-mb", "tuning-fb", "architecture-long-cpu")
    for key, (path, (name, description, fixed, items)) in zip(keys, files.items()):
        header = HEADERS[key].replace("{rates}", rates_text()) + TIMING[key]
        path.write_text(study_text(header, name, description, fixed, items), encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)} ({len(items)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
