"""Forward-mode hypergradients: tangents of the whole inner run, one per hyperparameter element.

``vmap`` over ``torch.func.jvp`` of the run pushes a batch of basis tangent directions
through every step (``vmap`` over ``jvp``), the inner gradient taken with ``torch.func.grad``
(forward-over-reverse). Nothing of the trajectory is stored; the cost is the number of directions
times a forward run, so this suits few hyperparameters. Losses used here must support
forward-over-reverse: ``F.mse_loss`` with its default ``reduction='mean'`` does not (pytorch#123996);
write the squared error out, or use ``reduction='none'`` and take the mean yourself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import jvp, vmap

from .._tree import nbytes
from ..optim.base import Optimizer, Params, State
from .inner import split_buffers
from .methods import FieldError, Method, Settings, Sweep
from .problem import Problem, check_outer_loss

#: hyperparameter elements above which :func:`~metaopt.hypergrad.check` leaves forward mode out
CHECK_LIMIT = 512


@dataclass(frozen=True)
class Forward(Method):
    """Forward mode: push one tangent per hyperparameter element through the inner run (batched
    with ``vmap``, ``chunk_size`` directions at a time). No trajectory is stored; cost grows with the
    number of hyperparameters, so it suits few of them."""

    chunk_size: int | None = None
    name: ClassVar[str] = "forward"
    supports_start: ClassVar[bool] = True

    @classmethod
    def configure(cls, steps: int, settings: Settings) -> Forward:
        return cls(settings.chunk_size)

    def validate(self, steps: int) -> None:
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise FieldError("Forward", "chunk_size", self.chunk_size, "needs a positive int (unset: all at once)")

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        return forward(problem, params0, outer, self.chunk_size)

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        return min(self.chunk_size or n_hyper, n_hyper) * state_bytes

    def skip_reason(self, optimizer: Optimizer, n_hyper: int) -> str | None:
        if n_hyper > CHECK_LIMIT:
            return f"{n_hyper} hyperparameter elements: one forward run each (over {CHECK_LIMIT})"
        return None


def forward(problem: Problem, params0: Params, outer: Any, chunk_size: int | None) -> Sweep:
    """The tangents of the whole run, ``chunk_size`` basis directions at a time; the initialisation
    is differentiated through ``problem.init`` (or held fixed when the start point was given)."""
    optimizer, steps = problem.optimizer, problem.steps
    hyper = problem.hyper
    names = list(hyper)
    shapes = [hyper[n].shape for n in names]
    sizes = [hyper[n].numel() for n in names]
    flat = torch.cat([hyper[n].detach().reshape(-1) for n in names])
    fixed = {k: p.detach() for k, p in params0.items()}

    def run(h: Tensor) -> tuple[Tensor, tuple[Params, State]]:
        hp = {n: t.reshape(s) for n, t, s in zip(names, h.split(sizes), shapes)}
        params = dict(fixed) if problem.init is None else problem.init(hp)
        state = problem.init_state(params)
        with problem.draws.scope():
            for k in range(steps):
                params, state = problem.functional_step(k, params, state, hp)
        loss = problem.outer_loss(params, hp, outer, state)
        return loss, (params, state)

    _check_tangent_dtypes(problem, fixed if problem.init is None else None, flat, names, sizes, shapes)

    def directional(v: Tensor) -> tuple[Tensor, Tensor, tuple[Params, State]]:
        loss, dloss, aux = jvp(run, (flat,), (v,), has_aux=True)
        return loss, dloss, aux

    # "same": every direction draws what the other methods' steps draw (the draws are seeded per step)
    batched = vmap(directional, randomness="same")
    eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    chunk = chunk_size or flat.numel()
    parts = [batched(eye[i : i + chunk]) for i in range(0, flat.numel(), chunk)]
    loss = parts[0][0][0]
    params_final = {k: v[0] for k, v in parts[0][2][0].items()}
    state_final = {s: {k: v[0].detach() for k, v in slot.items()} for s, slot in parts[0][2][1].items()}
    if problem.buffers is not None:
        problem.final_buffers = dict(split_buffers(state_final)[1] or {})
    jac = torch.cat([p[1] for p in parts])
    check_outer_loss(loss, problem.check_finite)
    grads = {n: g.reshape(s) for n, g, s in zip(names, jac.split(sizes), shapes)}
    directions = min(chunk, flat.numel())
    params_final = {k: v.detach() for k, v in params_final.items()}
    # one tangent of the inner state (params and optimizer state) per direction in flight
    peak = directions * (nbytes(params_final) + nbytes(optimizer.init(params_final)))
    return Sweep(loss.detach(), params_final, grads, None, peak, state=state_final)


def _check_tangent_dtypes(
    problem: Problem, fixed: Params | None, flat: Tensor, names: list[str], sizes: list[int], shapes: list[Any]
) -> None:
    """Refuse, after one probe step and before the forward run, a problem whose first step's
    tangents change dtype: torch.func's forward-over-reverse promotes the tangent of a Python float
    times a 0-d low-precision tensor to float64 (e.g. ``0.5 * hyper["lam"].exp()`` in float32), and
    the run would crash at the next matmul."""
    if flat.dtype == torch.float64:
        return

    def first(h: Tensor) -> Params:
        hp = {n: t.reshape(s) for n, t, s in zip(names, h.split(sizes), shapes)}
        params = dict(fixed) if fixed is not None else problem.init(hp)
        with problem.draws.scope():
            return problem.functional_step(0, params, problem.init_state(params), hp)[0]

    _, tangents = jvp(first, (flat,), (torch.ones_like(flat),))
    bad = sorted(k for k, t in tangents.items() if t.dtype != flat.dtype)
    if bad:
        raise ValueError(f"forward mode: the tangents of {bad} turn {tangents[bad[0]].dtype} in a {flat.dtype} "
                         "problem (torch.func promotes a Python float times a 0-d hyperparameter under jvp of grad); "
                         "write such constants as tensors of the hyperparameter's dtype, run in float64, or use "
                         "another method (full, checkpointed, ...)")
