"""The ``structure`` recipe's task: the bilevel structure selection of one graph wired to the runner
(data, graph, objective, the gradual modes' schedule), its hooks thin methods over
:mod:`.evaluate`, :mod:`.report` and :mod:`.plots`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import hypergrad as hg
from ... import optim
from ...run.config import build_method
from ...run.distributed import World
from ...run.task import Task
from . import evaluate as ev
from . import plots, report
from .config import Config
from .data import make_data
from .graph import make_graph
from .objective import Coefficients, StructureSelection


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
        self.method = build_method(cfg.method, s.steps, cfg.seed)  # one object per run (its state checkpointed)
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

    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        """The trained model's ELBO, test metric and complexities (:func:`.evaluate.describe`)."""
        d = ev.describe(self, hyper, ev.trained(self, hyper))
        return {k: v for k, v in d.items() if isinstance(v, float)}

    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        """The final protocol (:func:`.report.protocol`); kept on the task for :meth:`figures`."""
        self.results = report.protocol(self, hyper, generator)
        return self.results

    def summary(self, results: dict[str, Any]) -> str:
        return report.summary(self.graph, results)

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        return plots.figures(self, hyper, history, out)
