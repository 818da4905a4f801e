"""The built-in ``demo`` recipe: moons dataset distillation for one architecture (Medvedev &
D'yakonov 2020's protocol for a single restart), small enough to show the runner end to end."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import optim
from ..demo import MoonsDistillation
from ..hypergrad import train
from ..run.config import ConfigError
from ..run.distributed import World, block
from ..run.recipe import OuterConfig, Recipe
from ..run.task import Task


@dataclass
class Inner:
    arch: list[int] = field(default_factory=lambda: [2, 10, 1])
    members: int = 3
    steps_per_epoch: int = 10
    epochs: int = 4
    per_class: int = 4
    lr: float = 0.02  # initial learnable learning rate of every inner step
    batch: int = 64  # real points per outer step
    method: Literal["full", "checkpointed", "forward"] = "checkpointed"
    compile: bool = False
    eval_inits: int = 5  # fresh initialisations per evaluation

    def validate(self) -> None:
        for name in ("members", "steps_per_epoch", "epochs", "per_class", "batch", "eval_inits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inner.{name} = {getattr(self, name)} must be >= 1")
        if len(self.arch) < 2 or self.arch[0] != 2 or self.arch[-1] != 1 or min(self.arch) < 1:
            raise ConfigError(
                f"inner.arch = {self.arch} must start with 2 inputs and end with 1 output, e.g. [2, 10, 1]"
            )
        if self.lr <= 0:
            raise ConfigError(f"inner.lr = {self.lr} must be > 0")


@dataclass
class DemoConfig:
    seed: int = 0
    inner: Inner = field(default_factory=Inner)
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(steps=100))


class DemoTask(Task):
    def __init__(self, cfg: DemoConfig, device: torch.device) -> None:
        i = cfg.inner
        self.cfg = cfg
        self.objective = self.make_objective()
        self.optimizer = optim.sgd()
        self.steps = self.objective.steps
        self.hyper = self.objective.init_hyper(torch.Generator().manual_seed(cfg.seed), lr=i.lr)
        self.method = i.method
        self.compile = i.compile
        self.eval_inits = i.eval_inits

    def make_objective(self, hold: list[int] | None = None) -> MoonsDistillation:
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
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        accs, losses = [], []
        for _ in range(self.eval_inits):
            params = train(self.objective, self.optimizer, hyper, self.steps, gen)
            accs.append(self.objective.test_accuracy(params).mean())
            losses.append(self.objective.outer_loss(params, hyper, None))
        return {"test_accuracy": float(torch.stack(accs).mean()), "train_loss": float(torch.stack(losses).mean())}

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        obj = self.objective
        x = hyper["x"][0].reshape(-1, 2)
        y = obj.y_class.repeat(obj.s)
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
        a.scatter(obj.data.X[:, 0], obj.data.X[:, 1], c=obj.data.y, cmap="coolwarm", s=4, alpha=0.25)
        a.scatter(x[:, 0], x[:, 1], c=y, cmap="coolwarm", s=22, edgecolors="k", linewidths=0.5)
        a.set_title("distilled points over the training data")
        b.plot(F.softplus(hyper["lr"][:, 0]).numpy())
        b.set_xlabel("inner step")
        b.set_ylabel("learning rate")
        b.set_title("learned learning rates")
        fig.tight_layout()
        path = out / "distilled.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return [path]


def check_instance() -> tuple[MoonsDistillation, Any, dict[str, Tensor], int]:
    """A tiny float64 moons distillation for `metaopt check`: 2 members, 5 steps x 2 epochs, full batch."""
    obj = MoonsDistillation([2, 6, 1], members=2, steps_per_epoch=5, epochs=2, per_class=2, batch=None,
                            dtype=torch.float64)
    return obj, optim.momentum(momentum=0.9), obj.init_hyper(torch.Generator().manual_seed(0), lr=0.2), obj.steps


RECIPE = Recipe(
    name="demo",
    description="moons dataset distillation, one architecture (the core demo, with the full runner)",
    config=DemoConfig,
    build=DemoTask,
    check=check_instance,
    presets={
        "smoke": {
            "outer": {"steps": 60, "meta_lr": 0.05, "eval_every": 20, "checkpoint_every": 10},
            "inner": {"eval_inits": 3},
        },
        "paper": {  # the seed paper's protocol for one restart of the 2-layer model
            "inner": {"steps_per_epoch": 40, "epochs": 5, "members": 3, "lr": 0.02, "batch": 64,
                      "method": "full", "compile": True, "eval_inits": 25},
            "outer": {"steps": 800, "eval_every": 100, "checkpoint_every": 50},
        },
    },
)
