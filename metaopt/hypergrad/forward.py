"""Forward-mode hypergradients: tangents of the whole inner run, one per hyperparameter element.

``vmap`` over ``torch.func.jvp`` of the run pushes a batch of basis tangent directions
through every step (``vmap`` over ``jvp``), the inner gradient taken with ``torch.func.grad``
(forward-over-reverse). Nothing of the trajectory is stored; the cost is the number of directions
times a forward run, so this suits few hyperparameters. Losses used here must support
forward-over-reverse: ``F.mse_loss`` with its default ``reduction='mean'`` does not (pytorch#123996);
write the squared error out, or use ``reduction='none'`` and take the mean yourself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vmap

from .._tree import nbytes
from ..objective import MetaObjective
from ..optim.base import Optimizer, Params
from . import inner
from .methods import Forward
from .unroll import check_outer_loss


def forward(
    objective: MetaObjective,
    optimizer: Optimizer,
    hyper: dict[str, Tensor],
    steps: int,
    batches: list[Any],
    outer: Any,
    generator_state: Tensor,
    generator_device: torch.device,
    method: Forward,
    check_finite: bool = True,
    params0: Params | None = None,
) -> tuple[Tensor, Params, dict[str, Tensor], int]:
    """Returns ``(outer_loss, final_params, dF/dhyper, peak_tangent_bytes)``."""
    names = list(hyper)
    shapes = [hyper[n].shape for n in names]
    sizes = [hyper[n].numel() for n in names]
    flat = torch.cat([hyper[n].detach().reshape(-1) for n in names])

    def run(h: Tensor) -> tuple[Tensor, Params]:
        hp = {n: t.reshape(s) for n, t, s in zip(names, h.split(sizes), shapes)}
        if params0 is not None:  # a given start point: no dependence on h
            params = dict(params0)
        else:
            gen = torch.Generator(generator_device)
            gen.set_state(generator_state)
            params = objective.init_params(hp, gen)
        state = optimizer.init(params)
        for k in range(steps):
            params, state = inner.step_functional(objective, optimizer, k, params, state, hp, batches[k])
        loss = objective.outer_loss(params, hp, outer)
        return loss, params

    def directional(v: Tensor) -> tuple[Tensor, Tensor, Params]:
        loss, dloss, params = jvp(run, (flat,), (v,), has_aux=True)
        return loss, dloss, params

    batched = vmap(directional, randomness="same")
    eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    chunk = method.chunk_size or flat.numel()
    parts = [batched(eye[i : i + chunk]) for i in range(0, flat.numel(), chunk)]
    loss = parts[0][0][0]
    params_final = {k: v[0] for k, v in parts[0][2].items()}
    jac = torch.cat([p[1] for p in parts])
    check_outer_loss(loss, check_finite)
    grads = {n: g.reshape(s) for n, g, s in zip(names, jac.split(sizes), shapes)}
    directions = min(chunk, flat.numel())
    params_final = {k: v.detach() for k, v in params_final.items()}
    # one tangent of the inner state (params and optimizer state) per direction in flight
    peak = directions * (nbytes(params_final) + nbytes(optimizer.init(params_final)))
    return loss.detach(), params_final, grads, peak
