"""Error vs time vs memory of every hypergradient method on two problems, float64, 1 thread.

1. The distillation outer step (moons, 2-layer MLP x 3 members, 40 steps x 5 epochs = 200 inner steps
   of momentum SGD; 840 hyperparameters: synthetic points and per-step rates).
2. Per-feature L2 logistic regression on scikit-learn's bundled breast-cancer data (30 hyperparameters,
   log-penalties; the ``hpo`` recipe's ``L2LogReg``, 284 / 143 / 142 split), 500 full-batch
   momentum-SGD steps of size 1 / L, validation log-loss as the outer loss.

Errors are against five-point central differences along 3 random directions (implicit methods:
against the re-solved inner problem), via ``metaopt.hypergrad.check``.

    python benchmarks/methods.py --json benchmarks/results/methods.json
"""

from __future__ import annotations

import argparse
import json

import torch

from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.recipes.demo import MoonsDistillation
from metaopt.recipes.hpo import L2LogReg
from metaopt.recipes.hpo import data as hpo_data


def problems() -> dict[str, tuple]:
    distill = MoonsDistillation([2, 10, 1], members=3, steps_per_epoch=40, epochs=5, per_class=4, batch=None,
                                dtype=torch.float64)
    logreg = L2LogReg(hpo_data.table("breast_cancer"), "per_feature")  # the hpo recipe's objective
    return {
        "distillation (n=200)": (distill, optim.momentum(momentum=0.9), distill.init_hyper(
            torch.Generator().manual_seed(0), lr=0.02), distill.steps),
        "breast-cancer L2 logreg (n=500)": (logreg, optim.momentum(momentum=0.9), logreg.init_hyper(-4.0), 500),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    out = []
    for name, (obj, opt, hyper, steps) in problems().items():
        rows = hg.check(obj, opt, hyper, steps)
        print(f"\n{name}, {sum(h.numel() for h in hyper.values())} hyperparameters")
        print("| method | rel. error vs FD | cosine to exact | seconds | stored KiB |")
        print("|---|---|---|---|---|")
        for r in rows:
            r["problem"] = name
            if "error" in r:
                print(f"| {r['method']} | n/a: {r['error']} | | | |")
            else:
                print(f"| {r['method']} | {r['rel_error']:.1e} | {r['cosine']:.6f} | {r['seconds']:.3f} | "
                      f"{r['peak_bytes'] / 1024:.0f} |")
        out += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
