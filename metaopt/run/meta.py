"""One outer (meta) step on the hyperparameters, shared by the runner and by in-process outer loops
(:func:`descend`: comparisons, restarts and sweeps inside a recipe's report)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..hypergrad.result import HypergradResult, NonFiniteError
from ..optim import adam, sgd
from ..optim.base import HParam, Optimizer


def meta_optimizer(name: str) -> Optimizer:
    """The meta-optimizer on the hyperparameters: ``"adam"`` or ``"sgd"`` (``outer.meta_optimizer``)."""
    if name not in ("adam", "sgd"):
        raise ValueError(f"meta_optimizer {name!r}: use 'adam' or 'sgd'")
    return adam() if name == "adam" else sgd()


def grad_norm(grads: Mapping[str, Tensor]) -> float:
    """Global L2 norm of a hypergradient (in float64; NaN/inf pass through for the caller's guard)."""
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def meta_update(
    meta: Optimizer, grads: Mapping[str, Tensor], state: Any, hyper: Mapping[str, Tensor], *, step: int,
    lr: HParam, clip: float = 0.0, norm: float | None = None,
) -> tuple[dict[str, Tensor], Any, bool]:
    """``(hyper, state, clipped)`` after one ``meta`` step along ``grads``, their global norm clipped
    to ``clip`` first (``clip = 0``: off). ``norm`` saves recomputing :func:`grad_norm`."""
    norm = grad_norm(grads) if norm is None else norm
    clipped = clip > 0 and norm > clip
    if clipped:
        grads = {k: g * (clip / norm) for k, g in grads.items()}
    hyper, state = meta.update(grads, state, hyper, step=step, lr=lr)
    return {k: v.detach() for k, v in hyper.items()}, state, clipped


@dataclass
class Descent:
    """What :func:`descend` returns: the final hyperparameters and one row per outer step."""

    hyper: dict[str, Tensor]
    history: list[dict[str, float]]
    seconds: float


def descend(hypergrad: Callable[[Mapping[str, Tensor], torch.Generator], HypergradResult],
            hyper: Mapping[str, Tensor], steps: int, meta_lr: HParam, generator: torch.Generator,
            clip: float = 0.0, meta: str = "adam",
            before: Callable[[int, int], None] | None = None) -> Descent:
    """``steps`` outer steps on ``hyper`` along ``hypergrad`` with the runner's update
    (:func:`metaopt.run.meta.meta_update`: meta-optimizer ``meta``, global-norm clipping), without
    its files, for side-by-side comparisons in one process. A non-finite outer loss or hypergradient
    stops it with :class:`metaopt.NonFiniteError` (a comparison reports the method as failed, where
    the runner would skip the step). Rows: outer loss, wall time since the start (``elapsed``), the
    hypergradient's own seconds, inner steps, matvecs and peak stored bytes. ``before(step, steps)``
    is called before every step (a task's ``begin_step``)."""
    opt = meta_optimizer(meta)
    h = {k: v.detach().clone() for k, v in hyper.items()}
    state = opt.init(h)
    rows, t0 = [], time.perf_counter()
    for i in range(steps):
        if before is not None:
            before(i, steps)
        res = hypergrad(h, generator)
        norm = grad_norm(res.grads)
        if not (math.isfinite(norm) and math.isfinite(float(res.loss))):
            raise NonFiniteError(f"outer step {i + 1}: non-finite outer loss or hypergradient")
        h, state, _ = meta_update(opt, res.grads, state, h, step=i, lr=meta_lr, clip=clip, norm=norm)
        rows.append({"step": i + 1, "loss": float(res.loss), "elapsed": time.perf_counter() - t0,
                     "seconds": res.seconds, "inner_steps": res.steps * int(res.extras.get("inner_rounds", 1)),
                     "matvecs": int(res.extras.get("matvecs", 0)), "peak_bytes": res.peak_bytes})
    return Descent(h, rows, time.perf_counter() - t0)
