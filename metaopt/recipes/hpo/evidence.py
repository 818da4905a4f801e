"""Task ``evidence``: evidence maximisation with a closed-form oracle (MacKay 1992; ARD).

Bayesian polynomial regression with Legendre features up to ``degree`` and one prior precision per
coefficient (``evidence.ard``) or one shared; the inner problem trains the variational posterior
``N(mu, S S^T)`` on the ELBO, the outer loop maximises the ELBO at the trained posterior over
``(log alpha, log beta)``. The closed-form log evidence gives both checks: the hypergradient must
equal its analytic gradient, and the bilevel optimum must match a direct optimisation (L-BFGS) of
the closed form. The searches score their candidates by the closed-form log evidence — the value an
inner training would converge to — so they get an oracle for free: stronger than equal compute."""

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
from . import data, plots, report
from .config import Config
from .objective import Evidence
from .task import HPOTask


class EvidenceTask(HPOTask):
    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        e = cfg.evidence
        self.reg = data.polynomial(e.n, e.n_test, e.degree, list(e.coef), e.noise, cfg.seed)
        self.objective = Evidence(self.reg, ard=e.ard, step=e.step, device=device)
        self.optimizer = optim.momentum(momentum=0.9)  # the step sizes come from Evidence.hparams
        self.hyper = self.objective.init_hyper(e.alpha, e.beta)
        self.results: dict[str, Any] = {}

    def log_evidence(self, hyper: Mapping[str, Tensor]) -> float:
        with torch.no_grad():
            return float(self.objective.log_evidence(hyper))

    def test_rmse(self, hyper: Mapping[str, Tensor]) -> float:
        with torch.no_grad():
            mean, _ = self.objective.posterior(hyper)
            return float(((self.reg.Phi_test.to(mean) @ mean - self.reg.y_test.to(mean)) ** 2).mean().sqrt())

    def identity(self, hyper: Mapping[str, Tensor]) -> dict[str, float]:
        """The hypergradient of ``-ELBO / N`` — by implicit CG at a tight tolerance, and by the full
        unroll of ``10 * hpo.steps`` steps — against ``-d log p(y) / N`` by autograd of the closed
        form, and MacKay's formula against the same."""
        h = {k: v.detach().clone().requires_grad_() for k, v in hyper.items()}
        with torch.enable_grad():
            g = torch.autograd.grad(self.objective.log_evidence(h), list(h.values()))
        exact = torch.cat([-gi.reshape(-1) / self.objective.N for gi in g])
        scale = float(exact.norm())
        out: dict[str, float] = {"gradient_norm": scale}
        runs = {"implicit_cg": (hg.Implicit("cg", tol=1e-12, inner_tol=1e-12, max_inner_rounds=200), self.steps),
                "full_unroll": (hg.Full(), 10 * self.steps)}
        for name, (method, steps) in runs.items():
            res = hg.hypergradient(self.objective, self.optimizer, hyper, steps, method=method,
                                   generator=torch.Generator())
            ours = torch.cat([res.grads[k].reshape(-1) for k in h])
            out[f"{name}_abs_error"] = float((ours - exact).norm())
            out[f"{name}_rel_error"] = out[f"{name}_abs_error"] / scale
            out[f"{name}_elbo_minus_log_evidence"] = float(-res.loss * self.objective.N) - self.log_evidence(hyper)
        mk = self.objective.mackay_gradient(hyper)
        mackay = torch.cat([-mk[k].reshape(-1) / self.objective.N for k in h])
        out["mackay_rel_error"] = float((mackay - exact).norm()) / scale
        return out

    def direct(self) -> tuple[dict[str, Tensor], float]:
        """L-BFGS on the closed-form negative log evidence, from the same start."""
        h = {k: v.detach().clone().requires_grad_() for k, v in self.hyper.items()}
        opt = torch.optim.LBFGS(list(h.values()), lr=1, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-14,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = -self.objective.log_evidence(h)
            loss.backward()
            return loss

        t0 = time.perf_counter()
        with torch.enable_grad():
            opt.step(closure)
        return {k: v.detach() for k, v in h.items()}, time.perf_counter() - t0

    def search(self, generator: torch.Generator) -> dict[str, Any]:
        """Grid search (shared alpha: a sqrt(budget) x sqrt(budget) grid) or random search (ARD:
        ``budget`` log-uniform samples) in the box alpha in [1e-4, 1e6], beta in [1e-2, 1e4], each
        candidate scored by the closed-form log evidence (what its converged ELBO would be)."""
        B, obj = self.budget, self.objective
        t0 = time.perf_counter()
        if not obj.ard:
            side = max(2, int(math.isqrt(B)))
            la, lb = torch.meshgrid(torch.linspace(math.log(1e-4), math.log(1e6), side, dtype=torch.float64),
                                    torch.linspace(math.log(1e-2), math.log(1e4), side, dtype=torch.float64),
                                    indexing="ij")
            cands = [{"log_alpha": a.reshape(1), "log_beta": b.reshape(1)}
                     for a, b in zip(la.flatten(), lb.flatten())]
            kind = f"grid search ({side} x {side})"
        else:
            u = torch.rand(B, obj.d + 1, generator=generator, dtype=torch.float64)
            la = math.log(1e-4) + u[:, :-1] * (math.log(1e6) - math.log(1e-4))
            lb = math.log(1e-2) + u[:, -1] * (math.log(1e4) - math.log(1e-2))
            cands = [{"log_alpha": a, "log_beta": b.reshape(1)} for a, b in zip(la, lb)]
            kind = f"random search ({B} samples)"
        scores = [self.log_evidence(c) for c in cands]
        best = max(range(len(cands)), key=lambda i: scores[i])
        return {"kind": kind, "hyper": cands[best], "trainings": f"{len(cands)} (closed form)",
                "seconds": time.perf_counter() - t0}

    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        return {"log_evidence": self.log_evidence(hyper), "test_rmse": self.test_rmse(hyper)}

    def describe(self, hyper: Mapping[str, Tensor]) -> dict[str, Any]:
        alpha = hyper["log_alpha"].exp().expand(self.objective.d)
        return {"log_evidence": self.log_evidence(hyper), "test_rmse": self.test_rmse(hyper),
                "alpha": alpha.tolist(), "beta": float(hyper["log_beta"].exp()),
                "kept": [i for i, a in enumerate(alpha.tolist()) if a < self.cfg.evidence.prune]}

    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        t0 = time.perf_counter()
        direct, direct_s = self.direct()
        found = self.search(generator)
        rows = {
            "initial": {**self.describe(self.hyper), "trainings": 1},
            found["kind"]: {**self.describe(found["hyper"]), "trainings": found["trainings"]},
            f"bilevel ({self.method_name}, {self.cfg.outer.steps} outer steps)": {**self.describe(hyper),
                                                                             "trainings": self.cfg.outer.steps},
            "direct: L-BFGS on the closed form": {**self.describe(direct), "trainings": "closed form",
                                                  "seconds": direct_s},
        }
        a_l, a_d = hyper["log_alpha"].exp().expand(self.objective.d), direct["log_alpha"].exp().expand(self.objective.d)
        kept = (a_d < self.cfg.evidence.prune) & (a_l < self.cfg.evidence.prune)
        agreement = {
            "log_evidence_gap": self.log_evidence(direct) - self.log_evidence(hyper),
            "same_kept_coefficients": rows[list(rows)[2]]["kept"] == rows[list(rows)[3]]["kept"],
            "max_rel_alpha_gap_kept": float(((a_l - a_d).abs() / a_d)[kept].max()) if kept.any() else 0.0,
            "rel_beta_gap": abs(float(hyper["log_beta"].exp() / direct["log_beta"].exp()) - 1),
        }
        out = {"task": "evidence", "n": self.objective.N, "features": self.objective.d, "ard": self.objective.ard,
               "true_coef": self.reg.coef.tolist(), "noise": self.reg.noise,
               "method": self.method_name, "rows": rows,
               "agreement": agreement, "identity_at_start": self.identity(self.hyper),
               "identity_at_end": self.identity(hyper), "seconds": time.perf_counter() - t0}
        self.results = out
        return out

    def summary(self, results: dict[str, Any]) -> str:
        return report.evidence(results)

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        return plots.evidence(self, hyper, history, out)
