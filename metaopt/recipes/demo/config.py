"""The ``demo`` recipe's settings: ``[inner]`` (the distillation) and the shared ``[outer]``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...run.config import ConfigError, check_method
from ...run.recipe import OuterConfig


@dataclass
class Inner:
    """``[inner]``: the moons distillation of one architecture and how its hypergradient is taken."""

    arch: list[int] = field(default_factory=lambda: [2, 10, 1])
    members: int = 3
    steps_per_epoch: int = 10
    epochs: int = 4
    per_class: int = 4
    lr: float = 0.02  # initial learnable learning rate of every inner step
    batch: int = 64  # real points per outer step
    method: str = "checkpointed"  # a hypergradient method (metaopt.hypergrad.names())
    compile: bool = False
    eval_inits: int = 5  # fresh initialisations per evaluation

    def validate(self) -> None:
        for name in ("members", "steps_per_epoch", "epochs", "per_class", "batch", "eval_inits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inner.{name} = {getattr(self, name)} must be >= 1")
        check_method("inner.method", self.method, self.steps_per_epoch * self.epochs)
        if len(self.arch) < 2 or self.arch[0] != 2 or self.arch[-1] != 1 or min(self.arch) < 1:
            raise ConfigError(
                f"inner.arch = {self.arch} must start with 2 inputs and end with 1 output, e.g. [2, 10, 1]"
            )
        if self.lr <= 0:
            raise ConfigError(f"inner.lr = {self.lr} must be > 0")


@dataclass
class DemoConfig:
    """The ``demo`` recipe's config: ``seed``, ``[inner]`` and ``[outer]`` (100 outer steps)."""

    seed: int = 0
    inner: Inner = field(default_factory=Inner)
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(steps=100))
