"""Task ``schedule``: one learning rate (and momentum) per inner step of an MLP on digits, learned
through the unrolled training (Maclaurin et al. 2015), against the best constant learning rate found
by grid search with the same number of model trainings, both judged on the same fresh
initialisations and batches."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import hypergrad as hg
from ... import optim
from ...run.config import ConfigError
from ...run.distributed import World, block
from ..report import stats
from . import plots, report
from .config import Config
from .objective import LearnedSchedule
from .task import HPOTask

MOMENTA = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # the grid's momenta when the momentum is learned


class ScheduleTask(HPOTask):
    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        s = cfg.schedule
        self.data = self.split()
        self.objective = LearnedSchedule(self.data, s.hidden, s.members, self.steps, s.batch, device=device)
        self.optimizer = optim.momentum(momentum=s.momentum)
        self.hyper = self.objective.init_hyper(s.lr, s.momentum if s.learn_momentum else None)
        self.results: dict[str, Any] = {}

    def shard(self, world: World) -> LearnedSchedule:
        """Ensemble-parallel: each rank trains a block of the ``schedule.members`` MLPs."""
        s = self.cfg.schedule
        if world.size > s.members:
            raise ConfigError(f"{world.size} ranks for schedule.members = {s.members}: start at most {s.members} "
                              "processes")
        return LearnedSchedule(self.data, s.hidden, s.members, self.steps, s.batch, device=self.device,
                               hold=list(block(s.members, world.rank, world.size)))

    def judge(self, hyper: Mapping[str, Tensor], members: int, seed: int) -> dict[str, Tensor]:
        """Train ``members`` fresh MLPs (seeded inits and batches) with the schedule ``hyper``
        (tables ``[n]`` shared, or ``[n, members]`` one column per member); per-member metrics."""
        s = self.cfg.schedule
        obj = LearnedSchedule(self.data, s.hidden, members, self.steps, s.batch, device=self.device)
        params = hg.train(obj, self.optimizer, hyper, self.steps, torch.Generator().manual_seed(seed))
        return {"val_loss": obj.split_losses(params, "_val"), "val_acc": obj.accuracy(params, "_val"),
                "test_loss": obj.split_losses(params, "_test"), "test_acc": obj.accuracy(params, "_test")}

    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        m = self.judge(hyper, self.cfg.schedule.members, self.cfg.seed + 1)
        return {k: float(v.mean()) for k, v in m.items()}

    def constant(self, lr: Tensor, momentum: Tensor | None = None) -> dict[str, Tensor]:
        """Constant schedules, one column per entry of ``lr`` (and of ``momentum``, if given)."""
        n = self.steps
        out = {"log_lr": lr.log().unsqueeze(0).expand(n, -1).contiguous()}
        if momentum is not None:
            out["logit_mom"] = torch.logit(momentum).unsqueeze(0).expand(n, -1).contiguous()
        return out

    def grid(self) -> dict[str, Any]:
        """Grid search over constant schedules, each trained on ``members`` inits (the models one
        hypergradient trains): ``max(2, budget // M)`` log-spaced learning rates times the ``M``
        momenta of :data:`MOMENTA` when the momentum is learned too (``M = 1``, the fixed momentum,
        otherwise) — ``budget`` points, rounded down to a multiple of ``M``, at least ``2 M``."""
        s, B = self.cfg.schedule, self.budget
        t0 = time.perf_counter()
        momenta = torch.tensor(MOMENTA if s.learn_momentum else [s.momentum], dtype=torch.float64)
        n_lr = max(2, B // len(momenta))
        lrs = torch.logspace(math.log10(s.lr_low), math.log10(s.lr_high), n_lr, dtype=torch.float64)
        lr_c, mom_c = (t.reshape(-1) for t in torch.meshgrid(lrs, momenta, indexing="ij"))
        G = lr_c.numel()
        table = self.constant(lr_c.repeat_interleave(s.members),
                              mom_c.repeat_interleave(s.members) if s.learn_momentum else None)
        per = self.judge(table, G * s.members, self.cfg.seed + 2)
        val = per["val_loss"].reshape(G, s.members)
        val = torch.where(torch.isfinite(val), val, torch.full_like(val, math.inf)).mean(1)
        best = int(val.argmin())
        return {"lr": float(lr_c[best]), "momentum": float(mom_c[best]), "points": G, "lrs": lrs.tolist(),
                "momenta": momenta.tolist(), "val_loss": val.tolist(), "trainings": G,
                "seconds": time.perf_counter() - t0}

    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        s = self.cfg.schedule
        t0 = time.perf_counter()
        grid = self.grid()
        seed = self.cfg.seed + 3  # the same fresh inits and batches for every schedule judged below
        t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
        best = self.constant(t(grid["lr"]), t(grid["momentum"]) if s.learn_momentum else None)
        best = {k: v[:, 0] for k, v in best.items()}
        what = f"lr = {grid['lr']:.3g}" + (f", momentum = {grid['momentum']:.3g}" if s.learn_momentum else "")
        judged = {
            "initial schedule (constant)": self.judge(self.hyper, s.eval_inits, seed),
            f"best constant {what} (grid, {grid['points']} points)": self.judge(best, s.eval_inits, seed),
            f"learned schedule ({self.method_name})": self.judge(hyper, s.eval_inits, seed),
        }
        rows = {k: {m: stats(v) for m, v in per.items()} for k, per in judged.items()}
        learned, const = list(judged.values())[2], list(judged.values())[1]
        out = {
            "task": "schedule", "dataset": self.data.name, "steps": self.steps, "members": s.members,
            "eval_inits": s.eval_inits, "method": self.method_name, "rows": rows, "grid": grid,
            "paired_test_loss_wins": float((learned["test_loss"] < const["test_loss"]).double().mean()),
            "lr": hyper["log_lr"].exp().tolist(),
            "momentum": (torch.sigmoid(hyper["logit_mom"]).tolist() if "logit_mom" in hyper
                         else [s.momentum] * self.steps),
            "seconds": time.perf_counter() - t0,
        }
        self.results = out
        return out

    def summary(self, results: dict[str, Any]) -> str:
        return report.schedule(results)

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        return plots.schedule(self, hyper, history, out)
