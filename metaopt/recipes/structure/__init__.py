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
from .. import builtin_presets
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


RECIPE = Recipe(
    name="structure",
    description="variational structure selection (Bakhteev & Strijov): Gumbel-Softmax structures, bilevel priors",
    config=Config,
    build=StructureTask,
    check=check_instance,
    presets=builtin_presets("structure"),
)
"""The ``structure`` recipe: :class:`Config`, :class:`StructureTask` and the presets of
``recipes/structure/``."""
