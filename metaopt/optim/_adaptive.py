"""RMSprop, Adagrad, Adamax, NAdam and RAdam as differentiable ``init``/``update`` pairs.

The algorithms and defaults are ``torch.optim``'s (single-tensor path, ``maximize=False``), with the
step index ``k = step`` (0-based; torch's ``t = k + 1``) and ``g = grad + weight_decay * w`` (coupled
L2 decay, as torch's default)::

    rmsprop   v' = alpha v + (1 - alpha) g**2;  centered: a' = alpha a + (1 - alpha) g, d = sqrt(v' - a'**2) + eps,
              else d = sqrt(v') + eps;  momentum: b' = momentum b + g / d, w' = w - lr b';  else w' = w - lr g / d
    adagrad   s' = s + g**2 (s0 = initial_accumulator_value);  w' = w - lr / (1 + k lr_decay) * g / (sqrt(s') + eps)
    adamax    m' = b1 m + (1 - b1) g;  u' = max(b2 u, |g| + eps);  w' = w - lr / (1 - b1**t) * m' / u'
    nadam     mu_t = b1 (1 - 0.5 * 0.96**(t momentum_decay)),  P' = P mu_t (a state slot, P0 = 1),
              m', v' as Adam's,  d = sqrt(v' / (1 - b2**t)) + eps,
              w' = w - lr (1 - mu_t) / (1 - P') g / d - lr mu_{t+1} / (1 - P' mu_{t+1}) m' / d
    radam     m', v' as Adam's,  rho_inf = 2 / (1 - b2) - 1,  rho_t = rho_inf - 2 t b2**t / (1 - b2**t);
              rho_t > 5: w' = w - lr m'/(1 - b1**t) * r_t sqrt(1 - b2**t) / (sqrt(v') + eps) (r_t the rectifier),
              else w' = w - lr m' / (1 - b1**t)

Fixed point (``residual``): every one of them steps along a positive elementwise scaling of ``g``
(or a momentum average of it) and stops exactly where ``g = grad + weight_decay * w = 0`` (the moments
and buffers that average ``g`` are then zero too), so the residual is ``grad + weight_decay * w``, the
same as SGD's and Adam's. A ``sqrt`` at a second moment that is exactly zero has an infinite
derivative, and second-order methods through such a run see ``nan`` there. RMSprop, Adagrad, NAdam
and RAdam therefore take Adam's ``eps_root``: ``0.0`` by default, which is torch.optim's step;
``1e-16`` keeps the hypergradient finite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._adam import decoupled_residual
from .base import (
    HParam,
    Optimizer,
    Params,
    State,
    add_decay,
    as_tensor_like,
    check_grads,
    check_spec,
    coupled_residual,
    merge_hparams,
    resolve,
)

NONNEG = (0.0, None, False)
UNIT = (0.0, 1.0, True)
RANGES = {
    "rmsprop": {"lr": NONNEG, "alpha": UNIT, "eps": NONNEG, "weight_decay": NONNEG, "momentum": UNIT,
                "eps_root": NONNEG},
    "adagrad": {"lr": NONNEG, "lr_decay": NONNEG, "weight_decay": NONNEG, "initial_accumulator_value": NONNEG,
                "eps": NONNEG, "eps_root": NONNEG},
    "adamax": {"lr": NONNEG, "b1": UNIT, "b2": UNIT, "eps": NONNEG, "weight_decay": NONNEG},
    "nadam": {"lr": NONNEG, "b1": UNIT, "b2": UNIT, "eps": NONNEG, "weight_decay": NONNEG,
              "momentum_decay": NONNEG, "eps_root": NONNEG},
    "radam": {"lr": NONNEG, "b1": UNIT, "b2": UNIT, "eps": NONNEG, "weight_decay": NONNEG, "eps_root": NONNEG},
}


@dataclass(frozen=True)
class Spec:
    """What one of these optimizers was built with (its :attr:`~metaopt.optim.Optimizer.spec`):
    ``kind`` (``"rmsprop"``, ...), the hyperparameters and the structural flags (RMSprop's
    ``centered``). ``build()`` makes the optimizer again."""

    kind: str
    hparams: Mapping[str, Any]
    flags: Mapping[str, bool] = field(default_factory=dict)

    def build(self) -> Optimizer:
        return FACTORIES[self.kind](**self.hparams, **self.flags)


def _root(x: Tensor, eps_root: Any) -> Tensor:
    """``sqrt(x + eps_root)``: ``eps_root > 0`` keeps the derivative finite where a second moment is
    exactly zero (a dead unit), as Adam's ``eps_root``; the float ``0.0`` adds nothing (torch's step)."""
    return (x if isinstance(eps_root, float) and eps_root == 0.0 else x + eps_root).sqrt()


def _zeros(params: Mapping[str, Tensor], fill: float = 0.0) -> dict[str, Tensor]:
    return {k: p.detach().new_full(p.shape, fill) for k, p in params.items()}


def _make(kind: str, defaults: dict[str, Any], flags: dict[str, bool], init: Callable[[Mapping[str, Tensor]], State],
          step_one: Callable[..., tuple[Tensor, dict[str, Tensor]]]) -> Optimizer:
    """Wrap a per-parameter step ``step_one(w, g, slots, r, k) -> (w', slots')`` (``r`` the resolved
    hyperparameters) into an :class:`Optimizer` with its fixed-point residual. Weight decay is coupled
    (``g = grad + weight_decay * w``, the residual ``g``), or with ``flags["decoupled"]`` decoupled as
    torch.optim's ``decoupled_weight_decay=True`` does (``w <- w * (1 - lr * weight_decay)`` before the
    step on the bare gradient; the residual :func:`~metaopt.optim._adam.decoupled_residual`)."""
    check_spec(kind, defaults, RANGES[kind])
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"optim.{kind}({name}={flag!r}): {name} must be True or False")
    spec = Spec(kind, dict(defaults), dict(flags))
    names = tuple(defaults)
    decoupled = flags.get("decoupled", False)

    def update(grads: Mapping[str, Tensor], state: State, params: Mapping[str, Tensor], *, step: int | Tensor,
               **hparams: HParam) -> tuple[Params, State]:
        check_grads(grads, params, kind)
        h = merge_hparams(defaults, hparams, params, kind, step)
        new_params: Params = {}
        new_state: State = {slot: {} for slot in state}
        for key, w in params.items():
            r = {n: resolve(n, h[n], key, w, step) for n in names}
            wd = r["weight_decay"]
            if not decoupled:
                g = add_decay(grads[key], w, wd)
            else:
                g = grads[key]
                if not (isinstance(wd, float) and wd == 0.0):
                    w = w * (1 - r["lr"] * wd)
            new_params[key], slots = step_one(w, g, {s: state[s][key] for s in state}, r, step)
            for s, v in slots.items():
                new_state[s][key] = v
        return new_params, new_state

    def residual(grads: Mapping[str, Tensor], params: Mapping[str, Tensor], *, step: int | Tensor,
                 **hparams: HParam) -> Params:
        """``grad + weight_decay * w`` (coupled): zero exactly at the fixed point (see the module
        docstring); decoupled, ``grad - phi_inverse(-weight_decay * w)`` (a long run's fixed point)."""
        check_grads(grads, params, kind)
        h = merge_hparams(defaults, hparams, params, kind, step)
        if decoupled:
            return decoupled_residual(grads, params, h, step, kind)
        return coupled_residual(grads, params, h, step)

    return Optimizer(init, update, defaults, spec, residual)


def rmsprop(lr: HParam = 1e-2, alpha: HParam = 0.99, eps: HParam = 1e-8, weight_decay: HParam = 0.0,
            momentum: HParam = 0.0, centered: bool = False, eps_root: HParam = 0.0) -> Optimizer:
    """RMSprop (``torch.optim.RMSprop``): a step scaled by the root of a running mean of ``g**2``.

    Examples:
        >>> import torch
        >>> from metaopt import optim
        >>> opt = optim.rmsprop(lr=0.01, alpha=0.9, centered=True, momentum=0.5)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = opt.init(params)
        >>> sorted(state)
        ['grad_avg', 'momentum_buffer', 'square_avg']
        >>> params, state = opt.update({"w": torch.tensor([0.5, -0.25])}, state, params, step=0)
        >>> params["w"]
        tensor([ 0.9667, -1.9667])

    Args:
        lr: the step size. Every hyperparameter takes any ``HParam`` form (float, tensor, dict, schedule).
        alpha: the decay of the running means, ``0 <= alpha < 1``.
        eps: added to the root.
        weight_decay: coupled L2 decay, ``g = grad + weight_decay * w``.
        momentum: the Python float ``0.0`` keeps no buffer (torch's plain step) and ``update`` then
            takes no ``momentum``; any other value (a tensor zero included, to learn it from zero)
            keeps a ``momentum_buffer`` slot.
        centered: divide by the root of the running *variance* ``v - a**2`` (a ``grad_avg`` slot).
        eps_root: added under the root, ``sqrt(v + eps_root)``; ``> 0`` (e.g. ``1e-16``) keeps
            second-order methods finite at a dead unit (torch.optim has none: ``0.0``).

    Returns:
        An :class:`Optimizer`; state slots ``square_avg`` [+ ``grad_avg``] [+ ``momentum_buffer``].
    """
    has_buffer = not (isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and momentum == 0.0)
    defaults = {"lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay, "eps_root": eps_root}
    if has_buffer:
        defaults["momentum"] = momentum

    def init(params: Mapping[str, Tensor]) -> State:
        state = {"square_avg": _zeros(params)}
        if centered:
            state["grad_avg"] = _zeros(params)
        if has_buffer:
            state["momentum_buffer"] = _zeros(params)
        return state

    def step_one(w: Tensor, g: Tensor, s: dict[str, Tensor], r: dict[str, Any], k: int | Tensor):
        out = {"square_avg": r["alpha"] * s["square_avg"] + (1 - r["alpha"]) * (g * g)}
        if centered:
            out["grad_avg"] = r["alpha"] * s["grad_avg"] + (1 - r["alpha"]) * g
            denom = _root(out["square_avg"] - out["grad_avg"] * out["grad_avg"], r["eps_root"]) + r["eps"]
        else:
            denom = _root(out["square_avg"], r["eps_root"]) + r["eps"]
        if has_buffer:
            out["momentum_buffer"] = r["momentum"] * s["momentum_buffer"] + g / denom
            return w - r["lr"] * out["momentum_buffer"], out
        return w - r["lr"] * (g / denom), out

    return _make("rmsprop", defaults, {"centered": centered}, init, step_one)


def adagrad(lr: HParam = 1e-2, lr_decay: HParam = 0.0, weight_decay: HParam = 0.0,
            initial_accumulator_value: HParam = 0.0, eps: HParam = 1e-10, eps_root: HParam = 0.0) -> Optimizer:
    """Adagrad (``torch.optim.Adagrad``): a step scaled by the root of the sum of past ``g**2``.

    ``initial_accumulator_value`` is the sum's start; the state ``{"sum": ...}`` holds the sum of the
    ``g**2`` alone and the value is added where it is read (``sqrt(initial_accumulator_value + sum)``),
    so it is an ordinary hyperparameter of ``update`` (learnable, scheduled, per parameter). The
    rate at step ``k`` is ``lr / (1 + k * lr_decay)``. ``eps_root`` is added under the root (see
    :func:`rmsprop`; torch.optim's step is ``0.0``).
    """
    defaults = {"lr": lr, "lr_decay": lr_decay, "weight_decay": weight_decay,
                "initial_accumulator_value": initial_accumulator_value, "eps": eps, "eps_root": eps_root}

    def init(params: Mapping[str, Tensor]) -> State:
        return {"sum": _zeros(params)}

    def step_one(w: Tensor, g: Tensor, s: dict[str, Tensor], r: dict[str, Any], k: int | Tensor):
        total = s["sum"] + g * g
        clr = r["lr"] / (1 + k * r["lr_decay"])
        return w - clr * (g / (_root(total + r["initial_accumulator_value"], r["eps_root"]) + r["eps"])), {"sum": total}

    return _make("adagrad", defaults, {}, init, step_one)


def adamax(lr: HParam = 2e-3, b1: HParam = 0.9, b2: HParam = 0.999, eps: HParam = 1e-8,
           weight_decay: HParam = 0.0) -> Optimizer:
    """Adamax (``torch.optim.Adamax``): Adam with the infinity norm, ``u' = max(b2 u, |g| + eps)``.

    State: ``{"mu": ..., "u": ...}``. The ``max`` passes the gradient to the larger branch (at a tie
    torch splits it), so ``b2`` and ``eps`` get a hypergradient through whichever branch is active.
    """
    defaults = {"lr": lr, "b1": b1, "b2": b2, "eps": eps, "weight_decay": weight_decay}

    def init(params: Mapping[str, Tensor]) -> State:
        return {"mu": _zeros(params), "u": _zeros(params)}

    def step_one(w: Tensor, g: Tensor, s: dict[str, Tensor], r: dict[str, Any], k: int | Tensor):
        m = r["b1"] * s["mu"] + (1 - r["b1"]) * g
        u = torch.maximum(r["b2"] * s["u"], g.abs() + r["eps"])
        return w - r["lr"] / (1 - r["b1"] ** (k + 1)) * (m / u), {"mu": m, "u": u}

    return _make("adamax", defaults, {}, init, step_one)


def nadam(lr: HParam = 2e-3, b1: HParam = 0.9, b2: HParam = 0.999, eps: HParam = 1e-8, weight_decay: HParam = 0.0,
          momentum_decay: HParam = 4e-3, decoupled: bool = False, eps_root: HParam = 0.0) -> Optimizer:
    """NAdam (``torch.optim.NAdam``): Adam with Nesterov momentum and Dozat's warming momentum schedule
    ``mu_t = b1 (1 - 0.5 * 0.96**(t * momentum_decay))``. Weight decay is coupled, or with
    ``decoupled=True`` decoupled (torch's ``decoupled_weight_decay=True``, NAdamW). ``eps_root`` is
    added under the root, ``sqrt(v / (1 - b2**t) + eps_root)``, as Adam's (torch.optim's step: ``0.0``).

    State: ``{"mu": ..., "nu": ..., "mu_product": ...}``; ``mu_product`` (the running product of the
    ``mu_t``, torch's scalar per parameter) is kept shaped like each parameter, so that a per-member
    or per-element ``b1`` and ``vmap`` work, and it is differentiable in ``b1`` and ``momentum_decay``.
    """
    defaults = {"lr": lr, "b1": b1, "b2": b2, "eps": eps, "weight_decay": weight_decay,
                "momentum_decay": momentum_decay, "eps_root": eps_root}

    def init(params: Mapping[str, Tensor]) -> State:
        return {"mu": _zeros(params), "nu": _zeros(params), "mu_product": _zeros(params, 1.0)}

    def step_one(w: Tensor, g: Tensor, s: dict[str, Tensor], r: dict[str, Any], k: int | Tensor):
        t = k + 1
        b1, psi = r["b1"], r["momentum_decay"]
        mu_t = b1 * (1.0 - 0.5 * 0.96 ** (t * psi))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
        prod = s["mu_product"] * mu_t
        m = b1 * s["mu"] + (1 - b1) * g
        v = r["b2"] * s["nu"] + (1 - r["b2"]) * (g * g)
        denom = _root(v / (1 - r["b2"] ** t), r["eps_root"]) + r["eps"]
        step = r["lr"] * (1.0 - mu_t) / (1.0 - prod) * (g / denom) \
            + r["lr"] * mu_next / (1.0 - prod * mu_next) * (m / denom)
        return w - step, {"mu": m, "nu": v, "mu_product": prod}

    return _make("nadam", defaults, {"decoupled": decoupled}, init, step_one)


def radam(lr: HParam = 1e-3, b1: HParam = 0.9, b2: HParam = 0.999, eps: HParam = 1e-8,
          weight_decay: HParam = 0.0, decoupled: bool = False, eps_root: HParam = 0.0) -> Optimizer:
    """RAdam (``torch.optim.RAdam``): Adam whose adaptive step is switched on, and rectified, once the
    variance estimate is tractable (``rho_t > 5``). Weight decay is coupled, or with ``decoupled=True``
    decoupled (torch's ``decoupled_weight_decay=True``, RAdamW). ``eps_root`` is added under the root,
    ``sqrt(v + eps_root)`` (torch.optim's step: ``0.0``).

    With float ``b2`` and an int ``step`` the switch is a Python branch on those (as torch's); with a
    tensor ``b2`` or step it is a ``torch.where`` whose unused branch is evaluated at a safe value, so
    ``vmap``, ``torch.compile`` and the gradient in ``b2`` see no ``nan``. State: ``{"mu": ..., "nu": ...}``.
    """
    defaults = {"lr": lr, "b1": b1, "b2": b2, "eps": eps, "weight_decay": weight_decay, "eps_root": eps_root}

    def init(params: Mapping[str, Tensor]) -> State:
        return {"mu": _zeros(params), "nu": _zeros(params)}

    def step_one(w: Tensor, g: Tensor, s: dict[str, Tensor], r: dict[str, Any], k: int | Tensor):
        t = k + 1
        b1, b2 = r["b1"], r["b2"]
        m = b1 * s["mu"] + (1 - b1) * g
        v = b2 * s["nu"] + (1 - b2) * (g * g)
        bc2 = 1 - b2 ** t
        m_hat = m / (1 - b1 ** t)
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * (b2 ** t) / bc2

        def adaptive(rho: Any) -> Tensor:
            rect = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
            return rect * bc2 ** 0.5 / (_root(v, r["eps_root"]) + r["eps"])

        if isinstance(rho_t, float):
            scale = adaptive(rho_t) if rho_t > 5.0 else 1.0
        else:
            on = rho_t > 5.0
            safe = torch.where(on, rho_t, as_tensor_like(6.0, rho_t))
            safe_inf = torch.where(on, as_tensor_like(rho_inf, rho_t), as_tensor_like(7.0, rho_t))
            rho_inf = safe_inf
            scale = torch.where(on, adaptive(safe), as_tensor_like(1.0, v))
        return w - r["lr"] * (m_hat * scale), {"mu": m, "nu": v}

    return _make("radam", defaults, {"decoupled": decoupled}, init, step_one)


FACTORIES: dict[str, Callable[..., Optimizer]] = {"rmsprop": rmsprop, "adagrad": adagrad, "adamax": adamax,
                                                  "nadam": nadam, "radam": radam}
