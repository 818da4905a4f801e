"""The demo's bilevel problem: dataset distillation on the moons data (Medvedev & D'yakonov 2020), small.

``MoonsDistillation`` is the seed paper's bilevel problem as a :class:`metaopt.MetaObjective`:
synthetic points per inner step and one learnable learning rate per inner step, ``restarts``
independent distillations of ``members`` models each as one ensemble. ``metaopt demo`` checks the
hypergradient of every method of :func:`demo_methods` on :func:`demo_problem` against finite
differences (:func:`metaopt.hypergrad.check`), then :func:`~metaopt.recipes.demo.distil` runs a few
outer steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ... import hypergrad as hg
from ... import optim
from ...models import MLP
from ..distill.data import moons
from ..distill.objective import Distillation

__all__ = ["DEMO_EPOCHS", "DEMO_STEPS_PER_EPOCH", "MoonsDistillation", "demo_methods", "demo_problem"]


class MoonsDistillation(Distillation):
    """The seed paper's moons distillation for one architecture: the core demo's problem and the
    benchmarks' workload, as a special case of the recipe's
    :class:`metaopt.recipes.distill.Distillation`.

    ``restarts`` distillations of ``members`` ``MLP(sizes)`` models each (one ensemble group,
    ``"mlp"``), ``steps_per_epoch * epochs`` inner steps on ``2 * per_class`` synthetic points each,
    one shared real batch of ``batch`` points per outer step (all of them if ``None``); ``hold``: only
    these members (one rank's share, see :class:`~metaopt.recipes.distill.Distillation`).
    Hyperparameters (:meth:`init_hyper`): ``x [restarts, steps_per_epoch, 2 * per_class, 2]`` and
    ``lr [n, restarts]`` (softplus-positive). Runs with ``compile=True``.
    """

    def __init__(
        self,
        sizes: list[int],
        restarts: int = 1,
        members: int = 3,
        steps_per_epoch: int = 40,
        epochs: int = 5,
        per_class: int = 4,
        batch: int | None = 64,
        dtype: torch.dtype = torch.float32,
        hold: list[int] | None = None,
    ) -> None:
        super().__init__(moons(), {"mlp": MLP(sizes)}, {"mlp": ["mlp"] * members}, restarts=restarts,
                         steps_per_epoch=steps_per_epoch, epochs=epochs, per_class=per_class, batch=batch,
                         shared_batch=True, dtype=dtype, hold=hold)


DEMO_STEPS_PER_EPOCH, DEMO_EPOCHS = 10, 4


def demo_problem(seed: int = 0) -> tuple[MoonsDistillation, Any, dict[str, Tensor], int]:
    """The demo's problem: 2-layer MLP x 3 members, 40 SGD steps, full batch, float64."""
    obj = MoonsDistillation([2, 10, 1], steps_per_epoch=DEMO_STEPS_PER_EPOCH, epochs=DEMO_EPOCHS, batch=None,
                            dtype=torch.float64)
    return obj, optim.sgd(), obj.init_hyper(torch.Generator().manual_seed(seed), lr=0.3), obj.steps


def demo_methods(n: int) -> dict[str, Any]:
    """The methods of the demo's table, by name, for ``n`` inner steps: full, checkpointed at
    ``ceil(sqrt(n))``, truncated to all ``n`` steps (= full) and to 10, forward."""
    return {
        "full unroll": hg.Full(),
        f"checkpointed c={hg.Checkpointed().interval(n)}": hg.Checkpointed(),
        f"truncated K={n}": hg.Truncated(n),
        "truncated K=10": hg.Truncated(10),
        "forward mode": hg.Forward(),
    }
