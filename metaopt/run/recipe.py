"""Recipes: what the runner needs from a problem, and the registry that finds them.

A :class:`Recipe` names a config dataclass (which has an ``outer: OuterConfig`` table and a ``seed``),
its presets (partial config dicts; ``smoke`` must finish in under a minute on a 2-core CPU), and a
``build(config, device) -> Task``. Recipes are found among the built-ins and in the
``metaopt.recipes`` entry-point group, so a user's package can add one without touching metaopt::

    [project.entry-points."metaopt.recipes"]
    mine = "my_package.recipe:RECIPE"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

import torch
from torch import Tensor

from ..objective import MetaObjective
from ..optim.base import Optimizer
from .config import ConfigError
from .task import Task


@dataclass
class OuterConfig:
    """The outer loop every recipe shares."""

    steps: int = 100
    meta_optimizer: Literal["adam", "sgd"] = "adam"
    meta_lr: float = 0.01
    clip: float = 0.0  # clip the hypergradient's global norm to this (0: off)
    eval_every: int = 10
    checkpoint_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite hypergradients before the run stops
    bad_lr_factor: float = 0.5  # the meta learning rate is multiplied by this after a bad step
    threads: int = 1  # torch intra-op threads (1 is fastest for tiny models)

    def validate(self) -> None:
        for name in ("steps", "eval_every", "checkpoint_every", "max_bad_steps", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"outer.{name} = {getattr(self, name)} must be >= 1")
        if self.meta_lr <= 0:
            raise ConfigError(f"outer.meta_lr = {self.meta_lr} must be > 0")
        if self.clip < 0:
            raise ConfigError(f"outer.clip = {self.clip} must be >= 0 (0 turns clipping off)")
        if not 0 < self.bad_lr_factor <= 1:
            raise ConfigError(f"outer.bad_lr_factor = {self.bad_lr_factor} must be in (0, 1]")


@dataclass(frozen=True)
class Recipe:
    """A runnable problem: its name, settings dataclass, presets and the ``build`` that makes a
    :class:`Task` of a config on a device; ``check`` gives the tiny instance ``metaopt check`` uses."""

    name: str
    description: str
    config: type
    build: Callable[[Any, torch.device], Task]
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # a tiny float64 instance for `metaopt check`: () -> (objective, optimizer, hyper, steps)
    check: Callable[[], tuple[MetaObjective, Optimizer, dict[str, Tensor], int]] | None = None

    def default_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config())


def _builtin() -> dict[str, Recipe]:
    from ..recipes.demo import RECIPE as demo
    from ..recipes.distill import RECIPE as distill
    from ..recipes.hpo import RECIPE as hpo
    from ..recipes.structure import RECIPE as structure

    return {r.name: r for r in (demo, distill, hpo, structure)}


def recipes() -> dict[str, Recipe]:
    """All recipes: built-ins, then the ``metaopt.recipes`` entry points (a broken plug-in is named)."""
    found = _builtin()
    for ep in metadata.entry_points(group="metaopt.recipes"):
        try:
            recipe = ep.load()
        except Exception as e:  # a user's package failed to import: say which, keep the others
            raise ConfigError(f"recipe plug-in {ep.name!r} ({ep.value}) failed to load: {e}") from None
        if not isinstance(recipe, Recipe):
            raise ConfigError(f"recipe plug-in {ep.name!r} ({ep.value}) is not a metaopt.run.Recipe")
        found.setdefault(recipe.name, recipe)
    return found
