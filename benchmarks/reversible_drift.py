"""How far reversible learning is from the full unroll, as the horizon grows (float64, 1 thread).

The problem: distillation of the moons data into 4 synthetic batches of 8 points (cycled over the
inner steps) for an ensemble of 3 tanh MLPs 2-16-16-1, momentum SGD (momentum 0.9, 9/10 exactly),
one softplus learning rate per inner step (``--lr``: 0.02, a smooth descent, and 0.1, which turns
chaotic within a few hundred steps), the outer loss the binary cross-entropy on 200 real points. For
each rate, horizon ``n`` and fixed-point resolution ``radix_bits`` it reports

- ``full: perturbed h``: the problem's own sensitivity, ``||g_full(h') - g_full(h)|| / ||g_full(h)||``
  for ``h'`` the synthetic points scaled by ``1 + 1e-13`` (float64 round-off scale),
- ``rel. error dF/dh``: ``||g_rev - g_full|| / ||g_full||`` over all hyperparameters,
- ``rel. error F``: ``|F_rev - F_full| / |F_full|``,
- ``max |w_n|`` difference: how far the fixed-point trajectory's final params are from the float
  ones (``res.params``),
- whether ``w_0`` was recovered bit for bit.

Reversal itself is exact (``w_0`` comes back bit for bit); what differs from the full unroll is the
forward trajectory: every step rounds the update to ``2**-radix_bits`` (and the momentum product to
``n / d``), and the inner dynamics amplify those roundings over the horizon.

    python benchmarks/reversible_drift.py --json benchmarks/results/reversible_drift.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.data import moons_split
from metaopt.models import MLP
from metaopt.optim import schedule


def bce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none")


class TanhDistill(metaopt.MetaObjective):
    """hyper: ``x [4, 8, 2]`` synthetic points (cycled over the steps), ``lr [n]`` raw per-step rates."""

    def __init__(self, members: int = 3, sizes: tuple[int, ...] = (2, 16, 16, 1)) -> None:
        X, _, y, _ = moons_split()
        self.x_real = torch.as_tensor(X[:200], dtype=torch.float64)
        self.y_real = torch.as_tensor(y[:200], dtype=torch.float64).unsqueeze(1)
        self.y_syn = torch.tensor([[0.0], [1.0]] * 4, dtype=torch.float64)
        self.ens = metaopt.Ensemble(MLP(list(sizes), activation="tanh"), members, init="xavier")

    def init_params(self, hyper, generator):
        return self.ens.init_params(generator, dtype=torch.float64)

    def inner_loss(self, params, hyper, k, batch):
        x = hyper["x"][k % hyper["x"].shape[0]]
        return self.ens.losses(params, x, self.y_syn, bce).sum()

    def outer_loss(self, params, hyper, batch):
        return self.ens.losses(params, self.x_real, self.y_real, bce).mean()

    def hparams(self, hyper):
        return {"lr": schedule.table(hyper["lr"], positive="softplus")}


def hyper_for(steps: int, lr: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(4, 8, 2, generator=g, dtype=torch.float64),
            "lr": schedule.inverse_positive(torch.full((steps,), lr, dtype=torch.float64), "softplus")}


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--lr", type=float, nargs="+", default=[0.02, 0.1])
    ap.add_argument("--radix-bits", type=int, nargs="+", default=[40, 48, 56])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    obj, opt = TanhDistill(), optim.momentum(momentum=0.9)
    rows = []
    print("| lr | n | full: perturbed h | radix_bits | rel. error dF/dh | rel. error F | max abs diff of w_n | "
          "w_0 exact | seconds (full, rev.) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lr, n in itertools.product(args.lr, args.steps):
        hyper = hyper_for(n, lr)
        t0 = time.perf_counter()
        full = metaopt.hypergradient(obj, opt, hyper, n, method="full", generator=torch.Generator().manual_seed(0))
        t_full = time.perf_counter() - t0
        # the problem's own sensitivity: the full unroll at h moved by 1e-13 relative (float64 round-off scale)
        nudged = {"x": hyper["x"] * (1 + 1e-13), "lr": hyper["lr"]}
        moved = metaopt.hypergradient(obj, opt, nudged, n, method="full", generator=torch.Generator().manual_seed(0))
        sens = float((flat(moved.grads) - flat(full.grads)).norm() / flat(full.grads).norm())
        for bits in args.radix_bits:
            t0 = time.perf_counter()
            rev = metaopt.hypergradient(obj, opt, hyper, n, method=hg.Reversible(radix_bits=bits),
                                        generator=torch.Generator().manual_seed(0))
            t_rev = time.perf_counter() - t0
            gf, gr = flat(full.grads), flat(rev.grads)
            row = {
                "lr": lr,
                "steps": n,
                "full_perturbed_rel_change": sens,
                "radix_bits": bits,
                "rel_error_grads": float((gr - gf).norm() / gf.norm()),
                "rel_error_loss": float((rev.loss - full.loss).abs() / full.loss.abs()),
                "max_param_diff": max(float((rev.params[k] - full.params[k]).abs().max()) for k in full.params),
                "w0_recovered_exactly": bool(rev.extras["w0_recovered_exactly"]),
                "seconds_full": t_full,
                "seconds_reversible": t_rev,
            }
            rows.append(row)
            print(f"| {lr:g} | {n} | {sens:.1e} | {bits} | {row['rel_error_grads']:.1e} | "
                  f"{row['rel_error_loss']:.1e} | {row['max_param_diff']:.1e} | "
                  f"{row['w0_recovered_exactly']} | {t_full:.2f}, {t_rev:.2f} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
