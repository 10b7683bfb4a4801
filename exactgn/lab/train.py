"""One training loop for Gauss–Newton, Adam and SGD, full-batch and mini-batch, on any device.

:func:`train` runs a :class:`~exactgn.lab.config.RunConfig` into a run folder (``docs/run-folder.md``):
per-step and per-epoch logs, checkpoints every ``train.checkpoint_every`` epochs, at the end and on Ctrl-C,
and ``--resume``. On the CPU a resumed run ends with bit-identical weights to an uninterrupted one.

Stopping:

* Ctrl-C: the step in progress is finished, a checkpoint of the exact position (mid-epoch included) is
written,
  ``meta.json`` says ``interrupted``, and :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is raised.
  A second Ctrl-C during a step aborts at once without writing (the last checkpoint stays valid).
* A non-finite loss or parameter (or :class:`~exactgn.NonFiniteError` from the GN step) stops the run with
  status ``diverged``; its last good checkpoint is kept and :func:`train` returns normally.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import __version__
from ..linalg import GramFallbackWarning
from ..losses import as_target_rows, loss_value
from ..model import RevMLP
from ..precision import dtype_from_name
from .checkpoint import (
    load_checkpoint,
    load_init_weights,
    load_model,
    model_config,
    resolve_init_from,
    restore_rng_states,
    rng_states,
    save_checkpoint,
    save_weights,
)
from .config import (
    RESUMABLE_KEYS,
    ConfigError,
    RunConfig,
    flatten,
    from_dict,
    load_config,
    replace_key,
    to_dict,
    with_overrides,
    write_config,
)
from .cores import LiveRun, auto_threads, available_cores, live_runs
from .data import DataSplit, load_dataset, random_resized_crop
from .diagnostics import make_callback
from .rundir import (
    DIAGNOSTICS_FILE,
    RunLock,
    RunLog,
    checkpoint_dir,
    clean_temporaries,
    config_path,
    create_run_dir,
    epoch_checkpoint,
    last_checkpoint,
    log_path,
    provenance,
    read_meta,
    truncate_logs,
    utc_now,
    write_meta,
)
from .steppers import Diverged, Stepper, build_model, build_stepper, check_gn_batch, finite_loss

__all__ = [
    "EpochCallback",
    "TrainingInterrupted",
    "train",
    "resolve_device",
    "evaluate",
    "new_run_dir",
    "RESUMABLE_KEYS",
]


class EpochCallback(Protocol):
    """Called after every epoch (epoch 0 = before training) once the epoch's row is logged.

    A returned dict is appended to ``diagnostics.jsonl`` together with ``epoch`` and ``diagnostics_time_s``.
    """

    def on_epoch_end(self, epoch: int, model: RevMLP, optimizer: torch.optim.Optimizer) -> dict | None: ...


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C. ``run_dir``: the run folder; ``saved``: whether a checkpoint of the exact
    position was written (otherwise the previous checkpoint, at epoch ``epochs_done``, is the resume
    point)."""

    def __init__(self, run_dir: Path, saved: bool, epochs_done: int, global_step: int) -> None:
        where = (
            "a checkpoint of this position was saved"
            if saved
            else f"the checkpoint of epoch {epochs_done} is kept"
        )
        super().__init__(
            f"training interrupted at step {global_step}; {where}; resume with: exactgn train --resume "
            f"{run_dir}"
        )
        self.run_dir, self.saved, self.epochs_done, self.global_step = (
            run_dir,
            saved,
            epochs_done,
            global_step,
        )


# ---------------------------------------------------------------------------- building blocks
def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a clear error for an unavailable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device: {name!r} was asked for, but torch sees no CUDA device; use cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device: {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: 'mps' was asked for, but it is not available; use cpu or auto")
    return device


@torch.no_grad()
def evaluate(
    model: RevMLP, images: Tensor, labels: Tensor, loss: str, batch_size: int
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` over ``images`` (``N × ...``) and class ``labels`` (``N``)."""
    model.eval()
    n = labels.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    for lo in range(0, n, batch_size):
        x, y = images[lo : lo + batch_size], labels[lo : lo + batch_size]
        logits = model(x)
        rows = as_target_rows(y, model.num_classes, y.shape[0], logits, loss)
        total += loss_value(logits, rows, loss).double() * y.shape[0]
        correct += (logits.argmax(1) == y).sum()
    return float(total / n), float(correct) / n


def new_run_dir(cfg: RunConfig, base: str | os.PathLike = "runs") -> Path:
    """``runs/<name>-<optimiser>-<YYYYmmdd-HHMMSS>`` (with ``-2``, ``-3``… when taken), created here with an
    exclusive ``mkdir``, so that two runs started in the same second never share a folder."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = Path(base) / f"{cfg.name}-{cfg.optim.name}-{stamp}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    path, n = stem, 1
    while True:
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1
            path = stem.with_name(f"{stem.name}-{n}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- output and signals
class _SafeStream:
    """A text stream whose writes never raise: once its reader is gone (a closed pipe, ``| head``,
    Ctrl-C through ``| tee``), output is dropped, and the run goes on."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except (OSError, ValueError):  # BrokenPipeError, EPIPE, or a closed file
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.broken = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


_STDERR: dict[int, _SafeStream] = {}


def _stderr() -> _SafeStream:
    """``sys.stderr`` (as it is now) wrapped in a :class:`_SafeStream`."""
    key = id(sys.stderr)
    if key not in _STDERR:
        _STDERR.clear()
        _STDERR[key] = _SafeStream(sys.stderr)
    return _STDERR[key]


_SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
_DEFAULT_HANDLERS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class _InterruptGuard:
    """Defers Ctrl-C and SIGTERM (a scheduler's or ``timeout``'s stop) while a step is in flight, so that a
    checkpoint never holds a half-applied step; both then stop the run as Ctrl-C does."""

    def __init__(self) -> None:
        self.pending = False
        self.critical = False
        self.torn = False  # a KeyboardInterrupt escaped from inside a step
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, default in _DEFAULT_HANDLERS.items():
            if signal.getsignal(signum) is default:
                self._previous[signum] = signal.signal(signum, self._handler)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.critical and not self.pending:
            self.pending = True
            name = _SIGNAL_NAMES.get(signum, f"signal {signum}")
            _write(f"\n{name}: finishing this step, then saving a checkpoint ({name} again aborts, unsaved)")
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        self.critical = True
        try:
            yield
        except KeyboardInterrupt:
            self.torn = True
            raise
        finally:
            self.critical = False
        if self.pending:
            raise KeyboardInterrupt


# ---------------------------------------------------------------------------- the run
@dataclass
class _Position:
    """Where the run stands: completed epochs and steps, and the epoch in progress (if any)."""

    epochs_done: int = -1  # -1: not even epoch 0 (the evaluation before training) is logged
    global_step: int = 0
    epoch: int | None = None  # the epoch in progress
    steps_done: int = 0  # steps of that epoch already taken
    perm: Tensor | None = None  # that epoch's data order
    change_sum: float = 0.0
    change_count: int = 0
    epoch_time: float = 0.0

    def payload(self) -> dict[str, Any]:
        return {
            "epochs_done": self.epochs_done,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "steps_done": self.steps_done,
            "perm": self.perm,
            "change_sum": self.change_sum,
            "change_count": self.change_count,
            "epoch_time": self.epoch_time,
        }

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> "_Position":
        return cls(**p)


@dataclass
class _Run:
    cfg: RunConfig
    run_dir: Path
    data: DataSplit
    model: RevMLP
    stepper: Stepper
    device: torch.device
    data_gen: torch.Generator
    log: RunLog
    meta: dict[str, Any]
    callbacks: Sequence[Any]
    progress: bool
    pos: _Position = field(default_factory=_Position)
    wall_offset: float = 0.0
    segment_start: float = field(default_factory=time.perf_counter)
    bar: Any = None
    resumed: bool = False

    # -------------------------------------------------------------- sizes
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.stepper.optimizer

    @property
    def batch(self) -> int:
        n = len(self.data.train)
        b = self.cfg.train.batch_size
        return n if b == 0 or b >= n else b

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.data.train), self.batch
        return n // b if self.cfg.train.drop_last else math.ceil(n / b)

    def wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self.segment_start

    # -------------------------------------------------------------- checkpoints
    def checkpoint(self, *, weights_epoch: int | None = None) -> None:
        payload = {
            "model": self.model.state_dict(),
            "model_config": model_config(self.model),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.cfg.optim.name,
            "rng": rng_states(self.data_gen),
            "position": self.pos.payload(),
            "epoch": self.pos.epochs_done,
            "global_step": self.pos.global_step,
            "wall_time_s": self.wall(),
            "config": to_dict(self.cfg),
        }
        # The epoch's weights first, the record of progress (last.pt) last: a kill between the two leaves
        # last.pt at the previous position, so a resume redoes the epoch and writes both.
        if weights_epoch is not None:
            save_weights(epoch_checkpoint(self.run_dir, weights_epoch), self.model, weights_epoch)
        save_checkpoint(last_checkpoint(self.run_dir), payload)

    def restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        restore_rng_states(payload["rng"], self.data_gen)
        self.pos = _Position.from_payload(payload["position"])
        self.wall_offset = float(payload["wall_time_s"])
        self.segment_start = time.perf_counter()

    def update_meta(self, **changes: Any) -> None:
        self.meta.update(
            changes,
            epochs_done=max(self.pos.epochs_done, 0),
            global_step=self.pos.global_step,
            wall_time_s=round(self.wall(), 3),
        )
        write_meta(self.run_dir, self.meta)

    # -------------------------------------------------------------- one step
    def _batch(self, perm: Tensor, step: int) -> tuple[Tensor, Tensor]:
        idx = perm[step * self.batch : (step + 1) * self.batch].to(self.device)
        x, y = self.data.train.images[idx], self.data.train.labels[idx]
        if self.cfg.data.augment:
            x = random_resized_crop(
                x, self.data_gen, tuple(self.cfg.data.crop_scale), tuple(self.cfg.data.crop_ratio)
            )
        return x, y

    def _take_step(self, x: Tensor, y: Tensor) -> tuple[float, float, Tensor | None]:
        """One optimiser step; returns (loss before, accuracy before, logits) or raises :class:`Diverged`."""
        self.model.train()
        outcome = self.stepper.step(x, y)
        self._report_warnings(outcome.caught)
        loss = finite_loss(outcome.loss.detach())
        acc = float((outcome.logits.detach().argmax(1) == y).double().mean())
        return loss, acc, outcome.logits

    def _report_warnings(self, caught: list[warnings.WarningMessage]) -> None:
        """Count Gram fall-backs (inexact GN solves) in meta.json; show the first one, pass others on."""
        for w in caught:
            if issubclass(w.category, GramFallbackWarning):
                count = self.meta.get("gram_fallback_steps", 0)
                if count == 0:
                    _write(
                        f"warning: {w.message} (further fall-backs are counted in meta.json: "
                        "gram_fallback_steps)"
                    )
                self.meta["gram_fallback_steps"] = count + 1
                break
        for w in caught:
            if not issubclass(w.category, GramFallbackWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def run_epoch(self, epoch: int, guard: _InterruptGuard) -> None:
        pos = self.pos
        if pos.epoch != epoch:  # a fresh epoch (a resumed one keeps its saved order and accumulators)
            n = len(self.data.train)
            shuffle = self.cfg.train.shuffle and self.steps_per_epoch > 1
            perm = torch.randperm(n, generator=self.data_gen) if shuffle else torch.arange(n)
            pos.epoch, pos.steps_done, pos.perm = epoch, 0, perm
            pos.change_sum, pos.change_count, pos.epoch_time = 0.0, 0, 0.0
        loss_name, k = self.cfg.train.loss, self.model.num_classes
        for step in range(pos.steps_done, self.steps_per_epoch):
            with guard.step():
                x, y = self._batch(pos.perm, step)
                _sync(self.device)
                start = time.perf_counter()
                try:
                    loss, acc, _ = self._take_step(x, y)
                except Diverged as exc:
                    raise Diverged(f"epoch {epoch}, step {step + 1}: {exc}") from None
                _sync(self.device)
                step_time = time.perf_counter() - start
                after = change = None
                if self.cfg.train.loss_after:
                    with torch.no_grad():
                        logits = self.model(x)
                        after = float(
                            loss_value(logits, as_target_rows(y, k, y.shape[0], logits, loss_name), loss_name)
                        )
                    if not math.isfinite(after):
                        raise Diverged(
                            f"epoch {epoch}, step {step + 1}: the batch loss after the step is {after}"
                        )
                    change = 100.0 * (after - loss) / loss if loss != 0 else None
                pos.global_step += 1
                pos.steps_done = step + 1
                pos.epoch_time += step_time
                if change is not None:
                    pos.change_sum += change
                    pos.change_count += 1
                self.log.step(
                    dict(
                        epoch=epoch,
                        step=step + 1,
                        global_step=pos.global_step,
                        batch_size=int(y.shape[0]),
                        lr=float(self.optimizer.param_groups[0]["lr"]),
                        loss=loss,
                        accuracy=acc,
                        loss_after=after,
                        loss_change_pct=change,
                        step_time_s=step_time,
                    )
                )
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                    self.bar.update(1)

    def end_epoch(self, epoch: int) -> None:
        """Evaluate, log the epoch's row, run the callbacks, checkpoint when due."""
        cfg, pos = self.cfg, self.pos
        start = time.perf_counter()
        tr_loss, tr_acc = evaluate(
            self.model,
            self.data.train.images,
            self.data.train.labels,
            cfg.train.loss,
            cfg.train.eval_batch_size,
        )
        te_loss, te_acc = evaluate(
            self.model,
            self.data.test.images,
            self.data.test.labels,
            cfg.train.loss,
            cfg.train.eval_batch_size,
        )
        va_loss = va_acc = None
        if self.data.val is not None:
            va_loss, va_acc = evaluate(
                self.model,
                self.data.val.images,
                self.data.val.labels,
                cfg.train.loss,
                cfg.train.eval_batch_size,
            )
        eval_time = time.perf_counter() - start
        row = dict(
            epoch=epoch,
            train_loss=tr_loss,
            train_accuracy=tr_acc,
            test_loss=te_loss,
            test_accuracy=te_acc,
            epoch_time_s=pos.epoch_time if epoch > 0 else 0.0,
            wall_time_s=self.wall(),
            mean_loss_change_pct=pos.change_sum / pos.change_count if pos.change_count else None,
            eval_time_s=eval_time,
            global_step=pos.global_step,
            val_loss=va_loss,
            val_accuracy=va_acc,
        )
        self.log.epoch(row)
        if self.progress:
            _write(
                f"epoch {epoch:>4}/{cfg.train.epochs}  train loss {tr_loss:.4f} acc {tr_acc:.4f}  "
                f"test loss {te_loss:.4f} acc {te_acc:.4f}  ({row['epoch_time_s']:.1f} s)"
            )
        for cb in self.callbacks:
            hook = getattr(cb, "on_epoch_end", None)
            if hook is None:
                continue
            t0 = time.perf_counter()
            record = hook(epoch, self.model, self.optimizer)
            if record:  # None or {}: nothing to record this epoch
                if not isinstance(record, dict):
                    raise TypeError(
                        f"{type(cb).__name__}.on_epoch_end must return a dict or None, got "
                        f"{type(record).__name__}"
                    )
                self.log.diagnostic(
                    {"epoch": epoch, **record, "diagnostics_time_s": time.perf_counter() - t0}
                )
        pos.epochs_done = epoch
        pos.epoch, pos.steps_done, pos.perm = None, 0, None
        every = cfg.train.checkpoint_every
        due = epoch == 0 or epoch == cfg.train.epochs or (every > 0 and epoch % every == 0)
        if due:
            keep = epoch == 0 or cfg.train.keep_checkpoints
            self.checkpoint(weights_epoch=epoch if keep else None)
        self.update_meta()


def _write(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=_stderr())


def _config_callbacks(cfg: RunConfig, data: DataSplit, run_dir: Path) -> list[Any]:
    """Callbacks that the configuration itself asks for: ``[diagnostics] enabled = true``.

    For a run that starts from another run's weights (``model.init_from``) the initial model of a resumed run
    is read back from the run's own ``checkpoints/epoch_0000.pt`` (the configuration's seed does not give it,
    and the source may have moved).
    """
    if not cfg.diagnostics.enabled:
        return []
    callback = make_callback(cfg, data)
    if cfg.model.init_from:
        first = epoch_checkpoint(run_dir, 0)
        callback.init_model = lambda: load_model(first)[0]
    return [callback]


def _prepare_new(cfg: RunConfig, out_dir: str | os.PathLike | None) -> tuple[Path, RunLock]:
    """Create the run folder exclusively and lock it, before the (slow) data load."""
    run_dir = new_run_dir(cfg) if out_dir is None else Path(out_dir)
    return run_dir, create_run_dir(run_dir)


def _clear_run(run_dir: Path) -> None:
    """Remove the logs and checkpoints of a run that stopped before its first checkpoint (it restarts)."""
    for name in ("steps", "epochs"):
        for suffix in ("csv", "jsonl"):
            log_path(run_dir, name, suffix).unlink(missing_ok=True)
    (run_dir / DIAGNOSTICS_FILE).unlink(missing_ok=True)
    for folder in (run_dir / "tensorboard", checkpoint_dir(run_dir)):
        if folder.is_dir():
            shutil.rmtree(folder)


def _resume_config(
    run_dir: Path, overrides: Sequence[str] | dict[str, Any]
) -> tuple[RunConfig, dict[str, Any]]:
    """The run's own config with the (few) overrides that a resume may change."""
    cfg_path = config_path(run_dir)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing; {run_dir} is not an exactgn run folder")
    meta = read_meta(run_dir)
    items = overrides.items() if isinstance(overrides, dict) else [o.split("=", 1) for o in overrides]
    for key, _ in items:
        if key.strip() not in RESUMABLE_KEYS:
            raise ConfigError(
                f"--set {key.strip()}: cannot be changed when resuming (only "
                f"{', '.join(RESUMABLE_KEYS)}); start a new run instead"
            )
    return load_config(cfg_path, overrides), meta


@dataclass
class _Start:
    """Where a run starts: its config, folder, meta so far and (when resuming) the checkpoint payload."""

    cfg: RunConfig
    run_dir: Path
    meta: dict[str, Any]
    payload: dict[str, Any] | None
    lock: RunLock
    restarted: bool = False
    live: LiveRun | None = None

    def release(self) -> None:
        """End the run's hold on its folder and its share of the cores."""
        if self.live is not None:
            self.live.release()
        self.lock.release()


def _start_resume(run_dir: Path, overrides: Any) -> _Start:
    """Lock the folder, clean what a killed writer left, and load the checkpoint; a run stopped before its
    first checkpoint restarts from the beginning."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    lock = RunLock(run_dir).acquire()
    try:
        cfg, meta = _resume_config(run_dir, overrides)
        clean_temporaries(run_dir)
        if not last_checkpoint(run_dir).is_file():
            _write(f"{run_dir} stopped before its first checkpoint: restarting it from the beginning")
            _clear_run(run_dir)
            return _Start(cfg, run_dir, {}, None, lock, restarted=True)
        payload = load_checkpoint(last_checkpoint(run_dir))
        _check_resumable(cfg, meta, payload, run_dir)
    except BaseException:
        lock.release()
        raise
    return _Start(cfg, run_dir, meta, payload, lock)


def _start(cfg: RunConfig | None, out_dir: Any, resume: Any, overrides: Any) -> _Start:
    if resume is not None:
        if cfg is not None or out_dir is not None:
            raise ValueError("train(): pass either a config (and out_dir) or resume=RUN_DIR, not both")
        return _start_resume(Path(resume), overrides)
    if cfg is None:
        raise ValueError("train(): a config is needed unless resume=RUN_DIR is given")
    if overrides:
        cfg = with_overrides(cfg, overrides)
    if cfg.model.init_from:  # record the absolute checkpoint path, so that config.toml reruns from anywhere
        cfg = replace_key(cfg, "model.init_from", str(resolve_init_from(cfg.model.init_from)))
    run_dir, lock = _prepare_new(cfg, out_dir)
    return _Start(cfg, run_dir, {}, None, lock)


def _load_data(cfg: RunConfig, device: torch.device) -> DataSplit:
    d = cfg.data
    data = load_dataset(
        d.dataset,
        d.root or None,
        train_size=d.train_size,
        test_size=d.test_size,
        subset=d.subset,
        subset_seed=d.subset_seed,
        val_size=d.val_size,
        val_seed=d.val_seed,
        download=d.download,
        dtype=dtype_from_name(cfg.model.dtype),
    )
    val = data.val.to(device) if data.val is not None else None
    return DataSplit(data.name, data.train.to(device), data.test.to(device), data.classes, data.source, val)


def _new_meta(cfg: RunConfig, device: torch.device, data: DataSplit, batch: int) -> dict[str, Any]:
    return {
        **provenance(device),
        "start_time": utc_now(),
        "end_time": None,
        "status": "running",
        "epochs_done": 0,
        "global_step": 0,
        "epochs": cfg.train.epochs,
        "name": cfg.name,
        "optimiser": cfg.optim.name,
        "dataset": cfg.data.dataset,
        "data_source": data.source,
        "train_size": len(data.train),
        "test_size": len(data.test),
        "batch_size": batch,
        "val_size": len(data.val) if data.val is not None else 0,
        "steps_per_epoch": None,
        "message": None,
        "resumed": [],
    }


def _open_logs(start: _Start, device: torch.device, data: DataSplit, batch: int) -> RunLog:
    """Write ``config.toml`` and the first ``meta.json`` (or trim the logs of a resumed run); open the
    logs."""
    cfg, run_dir, meta = start.cfg, start.run_dir, start.meta
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir(run_dir).mkdir(exist_ok=True)
    header = (
        f"Resolved configuration of this run (exactgn {__version__}). Every key is listed; rerun with:\n"
        f"  exactgn train {config_path(run_dir)} --out NEW_DIR"
    )
    write_config(cfg, config_path(run_dir), header)  # on resume: train.epochs etc. may have changed
    if start.payload is None:
        meta.update(_new_meta(cfg, device, data, batch))
        if start.restarted:
            meta["resumed"] = [{"time": utc_now(), "from_global_step": 0}]
        return RunLog(run_dir)
    step = start.payload["global_step"]
    truncate_logs(run_dir, step, start.payload["epoch"])
    meta.update(status="running", end_time=None, message=None, epochs=cfg.train.epochs, device=str(device))
    meta.setdefault("resumed", []).append({"time": utc_now(), "from_global_step": step})
    return RunLog(run_dir, purge_step=step + 1)


def _seed_everything(seed: int) -> None:
    """The model draws its own seed from ``cfg.seed``; these cover GN noise, augmentation and callbacks."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _set_threads(cfg: RunConfig, meta: dict[str, Any], resuming: bool, run_dir: Path) -> LiveRun:
    """``train.threads``, bounded by the machine; ``0`` (auto) shares the cores with the other exactgn runs
    live on this host (:mod:`exactgn.lab.cores`). On resume, a warning when the count differs from the run's
    (the float sums are then split differently, so the weights are no longer bit-identical). Returns this
    run's record among the live runs."""
    threads = cfg.train.threads
    cores = available_cores()
    if threads > cores:
        raise ConfigError(
            f"train.threads = {threads} exceeds the {cores} cores available to this process; use at most "
            f"{cores}, or 0 to share them with the other exactgn runs on this host"
        )
    if threads:
        torch.set_num_threads(threads)
    else:
        _share_cores(cores)
    before, now = meta.get("threads"), torch.get_num_threads()
    if resuming and isinstance(before, int) and before != now:
        _write(
            f"warning: this run used {before} torch threads and resumes with {now} (train.threads); its "
            "weights will not be bit-identical to an uninterrupted run's (resume with "
            f"--set train.threads={before} to keep that)"
        )
    meta["threads"] = now
    return LiveRun.register(now, run_dir)


def _share_cores(cores: int) -> None:
    """``train.threads = 0``: torch's default alone, an equal share of the cores beside other live runs."""
    others = live_runs()
    if not others:
        return
    threads = auto_threads(cores, others)
    torch.set_num_threads(threads)
    listed = ", ".join(f"PID {o.get('pid')} ({o.get('threads')} threads)" for o in others[:4])
    _write(
        f"threads: {threads} of {cores} cores (train.threads = 0 shares them): {len(others)} other exactgn "
        f"run{'s' if len(others) > 1 else ''} live on this host: {listed}. Runs started earlier keep their "
        "threads; set train.threads in each run to split the cores evenly"
    )


_OPTIMISER_STATES = {"gn": 1, "adam": 2, "adamw": 2, "sgd": 1}  # tensors of θ's size each keeps


def estimate_memory(cfg: RunConfig, features: int, classes: int, batch: int) -> dict[str, int]:
    """Bytes a run needs beyond its data, by part: ``parameters`` (with the fixed bottlenecks and readout),
    ``gradients``, ``optimiser`` state, ``activations`` (the per-half-layer records of one batch) and, for GN,
    ``grams`` (the ``(Bk)²`` NTK Gram of ``pinv``, or a ``B × B`` Gram per half-layer for ``right``)."""
    m, size = cfg.model, dtype_from_name(cfg.model.dtype).itemsize
    half = features // 2
    width = m.hidden if m.bottleneck else half
    trainable = 2 * m.blocks * (half * width + (half if m.bias else 0))
    fixed = 2 * m.blocks * half * m.hidden * int(m.bottleneck) + features * classes
    parts = {
        "parameters": (trainable + fixed) * size,
        "gradients": trainable * size,
        "optimiser": _OPTIMISER_STATES.get(cfg.optim.name, 2) * trainable * size,
        "activations": 2 * m.blocks * batch * (width + half) * size,
        "grams": 0,
    }
    if cfg.optim.name == "gn":
        rows = batch * classes if cfg.optim.gn.inverse == "pinv" else batch
        parts["grams"] = rows * rows * 8  # the solves may run in float64
    return parts


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (the GPU's free memory, or the host's ``MemAvailable``); ``None``: unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(cfg: RunConfig, data: DataSplit, batch: int, device: torch.device) -> None:
    """Refuse, with the numbers, a model that cannot fit, before anything of its size is allocated."""
    parts = estimate_memory(cfg, data.features, data.num_classes, batch)
    need, free = sum(parts.values()), available_memory(device)
    if free is None or need <= free:
        return
    gib = 2.0**30
    detail = ", ".join(f"{k} {v / gib:.3g}" for k, v in parts.items() if v)
    raise ConfigError(
        f"this run needs about {need / gib:.3g} GiB ({detail} GiB) but {free / gib:.3g} GiB are free on "
        f"{device}; make model.hidden ({cfg.model.hidden}), model.blocks ({cfg.model.blocks}) or "
        f"train.batch_size ({batch}) smaller"
    )


def _build_run(start: _Start, callbacks: Sequence[EpochCallback], progress: bool) -> _Run:
    cfg, payload = start.cfg, start.payload
    start.live = _set_threads(cfg, start.meta, payload is not None, start.run_dir)
    device = resolve_device(cfg.train.device)
    data = _load_data(cfg, device)
    batch = len(data.train) if cfg.train.batch_size == 0 else min(cfg.train.batch_size, len(data.train))
    _check_memory(cfg, data, batch, device)
    model = build_model(cfg, data.features, data.num_classes)
    if cfg.model.init_from and payload is None:
        start.meta["init_from"] = load_init_weights(model, cfg.model.init_from)
    model = model.to(device)
    check_gn_batch(cfg, model, batch)
    stepper = build_stepper(cfg, model)
    all_callbacks = list(callbacks) + _config_callbacks(cfg, data, start.run_dir)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    if payload is None:
        _seed_everything(cfg.seed)
    log = _open_logs(start, device, data, batch)
    run = _Run(
        cfg, start.run_dir, data, model, stepper, device, data_gen, log, start.meta, all_callbacks, progress
    )
    if payload is not None:
        run.restore(payload)
        run.resumed = True
    start.meta["steps_per_epoch"] = run.steps_per_epoch
    run.update_meta()
    return run


def _loop(run: _Run, guard: _InterruptGuard, progress: bool, epoch_lines: bool) -> None:
    from tqdm import tqdm  # noqa: PLC0415 - imported when a run starts, not with the module

    cfg = run.cfg
    total = cfg.train.epochs * run.steps_per_epoch
    run.bar = tqdm(
        total=total,
        initial=min(run.pos.global_step, total),
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        file=_stderr(),
        desc=f"{cfg.name}/{cfg.optim.name}",
        leave=epoch_lines,
    )
    if run.resumed and progress:
        epoch = run.pos.epoch if run.pos.epoch is not None else run.pos.epochs_done + 1
        _write(f"resuming at epoch {min(epoch, cfg.train.epochs)}, step {run.pos.global_step} of {total}")
    try:
        if run.pos.epochs_done < 0:
            run.end_epoch(0)
        for epoch in range(run.pos.epochs_done + 1, cfg.train.epochs + 1):
            run.bar.set_description(
                f"{cfg.name}/{cfg.optim.name} epoch {epoch}/{cfg.train.epochs}", refresh=False
            )
            run.run_epoch(epoch, guard)
            run.end_epoch(epoch)
    finally:
        run.bar.close()


def _stop_diverged(run: _Run, exc: Diverged) -> None:
    msg = (
        f"run diverged ({exc}); training stopped. The last good checkpoint (epoch "
        f"{max(run.pos.epochs_done, 0)}) is kept in {checkpoint_dir(run.run_dir)}. Try a smaller optim.lr, "
        "or truncation/damping for GN."
    )
    run.update_meta(status="diverged", end_time=utc_now(), message=msg)
    _write(f"exactgn: {msg}")


def _stop_interrupted(run: _Run, guard: _InterruptGuard) -> TrainingInterrupted:
    saved = False
    if not guard.torn:
        try:
            run.checkpoint()
            saved = True
        except KeyboardInterrupt:
            pass
    interrupted = TrainingInterrupted(run.run_dir, saved, max(run.pos.epochs_done, 0), run.pos.global_step)
    run.update_meta(status="interrupted", end_time=utc_now(), message=str(interrupted))
    return interrupted


def train(
    cfg: RunConfig | None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: str | os.PathLike | None = None,
    overrides: Sequence[str] | dict[str, Any] = (),
    callbacks: Sequence[EpochCallback] = (),
    progress: bool = True,
    epoch_lines: bool = True,
) -> Path:
    """Train as ``cfg`` says, into ``out_dir`` (default ``runs/<name>-<optimiser>-<time>``); returns the run
    folder.

    ``resume``: continue the run in that folder from its last checkpoint instead (``cfg`` must be ``None``;
    ``overrides`` may change only :data:`RESUMABLE_KEYS`, e.g. ``train.epochs`` to train longer).
    ``callbacks``: objects with ``on_epoch_end(epoch, model, optimizer) -> dict | None``.
    ``progress``: show a progress bar on stderr, and (with ``epoch_lines``) one line per epoch.

    The final status is in ``meta.json`` (``finished`` or ``diverged``); Ctrl-C raises
    :class:`TrainingInterrupted`.
    """
    start = _start(cfg, out_dir, resume, overrides)
    try:
        run = _build_run(start, callbacks, progress and epoch_lines)
    except BaseException:
        start.release()
        with contextlib.suppress(OSError):
            start.run_dir.rmdir()  # a new folder that nothing was written to
        raise
    start.payload = None  # the restored run holds what it needs; free the checkpoint's tensors
    guard = _InterruptGuard()
    guard.install()
    try:
        _loop(run, guard, progress, epoch_lines)
        run.update_meta(status="finished", end_time=utc_now())
    except Diverged as exc:
        _stop_diverged(run, exc)
    except KeyboardInterrupt:
        raise _stop_interrupted(run, guard) from None
    except BaseException as exc:
        with contextlib.suppress(OSError):  # meta.json itself may not fit on a full disk
            run.update_meta(status="failed", end_time=utc_now(), message=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(
                exc.errno,
                f"{exc.strerror}; the last complete checkpoint is kept: free some space, then resume with: "
                f"exactgn train --resume {run.run_dir}",
            ) from exc
        raise
    finally:
        guard.uninstall()
        run.log.close()
        start.release()
    return run.run_dir


def _check_resumable(cfg: RunConfig, meta: dict[str, Any], payload: dict[str, Any], run_dir: Path) -> None:
    status = meta.get("status")
    if status == "diverged":
        raise ValueError(
            f"{run_dir} diverged; resuming would repeat the same steps. Start a new run with a smaller "
            "learning rate (exactgn train CONFIG --set optim.lr=...)"
        )
    if status == "finished" and payload["epoch"] >= cfg.train.epochs:
        raise ValueError(
            f"{run_dir} already finished all {cfg.train.epochs} epochs; to train longer, resume with "
            f"--set train.epochs=N (N > {cfg.train.epochs})"
        )
    saved = to_dict(from_dict(payload["config"]))  # defaults filled in: keys added since the run started
    now = to_dict(cfg)
    for key in flatten(now):
        if key in RESUMABLE_KEYS:
            continue
        if _lookup(saved, key) != _lookup(now, key):
            raise ValueError(
                f"{config_path(run_dir)}: {key} is {_lookup(now, key)!r} but the checkpoint was made with "
                f"{_lookup(saved, key)!r}; a resumed run must keep its configuration"
            )
    if payload["epoch"] > cfg.train.epochs:
        raise ValueError(
            f"train.epochs = {cfg.train.epochs} is below the {payload['epoch']} epochs already done"
        )


def _lookup(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d
