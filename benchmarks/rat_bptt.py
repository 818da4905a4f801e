"""Random truncation (RaT-BPTT) against the full unroll on digits, at equal wall time.

The distillation recipe's digits setting (one synthetic image per class per inner step, learnable
per-step rates, Adam on them, a real batch of 256, fresh Xavier inits every outer step), MLP row
only, with a longer inner run (``--n`` steps; RaT-BPTT's claimed advantage is on long unrolls).
Every method distils from the same start for the same budget of seconds of outer steps: the methods
take outer steps interleaved in this one process, each until its own clock (hypergradient +
meta-update) reaches ``--budget``; a cheaper method takes more outer steps. The next step is always
the one of the method whose clock is furthest behind, so the methods share every period of the
(shared, noisy) machine alike and finish together.
Snapshots of the synthetic data at a quarter, half and all of the budget are then judged by the
recipe's evaluation: ``--inits`` fresh initialisations of the MLP trained on the distilled schedule
(``raw``: the ``n`` learned steps) for every distillation, test accuracy mean and std over all.

    python benchmarks/rat_bptt.py --json benchmarks/results/rat_bptt.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from metaopt.recipes.distill import Config
from metaopt.recipes.distill import evaluate as ev
from metaopt.recipes.distill.task import DistillTask
from metaopt.run.config import from_dict
from metaopt.run.meta import OuterLoop

FRACTIONS = (0.25, 0.5, 1.0)


def make_task(args: argparse.Namespace, method: str, window: int | None) -> DistillTask:
    """The digits distillation (MLP row) for ``method``; ``window`` for the truncated methods."""
    distill: dict[str, Any] = {
        "dataset": "digits", "archs": ["mlp"], "rows": ["mlp"], "restarts": args.restarts, "members": args.members,
        "steps_per_epoch": 10, "epochs": args.n // 10, "per_class": 1, "lr": 0.1, "batch": 256,
        "compile": args.compile,
    }
    table: dict[str, Any] = {"name": method}
    if window is not None:
        table["k" if method == "truncated" else "window"] = window
    cfg = from_dict(Config, {"seed": args.seed, "distill": distill, "method": table, "eval": {"epochs": args.n // 10}})
    return DistillTask(cfg, torch.device("cpu"))


def accuracy(task: DistillTask, hyper: dict[str, torch.Tensor], inits: int, seed: int) -> tuple[float, float]:
    """Test accuracy of ``inits`` fresh MLPs per distillation trained on the distilled ``raw``
    schedule: mean and std over every (distillation, init)."""
    obj = task.objective
    table = ev.distilled_table(task, hyper, torch.Generator().manual_seed(seed), inits, ["raw"],
                               ev.Strategies(epochs=obj.epochs), task.models)
    acc = table.acc["raw"]["mlp"].flatten().double()
    return float(acc.mean()), float(acc.std())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=150, help="inner steps (a multiple of 10)")
    p.add_argument("--window", type=int, default=30, help="W of random_truncated (and of truncated)")
    p.add_argument("--budget", type=float, default=360.0, help="seconds of outer steps per method")
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--inits", type=int, default=10, help="fresh initialisations per distillation, evaluation")
    p.add_argument("--meta-lr", type=float, default=0.01)
    p.add_argument("--methods", default="full,random_truncated,truncated")
    p.add_argument("--compile", action="store_true", help="torch.compile the inner step (warm-up not timed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    torch.set_num_threads(1)

    names = args.methods.split(",")
    tasks = {m: make_task(args, m, args.window if m in ("truncated", "random_truncated") else None) for m in names}
    loop = OuterLoop("adam")
    states = {m: loop.init(t.hyper, args.meta_lr) for m, t in tasks.items()}
    gens = {m: torch.Generator().manual_seed(args.seed + 1) for m in names}
    clocks = {m: 0.0 for m in names}
    draws: dict[str, list[int]] = {m: [] for m in names}
    snaps: dict[str, dict[float, tuple[int, dict[str, torch.Tensor]]]] = {m: {} for m in names}
    if args.compile:  # compile outside the budget, on a throwaway copy of the state
        for t in tasks.values():
            st = loop.init(t.hyper, args.meta_lr)
            loop.step(st, lambda h, g, t=t: t.hypergradient(t.objective, h, g), torch.Generator().manual_seed(99))
    t_start = time.perf_counter()
    step_seconds: dict[str, list[float]] = {m: [] for m in names}
    while any(c < args.budget for c in clocks.values()):
        m = min((c, m) for m, c in clocks.items() if c < args.budget)[1]  # the method furthest behind
        task, st = tasks[m], states[m]
        t0 = time.perf_counter()
        task.begin_step(st.step, 10**9)
        _, res = loop.step(st, lambda h, g, task=task: task.hypergradient(task.objective, h, g), gens[m])
        st.step += 1
        step_seconds[m].append(time.perf_counter() - t0)
        clocks[m] += step_seconds[m][-1]
        if "t" in res.extras:
            draws[m].append(res.extras["t"])
        for f in FRACTIONS:
            if f not in snaps[m] and clocks[m] >= f * args.budget:
                snaps[m][f] = (st.step, {k: v.detach().clone() for k, v in st.hyper.items()})
    seconds = time.perf_counter() - t_start

    rows = []
    for m, task in tasks.items():
        for f in FRACTIONS:
            steps, hyper = snaps[m][f]
            mean, std = accuracy(task, hyper, args.inits, args.seed + 2)
            rows.append({"method": m, "window": args.window if m != "full" else None, "n": args.n,
                         "budget_fraction": f, "outer_steps": steps, "seconds": round(f * args.budget, 1),
                         "acc_mean": mean, "acc_std": std, "median_step_s": statistics.median(step_seconds[m]),
                         "evaluated": args.restarts * args.inits})
        d = draws[m]
        extra = f", mean t {statistics.mean(d):.1f} in [{min(d)}, {max(d)}]" if d else ""
        print(f"{m}: {states[m].step} outer steps in {clocks[m]:.0f} s (median "
              f"{statistics.median(step_seconds[m]):.3f} s){extra}")
    print(f"(all methods, interleaved: {seconds:.0f} s)")
    print(f"| method | outer steps | seconds | test accuracy (n = {args.n}, {args.restarts} x {args.inits} inits) |")
    print("|---|---:|---:|---|")
    for r in rows:
        label = r["method"] + (f" (W={r['window']})" if r["window"] else "")
        print(f"| {label} | {r['outer_steps']} | {r['seconds']:.0f} | {r['acc_mean']:.3f} ± {r['acc_std']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
