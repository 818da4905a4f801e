"""The ``demo`` recipe's settings: ``[inner]`` (the distillation), ``[method]`` and the shared ``[outer]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ... import optim
from ...run.config import ConfigError, MethodTable, check_method, method_table
from ...run.recipe import OuterConfig

NO_STATIONARY_POINT = ("the distillation's hyperparameters (synthetic points and learning rates) act along the "
                       "inner trajectory: it has no stationary point")
"""Why the distillation recipes refuse the implicit methods."""


@dataclass
class Inner:
    """``[inner]``: the moons distillation of one architecture (its hypergradient: ``[method]``)."""

    MOVED: ClassVar[dict[str, str]] = {
        "method": 'the hypergradient method is the [method] table now: write [method] name = "{value}" '
                  "(or --set method.name={value})"}

    arch: list[int] = field(default_factory=lambda: [2, 10, 1])
    members: int = 3
    steps_per_epoch: int = 10
    epochs: int = 4
    per_class: int = 4
    lr: float = 0.02  # initial learnable learning rate of every inner step
    batch: int = 64  # real points per outer step
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
    """The ``demo`` recipe's config: ``seed``, ``[inner]``, ``[method]`` (checkpointed) and ``[outer]``
    (100 outer steps)."""

    seed: int = 0
    inner: Inner = field(default_factory=Inner)
    method: MethodTable = method_table("checkpointed")  # name + that method's fields (docs/cli.md)
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(steps=100))

    def validate(self) -> None:
        check_method(self.method, self.inner.steps_per_epoch * self.inner.epochs, stationary=False,
                     why=NO_STATIONARY_POINT, optimizer=optim.sgd())
