"""One inner optimisation step, in the variants the hypergradient methods need.

* :func:`step` — eager; the inner gradient by ``torch.autograd.grad``, with its graph kept
  (``create_graph=True``) when the step is recorded for the reverse sweep, or not at all.
* :func:`step_functional` — the inner gradient by ``torch.func.grad``, so the step composes with
  ``jvp``/``vmap`` (forward mode) and with ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from ..objective import MetaObjective
from ..optim.base import Optimizer, Params, State

Hyper = Mapping[str, Tensor]


def step(
    objective: MetaObjective,
    optimizer: Optimizer,
    k: int,
    params: Params,
    state: State,
    hyper: Hyper,
    batch: Any,
    record: bool,
) -> tuple[Params, State]:
    """``params[k+1], state[k+1]``. With ``record`` the result is differentiable w.r.t. ``params``,
    ``state`` and ``hyper`` (the caller makes them leaves that require grad); without it nothing is kept."""
    with torch.enable_grad():
        if not record:
            params = {n: p.detach().requires_grad_() for n, p in params.items()}
        loss = objective.inner_loss(params, hyper, k, batch)
        _check_loss(loss, k)
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=record, allow_unused=True)
    grads_d = {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)}
    with torch.set_grad_enabled(record):
        if not record:
            params = {n: p.detach() for n, p in params.items()}
        return optimizer.update(grads_d, state, params, step=k, **objective.hparams(hyper))


def step_functional(
    objective: MetaObjective,
    optimizer: Optimizer,
    k: int,
    params: Params,
    state: State,
    hyper: Hyper,
    batch: Any,
) -> tuple[Params, State]:
    """The same step written with ``torch.func.grad`` (composes with every ``torch.func`` transform)."""
    grads = grad(lambda p: objective.inner_loss(p, hyper, k, batch))(params)
    return optimizer.update(grads, state, params, step=k, **objective.hparams(hyper))


def _check_loss(loss: Any, k: int) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"inner_loss must return a scalar tensor (sum the members' losses for an ensemble); "
            f"got {shape} at step {k}"
        )
