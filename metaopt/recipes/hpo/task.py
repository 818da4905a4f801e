"""The ``hpo`` recipe's task: the base every HPO task shares, and the builder that picks one."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import hypergrad as hg
from ...objective import MetaObjective
from ...optim.base import Optimizer
from .config import Config
from .methods import Hypergrad, MethodSettings


def stats(values: Tensor) -> dict[str, float]:
    v = values.double().flatten()
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0}


class HPOTask:
    """What every HPO task has: the objective, its inner optimizer, the initial hyperparameters and
    the configured hypergradient method (``hypergradient`` is the runner's outer step)."""

    name = ""
    objective: MetaObjective
    optimizer: Optimizer
    hyper: dict[str, Tensor]

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.steps = cfg.hpo.steps
        self.method = cfg.hpo.method
        self.compile = cfg.hpo.compile
        self._hypergrad: Hypergrad | None = None

    @property
    def budget(self) -> int:
        """Inner trainings for each search baseline: as many as the outer loop's hypergradients."""
        return self.cfg.hpo.budget or self.cfg.outer.steps

    def settings(self) -> MethodSettings:
        h = self.cfg.hpo
        return MethodSettings(self.steps, truncate=h.truncate, tol=h.tol, max_rounds=h.max_rounds,
                              solve_iters=h.solve_iters)

    def make_hypergrad(self, name: str) -> Hypergrad:
        return Hypergrad(name, self.objective, self.optimizer, self.settings(), compile=self.compile)

    def hypergradient(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> hg.HypergradResult:
        if self._hypergrad is None:
            self._hypergrad = self.make_hypergrad(self.method)
        return self._hypergrad(hyper, generator)

    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        raise NotImplementedError

    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self, results: dict[str, Any]) -> str:
        raise NotImplementedError

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        return []


def build(cfg: Config, device: torch.device) -> HPOTask:
    from .cleaning import CleaningTask
    from .evidence import EvidenceTask
    from .l2 import L2Task
    from .schedule import ScheduleTask

    tasks = {"l2": L2Task, "schedule": ScheduleTask, "cleaning": CleaningTask, "evidence": EvidenceTask}
    return tasks[cfg.hpo.task](cfg, device)


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown table lines; floats printed with 4 significant digits."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(fmt(v) for v in r) + " |" for r in rows
    ]
