"""The ``distill`` recipe's task: build the batched distillation, judge it, tabulate and plot it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import optim
from ...run.config import ConfigError, build_method
from ...run.distributed import World, balance, block
from ...run.task import Task
from . import data as datasets
from . import evaluate as ev
from . import report
from .archs import build
from .config import Config
from .objective import Distillation


def make_objective(cfg: Config, device: str | torch.device, hold: list[int] | None = None) -> Distillation:
    """The configured :class:`Distillation` (``hold``: only these members, one rank's share)."""
    d = cfg.distill
    data = datasets.load(d.dataset, d.data_dir, d.train_size, d.test_size)
    models = {a: build(a, data) for a in d.archs}
    layout = {r: (list(d.archs) if r == "all" else [r] * d.members) for r in d.rows}
    return Distillation(
        data, models, layout, restarts=d.restarts, steps_per_epoch=d.steps_per_epoch, epochs=d.epochs,
        per_class=d.per_class, batch=d.batch or None, init=d.init, labels=d.labels, init_scheme=d.init_scheme,
        fixed_seed=cfg.seed + 7919, device=device, hold=hold,
    )


def shares(objective: Distillation, size: int) -> list[list[int]]:
    """Each rank's members (``hold`` indices) of ``objective``'s whole problem.

    A rank's time per outer step is mostly the kernels it dispatches, one set per architecture
    group whatever the group's size, so with at least as many architectures as ranks whole groups
    are dealt, balanced by their parameter tensors (a proxy for kernels per step): the paper
    protocol over 2 ranks gives {4-layer} and {1-layer, 2-layer}, the multi-architecture
    distillations' members going with their groups. With fewer architectures than ranks, the
    members, ordered by group, are cut into ``size`` contiguous blocks (each rank then holds one or
    a few groups' members, and every rank holds some)."""
    groups = objective.members_by_arch()
    archs = list(groups)
    if len(archs) >= size:
        cost = [len(objective.ens.groups[a].shapes) for a in archs]
        return [sorted(m for i in part for m in groups[archs[i]]) for part in balance(cost, size)]
    order = [m for a in archs for m in groups[a]]
    return [sorted(order[j] for j in block(len(order), k, size)) for k in range(size)]


class DistillTask(Task):
    """``rows x restarts`` distillations as one :class:`Distillation`, evaluated by the paper's protocol."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        d, self.cfg, self.device = cfg.distill, cfg, device
        self.objective = make_objective(cfg, device)
        self.data, self.models = self.objective.data, {a: build(a, self.objective.data) for a in d.archs}
        self.optimizer = optim.sgd()
        self.world = World()
        n_train = self.data.X.shape[0]
        if cfg.eval.baseline_batch > n_train:
            raise ConfigError(f"eval.baseline_batch = {cfg.eval.baseline_batch} exceeds the {n_train} training points")
        self.steps = self.objective.steps
        self.hyper = self.objective.init_hyper(torch.Generator().manual_seed(cfg.seed), lr=d.lr)
        self.method = build_method(cfg.method, self.steps, cfg.seed)  # one object per run (its state checkpointed)
        self.compile = d.compile
        self.compile_block = d.compile_block or None
        self.strategies = ev.Strategies(cfg.eval.epochs, cfg.eval.gamma, cfg.eval.ramp_init, cfg.eval.ramp_up,
                                        cfg.eval.ramp_up_epochs, cfg.eval.ramp_down, cfg.eval.shuffled_lr)
        self.table: ev.Table | None = None
        self.baselines: dict[str, ev.Curves] = {}
        self.baseline: ev.Curves | None = None  # the first of them, for figures

    # -- the outer step -------------------------------------------------------------------------

    def distribute(self, world: World) -> Distillation:
        """Ensemble-parallel: this rank's share trains its :func:`shares` of the members, its outer
        loss that share of the whole; the runner sums the shares' hypergradients."""
        M = self.objective.members
        if world.size > M:
            raise ConfigError(f"{world.size} ranks for {M} internal models (distill.rows x distill.restarts x "
                              f"members): start at most {M} processes")
        self.world = world
        return make_objective(self.cfg, self.device, shares(self.objective, world.size)[world.rank])

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        """Quick check during distillation (:func:`.evaluate.quick`): raw steps, each row's own
        architectures, a few inits."""
        return ev.quick(self, hyper, generator)

    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        """The full protocol (:func:`.report.protocol`); its table and baselines stay on the task for
        :meth:`figures`."""
        return report.protocol(self, hyper, generator)

    # -- output ---------------------------------------------------------------------------------

    def summary(self, results: dict[str, Any]) -> str:
        return report.summary_markdown(results)

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        from . import plots

        return plots.all_figures(self, hyper, out)
