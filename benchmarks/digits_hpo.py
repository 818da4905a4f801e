"""The benchmarks' HPO workload: a model ensemble on scikit-learn's bundled 8x8 digits, trained for
``steps`` momentum-SGD steps on minibatches, hypergradient w.r.t. one learning rate per step
(softplus) and one weight decay per parameter tensor (softplus; coupled, ``g + wd * w``, i.e. an L2
penalty per layer's weight and bias). Outer loss: the members' mean validation cross-entropy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metaopt
from metaopt.models import MLP
from metaopt.optim import schedule


class DigitsSchedule(metaopt.MetaObjective):
    """``members`` copies of ``module`` (default: the MLP 64-256-256-10) on digits (pixels / 16, a
    random 1200 / 597 train / validation split), Kaiming-uniform inits, ``batch`` training points per
    inner step. Hyperparameters (:func:`hyper_for`): ``lr [steps]`` and ``{param name: [1]}``."""

    def __init__(self, steps: int, batch: int = 64, module: nn.Module | None = None, members: int = 1,
                 device: torch.device | str = "cpu") -> None:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = torch.tensor(X / 16.0, dtype=torch.get_default_dtype(), device=device)
        y = torch.tensor(y, device=device)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(device)
        self.Xtr, self.ytr = X[perm[:1200]], y[perm[:1200]]
        self.Xva, self.yva = X[perm[1200:]], y[perm[1200:]]
        self.ens = metaopt.Ensemble(module if module is not None else MLP([64, 256, 256, 10]), members,
                                    init="kaiming")
        self.steps, self.batch, self.device = steps, batch, torch.device(device)

    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in self.ens.init_params(generator).items()}

    def inner_batch(self, k: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, len(self.ytr), (self.batch,), generator=generator).to(self.device)

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: Any, batch: Tensor) -> Tensor:
        return self.ens.losses(params, self.Xtr[batch], self.ytr[batch], cross_entropy).sum()

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        return self.ens.losses(params, self.Xva, self.yva, cross_entropy).mean()

    def hparams(self, hyper: Mapping[str, Tensor]) -> dict[str, Any]:
        return {
            "lr": schedule.table(hyper["lr"], positive="softplus"),
            "weight_decay": {k: F.softplus(v) for k, v in hyper.items() if k != "lr"},
        }


def cross_entropy(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy of logits ``pred [B, classes]`` and class indices ``target [B]``."""
    return F.cross_entropy(pred, target, reduction="none")


def hyper_for(obj: DigitsSchedule, lr: float = 0.01, weight_decay: float = 1e-4) -> dict[str, Tensor]:
    """Every step's rate ``lr`` and every parameter tensor's decay ``weight_decay`` (raw, softplus^-1)."""
    h = {"lr": schedule.inverse_positive(torch.full((obj.steps,), lr), "softplus").to(obj.device)}
    for name in obj.ens.shapes:
        h[name] = schedule.inverse_positive(torch.tensor(weight_decay), "softplus").reshape(1).to(obj.device)
    return h
