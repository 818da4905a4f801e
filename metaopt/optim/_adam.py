"""Adam (and AdamW) as a differentiable ``init``/``update`` pair.

With ``t = step + 1``::

    g   = grad + weight_decay * w                       (coupled decay; AdamW decouples it)
    m'  = b1 * m + (1 - b1) * g
    v'  = b2 * v + (1 - b2) * g**2
    w'  = w - lr * (m' / (1 - b1**t)) / (sqrt(v' / (1 - b2**t) + eps_root) + eps)

``eps_root > 0`` keeps ``d sqrt(v)/dv`` finite where a gradient is exactly zero (dead ReLU units,
unused inputs); with ``eps_root = 0`` the second derivative there is ``inf * 0 = nan``.

Fixed point (``residual``): with coupled decay the step is zero exactly where ``g = grad +
weight_decay * w = 0`` (then ``m = 0``). Decoupled (AdamW), a long run (bias corrections -> 1,
``m_hat = grad``, ``v_hat = grad**2``) stops where ``phi(grad) + weight_decay * w = 0`` with
``phi(g) = g / (sqrt(g**2 + eps_root) + eps)``, elementwise; in gradient form (a symmetric Jacobian
``H + diag(weight_decay * psi'(-weight_decay * w))``) the residual is ``grad - psi(-weight_decay * w)``,
``psi = phi^-1`` on ``(-1, 1)`` (:func:`phi_inverse`). ``|weight_decay * w| >= 1`` has no fixed point.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
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

RANGES = {"lr": (0.0, None, False), "b1": (0.0, 1.0, True), "b2": (0.0, 1.0, True), "eps": (0.0, None, False),
          "eps_root": (0.0, None, False), "weight_decay": (0.0, None, False)}


@dataclass(frozen=True)
class AdamSpec:
    """What an Adam-family optimizer was built with (its :attr:`~metaopt.optim.Optimizer.spec`);
    ``decoupled=True`` is AdamW. ``build()`` makes the optimizer."""

    lr: HParam = 1e-3
    b1: HParam = 0.9
    b2: HParam = 0.999
    eps: HParam = 1e-8
    eps_root: HParam = 1e-16
    weight_decay: HParam = 0.0
    decoupled: bool = False

    def __new__(cls, *args: Any, **kwargs: Any) -> AdamSpec:
        refuse_parameters(cls.__name__, args)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if not isinstance(self.decoupled, bool):
            raise TypeError(f"optim.adam(decoupled={self.decoupled!r}): decoupled must be True or False")
        check_spec(self.kind, {n: getattr(self, n) for n in RANGES}, RANGES)

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
        An :class:`Optimizer` with ``spec`` an :class:`AdamSpec`; its state is ``{"mu": ..., "nu": ...}``,
        each ``{name: tensor like the param}``.
    """
    spec = AdamSpec(lr=lr, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay, decoupled=decoupled)
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
            if not decoupled:
                g = add_decay(g, w, wd)
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

    def residual(
        grads: Mapping[str, Tensor], params: Mapping[str, Tensor], *, step: int | Tensor, **hparams: HParam
    ) -> Params:
        """Zero exactly at the fixed point: ``grad + weight_decay * w`` (coupled), or
        ``grad - phi_inverse(-weight_decay * w)`` (decoupled; see the module docstring)."""
        check_grads(grads, params, name)
        h = merge_hparams(defaults, hparams, params, name, step)
        if not decoupled:
            return coupled_residual(grads, params, h, step)
        return decoupled_residual(grads, params, h, step, name)

    return Optimizer(init, update, defaults, spec, residual)


def decoupled_residual(grads: Mapping[str, Tensor], params: Mapping[str, Tensor], h: Mapping[str, Any],
                       step: int | Tensor, name: str) -> Params:
    """``grad - phi_inverse(-weight_decay * w)`` per parameter: the fixed-point residual of an
    Adam-type optimizer with decoupled weight decay (AdamW, and NAdam and RAdam with
    ``decoupled=True``, whose long-run direction is Adam's; see the module docstring). ``h`` are the
    merged hyperparameters (``eps``, ``weight_decay``, and ``eps_root`` where the optimizer has one)."""
    out: Params = {}
    for key, w in params.items():
        wd = resolve("weight_decay", h["weight_decay"], key, w, step)
        if isinstance(wd, float) and wd == 0.0:
            out[key] = grads[key]
            continue
        eps = resolve("eps", h["eps"], key, w, step)
        eps_root = resolve("eps_root", h["eps_root"], key, w, step) if "eps_root" in h else 0.0
        u = -wd * w
        worst = float(u.detach().abs().max()) if u.numel() else 0.0
        if worst >= 1.0:
            raise ValueError(
                f"{name}: |weight_decay * w| reaches {worst:.3g} >= 1 on parameter {key!r}, where decoupled weight "
                "decay has no fixed point (the Adam direction is below 1 in magnitude): train longer, or lower "
                "weight_decay"
            )
        out[key] = grads[key] - phi_inverse(u, eps, eps_root, name)
    return out


def phi_inverse(u: Tensor, eps: float | Tensor, eps_root: float | Tensor, name: str = "adamw") -> Tensor:
    """The gradient ``g`` whose long-run Adam direction ``g / (sqrt(g**2 + eps_root) + eps)`` is ``u``
    (elementwise, ``|u| < 1``): ``u * (s + eps)`` with ``s = sqrt(g**2 + eps_root)`` the positive root of
    ``(1 - u**2) s**2 - 2 u**2 eps s - (u**2 eps**2 + eps_root) = 0``. Increasing and smooth in ``u``
    (its derivative is the decoupled decay's curvature in the residual)."""
    if isinstance(eps_root, float) and eps_root == 0.0:
        if isinstance(eps, float) and eps == 0.0:
            raise ValueError(f"{name}: eps = eps_root = 0 makes decoupled weight decay's fixed point degenerate "
                             "(the direction is sign(grad)); give eps > 0 or eps_root > 0")
        return u * eps / (1 - u.abs())  # the closed form at eps_root = 0, smooth at u = 0
    u2 = u * u
    disc = u2 * u2 * eps**2 + (1 - u2) * (u2 * eps**2 + eps_root)
    s = (u2 * eps + torch.sqrt(disc)) / (1 - u2)
    return u * (s + eps)


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
