"""The optimizer contract and hyperparameter resolution shared by every differentiable optimizer.

An optimizer is a pair of pure functions (optax style)::

    state = opt.init(params)
    params, state = opt.update(grads, state, params, step=k, **hparams)

``params``, ``grads`` and ``state`` are dicts of tensors; the state holds only floating tensors
(the step index ``k`` is a required argument, not state, so ``vjp``/``jvp``/``vmap`` see a plain
pytree; an int, or a 0-d integer tensor under ``torch.compile``). Schedules and Adam's bias
correction read it, which is why it has no default: a forgotten ``step`` would silently freeze them.
Every update is out of place and free of Python branches on tensor values.

A hyperparameter value may be

* a Python float or a 0-d tensor — one value for everything;
* a tensor whose shape matches the *leading* dimensions of a parameter, e.g. ``[m]`` for one value
  per ensemble member (broadcast as ``[m, 1, 1, ...]``), or the parameter's full shape (per element);
* a dict ``{param_name: value}`` — one value per parameter (keys must match the params);
* a schedule ``k -> value`` (see :mod:`metaopt.optim.schedule`), evaluated at ``step``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]
"""Parameters (and gradients): ``{name: tensor}``, e.g. ``dict(model.named_parameters())``; an
ensemble's tensors carry a leading member axis ``[m, ...]``."""
State = dict[str, dict[str, Tensor]]
"""Optimizer state: ``{slot: {param name: tensor}}`` (``{}`` for SGD, ``{"velocity": ...}``,
``{"mu": ..., "nu": ...}``), floating tensors only."""
HParam = float | Tensor | Mapping[str, Any] | Callable[[int], Any]
"""A hyperparameter value: a float, a tensor (scalar, leading axes or full shape), a per-parameter
dict of those, or a schedule ``k -> value``."""


class UpdateFn(Protocol):
    def __call__(
        self,
        grads: Mapping[str, Tensor],
        state: State,
        params: Mapping[str, Tensor],
        *,
        step: int | Tensor,
        **hparams: HParam,
    ) -> tuple[Params, State]: ...


class Optimizer(NamedTuple):
    """A differentiable optimizer: ``init(params) -> state`` and ``update(...) -> (params, state)``.

    ``defaults`` holds the hyperparameters given at construction; ``update`` keyword arguments
    override them (this is how learnable hyperparameters are passed in as tensors). ``spec`` is the
    typed description it was built from (:class:`metaopt.optim.SGD` or :class:`metaopt.optim.Adam`;
    ``None`` for a hand-made pair): code that needs one family's dynamics (reversible learning needs
    heavy-ball momentum) checks its type and reads its fields, and ``spec.build()`` makes a variant.
    """

    init: Callable[[Mapping[str, Tensor]], State]
    update: UpdateFn
    defaults: Mapping[str, Any]
    spec: Any = None

    @property
    def name(self) -> str:
        """The family's name for messages (``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adam"``,
        ``"adamw"``; ``"optimizer"`` for a hand-made pair)."""
        return getattr(self.spec, "kind", "optimizer")


def check_keys(name: str, given: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` naming the missing and unexpected keys of a per-parameter dict."""
    if given.keys() == expected.keys():
        return
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    raise ValueError(
        f"hyperparameter {name!r}: per-parameter keys do not match the params "
        f"(missing {missing}, unexpected {extra}); give one value for each of {sorted(expected)}"
    )


def resolve(name: str, value: HParam, param_name: str, param: Tensor, step: int) -> Any:
    """The value of hyperparameter ``name`` for one parameter at inner step ``step``.

    Returns a float or a tensor that broadcasts against ``param`` (leading-axis aligned).
    """
    if isinstance(value, Mapping):
        if param_name not in value:
            raise ValueError(
                f"hyperparameter {name!r}: no value for parameter {param_name!r} "
                f"(have {sorted(value)}); give one value per parameter"
            )
        value = value[param_name]
    if callable(value) and not isinstance(value, Tensor):
        value = value(step)
    if isinstance(value, Tensor):
        return _align(name, value, param_name, param)
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(
        f"hyperparameter {name!r} for {param_name!r} must be a float, a tensor, a dict of them or a "
        f"schedule k -> value; got {type(value).__name__}"
    )


def _align(name: str, value: Tensor, param_name: str, param: Tensor) -> Tensor:
    if value.dim() == 0:
        return value
    if value.dim() > param.dim() or any(
        v != p and v != 1 for v, p in zip(value.shape, param.shape[: value.dim()])
    ):
        raise ValueError(
            f"hyperparameter {name!r} has shape {tuple(value.shape)}, which does not fit parameter "
            f"{param_name!r} of shape {tuple(param.shape)}: use a scalar, the parameter's leading "
            f"dimensions (e.g. [m] per ensemble member) or its full shape"
        )
    return value.reshape(value.shape + (1,) * (param.dim() - value.dim()))


def merge_hparams(
    defaults: Mapping[str, Any], overrides: Mapping[str, Any], params: Mapping[str, Tensor], opt_name: str, step: int
) -> dict[str, Any]:
    """Merge construction-time defaults with per-call overrides, validating names and dict keys;
    a top-level schedule is evaluated once here (not once per parameter)."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(
            f"{opt_name}.update got unknown hyperparameter(s) {unknown}; it takes {sorted(defaults)}"
        )
    hp = {**defaults, **overrides}
    for key, value in hp.items():
        if value is None:
            raise ValueError(f"{opt_name}: hyperparameter {key!r} is required (got None)")
        if isinstance(value, Mapping):
            check_keys(key, value, params)
        elif callable(value) and not isinstance(value, Tensor):
            hp[key] = value(step)
    return hp


def check_grads(grads: Mapping[str, Tensor], params: Mapping[str, Tensor], opt_name: str) -> None:
    if grads.keys() != params.keys():
        raise ValueError(
            f"{opt_name}.update: grads keys {sorted(grads)} do not match params keys {sorted(params)}"
        )


def as_tensor_like(value: Any, like: Tensor) -> Tensor:
    """A float or tensor hyperparameter as a tensor on ``like``'s device and dtype."""
    if isinstance(value, Tensor):
        return value
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)
