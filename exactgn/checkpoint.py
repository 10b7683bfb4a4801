"""Checkpoints of a run: atomic ``torch.save``, every RNG state, and safe loading.

Everything in a checkpoint is a tensor, number, string, list or dict, so it loads with
``torch.load(..., weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .runlog import atomic_write_bytes

__all__ = ["CHECKPOINT_FORMAT", "rng_states", "restore_rng_states", "save_checkpoint", "load_checkpoint", "save_weights"]

CHECKPOINT_FORMAT = 1


def rng_states(data_generator: torch.Generator) -> dict[str, Any]:
    """The state of every random number generator a run touches: torch (CPU and CUDA), numpy, python, data order."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "data": data_generator.get_state(),
    }


def restore_rng_states(states: dict[str, Any], data_generator: torch.Generator) -> None:
    """Inverse of :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    npy = states["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = states["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    data_generator.set_state(states["data"])


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, fsync, rename: the previous checkpoint survives any failure."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buf)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on the CPU; a clear error when it is missing, truncated or of an unknown format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, ...
        raise ValueError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc}); it is corrupt or truncated") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an exactgn checkpoint of format {CHECKPOINT_FORMAT}")
    return payload


def save_weights(path: str | os.PathLike, model: torch.nn.Module, epoch: int) -> None:
    """``checkpoints/epoch_NNNN.pt``: ``{"model", "model_config", "epoch"}`` (rebuild with ``RevMLP(**model_config)``)."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": state, "model_config": model.config(), "epoch": epoch}, buf)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
