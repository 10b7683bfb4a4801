"""One training loop for Gauss–Newton, Adam and SGD, full-batch and mini-batch, on any device.

:func:`train` runs a :class:`~exactgn.config.RunConfig` into a run folder (``docs/run-folder.md``): per-step and
per-epoch logs, checkpoints every ``train.checkpoint_every`` epochs, at the end and on Ctrl-C, and
``--resume``. On the CPU a resumed run ends with bit-identical weights to an uninterrupted one.

Stopping:

* Ctrl-C: the step in progress is finished, a checkpoint of the exact position (mid-epoch included) is written,
  ``meta.json`` says ``interrupted``, and :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is raised.
  A second Ctrl-C during a step aborts at once without writing (the last checkpoint stays valid).
* A non-finite loss or parameter (or :class:`~exactgn.NonFiniteError` from the GN step) stops the run with
  status ``diverged``; its last good checkpoint is kept and :func:`train` returns normally.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import math
import os
import platform
import random
import signal
import socket
import subprocess
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

from . import __version__
from .checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint, save_weights
from .config import (ConfigError, RunConfig, apply_overrides, flatten, from_dict, load_config, to_dict, toml_value,
                     write_config)
from .data import DataSplit, load_dataset, random_resized_crop
from .errors import NonFiniteError
from .linalg import GramFallbackWarning
from .losses import as_target_rows, loss_value
from .model import RevMLP
from .optim import GaussNewton
from .runlog import RunLog, file_sha256, read_meta, truncate_logs, write_meta

__all__ = [
    "EpochCallback",
    "TrainingInterrupted",
    "train",
    "build_model",
    "build_optimizer",
    "resolve_init_from",
    "load_init_weights",
    "resolve_device",
    "evaluate",
    "new_run_dir",
    "RESUMABLE_KEYS",
    "add_parser",
]

# Keys that may change when a run is resumed; anything else would make the continuation a different run.
RESUMABLE_KEYS = (
    "train.epochs", "train.checkpoint_every", "train.keep_checkpoints", "train.device", "train.threads",
    "train.eval_batch_size", "data.root", "data.download",
)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class EpochCallback(Protocol):
    """Called after every epoch (epoch 0 = before training) once the epoch's row is logged.

    A returned dict is appended to ``diagnostics.jsonl`` together with ``epoch`` and ``diagnostics_time_s``.
    """

    def on_epoch_end(self, epoch: int, model: RevMLP, optimizer: torch.optim.Optimizer) -> dict | None: ...


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C. ``run_dir``: the run folder; ``saved``: whether a checkpoint of the exact
    position was written (otherwise the previous checkpoint, at epoch ``epochs_done``, is the resume point)."""

    def __init__(self, run_dir: Path, saved: bool, epochs_done: int, global_step: int) -> None:
        where = "a checkpoint of this position was saved" if saved else f"the checkpoint of epoch {epochs_done} is kept"
        super().__init__(f"training interrupted at step {global_step}; {where}; resume with: exactgn train --resume {run_dir}")
        self.run_dir, self.saved, self.epochs_done, self.global_step = run_dir, saved, epochs_done, global_step


class _Diverged(Exception):
    pass


# ---------------------------------------------------------------------------- building blocks
def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a clear error for an unavailable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} was asked for, but torch sees no CUDA device; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device: {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: 'mps' was asked for, but it is not available; use cpu or auto")
    return device


def build_model(cfg: RunConfig, features: int, num_classes: int) -> RevMLP:
    """The RevMLP of ``cfg.model`` for inputs of ``features`` and ``num_classes`` outputs, on the CPU."""
    m = cfg.model
    return RevMLP(
        features, num_classes, m.blocks, m.hidden if m.bottleneck else None, bias=m.bias, init_std=m.init_std,
        seed=cfg.seed, dtype=_DTYPES[m.dtype],
    )


# Architecture keys of RevMLP.config() that must agree for weights to be loaded, and the config keys that set them.
_ARCH_KEYS = {
    "in_features": "the dataset (data.dataset: d = 784 for MNIST, 3072 for CIFAR-10)",
    "num_classes": "the dataset (data.dataset)",
    "num_blocks": "model.blocks",
    "hidden": "model.hidden / model.bottleneck",
    "bias": "model.bias",
}


def resolve_init_from(path: str | os.PathLike) -> Path:
    """The checkpoint file that ``model.init_from = path`` names: the file itself, or a run folder's
    ``checkpoints/last.pt``; absolute. A clear error when there is none."""
    given = Path(path).expanduser()
    resolved = given.resolve()
    if resolved.is_dir():
        for candidate in (resolved / "checkpoints" / "last.pt", resolved / "last.pt"):
            if candidate.is_file():
                return candidate
        raise ConfigError(
            f"model.init_from: {given} is a folder without checkpoints/last.pt; give a run folder whose run has "
            "started, or a checkpoint file (RUN/checkpoints/last.pt or RUN/checkpoints/epoch_NNNN.pt)")
    if not resolved.is_file():
        raise ConfigError(
            f"model.init_from: {given} does not exist (resolved to {resolved}); give a checkpoint file "
            "(RUN/checkpoints/last.pt or RUN/checkpoints/epoch_NNNN.pt) or a run folder")
    return resolved


def load_init_weights(model: RevMLP, path: str | os.PathLike) -> dict[str, Any]:
    """Load the weights (and the fixed bottlenecks and readout) of an earlier run's checkpoint into ``model``.

    ``path``: a checkpoint (``checkpoints/last.pt`` or ``checkpoints/epoch_NNNN.pt``) or a run folder. The
    checkpoint's architecture (``d``, ``k``, ``L``, ``h``, bias) must be ``model``'s; its dtype may differ (values
    are cast). Only the model is loaded: no optimiser state, no RNG state. Returns the provenance recorded in
    ``meta.json`` as ``init_from``: ``path``, ``sha256``, ``epoch``, ``global_step``, ``optimiser``, ``run`` (the
    source run folder), ``run_name`` and ``dtype``. Raises :class:`ConfigError` naming what is wrong.
    """
    file = resolve_init_from(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise ConfigError(f"model.init_from: cannot read {file} as a checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict) or not isinstance(payload.get("model_config"), dict):
        raise ConfigError(f"model.init_from: {file} is not an exactgn checkpoint (it needs 'model' and 'model_config'; "
                          "use RUN/checkpoints/last.pt or RUN/checkpoints/epoch_NNNN.pt)")
    theirs, ours = payload["model_config"], model.config()
    differ = [(key, theirs.get(key), ours[key]) for key in _ARCH_KEYS if theirs.get(key) != ours[key]]
    if differ:
        detail = "; ".join(f"{key}: checkpoint {a!r}, this config {b!r} (set by {_ARCH_KEYS[key]})" for key, a, b in differ)
        raise ConfigError(f"model.init_from: the architecture of {file} does not match this run's model: {detail}. "
                          "Make the config's model (and dataset) match the checkpoint's, or start from another checkpoint")
    state = payload["model"]
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise ConfigError(f"model.init_from: the tensors in {file} do not fit this run's model (names or shapes differ)")
    with torch.no_grad():
        model.load_state_dict({k: v.to(dtype=expected[k].dtype) for k, v in state.items()})
    run = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    source_cfg = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    epoch = payload.get("epoch")
    return {
        "path": str(file),
        "sha256": file_sha256(file),
        "epoch": int(epoch) if isinstance(epoch, int) else None,
        "global_step": payload.get("global_step"),
        "optimiser": payload.get("optimizer_name") or (source_cfg.get("optim", {}) or {}).get("name"),
        "run": str(run),
        "run_name": source_cfg.get("name"),
        "dtype": str(next(iter(state.values())).dtype).removeprefix("torch.") if state else None,
    }


def build_optimizer(cfg: RunConfig, model: RevMLP) -> torch.optim.Optimizer:
    """``GaussNewton``, ``torch.optim.Adam`` or ``torch.optim.SGD`` as ``cfg.optim`` says."""
    o = cfg.optim
    if o.name == "gn":
        g = o.gn
        return GaussNewton(
            model, lr=o.lr, loss=cfg.train.loss, hessian=g.hessian, inverse=g.inverse, rtol=g.rtol, atol=g.atol,
            damping=g.damping, least_squares=g.least_squares, weight_decay=o.weight_decay, noise=g.noise,
            solve_dtype=None if g.solve_dtype == "model" else g.solve_dtype,
        )
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, betas=tuple(o.adam.betas), eps=o.adam.eps,
                                weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.sgd.momentum, nesterov=o.sgd.nesterov,
                           weight_decay=o.weight_decay)


def _check_gn_sizes(cfg: RunConfig, model: RevMLP, batch: int) -> None:
    """Refuse up front, naming the config keys, a GN step that the engine would refuse at the first step."""
    g = cfg.optim.gn
    if cfg.optim.name != "gn" or g.least_squares or g.rtol or g.atol or g.damping:
        return
    if g.inverse == "right" and batch > model.max_exact_batch:
        raise ConfigError(
            f"optim.gn: batches of {batch} exceed {model.max_exact_batch}, the largest batch for which the right-inverse "
            f"step is exact with this model (the identity first block has rank <= d/2+1, each ReLU half-layer <= "
            f"h+1). Set optim.gn.least_squares = true (pseudo-inverse step), turn on truncation "
            f"(optim.gn.rtol/atol) or damping, or use train.batch_size <= {model.max_exact_batch}"
        )
    params = sum(p.numel() for p in model.parameters())
    if g.inverse == "pinv" and batch * model.num_classes > params:
        raise ConfigError(
            f"optim.gn: batches of {batch} give {batch * model.num_classes} Jacobian rows, more than the model's "
            f"{params} parameters, so J⁺ cannot be exact; set optim.gn.least_squares = true or use a smaller batch"
        )


@torch.no_grad()
def evaluate(model: RevMLP, images: Tensor, labels: Tensor, loss: str, batch_size: int) -> tuple[float, float]:
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
    """``runs/<name>-<optimiser>-<YYYYmmdd-HHMMSS>`` (with ``-2``, ``-3``… when taken)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = Path(base) / f"{cfg.name}-{cfg.optim.name}-{stamp}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _device_name(device: torch.device) -> str:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- Ctrl-C
class _InterruptGuard:
    """Defers Ctrl-C while a step is in flight so that a checkpoint never holds a half-applied step."""

    def __init__(self) -> None:
        self.pending = False
        self.critical = False
        self.torn = False  # a KeyboardInterrupt escaped from inside a step
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.critical and not self.pending:
            self.pending = True
            print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again aborts without saving)",
                  file=sys.stderr, flush=True)
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
            "epochs_done": self.epochs_done, "global_step": self.global_step, "epoch": self.epoch,
            "steps_done": self.steps_done, "perm": self.perm, "change_sum": self.change_sum,
            "change_count": self.change_count, "epoch_time": self.epoch_time,
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
    optimizer: torch.optim.Optimizer
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

    # -------------------------------------------------------------- sizes
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
            "model_config": self.model.config(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.cfg.optim.name,
            "rng": rng_states(self.data_gen),
            "position": self.pos.payload(),
            "epoch": self.pos.epochs_done,
            "global_step": self.pos.global_step,
            "wall_time_s": self.wall(),
            "config": to_dict(self.cfg),
        }
        save_checkpoint(self.run_dir / "checkpoints" / "last.pt", payload)
        if weights_epoch is not None:
            save_weights(self.run_dir / "checkpoints" / f"epoch_{weights_epoch:04d}.pt", self.model, weights_epoch)

    def restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        restore_rng_states(payload["rng"], self.data_gen)
        self.pos = _Position.from_payload(payload["position"])
        self.wall_offset = float(payload["wall_time_s"])
        self.segment_start = time.perf_counter()

    def update_meta(self, **changes: Any) -> None:
        self.meta.update(changes, epochs_done=max(self.pos.epochs_done, 0), global_step=self.pos.global_step,
                         wall_time_s=round(self.wall(), 3))
        write_meta(self.run_dir, self.meta)

    # -------------------------------------------------------------- one step
    def _batch(self, perm: Tensor, step: int) -> tuple[Tensor, Tensor]:
        idx = perm[step * self.batch : (step + 1) * self.batch].to(self.device)
        x, y = self.data.train.images[idx], self.data.train.labels[idx]
        if self.cfg.data.augment:
            x = random_resized_crop(x, self.data_gen, tuple(self.cfg.data.crop_scale), tuple(self.cfg.data.crop_ratio))
        return x, y

    def _take_step(self, x: Tensor, y: Tensor) -> tuple[float, float, Tensor | None]:
        """One optimiser step; returns (loss before, accuracy before, logits) or raises :class:`_Diverged`."""
        loss_name, k = self.cfg.train.loss, self.model.num_classes
        self.model.train()
        if isinstance(self.optimizer, GaussNewton):
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", GramFallbackWarning)
                    before = self.optimizer.step(x, y)
            except NonFiniteError as exc:
                raise _Diverged(str(exc)) from exc
            self._report_warnings(caught)
            logits = self.optimizer.last_result.logits
        else:
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.model(x)
            before = loss_value(logits, as_target_rows(y, k, y.shape[0], logits, loss_name), loss_name)
            if not torch.isfinite(before):
                raise _Diverged(f"the batch loss is {before.item()} before the step; the parameters were left unchanged")
            before.backward()
            self.optimizer.step()
            sums = torch.stack([p.detach().sum() for p in self.model.parameters()])
            if not torch.isfinite(sums).all():
                raise _Diverged("the step made some parameters non-finite")
        loss = float(before.detach())
        if not math.isfinite(loss):
            raise _Diverged(f"the batch loss is {loss}")
        acc = float((logits.detach().argmax(1) == y).double().mean())
        return loss, acc, logits

    def _report_warnings(self, caught: list[warnings.WarningMessage]) -> None:
        """Count Gram fall-backs (inexact GN solves) in meta.json; show the first one, pass others on."""
        for w in caught:
            if issubclass(w.category, GramFallbackWarning):
                count = self.meta.get("gram_fallback_steps", 0)
                if count == 0:
                    _write(f"warning: {w.message} (further fall-backs are counted in meta.json: gram_fallback_steps)")
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
                except _Diverged as exc:
                    raise _Diverged(f"epoch {epoch}, step {step + 1}: {exc}") from None
                _sync(self.device)
                step_time = time.perf_counter() - start
                after = change = None
                if self.cfg.train.loss_after:
                    with torch.no_grad():
                        logits = self.model(x)
                        after = float(loss_value(logits, as_target_rows(y, k, y.shape[0], logits, loss_name), loss_name))
                    if not math.isfinite(after):
                        raise _Diverged(f"epoch {epoch}, step {step + 1}: the batch loss after the step is {after}")
                    change = 100.0 * (after - loss) / loss if loss != 0 else None
                pos.global_step += 1
                pos.steps_done = step + 1
                pos.epoch_time += step_time
                if change is not None:
                    pos.change_sum += change
                    pos.change_count += 1
                self.log.step(dict(
                    epoch=epoch, step=step + 1, global_step=pos.global_step, batch_size=int(y.shape[0]),
                    lr=float(self.optimizer.param_groups[0]["lr"]), loss=loss, accuracy=acc, loss_after=after,
                    loss_change_pct=change, step_time_s=step_time,
                ))
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                    self.bar.update(1)

    def end_epoch(self, epoch: int) -> None:
        """Evaluate, log the epoch's row, run the callbacks, checkpoint when due."""
        cfg, pos = self.cfg, self.pos
        start = time.perf_counter()
        tr_loss, tr_acc = evaluate(self.model, self.data.train.images, self.data.train.labels, cfg.train.loss, cfg.train.eval_batch_size)
        te_loss, te_acc = evaluate(self.model, self.data.test.images, self.data.test.labels, cfg.train.loss, cfg.train.eval_batch_size)
        va_loss = va_acc = None
        if self.data.val is not None:
            va_loss, va_acc = evaluate(self.model, self.data.val.images, self.data.val.labels, cfg.train.loss,
                                       cfg.train.eval_batch_size)
        eval_time = time.perf_counter() - start
        row = dict(
            epoch=epoch, train_loss=tr_loss, train_accuracy=tr_acc, test_loss=te_loss, test_accuracy=te_acc,
            epoch_time_s=pos.epoch_time if epoch > 0 else 0.0, wall_time_s=self.wall(),
            mean_loss_change_pct=pos.change_sum / pos.change_count if pos.change_count else None,
            eval_time_s=eval_time, global_step=pos.global_step, val_loss=va_loss, val_accuracy=va_acc,
        )
        self.log.epoch(row)
        if self.progress:
            _write(f"epoch {epoch:>4}/{cfg.train.epochs}  train loss {tr_loss:.4f} acc {tr_acc:.4f}  "
                   f"test loss {te_loss:.4f} acc {te_acc:.4f}  ({row['epoch_time_s']:.1f} s)")
        for cb in self.callbacks:
            hook = getattr(cb, "on_epoch_end", None)
            if hook is None:
                continue
            t0 = time.perf_counter()
            record = hook(epoch, self.model, self.optimizer)
            if record:  # None or {}: nothing to record this epoch
                if not isinstance(record, dict):
                    raise TypeError(f"{type(cb).__name__}.on_epoch_end must return a dict or None, got {type(record).__name__}")
                self.log.diagnostic({"epoch": epoch, **record, "diagnostics_time_s": time.perf_counter() - t0})
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

    tqdm.write(text, file=sys.stderr)


def _config_callbacks(cfg: RunConfig, data: DataSplit, run_dir: Path) -> list[Any]:
    """Callbacks that the configuration itself asks for.

    ``[diagnostics] enabled = true`` asks ``exactgn.diagnostics.make_callback(cfg, data)`` for an
    :class:`EpochCallback` (the diagnostics module owns the ``[diagnostics]`` keys). For a run that starts from
    another run's weights (``model.init_from``) the initial model of a resumed run is read back from the run's own
    ``checkpoints/epoch_0000.pt`` (the configuration's seed does not give it, and the source may have moved).
    """
    if not cfg.diagnostics.enabled:
        return []
    try:
        from . import diagnostics
    except ImportError as exc:
        raise ConfigError(f"diagnostics.enabled: exactgn.diagnostics cannot be imported ({exc})") from exc
    factory = getattr(diagnostics, "make_callback", None)
    if factory is None:
        raise ConfigError("diagnostics.enabled: exactgn.diagnostics has no make_callback(cfg, data) in this version; "
                          "set diagnostics.enabled = false")
    callback = factory(cfg, data)
    if cfg.model.init_from and hasattr(callback, "init_model"):
        first = run_dir / "checkpoints" / "epoch_0000.pt"

        def init_model() -> RevMLP:
            from .diagnostics import load_checkpoint_model  # noqa: PLC0415

            return load_checkpoint_model(first)[0]

        callback.init_model = init_model
    return [callback]


def _prepare_new(cfg: RunConfig, out_dir: str | os.PathLike | None) -> Path:
    run_dir = new_run_dir(cfg) if out_dir is None else Path(out_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        hint = " (it holds a run: continue it with --resume)" if (run_dir / "meta.json").exists() else ""
        raise FileExistsError(f"{run_dir} already exists and is not empty{hint}; choose another --out")
    return run_dir


def _resume_config(run_dir: Path, overrides: Sequence[str] | dict[str, Any]) -> tuple[RunConfig, dict[str, Any]]:
    """The run's own config with the (few) overrides that a resume may change."""
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing; {run_dir} is not an exactgn run folder")
    meta = read_meta(run_dir)
    items = overrides.items() if isinstance(overrides, dict) else [o.split("=", 1) for o in overrides]
    for key, _ in items:
        if key.strip() not in RESUMABLE_KEYS:
            raise ConfigError(f"--set {key.strip()}: cannot be changed when resuming (only {', '.join(RESUMABLE_KEYS)}); "
                              "start a new run instead")
    return load_config(cfg_path, overrides), meta


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
    """Train as ``cfg`` says, into ``out_dir`` (default ``runs/<name>-<optimiser>-<time>``); returns the run folder.

    ``resume``: continue the run in that folder from its last checkpoint instead (``cfg`` must be ``None``;
    ``overrides`` may change only :data:`RESUMABLE_KEYS`, e.g. ``train.epochs`` to train longer).
    ``callbacks``: objects with ``on_epoch_end(epoch, model, optimizer) -> dict | None``.
    ``progress``: show a progress bar on stderr, and (with ``epoch_lines``) one line per epoch.

    The final status is in ``meta.json`` (``finished`` or ``diverged``); Ctrl-C raises :class:`TrainingInterrupted`.
    """
    if resume is not None:
        if cfg is not None or out_dir is not None:
            raise ValueError("train(): pass either a config (and out_dir) or resume=RUN_DIR, not both")
        run_dir = Path(resume)
        cfg, meta = _resume_config(run_dir, overrides)
        payload = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        _check_resumable(cfg, meta, payload, run_dir)
    else:
        if cfg is None:
            raise ValueError("train(): a config is needed unless resume=RUN_DIR is given")
        if overrides:
            cfg = from_dict(apply_overrides(to_dict(cfg), overrides))
        if cfg.model.init_from:  # record the absolute checkpoint path, so that config.toml reruns from anywhere
            init_file = resolve_init_from(cfg.model.init_from)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(init_file)))
        run_dir = _prepare_new(cfg, out_dir)
        meta, payload = {}, None

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    dtype = _DTYPES[cfg.model.dtype]
    data = load_dataset(
        cfg.data.dataset, cfg.data.root or None, train_size=cfg.data.train_size, test_size=cfg.data.test_size,
        subset=cfg.data.subset, subset_seed=cfg.data.subset_seed, val_size=cfg.data.val_size,
        val_seed=cfg.data.val_seed, download=cfg.data.download, dtype=dtype,
    )
    val = data.val.to(device) if data.val is not None else None
    data = DataSplit(data.name, data.train.to(device), data.test.to(device), data.classes, data.source, val)
    model = build_model(cfg, data.features, data.num_classes)
    init_source = load_init_weights(model, cfg.model.init_from) if cfg.model.init_from and payload is None else None
    model = model.to(device)
    batch = len(data.train) if cfg.train.batch_size == 0 else min(cfg.train.batch_size, len(data.train))
    _check_gn_sizes(cfg, model, batch)
    optimizer = build_optimizer(cfg, model)
    all_callbacks = list(callbacks) + _config_callbacks(cfg, data, run_dir)

    # Seeds: the model draws its own from cfg.seed; these cover GN noise, augmentation and user callbacks.
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    if payload is None:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    header = (f"Resolved configuration of this run (exactgn {__version__}). Every key is listed; rerun with:\n"
              f"  exactgn train {run_dir / 'config.toml'} --out NEW_DIR")
    if payload is None:
        meta = {
            "exactgn_version": __version__, "git_revision": _git_revision(), "torch_version": torch.__version__,
            "python_version": platform.python_version(), "device": str(device), "device_name": _device_name(device),
            "hostname": socket.gethostname(), "threads": torch.get_num_threads(), "start_time": _now(),
            "end_time": None, "status": "running", "epochs_done": 0, "global_step": 0, "epochs": cfg.train.epochs,
            "name": cfg.name, "optimiser": cfg.optim.name, "dataset": cfg.data.dataset, "data_source": data.source,
            "train_size": len(data.train), "test_size": len(data.test), "batch_size": batch,
            "val_size": len(data.val) if data.val is not None else 0,
            "steps_per_epoch": None, "message": None, "resumed": [],
        }
        if init_source is not None:
            meta["init_from"] = init_source
        write_config(cfg, run_dir / "config.toml", header)
        log = RunLog(run_dir)
    else:
        truncate_logs(run_dir, payload["global_step"], payload["epoch"])
        write_config(cfg, run_dir / "config.toml", header)  # a resume may have changed train.epochs etc.
        meta.update(status="running", end_time=None, message=None, epochs=cfg.train.epochs, device=str(device))
        meta.setdefault("resumed", []).append({"time": _now(), "from_global_step": payload["global_step"]})
        log = RunLog(run_dir, purge_step=payload["global_step"] + 1)

    run = _Run(cfg, run_dir, data, model, optimizer, device, data_gen, log, meta, all_callbacks, progress and epoch_lines)
    if payload is not None:
        run.restore(payload)
        del payload
    meta["steps_per_epoch"] = run.steps_per_epoch
    run.update_meta()

    guard = _InterruptGuard()
    guard.install()
    try:
        from tqdm import tqdm

        total = cfg.train.epochs * run.steps_per_epoch
        run.bar = tqdm(total=total, initial=min(run.pos.global_step, total), disable=not progress, unit="step",
                       dynamic_ncols=True, file=sys.stderr, desc=f"{cfg.name}/{cfg.optim.name}", leave=epoch_lines)
        try:
            if run.pos.epochs_done < 0:
                run.end_epoch(0)
            for epoch in range(run.pos.epochs_done + 1, cfg.train.epochs + 1):
                run.bar.set_description(f"{cfg.name}/{cfg.optim.name} epoch {epoch}/{cfg.train.epochs}", refresh=False)
                run.run_epoch(epoch, guard)
                run.end_epoch(epoch)
        finally:
            run.bar.close()
        run.update_meta(status="finished", end_time=_now())
    except _Diverged as exc:
        msg = (f"run diverged ({exc}); training stopped. The last good checkpoint (epoch {max(run.pos.epochs_done, 0)}) "
               f"is kept in {run_dir / 'checkpoints'}. Try a smaller optim.lr, or truncation/damping for GN.")
        run.update_meta(status="diverged", end_time=_now(), message=msg)
        print(f"exactgn: {msg}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        saved = False
        if not guard.torn:
            try:
                run.checkpoint()
                saved = True
            except KeyboardInterrupt:
                pass
        interrupted = TrainingInterrupted(run_dir, saved, max(run.pos.epochs_done, 0), run.pos.global_step)
        run.update_meta(status="interrupted", end_time=_now(), message=str(interrupted))
        raise interrupted from None
    except BaseException as exc:
        run.update_meta(status="failed", end_time=_now(), message=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        guard.uninstall()
        log.close()
    return run_dir


def _check_resumable(cfg: RunConfig, meta: dict[str, Any], payload: dict[str, Any], run_dir: Path) -> None:
    status = meta.get("status")
    if status == "diverged":
        raise ValueError(f"{run_dir} diverged; resuming would repeat the same steps. Start a new run with a smaller "
                         "learning rate (exactgn train CONFIG --set optim.lr=...)")
    if status == "finished" and payload["epoch"] >= cfg.train.epochs:
        raise ValueError(f"{run_dir} already finished all {cfg.train.epochs} epochs; to train longer, resume with "
                         f"--set train.epochs=N (N > {cfg.train.epochs})")
    saved = dict(payload["config"])
    now = to_dict(cfg)
    for key in flatten(now):
        if key in RESUMABLE_KEYS:
            continue
        if _lookup(saved, key) != _lookup(now, key):
            raise ValueError(f"{run_dir / 'config.toml'}: {key} is {_lookup(now, key)!r} but the checkpoint was made with "
                             f"{_lookup(saved, key)!r}; a resumed run must keep its configuration")
    if payload["epoch"] > cfg.train.epochs:
        raise ValueError(f"train.epochs = {cfg.train.epochs} is below the {payload['epoch']} epochs already done")


def _lookup(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


# ---------------------------------------------------------------------------- CLI
def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train``, ``compare`` and ``demo``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, e.g. optim.lr=0.5 or train.epochs=10); repeatable")
    p.add_argument("--data-root", metavar="DIR", help="folder holding MNIST/raw/ and cifar-10-batches-py/ "
                   "(default: data.root of the config, else $EXACTGN_DATA)")
    p.add_argument("--download", action="store_true", help="download missing MNIST/CIFAR-10 files (needs torchvision)")
    p.add_argument("--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps (default: train.device of the config)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def cli_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` plus the shortcuts ``--data-root``, ``--download``, ``--device`` as overrides."""
    extra = list(args.overrides)
    if args.data_root:
        extra.append(f"data.root={toml_value(str(Path(args.data_root).resolve()))}")
    if args.download:
        extra.append("data.download=true")
    if args.device:
        extra.append(f"train.device={args.device}")
    return extra


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, 79, break_on_hyphens=False)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .config import list_experiments, list_settings

    p = sub.add_parser(
        "train",
        help="train one run (GN, Adam or SGD) from a TOML config",
        description=_wrap(
            "Train one run as the TOML file CONFIG says, into a new folder runs/<name>-<optimiser>-<time>/ "
            "(or --out DIR): config.toml, meta.json, steps.csv/jsonl, epochs.csv/jsonl, checkpoints/ "
            "(see docs/run-folder.md). CONFIG is a path or a shipped experiment name such as mnist-fullbatch/gn. "
            "Ctrl-C saves a checkpoint; --resume RUN_DIR continues it."),
        epilog=_wrap("shipped experiments: SETTING/gn, SETTING/adam and SETTING/sgd for SETTING in "
                     + ", ".join(list_settings()) + f" ({len(list_experiments())} files)"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", metavar="CONFIG", help="TOML file or shipped experiment name")
    p.add_argument("--out", metavar="DIR", help="run folder to create (must not exist or be empty)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint "
                   f"(--set may then change only: {', '.join(RESUMABLE_KEYS)})")
    add_common_options(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    overrides = cli_overrides(args)
    if args.resume:
        if args.config or args.out:
            raise ValueError("give either CONFIG (with --out) or --resume RUN_DIR, not both")
        run_kwargs: dict[str, Any] = dict(resume=args.resume, overrides=overrides)
        cfg = None
    elif not args.config:
        raise ValueError("a CONFIG is needed (a TOML file or a shipped experiment such as mnist-small/gn), or --resume RUN_DIR")
    else:
        cfg = load_config(args.config, overrides)
        run_kwargs = dict(out_dir=args.out)
    try:
        run_dir = train(cfg, progress=not args.quiet, **run_kwargs)
    except TrainingInterrupted as exc:
        print(f"exactgn train: {exc}", file=sys.stderr)
        return 130
    meta = read_meta(run_dir)
    print(f"{meta['status']}: {run_dir} ({meta['epochs_done']} epochs, {meta['global_step']} steps, "
          f"{meta['wall_time_s']:.1f} s)")
    return 0 if meta["status"] == "finished" else 1
