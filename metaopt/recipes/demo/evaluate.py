"""Judging the demo's hyperparameters: test accuracy of fresh models trained on the distilled points."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ... import optim
from ...hypergrad import hypergradient, train
from ...optim.base import Optimizer
from .objective import MoonsDistillation, demo_problem

__all__ = ["distil", "fresh_models"]


def fresh_models(objective: MoonsDistillation, optimizer: Optimizer, hyper: Mapping[str, Tensor], steps: int,
                 inits: int, generator: torch.Generator) -> dict[str, float]:
    """``inits`` fresh ensembles trained on the distilled data: their mean test accuracy and loss on
    the full training set (``test_accuracy``, ``train_loss``)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    accs, losses = [], []
    for _ in range(inits):
        params = train(objective, optimizer, hyper, steps, gen)
        accs.append(objective.test_accuracy(params).mean())
        losses.append(objective.outer_loss(params, hyper, None))
    return {"test_accuracy": float(torch.stack(accs).mean()), "train_loss": float(torch.stack(losses).mean())}


def distil(outer_steps: int = 30, seed: int = 0) -> tuple[float, float]:
    """Distil the demo problem for ``outer_steps`` Adam steps (as in the paper); returns the test
    accuracy of fresh models trained on the synthetic points before and after."""
    obj, opt, hyper, n = demo_problem(seed)
    meta = optim.adam(lr=0.01)
    state = meta.init(hyper)
    gen = torch.Generator().manual_seed(seed + 2)

    def accuracy(h: Mapping[str, Tensor]) -> float:
        return float(obj.test_accuracy(train(obj, opt, h, n, torch.Generator().manual_seed(seed + 1))).mean())

    before = accuracy(hyper)
    for t in range(outer_steps):
        res = hypergradient(obj, opt, hyper, n, method="checkpointed", generator=gen)
        hyper, state = meta.update(res.grads, state, hyper, step=t)
    return before, accuracy(hyper)
