"""``exactgn sweep SWEEP.toml``: grid or random search over configuration keys, on Ray Tune or one by one.

A sweep file names a base run configuration and the keys to vary::

    name = "lr-seeds"
    base = "demo-minibatch/gn"          # shipped experiment name, or a TOML path (relative to this file)
    method = "grid"                     # grid | random
    samples = 4                         # random: draws per grid point
    seed = 0                            # random: seed of the sampler
    backend = "auto"                    # auto (ray if installed) | ray | sequential

    [set]                               # overrides applied to every trial
    "train.epochs" = 3

    [grid]                              # key = [values]: every combination is a trial
    seed = [0, 1]
    "optim.lr" = [0.1, 0.2]

    [random]                            # key = distribution (method = "random" only)
    "optim.gn.damping" = { log_uniform = [1e-4, 1e-1] }
    "optim.gn.inverse" = { choice = ["right", "pinv"] }

    [resources]
    cpus_per_trial = 1                  # CPU threads per trial (also torch's thread count)
    gpus_per_trial = "auto"             # 1 when CUDA is available, else 0

    [ray]
    address = ""                        # "" starts a local Ray instance; "auto" or "ray://HOST:10001" joins
    one

Trials are drawn here, not by Ray, so both back-ends run exactly the same trials. Each trial is an ordinary
run folder ``OUT/trial-NNN`` (``docs/run-folder.md``); ``OUT/sweep.json`` lists the trials and their overrides
and ``OUT/results.csv`` their final and best results. Running the same sweep again skips finished trials and
resumes interrupted ones. On a multi-machine Ray cluster, ``OUT`` must be on a filesystem every node can
write.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, find_config, load_config, read_toml, toml_value
from .rundir import atomic_write_text, remove_run, run_state
from .schema import validate_table
from .specs import BACKENDS, SweepFile

__all__ = ["SweepSpec", "Trial", "load_sweep", "make_trials", "run_sweep"]


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    name: str
    base: Path
    method: str = "grid"
    samples: int = 1
    seed: int = 0
    backend: str = "auto"
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    random: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpus_per_trial: int = 1
    gpus_per_trial: int | str = "auto"
    ray_address: str = ""


@dataclass
class Trial:
    """One point of the sweep: its index, folder name and the overrides it adds to the base config."""

    index: int
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        return f"trial-{self.index:03d}"


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}")


def _base(path: Path, base: str) -> Path:
    """``base``: a TOML path relative to the sweep file (or absolute), else a shipped experiment."""
    candidate = Path(base)
    if not candidate.is_absolute() and (path.parent / candidate).is_file():
        candidate = path.parent / candidate
    try:
        return find_config(candidate)
    except ConfigError as exc:
        raise _fail(str(path), f"base: {exc}") from exc


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file (:class:`exactgn.lab.specs.SweepFile`); every error names the file and the
    key.

    Every trial's run configuration is built too, so a bad key or value fails now, not after hours of trials.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        file = validate_table(SweepFile, read_toml(path))
    except ConfigError as exc:
        raise _fail(str(path), str(exc).removeprefix(f"{path}: ")) from None
    spec = SweepSpec(
        name=file.name,
        base=_base(path, file.base),
        method=file.method,
        samples=file.samples,
        seed=file.seed,
        backend=file.backend,
        description=file.description,
        fixed=dict(file.fixed),
        grid=dict(file.grid),
        random={key: {kind: arg} for key, (kind, arg) in file.distributions().items()},
        cpus_per_trial=file.resources.cpus_per_trial,
        gpus_per_trial=file.resources.gpus_per_trial,
        ray_address=file.ray.address,
    )
    for trial in make_trials(spec):
        try:
            _trial_config(spec, trial)
        except ConfigError as exc:
            raise _fail(str(path), f"{trial.name} ({describe_overrides(trial.overrides)}): {exc}") from exc
    return spec


def _sample(kind: str, arg: list[Any], rng: random.Random) -> Any:
    if kind == "choice":
        return rng.choice(arg)
    if kind == "uniform":
        return rng.uniform(arg[0], arg[1])
    if kind == "log_uniform":
        return math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1])))
    return rng.randint(int(arg[0]), int(arg[1]))


def make_trials(spec: SweepSpec) -> list[Trial]:
    """The trials, in a fixed order: every grid combination (× ``samples`` random draws for ``random``)."""
    keys = list(spec.grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.grid[k] for k in keys))] or [{}]
    rng = random.Random(spec.seed)
    trials = []
    for point in points:
        for _ in range(spec.samples if spec.method == "random" else 1):
            drawn = {key: _sample(*next(iter(dist.items())), rng) for key, dist in spec.random.items()}
            trials.append(Trial(len(trials), {**point, **drawn}))
    return trials


def _trial_config(spec: SweepSpec, trial: Trial) -> RunConfig:
    """The base config with the sweep's fixed overrides, the trial's own, and one torch thread per trial
    CPU."""
    overrides = {**spec.fixed, **trial.overrides, "train.threads": spec.cpus_per_trial}
    return load_config(spec.base, overrides)


def describe_overrides(overrides: dict[str, Any]) -> str:
    """``key=value, ...`` in TOML syntax, or ``base`` when there are none."""
    return ", ".join(f"{k}={toml_value(v)}" for k, v in overrides.items()) or "base"


# ---------------------------------------------------------------------------- running
def run_trial(spec_path: str, out: str, index: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume, or skip if finished) one trial; returns its summary. Called in Ray workers too."""

    import torch

    from .compare import summarise_run
    from .train import train

    spec = load_sweep(spec_path)
    trial = Trial(index, overrides)
    run_dir = Path(out) / trial.name
    state = run_state(run_dir)  # "stopped" (diverged) and "finished" trials are kept as they are
    torch.set_num_threads(spec.cpus_per_trial)
    if state == "restart":  # a folder without a checkpoint: nothing to keep
        remove_run(run_dir)
        state = "new"
    if state == "new":
        train(_trial_config(spec, trial), run_dir, progress=False)
    elif state == "resume":
        train(None, resume=run_dir, progress=False)
    return {**summarise_run(run_dir), "trial": trial.name, "overrides": describe_overrides(overrides)}


def _ray_available() -> bool:
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError:
        return False
    return True


def _gpus(spec: SweepSpec) -> float:
    if spec.gpus_per_trial != "auto":
        return float(spec.gpus_per_trial)
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def _run_sequential(spec_path: Path, out: Path, trials: list[Trial], progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    results = []
    for trial in tqdm(trials, desc="sweep", unit="trial", disable=not progress):
        results.append(run_trial(str(spec_path), str(out), trial.index, trial.overrides))
    return results


def _trial_bar(tune: Any, total: int, progress: bool) -> tuple[Any, list[Any]]:
    """A progress bar over finished trials, fed by a Ray Tune callback: ``(bar, callbacks)``."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="sweep", unit="trial", disable=not progress, file=sys.stderr)

    class _Progress(tune.Callback):
        def __init__(self, bar: Any) -> None:
            self.bar = bar

        def __getstate__(self) -> dict[str, Any]:  # Tune saves its run config; the bar stays here
            return {}

        def _done(self) -> None:
            if getattr(self, "bar", None) is not None:
                self.bar.update(1)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done()

    return bar, [_Progress(bar)]


def _run_ray(
    spec: SweepSpec, spec_path: Path, out: Path, trials: list[Trial], progress: bool, verbose: bool = False
) -> list[dict[str, Any]]:
    import signal

    import ray
    from ray import tune

    sigint = signal.getsignal(signal.SIGINT)  # Ray installs its own handler; give Ctrl-C back afterwards
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=verbose, configure_logging=False)
        if spec.ray_address:
            ray.init(address=spec.ray_address, **kwargs)
        else:
            ray.init(**kwargs)
        started = True
    bar, callbacks = _trial_bar(tune, len(trials), progress and not verbose)
    try:
        overrides = {t.index: t.overrides for t in trials}

        def exactgn_trial(config: dict[str, Any]) -> None:
            index = config["trial"]
            summary = run_trial(str(spec_path), str(out), index, overrides[index])
            tune.report(
                {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            )

        tuner = tune.Tuner(
            tune.with_resources(exactgn_trial, {"cpu": spec.cpus_per_trial, "gpu": _gpus(spec)}),
            param_space={"trial": tune.grid_search([t.index for t in trials])},
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str((out / "ray").resolve()),
                verbose=1 if verbose else 0,  # Ray's status tables only when asked for
                callbacks=callbacks,
            ),
        )
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} Ray trial(s) failed; first error: {errors[0]}")
    finally:
        bar.close()
        if started:
            ray.shutdown()
        signal.signal(signal.SIGINT, sigint)
    from .compare import summarise_run

    return [
        {**summarise_run(out / t.name), "trial": t.name, "overrides": describe_overrides(t.overrides)}
        for t in trials
    ]


RESULT_FIELDS = (
    "trial",
    "overrides",
    "status",
    "epochs",
    "final_train_loss",
    "final_train_accuracy",
    "final_test_loss",
    "final_test_accuracy",
    "best_test_accuracy",
    "best_test_accuracy_epoch",
    "wall_time_s",
    "run_dir",
)


def _say_threads(spec: SweepSpec, backend: str, trials: int, progress: bool) -> None:
    if not progress:
        return
    from .cores import available_cores

    cores, each = available_cores(), spec.cpus_per_trial
    side = "one at a time"
    if backend == "ray":
        side = f"up to {max(cores // each, 1)} at a time on {cores} cores"
    print(
        f"sweep {spec.name}: {trials} trials ({backend}), {side}; each trial uses {each} torch thread(s) "
        "(resources.cpus_per_trial)",
        file=sys.stderr,
        flush=True,
    )


def run_sweep(
    spec_path: str | Path,
    out: str | Path | None = None,
    *,
    backend: str | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> Path:
    """Run every trial of the sweep file into ``out`` (default ``runs/sweeps/<name>``); returns that folder.
    ``progress``: a progress bar over trials (stderr); ``verbose``: Ray Tune's own status tables and the
    trials' output instead."""
    spec_path = Path(spec_path).resolve()
    spec = load_sweep(spec_path)
    backend = backend or spec.backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "ray" if _ray_available() else "sequential"
    if backend == "ray" and not _ray_available():
        raise ImportError(
            "backend 'ray' needs Ray Tune: pip install 'exactgn[ray]' (or use backend = \"sequential\")"
        )
    out = Path(out or Path("runs") / "sweeps" / spec.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    trials = make_trials(spec)
    listing = {
        "name": spec.name,
        "sweep_file": str(spec_path),
        "base": str(spec.base),
        "backend": backend,
        "trials": [{"trial": t.name, "overrides": t.overrides} for t in trials],
    }
    previous = out / "sweep.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("trials") != listing["trials"]:
            raise ValueError(
                f"{out} holds a different sweep (its sweep.json lists other trials); choose another --out"
            )
    atomic_write_text(previous, json.dumps(listing, indent=2) + "\n")
    _say_threads(spec, backend, len(trials), progress)
    if backend == "ray":
        results = _run_ray(spec, spec_path, out, trials, progress, verbose)
    else:
        results = _run_sequential(spec_path, out, trials, progress)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(results)
    atomic_write_text(out / "results.csv", buf.getvalue())
    return out


#: A shipped example sweep file.
EXAMPLE = str(Path(__file__).parent / "configs" / "sweeps" / "demo-seeds-lr.toml")
