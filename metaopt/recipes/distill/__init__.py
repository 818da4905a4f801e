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


_SMOKE = {
    "distill": {"restarts": 2, "steps_per_epoch": 10, "epochs": 2, "rows": ["1-layer", "2-layer", "all"],
                "lr": 0.1},
    "eval": {"inits": 5, "epochs": 10, "baseline_epochs": 30, "baseline_inits": 5, "random_real_runs": 5,
             "quick_inits": 2},
    "outer": {"steps": 100, "meta_lr": 0.05, "eval_every": 50, "checkpoint_every": 20},
}

_DIGITS = {
    "distill": {"dataset": "digits", "archs": ["mlp", "convnet"], "rows": ["mlp", "convnet"], "restarts": 2,
                "members": 4,
                "steps_per_epoch": 10, "epochs": 3, "per_class": 1, "lr": 0.1, "batch": 256},
    "eval": {"inits": 10, "strategies": ["raw", "strategy2", "strategy3", "shuffled"], "epochs": 30,
             "baseline_epochs": 30, "baseline_inits": 5, "baseline_lr": 0.003, "baseline_optimizers": ["adam"],
             "random_real_runs": 5,
             "random_real_lrs": [0.03, 0.1, 0.3, 1.0], "quick_inits": 2},
    "outer": {"steps": 800, "meta_lr": 0.01, "eval_every": 200, "checkpoint_every": 50},
}


def _variant(base: dict[str, Any], **distill: Any) -> dict[str, Any]:
    return {**base, "distill": {**base["distill"], **distill}}


RECIPE = Recipe(
    name="distill",
    description="dataset distillation: Medvedev & D'yakonov 2020 (moons, Tables 1-2) and Wang et al. 2018 (digits)",
    config=Config,
    build=DistillTask,
    check=check_instance,
    presets={
        "smoke": _SMOKE,
        "paper": {},  # the defaults are the paper's protocol
        "digits": _DIGITS,
        "digits-fixed": _variant(_DIGITS, init="fixed", steps_per_epoch=1, restarts=4, members=1),
        "digits-soft": _variant(_DIGITS, labels="soft"),
    },
)
