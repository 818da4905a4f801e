"""The way over from higher and torchopt: a differentiable inner loop for code written against an
``nn.Module`` and a ``torch.optim`` optimizer.

Eager, the way ``higher.innerloop_ctx`` works, without patching the module::

    with metaopt.migrate.innerloop(model, inner_opt) as (fmodel, diffopt):
        for _ in range(5):
            diffopt.step(F.cross_entropy(fmodel(x_spt), y_spt))    # graph kept
        F.cross_entropy(fmodel(x_qry), y_qry).backward()           # dF/dw0 lands in model's .grad

``fmodel`` runs ``model`` through :func:`torch.func.functional_call` on a dict of fast weights (and
copies of the module's buffers, e.g. BatchNorm's running statistics); ``diffopt.step(loss)`` applies
the functional update of :mod:`metaopt.optim` that matches the optimizer's class, param groups and
hyperparameters. The module itself is never modified.

With any registered hypergradient method (:func:`metaopt.hypergrad.names`), from the same two losses
written against ``fmodel``::

    metaopt.migrate.backward(model, inner_opt, inner_loss, outer_loss, steps=5, method="checkpointed")

``inner_loss(fmodel, k)`` and ``outer_loss(fmodel)`` are the user's code; the result is written into
``.grad`` as ``outer_loss(...).backward()`` after the eager loop would write it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import optim
from .hypergrad import HypergradResult, Method, as_method, hypergradient
from .objective import MetaObjective
from .optim.base import Optimizer

__all__ = ["DifferentiableOptimizer", "FunctionalModel", "backward", "innerloop"]

Override = Mapping[str, Any]
"""``{hyperparameter: value}``: a tensor (or float) for every parameter, a list/tuple with one value per
param group of the optimizer (higher's form), or a metaopt per-parameter dict ``{param name: value}``."""


class FunctionalModel:
    """``model`` run on a dict of weights: ``fmodel(*args, **kwargs)`` is ``model(*args, **kwargs)`` with
    the trainable parameters replaced by ``params`` (the fast weights), the frozen ones (requires_grad
    False, or in no param group) kept, and the buffers read from and updated in ``buffers`` (copies of
    the module's: its own are never touched). ``train()``/``eval()`` set the mode used for the calls
    (default: the module's mode when the context opened)."""

    def __init__(self, module: nn.Module, params: dict[str, Tensor], frozen: dict[str, Tensor],
                 buffers: dict[str, Tensor]) -> None:
        self.module, self.params, self.frozen, self.buffers = module, params, frozen, buffers
        self.training = module.training

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fresh = {k: b.clone() for k, b in self.buffers.items()}  # in-place BN updates land on fresh copies
        mode = self.module.training
        self.module.train(self.training)
        try:
            out = functional_call(self.module, ({**self.frozen, **self.params}, fresh), args, kwargs)
        finally:
            self.module.train(mode)
        self.buffers = fresh
        return out

    def train(self, mode: bool = True) -> FunctionalModel:
        self.training = mode
        return self

    def eval(self) -> FunctionalModel:
        return self.train(False)

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """Every parameter's current value, in the module's order (fast weights and frozen ones)."""
        for name, _ in self.module.named_parameters():
            yield name, self.params[name] if name in self.params else self.frozen[name]

    def parameters(self) -> Iterator[Tensor]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        yield from self.buffers.items()

    def fast_params(self) -> dict[str, Tensor]:
        """The trainable fast weights ``{name: tensor}`` (what ``diffopt.step`` updates)."""
        return dict(self.params)


class DifferentiableOptimizer:
    """``step(loss)``: one functional update of the fast weights along ``d loss / d params`` with the
    graph kept (``first_order=True``: the gradient taken as a constant; ``track=False``: nothing kept),
    so a later ``backward()`` differentiates through every step taken."""

    def __init__(self, fmodel: FunctionalModel, opt: Optimizer, hparams: dict[str, Any], *, first_order: bool,
                 track: bool) -> None:
        self.fmodel, self.opt, self.hparams = fmodel, opt, hparams
        self.first_order, self.track = first_order, track
        self.state = opt.init(fmodel.params)
        self.k = 0

    def step(self, loss: Tensor) -> dict[str, Tensor]:
        """Update the fast weights with the gradient of the scalar ``loss``; returns them ``{name: tensor}``."""
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"diffopt.step(loss): loss must be a scalar tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
        params = self.fmodel.params
        names = list(params)
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=self.track and not
                                        self.first_order, allow_unused=True)
        g = {n: (gi if gi is not None else torch.zeros_like(params[n])) for n, gi in zip(names, grads)}
        if self.track:
            new, self.state = self.opt.update(g, self.state, params, step=self.k, **self.hparams)
        else:
            with torch.no_grad():
                new, self.state = self.opt.update(g, self.state, params, step=self.k, **self.hparams)
            new = {n: w.detach().requires_grad_() for n, w in new.items()}
        self.fmodel.params = new
        self.k += 1
        return dict(new)


@contextlib.contextmanager
def innerloop(model: nn.Module, optimizer: Any, *, first_order: bool = False, override: Override | None = None,
              track: bool = True) -> Iterator[tuple[FunctionalModel, DifferentiableOptimizer]]:
    """A differentiable inner loop over ``model`` (higher's ``innerloop_ctx`` with
    ``copy_initial_weights=False``): yields ``(fmodel, diffopt)``.

    Args:
        model: any ``nn.Module``; never modified (its parameters are the starting fast weights, so
            ``backward()`` after the loop puts ``dF/dw0`` in their ``.grad``; its buffers are copied).
        optimizer: a ``torch.optim`` optimizer over (some of) ``model``'s parameters (SGD, Adam, AdamW,
            RMSprop, Adagrad, Adamax, NAdam, RAdam: its class, param groups and hyperparameters are
            read, and its state, if it has stepped, is the start state, as higher copies it; the
            optimizer itself is not modified), or a functional
            :class:`metaopt.optim.Optimizer` (then every parameter that requires grad is trained).
            Parameters that require no grad or are in no param group stay fixed.
        first_order: treat the inner gradients as constants (first-order MAML).
        override: learnable hyperparameters, e.g. ``{"lr": torch.tensor(0.1, requires_grad=True)}``
            (metaopt's names: ``lr``, ``momentum``, ``weight_decay``, ``b1``, ``b2``, ``eps``, ...;
            ``betas=(b1, b2)`` too); a list/tuple gives one value per param group.
        track: ``False`` keeps no graph at all (higher's ``track_higher_grads=False``: evaluation).
    """
    opt, params, frozen, groups = _read(model, optimizer)
    hp = _overrides(override, opt, params, groups)
    fmodel = FunctionalModel(model, params, frozen, {k: b.detach().clone() for k, b in model.named_buffers()})
    if not track:
        fmodel.params = {n: p.detach().requires_grad_() for n, p in params.items()}
    yield fmodel, DifferentiableOptimizer(fmodel, opt, hp, first_order=first_order, track=track)


def backward(model: nn.Module, optimizer: Any, inner_loss: Callable[[FunctionalModel, int], Tensor],
             outer_loss: Callable[[FunctionalModel], Tensor], steps: int, *, method: Method | str = "full",
             override: Override | None = None, init: bool = True, generator: torch.Generator | None = None,
             **kwargs: Any) -> HypergradResult:
    """``outer_loss`` after ``steps`` inner steps of ``inner_loss``, differentiated by any hypergradient
    ``method``, with the result accumulated into ``.grad`` like ``outer_loss(fmodel).backward()`` after
    the eager :func:`innerloop` (the model's trainable parameters with ``init=True``, and the
    ``override`` tensors that require grad).

    Args:
        model: as for :func:`innerloop`.
        optimizer: as for :func:`innerloop`.
        inner_loss: ``inner_loss(fmodel, k) -> scalar`` at inner step ``k`` (the user's eager code).
        outer_loss: ``outer_loss(fmodel) -> scalar`` at the trained weights.
        steps: inner steps ``n >= 1``.
        method: a registered name or :class:`~metaopt.hypergrad.Method` (docs/choosing-a-method.md).
        override: as for :func:`innerloop`; the tensors that require grad are the learned hyperparameters.
        init: the initial weights are learned (MAML): ``dF/dw0`` flows through the method. The methods
            that differentiate at the inner fixed point (``implicit``, ``cg``, ``hoag``, ...) refuse
            it: the fixed point does not depend on where the run starts; pass ``init=False`` (only the
            ``override`` hyperparameters learned).
        generator: as for :func:`metaopt.hypergradient` (random draws inside the losses).
        **kwargs: passed on to :func:`metaopt.hypergradient` (``compile``, ``exact_memory``, ...).

    Returns:
        The :class:`~metaopt.HypergradResult` (``grads`` keyed ``init.<param name>`` and the override names).
    """
    if "first_order" in kwargs:
        raise TypeError("migrate.backward(first_order=...): first-order MAML is the eager context's switch, "
                        "migrate.innerloop(model, optimizer, first_order=True); backward differentiates the full run")
    opt, params, frozen, groups = _read(model, optimizer)
    meth = as_method(method, steps)
    if init and meth.reference == "stationary":
        raise ValueError(f"method {meth.label!r} differentiates at the inner fixed point, which does not depend on the "
                         "initial weights: use an unrolled method (full, checkpointed, ...) or init=False")
    for key, value in (override or {}).items():
        values = list(value.values()) if isinstance(value, Mapping) else list(value) if isinstance(
            value, (list, tuple)) else [value]
        if any(callable(v) and not isinstance(v, Tensor) for v in values):
            raise TypeError(f"migrate.backward: override[{key!r}] is a schedule, whose table the methods cannot see "
                            "(no gradient would reach it); use the eager migrate.innerloop, or write a MetaObjective "
                            "whose hparams(hyper) build the schedule from hyper")
    learn = {k: v for k, v in (override or {}).items() if _learnable(v)}
    hyper: dict[str, Tensor] = {f"init.{n}": p for n, p in params.items()} if init else {}
    slots: dict[str, Any] = {}
    for key, value in learn.items():
        if isinstance(value, (list, tuple)):
            slots[key] = [f"{key}.{i}" for i in range(len(value))]
            hyper.update({f"{key}.{i}": _as_tensor(v, params) for i, v in enumerate(value)})
        elif isinstance(value, Mapping):
            slots[key] = {n: f"{key}.{n}" for n in value}
            hyper.update({f"{key}.{n}": _as_tensor(v, params) for n, v in value.items()})
        else:
            slots[key] = key
            hyper[key] = value
    if not hyper:
        raise ValueError("migrate.backward: nothing to differentiate: pass init=True (learn the initial weights) or "
                         "override={name: tensor that requires grad}")
    fixed = {k: v for k, v in (override or {}).items() if k not in learn}
    objective = _Objective(model, params, frozen, inner_loss, outer_loss, opt, groups, fixed, slots, init)
    res = hypergradient(objective, opt, hyper, steps, method=meth, generator=generator, **kwargs)
    sources = {f"init.{n}": p for n, p in params.items()} if init else {}
    for key, value in learn.items():
        if isinstance(value, (list, tuple)):
            sources.update({f"{key}.{i}": v for i, v in enumerate(value)})
        elif isinstance(value, Mapping):
            sources.update({f"{key}.{n}": v for n, v in value.items()})
        else:
            sources[key] = value
    for name, leaf in sources.items():
        if isinstance(leaf, Tensor) and leaf.requires_grad:
            g = res.grads[name].reshape(leaf.shape)
            leaf.grad = g.clone() if leaf.grad is None else leaf.grad + g
    return res


class _Objective(MetaObjective):
    """The user's two losses over ``fmodel`` as a :class:`~metaopt.MetaObjective`: the initial weights are
    ``hyper["init.<name>"]`` (or the module's), the buffers travel as inner state."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor], frozen: dict[str, Tensor],
                 inner: Callable[[FunctionalModel, int], Tensor], outer: Callable[[FunctionalModel], Tensor],
                 opt: Optimizer, groups: list[list[str]], fixed: Mapping[str, Any], slots: Mapping[str, Any],
                 init: bool) -> None:
        self.model, self.params, self.frozen = model, params, {k: v.detach() for k, v in frozen.items()}
        self.inner, self.outer, self.opt, self.groups = inner, outer, opt, groups
        self.fixed, self.slots, self.learn_init = fixed, slots, init
        self.mode = model.training

    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        if self.learn_init:
            return {n: hyper[f"init.{n}"].clone() for n in self.params}
        return {n: p.detach().clone() for n, p in self.params.items()}

    def init_buffers(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        return {k: b.detach().clone() for k, b in self.model.named_buffers()}

    def _fmodel(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> FunctionalModel:
        f = FunctionalModel(self.model, dict(params), self.frozen, dict(buffers))
        f.training = self.mode
        return f

    def inner_loss_and_buffers(self, params, buffers, hyper, k, batch):  # noqa: ANN001, ANN201
        f = self._fmodel(params, buffers)
        return self.inner(f, k), f.buffers

    def outer_loss_with_buffers(self, params, buffers, hyper, batch):  # noqa: ANN001, ANN201
        return self.outer(self._fmodel(params, buffers))

    def hparams(self, hyper: Mapping[str, Tensor]) -> dict[str, Any]:
        values: dict[str, Any] = dict(self.fixed)
        for key, slot in self.slots.items():
            if isinstance(slot, list):
                values[key] = [hyper[s] for s in slot]
            elif isinstance(slot, Mapping):
                values[key] = {n: hyper[s] for n, s in slot.items()}
            else:
                values[key] = hyper[slot]
        return _overrides(values, self.opt, self.params, self.groups)


# -- reading a torch.optim optimizer -------------------------------------------------------------------------


def _read(model: nn.Module, optimizer: Any) -> tuple[Optimizer, dict[str, Tensor], dict[str, Tensor], list[list[str]]]:
    """``(functional optimizer, trainable params, frozen params, param groups as lists of names)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    if isinstance(optimizer, Optimizer):
        groups = [[n for n, p in named.items() if p.requires_grad]]
        opt = optimizer
    elif isinstance(optimizer, torch.optim.Optimizer):
        by_id = {id(p): n for n, p in named.items()}
        groups = []
        for i, group in enumerate(optimizer.param_groups):
            names = []
            for p in group["params"]:
                if id(p) not in by_id:
                    raise ValueError(f"optimizer.param_groups[{i}] holds a tensor of shape {tuple(p.shape)} that is "
                                     "not a parameter of model; build the optimizer over model.parameters()")
                if p.requires_grad:
                    names.append(by_id[id(p)])
            groups.append(names)
        opt = optim.partition([(names, f) for names, (_, f) in zip(groups, optim.functional_of(optimizer))])
        if any(optimizer.state.get(named[n]) for g in groups for n in g):
            opt = _resumed(opt, *optim.functional_state(optimizer, {n: named[n] for g in groups for n in g}))
    else:
        raise TypeError(f"optimizer must be a torch.optim optimizer or a metaopt.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    trained = {n for g in groups for n in g}
    if not trained:
        raise ValueError("the optimizer trains none of model's parameters (all frozen, or none in its param groups)")
    params = {n: p for n, p in named.items() if n in trained}
    frozen = {n: p for n, p in named.items() if n not in trained}
    return opt, params, frozen, groups


def _resumed(opt: Optimizer, state0: dict[str, dict[str, Tensor]], k0: int) -> Optimizer:
    """``opt`` starting from ``state0`` at step index ``k0`` (its ``init`` returns copies of ``state0``)."""

    def init(params: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        return {slot: {n: t.clone() for n, t in part.items()} for slot, part in state0.items()}

    def update(grads, state, params, *, step, **hparams):  # noqa: ANN001, ANN202
        return opt.update(grads, state, params, step=step + k0, **hparams)

    residual = None
    if opt.residual is not None:
        def residual(grads, params, *, step, **hparams):  # noqa: ANN001, ANN202
            return opt.residual(grads, params, step=step + k0, **hparams)

    # no spec: a method that rebuilds the optimizer from its spec (reversible) would lose the start state
    return Optimizer(init, update, opt.defaults, None, residual)


def _overrides(override: Override | None, opt: Optimizer, params: Mapping[str, Tensor],
               groups: list[list[str]]) -> dict[str, Any]:
    """``override`` in ``opt.update``'s form: per-group lists become per-parameter dicts, ``betas`` b1 and b2."""
    out: dict[str, Any] = {}
    for key, value in (override or {}).items():
        if key == "betas":
            out["b1"], out["b2"] = value
            continue
        if key not in opt.defaults:
            raise ValueError(f"override[{key!r}]: {opt.name} has no hyperparameter {key!r}; it takes "
                             f"{sorted(opt.defaults)}")
        if isinstance(value, (list, tuple)):
            if len(value) == 1:
                value = value[0]
            elif len(value) != len(groups):
                raise ValueError(f"override[{key!r}] has {len(value)} values but the optimizer has {len(groups)} "
                                 "param groups; give one value, or one per group")
            else:
                value = {n: v for names, v in zip(groups, value) for n in names}
        if isinstance(value, Mapping) and set(value) != set(params):
            # a per-parameter dict may name a subset: the rest keep the optimizer's value
            base = opt.defaults[key]
            value = {n: value[n] if n in value else (base[n] if isinstance(base, Mapping) else base) for n in params}
        out[key] = value
    return out


def _learnable(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.requires_grad
    if isinstance(value, (list, tuple)):
        return any(_learnable(v) for v in value)
    if isinstance(value, Mapping):
        return any(_learnable(v) for v in value.values())
    return False


def _as_tensor(value: Any, params: Mapping[str, Tensor]) -> Tensor:
    if isinstance(value, Tensor):
        return value
    like = next(iter(params.values()))
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)
