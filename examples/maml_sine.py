"""MAML on few-shot sine regression (Finn et al. 2017, section 5.1) as a :class:`metaopt.MetaObjective`.

A task is ``y = A sin(x + phase)`` with ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]`` and inputs
``x ~ U[-5, 5]``. A learner gets ``K`` support points of a new task, takes a few SGD steps from a
shared initialisation ``theta`` and is scored on query points of the same task. MAML learns
``theta`` so that those few steps go far. As a bilevel problem:

* hyper ``h`` = ``theta``, the initial weights of a 1-40-40-1 ReLU network;
* inner = the adaptation steps on every task's support set, all tasks of a meta-batch at once as
  the members of one vmapped :class:`metaopt.Ensemble`;
* outer ``F`` = the mean query MSE after adaptation.

The tutorial ``docs/tutorials/maml.md`` meta-trains it; ``docs/tutorials/check.md`` checks its
hypergradient against finite differences, from the repository root::

    python -m metaopt check --objective examples.maml_sine:check_problem
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import metaopt
from metaopt import optim


class SineTasks(NamedTuple):
    """A batch of ``n`` sine tasks: support ``xs, ys [n, K, 1]`` and query ``xq, yq [n, Q, 1]``."""

    xs: Tensor
    ys: Tensor
    xq: Tensor
    yq: Tensor


def sine_tasks(
    n: int,
    k_support: int = 10,
    k_query: int = 10,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> SineTasks:
    """Draw ``n`` tasks from Finn et al.'s distribution, with ``k_support`` support and ``k_query``
    query points each (inputs drawn independently, uniformly in [-5, 5])."""
    dtype = dtype or torch.get_default_dtype()

    def uniform(shape: tuple[int, ...], low: float, high: float) -> Tensor:
        return torch.empty(shape, dtype=dtype).uniform_(low, high, generator=generator)

    amplitude, phase = uniform((n, 1, 1), 0.1, 5.0), uniform((n, 1, 1), 0.0, math.pi)
    xs, xq = uniform((n, k_support, 1), -5.0, 5.0), uniform((n, k_query, 1), -5.0, 5.0)
    return SineTasks(xs, amplitude * torch.sin(xs + phase), xq, amplitude * torch.sin(xq + phase))


def regressor(dtype: torch.dtype | None = None) -> nn.Module:
    """Finn et al.'s network: 1 -> 40 -> 40 -> 1 with ReLUs. A plain ``nn.Module`` (no batched fast
    path), so the ensemble runs it through ``vmap(functional_call)``."""
    return nn.Sequential(nn.Linear(1, 40, dtype=dtype), nn.ReLU(), nn.Linear(40, 40, dtype=dtype), nn.ReLU(),
                         nn.Linear(40, 1, dtype=dtype))


def squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample squared error, written out: forward mode's ``jvp`` of ``grad`` fails through
    ``F.mse_loss`` (pytorch#123996)."""
    return (pred - target) ** 2


# --8<-- [start:objective]
class SineMAML(metaopt.MetaObjective):
    """MAML's meta-objective on one batch of tasks: ``hyper`` is the initialisation ``theta``
    (``{name: tensor}`` of one network), and task ``i`` is ensemble member ``i``."""

    def __init__(self, tasks: SineTasks, model: nn.Module | None = None) -> None:
        self.tasks = tasks
        self.ensemble = metaopt.Ensemble(model if model is not None else regressor(), members=len(tasks.xs))

    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        # every task starts from theta: [shape] -> [tasks, shape], differentiable in theta
        return {name: hyper[name].expand(self.ensemble.members, *shape) for name, shape in self.ensemble.shapes.items()}

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: int, batch: Any) -> Tensor:
        # the sum over tasks, so that each task's gradient is its own; support MSE per task
        t = self.tasks
        return self.ensemble.losses(params, t.xs, t.ys, squared_error, per_member=True).sum()

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        return self.query_mse(params).mean()

    def query_mse(self, params: Mapping[str, Tensor]) -> Tensor:
        """``[tasks]``: each adapted learner's mean squared error on its task's query points."""
        t = self.tasks
        return self.ensemble.losses(params, t.xq, t.yq, squared_error, per_member=True)
# --8<-- [end:objective]


def initial_theta(seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """A starting ``theta``: PyTorch's default initialisation of :func:`regressor` under ``seed``
    (drawn in float32 whatever the default dtype, so every dtype starts from the same values)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = regressor(torch.float32)
    return {name: p.detach().to(dtype or torch.get_default_dtype()) for name, p in model.named_parameters()}


# --8<-- [start:check]
def check_problem() -> tuple[SineMAML, Any, dict[str, Tensor], int]:
    """``(objective, optimizer, hyper, steps)`` for ``metaopt check``: 4 tasks, 5 SGD adaptation
    steps at lr 0.01, float64 (finite differences need it)."""
    tasks = sine_tasks(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return SineMAML(tasks), optim.sgd(lr=0.01), initial_theta(0, torch.float64), 5
# --8<-- [end:check]
