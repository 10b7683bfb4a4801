"""Numerical precision of the GN steps: what each option costs in accuracy.

Three knobs, freely combined:

* the model's dtype (``RevMLP(..., dtype=torch.float64)`` or ``model.double()``): everything in that
precision;
* ``solve_dtype="float64"`` (GaussNewton) / ``solve_dtype=torch.float64`` (gn_direction): the Gram matrices
  are formed in the model's precision but factorised and solved in float64;
* TF32 matrix products on CUDA (:func:`matmul_precision`): float32 products with 10-bit mantissas on
  tensor cores, several times faster on Ampere and Hopper GPUs.

Error model. The GN steps go through Gram matrices (DESIGN §3), so their relative error in function space,
``‖J·Δθ − v‖/‖v‖``, grows like ``u·cond(A)²`` where ``u`` is the unit roundoff of the matrix products
(float64 1.1e-16, float32 6.0e-8, TF32 4.9e-4) and ``A`` is the worst-conditioned activation matrix (right
inverse) or ``J`` itself (minimum-norm step). ``ERROR_BOUNDS`` are the bounds exactgn documents and tests
(``tests/test_precision.py``) for well-conditioned batches (every ``cond(A_j) ≤ 100``), in function space
and in parameter space against a float64 reference. Float64 solves do not tighten them much: the Gram is
already rounded when it is formed; they help when a float32 Cholesky fails on an ill-conditioned Gram.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = [
    "DTYPES",
    "ERROR_BOUNDS",
    "SOLVE_DTYPES",
    "as_solve_dtype",
    "dtype_from_name",
    "working_dtype",
    "matmul_precision",
    "tf32_enabled",
    "unit_roundoff",
]

#: Documented relative error bounds of a GN direction for each precision, on well-conditioned batches.
ERROR_BOUNDS = {"float64": 1e-10, "float32": 1e-5, "tf32": 1e-2}

_TF32_UNIT_ROUNDOFF = 2.0**-11  # 10 explicit mantissa bits

#: The precisions the Gram factorisations run in (torch has no float16/bfloat16 Cholesky or eigh).
#: The floating-point dtypes exactgn computes and solves in, by the names configurations and options use.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
SOLVE_DTYPES = DTYPES  # the dtypes a Gram factorisation may use: the same two


def as_solve_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``solve_dtype`` as a ``torch.dtype``: ``None`` (the model's precision), float32 or float64, given as a
    ``torch.dtype`` or its name (``"float64"``, ``"torch.float64"``)."""
    if value is None:
        return None
    if isinstance(value, str) and value.removeprefix("torch.") in SOLVE_DTYPES:
        return SOLVE_DTYPES[value.removeprefix("torch.")]
    if isinstance(value, torch.dtype) and value in SOLVE_DTYPES.values():
        return value
    raise ValueError(
        "solve_dtype must be None (the model's precision), 'float32' or 'float64' (or torch.float32/"
        f"torch.float64), got {value!r}; the Gram factorisations need single or double precision"
    )


def working_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The precision GN steps are computed in for a model of ``model_dtype``: float32 for float16/bfloat16
    models (their Grams overflow at float16's 65504 and torch cannot factorise them), else the model's."""
    return torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` → ``torch.float32``, ``"float64"`` → ``torch.float64``; a clear error otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}") from None


def tf32_enabled() -> bool:
    """Whether float32 matrix products may use TF32 (torch's CUDA flag; it has no effect on the CPU)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of matrix products in ``dtype`` under the current TF32 setting."""
    if dtype == torch.float32 and tf32_enabled():
        return _TF32_UNIT_ROUNDOFF
    return torch.finfo(dtype).eps / 2


@contextmanager
def matmul_precision(tf32: bool) -> Iterator[None]:
    """Within the block, allow (``tf32=True``) or forbid TF32 matrix products and convolutions on CUDA."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
