"""Long-horizon hypergradients of a learned learning-rate schedule: the full unroll, truncation and
zero-order PES/ES (issue 24, item 5).

The inner problem: a small MLP (8 -> 32 -> 1, tanh) regressing a smooth target from 256 noisy
points, SGD with heavy-ball momentum 0.9 on minibatches of 32 for ``--steps`` steps (2000), its
learning rate a learned piecewise-constant schedule: ``--pieces`` pieces (10) of ``steps / pieces``
steps, ``lr_p = exp(raw_p)``, ``h = {"raw": [pieces]}``; the outer loss is the validation mse at the
final weights. float64. The reference is the full unroll's exact ``dF/dh`` (checkpointed, so its
memory is O(sqrt n)). Against it:

* ``truncated(K)`` (Shaban et al. 2019): backpropagates the last ``K`` steps only. With ``K`` shorter
  than a piece it sees the last piece alone (every earlier rate's gradient is exactly 0): the
  short-horizon bias (Wu et al. 2018) at its plainest.
* ``pes(K, N)`` (Vicol et al. 2021): windows of the same ``K`` steps, ``N`` antithetic pairs,
  ``sigma``; unbiased for the (Gaussian-smoothed) ``dF/dh``, with its standard error per element.
* ``es(N)``: one window (plain antithetic ES), for comparison of the variance.

PES and ES run once each with the largest ``N`` of ``--particles`` (1024) and keep their per-pair
estimates (``samples=True``); the estimate of ``N`` pairs is the mean of a group of ``N`` of them, so
``N_max / N`` disjoint groups are independent ``N``-pair estimates from one run. Reported: the
relative error ``||g - g_full|| / ||g_full||``, the cosine similarity, the reported relative standard
error ``||se|| / ||g_full||`` and the largest ``|g - g_full| / se`` over the elements; for each ``N``
the root-mean-square relative error of its estimates (the variance against ``N``) beside the
reported standard error scaled to ``N``.

    python benchmarks/pes_schedule.py                       # writes benchmarks/results/pes_schedule.json
    python benchmarks/pes_schedule.py --plot docs/img/pes_schedule.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.optim import schedule

ROOT = Path(__file__).resolve().parents[1]


class Schedule(metaopt.MetaObjective):
    """An MLP regression trained by SGD whose learning rate is a learned piecewise-constant schedule."""

    def __init__(self, steps: int, pieces: int, batch: int = 32, hidden: int = 32, d: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, d, generator=g, dtype=torch.float64)
        y = torch.sin(x @ torch.randn(d, 1, generator=g, dtype=torch.float64)) + 0.3 * x[:, :1] * x[:, 1:2]
        y = y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)
        self.x, self.y, self.xv, self.yv = x[:256], y[:256], x[256:], y[256:]
        self.steps, self.piece, self.batch, self.hidden, self.d = steps, -(-steps // pieces), batch, hidden, d

    def init_params(self, hyper, generator):
        d, m = self.d, self.hidden
        return {"w1": torch.randn(d, m, generator=generator, dtype=torch.float64) / math.sqrt(d),
                "b1": torch.zeros(m, dtype=torch.float64),
                "w2": torch.randn(m, 1, generator=generator, dtype=torch.float64) / math.sqrt(m),
                "b2": torch.zeros(1, dtype=torch.float64)}

    def inner_batch(self, k, generator):
        return torch.randint(0, len(self.x), (self.batch,), generator=generator)

    @staticmethod
    def predict(params, x):
        return torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

    def inner_loss(self, params, hyper, k, batch):
        r = self.predict(params, self.x[batch]) - self.y[batch]
        return (r * r).mean()

    def outer_loss(self, params, hyper, batch):
        r = self.predict(params, self.xv) - self.yv
        return (r * r).mean()

    def hparams(self, hyper):
        raw, piece = hyper["raw"], self.piece
        return {"lr": lambda k: schedule.positive(schedule.at_step(raw, k // piece), "exp")}


def stats(g: torch.Tensor, ref: torch.Tensor, se: torch.Tensor | None) -> dict[str, Any]:
    out = {"rel_error": float((g - ref).norm() / ref.norm()),
           "cosine": float(g @ ref / (g.norm() * ref.norm()).clamp_min(1e-300))}
    if se is not None:
        out["rel_stderr"] = float(se.norm() / ref.norm())
        out["max_z"] = float(((g - ref).abs() / se).max())
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--pieces", type=int, default=5)
    p.add_argument("--window", type=int, default=200, help="K of truncated(K) and pes(K) (truncated also K/10)")
    p.add_argument("--particles", type=int, nargs="+", default=[16, 64, 256, 1024],
                   help="pair counts N (the largest is run; the others are its disjoint groups of pairs)")
    p.add_argument("--sigma", type=float, default=0.01)
    p.add_argument("--batching-steps", type=int, default=200, help="steps of the vmap-against-loop timing")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/pes_schedule.json")
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 threads on a shared machine were erratic)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    obj = Schedule(args.steps, args.pieces, batch=16, hidden=16, d=4)
    opt = optim.momentum(lr=0.05, momentum=0.9)
    hyper = {"raw": torch.full((args.pieces,), math.log(0.05), dtype=torch.float64)}

    def call(method: hg.Method) -> metaopt.HypergradResult:
        return metaopt.hypergradient(obj, opt, hyper, args.steps, method=method,
                                     generator=torch.Generator().manual_seed(0))

    full = call(hg.Checkpointed())
    ref = full.grads["raw"]
    rows: list[dict[str, Any]] = [{"method": "full (checkpointed)", "seconds": full.seconds,
                                   "grads": ref.tolist(), "loss": float(full.loss), "peak_bytes": full.peak_bytes}]
    print(f"F = {float(full.loss):.5f}, |dF/dh| = {float(ref.norm()):.4g} ({full.seconds:.1f} s)", flush=True)
    for k in sorted({max(1, args.window // 10), args.window}):
        tr = call(hg.Truncated(k))
        rows.append({"method": f"truncated (K={k})", "K": k, "seconds": tr.seconds, "grads": tr.grads["raw"].tolist(),
                     "peak_bytes": tr.peak_bytes, **stats(tr.grads["raw"], ref, None)})
        print(f"truncated K={k}: rel error {rows[-1]['rel_error']:.3f}, cosine {rows[-1]['cosine']:.3f}", flush=True)
    for name in ("pes", "es"):
        # one run of N_max pairs; the estimates of N pairs are its N_max / N disjoint groups of pairs
        # (independent, each exactly what a run with N pairs would return for its noise)
        n_max = max(args.particles)
        method = (hg.PES(window=args.window, particles=n_max, sigma=args.sigma, samples=True) if name == "pes"
                  else hg.ES(particles=n_max, sigma=args.sigma, samples=True))
        res = call(method)
        samples = res.extras["samples"]["raw"]
        g, se = res.grads["raw"], res.extras["stderr"]["raw"]
        rows.append({"method": name, "K": args.window if name == "pes" else args.steps, "N": n_max,
                     "seconds": res.seconds, "peak_bytes": res.peak_bytes, "grads": g.tolist(), "stderr": se.tolist(),
                     "windows": res.extras["windows"], **stats(g, ref, se)})
        print(f"{name} N={n_max}: rel error {rows[-1]['rel_error']:.3f} (rel. stderr {rows[-1]['rel_stderr']:.3f}), "
              f"cosine {rows[-1]['cosine']:.3f}, max |z| {rows[-1]['max_z']:.2f}, {res.seconds:.1f} s", flush=True)
        for n in sorted(args.particles):
            groups = samples[: (n_max // n) * n].reshape(n_max // n, n, -1)
            est, ses = groups.mean(1), groups.std(1) / math.sqrt(n)
            per = [stats(e, ref, s_) for e, s_ in zip(est, ses)]
            mse = float(((est - ref) ** 2).sum(1).mean() / ref.norm() ** 2)
            formula = float(se.norm() / ref.norm()) * math.sqrt(n_max / n)  # the reported stderr scaled to N
            row = {"method": f"{name} groups", "K": rows[-1]["K"], "N": n, "estimates": len(per),
                   "rel_rmse": math.sqrt(mse), "rel_stderr_formula": formula,
                   **{f"mean_{key}": sum(q[key] for q in per) / len(per) for key in ("rel_error", "cosine", "max_z")}}
            rows.append(row)
            print(f"  N={n}: {len(per)} estimates, rms rel. error {row['rel_rmse']:.3f} (formula "
                  f"{row['rel_stderr_formula']:.3f}), mean cosine {row['mean_cosine']:.3f}", flush=True)
    # how to batch the runs: vmap over all 2N + 1, vmap in chunks, or a loop through the eager step (chunk_size=1)
    short = Schedule(args.batching_steps, args.pieces, batch=16, hidden=16, d=4)
    batching = []
    for chunk in (None, 8, 1):
        res = metaopt.hypergradient(short, opt, hyper, args.batching_steps, generator=torch.Generator().manual_seed(0),
                                    method=hg.ES(particles=16, sigma=args.sigma, chunk_size=chunk))
        batching.append({"chunk_size": chunk, "seconds": res.seconds, "peak_bytes": res.peak_bytes})
        print(f"es N=16, {args.batching_steps} steps, chunk_size={chunk}: {res.seconds:.2f} s", flush=True)
    out = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "problem": "MLP 8-32-1 tanh, 256 train / 256 val points, momentum 0.9 SGD, minibatch 32, float64; "
                      "h = log learning rates of a piecewise-constant schedule",
           "rows": rows, "batching": batching, "total_seconds": time.perf_counter() - t_start}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json} ({out['total_seconds']:.0f} s)")
    if args.plot is not None:
        plot(out, args.plot)
    return out


def plot(out: dict[str, Any], path: Path) -> None:
    """Left: the hypergradient per piece (full, truncated, PES with 2 standard errors); right: the
    relative error of PES and ES against the particles (the 1/sqrt(N) law)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    ref = torch.tensor(rows[0]["grads"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = torch.arange(len(ref)).double()
    a.plot(x, ref, "k-o", label="full unroll (exact)")
    for r in rows:
        if r["method"].startswith("truncated"):
            a.plot(x, r["grads"], "--s", color="C0" if "K=20)" in r["method"] else "C1", label=r["method"])
    for shift, color, r in zip((0.12, -0.12), ("C2", "C3"), [r for r in rows if r["method"] in ("pes", "es")]):
        label = f"{r['method']} (K={r['K']}, N={r['N']}) ± 2 s.e." if r["method"] == "pes" else \
            f"es (N={r['N']}) ± 2 s.e."
        a.errorbar(x + shift, r["grads"], yerr=2 * torch.tensor(r["stderr"]), fmt="o", color=color, capsize=3,
                   label=label)
    a.set_xlabel("schedule piece")
    a.set_ylabel("dF / d log lr")
    a.set_title(f"{out['config']['steps']} inner steps, {out['config']['pieces']} learned rates")
    a.axhline(0, color="0.8", lw=0.8)
    a.legend(fontsize=7)
    for name, style, color in (("pes", "o-", "C2"), ("es", "s-", "C3")):
        sel = [r for r in rows if r["method"] == f"{name} groups"]
        ns = [r["N"] for r in sel]
        b.loglog(ns, [r["rel_rmse"] for r in sel], style, color=color,
                 label=f"{name}: rms rel. error of N-pair estimates")
        b.loglog(ns, [r["rel_stderr_formula"] for r in sel], style.replace("-", ":"), color=color, alpha=0.5,
                 label=f"{name}: reported standard error (relative)")
    for color, r in zip(("C0", "C1"), [r for r in rows if r["method"].startswith("truncated")]):
        if r["rel_error"] > 1e-6:  # K = n is the full unroll
            b.axhline(r["rel_error"], ls="-.", lw=1, color=color, label=f"{r['method']}: its bias")
    b.set_xlabel("antithetic pairs N")
    b.set_ylabel("||g - g_full|| / ||g_full||")
    b.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
