"""Small bilevel problems shared by the tests (float64)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.models import MLP
from metaopt.optim import schedule


def bce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none")


def data(seed: int = 0, n: int = 48, d: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [n, d]`` standard normal, ``y [n, 1]``: whether the first two features share a sign."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = ((x[:, 0] * x[:, 1]) > 0).to(torch.float64).unsqueeze(1)
    return x, y


class Distill(metaopt.MetaObjective):
    """Tiny dataset distillation: hyper = synthetic inputs per step ``x [s, 4, 2]`` and one raw
    learning rate per inner step (softplus), optionally per parameter / per member."""

    def __init__(self, ensemble: metaopt.Ensemble | metaopt.MultiEnsemble, lr_mode: str = "table") -> None:
        self.ens = ensemble
        self.lr_mode = lr_mode
        self.x_real, self.y_real = data(0)
        self.y_syn = torch.tensor([[0.0], [1.0], [0.0], [1.0]], dtype=torch.float64)

    def init_params(self, hyper, generator):
        return self.ens.init_params(generator, dtype=torch.float64)

    def _loss(self, params, x, y):
        if isinstance(self.ens, metaopt.MultiEnsemble):
            return self.ens.losses(params, x, y, bce)
        return {"": self.ens.losses(params, x, y, bce)}

    def inner_loss(self, params, hyper, k, batch):
        x = hyper["x"][k % hyper["x"].shape[0]]
        return sum(v.sum() for v in self._loss(params, x, self.y_syn).values())

    def outer_loss(self, params, hyper, batch):
        per_group = self._loss(params, self.x_real, self.y_real)
        return torch.stack([v.mean() for v in per_group.values()]).mean()

    def hparams(self, hyper):
        if self.lr_mode == "table":
            return {"lr": schedule.table(hyper["lr"], positive="softplus")}
        if self.lr_mode == "per_param":
            return {"lr": {name: F.softplus(v) for name, v in hyper.items() if name != "x"}}
        if self.lr_mode == "per_member":  # table [n, m]
            return {"lr": schedule.table(hyper["lr"], positive="softplus")}
        raise ValueError(self.lr_mode)


def distill_hyper(obj: Distill, steps: int, seed: int = 1, lr: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hyper = {"x": torch.randn(4, 4, 2, generator=g, dtype=torch.float64)}
    raw = schedule.inverse_positive(torch.tensor(lr, dtype=torch.float64), "softplus")
    if obj.lr_mode == "table":
        noise = torch.randn(steps, generator=g, dtype=torch.float64)
        hyper["lr"] = raw * torch.ones(steps, dtype=torch.float64) + 0.05 * noise
    elif obj.lr_mode == "per_member":
        m = obj.ens.members
        hyper["lr"] = raw + 0.05 * torch.randn(steps, m, generator=g, dtype=torch.float64)
    else:
        params = obj.ens.init_params(torch.Generator().manual_seed(0), dtype=torch.float64)
        for name, p in params.items():
            hyper[name] = raw + 0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64)
    return hyper


def mlp_ensemble(sizes=(2, 5, 1), m: int = 2, batched: bool = True, activation: str = "tanh") -> metaopt.Ensemble:
    """Smooth by default: central differences are only trustworthy away from ReLU kinks."""
    return metaopt.Ensemble(MLP(list(sizes), activation=activation), m, init="xavier", batched=batched)


SEAM_STEPS = 8  # inner steps of the seam tests (tests/test_randomness.py, tests/test_buffers.py)


def seam_hyper() -> dict[str, torch.Tensor]:
    """The seam tests' hyperparameters: a raw learning rate and a per-feature input scale ``[3]``."""
    return {"lr": torch.tensor(0.3, dtype=torch.float64), "scale": torch.tensor([1.0, 0.9, 1.1], dtype=torch.float64)}


def seam_run(obj: metaopt.MetaObjective, method: Any = "full", opt: Any = None, steps: int = SEAM_STEPS,
             **kw: Any) -> Any:
    """One seeded hypergradient of ``obj`` (momentum SGD unless ``opt``) at :func:`seam_hyper`."""
    opt = opt or optim.momentum(momentum=0.9)
    return metaopt.hypergradient(obj, opt, seam_hyper(), steps, method=method,
                                 generator=torch.Generator().manual_seed(0), **kw)


def flat_grads(res: Any) -> torch.Tensor:
    """A result's hypergradient as one flat vector."""
    return torch.cat([g.reshape(-1) for g in res.grads.values()])


def seam_exact_methods(steps: int = SEAM_STEPS) -> dict[str, Any]:
    """Fresh objects of the recomputing methods that must equal ``full`` exactly on a seam test:
    checkpointed, recursive, truncated and random truncation over all ``steps``, forward mode."""
    return {"checkpointed": hg.Checkpointed(3), "recursive": hg.Recursive(), "truncated": hg.Truncated(steps),
            "random_truncated": hg.RandomTruncated(steps), "forward": hg.Forward()}


def train_beside_torch(opt: Any, ref_opt: Any, model: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor,
                       y: torch.Tensor, steps: int, torch_clip: Any = None) -> dict[str, torch.Tensor]:
    """``steps`` of squared-error training of ``model``'s weights by the functional optimizer ``opt``
    beside ``ref`` (a copy of ``model``) trained by the torch.optim ``ref_opt`` (``torch_clip(ref)``
    between its backward and step); ``opt``'s final params, to compare with ``ref``'s."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = opt.init(params)
    for k in range(steps):
        p = {n: v.requires_grad_() for n, v in params.items()}
        loss = ((functional_call(model, p, (x,)) - y) ** 2).mean()
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        params, state = opt.update(grads, state, {n: v.detach() for n, v in p.items()}, step=k)
        ref_opt.zero_grad()
        ((ref(x) - y) ** 2).mean().backward()
        if torch_clip is not None:
            torch_clip(ref)
        ref_opt.step()
    return params
