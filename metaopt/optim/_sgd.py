"""SGD, heavy-ball momentum and Nesterov momentum as differentiable ``init``/``update`` pairs.

PyTorch's conventions (``torch.optim.SGD`` with ``dampening=0``)::

    g   = grad + weight_decay * w
    v'  = momentum * v + g                  (momentum variants only)
    w'  = w - lr * v'                       (heavy ball)
    w'  = w - lr * (g + momentum * v')      (Nesterov)

Fixed point (``residual``): ``grad + weight_decay * w = 0`` for all three (the velocity is then 0),
for any ``lr > 0`` and ``0 <= momentum < 1`` with which the iteration converges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .base import (
    HParam,
    Optimizer,
    Params,
    State,
    add_decay,
    check_grads,
    check_spec,
    coupled_residual,
    merge_hparams,
    refuse_parameters,
    resolve,
)

RANGES = {"lr": (0.0, None, False), "momentum": (0.0, 1.0, True), "weight_decay": (0.0, None, False)}


@dataclass(frozen=True)
class SGDSpec:
    """What an SGD-family optimizer was built with (its :attr:`~metaopt.optim.Optimizer.spec`).

    ``momentum is None``: plain SGD; otherwise heavy-ball, or Nesterov with ``nesterov=True``.
    ``build()`` makes the optimizer (``dataclasses.replace(spec, momentum=...).build()`` a variant).
    """

    lr: HParam = 0.01
    momentum: HParam | None = None
    nesterov: bool = False
    weight_decay: HParam = 0.0

    def __new__(cls, *args: Any, **kwargs: Any) -> SGDSpec:
        refuse_parameters(cls.__name__, args)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        check_spec(self.kind, {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}, RANGES)
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"optim.{self.kind}(nesterov={self.nesterov!r}): nesterov must be True or False")
        if self.nesterov and self.momentum is None:
            raise ValueError("sgd: nesterov=True needs a momentum value (e.g. momentum=0.9)")

    @property
    def kind(self) -> str:
        return "nesterov" if self.nesterov else ("momentum" if self.momentum is not None else "sgd")

    @property
    def heavy_ball(self) -> bool:
        """Heavy-ball momentum SGD (a velocity, no Nesterov look-ahead)."""
        return self.momentum is not None and not self.nesterov

    def build(self) -> Optimizer:
        return sgd(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay)


def sgd(
    lr: HParam = 0.01,
    momentum: HParam | None = None,
    nesterov: bool = False,
    weight_decay: HParam = 0.0,
) -> Optimizer:
    """Stochastic gradient descent; with ``momentum`` given, heavy-ball (or Nesterov) momentum.

    Examples:
        One heavy-ball step, ``g = grad + 0.01 w``, ``v = g``, ``w - 0.1 v``; then the same step
        with a learning rate that requires grad, differentiated (``-sum(g)``):

        >>> import torch
        >>> from metaopt import optim
        >>> opt = optim.sgd(lr=0.1, momentum=0.9, weight_decay=0.01)
        >>> params, grads = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 0.5])}
        >>> state = opt.init(params)
        >>> state
        {'velocity': {'w': tensor([0., 0.])}}
        >>> new, state = opt.update(grads, state, params, step=0)
        >>> new["w"], state["velocity"]["w"]
        (tensor([ 0.9490, -2.0480]), tensor([0.5100, 0.4800]))
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> new, _ = opt.update(grads, opt.init(params), params, step=0, lr=lr)
        >>> torch.autograd.grad(new["w"].sum(), lr)
        (tensor(-0.9900),)

    Args:
        lr: the step size. Every hyperparameter may be a float, a tensor (scalar, ``[m]`` per member
            or the parameter's shape), a per-parameter dict or a schedule ``k -> value``;
            ``update``'s keyword arguments override them per call.
        momentum: ``None`` keeps no velocity state; any value (even 0.0 or a learnable tensor)
            keeps one.
        weight_decay: coupled L2 decay, ``g + weight_decay * w``.
        nesterov: Nesterov's look-ahead (needs a momentum).

    Returns:
        An :class:`Optimizer` with ``spec`` an :class:`SGDSpec`; its state is ``{}`` or
        ``{"velocity": {name: tensor like the param}}``.
    """
    has_velocity = momentum is not None
    spec = SGDSpec(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    name = spec.kind
    defaults: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if has_velocity:
        defaults["momentum"] = momentum

    def init(params: Mapping[str, Tensor]) -> State:
        if not has_velocity:
            return {}
        return {"velocity": {k: p.detach().new_zeros(p.shape) for k, p in params.items()}}

    def update(
        grads: Mapping[str, Tensor], state: State, params: Mapping[str,
                                                                   Tensor], *, step: int | Tensor, **hparams: HParam
    ) -> tuple[Params, State]:
        check_grads(grads, params, name)
        h = merge_hparams(defaults, hparams, params, name, step)
        new_params: Params = {}
        velocity: dict[str, Tensor] = {}
        for key, w in params.items():
            g = add_decay(grads[key], w, resolve("weight_decay", h["weight_decay"], key, w, step))
            lr = resolve("lr", h["lr"], key, w, step)
            if has_velocity:
                mu = resolve("momentum", h["momentum"], key, w, step)
                v = mu * state["velocity"][key] + g
                velocity[key] = v
                g = g + mu * v if nesterov else v
            new_params[key] = w - lr * g
        return new_params, ({"velocity": velocity} if has_velocity else {})

    def residual(
        grads: Mapping[str, Tensor], params: Mapping[str, Tensor], *, step: int | Tensor, **hparams: HParam
    ) -> Params:
        """``grad + weight_decay * w``: zero exactly at the fixed point (the velocity is then zero too)."""
        check_grads(grads, params, name)
        return coupled_residual(grads, params, merge_hparams(defaults, hparams, params, name, step), step)

    return Optimizer(init, update, defaults, spec, residual)


def momentum(lr: HParam = 0.01, momentum: HParam = 0.9, weight_decay: HParam = 0.0) -> Optimizer:
    """Heavy-ball momentum SGD (``torch.optim.SGD(momentum=...)``)."""
    return sgd(lr=lr, momentum=momentum, weight_decay=weight_decay)


def nesterov(lr: HParam = 0.01, momentum: HParam = 0.9, weight_decay: HParam = 0.0) -> Optimizer:
    """Nesterov momentum SGD (``torch.optim.SGD(momentum=..., nesterov=True)``)."""
    return sgd(lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
