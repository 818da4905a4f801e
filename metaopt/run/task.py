"""The :class:`Task` base class: what the runner needs from one built recipe instance.

A recipe's ``build(config, device)`` returns a ``Task``. The runner calls every hook below on every
task, unconditionally: the base class gives each optional hook a documented no-op, so a recipe
overrides only what it has (a toy recipe needs ``evaluate`` alone).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..hypergrad import HypergradResult, Method, hypergradient
from ..objective import MetaObjective
from ..optim.base import Optimizer

if TYPE_CHECKING:
    from .distributed import World


class Task(ABC):
    """One built recipe instance: the bilevel problem, and how to judge and show it.

    Attributes set by the subclass's ``__init__``:
        objective: the bilevel problem (:class:`metaopt.MetaObjective`).
        optimizer: the differentiable inner optimizer.
        hyper: ``{name: tensor}``, the initial hyperparameters ``h`` the outer loop starts from.
        steps: inner steps per hypergradient.
        method: the hypergradient method (an object or a registered name), default ``"full"``; the
            built-in recipes build one object per run from their ``[method]`` table
            (:func:`metaopt.run.config.build_method`), whose state (:meth:`state_dict`) the runner
            checkpoints.
        compile: run the inner steps through ``torch.compile``.
        compile_block: with ``compile``, inner steps per compiled graph (``None``: automatic; see
            :func:`metaopt.hypergradient`).
    """

    objective: MetaObjective
    optimizer: Optimizer
    hyper: dict[str, Tensor]
    steps: int
    method: Any = "full"
    compile: bool = False
    compile_block: int | None = None

    @abstractmethod
    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        """Metrics of the current hyperparameters (e.g. test accuracy of fresh models trained with
        them), every ``outer.eval_every`` steps; they land in ``metrics.jsonl``."""

    def hypergradient(
        self, objective: MetaObjective, hyper: Mapping[str, Tensor], generator: torch.Generator
    ) -> HypergradResult:
        """One outer step's outer loss and ``dF/dh`` of ``objective`` (the task's own, or this rank's
        share from :meth:`distribute`). Default: :func:`metaopt.hypergradient` with the task's
        optimizer, steps, method and compile flag, non-finite values returned (the runner's NaN guard
        judges them). Floats a subclass puts into ``extras["log"]`` join the step's metrics row."""
        return hypergradient(objective, self.optimizer, hyper, self.steps, method=self.method, generator=generator,
                             check_finite=False, compile=self.compile,
                             compile_block=self.compile_block)

    def state_dict(self) -> dict[str, Any]:
        """What the task carries from one outer step to the next beyond the hyperparameters, saved in
        every checkpoint: by default the method's state (``{"method": method.state_dict()}``; a
        stateless method's is ``{}``: HOAG's schedule and warm starts, random truncation's generator)."""
        return {"method": self.method.state_dict()} if isinstance(self.method, Method) else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (``--resume``, on a freshly built task)."""
        if "method" in state and isinstance(self.method, Method):
            self.method.load_state_dict(state["method"])

    def begin_step(self, step: int, steps: int) -> None:
        """Called before every outer step (``step`` = outer steps done, also after ``--resume``):
        schedules over the outer loop, e.g. annealed coefficients. Default: nothing."""
        return None

    def distribute(self, world: World) -> MetaObjective | None:
        """Called once in a multi-process run (``torchrun``, :mod:`metaopt.run.distributed`).

        Return this rank's share of the objective (a block of the ensemble members whose outer loss
        holds those members' terms of the whole): the runner computes its hypergradient and sums the
        shares over the ranks (ensemble-parallel). Return ``None`` to have every rank compute the
        whole hypergradient (rank 0's is used). Keep ``world`` for restart-parallel parts of
        :meth:`report` (``world.map``). Default: ``None``.
        """
        return None

    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any] | None:
        """The recipe's full evaluation protocol, once after the outer loop (tables, baselines); the
        result lands in ``metrics.json`` under ``results``. Runs on every rank (rank 0 writes).
        Default: ``None`` (no report)."""
        return None

    def summary(self, results: dict[str, Any]) -> str:
        """Markdown for :meth:`report`'s ``results``, appended to ``summary.md``. Default: ``""``."""
        return ""

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        """Recipe-specific PNGs written under ``out`` (matplotlib is importable when this is called).
        Default: none."""
        return []

    def close(self) -> None:
        """Release what the task holds (processes, files) when the outer loop ends. Default: nothing."""
        return None
