"""Hypergradient methods by name, as callables ``(hyper, generator) -> HypergradResult``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ... import hypergrad as hg
from ...objective import MetaObjective
from ...optim.base import Optimizer

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

