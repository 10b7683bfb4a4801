"""Why GN generalises poorly: NTK, CKA and weight-space diagnostics (DESIGN §5), usable from a notebook.

Kernel (NTK) on a fixed probe batch, computed exactly by :func:`exactgn.gn.ntk_gram`:

* :func:`kernel_alignment` — ``⟨Θ_0, Θ_t⟩_F / (‖Θ_0‖_F ‖Θ_t‖_F)``, 1 when the kernel has not moved (up to scale).
* :func:`ntk_rate` — the rate of change between two consecutive records ``(1 − alignment(Θ_prev, Θ_t)) / Δepochs``.
* :func:`ntk_probe_cosine` — the reference study's cheaper *estimate*: the cosine between ``Θ_0 w`` and ``Θ_t w``
  for one fixed random probe vector ``w``.

Representations (block outputs on a fixed probe batch):

* :func:`linear_cka` — linear CKA, biased (centred HSIC) or unbiased (debiased HSIC of Song et al. 2012, as used
  by Nguyen et al. 2021).
* :func:`block_outputs`, :func:`representation_cka` — every coupling block's output state, and CKA between two
  models block by block (a model against its initialisation, or optimiser against optimiser).

Weights: :func:`weight_rel_change`, :func:`weight_cosine`, :func:`weight_metrics` (weights ``W`` only, biases
excluded: they start at zero, so their relative change is undefined).

Per-mini-batch loss change: :func:`loss_change_summary` summarises a run's ``steps.csv`` per epoch.

Recording: :class:`DiagnosticsRecorder` (``on_epoch_end(epoch, model, optimizer) -> dict``) from a notebook or any
loop; :func:`make_callback` gives ``exactgn train`` its ``[diagnostics]`` callback (``enabled``, ``every``,
``probe_size``); :func:`diagnose_run` / ``exactgn diagnose RUN_DIR`` recompute the same records afterwards from
``checkpoints/epoch_NNNN.pt``; :func:`runs_cka` compares two runs. The probe batch of a run is
:func:`probe_inputs` (its first training images). Metric names are listed in :data:`METRIC_DOC`.

Everything is computed in float64 by default (a float64 copy of a float32 model), against the model at epoch 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .gn import ntk_gram
from .model import RevMLP

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
    "add_parser",
]

DIAGNOSTICS_FILE = "diagnostics.jsonl"
DEFAULT_PROBE_SIZE = 256  # the default of [diagnostics] probe_size

#: Every metric name the recorder can emit (``{block}`` is 0-based, ``{layer}`` is a half-layer name).
METRIC_DOC: dict[str, str] = {
    "epoch": "epoch of the record (0 = before training)",
    "probe_size": "number of probe samples B (the NTK is Bk × Bk)",
    "ntk_alignment": "kernel alignment ⟨Θ0, Θt⟩/(‖Θ0‖‖Θt‖) of the exact probe NTK with the NTK at initialisation",
    "ntk_rate": "(1 − alignment(Θ_prev, Θ_t)) / (epochs since the previous record); absent on the first record",
    "ntk_rel_change": "‖Θt − Θ0‖_F / ‖Θ0‖_F (alignment ignores scale; this does not)",
    "ntk_probe_cosine": "ESTIMATE (the reference's): cosine between Θ0·w and Θt·w for a fixed random w ~ N(0, I)",
    "cka/block{block}": "linear CKA (biased, centred HSIC) of block {block}'s output now vs. at initialisation",
    "cka_unbiased/block{block}": "the same with the unbiased (debiased HSIC) estimator",
    "cka_delta/block{block}": "linear CKA (biased) of what block {block} adds to the state (z_l − z_{l−1}) now vs. at "
    "initialisation: the residual branch alone, without the identity skip that keeps block-output CKA near 1",
    "weight_rel_change/{layer}": "‖W_t − W_0‖_F / ‖W_0‖_F of the half-layer's weight (bias excluded)",
    "weight_cosine/{layer}": "⟨W_t, W_0⟩_F / (‖W_t‖‖W_0‖) of the half-layer's weight (bias excluded)",
    "weight_rel_change/all": "the same relative change over all half-layer weights together",
    "diagnostics_time_s": "wall time spent computing this record (seconds)",
}


# ---------------------------------------------------------------------------- helpers
def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


def _cosine_gap(a: Tensor, b: Tensor) -> float:
    """``1 − cos(a, b)`` of two tensors (flattened), in float64, accurate to rounding even when tiny.

    Computed as ``‖â − b̂‖²/2`` from the unit vectors (``2 − ‖â + b̂‖²/2`` for negative cosines), with no
    cancellation where ``1 − cos`` is small (the NTK rate of change of lazy training); ``nan`` for a zero input.
    """
    a, b = _f64(a).reshape(-1), _f64(b).reshape(-1)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0 or not (torch.isfinite(na) and torch.isfinite(nb)):
        return math.nan
    ua, ub = a / na, b / nb
    if float(ua @ ub) >= 0:
        gap = 0.5 * float((ua - ub).square().sum())
    else:
        gap = 2.0 - 0.5 * float((ua + ub).square().sum())
    return min(2.0, max(0.0, gap))


def _cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two tensors (flattened) in float64, ``1 − _cosine_gap``: exactly 1 for equal inputs."""
    return 1.0 - _cosine_gap(a, b)


def _check_square(name: str, k: Tensor) -> None:
    if not isinstance(k, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(k).__name__}")
    if k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"{name} must be a square kernel matrix (N × N), got shape {tuple(k.shape)}")


# ---------------------------------------------------------------------------- NTK
def kernel_alignment(k0: Tensor, kt: Tensor) -> float:
    """Kernel alignment ``⟨Θ_0, Θ_t⟩_F / (‖Θ_0‖_F ‖Θ_t‖_F)`` of two ``N × N`` kernels (computed in float64).

    1 for a kernel against a positive multiple of itself; ``nan`` if either kernel is zero.
    """
    _check_square("k0", k0)
    _check_square("kt", kt)
    if k0.shape != kt.shape:
        raise ValueError(f"kernels must have the same shape, got {tuple(k0.shape)} and {tuple(kt.shape)}")
    return _cosine(k0, kt)


def ntk_rate(k_prev: Tensor, k_t: Tensor, epochs_elapsed: float) -> float:
    """NTK rate of change between consecutive records: ``(1 − alignment(Θ_prev, Θ_t)) / epochs_elapsed``.

    0 when the kernel did not move (up to scale); per epoch, so records taken every few epochs are comparable.
    Computed without cancellation, so it stays accurate when the alignment is within rounding of 1.
    """
    if not epochs_elapsed > 0:
        raise ValueError(f"epochs_elapsed must be > 0, got {epochs_elapsed!r}")
    kernel_alignment(k_prev, k_t)  # shape checks
    return _cosine_gap(k_prev, k_t) / float(epochs_elapsed)  # 1 − alignment without cancellation


def probe_vector(size: int, seed: int = 0) -> Tensor:
    """The fixed random probe ``w ~ N(0, I)`` (float64, length ``size``) of :func:`ntk_probe_cosine`."""
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ntk_probe_cosine(k0: Tensor, kt: Tensor, w: Tensor | None = None, *, seed: int = 0) -> float:
    """ESTIMATE of NTK similarity used by the reference study: ``cos(Θ_0 w, Θ_t w)`` for one random vector ``w``.

    Cheaper than :func:`kernel_alignment` when only kernel-vector products are available, but it depends on the
    draw of ``w`` and is not the alignment. ``w`` (length ``N``) defaults to :func:`probe_vector` ``(N, seed)``.
    """
    _check_square("k0", k0)
    _check_square("kt", kt)
    if k0.shape != kt.shape:
        raise ValueError(f"kernels must have the same shape, got {tuple(k0.shape)} and {tuple(kt.shape)}")
    if w is None:
        w = probe_vector(k0.shape[0], seed)
    w = _f64(w).reshape(-1).to(k0.device)
    if w.numel() != k0.shape[0]:
        raise ValueError(f"probe vector has {w.numel()} entries, the kernels are {k0.shape[0]} × {k0.shape[0]}")
    return _cosine(_f64(k0) @ w, _f64(kt) @ w)


# ---------------------------------------------------------------------------- CKA
def _as_rows(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be samples × features (N × p), got shape {tuple(x.shape)}")
    return _f64(x.reshape(x.shape[0], -1))


def _hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:
    """Unbiased HSIC (Song et al. 2012) of two ``n × n`` Gram matrices, ``n ≥ 4``:

    ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))`` with ``K̃, L̃`` the Grams with zero diagonal.
    """
    n = k.shape[0]
    kt = k - torch.diag(torch.diagonal(k))
    lt = l - torch.diag(torch.diagonal(l))
    k_row, l_row = kt.sum(1), lt.sum(1)
    value = (kt * lt).sum() + k_row.sum() * l_row.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k_row @ l_row)
    return value / (n * (n - 3))


def linear_cka(x: Tensor, y: Tensor, *, unbiased: bool = False) -> float:
    """Linear CKA between representations ``x`` (``n × p``) and ``y`` (``n × q``) of the same ``n`` samples.

    Biased: ``‖Ȳᵀ X̄‖²_F / (‖X̄ᵀ X̄‖_F ‖Ȳᵀ Ȳ‖_F)`` with column-centred ``X̄, Ȳ`` (the centred-HSIC form of Kornblith et
    al. 2019). ``unbiased=True``: the same ratio with the unbiased HSIC estimator of Song et al. 2012 (as in
    Nguyen et al. 2021), which removes the positive bias of the biased one at small ``n`` / large ``p``; needs
    ``n ≥ 4`` and can be slightly negative. Inputs with more dimensions are flattened per sample. Computed in
    float64; ``nan`` when a representation has no variance.
    """
    xs, ys = _as_rows("x", x), _as_rows("y", y)
    n = xs.shape[0]
    if ys.shape[0] != n:
        raise ValueError(f"x and y must describe the same samples, got {n} and {ys.shape[0]} rows")
    if n < (4 if unbiased else 2):
        raise ValueError(f"linear CKA needs at least {4 if unbiased else 2} samples{' (unbiased)' if unbiased else ''}, got {n}")
    xs = xs - xs.mean(0)
    ys = ys.to(xs.device)
    ys = ys - ys.mean(0)
    if not unbiased:
        # Feature-space form when features are fewer than samples, Gram form otherwise: same value.
        if xs.shape[1] * ys.shape[1] <= n * n:
            cross = (ys.T @ xs).square().sum()
            den = (xs.T @ xs).norm() * (ys.T @ ys).norm()
        else:
            kx, ky = xs @ xs.T, ys @ ys.T
            cross = (kx * ky).sum()
            den = kx.norm() * ky.norm()
        return math.nan if den == 0 else float(cross / den)
    kx, ky = xs @ xs.T, ys @ ys.T
    den = _hsic_unbiased(kx, kx) * _hsic_unbiased(ky, ky)
    if not den > 0:
        return math.nan
    return float(_hsic_unbiased(kx, ky) / den.sqrt())


@torch.no_grad()
def block_outputs(model: RevMLP, x: Tensor) -> list[Tensor]:
    """The state ``z_l = [a_l, b_l]`` (``B × d``) after each coupling block ``l = 0..L−1``, on inputs ``x``."""
    if not isinstance(model, RevMLP):
        raise TypeError(f"block_outputs needs an exactgn.RevMLP, got {type(model).__name__}")
    z = model.flatten_inputs(x)
    n = model.in_features // 2
    a, b = z[:, :n], z[:, n:]
    outs = []
    for block in model.blocks:
        a, b = block(a, b)
        outs.append(torch.cat([a, b], dim=1))
    return outs


def block_increments(model: RevMLP, x: Tensor) -> list[Tensor]:
    """What each coupling block adds to the state, ``z_l − z_{l−1}`` (``B × d``, ``z_{−1}`` = the input).

    The block outputs of a RevMLP carry the input through the identity skip, so their CKA against
    initialisation stays near 1 whenever the residual branches are small; the increments show the branches alone.
    """
    z = model.flatten_inputs(x)
    outs = block_outputs(model, z)
    return [out - prev for prev, out in zip([z] + outs[:-1], outs)]


def representation_cka(model_a: RevMLP, model_b: RevMLP, inputs: Tensor, *, unbiased: bool = False) -> dict[str, float]:
    """Linear CKA of every block's output, ``model_a`` against ``model_b`` on the same ``inputs``.

    Returns ``{"block0": ..., "block1": ...}``; for two runs (optimiser against optimiser) or a model against its
    initialisation. The models need the same number of blocks (widths may differ).
    """
    out_a, out_b = block_outputs(model_a, inputs), block_outputs(model_b, inputs)
    if len(out_a) != len(out_b):
        raise ValueError(f"models have different depths: {len(out_a)} and {len(out_b)} blocks")
    return {f"block{l}": linear_cka(xa, xb, unbiased=unbiased) for l, (xa, xb) in enumerate(zip(out_a, out_b))}


# ---------------------------------------------------------------------------- weights
def weight_rel_change(w_t: Tensor, w_0: Tensor) -> float:
    """``‖W_t − W_0‖_F / ‖W_0‖_F`` (float64); ``inf`` if ``W_0 = 0`` and ``W_t ≠ W_0``, ``nan`` if both are 0."""
    if w_t.shape != w_0.shape:
        raise ValueError(f"weights must have the same shape, got {tuple(w_t.shape)} and {tuple(w_0.shape)}")
    a, b = _f64(w_t), _f64(w_0).to(w_t.device)
    num, den = (a - b).norm(), b.norm()
    if den == 0:
        return math.nan if num == 0 else math.inf
    return float(num / den)


def weight_cosine(w_t: Tensor, w_0: Tensor) -> float:
    """Cosine similarity ``⟨W_t, W_0⟩_F / (‖W_t‖_F ‖W_0‖_F)`` (float64); ``nan`` if either is zero."""
    if w_t.shape != w_0.shape:
        raise ValueError(f"weights must have the same shape, got {tuple(w_t.shape)} and {tuple(w_0.shape)}")
    return _cosine(w_t, w_0.to(w_t.device))


def _half_layer_weights(model: RevMLP | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Half-layer name → weight ``W`` from a model or a ``state_dict`` (biases excluded)."""
    if isinstance(model, RevMLP):
        return {name: layer.weight.detach() for name, layer in zip(model.half_layer_names(), model.half_layers())}
    if isinstance(model, Mapping):
        out = {}
        for key, value in model.items():
            m = re.fullmatch(r"(blocks\.\d+\.[fg])\.weight", key)
            if m:
                out[m.group(1)] = value.detach()
        if not out:
            raise ValueError("the state dict holds no half-layer weights ('blocks.<l>.<f|g>.weight')")
        return out
    raise TypeError(f"expected a RevMLP or a state dict, got {type(model).__name__}")


def weight_metrics(model_t: RevMLP | Mapping[str, Tensor], model_0: RevMLP | Mapping[str, Tensor]) -> dict[str, float]:
    """Per half-layer ``weight_rel_change/<name>`` and ``weight_cosine/<name>``, plus ``weight_rel_change/all``.

    Weights ``W`` only; biases are excluded (they start at zero). Either argument may be a model or a state dict.
    """
    now, init = _half_layer_weights(model_t), _half_layer_weights(model_0)
    if now.keys() != init.keys():
        raise ValueError(f"the two models have different half-layers: {sorted(now)} and {sorted(init)}")
    out: dict[str, float] = {}
    for name in now:
        out[f"weight_rel_change/{name}"] = weight_rel_change(now[name], init[name])
    for name in now:
        out[f"weight_cosine/{name}"] = weight_cosine(now[name], init[name])
    num = sum(float((_f64(now[n]) - _f64(init[n]).to(now[n].device)).square().sum()) for n in now)
    den = sum(float(_f64(init[n]).square().sum()) for n in now)
    out["weight_rel_change/all"] = (math.nan if num == 0 else math.inf) if den == 0 else math.sqrt(num / den)
    return out


# ---------------------------------------------------------------------------- per-batch loss change
_QUANTILES = (0.05, 0.25, 0.75, 0.95)


def read_steps_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a run's ``steps.csv`` as dicts of strings; an error names the file if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run folder has no per-step log (steps.csv)")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "epoch" not in reader.fieldnames or "loss_change_pct" not in reader.fieldnames:
            raise ValueError(f"{path} lacks the columns 'epoch' and 'loss_change_pct' (see docs/run-folder.md)")
        return list(reader)


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def loss_change_summary(steps: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Per-epoch summary of the per-mini-batch loss change ``100·(ℓ_after − ℓ_before)/ℓ_before``.

    ``steps``: a path to ``steps.csv`` or rows with ``epoch`` and ``loss_change_pct``. Returns one dict per epoch
    (ascending): ``epoch, count, mean, std, median, min, max, q05, q25, q75, q95``. Empty and non-finite values are
    skipped (``count`` says how many were used).
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
            "epoch": epoch, "count": len(vals), "mean": statistics.fmean(vals),
            "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "median": statistics.median(vals),
            "min": vals[0], "max": vals[-1],
        }
        for q in _QUANTILES:
            rec[f"q{round(q * 100):02d}"] = _quantile(vals, q)
        out.append(rec)
    return out


# ---------------------------------------------------------------------------- recorder
class DiagnosticsRecorder:
    """Records NTK, CKA and weight diagnostics against the initial model on a fixed probe batch.

    Args:
        model_at_init: the :class:`RevMLP` at initialisation (only read, never kept; a snapshot is taken).
        probe_inputs: the fixed probe batch (``B × d`` or images); the NTK is ``Bk × Bk``, so keep ``B`` modest
            (memory ``8(Bk)²`` bytes in float64: 128 samples and 10 classes take 13 MB).
        ntk, cka, weights: which groups of metrics to record.
        probe_seed: seed of the random vector ``w`` of ``ntk_probe_cosine``.
        every: record only at epochs that are multiples of ``every`` (other calls return ``{}``).
        init_epoch: the epoch of ``model_at_init`` (0, or the checkpoint's epoch).
        dtype: dtype in which the diagnostics are computed (default float64, so that ``1 − alignment`` is
            meaningful near 1); ``None`` computes in the model's own dtype and needs no extra model copy.

    ``on_epoch_end(epoch, model, optimizer)`` returns a flat ``dict[str, float]`` (names in :data:`METRIC_DOC`),
    including ``diagnostics_time_s``; ``optimizer`` is accepted for the training loop's callback signature and
    not used. The model is not modified and its mode/gradients are left alone.
    """

    def __init__(
        self,
        model_at_init: RevMLP,
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
        if not isinstance(model_at_init, RevMLP):
            raise TypeError(f"DiagnosticsRecorder needs an exactgn.RevMLP, got {type(model_at_init).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.ntk, self.cka, self.weights = ntk, cka, weights
        self.every, self.probe_seed, self.dtype = every, probe_seed, dtype
        self._scratch: RevMLP | None = None
        start = time.perf_counter()
        init = self._working_model(model_at_init)
        self.probe_inputs = init.flatten_inputs(probe_inputs).detach().clone()
        self.probe_size = self.probe_inputs.shape[0]
        if cka and self.probe_size < 4:
            raise ValueError(f"CKA needs a probe batch of at least 4 samples, got {self.probe_size}")
        self._k0 = ntk_gram(init, self.probe_inputs) if ntk else None
        self._w = probe_vector(self._k0.shape[0], probe_seed).to(self._k0.device) if ntk else None
        self._outs0 = block_outputs(init, self.probe_inputs) if cka else None
        self._deltas0 = block_increments(init, self.probe_inputs) if cka else None
        self._weights0 = {f"{k}.weight": v.clone() for k, v in _half_layer_weights(init).items()} if weights else None
        self._prev: tuple[int, Tensor] | None = (init_epoch, self._k0) if ntk else None
        self.init_epoch = init_epoch
        self.setup_time_s = time.perf_counter() - start

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, probe_inputs: Tensor, **kwargs: Any) -> "DiagnosticsRecorder":
        """A recorder whose initial model is read from an epoch checkpoint (``checkpoints/epoch_NNNN.pt``)."""
        model, epoch = load_checkpoint_model(path)
        kwargs.setdefault("init_epoch", epoch)
        return cls(model, probe_inputs, **kwargs)

    def _working_model(self, model: RevMLP) -> RevMLP:
        """``model`` itself, or a copy in :attr:`dtype` (one scratch model reused across calls)."""
        if self.dtype is None or model.readout.dtype == self.dtype:
            return model
        device = model.readout.device
        if self._scratch is None or self._scratch.config() != model.config() or self._scratch.readout.device != device:
            self._scratch = RevMLP(**model.config(), dtype=self.dtype).to(device)
        self._scratch.load_state_dict(model.state_dict())
        return self._scratch

    def forget_previous(self) -> None:
        """Drop the previous record's kernel, so that the next record has no ``ntk_rate`` (e.g. after a resume)."""
        self._prev = None

    def should_record(self, epoch: int) -> bool:
        """Whether :meth:`on_epoch_end` records at ``epoch`` (a multiple of ``every``)."""
        return epoch % self.every == 0

    @torch.no_grad()
    def compute(self, model: RevMLP, epoch: int | None = None) -> dict[str, float]:
        """All enabled metrics of ``model`` against the initial model (no ``every`` check, no rate update)."""
        return self._record(model, epoch, update=False)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, model: RevMLP, optimizer: object = None) -> dict[str, float]:
        """Metrics at the end of ``epoch`` (``{}`` unless ``epoch`` is a multiple of ``every``)."""
        if not self.should_record(epoch):
            return {}
        return self._record(model, epoch, update=True)

    def _record(self, model: RevMLP, epoch: int | None, update: bool) -> dict[str, float]:
        if not isinstance(model, RevMLP):
            raise TypeError(f"diagnostics need an exactgn.RevMLP, got {type(model).__name__}")
        start = time.perf_counter()
        work = self._working_model(model)
        out: dict[str, float] = {}
        if epoch is not None:
            out["epoch"] = epoch
        out["probe_size"] = self.probe_size
        probe = self.probe_inputs.to(work.readout.device)
        if self.ntk:
            kt = ntk_gram(work, probe)
            k0 = self._k0.to(kt.device)
            out["ntk_alignment"] = kernel_alignment(k0, kt)
            if self._prev is not None and epoch is not None and epoch > self._prev[0]:
                prev_epoch, k_prev = self._prev
                out["ntk_rate"] = ntk_rate(k_prev.to(kt.device), kt, epoch - prev_epoch)
            out["ntk_rel_change"] = float((_f64(kt) - _f64(k0)).norm() / _f64(k0).norm())
            out["ntk_probe_cosine"] = ntk_probe_cosine(k0, kt, self._w)
            if update and epoch is not None:
                self._prev = (epoch, kt)
        if self.cka:
            outs = block_outputs(work, probe)
            for l, (x0, xt) in enumerate(zip(self._outs0, outs)):
                out[f"cka/block{l}"] = linear_cka(x0.to(xt.device), xt)
            for l, (x0, xt) in enumerate(zip(self._outs0, outs)):
                out[f"cka_unbiased/block{l}"] = linear_cka(x0.to(xt.device), xt, unbiased=True)
            deltas = [o - p for p, o in zip([probe.to(outs[0].dtype)] + outs[:-1], outs)]
            for l, (x0, xt) in enumerate(zip(self._deltas0, deltas)):
                out[f"cka_delta/block{l}"] = linear_cka(x0.to(xt.device), xt)
        if self.weights:
            out.update(weight_metrics(work, self._weights0))
        out["diagnostics_time_s"] = time.perf_counter() - start
        return out


class TrainingDiagnostics:
    """The ``[diagnostics]`` callback of ``exactgn train`` (made by :func:`make_callback`).

    Wraps a :class:`DiagnosticsRecorder` created at the first call: at epoch 0 from the model as it is (the
    initialisation); on a resumed run from the initial model rebuilt from the configuration (initialisation is
    deterministic in ``seed``). The first record after a resume has no ``ntk_rate`` (the previous kernel is not
    kept across processes).
    """

    def __init__(self, probe_inputs: Tensor, *, every: int = 1, init_model: Callable[[], RevMLP] | None = None,
                 **recorder_kwargs: Any) -> None:
        self.probe_inputs = probe_inputs
        self.every = every
        self.init_model = init_model
        self.recorder_kwargs = recorder_kwargs
        self.recorder: DiagnosticsRecorder | None = None

    def on_epoch_end(self, epoch: int, model: RevMLP, optimizer: object = None) -> dict[str, float]:
        if epoch % self.every != 0:
            return {}
        start = time.perf_counter()
        if self.recorder is None:
            if epoch == 0 or self.init_model is None:
                if epoch != 0:
                    raise RuntimeError("diagnostics started after epoch 0 without a way to rebuild the initial model")
                init = model
            else:
                init = self.init_model().to(model.readout.device)
            self.recorder = DiagnosticsRecorder(init, self.probe_inputs, every=self.every, **self.recorder_kwargs)
            if epoch != 0:
                self.recorder.forget_previous()  # resumed: no previous record in this process
        record = self.recorder.on_epoch_end(epoch, model, optimizer)
        record["diagnostics_time_s"] = time.perf_counter() - start
        return record


def make_callback(cfg: Any, data: Any) -> TrainingDiagnostics:
    """The training callback for ``[diagnostics] enabled = true`` (called by :func:`exactgn.train.train`).

    ``cfg``: the :class:`~exactgn.config.RunConfig`; ``data``: the loaded :class:`~exactgn.data.DataSplit`. The probe
    batch is the first ``diagnostics.probe_size`` training images (all of them if fewer), the same images that
    :func:`probe_inputs` gives ``exactgn diagnose``; records every ``diagnostics.every`` epochs.
    """
    size = min(int(cfg.diagnostics.probe_size), len(data.train))
    probe = data.train.images[:size].reshape(size, -1)

    def init_model() -> RevMLP:
        from .train import build_model  # noqa: PLC0415 - train imports this module lazily too

        return build_model(cfg, data.features, data.num_classes)

    return TrainingDiagnostics(probe, every=int(cfg.diagnostics.every), init_model=init_model)


# ---------------------------------------------------------------------------- checkpoints and runs
_CKPT_RE = re.compile(r"epoch_(\d+)\.pt")


def load_checkpoint_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[RevMLP, int]:
    """``(model, epoch)`` from an epoch checkpoint ``{"model", "model_config", "epoch"}`` (docs/run-folder.md)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    missing = [k for k in ("model", "model_config", "epoch") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}; epoch checkpoints hold 'model', 'model_config' and 'epoch'")
    state = ckpt["model"]
    dtype = state["readout"].dtype if "readout" in state else torch.float32
    model = RevMLP(**ckpt["model_config"], dtype=dtype)
    model.load_state_dict(state)
    return model, int(ckpt["epoch"])


def epoch_checkpoints(run_dir: str | os.PathLike) -> dict[int, Path]:
    """Epoch → path of every ``checkpoints/epoch_NNNN.pt`` of a run, sorted; an error says what is missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    ckdir = run / "checkpoints"
    found = {int(m.group(1)): p for p in ckdir.glob("epoch_*.pt") if (m := _CKPT_RE.fullmatch(p.name))} if ckdir.is_dir() else {}
    if 0 not in found:
        raise FileNotFoundError(
            f"run folder {run} has no {ckdir / 'epoch_0000.pt'} (the initial model); diagnostics from checkpoints need "
            "the run's epoch checkpoints: train with train.keep_checkpoints = true"
        )
    return dict(sorted(found.items()))


def _read_config(run: Path) -> dict[str, Any]:
    import tomllib

    path = run / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"run folder {run} has no config.toml (see docs/run-folder.md)")
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML ({exc})") from exc


def probe_inputs(config: Any, size: int, *, root: str | os.PathLike | None = None) -> Tensor:
    """The fixed probe batch of a run: the first ``size`` images of its training set, flattened (``size × d``).

    ``config``: a :class:`exactgn.config.RunConfig` or its nested dict (a run's ``config.toml``). The training set is
    chosen exactly as training chooses it (``data.train_size``, ``data.subset``, ``data.subset_seed``,
    ``data.val_size``, ``data.val_seed``), without
    augmentation, and normalised with the reference statistics in the model's dtype (``model.dtype``), so the
    values are bit-identical to training's; if the training set has fewer than ``size`` images, all of them. The data root is ``root``, else ``data.root``,
    else ``$EXACTGN_DATA``. The training loop and ``exactgn diagnose`` both use this function, so they see the
    same probe.
    """
    from . import data as datamod  # noqa: PLC0415 - keeps this module importable on its own

    section = config.get("data", {}) if isinstance(config, Mapping) else getattr(config, "data", None)
    get = section.get if isinstance(section, Mapping) else (lambda key, default: getattr(section, key, default))
    name = get("dataset", "mnist-small")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"probe size must be a positive integer, got {size!r}")
    raw = datamod.load_raw(name, root if root is not None else (get("root", "") or None))
    idx, _ = datamod.split_indices(raw.train.labels, get("train_size", 0), get("subset", "first"),
                                   get("subset_seed", 0), val_size=get("val_size", 0),
                                   val_seed=get("val_seed", 0))
    size = min(size, len(idx))  # a training set smaller than the probe: all of it (as in training)
    model = config.get("model", {}) if isinstance(config, Mapping) else getattr(config, "model", None)
    dtype_name = model.get("dtype", "float32") if isinstance(model, Mapping) else getattr(model, "dtype", "float32")
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype_name, torch.float32)
    images = datamod.normalise(raw.train.images[idx[:size]], name, dtype)  # as training normalises, same dtype
    return images.reshape(size, -1)


_probe_inputs = probe_inputs  # diagnose_run's argument of the same name shadows it


def load_run_model(run_dir: str | os.PathLike, epoch: int | None = None) -> tuple[RevMLP, int]:
    """``(model, epoch)`` of a run: ``checkpoints/epoch_NNNN.pt`` for ``epoch``, or the final model
    (``checkpoints/last.pt``) when ``epoch`` is ``None``."""
    run = Path(run_dir)
    path = run / "checkpoints" / ("last.pt" if epoch is None else f"epoch_{epoch:04d}.pt")
    if not path.is_file():
        hint = "" if epoch is None else "; epoch checkpoints are kept when the run has train.keep_checkpoints = true"
        raise FileNotFoundError(f"run folder {run} has no {path.relative_to(run)}{hint}")
    return load_checkpoint_model(path)


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
    """Linear CKA of every block's output between two runs (e.g. optimiser against optimiser), ``{"block0": ...}``.

    Compares the models at ``epoch`` (default: each run's final model, ``checkpoints/last.pt``) on ``probe_inputs``
    or the first ``probe_size`` training images of ``run_a``'s dataset. Both runs must use the same dataset.
    """
    ca, cb = _read_config(Path(run_a)), _read_config(Path(run_b))
    da, db = ca.get("data", {}).get("dataset"), cb.get("data", {}).get("dataset")
    if da != db:
        raise ValueError(f"runs {run_a} and {run_b} use different datasets ({da} and {db}); CKA needs the same inputs")
    if probe_inputs is None:
        probe_inputs = _probe_inputs(ca, probe_size, root=data_root)
    model_a, _ = load_run_model(run_a, epoch)
    model_b, _ = load_run_model(run_b, epoch)
    return representation_cka(model_a.double(), model_b.double(), probe_inputs.double(), unbiased=unbiased)


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
    ``every``. ``probe_size`` defaults to the run's ``diagnostics.probe_size`` (so the records match those made
    during training), else :data:`DEFAULT_PROBE_SIZE`. The probe batch is ``probe_inputs`` (capped at
    ``probe_size`` rows) or, by default, the first ``probe_size`` training images of the run's dataset (:func:`probe_inputs`, data root ``data_root``, else the
    run's ``data.root``, else ``$EXACTGN_DATA``). Writes the records as JSON lines to ``out`` (default ``RUN_DIR/diagnostics.jsonl``; an existing
    file is replaced only with ``overwrite=True``); ``out=False`` writes nothing.
    """
    run = Path(run_dir)
    ckpts = epoch_checkpoints(run)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    if probe_size is None:
        config = _read_config(run) if (run / "config.toml").is_file() else {}
        probe_size = config.get("diagnostics", {}).get("probe_size", DEFAULT_PROBE_SIZE)
    if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 4:
        raise ValueError(f"probe_size must be an integer >= 4, got {probe_size!r}")
    target: Path | None = None if out is False else Path(out) if out is not None else run / DIAGNOSTICS_FILE
    if target is not None and target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it, or --out FILE")
    if probe_inputs is None:
        probe_inputs = _probe_inputs(_read_config(run), probe_size, root=data_root)
    probe_inputs = probe_inputs[:probe_size]
    recorder = DiagnosticsRecorder.from_checkpoint(ckpts[0], probe_inputs, every=every, **recorder_kwargs)
    records = []
    epochs = [e for e in ckpts if e % every == 0]
    iterator: Iterable[int] = epochs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(epochs, desc=f"diagnose {run.name}", unit="ckpt")
    for epoch in iterator:
        model, ck_epoch = load_checkpoint_model(ckpts[epoch])
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record as a JSON line; non-finite floats become ``null`` (strict JSON)."""
    with open(path, "a") as fh:
        fh.write(json.dumps({k: _jsonable(v) for k, v in record.items()}, allow_nan=False) + "\n")


def read_diagnostics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``diagnostics.jsonl`` (``null`` read back as ``nan``); errors name the file and line."""
    path = Path(path)
    out = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict) or "epoch" not in rec:
                raise ValueError(f"{path}, line {number}: a diagnostics record must be an object with 'epoch'")
            out.append({k: (math.nan if v is None else v) for k, v in rec.items()})
    return out


# ---------------------------------------------------------------------------- CLI
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="NTK, CKA and weight diagnostics of a run, from its epoch checkpoints",
        description="Recompute the diagnostics of DESIGN §5 from RUN_DIR/checkpoints/epoch_NNNN.pt (written when the "
        "run has train.keep_checkpoints = true): exact NTK alignment with the initial NTK and its rate of change, "
        "the reference's random-probe NTK estimate, linear CKA (biased and unbiased) of every block against "
        "initialisation, and per-half-layer weight change. Writes RUN_DIR/diagnostics.jsonl.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder with checkpoints/epoch_0000.pt and later ones")
    p.add_argument("--probe-size", type=int, default=None,
                   help="probe samples B: the first B training images of the run's dataset (default: the run's "
                   f"diagnostics.probe_size, else {DEFAULT_PROBE_SIZE}; the NTK is Bk × Bk)")
    p.add_argument("--every", type=int, default=1, help="use checkpoints whose epoch is a multiple of K (default 1)")
    p.add_argument("--probe", metavar="FILE.pt",
                   help="use this probe batch instead (a tensor B × d saved with torch.save); --probe-size still caps B")
    p.add_argument("--data-root", metavar="DIR", help="data root for the probe images (default: the run's data.root, "
                   "else $EXACTGN_DATA)")
    p.add_argument("--out", metavar="FILE", help="write here instead of RUN_DIR/diagnostics.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing diagnostics file")
    p.add_argument("--dtype", choices=("float64", "model"), default="float64",
                   help="precision of the diagnostics (default float64; 'model' uses the checkpoint's dtype)")
    p.add_argument("--no-ntk", action="store_true", help="skip the NTK metrics (the costliest part)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    probe = None
    if args.probe:
        if not Path(args.probe).is_file():
            raise FileNotFoundError(f"probe file {args.probe} does not exist")
        probe = torch.load(args.probe, map_location="cpu", weights_only=True)
        if not isinstance(probe, Tensor):
            raise ValueError(f"probe file {args.probe} must hold one tensor (B × d), got {type(probe).__name__}")
    records = diagnose_run(
        args.run_dir, probe_size=args.probe_size, every=args.every, out=args.out, overwrite=args.overwrite,
        probe_inputs=probe, data_root=args.data_root, progress=True, dtype=torch.float64 if args.dtype == "float64" else None, ntk=not args.no_ntk,
    )
    target = args.out or str(Path(args.run_dir) / DIAGNOSTICS_FILE)
    last = records[-1]
    shown = {k: last[k] for k in ("ntk_alignment", "ntk_probe_cosine", "cka/block0", "weight_rel_change/all") if k in last}
    summary = ", ".join(f"{k} {v:.6g}" for k, v in shown.items())
    print(f"wrote {len(records)} records to {target} in {time.perf_counter() - start:.1f} s; epoch {last['epoch']}: {summary}")
    return 0
