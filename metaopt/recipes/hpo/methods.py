"""Hypergradient methods by name, as callables ``(hyper, generator) -> HypergradResult``, and the
small outer loop the method comparisons and search baselines share with the runner's meaning."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ... import hypergrad as hg
from ...objective import MetaObjective
from ...optim.base import HParam, Optimizer
from ...run.meta import grad_norm, meta_optimizer, meta_update

METHODS = ("hoag", "cg", "neumann", "fixed_point", "full", "checkpointed", "truncated", "reversible", "forward")
IMPLICIT = ("hoag", "cg", "neumann", "fixed_point")


@dataclass
class MethodSettings:
    """How a named method is set up (tolerances are the implicit methods')."""

    steps: int  # inner steps per hypergradient (per round, for the implicit methods)
    truncate: int = 10  # K of "truncated"
    tol: float = 1e-6  # linear-solve and inner tolerance of "cg", "neumann", "fixed_point"
    max_rounds: int = 20  # at most this many rounds of `steps` for the implicit methods' inner run
    solve_iters: int = 100  # at most this many iterations of their linear solve (Neumann terms)
    hoag_tol0: float = 1e-3  # HOAG: tolerance max(tol0 * decrease**t, tol)
    hoag_decrease: float = 0.9


class Hypergrad:
    """``hypergrad(hyper, generator)``: the hypergradient of ``objective`` by the method ``name``
    (one of :data:`METHODS`). HOAG keeps its warm starts between calls; the others are stateless."""

    def __init__(self, name: str, objective: MetaObjective, optimizer: Optimizer, s: MethodSettings,
                 compile: bool = False) -> None:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
        self.name, self.objective, self.optimizer, self.s, self.compile = name, objective, optimizer, s, compile
        self._hoag = (hg.HOAG(objective, optimizer, s.steps, tol0=s.hoag_tol0, decrease=s.hoag_decrease,
                              min_tol=s.tol, max_inner_rounds=s.max_rounds, maxiter=s.solve_iters,
                              check_finite=False)
                      if name == "hoag" else None)
        self.method = self._method()

    def _method(self) -> Any:
        s = self.s
        if self.name in ("cg", "neumann", "fixed_point"):
            return hg.Implicit(self.name, tol=s.tol, inner_tol=s.tol, max_inner_rounds=s.max_rounds,
                               maxiter=s.solve_iters)
        if self.name == "truncated":
            return hg.Truncated(min(s.truncate, s.steps))
        if self.name == "forward":
            return hg.Forward(chunk_size=64)
        return None if self.name == "hoag" else self.name

    def __call__(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> hg.HypergradResult:
        if self._hoag is not None:
            return self._hoag(dict(hyper), generator)
        use_compile = self.compile and self.name in ("full", "checkpointed", "truncated")
        return hg.hypergradient(self.objective, self.optimizer, hyper, self.s.steps, self.method, generator=generator,
                                check_finite=False, compile=use_compile)

    @staticmethod
    def inner_steps(res: hg.HypergradResult) -> int:
        """Inner optimizer steps this hypergradient ran (implicit methods may run several rounds)."""
        return res.steps * int(res.extras.get("inner_rounds", 1))


@dataclass
class Descent:
    """What :func:`descend` returns: the final hyperparameters and one row per outer step."""

    hyper: dict[str, Tensor]
    history: list[dict[str, float]]
    seconds: float


def descend(hypergrad: Callable[[Mapping[str, Tensor], torch.Generator], hg.HypergradResult],
            hyper: Mapping[str, Tensor], steps: int, meta_lr: HParam, generator: torch.Generator,
            clip: float = 0.0, meta: str = "adam") -> Descent:
    """``steps`` outer steps on ``hyper`` along ``hypergrad`` with the runner's update
    (:func:`metaopt.run.meta.meta_update`: meta-optimizer ``meta``, global-norm clipping), without
    its files, for side-by-side comparisons in one process. A non-finite outer loss or hypergradient
    stops it with :class:`metaopt.NonFiniteError` (a comparison reports the method as failed, where
    the runner would skip the step). Rows: outer loss, wall time since the start (``elapsed``), the
    hypergradient's own seconds, inner steps, matvecs and peak stored bytes."""
    opt = meta_optimizer(meta)
    h = {k: v.detach().clone() for k, v in hyper.items()}
    state = opt.init(h)
    rows, t0 = [], time.perf_counter()
    for i in range(steps):
        res = hypergrad(h, generator)
        norm = grad_norm(res.grads)
        if not (math.isfinite(norm) and math.isfinite(float(res.loss))):
            raise hg.NonFiniteError(f"outer step {i + 1}: non-finite outer loss or hypergradient")
        h, state, _ = meta_update(opt, res.grads, state, h, step=i, lr=meta_lr, clip=clip, norm=norm)
        rows.append({"step": i + 1, "loss": float(res.loss), "elapsed": time.perf_counter() - t0,
                     "seconds": res.seconds, "inner_steps": Hypergrad.inner_steps(res),
                     "matvecs": int(res.extras.get("matvecs", 0)), "peak_bytes": res.peak_bytes})
    return Descent(h, rows, time.perf_counter() - t0)
