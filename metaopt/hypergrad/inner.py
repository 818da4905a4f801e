"""One inner optimisation step, in the variants the hypergradient methods need.

* :func:`step` — eager; the inner gradient by ``torch.autograd.grad``, with its graph kept
  (``create_graph=True``) when the step is recorded for the reverse sweep, or not at all.
* :func:`step_functional` — the inner gradient by ``torch.func.grad``, so the step composes with
  ``jvp``/``vmap`` (forward mode) and with ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from ..objective import MetaObjective, check_inner_loss
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
    autocast: torch.dtype | None = None,
) -> tuple[Params, State]:
    """``params[k+1], state[k+1]``. With ``record`` the result is differentiable w.r.t. ``params``,
    ``state`` and ``hyper`` (the caller makes them leaves that require grad); without it nothing is kept.
    ``autocast``: the inner loss and its gradient under ``torch.autocast`` at that dtype (the update
    and the state stay in the params' dtype)."""
    if not record:
        params = {n: p.detach().requires_grad_() for n, p in params.items()}
    with precision(autocast, params):
        _, grads = objective.inner_value_and_grad(params, hyper, k, batch, create_graph=record)
    with torch.set_grad_enabled(record):
        if not record:
            params = {n: p.detach() for n, p in params.items()}
        return optimizer.update(grads, state, params, step=k, **objective.hparams(hyper))


def precision(dtype: torch.dtype | None, params: Params) -> contextlib.AbstractContextManager:
    """``torch.autocast`` at ``dtype`` on the params' device type, or nothing for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(iter(params.values())).device.type, dtype=dtype)


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
    def loss(p: Params) -> Tensor:
        value = objective.inner_loss(p, hyper, k, batch)
        check_inner_loss(value, k)
        return value

    grads = grad(loss)(params)
    return optimizer.update(grads, state, params, step=k, **objective.hparams(hyper))


CompiledStep = Callable[[Tensor, Params, State, Hyper, Any], tuple[Params, State]]
_COMPILED: weakref.WeakKeyDictionary[MetaObjective, dict[int, tuple[Optimizer, CompiledStep]]] = (
    weakref.WeakKeyDictionary()
)


def compiled_step(objective: MetaObjective, optimizer: Optimizer) -> CompiledStep:
    """:func:`step_functional` under ``torch.compile``, taking the step index as a 0-d int64 tensor
    (so one graph serves every step). Memoised per (objective, optimizer): compiling costs seconds.

    The objective's ``inner_loss`` and ``hparams`` then see ``k`` as a tensor: select per-step values
    with :func:`metaopt.optim.schedule.at_step` (a gather), not Python indexing or ``if`` on ``k``.
    """
    per_objective = _COMPILED.setdefault(objective, {})
    hit = per_objective.get(id(optimizer))
    if hit is not None and hit[0] is optimizer:
        return hit[1]

    def one_step(k: Tensor, params: Params, state: State, hyper: Hyper, batch: Any) -> tuple[Params, State]:
        return step_functional(objective, optimizer, k, params, state, hyper, batch)

    # dynamo caches graphs per code object, with a limit of recompiles on each: a fresh code object
    # per (objective, optimizer) keeps their graphs apart instead of piling guards on one function.
    fresh = types.FunctionType(
        one_step.__code__.replace(), one_step.__globals__, "one_step", None, one_step.__closure__
    )
    fn = torch.compile(fresh)
    per_objective[id(optimizer)] = (optimizer, fn)
    return fn
