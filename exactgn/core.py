"""What both GN engines share: the direction's result type, the inverse choices, chunked Grams.

:mod:`exactgn.gn` computes GN directions for :class:`~exactgn.RevMLP` with its structure (DESIGN §3);
:mod:`exactgn.generic` for any ``nn.Module``. Both build on this module, and ``gn`` dispatches to ``generic``,
so the shared pieces live below both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .linalg import SolveInfo

__all__ = ["INVERSES", "GNResult", "GRAM_CHUNKS", "chunk_edges", "symmetrise_lower"]

INVERSES = ("right", "pinv")


@dataclass
class GNResult:
    """Everything one GN direction computation produced.

    direction: parameter name → tensor shaped like the parameter (the step is ``θ − lr·direction``).
    logits: ``B × k`` at the current parameters; targets: ``B × k`` rows; v: ``B × k``, ``H⁺g``.
    loss: the mean loss on the batch before the step (0-dim tensor).
    solves: one :class:`SolveInfo` per Gram solve (``2L`` for the right inverse, 1 for pinv).
    """

    direction: dict[str, Tensor]
    logits: Tensor
    targets: Tensor
    v: Tensor
    loss: Tensor
    solves: list[SolveInfo] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when every solve was an exact one (an unregularised Cholesky or QR solve)."""
        return all(s.method in ("cholesky", "qr") for s in self.solves)


GRAM_CHUNKS = 8  # row chunks of the lower-triangle Grams (more chunks: less work, smaller products)


def chunk_edges(batch: int) -> list[int]:
    """Row boundaries of the :data:`GRAM_CHUNKS` chunks in which Grams of ``batch`` rows are computed."""
    return torch.linspace(0, batch, min(GRAM_CHUNKS, batch) + 1).round().long().tolist()


def symmetrise_lower(lower: Tensor) -> Tensor:
    """Full symmetric matrix from its lower triangle."""
    return torch.tril(lower) + torch.tril(lower, -1).T
