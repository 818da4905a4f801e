"""The ``hpo`` recipe's task: the base every HPO task shares, and the builder that picks one."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import hypergrad as hg
from ...objective import MetaObjective
from ...optim.base import Optimizer
from ...run.config import build_method
from ...run.distributed import World
from ...run.task import Task
from . import data
from .config import Config


class HPOTask(Task):
    """What every HPO task has: the objective, its inner optimizer, the initial hyperparameters and
    the configured hypergradient method (``hypergradient`` is the runner's outer step)."""

    objective: MetaObjective
    optimizer: Optimizer
    hyper: dict[str, Tensor]

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.steps = cfg.hpo.steps
        self.method = self.make_method(cfg.method)  # one object for the run: HOAG keeps its warm starts
        self.compile = cfg.hpo.compile and self.method.supports_compile
        self.world = World()

    def distribute(self, world: World) -> MetaObjective | None:
        """A multi-rank run: keep the world for the report's restart-parallel parts, and return this
        rank's share of the ensemble where the task has one (:meth:`shard`)."""
        self.world = world
        return self.shard(world)

    def shard(self, world: World) -> MetaObjective | None:
        """Ensemble-parallel: this rank's share of the objective (the runner sums the shares'
        hypergradients). Default: None (one model: every rank computes the whole hypergradient)."""
        return None

    def split(self) -> data.Split:
        """The configured table (``hpo.dataset``), split ``hpo.split`` with the run's seed."""
        return data.table(self.cfg.hpo.dataset, tuple(self.cfg.hpo.split), self.cfg.seed)

    @property
    def budget(self) -> int:
        """Inner trainings for each search baseline: as many as the outer loop's hypergradients."""
        return self.cfg.hpo.budget or self.cfg.outer.steps

    @property
    def method_name(self) -> str:
        """The configured method's name (``method.name``), for the report's rows."""
        return self.cfg.method["name"]

    def inner_precision(self) -> tuple[float, int]:
        """``(tol, max_rounds)`` of one inner solve of the configured method: an implicit method's
        ``inner_tol`` (HOAG's ``min_tol``) and ``max_inner_rounds``; for the others, 1e-6 and 20."""
        m = self.method
        tol = getattr(m, "min_tol", None) or getattr(m, "inner_tol", None) or 1e-6
        return tol, getattr(m, "max_inner_rounds", 20)

    def make_method(self, spec: str | Mapping[str, Any]) -> hg.Method:
        """A fresh method object: a ``[method]`` table, or a name (the configured ``[method]`` table
        when it names that method, else that method's defaults)."""
        if isinstance(spec, str):
            spec = self.cfg.method if self.cfg.method["name"] == spec else {"name": spec}
        return build_method(spec, self.steps, self.cfg.seed)

    def make_hypergrad(self, spec: str | Mapping[str, Any]
                       ) -> Callable[[Mapping[str, Tensor], torch.Generator], hg.HypergradResult]:
        """``(hyper, generator) -> HypergradResult`` by a fresh method (:meth:`make_method`; for comparisons)."""
        method = self.make_method(spec)
        use_compile = self.cfg.hpo.compile and method.supports_compile
        return lambda h, g: hg.hypergradient(self.objective, self.optimizer, h, self.steps, method=method,
                                             generator=g, check_finite=False, compile=use_compile)


    @abstractmethod
    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        """Quick metrics during the outer loop (the runner's ``eval_every``)."""

    @abstractmethod
    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        """The task's full protocol after the outer loop: baselines, comparisons, checks."""

    @abstractmethod
    def summary(self, results: dict[str, Any]) -> str:
        """Markdown tables of :meth:`report`'s results."""

    @abstractmethod
    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        """The task's PNGs under ``out``."""


def build(cfg: Config, device: torch.device) -> HPOTask:
    from .cleaning import CleaningTask
    from .evidence import EvidenceTask
    from .l2 import L2Task
    from .schedule import ScheduleTask

    tasks = {"l2": L2Task, "schedule": ScheduleTask, "cleaning": CleaningTask, "evidence": EvidenceTask}
    return tasks[cfg.hpo.task](cfg, device)
