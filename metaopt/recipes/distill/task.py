"""The ``distill`` recipe's task: build the batched distillation, judge it, tabulate and plot it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import optim
from ...run.config import ConfigError
from ...run.distributed import World, balance, block
from ...run.task import Task
from ..report import stats
from . import data as datasets
from . import evaluate as ev
from . import paper
from .archs import build
from .config import Config
from .objective import Distillation


def make_objective(cfg: Config, device: str | torch.device, hold: list[int] | None = None) -> Distillation:
    """The configured :class:`Distillation` (``hold``: only these members, one rank's share)."""
    d = cfg.distill
    data = datasets.load(d.dataset)
    models = {a: build(a, data) for a in d.archs}
    layout = {r: (list(d.archs) if r == "all" else [r] * d.members) for r in d.rows}
    return Distillation(
        data, models, layout, restarts=d.restarts, steps_per_epoch=d.steps_per_epoch, epochs=d.epochs,
        per_class=d.per_class, batch=d.batch or None, init=d.init, labels=d.labels, init_scheme=d.init_scheme,
        fixed_seed=cfg.seed + 7919, device=device, hold=hold,
    )


def shares(objective: Distillation, size: int) -> list[list[int]]:
    """Each rank's members (``hold`` indices) of ``objective``'s whole problem.

    A rank's time per outer step is mostly the kernels it dispatches, one set per architecture
    group whatever the group's size, so with at least as many architectures as ranks whole groups
    are dealt, balanced by their parameter tensors (a proxy for kernels per step): the paper
    protocol over 2 ranks gives {4-layer} and {1-layer, 2-layer}, the multi-architecture
    distillations' members going with their groups. With fewer architectures than ranks, the
    members, ordered by group, are cut into ``size`` contiguous blocks (each rank then holds one or
    a few groups' members, and every rank holds some)."""
    groups = objective.members_by_arch()
    archs = list(groups)
    if len(archs) >= size:
        cost = [len(objective.ens.groups[a].shapes) for a in archs]
        return [sorted(m for i in part for m in groups[archs[i]]) for part in balance(cost, size)]
    order = [m for a in archs for m in groups[a]]
    return [sorted(order[j] for j in block(len(order), k, size)) for k in range(size)]


class DistillTask(Task):
    """``rows x restarts`` distillations as one :class:`Distillation`, evaluated by the paper's protocol."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        d, self.cfg, self.device = cfg.distill, cfg, device
        self.objective = make_objective(cfg, device)
        self.data, self.models = self.objective.data, {a: build(a, self.objective.data) for a in d.archs}
        self.optimizer = optim.sgd()
        self.world = World()
        n_train = self.data.X.shape[0]
        if cfg.eval.baseline_batch > n_train:
            raise ConfigError(f"eval.baseline_batch = {cfg.eval.baseline_batch} exceeds the {n_train} training points")
        self.steps = self.objective.steps
        self.hyper = self.objective.init_hyper(torch.Generator().manual_seed(cfg.seed), lr=d.lr)
        self.method, self.compile = d.method, d.compile
        self.strategies = ev.Strategies(cfg.eval.epochs, cfg.eval.gamma, cfg.eval.ramp_init, cfg.eval.ramp_up,
                                        cfg.eval.ramp_up_epochs, cfg.eval.ramp_down, cfg.eval.shuffled_lr)
        self.table: ev.Table | None = None
        self.baselines: dict[str, ev.Curves] = {}
        self.baseline: ev.Curves | None = None  # the first of them, for figures

    # -- the outer step -------------------------------------------------------------------------

    def distribute(self, world: World) -> Distillation:
        """Ensemble-parallel: this rank's share trains its :func:`shares` of the members, its outer
        loss that share of the whole; the runner sums the shares' hypergradients."""
        M = self.objective.members
        if world.size > M:
            raise ConfigError(f"{world.size} ranks for {M} internal models (distill.rows x distill.restarts x "
                              f"members): start at most {M} processes")
        self.world = world
        return make_objective(self.cfg, self.device, shares(self.objective, world.size)[world.rank])

    # -- evaluation -----------------------------------------------------------------------------

    def _params0(self, inits: int) -> Any:
        """Fixed-init mode: every run starts from its distillation's fixed init of that architecture
        (when its row trained one); other cells start fresh."""
        obj = self.objective
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

    def _table(self, hyper: Mapping[str, Tensor], generator: torch.Generator, inits: int, strategies: list[str],
               cfg: ev.Strategies, models: Mapping[str, Any]) -> ev.Table:
        obj = self.objective
        with torch.no_grad():
            x, y, rates = hyper["x"].detach(), obj.targets(hyper).detach(), obj.rates(hyper).detach()
        return ev.evaluate(x, y, rates, obj.data, models, inits, strategies, cfg, generator, self._params0(inits),
                           init_scheme=self.cfg.distill.init_scheme)

    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        """Quick check during distillation: raw steps, each row's own architectures, a few inits."""
        obj = self.objective
        cfg = ev.Strategies(epochs=obj.epochs)
        table = self._table(hyper, generator, self.cfg.eval.quick_inits, ["raw"], cfg, self.models)
        out = {}
        for i, (row, archs) in enumerate(obj.rows.items()):
            sl = slice(i * obj.restarts, (i + 1) * obj.restarts)
            own = sorted(set(archs))
            out[f"acc/{row}"] = float(torch.stack([table.acc["raw"][a][sl].mean() for a in own]).mean())
        out["test_accuracy"] = sum(out.values()) / len(out)
        return out

    def _jobs(self) -> list[tuple[str, Any]]:
        """The report's independent parts, dearest first: the strategy families of the table, the
        full-data baselines (one per optimizer), the random-real-points baseline."""
        e = self.cfg.eval
        longer = [name for name in e.strategies if name not in ("raw", "shuffled")]
        jobs: list[tuple[str, Any]] = [("table", longer)] if longer else []
        jobs += [("table", ["shuffled"])] if "shuffled" in e.strategies else []
        jobs += [("full_data", o) for o in e.baseline_optimizers]
        jobs += [("table", ["raw"])] if "raw" in e.strategies else []
        jobs += [("random_real", None)] if e.random_real_lrs else []
        return jobs

    def _job(self, job: tuple[int, str, Any], hyper: Mapping[str, Tensor], seed: int) -> tuple[Any, float]:
        """One part of the report with a generator of its own (``seed + its index``), so its result
        does not depend on which rank runs it or on the others."""
        i, kind, arg = job
        e, obj = self.cfg.eval, self.objective
        generator = torch.Generator().manual_seed(seed + i)
        t0 = time.perf_counter()
        if kind == "table":
            out: Any = self._table(hyper, generator, e.inits, arg, self.strategies, self.models)
        elif kind == "full_data":
            out = ev.full_data(obj.data, self.models, e.baseline_inits, e.baseline_epochs, e.baseline_batch,
                               e.baseline_lr, generator, optimizer=arg, init_scheme=self.cfg.distill.init_scheme)
        else:
            out = ev.random_real(obj.data, self.models, e.random_real_runs, obj.s, obj.per_class, obj.epochs,
                                 list(e.random_real_lrs), generator, init_scheme=self.cfg.distill.init_scheme)
        return out, time.perf_counter() - t0

    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        """The full protocol: the cross-architecture table under every strategy, the full-data and
        random-real baselines, with wall times; its parts are dealt to the ranks of a multi-rank run
        (restart-parallel). Kept on the task for :meth:`figures`."""
        e, obj = self.cfg.eval, self.objective
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        jobs = [(i, kind, arg) for i, (kind, arg) in enumerate(self._jobs())]
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, e.threads // self.world.local_size))  # the node's cores, shared
        try:
            t0 = time.perf_counter()
            done = self.world.map(lambda job: self._job(job, hyper, seed), jobs, what="the evaluation")
            wall = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
        self.table, self.baselines, rr = ev.Table({}, {}, {}, {}), {}, {}
        seconds = {"evaluate": 0.0, "full_data": 0.0, "random_real": 0.0}
        for (_, kind, arg), (out, sec) in zip(jobs, done):
            if kind == "table":
                for field in ("acc", "curve_acc", "curve_loss", "params"):
                    getattr(self.table, field).update(getattr(out, field))
                seconds["evaluate"] += sec
            elif kind == "full_data":
                self.baselines[arg] = out
                seconds["full_data"] += sec
            else:
                rr = out
                seconds["random_real"] += sec
        order = list(e.strategies)  # the table in the configured order, whichever rank made each part
        for field in ("acc", "curve_acc", "curve_loss", "params"):
            part = getattr(self.table, field)
            setattr(self.table, field, {k: part[k] for k in order if k in part})
        self.baselines = {o: self.baselines[o] for o in e.baseline_optimizers}
        self.baseline = next(iter(self.baselines.values()), None)
        table: dict[str, Any] = {}
        for strategy, per_arch in self.table.acc.items():
            table[strategy] = {}
            for i, row in enumerate(obj.rows):
                sl = slice(i * obj.restarts, (i + 1) * obj.restarts)
                table[strategy][row] = {a: stats(acc[sl]) for a, acc in per_arch.items()}
        random_rows = {}
        for a, by_lr in rr.items():
            best = max(by_lr, key=lambda lr: float(by_lr[lr].mean()))
            random_rows[a] = {"lr": best, **stats(by_lr[best]), "by_lr": {str(lr): stats(v) for lr, v in by_lr.items()}}
        return {
            "dataset": obj.data.name,
            "rows": {r: a for r, a in obj.rows.items()},
            "archs": list(self.models),
            "table": table,
            "full_data": {f"{o} {e.baseline_lr:g}": {a: stats(acc[-1]) for a, acc in c.accuracy.items()}
                          for o, c in self.baselines.items()},
            "random_real": random_rows,
            "synthetic_points_per_distillation": obj.s * obj.P,
            "seconds": {**seconds, "wall": wall},
            "ranks": self.world.size,
        }

    # -- output ---------------------------------------------------------------------------------

    def summary(self, results: dict[str, Any]) -> str:
        return summary_markdown(results)

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        from . import plots

        return plots.all_figures(self, hyper, out)


def _cell(c: Mapping[str, Any] | None) -> str:
    return "" if c is None else f"{c['mean']:.3f} ± {c['std']:.3f}"


def summary_markdown(results: dict[str, Any]) -> str:
    """Our cross-architecture table, each cell beside the paper's when the run is the paper's protocol."""
    table, archs = results["table"], list(results["archs"])
    moons = results["dataset"] == "moons" and set(archs) <= set(paper.ARCHS)
    lines = [f"## Distillation results ({results['dataset']})", "",
             "Test accuracy, mean ± std over restarts × initialisations"
             + (" — ours, then (in brackets) Medvedev & D'yakonov 2020, Tables 1–2." if moons else "."), ""]
    lines += ["| data | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]

    def paper_cell(strategy: str, row: str, a: str) -> str:
        ref = paper.TABLE.get(strategy, {}).get(row, {}).get(a) if moons else None
        return f" ({ref[0]:.3f} ± {ref[1]:.3f})" if ref else ""

    for name, cells in results["full_data"].items():
        line = f"| original: full data, {name} | "
        for a in archs:
            ref = paper.ORIGINAL.get(a) if moons and name.startswith("sgd") else None
            line += _cell(cells[a]) + (f" ({ref[0]:.3f} ± {ref[1]:.3f})" if ref else "") + " | "
        lines.append(line.rstrip())
    if results.get("random_real"):
        lines.append("| random real points (best constant lr) | "
                     + " | ".join(_cell(results["random_real"].get(a)) for a in archs) + " |")
    for strategy, rows in table.items():
        for row, cells in rows.items():
            name = ("raw" if strategy == "raw" else strategy) + f" + {row}"
            lines.append(f"| {name} | " + " | ".join(_cell(cells[a]) + paper_cell(strategy, row, a) for a in archs)
                         + " |")
    s = results["seconds"]
    lines += ["", f"Evaluation: {s['evaluate']:.1f} s; full-data baseline {s['full_data']:.1f} s; "
              f"random real points {s['random_real']:.1f} s"
              + (f" ({s['wall']:.1f} s wall on {results['ranks']} ranks)." if results.get("ranks", 1) > 1 else "."),
              ""]
    return "\n".join(lines)
