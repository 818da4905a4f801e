"""Reverse-mode hypergradients through the unrolled inner run, the trajectory kept by policy.

The sweep is explicit (Maclaurin et al. 2015, Alg. 3; the distillation seed paper's Algorithm 3),
one recorded segment of inner steps at a time (:meth:`Problem.record` / :meth:`Problem.sweep`).
Which steps have a graph at any moment is the policy: all of them as one segment (:class:`Full`),
the last K (:class:`Truncated`), or one segment of ``c`` steps at a time, recomputed from stored
checkpoints (:class:`Checkpointed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .._tree import tree_flatten
from ..optim.base import Params, State
from .methods import Method, Settings, Sweep
from .problem import Problem, final_adjoint, outer_partials


def _record_tail(problem: Problem, params0: Params, start: int, outer: Any) -> Sweep:
    """Advance ``0 .. start-1`` unrecorded, record ``start .. n-1`` as one segment, sweep it back."""
    n = problem.steps
    params, state = problem.advance(0, start, params0, problem.optimizer.init(params0))
    params, state, segment = problem.record(start, n, params, state)
    loss, p_bar, hyper_bar = outer_partials(problem, params, outer)
    adjoint = problem.sweep(segment, final_adjoint(p_bar, state), hyper_bar)
    final = {k: p.detach() for k, p in params.items()}
    return Sweep(loss, final, hyper_bar, adjoint if start == 0 else None, problem.meter.peak)


@dataclass(frozen=True)
class Full(Method):
    """Reverse mode through all ``n`` steps, every step's graph kept: memory O(n)."""

    name: ClassVar[str] = "full"
    supports_compile: ClassVar[bool] = True

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        return _record_tail(problem, _detached(params0), 0, outer)


@dataclass(frozen=True)
class Truncated(Method):
    """Reverse mode through the last ``k`` steps only (Shaban et al. 2019): memory O(k). Biased for
    ``k < n``: it is the exact gradient of ``F`` with ``h`` held fixed in the first ``n - k`` steps
    (and in ``init_params``); ``k = n`` is the full unroll."""

    k: int
    name: ClassVar[str] = "truncated"
    supports_compile: ClassVar[bool] = True
    reference: ClassVar[str] = "truncated"

    @classmethod
    def configure(cls, steps: int, settings: Settings) -> Truncated:
        if settings.truncate is None:
            raise ValueError("method 'truncated' needs its length: Truncated(k=...), or a truncate setting")
        return cls(min(settings.truncate, steps) if steps else settings.truncate)

    def validate(self, steps: int) -> None:
        if not (isinstance(self.k, int) and 1 <= self.k <= steps):
            raise ValueError(f"Truncated(k={self.k!r}) needs 1 <= k <= steps = {steps}")

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
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
    supports_compile: ClassVar[bool] = True

    @classmethod
    def configure(cls, steps: int, settings: Settings) -> Checkpointed:
        return cls(settings.every)

    def interval(self, n: int) -> int:
        """The checkpoint interval ``c`` for ``n`` inner steps."""
        return self.every if self.every is not None else max(1, math.ceil(math.sqrt(n)))

    def validate(self, steps: int) -> None:
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"Checkpointed(every={self.every!r}) needs a positive int (or None for sqrt(steps))")

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        n, c = problem.steps, self.interval(problem.steps)
        checkpoints: dict[int, tuple[Params, State]] = {}
        keys: list[int] = []
        params, state = _detached(params0), problem.optimizer.init(params0)
        for k0 in range(0, n, c):
            checkpoints[k0] = (params, state)
            keys += problem.meter.add_tensors(tree_flatten((params, state))[0])
            params, state = problem.advance(k0, min(k0 + c, n), params, state)
        loss, p_bar, hyper_bar = outer_partials(problem, params, outer)
        adjoint = final_adjoint(p_bar, state)
        for k0 in sorted(checkpoints, reverse=True):
            p, s = checkpoints.pop(k0)
            _, _, segment = problem.record(k0, min(k0 + c, n), p, s)
            adjoint = problem.sweep(segment, adjoint, hyper_bar)
        problem.meter.release(keys)
        final = {k: p.detach() for k, p in params.items()}
        return Sweep(loss, final, hyper_bar, adjoint, problem.meter.peak)

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        c = self.interval(steps)
        return math.ceil(steps / c) * state_bytes + c * step_bytes + state_bytes

    @property
    def label(self) -> str:
        return f"checkpointed (c={self.every})" if self.every is not None else "checkpointed"


def _detached(params: Params) -> Params:
    return {k: p.detach() for k, p in params.items()}
