"""The ``distill`` recipe's final protocol (the cross-architecture table under every strategy and
the baselines, its parts dealt to the ranks of a multi-rank run) and its markdown summary, each cell
beside Medvedev & D'yakonov 2020's (:mod:`.paper`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..report import stats
from . import evaluate as ev
from . import paper

if TYPE_CHECKING:
    from .task import DistillTask


def parts(task: DistillTask) -> list[tuple[str, Any]]:
    """The report's independent parts, dearest first: the strategy families of the table, the
    full-data baselines (one per optimizer), the random-real-points baseline."""
    e = task.cfg.eval
    longer = [name for name in e.strategies if name not in ("raw", "shuffled")]
    jobs: list[tuple[str, Any]] = [("table", longer)] if longer else []
    jobs += [("table", ["shuffled"])] if "shuffled" in e.strategies else []
    jobs += [("full_data", o) for o in e.baseline_optimizers]
    jobs += [("table", ["raw"])] if "raw" in e.strategies else []
    jobs += [("random_real", None)] if e.random_real_lrs else []
    return jobs


def protocol(task: DistillTask, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
    """The full protocol: the cross-architecture table under every strategy, the full-data and
    random-real baselines, with wall times; its parts are dealt to the ranks of a multi-rank run
    (restart-parallel). The table and the baselines stay on the task (``task.table``,
    ``task.baselines``, ``task.baseline``) for the figures."""
    e, obj = task.cfg.eval, task.objective
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    jobs = [(i, kind, arg) for i, (kind, arg) in enumerate(parts(task))]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, e.threads // task.world.local_size))  # the node's cores, shared
    try:
        t0 = time.perf_counter()
        done = task.world.map(lambda job: ev.part(task, job, hyper, seed), jobs, what="the evaluation")
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    task.table, task.baselines, rr = ev.Table({}, {}, {}, {}), {}, {}
    seconds = {"evaluate": 0.0, "full_data": 0.0, "random_real": 0.0}
    for (_, kind, arg), (out, sec) in zip(jobs, done):
        if kind == "table":
            for field in ("acc", "curve_acc", "curve_loss", "params"):
                getattr(task.table, field).update(getattr(out, field))
            seconds["evaluate"] += sec
        elif kind == "full_data":
            task.baselines[arg] = out
            seconds["full_data"] += sec
        else:
            rr = out
            seconds["random_real"] += sec
    order = list(e.strategies)  # the table in the configured order, whichever rank made each part
    for field in ("acc", "curve_acc", "curve_loss", "params"):
        part = getattr(task.table, field)
        setattr(task.table, field, {k: part[k] for k in order if k in part})
    task.baselines = {o: task.baselines[o] for o in e.baseline_optimizers}
    task.baseline = next(iter(task.baselines.values()), None)
    table: dict[str, Any] = {}
    for strategy, per_arch in task.table.acc.items():
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
        "archs": list(task.models),
        "table": table,
        "full_data": {f"{o} {e.baseline_lr:g}": {a: stats(acc[-1]) for a, acc in c.accuracy.items()}
                      for o, c in task.baselines.items()},
        "random_real": random_rows,
        "synthetic_points_per_distillation": obj.s * obj.P,
        "seconds": {**seconds, "wall": wall},
        "ranks": task.world.size,
    }


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
