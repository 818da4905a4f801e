"""Adam (and AdamW) as a differentiable ``init``/``update`` pair.

With ``t = step + 1``::

    g   = grad + weight_decay * w                       (coupled decay; AdamW decouples it)
    m'  = b1 * m + (1 - b1) * g
    v'  = b2 * v + (1 - b2) * g**2
    w'  = w - lr * (m' / (1 - b1**t)) / (sqrt(v' / (1 - b2**t) + eps_root) + eps)

``eps_root > 0`` keeps ``d sqrt(v)/dv`` finite where a gradient is exactly zero (dead ReLU units,
unused inputs); with ``eps_root = 0`` the second derivative there is ``inf * 0 = nan``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .base import HParam, Optimizer, Params, State, check_grads, merge_hparams, resolve


@dataclass(frozen=True)
class Adam:
    """What an Adam-family optimizer was built with (its :attr:`~metaopt.optim.Optimizer.spec`);
    ``decoupled=True`` is AdamW. ``build()`` makes the optimizer."""

    lr: HParam = 1e-3
    b1: HParam = 0.9
    b2: HParam = 0.999
    eps: HParam = 1e-8
    eps_root: HParam = 1e-16
    weight_decay: HParam = 0.0
    decoupled: bool = False

    @property
    def kind(self) -> str:
        return "adamw" if self.decoupled else "adam"

    def build(self) -> Optimizer:
        return adam(lr=self.lr, b1=self.b1, b2=self.b2, eps=self.eps, eps_root=self.eps_root,
                    weight_decay=self.weight_decay, decoupled=self.decoupled)


def adam(
    lr: HParam = 1e-3,
    b1: HParam = 0.9,
    b2: HParam = 0.999,
    eps: HParam = 1e-8,
    eps_root: HParam = 1e-16,
    weight_decay: HParam = 0.0,
    decoupled: bool = False,
) -> Optimizer:
    """Adam with bias correction; ``decoupled=True`` gives AdamW's ``w -= lr * weight_decay * w``.

    Examples:
        The first step moves every element by about ``lr`` against its gradient's sign (the
        bias-corrected moments are ``g`` and ``g**2``); the state holds both moments:

        >>> import torch
        >>> from metaopt import optim
        >>> opt = optim.adam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = opt.init(params)
        >>> sorted(state), state["mu"]["w"].shape
        (['mu', 'nu'], torch.Size([2]))
        >>> params, state = opt.update({"w": torch.tensor([0.5, -0.25])}, state, params, step=0)
        >>> params["w"], state["mu"]["w"], state["nu"]["w"]
        (tensor([ 0.9000, -1.9000]), tensor([ 0.0500, -0.0250]), tensor([2.5000e-04, 6.2500e-05]))

    Args:
        lr: the step size. Every hyperparameter may be a float, a tensor, a per-parameter dict or a
            schedule (any ``HParam`` form).
        b1: the first moment's decay.
        b2: the second moment's decay.
        eps: added to the root of the second moment.
        eps_root: added inside the root: ``> 0`` keeps the second derivative finite at zero gradients.
        weight_decay: L2 decay, coupled (Adam) or decoupled (AdamW).
        decoupled: AdamW's decoupled weight decay.

    Returns:
        An :class:`Optimizer` with ``spec`` an :class:`Adam`; its state is ``{"mu": ..., "nu": ...}``,
        each ``{name: tensor like the param}``.
    """
    spec = Adam(lr=lr, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay, decoupled=decoupled)
    name = spec.kind
    defaults: dict[str, Any] = {
        "lr": lr, "b1": b1, "b2": b2, "eps": eps, "eps_root": eps_root, "weight_decay": weight_decay,
    }

    def init(params: Mapping[str, Tensor]) -> State:
        return {
            "mu": {k: p.detach().new_zeros(p.shape) for k, p in params.items()},
            "nu": {k: p.detach().new_zeros(p.shape) for k, p in params.items()},
        }

    def update(
        grads: Mapping[str, Tensor], state: State, params: Mapping[str,
                                                                   Tensor], *, step: int | Tensor, **hparams: HParam
    ) -> tuple[Params, State]:
        check_grads(grads, params, name)
        h = merge_hparams(defaults, hparams, params, name, step)
        t = step + 1
        new_params: Params = {}
        mu: dict[str, Tensor] = {}
        nu: dict[str, Tensor] = {}
        for key, w in params.items():
            g = grads[key]
            r = {n: resolve(n, h[n], key, w, step) for n in ("lr", "b1", "b2", "eps", "eps_root", "weight_decay")}
            wd = r["weight_decay"]
            decay = not (isinstance(wd, float) and wd == 0.0)
            if decay and not decoupled:
                g = g + wd * w
            m = r["b1"] * state["mu"][key] + (1 - r["b1"]) * g
            v = r["b2"] * state["nu"][key] + (1 - r["b2"]) * (g * g)
            m_hat = m / (1 - r["b1"] ** t)
            v_hat = v / (1 - r["b2"] ** t)
            direction = m_hat / ((v_hat + r["eps_root"]).sqrt() + r["eps"])
            if decay and decoupled:
                direction = direction + wd * w
            new_params[key] = w - r["lr"] * direction
            mu[key], nu[key] = m, v
        return new_params, {"mu": mu, "nu": nu}

    return Optimizer(init, update, defaults, spec)


def adamw(
    lr: HParam = 1e-3,
    weight_decay: HParam = 1e-2,
    b1: HParam = 0.9,
    b2: HParam = 0.999,
    eps: HParam = 1e-8,
    eps_root: HParam = 1e-16,
) -> Optimizer:
    """AdamW: Adam with decoupled weight decay (``torch.optim.AdamW``)."""
    return adam(lr=lr, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay, decoupled=True)
