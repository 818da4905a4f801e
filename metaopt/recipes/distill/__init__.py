"""The ``distill`` recipe: dataset distillation (Wang et al. 2018; Medvedev & D'yakonov 2020).

``metaopt run distill --preset paper`` runs the paper's moons protocol (Tables 1 and 2): 3
single-architecture rows and the multi-architecture row, 10 restarts each, as one batched problem,
then the cross-architecture evaluation under the raw schedule and the three train-longer strategies.
"""

from __future__ import annotations

from typing import Any

import torch

from ... import optim
from ...run.recipe import Recipe
from .. import builtin_presets
from .config import Config
from .data import moons
from .objective import Distillation
from .task import DistillTask

__all__ = ["Config", "Distillation", "DistillTask", "RECIPE"]


def check_instance() -> tuple[Distillation, Any, dict[str, torch.Tensor], int]:
    """A tiny float64 instance for `metaopt check`: two rows (one multi-architecture), full batch."""
    from ...models import MLP

    data = moons()
    models = {"1-layer": MLP([2, 1], "tanh"), "2-layer": MLP([2, 6, 1], "tanh")}
    obj = Distillation(data, models, {"2-layer": ["2-layer"] * 2, "all": ["1-layer", "2-layer"]}, restarts=1,
                       steps_per_epoch=3, epochs=2, per_class=2, batch=None, labels="soft", dtype=torch.float64)
    return obj, optim.momentum(momentum=0.9), obj.init_hyper(torch.Generator().manual_seed(0), lr=0.2), obj.steps


RECIPE = Recipe(
    name="distill",
    description="dataset distillation: Medvedev & D'yakonov 2020 (moons, Tables 1-2) and Wang et al. 2018 (digits)",
    config=Config,
    build=DistillTask,
    check=check_instance,
    presets=builtin_presets("distill"),
)
"""The ``distill`` recipe: :class:`Config`, :class:`DistillTask` and the presets of ``recipes/distill/``."""
