"""DrMAD (Fu et al. 2016): the reverse sweep along the straight line between ``w_0`` and ``w_n``.

Only the initial and final inner states are kept; step ``k`` of the sweep is differentiated at the
interpolated state ``(1 - k/n) s_0 + (k/n) s_n`` (parameters and optimizer state alike). Memory is two
states and one step's graph; the result is exact when the trajectory is a straight line traversed at
constant speed, an approximation otherwise (its quality is the price of the memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._tree import tree_flatten, tree_unflatten
from ..optim.base import Params
from .methods import Method, Sweep
from .problem import Problem, final_adjoint, outer_partials


@dataclass(frozen=True)
class DrMAD(Method):
    """DrMAD (Fu et al. 2016): reverse along the straight line from ``w_0`` to ``w_n`` instead of
    the stored trajectory. Memory: two states and one step's graph; approximate (see the module)."""

    name: ClassVar[str] = "drmad"
    supports_buffers: ClassVar[bool] = False  # buffers off the straight line have no definition
    supports_autocast: ClassVar[bool] = True
    supports_compile: ClassVar[bool] = True
    supports_start: ClassVar[bool] = True
    reference: ClassVar[str] = "straight_line"

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        loss, final, grads, adjoint, state = drmad(problem, params0, outer)
        return Sweep(loss, final, grads, adjoint, problem.meter.peak, state=state)

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        return 3 * state_bytes + step_bytes


def _endpoints(problem: Problem, params0: Params) -> tuple[Params, Any, list[Tensor], list[Tensor], Any, list[int]]:
    """Run the inner problem keeping only its first and last states (both metered)."""
    n = problem.steps
    p0 = {k: p.detach() for k, p in params0.items()}
    s0 = problem.init_state(p0)
    start, spec = tree_flatten((p0, s0))
    params, state = problem.advance(0, n, p0, s0)
    end = [t.detach() for t in tree_flatten((params, state))[0]]
    keys = problem.meter.add_tensors(start + end)
    return params, state, start, end, spec, keys


def drmad(
    problem: Problem, params0: Params, outer: Any
) -> tuple[Tensor, Params, dict[str, Tensor], list[Tensor], Any]:
    """Returns ``(outer_loss, final_params, dF/dh, adjoint_of_params0_and_state0, final_state)``."""
    n = problem.steps
    params, state, start, end, spec, keys = _endpoints(problem, params0)
    loss, p_bar, hyper_bar = outer_partials(problem, params, outer, state)
    adjoint = final_adjoint(p_bar, state)
    for k in reversed(range(n)):
        beta = k / n
        interp = [(1 - beta) * a + beta * b for a, b in zip(start, end)]
        p_k, s_k = tree_unflatten(interp, spec)
        _, _, seg = problem.record(k, k + 1, p_k, s_k)
        adjoint = problem.sweep(seg, adjoint, hyper_bar)
    problem.meter.release(keys)
    return loss, {k: p.detach() for k, p in params.items()}, hyper_bar, adjoint, state
