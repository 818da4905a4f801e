"""Judging distilled data: train fresh models on it and measure them on the test set.

Everything one table needs runs as *one* batched inner run per call: every (strategy, distillation,
initialisation) triple is an ensemble member, and every test architecture a group of a
:class:`metaopt.MultiEnsemble`. A strategy is just a per-member learning-rate table; the ``raw``
strategy's rates are zero after the distilled ``n`` steps, so its models stop there.

Strategies (Medvedev & D'yakonov 2020, §5.3), each ``epochs`` epochs of ``s`` steps long:

* ``raw``: the learned schedule as distilled (``n = s * e`` steps);
* ``strategy1``: the learned rates ignored; per-epoch rate ``0.3 * 1.1**e`` for 10 epochs, then ``x 0.95``;
* ``strategy2``: all distilled epochs repeated, the r-th repetition scaled by ``gamma**r``;
* ``strategy3``: the last distilled epoch repeated, compounding ``gamma``;
* ``shuffled``: the synthetic points as a plain dataset: shuffled minibatches of ``P``, a plain
  optimizer (Adam), no learned rates: how much of the data's value lives in its order and rates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ... import optim
from ...ensemble import Ensemble, MultiEnsemble
from ...hypergrad import train
from ...objective import MetaObjective
from ...optim import schedule
from .data import Dataset
from .objective import correct, hard_targets, loss_fn

if TYPE_CHECKING:
    from .task import DistillTask

STRATEGIES = ("raw", "strategy1", "strategy2", "strategy3", "shuffled")


@dataclass
class Strategies:
    """How to train longer than the distilled schedule (defaults: the paper's)."""

    epochs: int = 50  # total epochs of every train-longer strategy
    gamma: float = 0.98  # strategies 2 and 3 (the paper; its public code used 0.9)
    ramp_init: float = 0.3  # strategy 1
    ramp_up: float = 1.1
    ramp_up_epochs: int = 10
    ramp_down: float = 0.95
    shuffled_lr: float = 0.01  # Adam's learning rate for the shuffled-order evaluation


def rate_tables(rates: Tensor, s: int, strategies: list[str], cfg: Strategies) -> dict[str, Tensor]:
    """``{strategy: [cfg.epochs * s, D]}`` learning-rate tables from the learned ``rates [n, D]``."""
    n, D = rates.shape
    T = cfg.epochs * s
    if n > T or cfg.epochs % (n // s):
        raise ValueError(
            f"eval.epochs = {cfg.epochs} must be a multiple of the {n // s} distilled epochs (strategy 2 repeats them)"
        )
    out = {}
    for name in strategies:
        if name == "raw":
            out[name] = torch.cat([rates, rates.new_zeros(T - n, D)])
        elif name == "strategy1":
            ramp = schedule.ramp_epochs(s, cfg.epochs, cfg.ramp_init, cfg.ramp_up, cfg.ramp_up_epochs, cfg.ramp_down)
            out[name] = ramp.to(rates).unsqueeze(1).expand(T, D)
        elif name == "strategy2":
            out[name] = schedule.repeat_epochs(rates, s, cfg.epochs // (n // s), cfg.gamma)
        elif name == "strategy3":
            extra = cfg.epochs - n // s
            out[name] = schedule.repeat_last_epoch(rates, s, extra, cfg.gamma) if extra else rates
        else:
            raise ValueError(f"unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}")
    return out


class Replay(MetaObjective):
    """Train ``B`` runs of every architecture in ``models`` on per-run data pools, nothing learned.

    ``pool_x [B or 1, N, d]`` and ``pool_y`` (targets) hold each run's points; step ``k`` uses
    block ``k % (N // P)`` of ``P`` points in order (``order="cycle"``, as distilled data is meant
    to be used) or a per-epoch shuffled minibatch (``order="shuffle"``). ``rates [T, B]`` (or
    ``None`` for the optimizer's own rate) is the per-step, per-run learning rate. ``params0``
    optionally fixes the initialisations (``{key: [B, ...]}`` per group key).
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        runs: int,
        pool_x: Tensor,
        pool_y: Tensor,
        P: int,
        rates: Tensor | None = None,
        order: str = "cycle",
        init_scheme: str = "xavier",
        params0: Callable[[dict[str, Tensor], torch.Generator], dict[str, Tensor]] | None = None,
    ) -> None:
        self.ens = MultiEnsemble({a: Ensemble(m, runs, init=init_scheme) for a, m in models.items()})
        self.runs, self.P, self.order, self.rates, self.params0 = runs, P, order, rates, params0
        self.pool_x, self.pool_y = pool_x, pool_y
        self.blocks = pool_x.shape[1] // P
        self.G = len(models)
        self._perm: Tensor | None = None

    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        x = self.pool_x
        params = {k: v.to(x.device) for k, v in self.ens.init_params(generator, dtype=x.dtype).items()}
        return self.params0(params, generator) if self.params0 is not None else params

    def inner_batch(self, k: int, generator: torch.Generator) -> Tensor | None:
        if self.order == "cycle":
            return None
        j = k % self.blocks
        if j == 0:
            self._perm = torch.rand(self.pool_x.shape[0], self.pool_x.shape[1], generator=generator).argsort(1)
        return self._perm[:, j * self.P:(j + 1) * self.P].to(self.pool_x.device)

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: Any, batch: Any) -> Tensor:
        if batch is None:
            j = k % self.blocks
            x = self.pool_x[:, j * self.P:(j + 1) * self.P]
            y = self.pool_y[:, j * self.P:(j + 1) * self.P]
        else:
            x = torch.gather(self.pool_x, 1, batch.unsqueeze(-1).expand(-1, -1, self.pool_x.shape[-1]))
            y = self.pool_y[torch.arange(batch.shape[0], device=batch.device).unsqueeze(1), batch]
        x, y = x.expand(self.runs, *x.shape[1:]), y.expand(self.runs, *y.shape[1:])
        x, y = torch.cat([x] * self.G), torch.cat([y] * self.G)
        losses = self.ens.losses(params, x, y, loss_fn, per_member=True)
        return torch.stack([v.sum() for v in losses.values()]).sum()

    def hparams(self, hyper: Mapping[str, Tensor]) -> dict[str, Any]:
        if self.rates is None:
            return {}
        rates = self.rates
        return {"lr": lambda k: schedule.at_step(rates, k)}

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        raise NotImplementedError("Replay only trains (metaopt.hypergrad.train); it has no outer loss")


@dataclass
class Curves:
    """Per architecture: test accuracy and log-loss ``[epochs + 1, B]`` and the final params."""

    accuracy: dict[str, Tensor]
    logloss: dict[str, Tensor]
    params: dict[str, dict[str, Tensor]]


def fit(
    replay: Replay, optimizer: optim.Optimizer, steps: int, every: int, data: Dataset, generator: torch.Generator,
    compile: bool = False,
) -> Curves:
    """Run ``replay`` for ``steps`` steps, measuring every run on ``data``'s test set every ``every`` steps."""
    acc: dict[str, list[Tensor]] = {a: [] for a in replay.ens.groups}
    ll: dict[str, list[Tensor]] = {a: [] for a in replay.ens.groups}
    target = hard_targets(data.y_test, data.outputs, data.X_test.dtype)

    def record(k: int, params: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for a, p in replay.ens.split(params).items():
                pred = replay.ens.groups[a](p, data.X_test)
                acc[a].append(correct(pred, data.y_test).to(pred.dtype).mean(1))
                B, N = pred.shape[:2]
                ll[a].append(loss_fn(pred.reshape(B * N, -1), target.repeat(B, *[1] * (target.dim() - 1)))
                             .reshape(B, N).mean(1))

    params = train(replay, optimizer, {"_": torch.zeros(1, dtype=data.X.dtype)}, steps, generator,
                   every=every, callback=record, compile=compile)
    return Curves({a: torch.stack(v) for a, v in acc.items()}, {a: torch.stack(v) for a, v in ll.items()},
                  replay.ens.split(params))


@dataclass
class Table:
    """Final test accuracies ``acc[strategy][arch]: [D, I]`` with the curves averaged per distillation
    (``[epochs + 1, D]``), and the final params of every run (for decision-boundary figures)."""

    acc: dict[str, dict[str, Tensor]]
    curve_acc: dict[str, dict[str, Tensor]]
    curve_loss: dict[str, dict[str, Tensor]]
    params: dict[str, dict[str, dict[str, Tensor]]]  # strategy -> arch -> {name: [D * I, ...]}


def _split(curves: Curves, names: list[str], D: int, inits: int, into: Table) -> None:
    """Curves of ``len(names) * D * inits`` runs (strategy-major) into per-strategy entries of ``into``."""
    S = len(names)
    for a, acc in curves.accuracy.items():
        E1 = acc.shape[0]
        acc_r = acc.reshape(E1, S, D, inits)
        ll_r = curves.logloss[a].reshape(E1, S, D, inits)
        for i, name in enumerate(names):
            into.acc.setdefault(name, {})[a] = acc_r[-1, i]
            into.curve_acc.setdefault(name, {})[a] = acc_r[:, i].mean(-1)
            into.curve_loss.setdefault(name, {})[a] = ll_r[:, i].mean(-1)
            into.params.setdefault(name, {})[a] = {
                k: v.reshape(S, D * inits, *v.shape[1:])[i] for k, v in curves.params[a].items()
            }


def evaluate(
    x: Tensor,
    y: Tensor,
    rates: Tensor,
    data: Dataset,
    models: Mapping[str, nn.Module],
    inits: int,
    strategies: list[str],
    cfg: Strategies,
    generator: torch.Generator,
    params0: Callable[[dict[str, Tensor], torch.Generator], dict[str, Tensor]] | None = None,
    compile: bool = False,
    init_scheme: str = "xavier",
) -> Table:
    """Train ``inits`` fresh models of every architecture on each of ``D`` distilled datasets under
    every strategy. ``x [D, s, P, d]``, ``y [D, s, P, ...]`` targets, ``rates [n, D]``."""
    D, s, P = x.shape[:3]
    pool_x, pool_y = x.reshape(D, s * P, *x.shape[3:]), y.reshape(D, s * P, *y.shape[3:])
    table = Table({}, {}, {}, {})
    T = cfg.epochs * s
    tables = rate_tables(rates, s, [name for name in strategies if name != "shuffled"], cfg)
    runs: list[tuple[list[str], int]] = [(["raw"], rates.shape[0])] if "raw" in tables else []
    longer = [name for name in tables if name != "raw"]
    runs += [(longer, T)] if longer else []
    for names, steps in runs:  # the raw schedule alone (n steps), then the train-longer ones together
        per_run = torch.cat([tables[name][:steps].repeat_interleave(inits, 1) for name in names], 1)  # [steps, B]
        reps = len(names)
        replay = Replay(models, reps * D * inits, pool_x.repeat_interleave(inits, 0).repeat(reps, 1, 1),
                        pool_y.repeat_interleave(inits, 0).repeat(reps, *[1] * (pool_y.dim() - 1)),
                        P, per_run, "cycle", init_scheme, params0)
        _split(fit(replay, optim.sgd(), steps, s, data, generator, compile), names, D, inits, table)
    if "shuffled" in strategies:
        replay = Replay(models, D * inits, pool_x.repeat_interleave(inits, 0), pool_y.repeat_interleave(inits, 0),
                        P, None, "shuffle", init_scheme, params0)
        _split(fit(replay, optim.adam(lr=cfg.shuffled_lr), T, s, data, generator, compile),
               ["shuffled"], D, inits, table)
    return table


def full_data(data: Dataset, models: Mapping[str, nn.Module], inits: int, epochs: int, batch: int, lr: float,
              generator: torch.Generator, compile: bool = False, optimizer: str = "adam",
              init_scheme: str = "xavier") -> Curves:
    """The baseline: ``inits`` fresh models per architecture trained on the whole training set with
    ``optimizer`` (``"adam"`` or ``"sgd"``) at rate ``lr``, shuffled minibatches of ``batch`` (the
    last partial batch of an epoch dropped)."""
    target = hard_targets(data.y, data.outputs, data.X.dtype)
    steps_per_epoch = data.X.shape[0] // batch
    replay = Replay(models, inits, data.X.unsqueeze(0), target.unsqueeze(0), batch, None, "shuffle", init_scheme)
    opt = optim.adam(lr=lr) if optimizer == "adam" else optim.sgd(lr=lr)
    return fit(replay, opt, epochs * steps_per_epoch, steps_per_epoch, data, generator, compile)


def random_real(data: Dataset, models: Mapping[str, nn.Module], runs: int, s: int, per_class: int, epochs: int,
                lrs: list[float], generator: torch.Generator, compile: bool = False,
                init_scheme: str = "xavier") -> dict[str, dict[float, Tensor]]:
    """Random real points in place of distilled ones, at the same step budget (``s`` steps of
    ``per_class`` points per class, ``epochs`` epochs) with a constant rate from ``lrs``:
    ``{arch: {lr: final test accuracy [runs]}}``."""
    from .data import class_balanced

    P = data.classes * per_class
    pool = []
    for _ in range(runs):  # each run: s class-balanced blocks of P real points
        blocks = [class_balanced(data.y, per_class, data.classes, generator) for _ in range(s)]
        pool.append(torch.cat(blocks))
    idx = torch.stack(pool).repeat(len(lrs), 1).to(data.X.device)  # [L * runs, s * P]
    target = hard_targets(data.y, data.outputs, data.X.dtype)
    rates = torch.tensor(lrs, dtype=data.X.dtype, device=data.X.device).repeat_interleave(runs)
    replay = Replay(models, len(lrs) * runs, data.X[idx], target[idx], P, rates.expand(s * epochs, -1),
                    init_scheme=init_scheme)
    curves = fit(replay, optim.sgd(), s * epochs, s * epochs, data, generator, compile)
    return {a: dict(zip(lrs, acc[-1].reshape(len(lrs), runs))) for a, acc in curves.accuracy.items()}


# -- the task's judging: quick checks during distillation and the parts of the final protocol ---------


def fixed_init(task: DistillTask, inits: int) -> Any:
    """Fixed-init mode: every run starts from its distillation's fixed init of that architecture
    (when its row trained one); other cells start fresh."""
    obj = task.objective
    if obj.init != "fixed":
        return None
    fixed = obj.init_params({}, torch.Generator())
    first = {}
    for a, owner in obj.owner.items():
        idx = torch.full((obj.D,), -1, dtype=torch.long)
        for j in reversed(range(owner.numel())):
            idx[int(owner[j])] = j
        first[a] = idx

    def params0(params: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        out = dict(params)
        for key, v in params.items():
            a, _, name = key.partition(".")
            if a not in first:
                continue
            d_of_run = (torch.arange(v.shape[0]) // inits) % obj.D
            src = first[a][d_of_run]
            has = src >= 0
            v, has, src = v.clone(), has.to(v.device), src.to(v.device)
            v[has] = fixed[f"{a}.{name}"][src[has]].to(v)
            out[key] = v
        return out

    return params0


def distilled_table(task: DistillTask, hyper: Mapping[str, Tensor], generator: torch.Generator, inits: int,
                    strategies: list[str], cfg: Strategies, models: Mapping[str, Any]) -> Table:
    """The task's distilled data (all rows and restarts) judged by :func:`evaluate`: ``inits`` fresh
    models of every architecture in ``models`` under each of ``strategies``."""
    obj = task.objective
    with torch.no_grad():
        x, y, rates = hyper["x"].detach(), obj.targets(hyper).detach(), obj.rates(hyper).detach()
    return evaluate(x, y, rates, obj.data, models, inits, strategies, cfg, generator, fixed_init(task, inits),
                    init_scheme=task.cfg.distill.init_scheme)


def quick(task: DistillTask, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
    """Quick check during distillation: raw steps, each row's own architectures, a few inits."""
    obj = task.objective
    cfg = Strategies(epochs=obj.epochs)
    table = distilled_table(task, hyper, generator, task.cfg.eval.quick_inits, ["raw"], cfg, task.models)
    out = {}
    for i, (row, archs) in enumerate(obj.rows.items()):
        sl = slice(i * obj.restarts, (i + 1) * obj.restarts)
        own = sorted(set(archs))
        out[f"acc/{row}"] = float(torch.stack([table.acc["raw"][a][sl].mean() for a in own]).mean())
    out["test_accuracy"] = sum(out.values()) / len(out)
    return out


def part(task: DistillTask, job: tuple[int, str, Any], hyper: Mapping[str, Tensor], seed: int) -> tuple[Any, float]:
    """One part of the report with a generator of its own (``seed + its index``), so its result
    does not depend on which rank runs it or on the others."""
    i, kind, arg = job
    e, obj = task.cfg.eval, task.objective
    generator = torch.Generator().manual_seed(seed + i)
    t0 = time.perf_counter()
    if kind == "table":
        out: Any = distilled_table(task, hyper, generator, e.inits, arg, task.strategies, task.models)
    elif kind == "full_data":
        out = full_data(obj.data, task.models, e.baseline_inits, e.baseline_epochs, e.baseline_batch,
                        e.baseline_lr, generator, optimizer=arg, init_scheme=task.cfg.distill.init_scheme)
    else:
        out = random_real(obj.data, task.models, e.random_real_runs, obj.s, obj.per_class, obj.epochs,
                          list(e.random_real_lrs), generator, init_scheme=task.cfg.distill.init_scheme)
    return out, time.perf_counter() - t0
