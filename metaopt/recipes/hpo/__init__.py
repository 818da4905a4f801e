"""The ``hpo`` recipe: gradient-based hyperparameter optimisation, one preset per task.

* ``l2``, ``l2-single``, ``l2-digits``: L2 penalties of logistic regression (Pedregosa 2016; Grazzi
  et al. 2020; Lorraine et al. 2020) against grid and random search at equal compute, every
  hypergradient method side by side, greedy T1-T2 (Luketina et al. 2016);
* ``schedule``, ``schedule-reversible``: per-step learning rates (and momenta) of an MLP on digits
  (Maclaurin et al. 2015) against the best constant rate;
* ``cleaning``: data hyper-cleaning with one weight per training example (Franceschi et al. 2017);
* ``evidence``, ``evidence-shared``: ARD evidence maximisation with a closed-form oracle.

Besides the modules every recipe has (``config``, ``data``, ``objective``, ``task``: the shared
:class:`HPOTask` and :func:`build`, ``evaluate``, ``plots``, ``report``), each task has a module of
its own (``l2``, ``schedule``, ``cleaning``, ``evidence``: its wiring, judging and final protocol),
and ``methods`` runs every hypergradient method by name. Presets: ``recipes/hpo/*.toml``.
"""

from __future__ import annotations

from typing import Any

import torch

from ... import optim
from ...run.recipe import Recipe
from .. import builtin_presets
from .config import Config
from .objective import Evidence, HyperCleaning, L2LogReg, LearnedSchedule
from .task import HPOTask, build

__all__ = ["Config", "Evidence", "HPOTask", "HyperCleaning", "L2LogReg", "LearnedSchedule", "RECIPE"]


def check_instance() -> tuple[Evidence, Any, dict[str, torch.Tensor], int]:
    """A tiny float64 instance for `metaopt check`: ARD evidence of a cubic, 20 points, 60 steps."""
    from . import data

    obj = Evidence(data.polynomial(20, 10, 3, [0.5, -1.0, 0.0, 0.8], 0.3, 0), ard=True)
    return obj, optim.momentum(momentum=0.9), obj.init_hyper(1.0, 2.0), 60


RECIPE = Recipe(
    name="hpo",
    description="gradient-based hyperparameter optimisation: L2 penalties, schedules, hyper-cleaning, evidence",
    config=Config,
    build=build,
    check=check_instance,
    presets=builtin_presets("hpo"),
)
"""The ``hpo`` recipe: :class:`Config`, :func:`build` (one task per ``hpo.task``) and the presets of
``recipes/hpo/``."""
