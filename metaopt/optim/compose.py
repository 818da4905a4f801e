"""Composition in the optax style: gradient transformations chained in front of an optimizer,
clipping by global norm, and freezing parameters.

A *gradient transformation* is the small protocol :class:`Transform`: pure functions over dicts of
tensors like an :class:`~metaopt.optim.Optimizer`'s, which map gradients to gradients::

    tstate = t.init(params)
    grads, tstate = t.update(grads, tstate, params, step=k, **hparams)
    grads = t.apply(grads, params, step=k, **hparams)      # the stateless map (None: it has state)

:func:`chain` puts transformations in front of an optimizer and returns an ordinary ``Optimizer``
(so every hypergradient method takes it). Its hyperparameters are the union of the parts' (a name
used twice is refused at construction); its state holds the optimizer's slots under their own
names and transformation ``i``'s slots as ``"t{i}.{slot}"``. Its ``residual`` is the optimizer's,
evaluated at the transformed gradient ``apply(grads)``; it is ``None`` (the implicit methods refuse)
when a transformation keeps state.

:func:`masked` wraps an optimizer so that the frozen parameters are never updated (and keep no
state); it states no residual, because a frozen parameter has no fixed-point condition (every value
is fixed), so the implicit methods refuse it and the unrolled ones apply.

Every hyperparameter of a part takes a schedule ``k -> value`` like any other (:mod:`.schedule`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from .base import HParam, Optimizer, Params, ResidualFn, State, check_grads, check_spec, merge_hparams

__all__ = ["Transform", "chain", "clip_by_global_norm", "masked", "partition"]


class TransformUpdateFn(Protocol):
    def __call__(self, grads: Mapping[str, Tensor], state: State, params: Mapping[str, Tensor], *,
                 step: int | Tensor, **hparams: HParam) -> tuple[Params, State]: ...


class Transform(NamedTuple):
    """A gradient transformation: ``init(params) -> state``, ``update(grads, state, params, *, step,
    **hparams) -> (grads, state)``, its ``defaults`` hyperparameters, a ``name`` for messages and
    ``apply(grads, params, *, step, **hparams) -> grads``, the same map without state (``None``
    when it keeps state; then a chain that holds it states no residual)."""

    init: Callable[[Mapping[str, Tensor]], State]
    update: TransformUpdateFn
    defaults: Mapping[str, Any]
    name: str
    apply: Callable[..., Params] | None = None


CLIP_EPS = 1e-6
"""``torch.nn.utils.clip_grad_norm_``'s guard: the scale is ``min(1, max_norm / (norm + 1e-6))``."""


def clip_by_global_norm(max_norm: HParam = 1.0) -> Transform:
    """Scale all gradients by ``min(1, max_norm / (||g|| + 1e-6))``, ``||g||`` the 2-norm of all of
    them together (``torch.nn.utils.clip_grad_norm_``). Stateless; differentiable in ``max_norm``
    (where it clips) and in the gradients. Under ``vmap`` over ensemble members the norm is each
    member's; on stacked ``[m, ...]`` params without ``vmap`` it is the norm over all members.

    Examples:
        >>> import torch
        >>> from metaopt import optim
        >>> clip = optim.clip_by_global_norm(max_norm=1.0)
        >>> g = clip.apply({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, {}, step=0)
        >>> [round(float(v), 4) for v in g.values()]
        [0.6, 0.8]
    """
    check_spec("clip_by_global_norm", {"max_norm": max_norm}, {"max_norm": (0.0, None, False)})
    defaults = {"max_norm": max_norm}

    def apply(grads: Mapping[str, Tensor], params: Mapping[str, Tensor], *, step: int | Tensor,
              **hparams: HParam) -> Params:
        h = merge_hparams(defaults, hparams, grads, "clip_by_global_norm", step)
        if not grads:
            return {}
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        limit = h["max_norm"]
        if isinstance(limit, Mapping):
            raise ValueError("clip_by_global_norm: max_norm is one value for all parameters (a global norm), "
                             "not a per-parameter dict")
        scale = torch.clamp(limit / (norm + CLIP_EPS), max=1.0)
        return {k: g * scale for k, g in grads.items()}

    def update(grads: Mapping[str, Tensor], state: State, params: Mapping[str, Tensor], *, step: int | Tensor,
               **hparams: HParam) -> tuple[Params, State]:
        return apply(grads, params, step=step, **hparams), {}

    return Transform(lambda params: {}, update, defaults, "clip_by_global_norm", apply)


def chain(*parts: Transform | Optimizer) -> Optimizer:
    """Apply the transformations in order to the gradients, then the optimizer (the last part).

    ``chain(clip_by_global_norm(1.0), adam(lr=1e-3))`` is ``clip_grad_norm_`` then ``Adam.step``.
    Hyperparameters of all parts are passed to ``update`` by name (``max_norm=``, ``lr=``).

    Examples:
        >>> import torch
        >>> from metaopt import optim
        >>> opt = optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(lr=1.0))
        >>> params = {"w": torch.tensor([0.0, 0.0])}
        >>> new, _ = opt.update({"w": torch.tensor([3.0, 4.0])}, opt.init(params), params, step=0)
        >>> new["w"]
        tensor([-0.3000, -0.4000])
    """
    if not parts or not isinstance(parts[-1], Optimizer):
        raise TypeError("chain(...): the last part must be an optimizer (e.g. chain(clip_by_global_norm(1.0), "
                        "adam(lr=1e-3)))")
    *transforms, opt = parts
    for i, t in enumerate(transforms):
        if not isinstance(t, Transform):
            raise TypeError(f"chain(...): part {i} is a {type(t).__name__}; only the last part may be an optimizer, "
                            "the others are gradient transformations (e.g. clip_by_global_norm(1.0))")
    owner: dict[str, int] = {}
    for i, d in enumerate([t.defaults for t in transforms] + [opt.defaults]):
        for n in d:
            if n in owner:
                raise ValueError(f"chain(...): hyperparameter {n!r} belongs to two parts ({owner[n]} and {i}); "
                                 "give each part distinct hyperparameter names")
            owner[n] = i
    defaults = {n: v for d in [t.defaults for t in transforms] + [opt.defaults] for n, v in d.items()}
    last = len(transforms)

    def split(hparams: Mapping[str, Any]) -> list[dict[str, Any]]:
        unknown = sorted(set(hparams) - set(owner))
        if unknown:
            raise TypeError(f"chain.update got unknown hyperparameter(s) {unknown}; it takes {sorted(owner)}")
        out: list[dict[str, Any]] = [{} for _ in range(last + 1)]
        for n, v in hparams.items():
            out[owner[n]][n] = v
        return out

    def init(params: Mapping[str, Tensor]) -> State:
        state = dict(opt.init(params))
        for i, t in enumerate(transforms):
            state |= {f"t{i}.{slot}": v for slot, v in t.init(params).items()}
        return state

    def update(grads: Mapping[str, Tensor], state: State, params: Mapping[str, Tensor], *, step: int | Tensor,
               **hparams: HParam) -> tuple[Params, State]:
        check_grads(grads, params, "chain")
        hp = split(hparams)
        new_state: State = {}
        for i, t in enumerate(transforms):
            prefix = f"t{i}."
            mine = {s[len(prefix):]: v for s, v in state.items() if s.startswith(prefix)}
            grads, mine = t.update(grads, mine, params, step=step, **hp[i])
            new_state |= {prefix + s: v for s, v in mine.items()}
        own = {s: v for s, v in state.items() if not (s[:1] == "t" and "." in s)}
        params, own = opt.update(grads, own, params, step=step, **hp[last])
        return params, {**own, **new_state}

    residual: ResidualFn | None = None
    if opt.residual is not None and all(t.apply is not None for t in transforms):
        def residual(grads: Mapping[str, Tensor], params: Mapping[str, Tensor], *, step: int | Tensor,
                     **hparams: HParam) -> Params:
            """The optimizer's residual at the transformed gradient."""
            check_grads(grads, params, "chain")
            hp = split(hparams)
            for i, t in enumerate(transforms):
                grads = t.apply(grads, params, step=step, **hp[i])
            return opt.residual(grads, params, step=step, **hp[last])

    return Optimizer(init, update, defaults, None, residual)


def masked(opt: Optimizer, frozen: Callable[[str], bool] | Mapping[str, bool]) -> Optimizer:
    """``opt`` on the trainable parameters only: a frozen parameter is returned unchanged (no step,
    no weight decay, no state). ``frozen`` is a predicate on the parameter's name
    (``lambda n: n.startswith("0.")``) or a dict ``{name: bool}`` with exactly the params' keys.

    Per-parameter hyperparameter dicts keep the keys of *all* params (the frozen entries are
    ignored). States no residual: the implicit methods refuse it (see the module docstring).

    Examples:
        >>> import torch
        >>> from metaopt import optim
        >>> opt = optim.masked(optim.sgd(lr=0.1), {"a": True, "b": False})
        >>> params = {"a": torch.ones(2), "b": torch.ones(2)}
        >>> new, state = opt.update({k: torch.ones(2) for k in params}, opt.init(params), params, step=0)
        >>> new["a"], new["b"]
        (tensor([1., 1.]), tensor([0.9000, 0.9000]))
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"masked(opt, frozen): opt must be an optimizer, got {type(opt).__name__}")
    if not (callable(frozen) or isinstance(frozen, Mapping)):
        raise TypeError(f"masked(opt, frozen): frozen must be a predicate name -> bool or a dict {{name: bool}}, "
                        f"got {type(frozen).__name__}")

    def is_frozen(params: Mapping[str, Tensor]) -> dict[str, bool]:
        if isinstance(frozen, Mapping):
            if frozen.keys() != params.keys():
                missing, extra = sorted(set(params) - set(frozen)), sorted(set(frozen) - set(params))
                raise ValueError(f"masked: frozen's keys do not match the params (missing {missing}, unexpected "
                                 f"{extra}); give True or False for each of {sorted(params)}")
            out = dict(frozen)
        else:
            out = {k: frozen(k) for k in params}
        bad = [k for k, v in out.items() if not isinstance(v, bool)]
        if bad:
            raise TypeError(f"masked: frozen[{bad[0]!r}] must be True or False, got {out[bad[0]]!r}")
        return out

    def restrict(hparams: Mapping[str, Any], keep: list[str]) -> dict[str, Any]:
        return {n: ({k: v[k] for k in keep if k in v} if isinstance(v, Mapping) else v) for n, v in hparams.items()}

    def init(params: Mapping[str, Tensor]) -> State:
        fz = is_frozen(params)
        return opt.init({k: p for k, p in params.items() if not fz[k]})

    def update(grads: Mapping[str, Tensor], state: State, params: Mapping[str, Tensor], *, step: int | Tensor,
               **hparams: HParam) -> tuple[Params, State]:
        check_grads(grads, params, "masked")
        fz = is_frozen(params)
        keep = [k for k in params if not fz[k]]
        h = restrict({**opt.defaults, **hparams}, keep)
        sub, state = opt.update({k: grads[k] for k in keep}, state, {k: params[k] for k in keep}, step=step, **h)
        return {k: (params[k] if fz[k] else sub[k]) for k in params}, state

    return Optimizer(init, update, opt.defaults, None, None)




def partition(groups: Sequence[tuple[Iterable[str], Optimizer]]) -> Optimizer:
    """One optimizer over several parameter groups, each stepped by its own optimizer (optax's
    ``multi_transform``; torch.optim's param groups): ``groups = [(names, optimizer), ...]`` with
    disjoint names that together cover the params.

    Its ``defaults`` merge the groups': a value all groups share stays one value, one that differs
    becomes a per-parameter dict (so ``update(lr={name: ...})`` sets any parameter's rate, and a
    per-parameter override is split among the groups). A hyperparameter that only some groups' optimizers
    take reaches only those. The state holds each group's slots for its own params; the residual is
    each group's (``None`` when a group states none). One group is returned as its own optimizer.

    Examples:
        >>> import torch
        >>> from metaopt import optim
        >>> opt = optim.partition([(["w"], optim.sgd(lr=0.1)), (["b"], optim.adam(lr=0.01))])
        >>> params = {"w": torch.ones(2), "b": torch.ones(2)}
        >>> new, state = opt.update({k: torch.ones(2) for k in params}, opt.init(params), params, step=0)
        >>> new["w"], new["b"], opt.defaults["lr"]
        (tensor([0.9000, 0.9000]), tensor([0.9900, 0.9900]), {'w': 0.1, 'b': 0.01})
    """
    parts = [(list(names), opt) for names, opt in groups]
    if not parts:
        raise ValueError("partition: give at least one (names, optimizer) group")
    seen: dict[str, int] = {}
    for i, (names, opt) in enumerate(parts):
        if not isinstance(opt, Optimizer):
            raise TypeError(f"partition: group {i}'s optimizer must be a metaopt optimizer, got {type(opt).__name__}")
        for n in names:
            if n in seen:
                raise ValueError(f"partition: parameter {n!r} is in groups {seen[n]} and {i}; each belongs to one")
            seen[n] = i
    if len(parts) == 1:
        return parts[0][1]
    defaults: dict[str, Any] = {}
    for key in dict.fromkeys(k for _, opt in parts for k in opt.defaults):
        having = [(names, opt.defaults[key]) for names, opt in parts if key in opt.defaults]
        values = [v for _, v in having]
        if len(having) == len(parts) and all(_same(v, values[0]) for v in values):
            defaults[key] = values[0]
        else:
            defaults[key] = {n: (v[n] if isinstance(v, Mapping) else v) for names, v in having for n in names}

    def check(params: Mapping[str, Any]) -> None:
        if params.keys() != seen.keys():
            missing, extra = sorted(set(seen) - set(params)), sorted(set(params) - set(seen))
            raise ValueError(f"partition: the groups hold {sorted(seen)} but the params are {sorted(params)} "
                             f"(missing {missing}, in no group {extra}); give every parameter one group")

    def split(hparams: Mapping[str, Any], names: list[str], opt: Optimizer) -> dict[str, Any]:
        return {k: ({n: v[n] for n in names} if isinstance(v, Mapping) else v)
                for k, v in hparams.items() if k in opt.defaults}

    def init(params: Mapping[str, Tensor]) -> State:
        check(params)
        state: State = {}
        for names, opt in parts:
            for slot, values in opt.init({n: params[n] for n in names}).items():
                state.setdefault(slot, {}).update(values)
        return state

    def own(state: State, names: list[str]) -> State:
        return {slot: {n: values[n] for n in names if n in values} for slot, values in state.items()
                if any(n in values for n in names)}

    def update(grads: Mapping[str, Tensor], state: State, params: Mapping[str, Tensor], *, step: int | Tensor,
               **hparams: HParam) -> tuple[Params, State]:
        check_grads(grads, params, "partition")
        check(params)
        unknown = sorted(set(hparams) - set(defaults))
        if unknown:
            raise TypeError(f"partition.update got unknown hyperparameter(s) {unknown}; it takes {sorted(defaults)}")
        new: Params = {}
        out: State = {}
        for names, opt in parts:
            sub = {n: params[n] for n in names}
            p, s = opt.update({n: grads[n] for n in names}, own(state, names), sub, step=step,
                              **split(hparams, names, opt))
            new.update(p)
            for slot, values in s.items():
                out.setdefault(slot, {}).update(values)
        return {n: new[n] for n in params}, out

    residual: ResidualFn | None = None
    if all(opt.residual is not None for _, opt in parts):
        def residual(grads: Mapping[str, Tensor], params: Mapping[str, Tensor], *, step: int | Tensor,
                     **hparams: HParam) -> Params:
            check(params)
            out: Params = {}
            for names, opt in parts:
                out.update(opt.residual({n: grads[n] for n in names}, {n: params[n] for n in names}, step=step,
                                        **split(hparams, names, opt)))
            return {n: out[n] for n in params}

    return Optimizer(init, update, defaults, None, residual)


def _same(a: Any, b: Any) -> bool:
    """Equal hyperparameter values (the same object, or equal floats): tensors and schedules are
    compared by identity, so two groups' distinct tensors stay separate per-parameter entries."""
    if a is b:
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b
    return False
