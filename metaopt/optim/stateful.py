"""torch.optim-shaped optimizers over the functional ones: ``optim.SGD(model.parameters(), lr=0.1)``.

Each class (:class:`SGD`, :class:`Adam`, :class:`AdamW`, :class:`RMSprop`, :class:`Adagrad`,
:class:`Adamax`, :class:`NAdam`, :class:`RAdam`) subclasses :class:`torch.optim.Optimizer` with
torch.optim's constructor signature, defaults and param-group keys, so ``param_groups``,
``zero_grad``, ``add_param_group``, ``state_dict``/``load_state_dict`` and every
``torch.optim.lr_scheduler`` work as with torch.optim. ``step(closure=None)`` runs the functional
update (:func:`metaopt.optim.sgd`, :func:`~metaopt.optim.adam`, ...) of each param group under
``torch.no_grad()`` with the group's *current* hyperparameters (a scheduler's new ``lr`` takes
effect) and writes the new values into the parameters in place; parameters whose ``grad`` is
``None`` are skipped, as torch.optim skips them. Options the functional optimizers do not implement
(``amsgrad``, ``maximize``, ``foreach``, ``fused``, ``capturable``, ``differentiable``, SGD's
``dampening``) are refused with a one-line error.

The per-parameter state is torch.optim's (torch 2.13), so a ``state_dict()`` loads into the real
torch.optim class and back. Its functional counterpart (:func:`functional_state`,
:func:`load_functional_state`) is a :data:`~metaopt.optim.State` ``{slot: {name: tensor}}``::

    class     torch.optim  state[p]                              functional State slot
    SGD       momentum_buffer (momentum != 0; no step count)        velocity
    Adam(W)   step, exp_avg, exp_avg_sq                             mu, nu
    RMSprop   step, square_avg [, momentum_buffer] [, grad_avg]     the same names
    Adagrad   step, sum = initial_accumulator_value + sum g**2      sum = sum g**2
    Adamax    step, exp_avg, exp_inf                                mu, u
    NAdam     step, exp_avg, exp_avg_sq, mu_product (0-d)           mu, nu, mu_product (shaped like p)
    RAdam     step, exp_avg, exp_avg_sq                             mu, nu

Every slot tensor is shaped like its parameter, except NAdam's ``mu_product``, a 0-d tensor in
torch.optim. ``state["step"]`` is a 0-d tensor of torch.optim's scalar dtype (float32, float64 when
that is the default dtype) counting the steps *taken* by that parameter; the functional ``update``'s
``step=k`` is the index of the next step, so ``k = state["step"]`` (Adam's bias correction uses
``t = k + 1``, torch.optim's incremented count). Parameters of one group that have taken different
numbers of steps (one whose ``grad`` was ``None`` sometimes) are updated in separate calls, each at
its own ``k``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._adam import adam
from ._adaptive import adagrad, adamax, nadam, radam, rmsprop
from ._sgd import sgd
from .base import Optimizer, State, check_spec

NONNEG = (0.0, None, False)
UNIT = (0.0, 1.0, True)
OFF = (None, False)
COMMON = {"maximize": (False,), "foreach": OFF, "fused": OFF, "capturable": (False,), "differentiable": (False,)}
WHY = {
    "maximize": "negate the loss instead",
    "foreach": "the functional update runs one parameter at a time; leave foreach unset",
    "fused": "the functional update runs one parameter at a time; leave fused unset",
    "capturable": "CUDA-graph capture is not supported; leave capturable False",
    "differentiable": "for a differentiable step use the functional optimizer (optim.{kind}(...) with init/update, "
                      "or {name}.functional(group))",
    "amsgrad": "metaopt's adam has no AMSGrad variant",
    "dampening": "metaopt's sgd has no dampening",
}


def scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for ``state["step"]`` and NAdam's ``mu_product`` (its ``_get_scalar_dtype``):
    float64 when that is the default dtype, float32 otherwise."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _is_zero(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and float(value) == 0.0
    return value == 0


def _allowed(value: Any, ok: tuple) -> bool:
    return not isinstance(value, Tensor) and any(value is o or (value == o and type(value) is not str) for o in ok)


class _Face(torch.optim.Optimizer):
    """The torch.optim shape over one functional family (the classes below fill in the class variables)."""

    kind: ClassVar[str]
    """The functional family: ``"sgd"``, ``"adam"``, ..."""
    counts_steps: ClassVar[bool] = True
    """Whether torch.optim keeps ``state["step"]`` (SGD does not)."""
    ranges: ClassVar[dict[str, tuple[float, float | None, bool]]] = {}
    """torch.optim's group key -> ``(low, high, high_open)`` (``betas`` as ``betas[0]``, ``betas[1]``)."""
    refused: ClassVar[dict[str, tuple]] = COMMON
    """Group keys the functional optimizers do not implement -> the values accepted (the off values)."""
    spec_only: ClassVar[frozenset[str]] = frozenset()
    """Keyword names of the functional spelling that torch.optim's signature does not take."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Face:
        if not args and "params" not in kwargs and kwargs:
            raise TypeError(_no_params(cls, kwargs))
        extra = sorted(set(kwargs) & cls.spec_only)
        if extra:
            raise TypeError(f"optim.{cls.__name__}(..., {extra[0]}=...): {extra[0]} belongs to the functional spelling "
                            f"(optim.{cls.kind}(...){_spec_hint(cls)}); optim.{cls.__name__} takes torch.optim's "
                            "arguments (betas=(b1, b2), no eps_root; see docs/optim.md)")
        return super().__new__(cls)

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if isinstance(params, (Tensor, str, Mapping)) or not isinstance(params, Iterable):
            raise TypeError(f"optim.{type(self).__name__}(params=...): got {type(params).__name__}; params must be an "
                            f"iterable of tensors or of param-group dicts, e.g. optim.{type(self).__name__}"
                            f"(model.parameters(), lr=0.1) (the functional optimizer is optim.{self.kind}(lr=...))")
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a checkpoint of an older torch: the keys it lacks take our defaults
            for key, value in getattr(self, "defaults", {}).items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's, after checking the group's hyperparameters (one-line errors naming the key)."""
        type(self).check_group({**self.defaults, **param_group}, type(self).__name__)
        super().add_param_group(param_group)

    @classmethod
    def check_group(cls, group: Mapping[str, Any], name: str) -> None:
        """Refuse what the functional optimizer does not implement and values out of range."""
        cls.refuse(group, name)
        values: dict[str, Any] = {}
        for key in cls.ranges:
            base = key.split("[")[0]
            value = group[base]
            if base == "betas":
                if not isinstance(value, (tuple, list)) or len(value) != 2:
                    raise ValueError(f"optim.{name}(betas={value!r}): betas must be a pair (b1, b2)")
                value = value[int(key[-2])]
            if value is None or isinstance(value, bool):
                raise TypeError(f"optim.{name}({key}={value!r}): {key} must be a number or a one-element tensor")
            if isinstance(value, Tensor) and value.numel() != 1:
                raise ValueError(f"optim.{name}({key}=...): a tensor {key} must have one element (torch.optim's rule), "
                                 f"got shape {tuple(value.shape)}")
            values[key] = value
        check_spec(name, values, cls.ranges)
        cls.functional(group)

    @classmethod
    def refuse(cls, group: Mapping[str, Any], name: str) -> None:
        for key, ok in cls.refused.items():
            value = group.get(key, ok[0])
            if not _allowed(value, ok):
                why = WHY[key].format(kind=cls.kind, name=name)
                raise ValueError(f"optim.{name}({key}={value!r}) is not supported: {why} (torch.optim.{name} has it)")

    @classmethod
    def functional(cls, group: Mapping[str, Any]) -> Optimizer:
        """The functional optimizer (:func:`metaopt.optim.sgd`, ...) with one param group's hyperparameters
        (a group of this class or of torch.optim's class of the same name)."""
        raise NotImplementedError

    @classmethod
    def slots(cls, group: Mapping[str, Any]) -> dict[str, str]:
        """The functional state's slots for this group's options -> torch.optim's state keys."""
        raise NotImplementedError

    @classmethod
    def fresh(cls, group: Mapping[str, Any], p: Tensor, defaults: Mapping[str, Any]) -> dict[str, Tensor]:
        """torch.optim's state of ``p`` before its first step (its ``_init_group``)."""
        out = {"step": torch.tensor(0.0, dtype=scalar_dtype())} if cls.counts_steps else {}
        zeros = {key: torch.zeros_like(p, memory_format=torch.preserve_format) for key in cls.slots(group).values()}
        return out | zeros

    @classmethod
    def to_functional(cls, group: Mapping[str, Any], slot: str, value: Tensor, p: Tensor) -> Tensor:
        """One slot of torch.optim's state of ``p`` as the functional state holds it."""
        return value

    @classmethod
    def to_torch(cls, group: Mapping[str, Any], slot: str, value: Tensor, p: Tensor) -> Tensor:
        """One slot of the functional state of ``p`` as torch.optim holds it."""
        return value

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of every param group: the functional update at the group's current hyperparameters,
        written into the parameters in place; parameters whose ``grad`` is ``None`` are skipped.
        ``closure`` (re-evaluates the loss, as torch.optim's) is called first, with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        face = type(self)
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            if any(p.grad.is_sparse for p in live):
                raise RuntimeError(f"optim.{face.__name__}: sparse gradients are not supported; use "
                                   "torch.optim.SparseAdam")
            opt = face.functional(group)
            buckets: dict[int, list[tuple[Tensor, dict[str, Tensor]]]] = {}
            for p in live:  # parameters that have taken different numbers of steps update at their own k
                state = self.state[p]
                if not state:
                    state.update(face.fresh(group, p, self.defaults))
                slots, k = _read(face, group, state, p, self.defaults)
                buckets.setdefault(k, []).append((p, slots))
            for k, items in buckets.items():
                names = [str(i) for i in range(len(items))]
                params = {n: p for n, (p, _) in zip(names, items)}
                slot_names = list(items[0][1])
                state_in = {s: {n: slots[s] for n, (_, slots) in zip(names, items)} for s in slot_names}
                new, state_out = opt.update({n: p.grad for n, p in params.items()}, state_in, params, step=k)
                for n, p in params.items():
                    p.copy_(new[n])
                    _write(face, group, self.state[p], p, {s: state_out[s][n] for s in slot_names}, k + 1, copy=False)
        return loss


def _read(face: type[_Face], group: Mapping[str, Any], state: Mapping[str, Any], p: Tensor,
          defaults: Mapping[str, Any]) -> tuple[dict[str, Tensor], int]:
    """torch.optim's ``state[p]`` as ``({slot: tensor}, steps taken)``; a slot it lacks (SGD's buffer
    before the first step, a momentum switched on later) reads as torch.optim's initial value."""
    slots = {}
    for slot, key in face.slots(group).items():
        value = state.get(key)
        if value is None:
            value = face.fresh(group, p, defaults).get(key)
        slots[slot] = torch.zeros_like(p) if value is None else face.to_functional(group, slot, value, p)
    return slots, (int(state["step"]) if face.counts_steps and "step" in state else 0)


def _write(face: type[_Face], group: Mapping[str, Any], state: dict[str, Any], p: Tensor, slots: Mapping[str, Tensor],
           step: int, copy: bool) -> None:
    """Write the functional ``slots`` of ``p`` and the count ``step`` into torch.optim's ``state[p]``:
    into the tensors it holds, in place, as torch.optim updates them (``copy=False``, the step), or as
    new tensors (``copy=True``, detached copies)."""
    for slot, key in face.slots(group).items():
        value = face.to_torch(group, slot, slots[slot], p)
        held = state.get(key)
        if not copy and isinstance(held, Tensor) and held.shape == value.shape and held.dtype == value.dtype:
            held.copy_(value)
        else:
            state[key] = value.detach().clone() if copy else value
    if face.counts_steps:
        held = state.get("step")
        if not copy and isinstance(held, Tensor) and held.dim() == 0:
            held.fill_(float(step))
        else:
            state["step"] = torch.tensor(float(step), dtype=scalar_dtype())


def _no_params(cls: type[_Face], kwargs: Mapping[str, Any]) -> str:
    given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (f"optim.{cls.__name__}({given}): no parameters; optim.{cls.__name__} is torch.optim's class and takes them "
            f"first, optim.{cls.__name__}(model.parameters(), lr=...); for the functional optimizer write "
            f"optim.{cls.kind}({given}){_spec_hint(cls, given)} (see docs/optim.md)")


def _spec_hint(cls: type[_Face], given: str = "...") -> str:
    spec = {"SGD": "SGDSpec", "Adam": "AdamSpec"}.get(cls.__name__)
    return f", or its spec optim.{spec}({given})" if spec else ""


def _betas(group: Mapping[str, Any]) -> tuple[Any, Any]:
    b1, b2 = group["betas"]
    return b1, b2


class SGD(_Face):
    """``torch.optim.SGD`` over :func:`metaopt.optim.sgd` (``dampening=0``; state ``momentum_buffer``
    when ``momentum != 0``, no step count)."""

    kind = "sgd"
    counts_steps = False
    ranges = {"lr": NONNEG, "momentum": UNIT, "weight_decay": NONNEG}
    refused = {**COMMON, "dampening": (0,)}

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                                  "nesterov": nesterov, "maximize": maximize, "foreach": foreach,
                                  "differentiable": differentiable, "fused": fused})

    @classmethod
    def functional(cls, group: Mapping[str, Any]) -> Optimizer:
        cls.refuse(group, "SGD")
        momentum = group["momentum"]
        return sgd(lr=group["lr"], momentum=None if _is_zero(momentum) else momentum,
                   nesterov=bool(group["nesterov"]), weight_decay=group["weight_decay"])

    @classmethod
    def slots(cls, group: Mapping[str, Any]) -> dict[str, str]:
        return {} if _is_zero(group["momentum"]) else {"velocity": "momentum_buffer"}

    @classmethod
    def fresh(cls, group: Mapping[str, Any], p: Tensor, defaults: Mapping[str, Any]) -> dict[str, Tensor]:
        return {}  # torch.optim.SGD makes the buffer at the first step (a zero buffer steps the same)


ADAM_RANGES = {"lr": NONNEG, "betas[0]": UNIT, "betas[1]": UNIT, "eps": NONNEG, "weight_decay": NONNEG}
ADAM_SLOTS = {"mu": "exp_avg", "nu": "exp_avg_sq"}


class Adam(_Face):
    """``torch.optim.Adam`` over :func:`metaopt.optim.adam` with ``eps_root=0`` (torch's formula);
    ``decoupled_weight_decay=True`` is AdamW. State ``step``, ``exp_avg``, ``exp_avg_sq``."""

    kind = "adam"
    ranges = ADAM_RANGES
    refused = {**COMMON, "amsgrad": (False,)}
    spec_only = frozenset({"b1", "b2", "eps_root", "decoupled"})

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[Any, Any] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "amsgrad": amsgrad, "maximize": maximize, "foreach": foreach,
                                  "capturable": capturable, "differentiable": differentiable, "fused": fused,
                                  "decoupled_weight_decay": decoupled_weight_decay})

    @classmethod
    def functional(cls, group: Mapping[str, Any]) -> Optimizer:
        cls.refuse(group, cls.__name__)
        b1, b2 = _betas(group)
        return adam(lr=group["lr"], b1=b1, b2=b2, eps=group["eps"], eps_root=0.0, weight_decay=group["weight_decay"],
                    decoupled=bool(group.get("decoupled_weight_decay", False)))

    @classmethod
    def slots(cls, group: Mapping[str, Any]) -> dict[str, str]:
        return dict(ADAM_SLOTS)


class AdamW(Adam):
    """``torch.optim.AdamW``: :class:`Adam` with decoupled weight decay (``weight_decay=1e-2``)."""

    kind = "adamw"

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[Any, Any] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # as torch.optim.AdamW: loading anything into AdamW decouples
            group["decoupled_weight_decay"] = True


class RMSprop(_Face):
    """``torch.optim.RMSprop`` over :func:`metaopt.optim.rmsprop`. State ``step``, ``square_avg``,
    ``momentum_buffer`` (``momentum > 0``), ``grad_avg`` (``centered``)."""

    kind = "rmsprop"
    ranges = {"lr": NONNEG, "alpha": UNIT, "eps": NONNEG, "weight_decay": NONNEG, "momentum": UNIT}
    spec_only = frozenset({"eps_root"})

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps, "centered": centered,
                                  "weight_decay": weight_decay, "capturable": capturable, "foreach": foreach,
                                  "maximize": maximize, "differentiable": differentiable})

    @classmethod
    def functional(cls, group: Mapping[str, Any]) -> Optimizer:
        cls.refuse(group, "RMSprop")
        momentum = group["momentum"]
        return rmsprop(lr=group["lr"], alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                       momentum=0.0 if _is_zero(momentum) else momentum, centered=bool(group["centered"]))

    @classmethod
    def slots(cls, group: Mapping[str, Any]) -> dict[str, str]:
        out = {"square_avg": "square_avg"}
        if not _is_zero(group["momentum"]):
            out["momentum_buffer"] = "momentum_buffer"
        if group["centered"]:
            out["grad_avg"] = "grad_avg"
        return out


class Adagrad(_Face):
    """``torch.optim.Adagrad`` over :func:`metaopt.optim.adagrad`. State ``step`` and ``sum``, made for
    every parameter at construction as torch.optim does; torch's ``sum`` starts at the constructor's
    ``initial_accumulator_value`` and holds it, the functional ``sum`` holds the squares alone
    (``sum = torch_sum - initial_accumulator_value`` of the group)."""

    kind = "adagrad"
    ranges = {"lr": NONNEG, "lr_decay": NONNEG, "weight_decay": NONNEG, "initial_accumulator_value": NONNEG,
              "eps": NONNEG}
    spec_only = frozenset({"eps_root"})

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, fused: bool | None = None) -> None:
        super().__init__(params, {"lr": lr, "lr_decay": lr_decay, "eps": eps, "weight_decay": weight_decay,
                                  "initial_accumulator_value": initial_accumulator_value, "foreach": foreach,
                                  "maximize": maximize, "differentiable": differentiable, "fused": fused})
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].update(self.fresh(group, p, self.defaults))

    @classmethod
    def functional(cls, group: Mapping[str, Any]) -> Optimizer:
        cls.refuse(group, "Adagrad")
        return adagrad(lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                       initial_accumulator_value=group["initial_accumulator_value"], eps=group["eps"])

    @classmethod
    def slots(cls, group: Mapping[str, Any]) -> dict[str, str]:
        return {"sum": "sum"}

    @classmethod
    def fresh(cls, group: Mapping[str, Any], p: Tensor, defaults: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": torch.tensor(0.0, dtype=scalar_dtype()),
                "sum": torch.full_like(p, defaults["initial_accumulator_value"], memory_format=torch.preserve_format)}

    @classmethod
    def to_functional(cls, group: Mapping[str, Any], slot: str, value: Tensor, p: Tensor) -> Tensor:
        return value - group["initial_accumulator_value"]

    @classmethod
    def to_torch(cls, group: Mapping[str, Any], slot: str, value: Tensor, p: Tensor) -> Tensor:
        return value + group["initial_accumulator_value"]


class Adamax(_Face):
    """``torch.optim.Adamax`` over :func:`metaopt.optim.adamax`. State ``step``, ``exp_avg``, ``exp_inf``."""

    kind = "adamax"
    ranges = ADAM_RANGES
    spec_only = frozenset({"b1", "b2"})

    def __init__(self, params: Any, lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, foreach: bool | None = None, *, maximize: bool = False,
                 differentiable: bool = False, capturable: bool = False) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "foreach": foreach, "maximize": maximize, "differentiable": differentiable,
                                  "capturable": capturable})

    @classmethod
    def functional(cls, group: Mapping[str, Any]) -> Optimizer:
        cls.refuse(group, "Adamax")
        b1, b2 = _betas(group)
        return adamax(lr=group["lr"], b1=b1, b2=b2, eps=group["eps"], weight_decay=group["weight_decay"])

    @classmethod
    def slots(cls, group: Mapping[str, Any]) -> dict[str, str]:
        return {"mu": "exp_avg", "u": "exp_inf"}


class NAdam(_Face):
    """``torch.optim.NAdam`` over :func:`metaopt.optim.nadam` (``decoupled_weight_decay=True``: its
    ``decoupled=True``). State ``step``,
    ``exp_avg``, ``exp_avg_sq`` and ``mu_product``, a 0-d tensor in torch.optim and a tensor shaped like
    the parameter (all one value) in the functional state."""

    kind = "nadam"
    ranges = {**ADAM_RANGES, "momentum_decay": NONNEG}
    spec_only = frozenset({"b1", "b2", "eps_root", "decoupled"})

    def __init__(self, params: Any, lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "momentum_decay": momentum_decay, "decoupled_weight_decay": decoupled_weight_decay,
                                  "maximize": maximize, "foreach": foreach, "capturable": capturable,
                                  "differentiable": differentiable})

    @classmethod
    def functional(cls, group: Mapping[str, Any]) -> Optimizer:
        cls.refuse(group, "NAdam")
        b1, b2 = _betas(group)
        return nadam(lr=group["lr"], b1=b1, b2=b2, eps=group["eps"], weight_decay=group["weight_decay"],
                     momentum_decay=group["momentum_decay"],
                     decoupled=bool(group.get("decoupled_weight_decay", False)))

    @classmethod
    def slots(cls, group: Mapping[str, Any]) -> dict[str, str]:
        return {**ADAM_SLOTS, "mu_product": "mu_product"}

    @classmethod
    def fresh(cls, group: Mapping[str, Any], p: Tensor, defaults: Mapping[str, Any]) -> dict[str, Tensor]:
        return super().fresh(group, p, defaults) | {"mu_product": torch.tensor(1.0, dtype=scalar_dtype())}

    @classmethod
    def to_functional(cls, group: Mapping[str, Any], slot: str, value: Tensor, p: Tensor) -> Tensor:
        if slot != "mu_product":
            return value
        return value.to(dtype=p.dtype, device=p.device)  # 0-d: the update broadcasts it (functional_state expands it)

    @classmethod
    def to_torch(cls, group: Mapping[str, Any], slot: str, value: Tensor, p: Tensor) -> Tensor:
        if slot != "mu_product":
            return value
        if value.dim() == 0:
            return value.detach().to(device="cpu", dtype=scalar_dtype())
        first = value.reshape(-1)[0] if value.numel() else value.new_ones(())
        if value.numel() and not bool((value == first).all()):
            raise ValueError("NAdam: torch.optim keeps one mu_product per parameter, but this functional state holds "
                             "several values in one parameter (a per-element or per-member b1 or momentum_decay); "
                             "keep such a state functional")
        return first.detach().to(device="cpu", dtype=scalar_dtype())


class RAdam(_Face):
    """``torch.optim.RAdam`` over :func:`metaopt.optim.radam` (``decoupled_weight_decay=True``: its
    ``decoupled=True``). State ``step``,
    ``exp_avg``, ``exp_avg_sq``."""

    kind = "radam"
    ranges = ADAM_RANGES
    spec_only = frozenset({"b1", "b2", "eps_root", "decoupled"})

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "maximize": maximize, "foreach": foreach, "capturable": capturable,
                                  "decoupled_weight_decay": decoupled_weight_decay, "differentiable": differentiable})

    @classmethod
    def functional(cls, group: Mapping[str, Any]) -> Optimizer:
        cls.refuse(group, "RAdam")
        b1, b2 = _betas(group)
        return radam(lr=group["lr"], b1=b1, b2=b2, eps=group["eps"], weight_decay=group["weight_decay"],
                     decoupled=bool(group.get("decoupled_weight_decay", False)))

    @classmethod
    def slots(cls, group: Mapping[str, Any]) -> dict[str, str]:
        return dict(ADAM_SLOTS)


FACES: tuple[type[_Face], ...] = (SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, NAdam, RAdam)
"""The torch.optim-shaped classes; each has the name of its torch.optim counterpart."""


def face_of(opt: torch.optim.Optimizer) -> type[_Face]:
    """The class of this module that reads ``opt``: its own class (ours), or the one named like its
    torch.optim class (``torch.optim.AdamW`` -> :class:`AdamW`; a subclass reads as its base)."""
    if isinstance(opt, _Face):
        return type(opt)
    for face in (AdamW, *(f for f in FACES if f is not AdamW)):  # torch's AdamW subclasses its Adam
        if isinstance(opt, getattr(torch.optim, face.__name__)):
            return face
    raise TypeError(f"functional_of: {type(opt).__module__}.{type(opt).__qualname__} has no functional counterpart in "
                    f"metaopt; it reads torch.optim's {', '.join(f.__name__ for f in FACES)}")


def functional_of(opt: torch.optim.Optimizer) -> list[tuple[list[Tensor], Optimizer]]:
    """``[(params, functional optimizer)]``, one per param group of ``opt`` (ours or a real torch.optim
    instance of one of the eight classes), at the group's current hyperparameters.

    Examples:
        >>> import torch
        >>> from metaopt import optim
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> [(params, opt)] = optim.functional_of(torch.optim.SGD([w], lr=0.1, momentum=0.9))
        >>> opt.name, opt.defaults["lr"], params[0] is w
        ('momentum', 0.1, True)
    """
    face = face_of(opt)
    return [(list(group["params"]), face.functional(group)) for group in opt.param_groups]


def _named(params: Sequence[Tensor] | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(params, Mapping):
        return dict(params)
    if isinstance(params, Tensor) or not isinstance(params, Iterable):
        raise TypeError(f"params must be a list of tensors or a dict {{name: tensor}}, got {type(params).__name__}")
    return {str(i): p for i, p in enumerate(params)}


def _groups(opt: torch.optim.Optimizer, named: Mapping[str, Tensor], caller: str) -> dict[str, dict[str, Any]]:
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    missing = [n for n, p in named.items() if id(p) not in where]
    if missing:
        raise ValueError(f"{caller}: parameter(s) {missing} are in none of the optimizer's param groups; pass the "
                         "tensors the optimizer holds")
    return {n: where[id(p)] for n, p in named.items()}


def functional_state(opt: torch.optim.Optimizer, params: Sequence[Tensor] | Mapping[str, Tensor]) -> tuple[State, int]:
    """The functional state of ``params`` held by ``opt`` (ours or torch.optim's), and its step index.

    Args:
        opt: one of the eight optimizers (ours or a torch.optim instance).
        params: tensors that ``opt`` holds, a list (named ``"0"``, ``"1"``, ... in the state) or a
            dict ``{name: tensor}`` (e.g. ``dict(model.named_parameters())``).

    Returns:
        ``(state, k)``: ``state`` is ``{slot: {name: tensor}}`` in the layout of the functional
        optimizer of their group (``functional_of(opt)``; slots in the module docstring's table),
        each tensor shaped like its parameter (copies); ``k`` is the number of steps the parameters have
        taken, the functional ``update``'s next ``step=k`` (0 for SGD, which counts none). A parameter
        not stepped yet reads as the functional ``init``. Raises a ``ValueError`` when the params have
        taken different numbers of steps or their groups keep different slots.
    """
    face = face_of(opt)
    named = _named(params)
    groups = _groups(opt, named, "functional_state")
    state: State = {}
    layouts: dict[tuple[str, ...], list[str]] = {}
    steps: dict[int, list[str]] = {}
    for name, p in named.items():
        group = groups[name]
        held = opt.state.get(p) or face.fresh(group, p, opt.defaults)
        slots, k = _read(face, group, held, p, opt.defaults)
        layouts.setdefault(tuple(sorted(slots)), []).append(name)
        steps.setdefault(k, []).append(name)
        for slot, value in slots.items():  # every slot shaped like its parameter (NAdam's mu_product expanded)
            state.setdefault(slot, {})[name] = value.detach().expand(p.shape).clone()
    if len(layouts) > 1:
        raise ValueError(f"functional_state: the params' groups keep different state slots {layouts}; convert one "
                         "group's params at a time")
    if len(steps) > 1:
        raise ValueError(f"functional_state: the params have taken different numbers of steps {steps}; convert params "
                         "that were stepped together")
    return state, next(iter(steps), 0)


def load_functional_state(opt: torch.optim.Optimizer, params: Sequence[Tensor] | Mapping[str, Tensor], state: State,
                          step: int) -> None:
    """Set ``opt``'s state of ``params`` (ours or torch.optim's) from a functional ``state``.

    The inverse of :func:`functional_state`: ``state`` is ``{slot: {name: tensor}}`` with exactly the
    slots of each param's group (``functional_of(opt)``'s optimizer, e.g. ``{"mu", "nu"}`` for Adam),
    each tensor shaped like its parameter, and ``step`` the number of steps taken (the next
    functional ``step=k``; SGD ignores it). The tensors are copied (detached); whatever ``opt`` held
    for these params is replaced.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"load_functional_state(step={step!r}): step must be an int >= 0 (the steps taken)")
    face = face_of(opt)
    named = _named(params)
    groups = _groups(opt, named, "load_functional_state")
    for name, p in named.items():
        group = groups[name]
        need = face.slots(group)
        have = sorted(s for s in state if name in state[s])
        if have != sorted(need) or set(state) - set(need):
            raise ValueError(f"load_functional_state: parameter {name!r} needs the slots {sorted(need)} for "
                             f"{face.__name__} with its group's options, the state has {sorted(state)} "
                             f"({have} for it)")
        for slot in need:
            if state[slot][name].shape != p.shape:
                raise ValueError(f"load_functional_state: state[{slot!r}][{name!r}] has shape "
                                 f"{tuple(state[slot][name].shape)}, the parameter {tuple(p.shape)}")
        held: dict[str, Any] = {}
        _write(face, group, held, p, {s: state[s][name].to(dtype=p.dtype, device=p.device) for s in need}, step,
               copy=True)
        opt.state[p] = held


__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "functional_of",
           "functional_state", "load_functional_state", "face_of", "scalar_dtype", "FACES"]
