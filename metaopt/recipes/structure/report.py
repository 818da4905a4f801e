"""The ``structure`` recipe's final protocol (the main run described, then the configured
experiments) and its markdown summary."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..report import md_table
from . import evaluate as ev
from .graph import StructureGraph

if TYPE_CHECKING:
    from .task import StructureTask


def protocol(task: StructureTask, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
    """The task's ``report``: the main run described at the schedule's end, then the configured
    seeds, sweeps, enumeration and exhaustive table."""
    s = task.cfg.structure
    t0 = time.perf_counter()
    task.begin_step(task.cfg.outer.steps - 1, task.cfg.outer.steps)  # the schedule's end (also after --resume)
    main = ev.describe(task, hyper, ev.trained(task, hyper))
    out: dict[str, Any] = {"mode": s.mode, "graph": s.graph, "data": s.data, "structures": task.graph.structures,
                           "main": main}
    if s.seeds > 1:
        out["seeds"] = ev.seeds(task, main)
    if s.sweep_prior:
        out["sweep_prior"] = ev.sweep(task, "prior", list(s.sweep_prior))
    if s.sweep_temp:
        out["sweep_temp"] = ev.sweep(task, "temp", list(s.sweep_temp))
    if s.mode == "enumerate":
        out["enumeration"] = ev.enumerate_structures(task, main)
    if s.exhaustive:
        out["exhaustive"] = ev.exhaustive(task, main["q"])
    out["seconds"] = time.perf_counter() - t0
    return out


def summary(graph: StructureGraph, results: dict[str, Any]) -> str:
    """Markdown of :func:`protocol`'s results (``graph``: the task's, for the edges' candidates)."""
    r = results
    m = r["main"]
    test = "test_rmse" if "test_rmse" in m else "test_accuracy"
    lines = [f"## Structure selection: {r['graph']} on {r['data']} ({r['structures']} structures, "
             f"mode {r['mode']})",
             "", f"Selected: {m['selected']}; q(Gamma): "
             + "; ".join(f"{e}: " + ", ".join(f"{p:.3f}" for p in q) for e, q in m["q"].items()) + ".",
             f"ELBO {m['elbo']:.4g}, {test} {m[test]:.4g}, C_param {m['c_param']:.4g}, "
             f"C_struct {m['c_struct']:.4g}.",
             ""]
    if "seeds" in r:
        lines += [f"Selected structure over {len(r['seeds']['runs'])} seeds:", ""]
        lines += md_table(["structure", "seeds"], [[k, v] for k, v in r["seeds"]["picks"].items()]) + [""]
    for key, name in (("sweep_prior", "c_prior"), ("sweep_temp", "c_temp")):
        if key in r:
            edge = next(iter(r[key][0]["q"]))
            basis = [e.basis for e in graph.edges if e.name == edge][0]
            lines += md_table([name, "C_param", "C_struct", "sample entropy", "mean max gamma",
                               *[f"q({b})" for b in basis], test],
                              [[p["value"], p["c_param"], p["c_struct"], p["sample_entropy"], p["mean_max_gamma"],
                                *p["q"][edge], p[test]] for p in r[key]]) + [""]
    if "enumeration" in r:
        e = r["enumeration"]
        lines += [f"Enumeration: {e['distinct']} distinct of {e['structures']} structures in {e['runs']} runs "
                  f"(all visited: {e['all_visited']}): " + " | ".join(e["visited"]), ""]
    if "exhaustive" in r:
        x = r["exhaustive"]
        lines += md_table(["structure", "q(Gamma) probability", x["metric"], "ELBO (variational)",
                           "ELBO (multi-start, best step)"],
                          [[row["structure"], row["q_prob"], row[x["metric"]], row["elbo"],
                            f"{row['multistart_elbo']:.4g} ({row['multistart_step']})"] for row in x["rows"]])
        lines += ["", f"The most probable structure under q ranks {x['rank_of_selected']} of {len(x['rows'])} by "
                  f"{x['metric']}; Kendall tau between q(Gamma) and the exhaustive ranking: "
                  f"{x['kendall_tau']:.3f}.",
                  ""]
    return "\n".join(lines)
