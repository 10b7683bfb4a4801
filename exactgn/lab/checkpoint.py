"""Checkpoints of a run: atomic ``torch.save``, every RNG state, and the one place that reads them back.

Two kinds (``docs/run-folder.md``): ``checkpoints/last.pt``, the resumable state (format
:data:`CHECKPOINT_FORMAT`), and ``checkpoints/epoch_NNNN.pt``, the weights ``{"model", "model_config",
"epoch"}``. Both hold ``model`` and ``model_config``, so :func:`load_model` rebuilds a model from either, and
:func:`load_init_weights` loads either into a model of the same architecture. Everything in a checkpoint is a
tensor, number, string, list or dict, so it loads with ``torch.load(..., weights_only=True)``: a checkpoint
cannot run code.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model import RevMLP
from ..models import MLP, ResMLP
from .config import ConfigError
from .rundir import (
    atomic_write_bytes,
    epoch_checkpoint,
    file_sha256,
    last_checkpoint,
    run_of_checkpoint,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "rng_states",
    "restore_rng_states",
    "save_checkpoint",
    "save_weights",
    "model_config",
    "model_from_config",
    "read_payload",
    "load_checkpoint",
    "load_model",
    "resolve_init_from",
    "load_init_weights",
]

CHECKPOINT_FORMAT = 1

# Architecture keys of RevMLP.config() that must agree for weights to be loaded, and the config keys that set
# them.
_REVMLP_ARCH_KEYS = {
    "in_features": "the dataset (data.dataset: d = 784 for MNIST, 3072 for CIFAR-10)",
    "num_classes": "the dataset (data.dataset)",
    "num_blocks": "model.blocks",
    "hidden": "model.hidden / model.bottleneck",
    "bias": "model.bias",
}


#: ``model_config["kind"]`` → the class it rebuilds; a ``model_config`` without ``kind`` (every checkpoint
#: written before MLP and ResMLP existed, and every RevMLP's) is a RevMLP.
MODEL_CLASSES: dict[str, type[nn.Module]] = {"revmlp": RevMLP, "mlp": MLP, "resmlp": ResMLP}
_SEED_KEYS = ("init_std", "seed")  # constructor arguments that do not change the architecture


def model_config(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint stores as ``model_config``: the constructor arguments, plus ``kind`` for anything but
    a RevMLP (whose checkpoints keep their old form)."""
    kinds = [kind for kind, cls in MODEL_CLASSES.items() if type(model) is cls]
    if not kinds:
        raise TypeError(f"cannot checkpoint a {type(model).__name__}: exactgn saves RevMLP, MLP and ResMLP")
    config = model.config()
    return config if kinds[0] == "revmlp" else {"kind": kinds[0], **config}


def model_from_config(config: dict[str, Any], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model a checkpoint's ``model_config`` describes (without ``kind``: a RevMLP), in ``dtype``."""
    args = dict(config)
    kind = args.pop("kind", "revmlp")
    if kind not in MODEL_CLASSES:
        raise ValueError(f"model_config has kind {kind!r}; known kinds: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[kind](**args, dtype=dtype)


# ---------------------------------------------------------------------------- RNG
def rng_states(data_generator: torch.Generator) -> dict[str, Any]:
    """The state of every random number generator a run touches: torch (CPU, CUDA), numpy, python, data
    order."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "data": data_generator.get_state(),
    }


def restore_rng_states(states: dict[str, Any], data_generator: torch.Generator) -> None:
    """Inverse of :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    npy = states["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    py = states["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    data_generator.set_state(states["data"])


# ---------------------------------------------------------------------------- writing
def _save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, fsync, rename: the previous checkpoint survives any failure."""
    _save(path, {"format": CHECKPOINT_FORMAT, **payload})


def save_weights(path: str | os.PathLike, model: torch.nn.Module, epoch: int) -> None:
    """``checkpoints/epoch_NNNN.pt``: ``{"model", "model_config", "epoch"}``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _save(path, {"model": state, "model_config": model_config(model), "epoch": epoch})


# ---------------------------------------------------------------------------- reading
def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    """Any exactgn checkpoint as a dict, on the CPU; ``FileNotFoundError`` or ``ValueError`` naming the
    file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad or foreign pickle, ...
        raise ValueError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); it is corrupt, "
            "truncated or not a checkpoint"
        ) from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not an exactgn checkpoint (it holds a {type(payload).__name__})")
    return payload


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A resumable checkpoint (``last.pt``); a clear error when it is missing, truncated or of another
    format."""
    payload = read_payload(path)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an exactgn checkpoint of format {CHECKPOINT_FORMAT}")
    return payload


def _model_parts(payload: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    missing = [k for k in ("model", "model_config") if not isinstance(payload.get(k), dict)]
    if missing:
        raise ValueError(
            f"{path} is not an exactgn checkpoint: it lacks {missing} (checkpoints hold 'model' and "
            "'model_config'; use RUN/checkpoints/last.pt or RUN/checkpoints/epoch_NNNN.pt)"
        )
    return payload["model"], payload["model_config"]


def _checkpoint_file(source: str | os.PathLike, epoch: int | None) -> Path:
    """A checkpoint file, or the one a run folder holds (``last.pt``, or ``epoch_NNNN.pt`` for ``epoch``)."""
    source = Path(source)
    if not source.is_dir():
        return source
    path = last_checkpoint(source) if epoch is None else epoch_checkpoint(source, epoch)
    if not path.is_file():
        hint = (
            ""
            if epoch is None
            else "; epoch checkpoints are kept when the run has train.keep_checkpoints = true"
        )
        raise FileNotFoundError(f"run folder {source} has no {path.relative_to(source)}{hint}")
    return path


def load_model(source: str | os.PathLike, epoch: int | None = None) -> tuple[nn.Module, int]:
    """``(model, epoch)`` from a checkpoint file, or from a run folder: its final model (``last.pt``) or, for
    ``epoch``, ``checkpoints/epoch_NNNN.pt``. The model has the checkpoint's dtype and is on the CPU."""
    path = _checkpoint_file(source, epoch)
    payload = read_payload(path)
    state, config = _model_parts(payload, path)
    if not isinstance(payload.get("epoch"), int):
        raise ValueError(f"{path} lacks its 'epoch'; checkpoints hold 'model', 'model_config' and 'epoch'")
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    model = model_from_config(config, dtype)
    model.load_state_dict(state)
    return model, int(payload["epoch"])


def resolve_init_from(path: str | os.PathLike) -> Path:
    """The checkpoint file that ``model.init_from = path`` names: the file itself, or a run folder's
    ``checkpoints/last.pt``; absolute. A clear error when there is none."""
    given = Path(path).expanduser()
    resolved = given.resolve()
    if resolved.is_dir():
        for candidate in (last_checkpoint(resolved), resolved / "last.pt"):
            if candidate.is_file():
                return candidate
        raise ConfigError(
            f"model.init_from: {given} is a folder without checkpoints/last.pt; give a run folder whose run "
            "has started, or a checkpoint file (RUN/checkpoints/last.pt or RUN/checkpoints/epoch_NNNN.pt)"
        )
    if not resolved.is_file():
        raise ConfigError(
            f"model.init_from: {given} does not exist (resolved to {resolved}); give a checkpoint file "
            "(RUN/checkpoints/last.pt or RUN/checkpoints/epoch_NNNN.pt) or a run folder"
        )
    return resolved


def _arch_keys(config: dict[str, Any]) -> dict[str, str]:
    """The keys of a ``model_config`` that must agree for weights to load, and the config keys setting
    them."""
    if config.get("kind", "revmlp") == "revmlp":
        return _REVMLP_ARCH_KEYS
    keys = {k: _REVMLP_ARCH_KEYS.get(k, f"model.{k}") for k in config if k not in _SEED_KEYS}
    return {**keys, "kind": "model.kind"}


def _check_architecture(file: Path, theirs: dict[str, Any], model: nn.Module) -> None:
    ours = model_config(model)
    keys = {**_arch_keys(theirs), **_arch_keys(ours)}
    differ = [(key, theirs.get(key), ours.get(key)) for key in keys if theirs.get(key) != ours.get(key)]
    if differ:
        detail = "; ".join(
            f"{key}: checkpoint {a!r}, this config {b!r} (set by {keys[key]})" for key, a, b in differ
        )
        raise ConfigError(
            f"model.init_from: the architecture of {file} does not match this run's model: "
            f"{detail}. Make the config's model (and dataset) match the checkpoint's, or start "
            "from another checkpoint"
        )


def load_init_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load the weights (and the fixed bottlenecks and readout) of an earlier run's checkpoint into ``model``.

    ``path``: a checkpoint (``last.pt`` or ``epoch_NNNN.pt``) or a run folder. The checkpoint's architecture
    (``d``, ``k``, ``L``, ``h``, bias) must be ``model``'s; its dtype may differ (values are cast). Only the
    model is loaded: no optimiser state, no RNG state. Returns the provenance recorded in ``meta.json`` as
    ``init_from``: ``path``, ``sha256``, ``epoch``, ``global_step``, ``optimiser``, ``run`` (the source run
    folder), ``run_name`` and ``dtype``. Raises :class:`ConfigError` naming what is wrong.
    """
    file = resolve_init_from(path)
    try:
        payload = read_payload(file)
        state, config = _model_parts(payload, file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.init_from: {exc}") from exc
    _check_architecture(file, config, model)
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise ConfigError(
            f"model.init_from: the tensors in {file} do not fit this run's model (names or shapes differ)"
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(dtype=expected[k].dtype) for k, v in state.items()})
    source_cfg = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    epoch = payload.get("epoch")
    return {
        "path": str(file),
        "sha256": file_sha256(file),
        "epoch": int(epoch) if isinstance(epoch, int) else None,
        "global_step": payload.get("global_step"),
        "optimiser": payload.get("optimizer_name") or (source_cfg.get("optim", {}) or {}).get("name"),
        "run": str(run_of_checkpoint(file)),
        "run_name": source_cfg.get("name"),
        "dtype": str(next(iter(state.values())).dtype).removeprefix("torch.") if state else None,
    }
