"""Bigger models: one hypergradient on digits with a wide MLP and a ConvNet, metaopt vs higher vs torchopt.

Two tasks, each on (a) the MLP 64-256-256-10 (``wide-mlp``, metaopt's batched-matmul path) and (b)
metaopt's ``ConvNet`` on the 8x8 images (``convnet``, the generic ``vmap(functional_call)`` path),
with ``m`` ensemble members and ``n`` inner steps:

* ``distill``: the distillation outer step's hypergradient (the recipe's ``Distillation`` objective):
  one synthetic image per class per inner step, 10 steps per epoch, ``n / 10`` epochs, plain SGD with
  one learnable rate per step (softplus), fresh Xavier inits, outer loss on 256 real images;
  hyperparameters: the synthetic images and the rates.
* ``hpo``: ``n`` momentum-SGD steps (0.9) on minibatches of 64, hypergradient w.r.t. one rate per
  step and one weight decay per parameter tensor (``digits_hpo.DigitsSchedule``, Kaiming inits),
  outer loss the validation cross-entropy.

Implementations: ``metaopt`` (``method="full"``, eager), ``metaopt-compiled`` (``compile=True``),
``metaopt-compiled-ckpt`` (checkpointed every ceil(sqrt(n)) steps, compiled),
``metaopt-compiled-recursive`` (recursive bisection checkpointing, compiled), ``metaopt-budget`` and
``metaopt-compiled-budget`` (``Full(max_memory=B)`` with ``B`` the smaller of higher's and torchopt's
metered trajectory in the cell: the policy the budget chooses, eager / compiled), ``metaopt-budget-2x``
and ``metaopt-compiled-budget-2x`` (``B`` twice that); ``higher`` and
``torchopt`` (``peers.py``: a Python loop over ``m`` modules, each member's outer loss
backpropagated before the next member runs, as in ``distill_step.py``).

The budget rows also give the policy chosen and its predicted peak (``policy``, ``predicted_mb``); the
memory-budget workload of issue 23 (the wide MLP's distillation at m = 10, n = 100 and 500) is

    python benchmarks/big_models.py --tasks distill --models wide-mlp --members 10 --steps 100 500 \
        --impl metaopt-budget metaopt-compiled-budget metaopt-budget-2x higher torchopt \
        --json benchmarks/results/budget_cpu.json

Per cell (task, model, m, n), in one process: every implementation first computes the hypergradient
from the same draws (inits, batches); its largest deviation from eager metaopt's, relative to that
hypergradient's largest entry, is the row's ``max_rel_diff`` (above ``--tol``: a warning, the row's
``agrees`` false, exit status 1 once every row is written). That run's time is ``first_sec``
(with compilation) and it meters the stored trajectory (``traj_mb``): metaopt's own count (``exact_memory=True``)
and, for the peers, the tensors autograd saves during a member's inner run, deduplicated by storage
(the same rule; a peer's peak is one member's run, freed before the next). On CUDA ``peak_mb`` is
``torch.cuda.max_memory_allocated`` growth during one more, unmetered call. Then ``--reps`` timed
calls of each implementation, interleaved, the order rotated every rep; ``sec`` is the median.

    python benchmarks/big_models.py --json benchmarks/results/big_models_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import peers
import torch
import torch.nn.functional as F
from digits_hpo import DigitsSchedule, hyper_for
from torch import Tensor, nn

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.models import MLP, ConvNet
from metaopt.recipes.distill.data import digits
from metaopt.recipes.distill.objective import Distillation

MODELS: dict[str, Callable[[], nn.Module]] = {
    "wide-mlp": lambda: MLP([64, 256, 256, 10]),
    "convnet": lambda: ConvNet((1, 8, 8), 10),
}
TASKS = ("distill", "hpo")
METAOPT = {"metaopt": ("full", False), "metaopt-compiled": ("full", True),
           "metaopt-compiled-ckpt": ("checkpointed", True),
           "metaopt-compiled-recursive": ("recursive", True)}  # impl: (method, compile)
BUDGET = {"metaopt-budget": (1.0, False), "metaopt-compiled-budget": (1.0, True),
          "metaopt-budget-2x": (2.0, False), "metaopt-compiled-budget-2x": (2.0, True)}  # impl: (x peer, compile)
PEERS = ("higher", "torchopt", "hand-loop")
IMPLS = (*METAOPT, *BUDGET, *PEERS)
DEFAULT_IMPLS = ("metaopt", "metaopt-compiled", "metaopt-compiled-ckpt", "higher", "torchopt")


class Cell:
    """One (task, model, m, n): the metaopt objective, its inner optimizer and hyperparameters, and
    the per-member pieces the peers need (:meth:`peer_problem`)."""

    def __init__(self, task: str, model: str, m: int, n: int, device: torch.device) -> None:
        self.task, self.model, self.m, self.n, self.device = task, model, m, n, device
        self.modules = [MODELS[model]().to(device) for _ in range(m)]
        self.budget = 0  # bytes: the smaller peer's metered trajectory, set by bench_cell before a budget row runs
        self.extras: dict[str, dict] = {}  # each budget impl's last result's extras (policy, predicted peak)
        if task == "distill":
            s = 10 if n % 10 == 0 else n
            self.objective: Any = Distillation(digits(), {model: MODELS[model]()}, {"row": [model] * m}, restarts=1,
                                               steps_per_epoch=s, epochs=n // s, per_class=1, batch=256,
                                               device=device)
            self.optimizer, self.momentum = optim.sgd(), None
            self.hyper = self.objective.init_hyper(torch.Generator().manual_seed(0), lr=0.1)
        else:
            self.objective = DigitsSchedule(n, module=MODELS[model](), members=m, device=device)
            self.optimizer, self.momentum = optim.momentum(momentum=0.9), 0.9
            self.hyper = hyper_for(self.objective, lr=0.05)

    def member_params(self, params0: Mapping[str, Tensor], j: int) -> dict[str, Tensor]:
        """Member ``j``'s start, named as in its module (the distillation's keys carry a group prefix)."""
        prefix = f"{self.model}." if self.task == "distill" else ""
        return {k[len(prefix):]: v[j] for k, v in params0.items()}

    def peer_problem(self, h: Mapping[str, Tensor], batches: list[Any], outer_batch: Any) -> tuple:
        """``(inner_loss(k, forward, params), lr(k), outer(forward), decay)`` of one member (see peers.py)."""
        obj, m = self.objective, self.m
        if self.task == "distill":
            y_syn, real = obj.y_class, outer_batch.reshape(-1)
            X, y = obj.data.X[real], obj.data.y[real]
            return (lambda k, f, p: F.cross_entropy(f(h["x"][0, k % obj.s]), y_syn),
                    lambda k: F.softplus(h["lr"][k, 0]),
                    lambda f: F.cross_entropy(f(X), y) / m, None)

        def inner(k: int, f: peers.Forward, p: Mapping[str, Tensor]) -> Tensor:
            return F.cross_entropy(f(obj.Xtr[batches[k]]), obj.ytr[batches[k]])

        decay = _Decay({name: v for name, v in h.items() if name != "lr"})
        return (inner, lambda k: F.softplus(h["lr"][k]), lambda f: F.cross_entropy(f(obj.Xva), obj.yva) / m,
                decay)


class _Decay(dict):
    """``{param name: softplus(raw)}``, computed when read (each member's graph its own)."""

    def __getitem__(self, name: str) -> Tensor:
        return F.softplus(super().__getitem__(name)[0])


def make(impl: str, cell: Cell) -> Callable[[torch.Generator, bool], tuple[dict[str, Tensor], int]]:
    """``step(generator, meter) -> (hypergradient, trajectory bytes or 0)``: one hypergradient,
    the draws from ``generator`` (every implementation draws alike)."""
    if impl in METAOPT:
        method, compile = METAOPT[impl]

        def step(gen: torch.Generator, meter: bool) -> tuple[dict[str, Tensor], int]:
            res = metaopt.hypergradient(cell.objective, cell.optimizer, cell.hyper, cell.n, method=method,
                                        generator=gen, compile=compile, exact_memory=meter)
            return res.grads, res.peak_bytes

        return step
    if impl in BUDGET:
        factor, compile = BUDGET[impl]

        def budget_step(gen: torch.Generator, meter: bool) -> tuple[dict[str, Tensor], int]:
            if cell.budget <= 0:
                raise RuntimeError(f"{impl}: the peers' trajectory sets the budget; run higher or torchopt in the cell")
            res = metaopt.hypergradient(cell.objective, cell.optimizer, cell.hyper, cell.n,
                                        method=hg.Full(max_memory=int(factor * cell.budget)), generator=gen,
                                        compile=compile, exact_memory=meter)
            cell.extras[impl] = res.extras
            return res.grads, res.peak_bytes

        return budget_step
    run = peers.RUNS[impl]

    def peer_step(gen: torch.Generator, meter: bool) -> tuple[dict[str, Tensor], int]:
        obj = cell.objective
        h = {k: v.detach().clone().requires_grad_() for k, v in cell.hyper.items()}
        with torch.no_grad():
            params0 = obj.init_params(h, gen)
        batches = [obj.inner_batch(k, gen) for k in range(cell.n)]
        inner, lr, outer, decay = cell.peer_problem(h, batches, obj.outer_batch(gen))
        saved = peers.SavedMeter() if meter else None
        peers.member_loop(cell.modules, lambda j, model, trace: run(
            model, cell.member_params(params0, j), cell.n, inner, lr, outer, cell.momentum, decay, trace), saved)
        return {k: v.grad for k, v in h.items()}, saved.peak if saved else 0

    return peer_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_cell(cell: Cell, impls: list[str], reps: int, tol: float, seed: int = 0) -> list[dict]:
    steps = {name: make(name, cell) for name in impls}
    ref_name = impls[0]
    rows: dict[str, dict] = {}
    flats: dict[str, Tensor] = {}
    # the check run: same draws for everyone, trajectory metered; the budget rows after the peers,
    # whose smaller metered trajectory is their budget
    for name in sorted(impls, key=lambda n: n in BUDGET):
        if name in BUDGET and not cell.budget:
            cell.budget = min((rows[p]["traj_mb"] * 2**20 for p in ("higher", "torchopt") if p in rows), default=0)
        t0 = time.perf_counter()
        grads, traj = steps[name](torch.Generator().manual_seed(seed), True)
        first = time.perf_counter() - t0  # with the compiled variants' compilation, and the meter's hooks
        flats[name] = torch.cat([grads[k].reshape(-1) for k in sorted(grads)]).double()
        rows[name] = {"task": cell.task, "model": cell.model, "m": cell.m, "n": cell.n, "impl": name,
                      "device": cell.device.type, "traj_mb": traj / 2**20, "peak_mb": float("nan"), "first_sec": first,
                      "reps": reps}
        if name in BUDGET:
            extras = cell.extras[name]
            rows[name] |= {"policy": extras["policy"], "predicted_mb": extras["predicted_peak_bytes"] / 2**20,
                           "budget_mb": extras["max_memory"] / 2**20}
    rows = {name: rows[name] for name in impls}
    ref = flats[ref_name]
    for name in impls:
        diff = float((flats[name] - ref).abs().max() / ref.abs().max())
        if not diff <= tol:  # timed all the same (the row says so); main() exits with status 1
            print(f"WARNING {cell.task} {cell.model} m={cell.m} n={cell.n}: {name}'s hypergradient differs from "
                  f"{ref_name}'s by {diff:.2e} (relative to its largest entry) > --tol {tol}", flush=True)
        rows[name] |= {"max_rel_diff": diff, "agrees": diff <= tol}
    if cell.device.type == "cuda":
        for name, fn in steps.items():
            _sync(cell.device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(torch.Generator().manual_seed(seed), False)
            _sync(cell.device)
            rows[name]["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    times: dict[str, list[float]] = {n: [] for n in impls}
    gen = torch.Generator().manual_seed(seed + 1)
    for rep in range(reps):
        order = impls[rep % len(impls):] + impls[: rep % len(impls)]  # rotated: no one always runs first
        for name in order:
            _sync(cell.device)
            t0 = time.perf_counter()
            steps[name](gen, False)
            _sync(cell.device)
            times[name].append(time.perf_counter() - t0)
    for name in impls:
        rows[name]["sec"] = statistics.median(times[name])
        rows[name]["secs"] = times[name]
        r = rows[name]
        print(f"{cell.task:7s} {cell.model:8s} m={cell.m:2d} n={cell.n:3d} {name:21s} {r['sec']:8.3f} s "
              f"traj {r['traj_mb']:8.1f} MB  peak {r['peak_mb']:8.1f} MB  diff {r['max_rel_diff']:.1e}"
              + (f"  {r['policy']} (budget {r['budget_mb']:.1f} MB, predicted {r['predicted_mb']:.1f} MB)"
                 if "policy" in r else ""), flush=True)
    return list(rows.values())


def _mb(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.1f}"


def table(rows: list[dict]) -> str:
    """Markdown: time and trajectory memory, each over the faster (time) / smaller (memory) of
    higher and torchopt in its cell (< 1: metaopt wins)."""

    def best(r: dict, key: str) -> float:
        vals = [x[key] for x in rows if x["impl"] in ("higher", "torchopt")
                and all(x[c] == r[c] for c in ("task", "model", "m", "n"))]
        return min(vals) if vals else float("nan")

    out = ["| task | model | m | n | impl | s | / faster peer | traj MB | / smaller peer | peak MB | max rel. diff |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        impl = f"{r['impl']}: {r['policy']}" if "policy" in r else r["impl"]
        out.append(f"| {r['task']} | {r['model']} | {r['m']} | {r['n']} | {impl} | {r['sec']:.3f} | "
                   f"{r['sec'] / best(r, 'sec'):.2f} | {r['traj_mb']:.1f} | {r['traj_mb'] / best(r, 'traj_mb'):.3f} | "
                   f"{_mb(r['peak_mb'])} | {r['max_rel_diff']:.1e} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--members", nargs="+", type=int, default=[1, 3, 10])
    ap.add_argument("--steps", nargs="+", type=int, default=[100, 500], help="inner steps n")
    ap.add_argument("--impl", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS,
                    help="the first is the reference of max_rel_diff")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-2,
                    help="largest relative deviation from the first impl (float32 rounding grows along the run)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--json", help="write the rows here (a list of dicts)")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the markdown table of saved rows")
    args = ap.parse_args()
    if args.table:
        saved = [r for path in args.table for r in json.load(open(path))]
        print(table(saved))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False here")
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions on CUDA for everyone (the check's tolerance)
    device = torch.device(args.device)
    rows: list[dict] = []
    for task in args.tasks:
        for model in args.models:
            for n in args.steps:
                for m in args.members:
                    rows += bench_cell(Cell(task, model, m, n, device), list(args.impl), args.reps, args.tol)
                    if args.json:  # after every cell: a long run leaves its finished cells behind
                        with open(args.json, "w") as f:
                            json.dump(rows, f, indent=1)
    print()
    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s), median of {args.reps}")
    print(table(rows))
    if not all(r["agrees"] for r in rows):
        raise SystemExit(f"some hypergradients differ from {args.impl[0]}'s by more than --tol {args.tol} (see above)")


if __name__ == "__main__":
    main()
