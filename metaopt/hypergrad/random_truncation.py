"""Random truncation (RaT-BPTT; Feng et al. 2024, "Embarrassingly Simple Dataset Distillation").

Each hypergradient draws an end point ``t`` uniformly from ``{W, ..., n}``, runs the inner problem
for ``t`` steps, takes the outer loss at ``params[t]`` and backpropagates through the last ``W``
steps ``t-W .. t-1`` only: memory O(W) recorded steps, time ``t`` forward steps and ``W`` reverse
ones (on average ``(n + W) / 2`` forward).

Bias: each call is the exact gradient of ``F_t^W(h) = F(params[t])`` with ``h`` held fixed in the
inner steps before ``t - W`` and in ``init_params`` (at ``t = W``: the full unroll of ``W`` steps,
the initialisation included). It never sees the loss at ``params[n]`` unless it draws ``t = n``,
and its expectation over the draw is the gradient of ``mean_t F_t^W``, the average over end
points of the truncated objective: unbiased for that, not for ``F(params[n])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..optim.base import Params
from .methods import FieldError, Method, Settings, Sweep
from .problem import Problem, final_adjoint, outer_partials


@dataclass(frozen=True)
class RandomTruncated(Method):
    """Random truncation (RaT-BPTT, Feng et al. 2024): the outer loss at a random step ``t`` drawn
    uniformly from ``[W, n]``, backpropagated through the ``W`` steps before it: memory O(W). Biased.

    Args:
        window: ``W``, the recorded steps (``1 <= W <= n``; ``W = n`` is the full unroll).
        seed: seeds the ``torch.Generator`` this object owns; its ``k``-th call draws the ``k``-th
            ``t`` of that generator, so one object with one seed gives a repeatable sequence of end
            points, independent of the hypergradient's ``generator`` (which draws the data and the
            initialisation). A fresh object with the same seed repeats the first draw: keep one
            object for a run. Its generator's state is the method's state (:meth:`state_dict`): the
            runner checkpoints it, so a resumed run draws what an uninterrupted one would.

    ``Sweep.extras`` holds ``t`` (the drawn end point) and ``window``; ``Sweep.params`` is
    ``params[t]`` and ``Sweep.loss`` is ``F(params[t])``.
    """

    window: int
    seed: int = 0
    name: ClassVar[str] = "random_truncated"
    supports_compile: ClassVar[bool] = True
    supports_autocast: ClassVar[bool] = True
    supports_start: ClassVar[bool] = True
    reference: ClassVar[str] = "random_truncated"
    _generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_generator", torch.Generator().manual_seed(self.seed))

    @classmethod
    def configure(cls, steps: int, settings: Settings) -> RandomTruncated:
        if settings.window is None:
            raise ValueError("method 'random_truncated' needs its window: RandomTruncated(window=...) "
                             "(a config's method.window)")
        return cls(settings.window)

    def validate(self, steps: int) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 1 <= self.window <= steps:
            raise FieldError("RandomTruncated", "window", self.window, f"needs 1 <= window <= steps = {steps}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise FieldError("RandomTruncated", "seed", self.seed, "needs a non-negative int")

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": uint8 tensor}``: the end points' generator (where the next draw comes from)."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._generator.set_state(state["generator"].cpu())  # a CPU generator, wherever the run is

    def draw(self, steps: int) -> int:
        """The next end point ``t``, uniform on ``[window, steps]`` (advances the generator)."""
        return int(torch.randint(self.window, steps + 1, (1,), generator=self._generator))

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        t = self.draw(problem.steps)
        start = t - self.window
        params = {k: p.detach() for k, p in params0.items()}
        params, state = problem.advance(0, start, params, problem.init_state(params))
        params, state, segment = problem.record(start, t, params, state)
        loss, p_bar, hyper_bar = outer_partials(problem, params, outer, state)
        adjoint = problem.sweep(segment, final_adjoint(p_bar, state), hyper_bar)
        final = {k: p.detach() for k, p in params.items()}
        return Sweep(loss, final, hyper_bar, adjoint if start == 0 else None, problem.meter.peak,
                     extras={"t": t, "window": self.window}, state=state, end=t)

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        return self.window * step_bytes + state_bytes

    @property
    def label(self) -> str:
        return f"random truncated (W={self.window})"
