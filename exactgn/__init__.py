"""exactgn: exact Gauss–Newton optimisation in deep reversible MLPs.

Quick start::

    import torch, exactgn
    model = exactgn.RevMLP(784, 10, num_blocks=2, hidden=1024)
    opt = exactgn.GaussNewton(model, lr=0.5, inverse="pinv")
    loss = opt.step(images, labels)
"""

from .errors import ExactGNError, InexactStepError, NonFiniteError
from .generic import (
    MemoryBoundError,
    RightInverseError,
    UnsupportedModelError,
    generic_direction,
    generic_ntk_gram,
    gn_step_flops,
)
from .gn import GNResult, compute_direction, gn_direction, jvp_logits, ntk_gram, output_cotangents
from .linalg import GramFallbackWarning, Regularisation, gram_solve
from .linear_view import linear_view
from .losses import loss_value, newton_target
from .model import RevMLP
from .models import MLP, ResMLP, mlp_width_for
from .optim import GaussNewton

__version__ = "0.1.0"

__all__ = [
    "RevMLP",
    "MLP",
    "ResMLP",
    "mlp_width_for",
    "linear_view",
    "generic_direction",
    "generic_ntk_gram",
    "gn_step_flops",
    "UnsupportedModelError",
    "MemoryBoundError",
    "RightInverseError",
    "GaussNewton",
    "gn_direction",
    "compute_direction",
    "GNResult",
    "ntk_gram",
    "output_cotangents",
    "jvp_logits",
    "loss_value",
    "newton_target",
    "gram_solve",
    "Regularisation",
    "GramFallbackWarning",
    "ExactGNError",
    "InexactStepError",
    "NonFiniteError",
]
