"""The one result type every hypergradient method returns, and the inner state a call starts from
and ends in (:class:`InnerState`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


class NonFiniteError(ValueError):
    """The outer loss or a hypergradient is NaN or infinite."""


@dataclass(frozen=True)
class InnerState:
    """The inner run between two calls: where :func:`metaopt.hypergradient` and
    :func:`~metaopt.hypergrad.train` start (``start=``) and end (``HypergradResult.final``,
    ``train(..., return_state=True)``), so that a long inner run learned in windows continues its
    momentum, Adam's moments and bias correction, schedules, batches and random draws.

    Attributes:
        params: ``{name: tensor}``, the inner params (detached: constants of the next window).
        opt_state: the optimizer's slots ``{slot: {name: tensor}}`` (``optimizer.init(params)``'s
            structure, names, shapes and dtypes; ``{}`` for plain SGD), without module buffers;
            ``None``: a fresh ``optimizer.init(params)``.
        step: the global index of the next inner step (``>= 0``). A call of ``steps`` steps runs the
            global steps ``step .. step + steps - 1``: the optimizer's ``step=``, ``inner_loss``'s
            and ``hparams``' ``k``, ``inner_batch(k, generator)`` and the random draws all see them.
        buffers: the objective's module buffers ``{name: tensor}``; ``{}``: ``init_buffers``' (or none).
        seed: the seed of the run's random-draw stream (dropout, ``torch.rand*`` in the losses);
            ``None``: derived from the call's ``generator`` as usual.
    """

    params: dict[str, Tensor]
    opt_state: dict[str, dict[str, Tensor]] | None = None
    step: int = 0
    buffers: dict[str, Tensor] = field(default_factory=dict)
    seed: int | None = None


@dataclass
class HypergradResult:
    """Outer loss ``F``, hypergradient ``dF/dh`` (a dict shaped like ``hyper``) and diagnostics.

    ``peak_bytes`` is the peak size of the stored inner trajectory: the tensors that autograd saved
    for the recorded steps plus the stored checkpoints (or, in forward mode, the tangents).
    ``final`` is the inner state the run ended in (detached; ``step`` is the start's plus the steps
    run), to give the next call as ``start=``; ``None`` for a method that does not return its
    optimizer state.
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
    final: InnerState | None = None
