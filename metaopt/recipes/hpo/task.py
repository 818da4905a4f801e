"""The ``hpo`` recipe's task: the base every HPO task shares, and the builder that picks one."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
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
from .methods import Hypergrad, MethodSettings


class HPOTask(Task):
    """What every HPO task has: the objective, its inner optimizer, the initial hyperparameters and
    the configured hypergradient method (``hypergradient`` is the runner's outer step)."""

    objective: MetaObjective
    optimizer: Optimizer
    hyper: dict[str, Tensor]

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.steps = cfg.hpo.steps
        self.method = cfg.hpo.method
        self.compile = cfg.hpo.compile
        self._hypergrad: Hypergrad | None = None
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

    def settings(self) -> MethodSettings:
        h = self.cfg.hpo
        return MethodSettings(self.steps, truncate=h.truncate, tol=h.tol, max_rounds=h.max_rounds,
                              solve_iters=h.solve_iters, hoag_tol0=h.hoag_tol0, hoag_decrease=h.hoag_decrease)

    def make_hypergrad(self, name: str) -> Hypergrad:
        return Hypergrad(name, self.objective, self.optimizer, self.settings(), compile=self.compile)

    def hypergradient(self, objective: MetaObjective, hyper: Mapping[str, Tensor],
                      generator: torch.Generator) -> hg.HypergradResult:
        if self._hypergrad is None or self._hypergrad.objective is not objective:  # HOAG keeps warm starts
            self._hypergrad = Hypergrad(self.method, objective, self.optimizer, self.settings(), compile=self.compile)
        return self._hypergrad(hyper, generator)

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
