"""Judging the ``structure`` recipe's hyperparameters: variational models trained with them, their
selected structure, ELBO, test metric and complexities, and the report's experiments (seeds,
sweeps, enumeration, every structure trained alone, ranked by Kendall's tau). Functions of a
:class:`~metaopt.recipes.structure.task.StructureTask`."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ... import hypergrad as hg
from ...run.meta import descend
from .graph import StructureGraph
from .multistart import multistart_elbo
from .objective import StructureSelection, structure_logits

if TYPE_CHECKING:
    from .task import StructureTask


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a between two score lists (pairs tied in either count as neither)."""
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            if a[i] != a[j] and b[i] != b[j]:
                s += 1 if (a[i] > a[j]) == (b[i] > b[j]) else -1
    return 2 * s / (n * (n - 1)) if n > 1 else 0.0


def trained(task: StructureTask, hyper: Mapping[str, Tensor], objective: StructureSelection | None = None,
            seed: int = 1) -> dict[str, Tensor]:
    """The variational parameters trained with ``hyper`` (``task.steps`` inner steps, seeded)."""
    obj = objective or task.objective
    return hg.train(obj, task.optimizer, hyper, task.steps, torch.Generator().manual_seed(seed))


def predict(obj: StructureSelection, params: Mapping[str, Tensor], X: Tensor, samples: int = 32) -> Tensor:
    """Posterior predictive over ``samples`` draws of ``(W, Gamma)``: mean output (regression) or
    mean class probabilities (classification), ``[B, out]``."""
    W, log_gamma = obj.sample(params, obj.noise(torch.Generator().manual_seed(7), samples))
    with torch.no_grad():
        out = obj.graph.forward(W, {k: v.exp() for k, v in log_gamma.items()}, X.to(obj.dtype))
    return out.mean(0) if obj.likelihood == "gaussian" else torch.softmax(out, -1).mean(0)


def describe(task: StructureTask, hyper: Mapping[str, Tensor], params: Mapping[str, Tensor],
             obj: StructureSelection | None = None) -> dict[str, Any]:
    """Selected structure, q(Gamma), ELBO (all c = 1), test metric, C_param, C_struct."""
    obj = obj or task.objective
    with torch.no_grad():
        noise = obj.noise(torch.Generator().manual_seed(3))
        elbo = float(obj.expected_loglik(params, noise) - obj.kl(params, hyper, noise))
        pred = predict(obj, params, task.X_test.to(obj.device))
        y_test = task.y_test.to(pred.device)
        if obj.likelihood == "gaussian":
            test = {"test_rmse": float(((pred[:, 0] - y_test) ** 2).mean().sqrt())}
        else:
            test = {"test_accuracy": float((pred.argmax(-1) == y_test).double().mean())}
    return {"selected": obj.selected(params), "q": {k: v.tolist() for k, v in obj.structure_probs(params).items()},
            "elbo": elbo, **test, "c_param": obj.parametric_complexity(params, hyper),
            "c_struct": obj.structural_entropy(params)}


def run(task: StructureTask, objective: StructureSelection, steps: int, seed: int,
        before: Any = None) -> tuple[dict, dict]:
    """A whole outer loop in process: ``(hyper, trained params)``."""
    def hypergrad(h: Mapping[str, Tensor], g: torch.Generator) -> hg.HypergradResult:
        return hg.hypergradient(objective, task.optimizer, h, task.steps, method=task.method, generator=g)

    out = descend(hypergrad, objective.init_hyper(task.cfg.structure.init_precision), steps,
                  task.cfg.outer.meta_lr, torch.Generator().manual_seed(seed), clip=task.cfg.outer.clip,
                  meta=task.cfg.outer.meta_optimizer, before=before)
    return out.hyper, trained(task, out.hyper, objective, seed)


def seeds(task: StructureTask, main: dict[str, Any]) -> dict[str, Any]:
    """The main run and ``structure.seeds - 1`` more (dealt to the ranks): what each selects."""
    s = task.cfg.structure

    def one(k: int) -> dict[str, Any]:
        obj = task.make_objective(copy.copy(task.coef))

        def before(i: int, n: int, o: StructureSelection = obj) -> None:
            task.anneal(o.coef, i, n)

        h, p = run(task, obj, task.cfg.outer.steps, task.cfg.seed + 1000 * k, before)
        return describe(task, h, p, obj)

    rows = [main, *task.world.map(one, list(range(1, s.seeds)), what="the seeds")]
    picks: dict[str, int] = {}
    for r in rows:
        key = ", ".join(f"{e}={b}" for e, b in r["selected"].items())
        picks[key] = picks.get(key, 0) + 1
    return {"runs": rows, "picks": picks}


def sweep(task: StructureTask, what: str, values: list[float]) -> list[dict[str, Any]]:
    """Constant ``c_prior`` (or ``c_temp``, which also sets q's temperature) per point (the points
    are dealt to the ranks of a multi-rank run)."""

    def point(v: float) -> dict[str, Any]:
        coef = copy.copy(task.coef)
        if what == "prior":
            coef.prior = v
        else:
            coef.temp, coef.q_temp = v, None
        obj = task.make_objective(coef)
        h, p = run(task, obj, task.cfg.structure.sweep_steps, task.cfg.seed)
        d = describe(task, h, p, obj)
        with torch.no_grad():
            _, lg = obj.sample(p, obj.noise(torch.Generator().manual_seed(5)))
            d["mean_max_gamma"] = float(torch.stack([v.exp().max(-1).values.mean() for v in lg.values()]).mean())
            # the entropy of a sample gamma as a point of the simplex, E_q[-sum_h gamma_h log gamma_h]
            d["sample_entropy"] = float(sum(-(g.exp() * g).sum(-1).mean() for g in lg.values()))
        return {"value": v, **d}

    return task.world.map(point, values, what=f"the {what} sweep")


def enumerate_structures(task: StructureTask, first: dict[str, Any]) -> dict[str, Any]:
    """Runs ``2, 3, ...``: each with ``q(Gamma)`` at ``enumerate_temp`` and ``P`` = the structure
    distributions found so far, weighted by ``c_comb`` (negative: repel), until all ``N``
    structures are visited or ``2 N`` runs are spent."""
    s, N = task.cfg.structure, task.graph.structures
    found = [first["q"]]
    visited = [tuple(first["selected"].values())]
    runs = [first]
    while len(set(visited)) < N and len(runs) < 2 * N:
        coef = copy.copy(task.coef)
        coef.q_temp = s.enumerate_temp
        avoid = [structure_logits({k: torch.tensor(v, dtype=torch.float64, device=task.device)
                                   for k, v in q.items()}) for q in found]
        obj = task.make_objective(coef, avoid)
        h, p = run(task, obj, task.cfg.outer.steps, task.cfg.seed + len(runs))
        d = describe(task, h, p, obj)
        runs.append(d)
        found.append(d["q"])
        visited.append(tuple(d["selected"].values()))
    return {"structures": N, "runs": len(runs), "distinct": len(set(visited)),
            "visited": [", ".join(v) for v in visited], "all_visited": len(set(visited)) == N}


def log_joint(obj: StructureSelection, precision: float) -> tuple[Any, int]:
    """``(log_joint(w [d]), d)`` of a one-structure ``obj``: ``log p(y | X, W) + log N(W; 0, 1/precision)``
    with the weights flattened (for :func:`.multistart.multistart_elbo`)."""
    names, shapes = list(obj.shapes), list(obj.shapes.values())
    sizes = [math.prod(sh) for sh in shapes]
    gamma = {e.name: torch.ones(1, 1, dtype=obj.dtype, device=obj.device) for e in obj.graph.edges}

    def log_joint(w: Tensor) -> Tensor:
        W = {n: c.reshape(1, *sh) for n, c, sh in zip(names, w.split(sizes), shapes)}
        ll = obj.log_likelihood(obj.graph.forward(W, gamma, obj.X), obj.y).sum()
        return ll - 0.5 * precision * (w**2).sum() + 0.5 * w.numel() * math.log(precision / (2 * math.pi))

    return log_joint, sum(sizes)


def exhaustive(task: StructureTask, q: Mapping[str, list[float]]) -> dict[str, Any]:
    """Every discrete structure trained alone: its sub-graph, the ELBO at the initial prior (one
    precision per weight tensor, no gamma scaling or hyperprior), ``outer.steps * steps / 5``
    inner steps; its test metric against q(Gamma)'s probability, and its multi-start ELBO (the
    structures are dealt to the ranks of a multi-rank run)."""

    def one(choice: dict[str, int]) -> dict[str, Any]:
        sub = StructureGraph(task.graph.widths, [(e.target, e.source, [e.basis[choice[e.name]]])
                                                 for e in task.graph.edges])
        obj = StructureSelection(sub, task.X, task.y, task.likelihood, noise_std=task.cfg.structure.noise,
                                 samples=task.cfg.structure.samples, device=task.device)
        h = obj.init_hyper(task.cfg.structure.init_precision)
        n = task.steps * task.cfg.outer.steps // 5
        p = hg.train(obj, task.optimizer, h, n, torch.Generator().manual_seed(1))
        d = describe(task, h, p, obj)
        prob = math.prod(q[e.name][choice[e.name]] for e in task.graph.edges)
        lj, dim = log_joint(obj, task.cfg.structure.init_precision)
        ms = multistart_elbo(lj, dim, k=16, steps=200, lr=task.cfg.structure.multistart_lr,
                             init_std=task.cfg.structure.init_precision ** -0.5,
                             generator=torch.Generator().manual_seed(11), device=task.device)
        return {"structure": ", ".join(e.basis[choice[e.name]] for e in task.graph.edges), "q_prob": prob,
                **{k: v for k, v in d.items() if k.startswith("test") or k == "elbo"},
                "multistart_elbo": max(ms.elbo), "multistart_step": ms.elbo.index(max(ms.elbo))}

    rows = task.world.map(one, list(task.graph.all_structures()), what="the exhaustive table")
    key = "test_accuracy" if task.likelihood == "categorical" else "test_rmse"
    sign = 1 if key == "test_accuracy" else -1
    best_q = max(range(len(rows)), key=lambda i: rows[i]["q_prob"])
    better = sum(sign * r[key] > sign * rows[best_q][key] for r in rows)  # ties share the better rank
    return {"rows": rows, "metric": key, "rank_of_selected": better + 1,
            "kendall_tau": kendall_tau([r["q_prob"] for r in rows], [sign * r[key] for r in rows])}
