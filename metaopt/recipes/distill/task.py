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
from ..report import stats
from . import data as datasets
from . import evaluate as ev
from . import paper
from .archs import build
from .config import Config
from .objective import Distillation


def make_objective(cfg: Config, rows: list[str], device: str | torch.device) -> Distillation:
    """The :class:`Distillation` of ``rows`` (a subset of ``cfg.distill.rows``) as configured."""
    d = cfg.distill
    data = datasets.load(d.dataset)
    models = {a: build(a, data) for a in d.archs}
    layout = {r: (list(d.archs) if r == "all" else [r] * d.members) for r in rows}
    return Distillation(
        data, models, layout, restarts=d.restarts, steps_per_epoch=d.steps_per_epoch, epochs=d.epochs,
        per_class=d.per_class, batch=d.batch or None, init=d.init, labels=d.labels, init_scheme=d.init_scheme,
        fixed_seed=cfg.seed + 7919, device=device,
    )


def make_shard(cfg: Config, rows: list[str], device: str) -> tuple[Distillation, Any, str, bool]:
    """One shard's problem for :class:`parallel.Sharded` (module level, so worker processes can build it)."""
    return make_objective(cfg, rows, device), optim.sgd(), cfg.distill.method, cfg.distill.compile


class DistillTask:
    """``rows x restarts`` distillations as one :class:`Distillation`, evaluated by the paper's protocol."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        d, self.cfg, self.device = cfg.distill, cfg, device
        self.objective = make_objective(cfg, list(d.rows), device)
        self.data, self.models = self.objective.data, {a: build(a, self.objective.data) for a in d.archs}
        self.optimizer = optim.sgd()
        self._sharded: Any = None
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

    def hypergradient(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> Any:
        """With ``distill.workers > 1``, the hypergradient from row shards in parallel processes
        (see :mod:`.parallel`); ``None`` lets the runner compute it in this process."""
        if self.cfg.distill.workers <= 1 or len(self.objective.rows) < 2:
            return None
        if self._sharded is None:
            from .parallel import Sharded, shard_rows

            rows, R = list(self.objective.rows), self.objective.restarts
            shards = shard_rows(rows, self.cfg.distill.workers)
            index = [torch.cat([torch.arange(rows.index(r) * R, (rows.index(r) + 1) * R) for r in sh])
                     for sh in shards]
            self._sharded = Sharded(make_shard, [(self.cfg, sh, str(self.device)) for sh in shards], index,
                                    self.objective.D)
        return self._sharded(hyper, generator)

    def close(self) -> None:
        if self._sharded is not None:
            self._sharded.close()
            self._sharded = None

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

    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        """The full protocol: the cross-architecture table under every strategy, the full-data and
        random-real baselines, with wall times. Kept on the task for :meth:`figures`."""
        e, obj = self.cfg.eval, self.objective
        threads = torch.get_num_threads()
        torch.set_num_threads(e.threads)
        try:
            t0 = time.perf_counter()
            self.table = self._table(hyper, generator, e.inits, list(e.strategies), self.strategies, self.models)
            t1 = time.perf_counter()
            self.baselines = {o: ev.full_data(obj.data, self.models, e.baseline_inits, e.baseline_epochs,
                                              e.baseline_batch, e.baseline_lr, generator, optimizer=o,
                                              init_scheme=self.cfg.distill.init_scheme)
                              for o in e.baseline_optimizers}
            self.baseline = next(iter(self.baselines.values()), None)
            t2 = time.perf_counter()
            rr = {}
            if e.random_real_lrs:
                rr = ev.random_real(obj.data, self.models, e.random_real_runs, obj.s, obj.per_class, obj.epochs,
                                    list(e.random_real_lrs), generator,
                                    init_scheme=self.cfg.distill.init_scheme)
            t3 = time.perf_counter()
        finally:
            torch.set_num_threads(threads)
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
            "seconds": {"evaluate": t1 - t0, "full_data": t2 - t1, "random_real": t3 - t2},
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
              f"random real points {s['random_real']:.1f} s.", ""]
    return "\n".join(lines)
