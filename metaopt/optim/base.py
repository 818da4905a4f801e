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

An optimizer also states its *fixed point*: ``opt.residual(grads, params, step=k, **hparams)`` is a
dict shaped like ``params`` that is zero exactly where ``update`` stops moving (the gradient plus a
coupled weight decay; AdamW's decoupled condition). It is written in gradient form, so its Jacobian
in ``params`` is symmetric wherever the inner Hessian is: the implicit hypergradient methods solve
with it and differentiate it in the hyperparameters.

Values given at construction are checked there (finite, in range; :func:`check_spec`), never inside
``update``, which must stay free of Python branches on tensor values (``vmap``, ``torch.compile``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
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


class ResidualFn(Protocol):
    def __call__(
        self,
        grads: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        *,
        step: int | Tensor,
        **hparams: HParam,
    ) -> Params: ...


class Optimizer(NamedTuple):
    """A differentiable optimizer: ``init(params) -> state`` and ``update(...) -> (params, state)``.

    ``defaults`` holds the hyperparameters given at construction; ``update`` keyword arguments
    override them (this is how learnable hyperparameters are passed in as tensors). ``spec`` is the
    typed description it was built from (:class:`metaopt.optim.SGDSpec`, :class:`metaopt.optim.AdamSpec`
    or the adaptive families' ``Spec``; ``None`` for a hand-made pair): code that needs one family's
    dynamics (reversible learning needs heavy-ball momentum) checks its type and reads its fields, and
    ``spec.build()`` makes a variant. (``optim.SGD``, ``optim.Adam``, ... are the torch.optim-shaped
    classes of :mod:`metaopt.optim.stateful`.)

    ``residual(grads, params, *, step, **hparams) -> {name: tensor}`` (shaped like ``params``) is zero
    exactly at the optimizer's fixed point for the gradient ``grads`` of the inner loss: ``grads +
    weight_decay * params`` for SGD, momentum, Nesterov, Adam, RMSprop, Adagrad, Adamax, NAdam and
    RAdam (a chain's: its optimizer's at the transformed gradient); AdamW's decoupled condition in
    gradient form (docs/optim.md). The implicit methods, HOAG and ``train(tol=)`` use it; ``None``
    (a hand-made pair) makes them refuse, except the fixed-point method, which iterates ``update``.
    """

    init: Callable[[Mapping[str, Tensor]], State]
    update: UpdateFn
    defaults: Mapping[str, Any]
    spec: Any = None
    residual: ResidualFn | None = None

    @property
    def name(self) -> str:
        """The family's name for messages (``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adam"``,
        ``"adamw"``, ``"rmsprop"``, ``"adagrad"``, ``"adamax"``, ``"nadam"``, ``"radam"``; ``"optimizer"``
        for a hand-made pair, a chain or a masked optimizer)."""
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
    if isinstance(value, Tensor):  # the common cases first: this runs per parameter per inner step
        return _align(name, value, param_name, param)
    if type(value) is float:
        return value
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
    d = value.dim()
    if d == 0:
        return value
    if d == 1 and param.dim() >= 1 and value.shape[0] == param.shape[0]:  # one value per member: [m]
        return value.reshape((value.shape[0],) + (1,) * (param.dim() - 1))
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
    unknown = [] if overrides.keys() <= defaults.keys() else sorted(set(overrides) - set(defaults))
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


def add_decay(grad: Tensor, param: Tensor, weight_decay: Any) -> Tensor:
    """``grad + weight_decay * param`` (coupled L2 decay); a Python float ``0.0`` is skipped, a zero
    tensor is applied (so a learnable decay that starts at zero still gets a gradient)."""
    if isinstance(weight_decay, float) and weight_decay == 0.0:
        return grad
    return grad + weight_decay * param


def coupled_residual(
    grads: Mapping[str, Tensor], params: Mapping[str, Tensor], h: Mapping[str, Any], step: int | Tensor
) -> Params:
    """The fixed-point residual of an optimizer that steps along ``grad + weight_decay * w`` and stops
    only where that is zero (SGD, momentum, Nesterov, Adam): ``h`` are the merged hyperparameters."""
    return {key: add_decay(grads[key], w, resolve("weight_decay", h["weight_decay"], key, w, step))
            for key, w in params.items()}


def as_tensor_like(value: Any, like: Tensor) -> Tensor:
    """A float or tensor hyperparameter as a tensor on ``like``'s device and dtype."""
    if isinstance(value, Tensor):
        return value
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


FACES = {"sgd": "SGD", "momentum": "SGD", "nesterov": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop",
         "adagrad": "Adagrad", "adamax": "Adamax", "nadam": "NAdam", "radam": "RAdam"}
"""The torch.optim-shaped class (:mod:`metaopt.optim.stateful`) of each functional family."""

FUNCTIONAL = ("optim.{kind}(...) is the functional optimizer: give it hyperparameters only (optim.{kind}(lr=...)) and "
              "pass the params to init/update; for torch.optim's shape write optim.{face}(model.parameters(), lr=...) "
              "(see docs/optim.md)")


def functional_hint(kind: str) -> str:
    """:data:`FUNCTIONAL` for the family ``kind`` (the message of a torch.optim-style call of a functional one)."""
    return FUNCTIONAL.format(kind=kind, face=FACES.get(kind, "SGD"))


def refuse_parameters(spec: str, args: tuple) -> None:
    """A spec dataclass called torch.optim's way (``optim.SGDSpec(model.parameters(), lr=0.1)``): a
    ``TypeError`` saying that the spec takes keywords and naming the torch.optim-shaped class (before
    Python's own "multiple values for argument" error)."""
    if args and (isinstance(args[0], (Iterator, list, tuple))
                 or isinstance(args[0], Iterable) and not isinstance(args[0], (Tensor, Mapping, str))):
        face = spec.removesuffix("Spec")
        raise TypeError(f"optim.{spec}(...): got {type(args[0]).__name__} as the first argument; optim.{spec} is the "
                        f"functional spec and takes keywords (optim.{spec}(lr=0.1)); for torch.optim's shape write "
                        f"optim.{face}(model.parameters(), lr=...) (see docs/optim.md)")


def check_spec(kind: str, values: Mapping[str, Any], ranges: Mapping[str, tuple[float, float | None, bool]]) -> None:
    """Check an optimizer's construction-time hyperparameters (once, never inside ``update``).

    ``ranges[name] = (low, high, high_open)``: each float, each tensor element and each value of a
    per-parameter dict must be finite with ``low <= x`` and ``x < high`` (``x <= high`` when not
    ``high_open``; no upper bound for ``None``). Schedules are not evaluated. A parameter iterator
    or list as a value (``optim.adam(model.parameters())``, torch.optim's signature) raises a
    ``TypeError`` naming the functional form and the torch.optim-shaped class (``optim.Adam``)."""
    for name, value in values.items():
        if name in ranges and value is not None:
            _check_value(kind, name, value, ranges[name])


def _check_value(kind: str, name: str, value: Any, bounds: tuple[float, float | None, bool], key: str = "") -> None:
    where = f"optim.{kind}({name}{'[' + repr(key) + ']' if key else ''}=...)"
    if isinstance(value, (Iterator, list, tuple)) or (
            isinstance(value, Iterable) and not isinstance(value, (Tensor, Mapping, str))):
        raise TypeError(f"{where}: got {type(value).__name__}; " + functional_hint(kind))
    if isinstance(value, Mapping):
        if not key:
            for k, v in value.items():
                _check_value(kind, name, v, bounds, str(k))
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        return  # a schedule (or an unsupported type, which resolve() names at the first update)
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{where}: a tensor hyperparameter must be floating point, got {value.dtype}")
        if torch.compiler.is_compiling() or value.numel() == 0:
            return
        try:  # inside vmap (a batched tensor) the values are not readable: nothing to check there
            x = value.detach()
            bad_finite, lo, hi = not bool(torch.isfinite(x).all()), float(x.min()), float(x.max())
        except RuntimeError:
            return
    else:
        bad_finite, lo, hi = not math.isfinite(value), float(value), float(value)
    low, high, open_ = bounds
    if bad_finite:
        raise ValueError(f"{where}: {name} must be finite, got {_show(value)}")
    if lo < low or (high is not None and (hi >= high if open_ else hi > high)):
        rng = f"{low:g} <= {name}" + ("" if high is None else f" {'<' if open_ else '<='} {high:g}")
        raise ValueError(f"{where}: {name} must satisfy {rng}, got {_show(value)}")


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor with values in [{float(value.min()):g}, {float(value.max()):g}]" if value.numel() > 1 else (
            f"{float(value):g}")
    return repr(value)
