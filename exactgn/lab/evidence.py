"""Comparisons a sceptical reviewer accepts: diagnostics at matched training loss, CKA between runs,
contenders.

Full-batch GN reaches a far lower training loss than Adam or SGD in the same number of steps, so comparing
"laziness" (NTK alignment, weight change, CKA against initialisation) at matched *epochs* confounds the
optimiser with how far it has fitted the data. Here every run is read at the point where it first reaches a
given training loss instead.

**The matching rule.** A run's candidate epochs are the epochs that have what the comparison needs (a
diagnostics record, or a model checkpoint) and a row in ``epochs.csv``. Its *matched epoch* for a target loss
``ℓ*`` is the **first candidate epoch whose full-training-set loss** (``epochs.csv`` ``train_loss``, no
augmentation) **is at or below** ``ℓ*``. Nothing is interpolated: records are discrete, so the picked record's
actual loss is reported beside it (it can be well below ``ℓ*`` when records are sparse or the loss falls
fast). A run that never reaches ``ℓ*`` at a candidate epoch is reported as *not reached*, with the lowest
candidate loss and its epoch.

**CKA between runs** (:func:`cross_cka_at_loss`): the models of two runs (e.g. GN and Adam, same seed) at
their matched epochs, compared block by block with linear CKA on one probe batch (the first ``probe_size``
training images of the first run), next to each run's CKA against its own initialisation (``epoch_0000.pt``)
on the same probe. It needs model checkpoints at the candidate epochs: ``checkpoints/epoch_NNNN.pt`` exist
only with ``train.keep_checkpoints = true`` (at ``epoch 0`` always, then every ``train.checkpoint_every``
epochs and at the end); ``checkpoints/last.pt`` adds the final epoch. Set ``checkpoint_every`` to
``diagnostics.every`` so that the two tables can pick the same epochs.

**Contenders** (:func:`contender`): a short label per optimiser setting, from a run's configuration:
``jflat-trunc`` (GN, right inverse J♭, truncated), ``jflat`` (J♭ untruncated), ``jplus`` (GN, minimum-norm J⁺,
untruncated), ``jplus-trunc``, ``adam``, ``sgd``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..metrics import representation_cka
from .checkpoint import load_model, read_payload
from .config import read_toml
from .diagnostics import DEFAULT_PROBE_SIZE, probe_inputs, read_diagnostics
from .rundir import config_path, diagnostics_path, epoch_checkpoints, last_checkpoint, log_path, read_rows

__all__ = [
    "Matched",
    "contender",
    "first_at_or_below",
    "epoch_losses",
    "match_loss",
    "diagnostics_at_loss",
    "checkpoint_epochs",
    "cross_cka_at_loss",
    "pair_runs",
    "matched_loss_table",
    "cross_cka_table",
    "markdown",
    "DIAGNOSTIC_KEYS",
]

#: The record keys reported at matched loss (``{b}``: every block of the run, shown as ``b0 / b1 / …``).
DIAGNOSTIC_KEYS = ("ntk_alignment", "weight_rel_change/all", "cka/block{b}", "cka_delta/block{b}")


def contender(config: Mapping[str, Any]) -> str:
    """The contender label of a run configuration (nested dict, e.g. a run's ``config.toml``): the
    optimiser (``jflat``, ``jflat-trunc``, ``jplus``, ``adam``, …), with ``-mlp`` or ``-resmlp`` for those
    model kinds."""
    kind = config.get("model", {}).get("kind", "revmlp")
    suffix = "" if kind == "revmlp" else f"-{kind}"
    optim = config.get("optim", {})
    name = optim.get("name", "gn")
    if name != "gn":
        return str(name) + suffix
    gn = optim.get("gn", {})
    base = "jflat" if gn.get("inverse", "right") == "right" else "jplus"
    return base + ("-trunc" if gn.get("rtol", 0.0) or gn.get("atol", 0.0) else "") + suffix


@dataclass
class Matched:
    """Where a run first reaches a target training loss.

    ``epoch``/``train_loss``: the matched epoch and its actual loss (``None`` when not reached);
    ``lowest_loss``, ``lowest_epoch``: the lowest candidate loss and its epoch (what the run did reach);
    ``candidates``: how many epochs were eligible; ``record``: the diagnostics record at ``epoch`` (for
    :func:`diagnostics_at_loss`).
    """

    run: Path
    target: float
    epoch: int | None
    train_loss: float | None
    lowest_loss: float | None
    lowest_epoch: int | None
    candidates: int
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def reached(self) -> bool:
        return self.epoch is not None

    def describe(self) -> str:
        """``epoch 12 (loss 0.2871)`` or ``not reached (lowest 0.4100 at epoch 30)``."""
        if self.reached:
            return f"epoch {self.epoch} (loss {self.train_loss:.4g})"
        if self.lowest_loss is None:
            return "not reached (no eligible epoch)"
        return f"not reached (lowest {self.lowest_loss:.4g} at epoch {self.lowest_epoch})"


def first_at_or_below(
    losses: Mapping[int, float], target: float, epochs: Iterable[int] | None = None
) -> int | None:
    """The first epoch (ascending) among ``epochs`` (default: all of ``losses``) whose loss is finite and
    ``<= target``; ``None`` if there is none. Epochs without a loss are skipped."""
    if not math.isfinite(target):
        raise ValueError(f"the target training loss must be a finite number, got {target!r}")
    pool = sorted(losses if epochs is None else set(epochs) & set(losses))
    for epoch in pool:
        loss = losses[epoch]
        if loss is not None and math.isfinite(loss) and loss <= target:
            return epoch
    return None


def epoch_losses(run: str | os.PathLike, key: str = "train_loss") -> dict[int, float]:
    """Epoch → ``key`` (default the full training-set loss) from a run's ``epochs.csv``; a clear error
    without it."""
    path = log_path(run, "epochs")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; matched-loss comparisons read the run's epochs.csv")
    out = {}
    for row in read_rows(path):
        value = row.get(key)
        if isinstance(row.get("epoch"), int) and isinstance(value, (int, float)):
            out[row["epoch"]] = float(value)
    if not out:
        raise ValueError(f"{path}: no epoch has a {key!r} value")
    return out


def match_loss(run: str | os.PathLike, target: float, epochs: Iterable[int]) -> Matched:
    """The :class:`Matched` point of ``run`` for ``target`` among the candidate ``epochs``."""
    losses = epoch_losses(run)
    pool = sorted(set(epochs) & set(losses))
    finite = [e for e in pool if math.isfinite(losses[e])]
    lowest = min(finite, key=lambda e: losses[e]) if finite else None
    epoch = first_at_or_below(losses, target, pool)
    return Matched(
        Path(run),
        float(target),
        epoch,
        losses[epoch] if epoch is not None else None,
        losses[lowest] if lowest is not None else None,
        lowest,
        len(pool),
    )


def diagnostics_at_loss(run: str | os.PathLike, target: float) -> Matched:
    """The diagnostics record (``diagnostics.jsonl``) of ``run`` at its matched epoch for ``target``."""
    path = diagnostics_path(run)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; train with [diagnostics] enabled = true, or run "
            f"`exactgn diagnose {run}` on a run with train.keep_checkpoints = true"
        )
    records = {int(r["epoch"]): r for r in read_diagnostics(path)}
    matched = match_loss(run, target, records)
    if matched.epoch is not None:
        matched.record = records[matched.epoch]
    return matched


def checkpoint_epochs(run: str | os.PathLike) -> dict[int, Path]:
    """Epoch → model checkpoint of a run: every ``checkpoints/epoch_NNNN.pt``, plus ``checkpoints/last.pt`` at
    its own epoch when no epoch checkpoint has that epoch. Empty when the run kept none."""
    found = dict(epoch_checkpoints(run))
    last = last_checkpoint(run)
    if last.is_file():
        epoch = read_payload(last).get("epoch")
        if isinstance(epoch, int) and epoch not in found:
            found[epoch] = last
    return dict(sorted(found.items()))


def _same_inputs(a: Mapping[str, Any], b: Mapping[str, Any], run_a: Path, run_b: Path) -> None:
    keys = ("dataset", "train_size", "subset", "subset_seed", "val_size", "val_seed")
    da, db = a.get("data", {}), b.get("data", {})
    differ = [k for k in keys if da.get(k) != db.get(k)]
    if differ:
        detail = ", ".join(f"data.{k} {da.get(k)!r} vs {db.get(k)!r}" for k in differ)
        raise ValueError(
            f"runs {run_a} and {run_b} train on different images ({detail}); CKA between runs needs "
            "the same training set, so that the probe batch means the same for both"
        )


def cross_cka_at_loss(
    run_a: str | os.PathLike,
    run_b: str | os.PathLike,
    target: float,
    *,
    probe_size: int | None = None,
    data_root: str | os.PathLike | None = None,
    unbiased: bool = False,
) -> dict[str, Any]:
    """Linear CKA per block between ``run_a`` and ``run_b`` at their matched epochs for ``target``.

    Returns ``{"a": Matched, "b": Matched, "cross": {"block0": ...}, "a_init": {...}, "b_init": {...},
    "probe_size": B}``: ``cross`` compares the two models, ``a_init``/``b_init`` each model with its own
    ``epoch_0000.pt``; all on the first ``probe_size`` training images of ``run_a`` (default: its
    ``diagnostics.probe_size``, else 256), in float64. The CKA dicts are empty when either run does not reach
    ``target`` at a checkpointed epoch. Both runs must train on the same images.
    """
    run_a, run_b = Path(run_a), Path(run_b)
    cfg_a, cfg_b = read_toml(config_path(run_a)), read_toml(config_path(run_b))
    _same_inputs(cfg_a, cfg_b, run_a, run_b)
    ck_a, ck_b = checkpoint_epochs(run_a), checkpoint_epochs(run_b)
    for run, ck in ((run_a, ck_a), (run_b, ck_b)):
        if 0 not in ck:
            raise FileNotFoundError(
                f"{run / 'checkpoints' / 'epoch_0000.pt'}: missing; CKA between runs reads the "
                "model checkpoints (keep them with train.keep_checkpoints = true)"
            )
    ma, mb = match_loss(run_a, target, ck_a), match_loss(run_b, target, ck_b)
    size = probe_size or cfg_a.get("diagnostics", {}).get("probe_size", DEFAULT_PROBE_SIZE)
    out: dict[str, Any] = {"a": ma, "b": mb, "cross": {}, "a_init": {}, "b_init": {}, "probe_size": size}
    if not (ma.reached and mb.reached):
        return out
    probe = probe_inputs(cfg_a, size, root=data_root).double()
    out["probe_size"] = probe.shape[0]
    model_a, model_b = (load_model(ck[m.epoch])[0].double() for ck, m in ((ck_a, ma), (ck_b, mb)))
    init_a, init_b = (load_model(ck[0])[0].double() for ck in (ck_a, ck_b))
    out["cross"] = representation_cka(model_a, model_b, probe, unbiased=unbiased)
    out["a_init"] = representation_cka(model_a, init_a, probe, unbiased=unbiased)
    out["b_init"] = representation_cka(model_b, init_b, probe, unbiased=unbiased)
    return out


def pair_runs(runs: Sequence[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """(GN run, Adam/SGD run) pairs with the same seed and training images, GN runs first, in the given
    order."""
    configs = [(Path(r), read_toml(config_path(r))) for r in runs]
    pairs = []
    for run_a, ca in configs:
        if ca.get("optim", {}).get("name", "gn") != "gn":
            continue
        for run_b, cb in configs:
            if cb.get("optim", {}).get("name", "gn") == "gn" or cb.get("seed") != ca.get("seed"):
                continue
            if _same_data(ca, cb):
                pairs.append((run_a, run_b))
    return pairs


def _same_data(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    try:
        _same_inputs(a, b, Path("a"), Path("b"))
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- tables
def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def _per_block(record: Mapping[str, Any], pattern: str) -> str:
    prefix = pattern.split("{b}")[0]
    blocks = sorted(
        int(k[len(prefix) :]) for k in record if k.startswith(prefix) and k[len(prefix) :].isdigit()
    )
    return " / ".join(_num(record[f"{prefix}{b}"]) for b in blocks) or "-"


def _run_label(run: Path, config: Mapping[str, Any]) -> str:
    return f"{run.parent.name}/{run.name}" if run.parent.name else run.name


def matched_loss_table(runs: Sequence[str | os.PathLike], target: float) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of "diagnostics at matched training loss": one row per run, its matched epoch
    and actual loss (or *not reached*), and :data:`DIAGNOSTIC_KEYS` of that record (blocks as ``b0 / b1``)."""
    head = [
        "run",
        "contender",
        "seed",
        f"matched at loss <= {target:g}",
        "NTK alignment",
        "‖W−W0‖/‖W0‖",
        "CKA vs init (blocks)",
        "CKA Δ vs init (blocks)",
    ]
    rows = []
    for raw in runs:
        run = Path(raw)
        cfg = read_toml(config_path(run))
        m = diagnostics_at_loss(run, target)
        cells = [_run_label(run, cfg), contender(cfg), str(cfg.get("seed", "-")), m.describe()]
        if m.reached:
            rec = m.record
            cells += [
                _num(rec.get("ntk_alignment")),
                _num(rec.get("weight_rel_change/all")),
                _per_block(rec, "cka/block{b}"),
                _per_block(rec, "cka_delta/block{b}"),
            ]
        else:
            cells += ["-"] * 4
        rows.append(cells)
    return head, rows


def cross_cka_table(
    runs: Sequence[str | os.PathLike],
    target: float,
    *,
    probe_size: int | None = None,
    data_root: str | os.PathLike | None = None,
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of "CKA between GN and Adam/SGD at matched training loss": one row per (GN run, other
    run) pair of :func:`pair_runs`, with both matched epochs and, per block (``b0 / b1``), CKA(GN, other),
    CKA(GN, its init), CKA(other, its init)."""
    head = [
        "seed",
        "GN run",
        "GN matched",
        "other run",
        "other matched",
        "probe",
        "CKA(GN, other)",
        "CKA(GN, init)",
        "CKA(other, init)",
    ]
    rows = []
    for run_a, run_b in pair_runs(runs):
        res = cross_cka_at_loss(run_a, run_b, target, probe_size=probe_size, data_root=data_root)
        cfg_a, cfg_b = read_toml(config_path(run_a)), read_toml(config_path(run_b))
        blocks = [
            " / ".join(_num(v) for v in res[key].values()) or "-" for key in ("cross", "a_init", "b_init")
        ]
        rows.append(
            [
                str(cfg_a.get("seed", "-")),
                f"{_run_label(run_a, cfg_a)} ({contender(cfg_a)})",
                res["a"].describe(),
                f"{_run_label(run_b, cfg_b)} ({contender(cfg_b)})",
                res["b"].describe(),
                str(res["probe_size"]),
                *blocks,
            ]
        )
    return head, rows


def markdown(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
