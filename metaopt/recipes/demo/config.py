"""The ``demo`` recipe's settings: ``[inner]`` (the distillation), ``[method]`` and the shared ``[outer]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ... import optim
from ...run.config import ConfigError, MethodTable, check_method, method_table
from ...run.recipe import OuterConfig
from ...run.schema import CompileBlock, Count, Positive, Seed

NO_STATIONARY_POINT = ("the distillation's hyperparameters (synthetic points and learning rates) act along the "
                       "inner trajectory: it has no stationary point")
"""Why the distillation recipes refuse the implicit methods."""


@dataclass
class Inner:
    """``[inner]``: the moons distillation of one architecture (its hypergradient: ``[method]``)."""

    MOVED: ClassVar[dict[str, str]] = {
        "method": 'the hypergradient method is the [method] table now: write [method] name = "{value}" '
                  "(or --set method.name={value})"}

    arch: list[Count] = field(default_factory=lambda: [2, 10, 1])
    members: Count = 3
    steps_per_epoch: Count = 10
    epochs: Count = 4
    per_class: Count = 4
    lr: Positive = 0.02  # initial learnable learning rate of every inner step
    batch: Count = 64  # real points per outer step
    compile: bool = False
    compile_block: CompileBlock = 0  # inner steps per compiled graph (1: the fastest first compile)
    eval_inits: Count = 5  # fresh initialisations per evaluation

    def validate(self) -> None:
        if self.compile_block and not self.compile:
            raise ConfigError(f"inner.compile_block = {self.compile_block} applies only with inner.compile = true: "
                              f"set inner.compile = true or drop inner.compile_block")
        if len(self.arch) < 2 or self.arch[0] != 2 or self.arch[-1] != 1:
            raise ConfigError(
                f"inner.arch = {self.arch} must start with 2 inputs and end with 1 output, e.g. [2, 10, 1]"
            )


@dataclass
class DemoConfig:
    """The ``demo`` recipe's config: ``seed``, ``[inner]``, ``[method]`` (checkpointed) and ``[outer]``
    (100 outer steps)."""

    seed: Seed = 0
    inner: Inner = field(default_factory=Inner)
    method: MethodTable = method_table("checkpointed")  # name + that method's fields (docs/cli.md)
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(steps=100))

    def validate(self) -> None:
        check_method(self.method, self.inner.steps_per_epoch * self.inner.epochs, stationary=False,
                     why=NO_STATIONARY_POINT, optimizer=optim.sgd())
