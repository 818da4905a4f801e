"""Reverse-mode hypergradients through the unrolled inner run, the trajectory kept by policy.

The sweep is explicit (Maclaurin et al. 2015, Alg. 3; the distillation seed paper's Algorithm 3),
one recorded segment of inner steps at a time (:meth:`Problem.record` / :meth:`Problem.sweep`).
Which steps have a graph at any moment is the policy: all of them as one segment (:class:`Full`),
the last K (:class:`Truncated`), or one segment of ``c`` steps at a time, recomputed from stored
checkpoints (:class:`Checkpointed`).

With ``create_graph`` (a level above differentiates the hypergradient) all three keep the one graph of
the whole run and differentiate it with ``create_graph=True`` (:func:`differentiable`): the level above
backpropagates through every inner step, so no trajectory policy can drop a step's graph there. Memory
is then the full unroll's for every policy; bound it at the level above (e.g. ``Checkpointed`` over
the outer steps of a :class:`metaopt.Level`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._tree import tree_flatten
from ..optim.base import Params, State
from .methods import FieldError, Method, MethodConfigError, Settings, Sweep
from .problem import Problem, check_outer_loss, final_adjoint, outer_partials


def _record_tail(problem: Problem, params0: Params, start: int, outer: Any) -> Sweep:
    """Advance ``0 .. start-1`` unrecorded, record ``start .. n-1`` as one segment, sweep it back."""
    n = problem.steps
    params, state = problem.advance(0, start, params0, problem.init_state(params0))
    params, state, segment = problem.record(start, n, params, state)
    loss, p_bar, hyper_bar = outer_partials(problem, params, outer, state)
    adjoint = problem.sweep(segment, final_adjoint(p_bar, state), hyper_bar)
    final = {k: p.detach() for k, p in params.items()}
    return Sweep(loss, final, hyper_bar, adjoint if start == 0 else None, problem.meter.peak, state=state)


def differentiable(problem: Problem, params0: Params, start: int, outer: Any) -> Sweep:
    """The unrolled hypergradient as a differentiable function (``create_graph``): steps
    ``0 .. start-1`` (and ``init_params``) read :attr:`Problem.hyper_fixed`, steps ``start .. n-1``
    and the outer loss read :attr:`Problem.hyper`; one graph from whatever made ``hyper`` (and
    ``params0``) to ``F``, and ``dF/dhyper`` by ``autograd.grad(create_graph=True)``. The loss, the
    hypergradient and the final params all keep their graphs. ``start = 0``: the full unroll;
    ``start = n - k``: truncation's definition, differentiated exactly (the fixed steps still carry
    the upstream dependence of ``h``)."""
    n, h = problem.steps, problem.hyper
    if start > 0 and problem.init is not None:
        params0 = problem.init(problem.hyper_fixed)  # the same draw, h held fixed in the initialisation
    params, state = params0, problem.init_state(params0)
    keys: list[int] = []
    for k0, k1, hyper in ((0, start, problem.hyper_fixed), (start, n, h)):
        if k1 > k0:
            params, state, segment = problem.record(k0, k1, params, state, connected=True, hyper=hyper)
            keys += segment.keys
    with torch.enable_grad():
        loss = problem.outer_loss(params, h, outer, state)
    check_outer_loss(loss, problem.check_finite)
    names = list(h)
    grads = torch.autograd.grad(loss, [h[k] for k in names], create_graph=True, allow_unused=True)
    hyper_bar = {k: (g if g is not None else torch.zeros_like(h[k])) for k, g in zip(names, grads)}
    peak = problem.meter.peak
    problem.meter.release(keys)
    return Sweep(loss, params, hyper_bar, None, peak, state=state)


@dataclass(frozen=True)
class Full(Method):
    """Reverse mode through all ``n`` steps, every step's graph kept: memory O(n).

    ``chunk = c``: the ensemble's members in groups of ``c``, each group's whole run recorded, swept
    and freed before the next (the objective declares its members: :meth:`MetaObjective.ensemble_size`
    and :meth:`~metaopt.MetaObjective.share`); the same hypergradient, memory about ``c / m`` of it.
    ``max_memory`` (bytes, or a size like ``"512MB"``, ``"2GiB"``): the exact policy to run is chosen
    within that budget of stored trajectory: this one if its predicted peak fits, else the fastest
    (by predicted time) of member-chunked (the largest chunk that fits), :class:`Checkpointed` and
    :class:`Recursive` (:mod:`metaopt.hypergrad.budget`; the choice and its predicted and measured
    peak land in ``extras``). The two settings do not combine."""

    chunk: int | None = field(default=None, kw_only=True)
    max_memory: int | None = field(default=None, kw_only=True)
    name: ClassVar[str] = "full"
    supports_autocast: ClassVar[bool] = True
    supports_compile: ClassVar[bool] = True
    supports_create_graph: ClassVar[bool] = True
    supports_start: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.max_memory, str):
            from .budget import parse_size

            object.__setattr__(self, "max_memory", parse_size(self.max_memory, "Full(max_memory=...)"))

    @classmethod
    def from_config(cls, table: Mapping[str, Any], steps: int | None = None, *, name: str | None = None,
                    fixed: Mapping[str, Any] | None = None) -> Method:
        """As :meth:`Method.from_config`, ``method.max_memory`` also a size string (``"512MB"``)."""
        if isinstance(table.get("max_memory"), str):
            from .budget import parse_size

            try:
                table = {**table, "max_memory": parse_size(table["max_memory"], "method.max_memory")}
            except ValueError as e:
                raise MethodConfigError(str(e)) from None
        return super().from_config(table, steps, name=name, fixed=fixed)

    def validate(self, steps: int) -> None:
        for name, value in (("chunk", self.chunk), ("max_memory", self.max_memory)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise FieldError("Full", name, value, "needs a positive int (unset: none)")
        if self.chunk is not None and self.max_memory is not None:
            raise FieldError("Full", "chunk", self.chunk, "and max_memory do not combine: give max_memory (it chooses "
                             "the chunk) or chunk")

    @property
    def planned(self) -> bool:
        """Whether a setting (``chunk``, ``max_memory``) makes :func:`metaopt.hypergradient` plan the
        run (:func:`metaopt.hypergrad.budget.within`) instead of recording it here at once."""
        return self.chunk is not None or self.max_memory is not None

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        if self.planned:
            raise ValueError(f"{self.label} runs through metaopt.hypergradient (it splits the problem by members "
                             "or plans within a budget); call Full().run for one recorded run")
        if problem.create_graph:
            return differentiable(problem, params0, 0, outer)
        return _record_tail(problem, _detached(params0), 0, outer)

    @property
    def label(self) -> str:
        parts = [f"chunk={self.chunk}"] if self.chunk is not None else []
        parts += [f"max_memory={self.max_memory}"] if self.max_memory is not None else []
        return f"full ({', '.join(parts)})" if parts else "full"


@dataclass(frozen=True)
class Truncated(Method):
    """Reverse mode through the last ``k`` steps only (Shaban et al. 2019): memory O(k). Biased for
    ``k < n``: it is the exact gradient of ``F`` with ``h`` held fixed in the first ``n - k`` steps
    (and in ``init_params``); ``k = n`` is the full unroll."""

    k: int
    name: ClassVar[str] = "truncated"
    supports_autocast: ClassVar[bool] = True
    supports_compile: ClassVar[bool] = True
    supports_create_graph: ClassVar[bool] = True
    supports_start: ClassVar[bool] = True
    reference: ClassVar[str] = "truncated"

    @classmethod
    def configure(cls, steps: int, settings: Settings) -> Truncated:
        if settings.truncate is None:
            raise ValueError("method 'truncated' needs its length: Truncated(k=...) (a config's method.k)")
        return cls(min(settings.truncate, steps) if steps else settings.truncate)

    def validate(self, steps: int) -> None:
        if isinstance(self.k, bool) or not (isinstance(self.k, int) and 1 <= self.k <= steps):
            raise FieldError("Truncated", "k", self.k, f"needs 1 <= k <= steps = {steps}")

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        if problem.create_graph:
            return differentiable(problem, params0, problem.steps - self.k, outer)
        return _record_tail(problem, _detached(params0), problem.steps - self.k, outer)

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        return self.k * step_bytes + state_bytes

    @property
    def label(self) -> str:
        return f"truncated (K={self.k})"


@dataclass(frozen=True)
class Checkpointed(Method):
    """Keep every ``every``-th inner state, recompute each segment in the reverse sweep:
    memory O(n/c + c) states and graphs, one extra forward; exact. Default ``every = ceil(sqrt(n))``."""

    every: int | None = None
    name: ClassVar[str] = "checkpointed"
    supports_autocast: ClassVar[bool] = True
    supports_compile: ClassVar[bool] = True
    supports_create_graph: ClassVar[bool] = True
    supports_start: ClassVar[bool] = True

    @classmethod
    def configure(cls, steps: int, settings: Settings) -> Checkpointed:
        return cls(settings.every)

    def interval(self, n: int) -> int:
        """The checkpoint interval ``c`` for ``n`` inner steps."""
        return self.every if self.every is not None else max(1, math.ceil(math.sqrt(n)))

    def validate(self, steps: int) -> None:
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int)
                                       or self.every < 1):
            raise FieldError("Checkpointed", "every", self.every, "needs a positive int (unset: ceil(sqrt(steps)))")

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        if problem.create_graph:  # the level above needs every step's graph: nothing to recompute
            return differentiable(problem, params0, 0, outer)
        n, c = problem.steps, self.interval(problem.steps)
        checkpoints: dict[int, tuple[Params, State]] = {}
        keys: list[int] = []
        params, state = _detached(params0), problem.init_state(params0)
        for k0 in range(0, n, c):
            checkpoints[k0] = (params, state)
            keys += problem.meter.add_tensors(tree_flatten((params, state))[0])
            params, state = problem.advance(k0, min(k0 + c, n), params, state)
        loss, p_bar, hyper_bar = outer_partials(problem, params, outer, state)
        adjoint = final_adjoint(p_bar, state)
        for k0 in sorted(checkpoints, reverse=True):
            p, s = checkpoints.pop(k0)
            _, _, segment = problem.record(k0, min(k0 + c, n), p, s)
            adjoint = problem.sweep(segment, adjoint, hyper_bar)
        problem.meter.release(keys)
        final = {k: p.detach() for k, p in params.items()}
        return Sweep(loss, final, hyper_bar, adjoint, problem.meter.peak, state=state)

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        c = self.interval(steps)
        return math.ceil(steps / c) * state_bytes + c * step_bytes + state_bytes

    @property
    def label(self) -> str:
        return f"checkpointed (c={self.every})" if self.every is not None else "checkpointed"


@dataclass(frozen=True)
class Recursive(Method):
    """Recursive (bisection) checkpointing: to sweep steps ``k0 .. k1-1`` back from the state at
    ``k0``, advance to the midpoint, keep that state, sweep the second half, free it, then sweep the
    first half; spans of at most ``base`` steps are recorded and swept directly (Griewank 1992's
    logarithmic scheme, the memory end of the trade-off). Exact. Memory: ``ceil(log2(n / base))``
    states plus ``base`` steps' graphs; compute: about ``n/2 * log2(n / base)`` extra unrecorded
    steps (vs ``n`` for :class:`Checkpointed`). For ensembles and long runs where even ``O(sqrt n)``
    does not fit."""

    base: int = 1
    name: ClassVar[str] = "recursive"
    supports_compile: ClassVar[bool] = True
    supports_create_graph: ClassVar[bool] = True
    supports_autocast: ClassVar[bool] = True
    supports_start: ClassVar[bool] = True

    @classmethod
    def configure(cls, steps: int, settings: Settings) -> Recursive:
        return cls(settings.every or 1)

    def validate(self, steps: int) -> None:
        if isinstance(self.base, bool) or not isinstance(self.base, int) or self.base < 1:
            raise FieldError("Recursive", "base", self.base, "needs a positive int (the longest span recorded at once)")

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        if problem.create_graph:  # the level above needs every step's graph: nothing to recompute
            return differentiable(problem, params0, 0, outer)
        params, state = _detached(params0), problem.init_state(params0)
        final, final_state = problem.advance(0, problem.steps, params, state)
        loss, p_bar, hyper_bar = outer_partials(problem, final, outer, final_state)
        adjoint = self._sweep(problem, 0, problem.steps, params, state, final_adjoint(p_bar, final_state), hyper_bar)
        return Sweep(loss, _detached(final), hyper_bar, adjoint, problem.meter.peak, state=final_state)

    def _sweep(self, problem: Problem, k0: int, k1: int, params: Params, state: State, adjoint: list,
               hyper_bar: dict) -> list:
        """Pull ``adjoint`` (of the state at ``k1``) back to the state at ``k0``, given that state."""
        if k1 - k0 <= self.base:
            _, _, segment = problem.record(k0, k1, params, state)
            return problem.sweep(segment, adjoint, hyper_bar)
        mid = (k0 + k1) // 2
        p_mid, s_mid = problem.advance(k0, mid, params, state)
        keys = problem.meter.add_tensors(tree_flatten((p_mid, s_mid))[0])
        adjoint = self._sweep(problem, mid, k1, p_mid, s_mid, adjoint, hyper_bar)
        problem.meter.release(keys)
        del p_mid, s_mid
        return self._sweep(problem, k0, mid, params, state, adjoint, hyper_bar)

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        depth = math.ceil(math.log2(max(1, math.ceil(steps / self.base))))
        return (depth + 1) * state_bytes + self.base * step_bytes

    @property
    def label(self) -> str:
        return f"recursive (base={self.base})" if self.base != 1 else "recursive"


def _detached(params: Params) -> Params:
    return {k: p.detach() for k, p in params.items()}
