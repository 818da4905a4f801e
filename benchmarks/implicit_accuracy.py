"""What the implicit methods achieve: accuracy against a closed form, and CG's Hessian-vector products.

1. Ridge regression (40 x 5, per-feature penalties ``exp(log_lam)``, the problem of
   ``tests/test_implicit.py`` and docs/hypergrad.md), trained by ``optim.sgd(lr=0.2)`` for 300 steps
   and then in further rounds until ``||grad_w L|| <= inner_tol``: the relative error of
   ``dF/dlog_lam`` against the normal equations' closed form, for every solver and two settings of
   (linear-solve ``tol``, ``inner_tol``).
2. CG's Hessian-vector products (``extras["matvecs"]``) to a relative residual of 1e-8 on
   scikit-learn's breast-cancer data (the ``hpo`` recipe's 284 / 143 / 142 split, 30 standardised
   features), per-feature penalties ``exp(log_lam)`` all equal to ``exp(c)``:
   - L2 logistic regression (the ``hpo`` recipe's ``L2LogReg``, step ``1 / L``),
   - ridge regression on the 0/1 labels (mean squared error + ``sum exp(log_lam) w^2``, SGD at
     ``1 / L``),
   each inner problem solved to ``||grad_w L|| <= 1e-10`` first. CG needs at most ``d`` (+ 1 for a
   bias) products in exact arithmetic; how many it needs to 1e-8 depends on the Hessian's spectrum,
   i.e. on the problem and the penalties.

All in float64, 1 thread.

    python benchmarks/implicit_accuracy.py --json benchmarks/results/implicit_accuracy.json
"""

from __future__ import annotations

import argparse
import json

import torch

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.recipes.hpo import L2LogReg
from metaopt.recipes.hpo import data as hpo_data


class Ridge(metaopt.MetaObjective):
    """inner: mean squared error + sum_i exp(log_lam_i) w_i^2; outer: validation mean squared error."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor) -> None:
        self.X, self.y, self.Xv, self.yv = X, y, Xv, yv
        self.L = 2 * float(torch.linalg.matrix_norm(X, ord=2) ** 2) / X.shape[0]  # Lipschitz constant of the MSE

    @classmethod
    def small(cls, n: int = 40, d: int = 5, seed: int = 0) -> Ridge:
        g = torch.Generator().manual_seed(seed)
        X, Xv = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        w_true = torch.randn(d, generator=g)
        y = X @ w_true + 0.5 * torch.randn(n, generator=g)
        yv = Xv @ w_true + 0.5 * torch.randn(n, generator=g)
        return cls(X, y, Xv, yv)

    def init_params(self, hyper, generator):
        return {"w": torch.zeros(self.X.shape[1])}

    def inner_loss(self, params, hyper, k, batch):
        w = params["w"]
        return ((self.X @ w - self.y) ** 2).mean() + (hyper["log_lam"].exp() * w**2).sum()

    def outer_loss(self, params, hyper, batch):
        return ((self.Xv @ params["w"] - self.yv) ** 2).mean()

    def closed_form(self, log_lam: torch.Tensor) -> torch.Tensor:
        """dF/dlog_lam from the normal equations."""
        n = self.X.shape[0]
        lam = log_lam.exp()
        A = 2 * self.X.T @ self.X / n + 2 * torch.diag(lam)
        w = torch.linalg.solve(A, 2 * self.X.T @ self.y / n)
        v = torch.linalg.solve(A, 2 * self.Xv.T @ (self.Xv @ w - self.yv) / n)
        return -(2 * lam * w) * v


def ridge_accuracy() -> list[dict]:
    obj = Ridge.small()
    log_lam = torch.tensor([-2.0, -1.0, 0.0, -3.0, -1.5])
    exact = obj.closed_form(log_lam)
    rows = []
    print("\nridge 40 x 5 against the closed form")
    print("| solver | tol | inner_tol | rel. error dF/dlog_lam | inner grad norm | matvecs |")
    print("|---|---|---|---|---|---|")
    for tol, inner_tol in ((1e-8, 1e-8), (1e-12, 1e-13)):
        for solver in ("cg", "neumann", "fixed_point", "dense"):
            res = metaopt.hypergradient(obj, optim.sgd(lr=0.2), {"log_lam": log_lam}, 300,
                                        method=hg.Implicit(solver, tol=tol, inner_tol=inner_tol))
            err = float((res.grads["log_lam"] - exact).norm() / exact.norm())
            row = {"problem": "ridge 40x5", "solver": solver, "tol": tol, "inner_tol": inner_tol, "rel_error": err,
                   "inner_grad_norm": res.extras["inner_grad_norm"], "matvecs": res.extras["matvecs"]}
            rows.append(row)
            print(f"| {solver} | {tol:g} | {inner_tol:g} | {err:.1e} | {row['inner_grad_norm']:.1e} | "
                  f"{row['matvecs']} |", flush=True)
    return rows


def cg_matvecs(levels: list[float]) -> list[dict]:
    split = hpo_data.table("breast_cancer")
    logreg = L2LogReg(split, "per_feature")
    dt = torch.float64
    ridge = Ridge(split.X.to(dt), split.y.to(dt), split.X_val.to(dt), split.y_val.to(dt))
    rows = []
    print("\nCG Hessian-vector products to 1e-8, breast cancer, per-feature penalties exp(c)")
    print("| problem | c | matvecs | CG residual | inner grad norm | inner steps |")
    print("|---|---|---|---|---|---|")
    for name, obj in (("L2 logistic regression", logreg), ("ridge", ridge)):
        for c in levels:
            if obj is logreg:
                hyper, opt = logreg.init_hyper(c), optim.sgd()  # lr = 1 / L from the objective's hparams
                lip = logreg.L_data + float(torch.tensor(c).exp())
            else:
                hyper = {"log_lam": torch.full((split.features,), c, dtype=dt)}
                lip = ridge.L + 2 * float(torch.tensor(c).exp())
                opt = optim.sgd(lr=1.0 / lip)
            method = hg.Implicit("cg", tol=1e-8, inner_tol=1e-10, max_inner_rounds=2000)
            res = metaopt.hypergradient(obj, opt, hyper, 500, method=method)
            row = {"problem": f"breast cancer {name}", "log_lam": c, "matvecs": res.extras["matvecs"],
                   "residual": res.extras["residual"], "inner_grad_norm": res.extras["inner_grad_norm"],
                   "inner_steps": 500 * res.extras["inner_rounds"], "lipschitz": lip}
            rows.append(row)
            print(f"| {name} | {c:g} | {row['matvecs']} | {row['residual']:.1e} | {row['inner_grad_norm']:.1e} | "
                  f"{row['inner_steps']} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=float, nargs="+", default=[-4.0, -2.0, 0.0, 2.0])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    rows = ridge_accuracy() + cg_matvecs(args.levels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
