"""Schedules ``k -> value`` for any optimizer hyperparameter, and positivity parametrisations.

A schedule is any callable of the inner step ``k``. A *learnable* schedule is a schedule built from
tensors that belong to the hyperparameters ``h``: e.g. ``table(h["raw_lr"], positive="softplus")``
is Wang et al.'s one learning rate per inner step, kept positive by a softplus rather than by
clamping (clamping kills the hypergradient at the boundary).

The ``*_epochs`` functions are the "train longer than distilled" transforms of Medvedev &
D'yakonov (2020, §5.3): they turn a learned table of ``epochs * steps_per_epoch`` rates into a
longer one (strategy 1 ignores the learned rates altogether).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["table", "constant", "exponential", "cosine", "at_step", "positive", "inverse_positive", "ramp_epochs",
           "repeat_epochs", "repeat_last_epoch", "Schedule", "Positive"]

Schedule = Callable[[int], Tensor | float]
"""A hyperparameter as a function of the inner step ``k`` (an int, or a 0-d integer tensor)."""
Positive = Literal["softplus", "exp", "sigmoid"] | None
"""How a raw, unconstrained table is made positive: see :func:`positive`."""


def positive(raw: Tensor, kind: Positive) -> Tensor:
    """Map an unconstrained tensor to a positive one: ``softplus(raw)``, ``exp(raw)``,
    ``sigmoid(raw)`` (into (0, 1): a momentum, a weight), or ``raw``."""
    if kind is None:
        return raw
    if kind == "softplus":
        return F.softplus(raw)
    if kind == "exp":
        return raw.exp()
    if kind == "sigmoid":
        return torch.sigmoid(raw)
    raise ValueError(f"positive: unknown parametrisation {kind!r}; use 'softplus', 'exp', 'sigmoid' or None")


def inverse_positive(value: Tensor | float, kind: Positive) -> Tensor:
    """The raw tensor whose :func:`positive` is ``value`` (to initialise learnable hyperparameters)."""
    value = torch.as_tensor(value, dtype=torch.get_default_dtype()) if not isinstance(value, Tensor) else value
    if kind is None:
        return value.clone()
    if torch.any(value <= 0):
        raise ValueError(f"inverse_positive: values must be > 0 for the {kind!r} parametrisation")
    if kind == "softplus":
        return value + torch.log(-torch.expm1(-value))  # log(exp(v) - 1), stable for large v
    if kind == "exp":
        return value.log()
    if kind == "sigmoid":
        if torch.any(value >= 1):
            raise ValueError("inverse_positive: values must be < 1 for the 'sigmoid' parametrisation")
        return torch.logit(value)
    raise ValueError(f"inverse_positive: unknown parametrisation {kind!r}; use 'softplus', 'exp', 'sigmoid' or None")


def at_step(values: Tensor, k: int | Tensor, dim: int = 0) -> Tensor:
    """``values`` at index ``k`` along ``dim`` (that dimension removed), for an int ``k`` or a 0-d
    integer tensor ``k`` (as the inner step arrives under ``hypergradient(..., compile=True)``);
    a gather rather than Python indexing, so ``torch.compile`` traces it without specialising on k."""
    if isinstance(k, Tensor):
        return values.index_select(dim, k.reshape(1)).squeeze(dim)
    if not 0 <= k < values.shape[dim]:
        raise IndexError(f"a per-step table of {values.shape[dim]} steps has no step {k}: a call from "
                         f"start=InnerState(step=s) runs the global steps s .. s + steps - 1, so give a table that "
                         f"covers them (or start at a step inside it)")
    return values.select(dim, k)


def constant(value: Tensor | float) -> Schedule:
    """The same value at every step."""
    return lambda k: value


def table(values: Tensor, positive: Positive = None) -> Schedule:
    """One value per inner step: step ``k`` uses ``positive(values[k])``.

    ``values`` has shape ``[n]`` or ``[n, ...]`` (e.g. ``[n, m]`` for one rate per step and
    ensemble member). Asking for a step past the table is an error, not a silent clamp: use one of
    the ``*_epochs`` transforms to train longer than the table.
    """
    if not isinstance(values, Tensor) or values.dim() == 0:
        raise ValueError("table: values must be a tensor with one row per inner step (shape [n, ...])")
    kind = positive
    n = values.shape[0]

    def schedule(k: int | Tensor) -> Tensor:
        if not isinstance(k, Tensor) and not 0 <= k < n:
            raise IndexError(f"table schedule has {n} steps; step {k} is outside it")
        return _positive(at_step(values, k), kind)

    return schedule


_positive = positive


def exponential(init: Tensor | float, decay: Tensor | float, every: int = 1, staircase: bool = False) -> Schedule:
    """``init * decay ** (k / every)`` (``floor(k / every)`` with ``staircase``)."""
    if every <= 0:
        raise ValueError(f"exponential: every must be >= 1, got {every}")
    return lambda k: init * decay ** ((k // every) if staircase else (k / every))


def cosine(init: Tensor | float, steps: int, final: Tensor | float = 0.0) -> Schedule:
    """Cosine decay from ``init`` to ``final`` over ``steps`` steps, then ``final``."""
    if steps <= 0:
        raise ValueError(f"cosine: steps must be >= 1, got {steps}")

    def schedule(k: int | Tensor) -> Tensor | float:
        if isinstance(k, Tensor):
            c = 0.5 * (1.0 + torch.cos(math.pi * k.clamp(max=steps) / steps))
        else:
            c = 0.5 * (1.0 + math.cos(math.pi * min(k, steps) / steps))
        return final + (init - final) * c

    return schedule


def ramp_epochs(
    steps_per_epoch: int,
    epochs: int = 50,
    init: float = 0.3,
    up: float = 1.1,
    up_epochs: int = 10,
    down: float = 0.95,
) -> Tensor:
    """Strategy 1 of Medvedev & D'yakonov: ignore the learned rates.

    Epoch ``e`` (0-based) uses ``init * up**min(e, up_epochs) * down**max(0, e - up_epochs)`` for all
    of its ``steps_per_epoch`` steps. Returns a table of shape ``[epochs * steps_per_epoch]``.
    """
    _check_positive(steps_per_epoch=steps_per_epoch, epochs=epochs)
    e = torch.arange(epochs, dtype=torch.get_default_dtype())
    rate = init * up ** e.clamp(max=up_epochs) * down ** (e - up_epochs).clamp(min=0)
    return rate.repeat_interleave(steps_per_epoch)


def repeat_epochs(rates: Tensor, steps_per_epoch: int, repeats: int = 10, gamma: float = 0.98) -> Tensor:
    """Strategy 2: repeat all distilled epochs ``repeats`` times, the r-th copy scaled by ``gamma**r``.

    ``rates`` is the learned table ``[epochs * steps_per_epoch, ...]``; the result is
    ``[repeats * epochs * steps_per_epoch, ...]``. The paper states ``gamma = 0.98``; its public code
    used 0.9.
    """
    _check_table(rates, steps_per_epoch)
    _check_positive(repeats=repeats)
    scale = gamma ** torch.arange(repeats, dtype=rates.dtype, device=rates.device)
    out = scale.reshape((repeats,) + (1,) * rates.dim()) * rates.unsqueeze(0)
    return out.reshape((-1,) + rates.shape[1:])


def repeat_last_epoch(rates: Tensor, steps_per_epoch: int, extra_epochs: int = 45, gamma: float = 0.98) -> Tensor:
    """Strategy 3: after the distilled epochs, repeat only the last one, compounding ``gamma`` each time.

    Result: ``[(epochs + extra_epochs) * steps_per_epoch, ...]``; repeat ``j`` (1-based) of the last
    epoch is scaled by ``gamma**j``.
    """
    _check_table(rates, steps_per_epoch)
    _check_positive(extra_epochs=extra_epochs)
    last = rates[-steps_per_epoch:]
    scale = gamma ** torch.arange(1, extra_epochs + 1, dtype=rates.dtype, device=rates.device)
    extra = (scale.reshape((extra_epochs,) + (1,) * last.dim()) * last.unsqueeze(0)).reshape((-1,) + rates.shape[1:])
    return torch.cat([rates, extra])


def _check_table(rates: Tensor, steps_per_epoch: int) -> None:
    _check_positive(steps_per_epoch=steps_per_epoch)
    if rates.dim() == 0 or rates.shape[0] % steps_per_epoch:
        raise ValueError(
            f"rates of shape {tuple(rates.shape)} are not a whole number of epochs of "
            f"{steps_per_epoch} steps"
        )


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v <= 0:
            raise ValueError(f"{name} must be >= 1, got {v}")
