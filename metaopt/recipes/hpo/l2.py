"""Task ``l2``: L2 penalties of logistic regression by hypergradient (Pedregosa 2016; Grazzi et al.
2020; Lorraine et al. 2020), against grid and random search at equal compute, the dense validation
curve of a single penalty, every hypergradient method side by side, and greedy T1-T2 online."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import hypergrad as hg
from ... import optim
from ...run.meta import descend
from . import plots, report
from .config import Config
from .objective import L2LogReg
from .task import HPOTask


class L2Task(HPOTask):
    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.data = self.split()
        self.objective = L2LogReg(self.data, cfg.l2.penalty, device=device)
        self.optimizer = optim.momentum(momentum=0.9)
        self.hyper = self.objective.init_hyper(cfg.l2.init)
        self.results: dict[str, Any] = {}

    # -- judging settings -------------------------------------------------------------------------

    def judge(self, log_lam: Tensor, penalty: str | None = None, *, converge: bool = True) -> dict[str, Tensor]:
        """Train ``C`` candidates ``log_lam [C, ...]`` at once to convergence (rounds of
        ``l2.eval_steps`` steps until the joint inner gradient norm is below ``1e-9 sqrt(C)``, an RMS
        of 1e-9 per candidate, at most ``l2.eval_rounds`` rounds); their validation and test loss and
        accuracy, each ``[C]``. ``converge=False`` trains as one inner solve of the hypergradient
        does instead (rounds of ``hpo.steps`` to the method's inner tolerance, :meth:`inner_precision`): a
        black-box search's trial at the hypergradient method's own inner precision."""
        obj = L2LogReg(self.data, penalty or self.cfg.l2.penalty, candidates=log_lam.shape[0], device=self.device)
        steps, tol, rounds = ((self.cfg.l2.eval_steps, 1e-9, self.cfg.l2.eval_rounds) if converge
                              else (self.cfg.hpo.steps, *self.inner_precision()))
        params = hg.train(obj, self.optimizer, {"log_lam": log_lam.to(obj.dtype)}, steps,
                          torch.Generator().manual_seed(0), tol=tol * math.sqrt(obj.C), max_rounds=rounds)
        return {"val_loss": obj.losses(params, "_val"), "val_acc": obj.accuracy(params, "_val"),
                "test_loss": obj.losses(params, "_test"), "test_acc": obj.accuracy(params, "_test")}

    @staticmethod
    def _row(m: Mapping[str, Tensor], i: int = 0) -> dict[str, float]:
        return {k: float(v[i]) for k, v in m.items()}

    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        return self._row(self.judge(hyper["log_lam"]))

    def search(self, kind: str, generator: torch.Generator) -> dict[str, Any]:
        """The best of ``budget`` settings by validation loss: ``grid`` over one shared lambda, or
        ``random`` log-uniform samples in the box of the task's own penalty shape."""
        l2, B = self.cfg.l2, self.budget
        t0 = time.perf_counter()
        if kind == "grid":
            cand = torch.linspace(l2.low, l2.high, B, dtype=torch.float64)
            m = self.judge(cand, "single")
        else:
            shape = self.objective.hyper_shape(B)
            cand = torch.rand(shape, generator=generator, dtype=torch.float64) * (l2.high - l2.low) + l2.low
            m = self.judge(cand)
        best = int(m["val_loss"].argmin())
        return {**self._row(m, best), "trainings": B, "seconds": time.perf_counter() - t0,
                "best_log_lam": cand[best].tolist()}

    def curve(self, points: int) -> dict[str, Any]:
        """The dense brute-force validation curve over one shared lambda."""
        grid = torch.linspace(self.cfg.l2.low, self.cfg.l2.high, points, dtype=torch.float64)
        m = self.judge(grid, "single")
        i = int(m["val_loss"].argmin())
        return {"log_lam": grid.tolist(), "val_loss": m["val_loss"].tolist(), "test_loss": m["test_loss"].tolist(),
                "argmin_log_lam": float(grid[i]), "min_val_loss": float(m["val_loss"][i]),
                "spacing": float(grid[1] - grid[0]) if points > 1 else 0.0}

    # -- comparisons ------------------------------------------------------------------------------

    def compare(self, generator: torch.Generator) -> dict[str, Any]:
        """Every method of ``l2.compare`` from the same start for the same number of outer steps:
        its hypergradient's error at the start against the converged implicit one, its cost, and
        where its outer loop ends."""
        l2, outer = self.cfg.l2, self.cfg.outer
        steps = l2.compare_steps or outer.steps
        h0 = {k: v.clone() for k, v in self.hyper.items()}
        ref = hg.hypergradient(self.objective, self.optimizer, h0, self.steps,
                               method=hg.Implicit("cg", tol=1e-12, inner_tol=1e-12,
                                                  max_inner_rounds=200)).grads["log_lam"]

        def one(table: Mapping[str, Any]) -> dict[str, Any]:
            err = cos = math.nan
            try:
                g = self.make_hypergrad(table)(h0, torch.Generator()).grads["log_lam"]  # its first hypergradient
                err = float((g - ref).norm() / ref.norm())
                cos = float(torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0))
                run = descend(self.make_hypergrad(table), h0, steps, outer.meta_lr,
                              torch.Generator().manual_seed(self.cfg.seed), clip=outer.clip, meta=outer.meta_optimizer)
            except (ValueError, RuntimeError) as e:  # NonFiniteError, solver divergence, a method that does not apply
                return {"error": str(e).splitlines()[0], "rel_error": err, "cosine": cos}
            hist = run.history
            return {
                "rel_error": err, "cosine": cos, "seconds": run.seconds,
                "seconds_per_hypergradient": run.seconds / steps,
                "inner_steps": sum(r["inner_steps"] for r in hist) / steps,
                "matvecs": sum(r["matvecs"] for r in hist) / steps,
                "peak_bytes": max(r["peak_bytes"] for r in hist),
                "curve": [[r["elapsed"], r["loss"]] for r in hist],
                **self._row(self.judge(run.hyper["log_lam"])),
            }

        names = [m["name"] for m in l2.compare]  # restart-parallel: the methods are dealt to the ranks
        out = dict(zip(names, self.world.map(one, list(l2.compare), what="the method comparison")))
        return {"outer_steps": steps, "methods": out}

    def greedy(self) -> dict[str, Any]:
        """Greedy T1-T2: one training run of ``budget * steps`` inner steps (the inner steps the
        hypergradient method spends on its ``budget`` trainings) with the penalties updated online
        from the one-step lookahead every 10 steps; the final penalties judged by retraining."""
        T = self.budget * self.steps
        t0 = time.perf_counter()
        res = hg.t1t2(self.objective, self.optimizer, self.hyper, T, optim.adam(lr=self.cfg.outer.meta_lr),
                      every=10, generator=torch.Generator().manual_seed(self.cfg.seed))
        seconds = time.perf_counter() - t0
        return {**self._row(self.judge(res.hyper["log_lam"])), "trainings": f"1 run of {T} steps", "seconds": seconds,
                "online_val_loss": float(self.objective.losses(res.params, "_val")[0]),
                "online_test_acc": float(self.objective.accuracy(res.params)[0])}

    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        l2, B = self.cfg.l2, self.budget
        t0 = time.perf_counter()
        learned = self._row(self.judge(hyper["log_lam"]))
        rows = {
            "initial": {**self._row(self.judge(self.hyper["log_lam"])), "trainings": 1},
            f"grid search, one lambda ({B} points)": self.search("grid", generator),
            f"random search, {l2.penalty} ({B} samples)": self.search("random", generator),
        }
        if l2.greedy:
            rows["greedy T1-T2 (online)"] = self.greedy()
        rows[f"hypergradient ({self.method_name}, {self.cfg.outer.steps} outer steps)"] = {
            **learned, "trainings": self.cfg.outer.steps}
        out: dict[str, Any] = {"task": "l2", "dataset": self.data.name, "penalty": l2.penalty,
                               "hyperparameters": int(self.hyper["log_lam"].numel()), "method": self.method_name,
                               "splits": [int(self.data.X.shape[0]), int(self.data.X_val.shape[0]),
                                          int(self.data.X_test.shape[0])],
                               "rows": rows, "learned_log_lam": hyper["log_lam"][0].tolist()}
        if l2.curve:
            c = self.curve(l2.curve)
            if l2.penalty == "single":
                c["learned_log_lam"] = float(hyper["log_lam"][0])
                c["learned_val_loss"] = learned["val_loss"]
            out["curve"] = c
        if l2.compare:
            out["compare"] = self.compare(generator)
        out["seconds"] = time.perf_counter() - t0
        self.results = out
        return out

    # -- output -----------------------------------------------------------------------------------

    def summary(self, results: dict[str, Any]) -> str:
        return report.l2(results)

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        return plots.l2(self, hyper, history, out)
