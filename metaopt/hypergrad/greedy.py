"""Greedy one-step hyperparameter updates during inner training (Luketina et al. 2016, "T1-T2").

At every inner step the hyperparameters take a meta-optimizer step on the one-step lookahead
hypergradient ``d/dh F(Phi_k(w_k, h))`` (``w_k`` held fixed): training and tuning in one run, at the
cost of one extra vjp per step, with the short-horizon bias that one step implies. At a stationary
point the lookahead hypergradient is the one-term Neumann approximation of the implicit one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..objective import MetaObjective
from ..optim.base import Optimizer, Params
from . import inner
from .problem import Problem, final_adjoint, outer_partials


@dataclass
class GreedyResult:
    """What :func:`t1t2` returns: the trained inner ``params``, the tuned ``hyper``, the outer loss
    after every step (``history``) and the lookahead hypergradient of step 0 (``first_hypergrad``)."""

    params: Params  # the trained inner parameters
    hyper: dict[str, Tensor]  # the hyperparameters at the end
    history: list[dict[str, float]] = field(default_factory=list)  # per step: outer loss after the step
    first_hypergrad: dict[str, Tensor] = field(default_factory=dict)  # the lookahead hypergradient of step 0


def t1t2(
    objective: MetaObjective,
    optimizer: Optimizer,
    hyper: dict[str, Tensor],
    steps: int,
    meta_optimizer: Optimizer,
    every: int = 1,
    generator: torch.Generator | None = None,
    params0: Params | None = None,
) -> GreedyResult:
    """Train for ``steps`` inner steps, updating ``hyper`` every ``every`` steps from a one-step lookahead."""
    if steps < 1 or every < 1:
        raise ValueError(f"t1t2: steps and every must be >= 1, got steps={steps}, every={every}")
    generator = generator or torch.Generator().manual_seed(0)
    h = {k: v.detach().clone() for k, v in hyper.items()}
    params = dict(params0) if params0 is not None else objective.init_params(h, generator)
    params = {k: p.detach() for k, p in params.items()}
    draws = inner.Draws(inner.seed_of(generator), next(iter(params.values())).device)
    batches = [objective.inner_batch(k, generator) for k in range(steps)]
    buffers = objective.init_buffers(h, generator)
    meta_state = meta_optimizer.init(h)
    out = GreedyResult(params, h)
    updates = 0
    state = None
    for k in range(steps):
        leaves = {n: v.detach().requires_grad_() for n, v in h.items()}
        problem = Problem(objective=objective, optimizer=optimizer, hyper=leaves, steps=steps, batches=batches,
                          draws=draws, buffers=buffers)
        state = problem.init_state(params) if state is None else state
        if k % every:
            params, state = problem.advance(k, k + 1, params, state)
            continue
        params, state, seg = problem.record(k, k + 1, params, state)
        loss, p_bar, grads = outer_partials(problem, params, objective.outer_batch(generator), state)
        adjoint = final_adjoint(p_bar, state)
        problem.sweep(seg, adjoint, grads)
        if k == 0:
            out.first_hypergrad = {n: g.detach() for n, g in grads.items()}
        h, meta_state = meta_optimizer.update(grads, meta_state, h, step=updates)
        h = {n: v.detach() for n, v in h.items()}
        updates += 1
        params = {n: p.detach() for n, p in params.items()}
        state = {s: {n: t.detach() for n, t in v.items()} for s, v in state.items()}
        out.history.append({"step": k + 1, "loss": float(loss)})
    out.params, out.hyper = params, h
    return out
