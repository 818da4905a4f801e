"""The peers of the benchmarks: one model's differentiable inner run written with higher, with torchopt,
or by hand, each returning the outer loss of the trained model; the member loop that backpropagates
each member's outer loss in turn (a Python loop over ``m`` modules, as a user of these libraries
writes it); and a saved-tensor meter that counts their trajectory by metaopt's own rule.

Every run takes the same pieces: ``inner_loss(k, forward, params)`` (the loss of inner step ``k``;
``forward(x)`` is the model at its current params ``{name: tensor}``), ``lr(k)`` (a differentiable
scalar rate), an optional heavy-ball ``momentum`` (``torch.optim.SGD`` conventions, as
``metaopt.optim.momentum``), an optional coupled weight decay ``decay = {name: coefficient}`` (added
to the gradient, ``g + wd * w``, as ``metaopt.optim.sgd``'s ``weight_decay``), and ``outer(forward)``
(the outer loss of the trained model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

Forward = Callable[[Tensor], Tensor]
InnerLoss = Callable[[int, Forward, Mapping[str, Tensor]], Tensor]
Rate = Callable[[int], Tensor]
Outer = Callable[[Forward], Tensor]
Decay = Mapping[str, Tensor] | None


def _load(model: nn.Module, params0: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params0[name])


def run_higher(model: nn.Module, params0: Mapping[str, Tensor], steps: int, inner_loss: InnerLoss, lr: Rate,
               outer: Outer, momentum: float | None = None, decay: Decay = None, trace: Any = None) -> Tensor:
    """``higher.innerloop_ctx`` around ``torch.optim.SGD`` (lr 1, the rate given per step through
    ``override``); ``trace`` is a context manager around the inner steps (a meter's hooks)."""
    import higher

    _load(model, params0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=momentum or 0.0)
    names = [n for n, _ in model.named_parameters()]
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        with trace or contextlib.nullcontext():
            for k in range(steps):
                params = dict(zip(names, fmodel.fast_params))
                loss = inner_loss(k, fmodel, params)
                diffopt.step(loss, override={"lr": [lr(k)]}, grad_callback=_decayed(decay, params))
        return outer(fmodel)


def run_torchopt(model: nn.Module, params0: Mapping[str, Tensor], steps: int, inner_loss: InnerLoss, lr: Rate,
                 outer: Outer, momentum: float | None = None, decay: Decay = None, trace: Any = None) -> Tensor:
    """torchopt's functional API: ``torchopt.sgd(lr=1.0, momentum=...)`` built once, its update
    scaled by the learnable rate and applied out of place."""
    import torchopt

    transform = torchopt.sgd(lr=1.0, momentum=momentum or 0.0)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(params0[n].detach().clone().requires_grad_() for n in names)

    def forward_at(ps: tuple[Tensor, ...]) -> Forward:
        return lambda x: torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    state = transform.init(params)
    with trace or contextlib.nullcontext():
        for k in range(steps):
            loss = inner_loss(k, forward_at(params), dict(zip(names, params)))
            grads = torch.autograd.grad(loss, params, create_graph=True)
            grads = _decayed(decay, dict(zip(names, params)))(grads)
            updates, state = transform.update(grads, state, inplace=False)
            rate = lr(k)
            params = torchopt.apply_updates(params, tuple(rate * u for u in updates), inplace=False)
    return outer(forward_at(params))


def run_loop(model: nn.Module, params0: Mapping[str, Tensor], steps: int, inner_loss: InnerLoss, lr: Rate,
             outer: Outer, momentum: float | None = None, decay: Decay = None, trace: Any = None) -> Tensor:
    """By hand: ``autograd.grad(create_graph=True)`` per step and an out-of-place (momentum) SGD step."""
    names = [n for n, _ in model.named_parameters()]
    params = [params0[n].detach().clone().requires_grad_() for n in names]
    velocity: list[Tensor] | None = None

    def forward_at(ps: list[Tensor]) -> Forward:
        return lambda x: torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    with trace or contextlib.nullcontext():
        for k in range(steps):
            grads = torch.autograd.grad(inner_loss(k, forward_at(params), dict(zip(names, params))), params,
                                        create_graph=True)
            grads = _decayed(decay, dict(zip(names, params)))(grads)
            if momentum is not None:
                velocity = list(grads) if velocity is None else [momentum * v + g for v, g in zip(velocity, grads)]
                grads = velocity
            rate = lr(k)
            params = [p - rate * g for p, g in zip(params, grads)]
    return outer(forward_at(params))


def _decayed(decay: Decay, params: Mapping[str, Tensor]) -> Callable[[Any], list[Tensor]]:
    """``grads -> [g + decay[name] * w]`` at ``params`` (the identity without a decay)."""
    if decay is None:
        return list
    return lambda grads: [g + decay[n] * w for g, (n, w) in zip(grads, params.items())]


RUNS = {"higher": run_higher, "torchopt": run_torchopt, "hand-loop": run_loop}


class SavedMeter:
    """Bytes of the tensors autograd saves inside :meth:`trace` (deduplicated by storage, as
    ``metaopt.hypergrad.problem.Meter`` counts a recorded segment), the peak over the traces kept
    until :meth:`release`. A member loop traces one member's inner run, backpropagates, releases."""

    def __init__(self) -> None:
        self.saved: list[Tensor] = []
        self.peak = 0

    @contextlib.contextmanager
    def trace(self) -> Iterator[None]:
        def pack(t: Tensor) -> Tensor:
            self.saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.saved}
        self.peak = max(self.peak, sum(live.values()))

    def release(self) -> None:
        self.saved.clear()


def member_loop(models: list[nn.Module], member_loss: Callable[[int, nn.Module, Any], Tensor],
                meter: SavedMeter | None = None) -> float:
    """``member_loss(j, model, trace)`` for every member in turn, each backpropagated at once (its
    graph freed before the next member's run); returns the summed outer loss."""
    total = 0.0
    for j, model in enumerate(models):
        loss = member_loss(j, model, meter.trace() if meter is not None else None)
        loss.backward()
        total += float(loss.detach())
        if meter is not None:
            meter.release()
    return total
