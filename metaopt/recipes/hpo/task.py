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
        self.method = self.make_method(cfg.hpo.method)  # one object for the run: HOAG keeps its warm starts
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

    def settings(self) -> hg.Settings:
        """The ``[hpo]`` table's method settings (each method takes the ones it has)."""
        h = self.cfg.hpo
        return hg.Settings(truncate=h.truncate, tol=h.tol, max_rounds=h.max_rounds, solve_iters=h.solve_iters,
                           chunk_size=64, hoag_tol0=h.hoag_tol0, hoag_decrease=h.hoag_decrease)

    def make_method(self, name: str) -> hg.Method:
        """The registered method ``name`` with the task's settings (a fresh object)."""
        return hg.as_method(name, self.steps, self.settings())

    def make_hypergrad(self, name: str) -> Callable[[Mapping[str, Tensor], torch.Generator], hg.HypergradResult]:
        """``(hyper, generator) -> HypergradResult`` by a fresh ``name`` method (for comparisons)."""
        method = self.make_method(name)
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
