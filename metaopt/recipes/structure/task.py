"""The ``structure`` recipe's task: data and graphs, the modes, and the experiments of the report."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import hypergrad as hg
from ... import optim
from ...data import bundled, stratified_split
from ...run.config import ConfigError
from ...run.distributed import World
from ...run.meta import descend
from ...run.task import Task
from ..report import md_table, save_figure
from .config import Config
from .graph import StructureGraph
from .multistart import multistart_elbo
from .objective import Coefficients, StructureSelection, structure_logits


def make_data(cfg: Config) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """``X, y, X_test, y_test, likelihood``: the synthetic ``y = tanh(x0) + noise`` (``x1`` a
    distractor) or scikit-learn's bundled wine (standardised, stratified 60/40)."""
    s = cfg.structure
    if s.data == "tanh":
        g = torch.Generator().manual_seed(cfg.seed + 101)

        def draw(n: int) -> tuple[Tensor, Tensor]:
            X = torch.rand(n, 2, generator=g, dtype=torch.float64) * 4 - 2
            return X, torch.tanh(X[:, 0]) + s.noise * torch.randn(n, generator=g, dtype=torch.float64)

        X, y = draw(s.n_train)
        Xt, yt = draw(1000)
        return X, y, Xt, yt, "gaussian"
    try:
        Xn, yn = bundled("wine", "structure.data")
    except (ImportError, ValueError) as e:
        raise ConfigError(str(e)) from None
    tr, te = stratified_split(yn, (0.6, 0.4), cfg.seed)
    mean, std = Xn[tr].mean(0), Xn[tr].std(0)
    Xn = (Xn - mean) / std
    t = torch.tensor
    return t(Xn[tr]), t(yn[tr]), t(Xn[te]), t(yn[te]), "categorical"


def make_graph(name: str) -> StructureGraph:
    """``tanh3``: one edge, constant / tanh (the truth) / over-complex MLP; ``enum8``: 2 x 2 x 2
    structures (activation, head, skip); ``wine8``: 4 hidden-layer candidates x 2 skip options."""
    if name == "tanh3":
        return StructureGraph([2, 1], [(1, 0, ["const", "tanh", "mlp:10:tanh"])])
    if name == "enum8":
        return StructureGraph([2, 3, 1], [(1, 0, ["tanh", "relu"]), (2, 1, ["linear", "const"]),
                                          (2, 0, ["linear", "zero"])])
    return StructureGraph([13, 8, 3], [(1, 0, ["tanh", "relu", "sigmoid", "tanh:2"]), (2, 1, ["linear"]),
                                       (2, 0, ["zero", "linear"])])


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a between two score lists (pairs tied in either count as neither)."""
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            if a[i] != a[j] and b[i] != b[j]:
                s += 1 if (a[i] > a[j]) == (b[i] > b[j]) else -1
    return 2 * s / (n * (n - 1)) if n > 1 else 0.0


class StructureTask(Task):
    """The bilevel structure selection of one graph, in one of the four modes."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        s = cfg.structure
        self.cfg, self.device = cfg, device
        self.X, self.y, self.X_test, self.y_test, self.likelihood = make_data(cfg)
        self.graph = make_graph(s.graph)
        self.coef = Coefficients(train=s.c_train, reg=s.c_reg, prior=s.c_prior, comb=s.c_comb, temp=s.c_temp,
                                 q_temp=s.q_temp or None)
        self.objective = self.make_objective(self.coef)
        self.optimizer = optim.adam(lr=s.inner_lr)
        self.steps = s.steps
        self.hyper = self.objective.init_hyper(s.init_precision)
        self.begin_step(0, cfg.outer.steps)  # the gradual modes start at their *_start values
        self.method = hg.as_method(s.method, s.steps, hg.Settings(truncate=s.truncate))
        self.compile = False
        self.results: dict[str, Any] = {}
        self.world = World()

    def distribute(self, world: World) -> None:
        """A multi-rank run: the outer loop is one variational model whose Monte Carlo samples meet in
        every inner step, so every rank runs it (rank 0's hypergradient is used); the report's
        independent runs (seeds, sweeps, the exhaustive table) are dealt to the ranks."""
        self.world = world
        return None

    def make_objective(self, coef: Coefficients, avoid: list[dict[str, Tensor]] | None = None) -> StructureSelection:
        s = self.cfg.structure
        return StructureSelection(
            self.graph, self.X, self.y, self.likelihood, noise_std=s.noise, samples=s.samples,
            batch=s.batch or None, coef=coef, avoid=avoid or [], precision=s.precision,
            scale_by_gamma=s.scale_by_gamma, invgamma=tuple(s.invgamma) if s.invgamma else None, device=self.device,
        )

    # -- modes ------------------------------------------------------------------------------------

    def coefficients_at(self, step: int, steps: int) -> tuple[float, float, float]:
        """``(c_prior, c_temp, c_reg)`` at outer step ``step`` of ``steps``: constant in the evidence
        and enumeration modes, geometric from ``*_start`` to ``*_end`` in the gradual modes."""
        s = self.cfg.structure
        if s.mode not in ("increase", "decrease"):
            return self.coef.prior, self.coef.temp, self.coef.reg
        f = step / max(steps - 1, 1)

        def geo(a: float, b: float) -> float:
            return a * (b / a) ** f

        return geo(s.prior_start, s.prior_end), geo(s.temp_start, s.temp_end), geo(s.reg_start, s.reg_end)

    def anneal(self, coef: Coefficients, step: int, steps: int) -> None:
        """Set ``coef`` to the gradual modes' values at ``step`` (no change in the other modes)."""
        if self.cfg.structure.mode in ("increase", "decrease"):
            coef.prior, coef.temp, coef.reg = self.coefficients_at(step, steps)

    def begin_step(self, step: int, steps: int) -> None:
        self.anneal(self.coef, step, steps)

    def hypergradient(self, objective: StructureSelection, hyper: Mapping[str, Tensor],
                      generator: torch.Generator) -> hg.HypergradResult:
        res = hg.hypergradient(objective, self.optimizer, hyper, self.steps, method=self.method, generator=generator,
                               check_finite=False)
        log = {f"q/{e}/{self.graph.edges[i].basis[h]}": float(p)
               for i, (e, probs) in enumerate(objective.structure_probs(res.params).items())
               for h, p in enumerate(probs)}
        res.extras["log"] = {**log, "c_prior": self.coef.prior, "c_temp": self.coef.temp, "c_reg": self.coef.reg}
        return res

    # -- judging ----------------------------------------------------------------------------------

    def trained(self, hyper: Mapping[str, Tensor], objective: StructureSelection | None = None,
                seed: int = 1) -> dict[str, Tensor]:
        obj = objective or self.objective
        return hg.train(obj, self.optimizer, hyper, self.steps, torch.Generator().manual_seed(seed))

    def predict(self, obj: StructureSelection, params: Mapping[str, Tensor], X: Tensor, samples: int = 32) -> Tensor:
        """Posterior predictive over ``samples`` draws of ``(W, Gamma)``: mean output (regression) or
        mean class probabilities (classification), ``[B, out]``."""
        W, log_gamma = obj.sample(params, obj.noise(torch.Generator().manual_seed(7), samples))
        with torch.no_grad():
            out = obj.graph.forward(W, {k: v.exp() for k, v in log_gamma.items()}, X.to(obj.dtype))
        return out.mean(0) if obj.likelihood == "gaussian" else torch.softmax(out, -1).mean(0)

    def describe(self, hyper: Mapping[str, Tensor], params: Mapping[str, Tensor],
                 obj: StructureSelection | None = None) -> dict[str, Any]:
        """Selected structure, q(Gamma), ELBO (all c = 1), test metric, C_param, C_struct."""
        obj = obj or self.objective
        with torch.no_grad():
            noise = obj.noise(torch.Generator().manual_seed(3))
            elbo = float(obj.expected_loglik(params, noise) - obj.kl(params, hyper, noise))
            pred = self.predict(obj, params, self.X_test.to(obj.device))
            y_test = self.y_test.to(pred.device)
            if obj.likelihood == "gaussian":
                test = {"test_rmse": float(((pred[:, 0] - y_test) ** 2).mean().sqrt())}
            else:
                test = {"test_accuracy": float((pred.argmax(-1) == y_test).double().mean())}
        return {"selected": obj.selected(params), "q": {k: v.tolist() for k, v in obj.structure_probs(params).items()},
                "elbo": elbo, **test, "c_param": obj.parametric_complexity(params, hyper),
                "c_struct": obj.structural_entropy(params)}

    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        d = self.describe(hyper, self.trained(hyper))
        return {k: v for k, v in d.items() if isinstance(v, float)}

    # -- experiments ------------------------------------------------------------------------------

    def run(self, objective: StructureSelection, steps: int, seed: int, before: Any = None) -> tuple[dict, dict]:
        """A whole outer loop in process: ``(hyper, trained params)``."""
        def hypergrad(h: Mapping[str, Tensor], g: torch.Generator) -> hg.HypergradResult:
            return hg.hypergradient(objective, self.optimizer, h, self.steps, method=self.method, generator=g)

        out = descend(hypergrad, objective.init_hyper(self.cfg.structure.init_precision), steps,
                      self.cfg.outer.meta_lr, torch.Generator().manual_seed(seed), clip=self.cfg.outer.clip,
                      meta=self.cfg.outer.meta_optimizer, before=before)
        return out.hyper, self.trained(out.hyper, objective, seed)

    def seeds(self, main: dict[str, Any]) -> dict[str, Any]:
        s = self.cfg.structure

        def one(k: int) -> dict[str, Any]:
            obj = self.make_objective(copy.copy(self.coef))

            def before(i: int, n: int, o: StructureSelection = obj) -> None:
                self.anneal(o.coef, i, n)

            h, p = self.run(obj, self.cfg.outer.steps, self.cfg.seed + 1000 * k, before)
            return self.describe(h, p, obj)

        rows = [main, *self.world.map(one, list(range(1, s.seeds)), what="the seeds")]
        picks: dict[str, int] = {}
        for r in rows:
            key = ", ".join(f"{e}={b}" for e, b in r["selected"].items())
            picks[key] = picks.get(key, 0) + 1
        return {"runs": rows, "picks": picks}

    def sweep(self, what: str, values: list[float]) -> list[dict[str, Any]]:
        """Constant ``c_prior`` (or ``c_temp``, which also sets q's temperature) per point (the points
        are dealt to the ranks of a multi-rank run)."""

        def point(v: float) -> dict[str, Any]:
            coef = copy.copy(self.coef)
            if what == "prior":
                coef.prior = v
            else:
                coef.temp, coef.q_temp = v, None
            obj = self.make_objective(coef)
            h, p = self.run(obj, self.cfg.structure.sweep_steps, self.cfg.seed)
            d = self.describe(h, p, obj)
            with torch.no_grad():
                _, lg = obj.sample(p, obj.noise(torch.Generator().manual_seed(5)))
                d["mean_max_gamma"] = float(torch.stack([v.exp().max(-1).values.mean() for v in lg.values()]).mean())
                # the entropy of a sample gamma as a point of the simplex, E_q[-sum_h gamma_h log gamma_h]
                d["sample_entropy"] = float(sum(-(g.exp() * g).sum(-1).mean() for g in lg.values()))
            return {"value": v, **d}

        return self.world.map(point, values, what=f"the {what} sweep")

    def enumerate_structures(self, first: dict[str, Any]) -> dict[str, Any]:
        """Runs ``2, 3, ...``: each with ``q(Gamma)`` at ``enumerate_temp`` and ``P`` = the structure
        distributions found so far, weighted by ``c_comb`` (negative: repel), until all ``N``
        structures are visited or ``2 N`` runs are spent."""
        s, N = self.cfg.structure, self.graph.structures
        found = [first["q"]]
        visited = [tuple(first["selected"].values())]
        runs = [first]
        while len(set(visited)) < N and len(runs) < 2 * N:
            coef = copy.copy(self.coef)
            coef.q_temp = s.enumerate_temp
            avoid = [structure_logits({k: torch.tensor(v, dtype=torch.float64, device=self.device)
                                       for k, v in q.items()}) for q in found]
            obj = self.make_objective(coef, avoid)
            h, p = self.run(obj, self.cfg.outer.steps, self.cfg.seed + len(runs))
            d = self.describe(h, p, obj)
            runs.append(d)
            found.append(d["q"])
            visited.append(tuple(d["selected"].values()))
        return {"structures": N, "runs": len(runs), "distinct": len(set(visited)),
                "visited": [", ".join(v) for v in visited], "all_visited": len(set(visited)) == N}

    def log_joint(self, obj: StructureSelection, precision: float) -> tuple[Any, int]:
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

    def exhaustive(self, q: Mapping[str, list[float]]) -> dict[str, Any]:
        """Every discrete structure trained alone: its sub-graph, the ELBO at the initial prior (one
        precision per weight tensor, no gamma scaling or hyperprior), ``outer.steps * steps / 5``
        inner steps; its test metric against q(Gamma)'s probability, and its multi-start ELBO (the
        structures are dealt to the ranks of a multi-rank run)."""

        def one(choice: dict[str, int]) -> dict[str, Any]:
            sub = StructureGraph(self.graph.widths, [(e.target, e.source, [e.basis[choice[e.name]]])
                                                     for e in self.graph.edges])
            obj = StructureSelection(sub, self.X, self.y, self.likelihood, noise_std=self.cfg.structure.noise,
                                     samples=self.cfg.structure.samples, device=self.device)
            h = obj.init_hyper(self.cfg.structure.init_precision)
            n = self.steps * self.cfg.outer.steps // 5
            p = hg.train(obj, self.optimizer, h, n, torch.Generator().manual_seed(1))
            d = self.describe(h, p, obj)
            prob = math.prod(q[e.name][choice[e.name]] for e in self.graph.edges)
            lj, dim = self.log_joint(obj, self.cfg.structure.init_precision)
            ms = multistart_elbo(lj, dim, k=16, steps=200, lr=self.cfg.structure.multistart_lr,
                                 init_std=self.cfg.structure.init_precision ** -0.5,
                                 generator=torch.Generator().manual_seed(11), device=self.device)
            return {"structure": ", ".join(e.basis[choice[e.name]] for e in self.graph.edges), "q_prob": prob,
                    **{k: v for k, v in d.items() if k.startswith("test") or k == "elbo"},
                    "multistart_elbo": max(ms.elbo), "multistart_step": ms.elbo.index(max(ms.elbo))}

        rows = self.world.map(one, list(self.graph.all_structures()), what="the exhaustive table")
        key = "test_accuracy" if self.likelihood == "categorical" else "test_rmse"
        sign = 1 if key == "test_accuracy" else -1
        best_q = max(range(len(rows)), key=lambda i: rows[i]["q_prob"])
        better = sum(sign * r[key] > sign * rows[best_q][key] for r in rows)  # ties share the better rank
        return {"rows": rows, "metric": key, "rank_of_selected": better + 1,
                "kendall_tau": kendall_tau([r["q_prob"] for r in rows], [sign * r[key] for r in rows])}

    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        s = self.cfg.structure
        t0 = time.perf_counter()
        self.begin_step(self.cfg.outer.steps - 1, self.cfg.outer.steps)  # the schedule's end (also after --resume)
        main = self.describe(hyper, self.trained(hyper))
        out: dict[str, Any] = {"mode": s.mode, "graph": s.graph, "data": s.data, "structures": self.graph.structures,
                               "main": main}
        if s.seeds > 1:
            out["seeds"] = self.seeds(main)
        if s.sweep_prior:
            out["sweep_prior"] = self.sweep("prior", list(s.sweep_prior))
        if s.sweep_temp:
            out["sweep_temp"] = self.sweep("temp", list(s.sweep_temp))
        if s.mode == "enumerate":
            out["enumeration"] = self.enumerate_structures(main)
        if s.exhaustive:
            out["exhaustive"] = self.exhaustive(main["q"])
        out["seconds"] = time.perf_counter() - t0
        self.results = out
        return out

    # -- output -----------------------------------------------------------------------------------

    def summary(self, results: dict[str, Any]) -> str:
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
                basis = [e.basis for e in self.graph.edges if e.name == edge][0]
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

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        paths = []
        edges = self.graph.edges
        fig, axes = plt.subplots(1, len(edges), figsize=(4.2 * len(edges), 3.2), squeeze=False)
        steps = [r["step"] for r in history]
        for ax, e in zip(axes[0], edges):
            for b in e.basis:
                ax.plot(steps, [r.get(f"q/{e.name}/{b}", math.nan) for r in history], label=b)
            ax.set_title(f"q(Gamma) on edge {e.name}")
            ax.set_xlabel("outer step")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
        paths.append(save_figure(fig, out / "structure_probs.png"))
        r = self.results
        for key, name, ys in (("sweep_prior", "c_prior", ("c_param",)),
                              ("sweep_temp", "c_temp", ("c_struct", "sample_entropy"))):
            if key in r:
                fig, ax = plt.subplots(figsize=(4.5, 3.2))
                for y in ys:
                    ax.plot([p["value"] for p in r[key]], [p[y] for p in r[key]], "o-", label=y.replace("c_", "C_"))
                ax.set_xscale("log")
                ax.set_xlabel(name)
                ax.legend(fontsize=8)
                paths.append(save_figure(fig, out / f"{ys[0]}_vs_{name}.png"))
        return paths
