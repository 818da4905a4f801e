"""The one result type every hypergradient method returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


class NonFiniteError(ValueError):
    """The outer loss or a hypergradient is NaN or infinite."""


@dataclass
class HypergradResult:
    """Outer loss ``F``, hypergradient ``dF/dh`` (a dict shaped like ``hyper``) and diagnostics.

    ``peak_bytes`` is the peak size of the stored inner trajectory: the tensors that autograd saved
    for the recorded steps plus the stored checkpoints (or, in forward mode, the tangents).
    """

    loss: Tensor
    grads: dict[str, Tensor]
    params: dict[str, Tensor]
    method: str
    steps: int
    peak_bytes: int
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific: implicit's solver report
    buffers: dict[str, Tensor] = field(default_factory=dict)  # module buffers the outer loss read ({}: none)
