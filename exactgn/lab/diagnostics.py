"""Why GN generalises poorly: NTK, CKA and weight-space diagnostics (DESIGN §5), usable from a notebook.

Kernel (NTK) on a fixed probe batch, computed exactly by :func:`exactgn.gn.ntk_gram`:

* :func:`kernel_alignment` — ``⟨Θ_0, Θ_t⟩_F / (‖Θ_0‖_F ‖Θ_t‖_F)``, 1 when the kernel has not moved (up to
scale).
* :func:`ntk_rate` — the rate of change between two consecutive records ``(1 − alignment(Θ_prev, Θ_t)) /
Δepochs``.
* :func:`ntk_probe_cosine` — the reference study's cheaper *estimate*: the cosine between ``Θ_0 w`` and ``Θ_t
w``
  for one fixed random probe vector ``w``.

Representations (block outputs on a fixed probe batch):

* :func:`linear_cka` — linear CKA, biased (centred HSIC) or unbiased (debiased HSIC of Song et al. 2012, as
used
  by Nguyen et al. 2021).
* :func:`block_outputs`, :func:`representation_cka` — every coupling block's output state, and CKA between two
  models block by block (a model against its initialisation, or optimiser against optimiser).

Weights: :func:`weight_rel_change`, :func:`weight_cosine`, :func:`weight_metrics` (weights ``W`` only, biases
excluded: they start at zero, so their relative change is undefined).

Per-mini-batch loss change: :func:`loss_change_summary` summarises a run's ``steps.csv`` per epoch.

Recording: :class:`DiagnosticsRecorder` (``on_epoch_end(epoch, model, optimizer) -> dict``) from a notebook or
any loop; :func:`make_callback` gives ``exactgn train`` its ``[diagnostics]`` callback (``enabled``,
``every``, ``probe_size``); :func:`diagnose_run` / ``exactgn diagnose RUN_DIR`` recompute the same records
afterwards from ``checkpoints/epoch_NNNN.pt``; :func:`runs_cka` compares two runs. The probe batch of a run is
:func:`probe_inputs` (its first training images). Metric names are listed in :data:`METRIC_DOC`.

Everything is computed in float64 by default (a float64 copy of a float32 model), against the model at epoch
0.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..gn import ntk_gram
from ..metrics import (
    METRIC_DOC,
    as_float64,
    block_increments,
    block_outputs,
    compare_weights,
    kernel_alignment,
    linear_cka,
    ntk_probe_cosine,
    ntk_rate,
    probe_vector,
    representation_cka,
    trainable_weights,
    weight_cosine,
    weight_metrics,
    weight_rel_change,
)
from ..model import RevMLP
from ..models import MLP, ResMLP
from ..precision import dtype_from_name
from . import data as datamod
from . import rundir
from .checkpoint import load_model
from .config import read_run_config
from .rundir import DIAGNOSTICS_FILE
from .steppers import build_model

__all__ = [
    "METRIC_DOC",
    "DIAGNOSTICS_FILE",
    "DEFAULT_PROBE_SIZE",
    "kernel_alignment",
    "ntk_rate",
    "ntk_probe_cosine",
    "probe_vector",
    "linear_cka",
    "block_outputs",
    "block_increments",
    "representation_cka",
    "weight_rel_change",
    "weight_cosine",
    "weight_metrics",
    "loss_change_summary",
    "read_steps_csv",
    "probe_inputs",
    "DiagnosticsRecorder",
    "TrainingDiagnostics",
    "make_callback",
    "load_checkpoint_model",
    "load_run_model",
    "runs_cka",
    "epoch_checkpoints",
    "diagnose_run",
    "read_diagnostics",
    "write_jsonl",
    "read_probe",
]

DEFAULT_PROBE_SIZE = 256  # the default of [diagnostics] probe_size

# ---------------------------------------------------------------------------- per-batch loss change
_QUANTILES = (0.05, 0.25, 0.75, 0.95)


def read_steps_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a run's ``steps.csv`` (:func:`exactgn.lab.rundir.read_rows`); an error names a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run folder has no per-step log (steps.csv)")
    return rundir.read_rows(path, required=("epoch", "loss_change_pct"))


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def loss_change_summary(steps: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Per-epoch summary of the per-mini-batch loss change ``100·(ℓ_after − ℓ_before)/ℓ_before``.

    ``steps``: a path to ``steps.csv`` or rows with ``epoch`` and ``loss_change_pct``. Returns one dict per
    epoch (ascending): ``epoch, count, mean, std, median, min, max, q05, q25, q75, q95``. Empty and non-finite
    values are skipped (``count`` says how many were used).
    """
    rows = read_steps_csv(steps) if isinstance(steps, (str, os.PathLike)) else steps
    by_epoch: dict[int, list[float]] = {}
    for row in rows:
        epoch = int(float(row["epoch"]))
        raw = row.get("loss_change_pct")
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            by_epoch.setdefault(epoch, []).append(value)
    out = []
    for epoch in sorted(by_epoch):
        vals = sorted(by_epoch[epoch])
        rec: dict[str, float] = {
            "epoch": epoch,
            "count": len(vals),
            "mean": statistics.fmean(vals),
            "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "median": statistics.median(vals),
            "min": vals[0],
            "max": vals[-1],
        }
        for q in _QUANTILES:
            rec[f"q{round(q * 100):02d}"] = _quantile(vals, q)
        out.append(rec)
    return out


# ---------------------------------------------------------------------------- recorder
#: The models the recorder reads (blocks: :func:`exactgn.metrics.block_outputs`).
MODELS = (RevMLP, MLP, ResMLP)


def _check_model(model: object, who: str) -> None:
    if not isinstance(model, MODELS):
        raise TypeError(f"{who} needs an exactgn RevMLP, MLP or ResMLP, got {type(model).__name__}")


def _first_tensor(model: torch.nn.Module) -> Tensor:
    """A floating tensor of ``model``: its dtype and device are the model's."""
    return next(t for t in model.state_dict().values() if t.is_floating_point())


def _flat(model: torch.nn.Module, x: Tensor) -> Tensor:
    """Inputs ``B × …`` as ``B × d`` in the model's dtype (a RevMLP's own checks included)."""
    if isinstance(model, RevMLP):
        return model.flatten_inputs(x)
    return x.reshape(x.shape[0], -1).to(_first_tensor(model))


class DiagnosticsRecorder:
    """Records NTK, CKA and weight diagnostics against the initial model on a fixed probe batch.

    Args:
        model_at_init: the :class:`RevMLP`, :class:`~exactgn.models.MLP` or :class:`~exactgn.models.ResMLP` at
            initialisation (only read, never kept; a snapshot is taken).
        probe_inputs: the fixed probe batch (``B × d`` or images); the NTK is ``Bk × Bk``, so keep ``B``
        modest
            (memory ``8(Bk)²`` bytes in float64: 128 samples and 10 classes take 13 MB).
        ntk, cka, weights: which groups of metrics to record.
        probe_seed: seed of the random vector ``w`` of ``ntk_probe_cosine``.
        every: record only at epochs that are multiples of ``every`` (other calls return ``{}``).
        init_epoch: the epoch of ``model_at_init`` (0, or the checkpoint's epoch).
        dtype: dtype in which the diagnostics are computed (default float64, so that ``1 − alignment`` is
            meaningful near 1); ``None`` computes in the model's own dtype and needs no extra model copy.

    ``on_epoch_end(epoch, model, optimizer)`` returns a flat ``dict[str, float]`` (names in
    :data:`METRIC_DOC`), including ``diagnostics_time_s``; ``optimizer`` is accepted for the training loop's
    callback signature and not used. The model is not modified and its mode/gradients are left alone.
    """

    def __init__(
        self,
        model_at_init: torch.nn.Module,
        probe_inputs: Tensor,
        *,
        ntk: bool = True,
        cka: bool = True,
        weights: bool = True,
        probe_seed: int = 0,
        every: int = 1,
        init_epoch: int = 0,
        dtype: torch.dtype | None = torch.float64,
    ) -> None:
        _check_model(model_at_init, "DiagnosticsRecorder")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.ntk, self.cka, self.weights = ntk, cka, weights
        self.every, self.probe_seed, self.dtype = every, probe_seed, dtype
        self._scratch: torch.nn.Module | None = None
        start = time.perf_counter()
        init = self._working_model(model_at_init)
        self.probe_inputs = _flat(init, probe_inputs).detach().clone()
        self.probe_size = self.probe_inputs.shape[0]
        if cka and self.probe_size < 4:
            raise ValueError(f"CKA needs a probe batch of at least 4 samples, got {self.probe_size}")
        self._k0 = ntk_gram(init, self.probe_inputs) if ntk else None
        self._w = probe_vector(self._k0.shape[0], probe_seed).to(self._k0.device) if ntk else None
        self._outs0 = block_outputs(init, self.probe_inputs) if cka else None
        self._increments = not isinstance(init, MLP)  # an MLP's layers change width
        self._deltas0 = block_increments(init, self.probe_inputs) if cka and self._increments else None
        self._weights0 = {k: v.clone() for k, v in trainable_weights(init).items()} if weights else None
        self._prev: tuple[int, Tensor] | None = (init_epoch, self._k0) if ntk else None
        self.init_epoch = init_epoch
        self.setup_time_s = time.perf_counter() - start

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, probe_inputs: Tensor, **kwargs: Any
    ) -> "DiagnosticsRecorder":
        """A recorder whose initial model is read from an epoch checkpoint (``checkpoints/epoch_NNNN.pt``)."""
        model, epoch = load_model(path)
        kwargs.setdefault("init_epoch", epoch)
        return cls(model, probe_inputs, **kwargs)

    def _working_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` itself, or a copy in :attr:`dtype` (one scratch model reused across calls)."""
        first = _first_tensor(model)
        if self.dtype is None or first.dtype == self.dtype:
            return model
        if (
            self._scratch is None
            or type(self._scratch) is not type(model)
            or self._scratch.config() != model.config()
            or _first_tensor(self._scratch).device != first.device
        ):
            self._scratch = copy.deepcopy(model).to(self.dtype)
        self._scratch.load_state_dict(model.state_dict())
        return self._scratch

    def forget_previous(self) -> None:
        """Drop the previous record's kernel, so that the next record has no ``ntk_rate`` (e.g. after a
        resume)."""
        self._prev = None

    def should_record(self, epoch: int) -> bool:
        """Whether :meth:`on_epoch_end` records at ``epoch`` (a multiple of ``every``)."""
        return epoch % self.every == 0

    @torch.no_grad()
    def compute(self, model: torch.nn.Module, epoch: int | None = None) -> dict[str, float]:
        """All enabled metrics of ``model`` against the initial model (no ``every`` check, no rate update)."""
        return self._record(model, epoch, update=False)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, model: torch.nn.Module, optimizer: object = None) -> dict[str, float]:
        """Metrics at the end of ``epoch`` (``{}`` unless ``epoch`` is a multiple of ``every``)."""
        if not self.should_record(epoch):
            return {}
        return self._record(model, epoch, update=True)

    def _record(self, model: torch.nn.Module, epoch: int | None, update: bool) -> dict[str, float]:
        _check_model(model, "diagnostics")
        start = time.perf_counter()
        work = self._working_model(model)
        out: dict[str, float] = {}
        if epoch is not None:
            out["epoch"] = epoch
        out["probe_size"] = self.probe_size
        probe = self.probe_inputs.to(_first_tensor(work).device)
        if self.ntk:
            kt = ntk_gram(work, probe)
            k0 = self._k0.to(kt.device)
            out["ntk_alignment"] = kernel_alignment(k0, kt)
            if self._prev is not None and epoch is not None and epoch > self._prev[0]:
                prev_epoch, k_prev = self._prev
                out["ntk_rate"] = ntk_rate(k_prev.to(kt.device), kt, epoch - prev_epoch)
            out["ntk_rel_change"] = float((as_float64(kt) - as_float64(k0)).norm() / as_float64(k0).norm())
            out["ntk_probe_cosine"] = ntk_probe_cosine(k0, kt, self._w)
            if update and epoch is not None:
                self._prev = (epoch, kt)
        if self.cka:
            outs = block_outputs(work, probe)
            for l, (x0, xt) in enumerate(zip(self._outs0, outs)):
                out[f"cka/block{l}"] = linear_cka(x0.to(xt.device), xt)
            for l, (x0, xt) in enumerate(zip(self._outs0, outs)):
                out[f"cka_unbiased/block{l}"] = linear_cka(x0.to(xt.device), xt, unbiased=True)
            deltas = block_increments(work, probe) if self._increments else []
            for l, (x0, xt) in enumerate(zip(self._deltas0 or [], deltas)):
                out[f"cka_delta/block{l}"] = linear_cka(x0.to(xt.device), xt)
        if self.weights:
            out.update(compare_weights(trainable_weights(work), self._weights0))
        out["diagnostics_time_s"] = time.perf_counter() - start
        return out


class TrainingDiagnostics:
    """The ``[diagnostics]`` callback of ``exactgn train`` (made by :func:`make_callback`).

    Wraps a :class:`DiagnosticsRecorder` created at the first call: at epoch 0 from the model as it is (the
    initialisation); on a resumed run from the initial model rebuilt from the configuration (initialisation is
    deterministic in ``seed``). The first record after a resume has no ``ntk_rate`` (the previous kernel is
    not kept across processes).
    """

    def __init__(
        self,
        probe_inputs: Tensor,
        *,
        every: int = 1,
        init_model: Callable[[], torch.nn.Module] | None = None,
        **recorder_kwargs: Any,
    ) -> None:
        self.probe_inputs = probe_inputs
        self.every = every
        self.init_model = init_model
        self.recorder_kwargs = recorder_kwargs
        self.recorder: DiagnosticsRecorder | None = None

    def on_epoch_end(self, epoch: int, model: torch.nn.Module, optimizer: object = None) -> dict[str, float]:
        if epoch % self.every != 0:
            return {}
        start = time.perf_counter()
        if self.recorder is None:
            if epoch == 0 or self.init_model is None:
                if epoch != 0:
                    raise RuntimeError(
                        "diagnostics started after epoch 0 without a way to rebuild the initial model"
                    )
                init = model
            else:
                init = self.init_model().to(_first_tensor(model).device)
            self.recorder = DiagnosticsRecorder(
                init, self.probe_inputs, every=self.every, **self.recorder_kwargs
            )
            if epoch != 0:
                self.recorder.forget_previous()  # resumed: no previous record in this process
        record = self.recorder.on_epoch_end(epoch, model, optimizer)
        record["diagnostics_time_s"] = time.perf_counter() - start
        return record


def make_callback(cfg: Any, data: Any) -> TrainingDiagnostics:
    """The training callback for ``[diagnostics] enabled = true`` (called by :func:`exactgn.lab.train.train`).

    ``cfg``: the :class:`~exactgn.lab.config.RunConfig`; ``data``: the loaded
    :class:`~exactgn.lab.data.DataSplit`. The probe batch is the first ``diagnostics.probe_size`` training
    images (all of them if fewer), the same images that
    :func:`probe_inputs` gives ``exactgn diagnose``; records every ``diagnostics.every`` epochs.
    """
    size = min(int(cfg.diagnostics.probe_size), len(data.train))
    probe = data.train.images[:size].reshape(size, -1)

    def init_model() -> torch.nn.Module:
        return build_model(cfg, data.features, data.num_classes)

    return TrainingDiagnostics(probe, every=int(cfg.diagnostics.every), init_model=init_model)


# ---------------------------------------------------------------------------- checkpoints and runs
def load_checkpoint_model(path: str | os.PathLike) -> tuple[torch.nn.Module, int]:
    """``(model, epoch)`` from a checkpoint file (:func:`exactgn.lab.checkpoint.load_model`)."""
    return load_model(path)


def epoch_checkpoints(run_dir: str | os.PathLike) -> dict[int, Path]:
    """Epoch → path of every ``checkpoints/epoch_NNNN.pt`` of a run; an error when the initial one is
    missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    found = rundir.epoch_checkpoints(run)
    if 0 not in found:
        raise FileNotFoundError(
            f"run folder {run} has no {rundir.epoch_checkpoint(run, 0)} (the initial model); diagnostics "
            "from checkpoints need the run's epoch checkpoints: train with train.keep_checkpoints = true"
        )
    return found


def probe_inputs(config: Any, size: int, *, root: str | os.PathLike | None = None) -> Tensor:
    """The fixed probe batch of a run: the first ``size`` images of its training set, flattened (``size ×
    d``).

    ``config``: a :class:`exactgn.lab.config.RunConfig` or its nested dict (a run's ``config.toml``). The
    training set is chosen exactly as training chooses it (``data.train_size``, ``data.subset``,
    ``data.subset_seed``, ``data.val_size``, ``data.val_seed``), without augmentation, and normalised with the
    reference statistics in the model's dtype (``model.dtype``), so the values are bit-identical to
    training's; if the training set has fewer than ``size`` images, all of them. The data root is ``root``,
    else ``data.root``, else ``$EXACTGN_DATA``. The training loop and ``exactgn diagnose`` both use this
    function, so they see the same probe.
    """
    section = config.get("data", {}) if isinstance(config, Mapping) else getattr(config, "data", None)
    get = (
        section.get if isinstance(section, Mapping) else (lambda key, default: getattr(section, key, default))
    )
    name = get("dataset", "mnist-small")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"probe size must be a positive integer, got {size!r}")
    raw = datamod.load_raw(name, root if root is not None else (get("root", "") or None))
    idx, _ = datamod.split_indices(
        raw.train.labels,
        get("train_size", 0),
        get("subset", "first"),
        get("subset_seed", 0),
        val_size=get("val_size", 0),
        val_seed=get("val_seed", 0),
    )
    size = min(size, len(idx))  # a training set smaller than the probe: all of it (as in training)
    model = config.get("model", {}) if isinstance(config, Mapping) else getattr(config, "model", None)
    dtype_name = (
        model.get("dtype", "float32") if isinstance(model, Mapping) else getattr(model, "dtype", "float32")
    )
    dtype = dtype_from_name(dtype_name)
    images = datamod.normalise(
        raw.train.images[idx[:size]], name, dtype
    )  # as training normalises, same dtype
    return images.reshape(size, -1)


_probe_inputs = probe_inputs  # diagnose_run's argument of the same name shadows it


def load_run_model(run_dir: str | os.PathLike, epoch: int | None = None) -> tuple[torch.nn.Module, int]:
    """``(model, epoch)`` of a run: ``checkpoints/epoch_NNNN.pt`` for ``epoch``, or the final model
    (``checkpoints/last.pt``) when ``epoch`` is ``None``."""
    return load_model(Path(run_dir), epoch)


def runs_cka(
    run_a: str | os.PathLike,
    run_b: str | os.PathLike,
    *,
    epoch: int | None = None,
    probe_inputs: Tensor | None = None,
    probe_size: int = DEFAULT_PROBE_SIZE,
    unbiased: bool = False,
    data_root: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Linear CKA of every block's output between two runs (e.g. optimiser against optimiser), ``{"block0":
    ...}``.

    Compares the models at ``epoch`` (default: each run's final model, ``checkpoints/last.pt``) on
    ``probe_inputs`` or the first ``probe_size`` training images of ``run_a``'s dataset. Both runs must use
    the same dataset.
    """
    ca, cb = read_run_config(run_a), read_run_config(run_b)
    da, db = ca.get("data", {}).get("dataset"), cb.get("data", {}).get("dataset")
    if da != db:
        raise ValueError(
            f"runs {run_a} and {run_b} use different datasets ({da} and {db}); CKA needs the same inputs"
        )
    if probe_inputs is None:
        probe_inputs = _probe_inputs(ca, probe_size, root=data_root)
    model_a, _ = load_run_model(run_a, epoch)
    model_b, _ = load_run_model(run_b, epoch)
    return representation_cka(model_a.double(), model_b.double(), probe_inputs.double(), unbiased=unbiased)


def _check_positive_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _run_probe_size(run: Path) -> Any:
    """The run's own ``diagnostics.probe_size`` (records then match those made during training)."""
    config = read_run_config(run) if rundir.config_path(run).is_file() else {}
    return config.get("diagnostics", {}).get("probe_size", DEFAULT_PROBE_SIZE)


def _diagnostics_target(run: Path, out: Any, overwrite: bool) -> Path | None:
    target = None if out is False else Path(out) if out is not None else rundir.diagnostics_path(run)
    if target is not None and target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass --overwrite (overwrite=True) to replace it, or --out FILE"
        )
    return target


def check_diagnosable(run: Path, ckpts: dict[int, Path], every: int) -> None:
    """Refuse a run whose kept checkpoints would give only the initial record (alignment 1, change 0), which a
    report would otherwise show as if the model never moved."""
    epochs = sorted(e for e in ckpts if e % every == 0)
    if len(epochs) < 2:
        kept = ", ".join(f"epoch_{e:04d}.pt" for e in epochs) or "none"
        raise ValueError(
            f"{run} keeps no epoch checkpoints after the initial one (kept: {kept}), so there is nothing "
            "to compare with the initial model; diagnose needs train.keep_checkpoints = true. Train again "
            "with --set train.keep_checkpoints=true, or record the diagnostics during training with "
            "--set diagnostics.enabled=true"
        )


def diagnose_run(
    run_dir: str | os.PathLike,
    *,
    probe_size: int | None = None,
    every: int = 1,
    probe_inputs: Tensor | None = None,
    data_root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    **recorder_kwargs: Any,
) -> list[dict[str, float]]:
    """Recompute the diagnostics of a run from its epoch checkpoints; returns the records (one per epoch).

    Uses ``checkpoints/epoch_0000.pt`` as the initial model and every checkpoint whose epoch is a multiple of
    ``every``. ``probe_size`` defaults to the run's ``diagnostics.probe_size`` (so the records match those
    made during training), else :data:`DEFAULT_PROBE_SIZE`. The probe batch is ``probe_inputs`` (capped at
    ``probe_size`` rows) or, by default, the first ``probe_size`` training images of the run's dataset
    (:func:`probe_inputs`, data root ``data_root``, else the run's ``data.root``, else ``$EXACTGN_DATA``).
    Writes the records as JSON lines to ``out`` (default ``RUN_DIR/diagnostics.jsonl``; an existing file is
    replaced only with ``overwrite=True``); ``out=False`` writes nothing.
    """
    run = Path(run_dir)
    ckpts = epoch_checkpoints(run)
    _check_positive_int("every", every, 1)
    check_diagnosable(run, ckpts, every)
    probe_size = _run_probe_size(run) if probe_size is None else probe_size
    _check_positive_int("probe_size", probe_size, 4)
    target = _diagnostics_target(run, out, overwrite)
    if probe_inputs is None:
        probe_inputs = _probe_inputs(read_run_config(run), probe_size, root=data_root)
    recorder = DiagnosticsRecorder.from_checkpoint(
        ckpts[0], probe_inputs[:probe_size], every=every, **recorder_kwargs
    )
    epochs: Iterable[int] = [e for e in ckpts if e % every == 0]
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        epochs = tqdm(epochs, desc=f"diagnose {run.name}", unit="ckpt")
    records = []
    for epoch in epochs:
        model, ck_epoch = load_model(ckpts[epoch])
        if ck_epoch != epoch:
            raise ValueError(f"{ckpts[epoch]} says epoch {ck_epoch}, but its name says epoch {epoch}")
        records.append(recorder.on_epoch_end(epoch, model, None))
    if target is not None:
        tmp = target.with_name(target.name + ".tmp")
        tmp.unlink(missing_ok=True)
        for rec in records:
            write_jsonl(tmp, rec)
        os.replace(tmp, target)
    return records


def read_probe(path: str | os.PathLike) -> Tensor:
    """A probe batch saved with ``torch.save`` (one tensor ``B × d``); a clear error for anything else."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"probe file {path} does not exist")
    probe = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(probe, Tensor):
        raise ValueError(f"probe file {path} must hold one tensor (B × d), got {type(probe).__name__}")
    return probe


def write_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record as a JSON line; non-finite floats become ``null`` (strict JSON)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(rundir.json_safe(dict(record)), allow_nan=False) + "\n")


def read_diagnostics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``diagnostics.jsonl`` (``null`` read back as ``nan``); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    records = rundir.read_jsonl(path)
    for number, rec in enumerate(records, 1):
        if "epoch" not in rec:
            raise ValueError(f"{path}, record {number}: a diagnostics record must be an object with 'epoch'")
    return [{k: (math.nan if v is None else v) for k, v in rec.items()} for rec in records]
