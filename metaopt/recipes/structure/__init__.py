"""The ``structure`` recipe: variational model-structure selection (Bakhteev & Strijov).

A network whose edges mix candidate basis functions with structure weights on the simplex
(:class:`StructureGraph`), a Gaussian posterior over the weights and a Concrete (Gumbel-Softmax)
posterior over the structure, and prior hyperparameters tuned by hypergradient through the inner
variational training (:class:`StructureSelection`); modes: evidence maximisation, gradual
complexity increase / decrease, full enumeration.
"""

from __future__ import annotations

from typing import Any

import torch

from ... import optim
from ...run.recipe import Recipe
from .config import Config
from .graph import Edge, StructureGraph
from .objective import Coefficients, StructureSelection, concrete_log_prob, concrete_sample, gaussian_kl
from .task import StructureTask

__all__ = ["Coefficients", "Config", "Edge", "RECIPE", "StructureGraph", "StructureSelection", "StructureTask",
           "concrete_log_prob", "concrete_sample", "gaussian_kl"]


def check_instance() -> tuple[StructureSelection, Any, dict[str, torch.Tensor], int]:
    """A tiny float64 instance for `metaopt check`: y = tanh(x0), one edge of 3 candidates, 10 steps."""
    g = torch.Generator().manual_seed(0)
    X = torch.rand(30, 2, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.tanh(X[:, 0]) + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
    graph = StructureGraph([2, 1], [(1, 0, ["const", "tanh", "mlp:4:tanh"])])
    obj = StructureSelection(graph, X, y, noise_std=0.3, samples=2, common_noise=True)
    return obj, optim.momentum(lr=0.06, momentum=0.9), obj.init_hyper(1.0), 10


_TANH = {"structure": {"data": "tanh", "graph": "tanh3"}}

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"structure": {"steps": 20, "samples": 2, "sweep_prior": [0.1, 10.0], "sweep_steps": 3},
              "outer": {"steps": 10, "eval_every": 5, "checkpoint_every": 5}},
    "tanh": {"structure": {"seeds": 10}},
    "prior-sweep": {"structure": {"sweep_prior": [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0], "sweep_steps": 100},
                    "outer": {"steps": 100, "meta_lr": 0.2}},
    "temp-sweep": {"structure": {"sweep_temp": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "sweep_steps": 50},
                   "outer": {"steps": 50}},
    "increase": {"structure": {"mode": "increase", "prior_start": 100.0, "prior_end": 1.0, "reg_start": 10.0,
                               "reg_end": 1.0, "temp_start": 1.0, "temp_end": 0.1}},
    "decrease": {"structure": {"mode": "decrease", "prior_start": 1.0, "prior_end": 100.0, "reg_start": 1.0,
                               "reg_end": 10.0, "temp_start": 0.1, "temp_end": 1.0}},
    "enumerate": {"structure": {"graph": "enum8", "mode": "enumerate", "c_comb": -1.0, "q_temp": 0.1},
                  "outer": {"steps": 40}},
    "wine": {"structure": {"data": "wine", "graph": "wine8", "exhaustive": True, "samples": 2}},
}

RECIPE = Recipe(
    name="structure",
    description="variational structure selection (Bakhteev & Strijov): Gumbel-Softmax structures, bilevel priors",
    config=Config,
    build=StructureTask,
    check=check_instance,
    presets=PRESETS,
)
