"""The built-in ``demo`` recipe: moons dataset distillation for one architecture (Medvedev &
D'yakonov 2020's protocol for a single restart), small enough to show the runner end to end, and
the problem of ``metaopt demo`` (:func:`demo_problem`, :func:`demo_methods`, :func:`distil`).

``metaopt run demo --preset smoke`` runs it; its presets are ``recipes/demo/*.toml``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ... import optim
from ...run.recipe import Recipe
from .. import builtin_presets
from .config import DemoConfig
from .evaluate import distil
from .objective import MoonsDistillation, demo_methods, demo_problem
from .task import DemoTask

__all__ = ["RECIPE", "DemoConfig", "DemoTask", "MoonsDistillation", "demo_methods", "demo_problem", "distil"]


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
    presets=builtin_presets("demo"),
)
"""The ``demo`` recipe: :class:`DemoConfig`, :class:`DemoTask` and the presets of ``recipes/demo/``."""
