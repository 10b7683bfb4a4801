"""Exceptions raised by exactgn."""

from __future__ import annotations

__all__ = ["ExactGNError", "NonFiniteError", "InexactStepError"]


class ExactGNError(Exception):
    """Base class of exactgn's own errors."""


class NonFiniteError(ExactGNError, FloatingPointError):
    """A step, loss or parameter became NaN or infinite; nothing was changed."""


class InexactStepError(ExactGNError, ValueError):
    """The requested GN step cannot be exact at these sizes, and the caller did not accept a least-squares
    step."""
