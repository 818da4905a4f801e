"""The ``hpo`` recipe: gradient-based hyperparameter optimisation, one preset per task.

* ``l2``, ``l2-single``, ``l2-digits``: L2 penalties of logistic regression (Pedregosa 2016; Grazzi
  et al. 2020; Lorraine et al. 2020) against grid and random search at equal compute, every
  hypergradient method side by side, greedy T1-T2 (Luketina et al. 2016);
* ``schedule``, ``schedule-reversible``: per-step learning rates (and momenta) of an MLP on digits
  (Maclaurin et al. 2015) against the best constant rate;
* ``cleaning``: data hyper-cleaning with one weight per training example (Franceschi et al. 2017);
* ``evidence``, ``evidence-shared``: ARD evidence maximisation with a closed-form oracle.
"""

from __future__ import annotations

from typing import Any

import torch

from ... import optim
from ...run.recipe import Recipe
from .config import Config
from .objectives import Evidence, HyperCleaning, L2LogReg, LearnedSchedule
from .task import HPOTask, build

__all__ = ["Config", "Evidence", "HPOTask", "HyperCleaning", "L2LogReg", "LearnedSchedule", "RECIPE"]


def check_instance() -> tuple[Evidence, Any, dict[str, torch.Tensor], int]:
    """A tiny float64 instance for `metaopt check`: ARD evidence of a cubic, 20 points, 60 steps."""
    from . import data

    obj = Evidence(data.polynomial(20, 10, 3, [0.5, -1.0, 0.0, 0.8], 0.3, 0), ard=True)
    return obj, optim.momentum(momentum=0.9), obj.init_hyper(1.0, 2.0), 60


_L2 = {"hpo": {"task": "l2", "dataset": "breast_cancer", "method": "hoag", "steps": 100},
       "outer": {"steps": 100, "meta_lr": 0.1, "eval_every": 20, "checkpoint_every": 10}}

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "hpo": {"task": "l2", "dataset": "breast_cancer", "method": "hoag", "steps": 50},
        "l2": {"compare": ["hoag", "cg", "full", "truncated"], "compare_steps": 5, "eval_steps": 300},
        "outer": {"steps": 10, "meta_lr": 0.1, "eval_every": 5, "checkpoint_every": 5},
    },
    "l2": _L2,
    "l2-single": {**_L2, "l2": {"penalty": "single", "curve": 81}},
    "l2-digits": {**_L2, "hpo": {**_L2["hpo"], "dataset": "digits"},
                  "l2": {"penalty": "per_weight", "compare_steps": 30}},
    "schedule": {
        "hpo": {"task": "schedule", "dataset": "digits", "method": "checkpointed", "steps": 100},
        "outer": {"steps": 200, "meta_lr": 0.05, "eval_every": 50, "checkpoint_every": 10},
    },
    "schedule-reversible": {
        "hpo": {"task": "schedule", "dataset": "digits", "method": "reversible", "steps": 100},
        "schedule": {"learn_momentum": False},
        "outer": {"steps": 200, "meta_lr": 0.05, "eval_every": 50, "checkpoint_every": 10},
    },
    "cleaning": {
        "hpo": {"task": "cleaning", "dataset": "digits", "method": "full", "steps": 100},
        "outer": {"steps": 200, "meta_lr": 0.1, "eval_every": 50, "checkpoint_every": 10},
    },
    "evidence": {
        "hpo": {"task": "evidence", "method": "hoag", "steps": 200},
        "outer": {"steps": 300, "meta_lr": 0.2, "eval_every": 50, "checkpoint_every": 50},
    },
    "evidence-shared": {
        "hpo": {"task": "evidence", "method": "hoag", "steps": 200},
        "evidence": {"ard": False},
        "outer": {"steps": 300, "meta_lr": 0.05, "eval_every": 50, "checkpoint_every": 50},
    },
}

RECIPE = Recipe(
    name="hpo",
    description="gradient-based hyperparameter optimisation: L2 penalties, schedules, hyper-cleaning, evidence",
    config=Config,
    build=build,
    check=check_instance,
    presets=PRESETS,
)
