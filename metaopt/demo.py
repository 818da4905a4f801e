"""The core demo: dataset distillation on the moons data (Medvedev & D'yakonov 2020), small.

``MoonsDistillation`` is the seed paper's bilevel problem as a :class:`metaopt.MetaObjective`:
synthetic points per inner step and one learnable learning rate per inner step, ``restarts``
independent distillations of ``members`` models each as one ensemble. :func:`main` prints the
hypergradient of every method against central finite differences, then distils for a few outer steps.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import hypergrad as hg
from . import optim
from .data import moons_split
from .ensemble import Ensemble
from .hypergrad import hypergradient
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


def main(outer_steps: int = 30, seed: int = 0) -> None:
    """Print the hypergradient table, then distil for ``outer_steps`` steps (2-layer MLP, m = 3)."""
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(1)
    console = Console()
    s, epochs = 10, 4
    n = s * epochs
    obj = MoonsDistillation([2, 10, 1], steps_per_epoch=s, batch=None, dtype=torch.float64)
    hyper = obj.init_hyper(n, torch.Generator().manual_seed(seed), lr=0.3)
    opt = optim.sgd()

    def run(h: Mapping[str, Tensor], method: Any) -> hg.HypergradResult:
        return hypergradient(obj, opt, h, n, method, generator=torch.Generator().manual_seed(seed + 1))

    v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(7), dtype=t.dtype) for k, t in hyper.items()}
    eps = 1e-5
    t0 = time.perf_counter()
    fd = (run({k: hyper[k] + eps * v[k] for k in hyper}, "full").loss
          - run({k: hyper[k] - eps * v[k] for k in hyper}, "full").loss) / (2 * eps)
    fd_seconds = time.perf_counter() - t0
    methods = {
        "full unroll": hg.Full(),
        f"checkpointed c={hg.Checkpointed().interval(n)}": hg.Checkpointed(),
        f"truncated K={n}": hg.Truncated(n),
        "truncated K=10": hg.Truncated(10),
        "forward mode": hg.Forward(),
    }
    table = Table(title=f"dF/dh, moons distillation: 2-layer MLP x 3, n = {n} SGD steps, float64")
    for col in ("method", "rel. err. vs FD", "cos to full", "seconds", "stored"):
        table.add_column(col, justify="left" if col == "method" else "right")
    full = None
    for name, method in methods.items():
        res = run(hyper, method)
        flat = torch.cat([g.reshape(-1) for g in res.grads.values()])
        full = flat if full is None else full
        directional = sum((res.grads[k] * v[k]).sum() for k in hyper)
        rel = float((directional - fd).abs() / fd.abs())
        cos = float(F.cosine_similarity(flat, full, dim=0))
        table.add_row(name, f"{rel:.1e}", f"{cos:.6f}", f"{res.seconds:.3f}", f"{res.peak_bytes / 1024:.0f} KiB")
    table.add_row("central FD (1 dir.)", "-", "-", f"{fd_seconds:.3f}", "-")
    console.print(table)

    # a short distillation: Adam on the synthetic points and rates, as in the paper
    meta = optim.adam(lr=0.01)
    state = meta.init(hyper)
    gen = torch.Generator().manual_seed(seed + 2)
    before = obj.test_accuracy(run(hyper, "full").params).mean()
    for t in range(outer_steps):
        res = hypergradient(obj, opt, hyper, n, "checkpointed", generator=gen)
        hyper, state = meta.update(res.grads, state, hyper, step=t)
    after = hypergradient(obj, opt, hyper, n, "full", generator=torch.Generator().manual_seed(seed + 1))
    acc = obj.test_accuracy(after.params).mean()
    console.print(
        f"distilled {outer_steps} outer steps: 80 synthetic points, {n} inner steps; test accuracy of fresh "
        f"models trained on them: {float(before):.3f} -> [bold]{float(acc):.3f}[/bold]"
    )
