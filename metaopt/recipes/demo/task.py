"""The ``demo`` recipe's task: the moons distillation wired to the runner, its hooks thin methods."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import optim
from ...run.config import ConfigError, build_method
from ...run.distributed import World, block
from ...run.task import Task
from . import evaluate, plots
from .config import DemoConfig
from .objective import MoonsDistillation


class DemoTask(Task):
    """One moons distillation of ``inner.members`` models: SGD inner steps, learnable per-step rates."""

    def __init__(self, cfg: DemoConfig, device: torch.device) -> None:
        i = cfg.inner
        self.cfg = cfg
        self.objective = self.make_objective()
        self.optimizer = optim.sgd()
        self.steps = self.objective.steps
        self.hyper = self.objective.init_hyper(torch.Generator().manual_seed(cfg.seed), lr=i.lr)
        self.method = build_method(cfg.method, self.steps, cfg.seed)
        self.compile = i.compile
        self.compile_block = i.compile_block or None
        self.eval_inits = i.eval_inits

    def make_objective(self, hold: list[int] | None = None) -> MoonsDistillation:
        """The configured problem (``hold``: only these members, one rank's share)."""
        i = self.cfg.inner
        return MoonsDistillation(i.arch, members=i.members, steps_per_epoch=i.steps_per_epoch, epochs=i.epochs,
                                 per_class=i.per_class, batch=i.batch, hold=hold)

    def distribute(self, world: World) -> MoonsDistillation:
        """Ensemble-parallel: this rank's share trains a block of the members on the same synthetic data."""
        if world.size > self.cfg.inner.members:
            raise ConfigError(f"{world.size} ranks for inner.members = {self.cfg.inner.members}: start at most "
                              f"{self.cfg.inner.members} processes")
        return self.make_objective(list(block(self.cfg.inner.members, world.rank, world.size)))

    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        """Fresh models trained on the distilled data: test accuracy and full-training-set loss."""
        return evaluate.fresh_models(self.objective, self.optimizer, hyper, self.steps, self.eval_inits, generator)

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        """The distilled points and the learned learning rates."""
        return [plots.distilled(self.objective, hyper, out)]
