"""The core demo: dataset distillation on the moons data (Medvedev & D'yakonov 2020), small.

``MoonsDistillation`` is the seed paper's bilevel problem as a :class:`metaopt.MetaObjective`:
synthetic points per inner step and one learnable learning rate per inner step, ``restarts``
independent distillations of ``members`` models each as one ensemble. ``metaopt demo`` checks the
hypergradient of every method on :func:`demo_problem` against finite differences
(:func:`metaopt.hypergrad.check`), then :func:`distil` runs a few outer steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import hypergrad as hg
from . import optim
from .data import moons_split
from .ensemble import Ensemble
from .hypergrad import hypergradient, train
from .models import MLP
from .objective import MetaObjective
from .optim import schedule


def bce(pred: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none")


class MoonsDistillation(MetaObjective):
    """Distil the moons training set into ``steps_per_epoch`` batches of ``2 * per_class`` points.

    Hyperparameters (see :meth:`init_hyper`): ``x [restarts, steps_per_epoch, 2 * per_class, 2]``
    (labels fixed: ``per_class`` zeros then ones) and ``lr [n, restarts]`` (softplus-positive), one
    rate per inner step. Inner step ``k`` trains every member on its restart's ``x[:, k % s]``; the
    outer loss is the members' mean BCE on a real batch of ``batch`` training points (all of them if
    ``batch`` is ``None``). Written with :func:`schedule.at_step`, so it runs with ``compile=True``.
    """

    def __init__(
        self,
        sizes: list[int],
        restarts: int = 1,
        members: int = 3,
        steps_per_epoch: int = 40,
        per_class: int = 4,
        batch: int | None = 64,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        Xtr, Xte, ytr, yte = moons_split()
        self.X, self.Y = torch.tensor(Xtr, dtype=dtype), torch.tensor(ytr, dtype=dtype).unsqueeze(1)
        self.X_test, self.Y_test = torch.tensor(Xte, dtype=dtype), torch.tensor(yte, dtype=dtype).unsqueeze(1)
        self.restarts, self.per_restart, self.s, self.per_class = restarts, members, steps_per_epoch, per_class
        self.batch, self.dtype = batch, dtype
        self.ens = Ensemble(MLP(sizes), restarts * members, init="xavier")
        y = torch.tensor([0.0] * per_class + [1.0] * per_class, dtype=dtype).unsqueeze(1)
        self.y_syn = y.expand(restarts * members, -1, -1)

    def init_hyper(self, steps: int, generator: torch.Generator, lr: float = 0.02) -> dict[str, Tensor]:
        x = torch.randn(self.restarts, self.s, 2 * self.per_class, 2, generator=generator, dtype=self.dtype)
        raw = schedule.inverse_positive(torch.full((steps, self.restarts), lr, dtype=self.dtype), "softplus")
        return {"x": x, "lr": raw}

    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        return self.ens.init_params(generator, dtype=self.dtype)

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: Any, batch: Any) -> Tensor:
        x = schedule.at_step(hyper["x"], k % self.s, dim=1).repeat_interleave(self.per_restart, 0)
        return self.ens.losses(params, x, self.y_syn, bce, per_member=True).sum()

    def outer_batch(self, generator: torch.Generator) -> Tensor | None:
        if self.batch is None:
            return None
        return torch.randperm(self.X.shape[0], generator=generator)[: self.batch]

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        X, Y = (self.X, self.Y) if batch is None else (self.X[batch], self.Y[batch])
        return self.ens.losses(params, X, Y, bce).mean()

    def hparams(self, hyper: Mapping[str, Tensor]) -> dict[str, Any]:
        per = self.per_restart
        return {"lr": lambda k: F.softplus(schedule.at_step(hyper["lr"], k)).repeat_interleave(per)}

    def test_accuracy(self, params: Mapping[str, Tensor]) -> Tensor:
        """Per-member accuracy ``[m]`` on the 495 test points."""
        pred = self.ens(params, self.X_test) > 0
        return (pred == (self.Y_test > 0.5)).to(self.dtype).mean((1, 2))


DEMO_STEPS_PER_EPOCH, DEMO_EPOCHS = 10, 4


def demo_problem(seed: int = 0) -> tuple[MoonsDistillation, Any, dict[str, Tensor], int]:
    """The demo's problem: 2-layer MLP x 3 members, 40 SGD steps, full batch, float64."""
    n = DEMO_STEPS_PER_EPOCH * DEMO_EPOCHS
    obj = MoonsDistillation([2, 10, 1], steps_per_epoch=DEMO_STEPS_PER_EPOCH, batch=None, dtype=torch.float64)
    return obj, optim.sgd(), obj.init_hyper(n, torch.Generator().manual_seed(seed), lr=0.3), n


def demo_methods(n: int) -> dict[str, Any]:
    return {
        "full unroll": hg.Full(),
        f"checkpointed c={hg.Checkpointed().interval(n)}": hg.Checkpointed(),
        f"truncated K={n}": hg.Truncated(n),
        "truncated K=10": hg.Truncated(10),
        "forward mode": hg.Forward(),
    }


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
        res = hypergradient(obj, opt, hyper, n, "checkpointed", generator=gen)
        hyper, state = meta.update(res.grads, state, hyper, step=t)
    return before, accuracy(hyper)
