"""Gradient-based HPO against Optuna's TPE at equal wall-clock time, on two tasks of the ``hpo`` recipe.

(a) ``l2`` (preset ``l2``): per-feature L2 penalties of logistic regression on breast cancer,
    30 hyperparameters ``log lambda`` in ``[l2.low, l2.high]``.
    * hypergradient: the recipe's own outer loop (its task's HOAG hypergradient, Adam on the
      hyperparameters: the runner's ``OuterLoop``);
    * TPE over the 30 log-penalties, and TPE over one shared log-penalty (the low-dimensional
      parameterisation a user would try first). A trial trains with ``L2Task.judge(converge=False)``:
      the inner solve the hypergradient method runs (rounds of ``hpo.steps`` to the method's inner
      tolerance, HOAG's ``min_tol = 1e-6``).
(b) ``cleaning`` (preset ``cleaning``): data hyper-cleaning on digits, half the labels corrupted,
    one weight per training example (898 hyperparameters).
    * hypergradient: the recipe's outer loop (full unroll of the 100 inner steps, Adam);
    * TPE over the 898 weights in ``[0, 1]``, and TPE over one kept fraction of small-loss filtering
      (``CleaningTask.small_loss_keep``; the all-data model it needs is trained inside the budget).
      A trial is ``CleaningTask.judge``: the same 100 steps from zero as the hypergradient's inner run.

Every method runs for the same wall-clock budget (it starts no evaluation after the budget; only
evaluations finished within it count). Curves: the best validation loss so far against wall time,
as each method measured it (the hypergradient's outer loss; the trial's value). The best setting of
each run is then judged by the recipe's own protocol, outside the budget (``l2``: retrained to
convergence; ``cleaning``: the same training): validation loss and test accuracy. ``--seeds``: each
seed is a new split (and corruption) of the data and TPE's sampler seed; the methods run one after
another in one process, in an order rotated per seed, one intra-op thread.

    python benchmarks/hpo_vs_optuna.py --budget 50 --seeds 0 1 2 --json benchmarks/results/hpo_vs_optuna.json \\
        --plot docs/recipes/img/hpo_vs_optuna.png

Needs the ``bench`` extra (Optuna): ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.recipes.hpo import RECIPE
from metaopt.recipes.hpo.cleaning import CleaningTask
from metaopt.recipes.hpo.l2 import L2Task
from metaopt.recipes.hpo.task import HPOTask, build
from metaopt.run import resolve_config
from metaopt.run.meta import OuterLoop, RunStopped

TASKS = {"l2": "l2", "cleaning": "cleaning"}  # task -> the recipe preset it runs
INSTALL = 'Optuna is missing: this benchmark needs the bench extra, pip install -e ".[bench]"'


def import_optuna() -> Any:
    """Optuna, quiet; exits with the install line when it is missing."""
    try:
        import optuna
    except ImportError:
        sys.exit(INSTALL)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class Run:
    """One method's run: ``evals`` rows ``[seconds since the start, validation loss]`` (one per
    outer step or trial), ``best`` the setting of the lowest loss among those finished within the
    budget (None if none did), and the run's process CPU and wall seconds."""

    evals: list[list[float]]
    best: Any
    cpu_seconds: float
    seconds: float


def best_so_far(evals: list[list[float]], budget: float) -> list[list[float]]:
    """``[[t, best validation loss up to t]]`` at every improvement among ``evals`` finished by ``budget``."""
    out: list[list[float]] = []
    for t, loss in evals:
        if t <= budget and math.isfinite(loss) and (not out or loss < out[-1][1]):
            out.append([t, loss])
    return out


def hypergradient_run(task: HPOTask, budget: float, seed: int) -> Run:
    """The recipe's outer loop (the runner's :class:`OuterLoop` on the task's hypergradient) until
    ``budget`` seconds have passed. A row's loss is that of the hyperparameters before its update."""
    out = task.cfg.outer
    loop = OuterLoop(out.meta_optimizer, clip=out.clip, max_bad_steps=out.max_bad_steps,
                     bad_lr_factor=out.bad_lr_factor)
    st = loop.init(task.hyper, out.meta_lr)
    generator = torch.Generator().manual_seed(seed)
    evals: list[list[float]] = []
    best, best_loss = None, math.inf
    c0, t0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < budget:
        hyper = {k: v.clone() for k, v in st.hyper.items()}
        task.begin_step(st.step, out.steps)
        try:
            row, _ = loop.step(st, lambda h, g: task.hypergradient(task.objective, h, g), generator)
        except RunStopped:
            break
        st.step += 1
        t = time.perf_counter() - t0
        evals.append([t, row["loss"]])
        if t <= budget and row["loss"] < best_loss:
            best, best_loss = hyper, row["loss"]
    return Run(evals, best, time.process_time() - c0, time.perf_counter() - t0)


def tpe_run(space: Callable[[Any], Any], trial: Callable[[Any], float], budget: float, seed: int) -> Run:
    """Optuna's TPE (default sampler, ``seed``) by ask and tell: ``space(optuna_trial)`` suggests a
    setting, ``trial(setting)`` trains with it and returns the validation loss, until ``budget``."""
    optuna = import_optuna()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    evals: list[list[float]] = []
    best, best_loss = None, math.inf
    c0, t0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < budget:
        ask = study.ask()
        setting = space(ask)
        loss = trial(setting)
        if math.isfinite(loss):
            study.tell(ask, loss)
        else:  # a diverged training: a failed trial, as Optuna records it
            study.tell(ask, state=optuna.trial.TrialState.FAIL)
        t = time.perf_counter() - t0
        evals.append([t, loss])
        if t <= budget and loss < best_loss:
            best, best_loss = setting, loss
    return Run(evals, best, time.process_time() - c0, time.perf_counter() - t0)


@dataclass
class Method:
    """A method on a task: ``run(task, budget, seed) -> Run`` and ``judge(task, best) -> {val_loss,
    test_acc}`` (the recipe's protocol on the run's best setting)."""

    name: str
    hyperparameters: Callable[[HPOTask], int]
    run: Callable[[HPOTask, float, int], Run]
    judge: Callable[[HPOTask, Any], dict[str, float]]


def _first(m: dict[str, Tensor]) -> dict[str, float]:
    return {"val_loss": float(m["val_loss"][0]), "test_acc": float(m["test_acc"][0])}


def l2_methods() -> list[Method]:
    def lows(task: L2Task) -> tuple[float, float]:
        return task.cfg.l2.low, task.cfg.l2.high

    def per_feature(tr: Any, task: L2Task) -> Tensor:
        lo, hi = lows(task)
        return torch.tensor([[tr.suggest_float(f"log_lam{j}", lo, hi) for j in range(task.objective.d)]])

    def shared(tr: Any, task: L2Task) -> Tensor:
        return torch.tensor([tr.suggest_float("log_lam", *lows(task))])

    return [
        Method("hypergradient (HOAG)", lambda t: t.hyper["log_lam"].numel(), hypergradient_run,
               lambda t, h: _first(t.judge(h["log_lam"]))),
        Method("TPE, per-feature", lambda t: t.objective.d,
               lambda t, b, s: tpe_run(lambda tr: per_feature(tr, t),
                                       lambda x: float(t.judge(x, converge=False)["val_loss"][0]), b, s),
               lambda t, x: _first(t.judge(x))),
        Method("TPE, one shared lambda", lambda t: 1,
               lambda t, b, s: tpe_run(lambda tr: shared(tr, t),
                                       lambda x: float(t.judge(x, "single", converge=False)["val_loss"][0]), b, s),
               lambda t, x: _first(t.judge(x, "single"))),
    ]


def cleaning_methods() -> list[Method]:
    def weights(tr: Any, task: CleaningTask) -> Tensor:
        n = task.corrupted.numel()
        return task.logit_of(torch.tensor([[tr.suggest_float(f"w{i}", 0.0, 1.0) for i in range(n)]]))

    def kept(tr: Any, task: CleaningTask) -> Tensor:
        fraction = torch.tensor([tr.suggest_float("kept_fraction", 0.05, 1.0)], dtype=torch.float64)
        return task.logit_of(task.small_loss_keep(fraction))

    judge = lambda t, logit: _first(t.judge(logit))  # noqa: E731
    trial = lambda t: lambda logit: float(t.judge(logit)["val_loss"][0])  # noqa: E731
    return [
        Method("hypergradient (full unroll)", lambda t: t.hyper["logit"].numel(), hypergradient_run,
               lambda t, h: judge(t, h["logit"])),
        Method("TPE, per-example weights", lambda t: t.corrupted.numel(),
               lambda t, b, s: tpe_run(lambda tr: weights(tr, t), trial(t), b, s), judge),
        Method("TPE, small-loss kept fraction", lambda t: 1,
               lambda t, b, s: tpe_run(lambda tr: kept(tr, t), trial(t), b, s), judge),
    ]


METHODS = {"l2": l2_methods, "cleaning": cleaning_methods}


def make_task(name: str, seed: int) -> HPOTask:
    cfg, _ = resolve_config(RECIPE, preset=TASKS[name], seed=seed)
    return build(cfg, torch.device("cpu"))


def references(name: str, seed: int) -> dict[str, dict[str, float]]:
    """Fixed settings for orientation (``cleaning``: all noisy data, and the clean-only oracle)."""
    if name != "cleaning":
        return {}
    task = make_task(name, seed)
    assert isinstance(task, CleaningTask)
    n = task.corrupted.numel()
    ones = torch.ones(1, n, dtype=torch.float64)
    clean = (~task.corrupted).double().unsqueeze(0)
    return {"all noisy data": _first(task.judge(task.logit_of(ones))),
            "oracle: clean examples only": _first(task.judge(task.logit_of(clean)))}


def bench(tasks: list[str], seeds: list[int], budget: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Every method of every task for ``budget`` seconds per seed; rows and references."""
    rows: list[dict[str, Any]] = []
    refs: dict[str, Any] = {}
    for seed in seeds:
        for name in tasks:
            methods = METHODS[name]()
            k = seed % len(methods)
            for m in methods[k:] + methods[:k]:  # rotated per seed: drifting load hits every method
                task = make_task(name, seed)  # fresh: HOAG's warm starts, the small-loss model
                run = m.run(task, budget, seed)
                done = [e for e in run.evals if e[0] <= budget]
                judged = m.judge(task, run.best)
                curve = best_so_far(run.evals, budget)
                rows.append({"task": name, "method": m.name, "hyperparameters": m.hyperparameters(task), "seed": seed,
                             "budget": budget, "evaluations": len(done), "seconds": run.seconds,
                             "cpu_seconds": run.cpu_seconds, "best_val_loss": curve[-1][1] if curve else math.nan,
                             "judged_val_loss": judged["val_loss"], "test_acc": judged["test_acc"],
                             "curve": curve})
                r = rows[-1]
                log(f"seed {seed} {name:8s} {m.name:32s} {r['evaluations']:4d} evals, best val {r['best_val_loss']:.4f}"
                    f", judged val {r['judged_val_loss']:.4f}, test acc {r['test_acc']:.4f} (cpu/wall "
                    f"{run.cpu_seconds / run.seconds:.2f})")
            refs.setdefault(name, {})[str(seed)] = references(name, seed)
    return {"budget": budget, "seeds": seeds, "rows": rows, "references": refs,
            "torch": torch.__version__, "optuna": import_optuna().__version__}


def _median(values: list[float]) -> str:
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{mid:.4g}" if len(values) == 1 else f"{mid:.4g} ({lo:.4g}–{hi:.4g})"


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per task and method, medians over the seeds (min–max)."""
    lines = ["| task | method | hyperparameters | budget (s) | best val loss (own measure) | val loss (judged) | "
             "test acc | trials / outer steps |", "|---|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["task"], r["method"]) for r in result["rows"])
    for task, method in keys:
        rs = [r for r in result["rows"] if (r["task"], r["method"]) == (task, method)]
        lines.append(f"| {task} | {method} | {rs[0]['hyperparameters']} | {rs[0]['budget']:g} | "
                     f"{_median([r['best_val_loss'] for r in rs])} | {_median([r['judged_val_loss'] for r in rs])} | "
                     f"{_median([r['test_acc'] for r in rs])} | {_median([r['evaluations'] for r in rs])} |")
    for task, by_seed in result["references"].items():
        names = dict.fromkeys(n for refs in by_seed.values() for n in refs)
        for n in names:
            vals = [refs[n] for refs in by_seed.values()]
            lines.append(f"| {task} | *{n}* | | | | {_median([v['val_loss'] for v in vals])} | "
                         f"{_median([v['test_acc'] for v in vals])} | 1 |")
    cpu = sum(r["cpu_seconds"] for r in result["rows"]) / sum(r["seconds"] for r in result["rows"])
    return "\n".join(lines) + f"\n\nCPU time / wall time over all runs: {cpu:.2f}.\n"


def _references(result: dict[str, Any], task: str) -> dict[str, list[float]]:
    """``{reference: [validation loss per seed]}`` of ``task``."""
    out: dict[str, list[float]] = {}
    for refs in result["references"].get(task, {}).values():
        for name, v in refs.items():
            out.setdefault(name, []).append(v["val_loss"])
    return out


def plot(result: dict[str, Any], path: str) -> None:
    """Best validation loss so far against wall time, one panel per task: every seed thin, the
    median over seeds (on a 1 s grid, where every seed has a value) thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in result["rows"]))
    titles = {"l2": "per-feature L2, breast cancer (30 hyperparameters)",
              "cleaning": "hyper-cleaning, digits (898 hyperparameters)"}
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.2), squeeze=False)
    budget = result["budget"]
    grid = [budget * i / 200 for i in range(1, 201)]
    for ax, task in zip(axes[0], tasks):
        methods = list(dict.fromkeys(r["method"] for r in result["rows"] if r["task"] == task))
        for i, method in enumerate(methods):
            color = f"C{i}"
            rs = [r for r in result["rows"] if (r["task"], r["method"]) == (task, method)]
            for r in rs:
                t, v = zip(*r["curve"]) if r["curve"] else ((), ())
                ax.step(list(t) + [budget], list(v) + list(v[-1:]), where="post", color=color, alpha=0.3, lw=0.8)
            med_t, med_v = [], []
            for g in grid:
                at = [next((v for t, v in reversed(r["curve"]) if t <= g), None) for r in rs]
                if all(a is not None for a in at):
                    med_t.append(g)
                    med_v.append(statistics.median(at))
            ax.step(med_t, med_v, where="post", color=color, lw=2, label=f"{method} ({rs[0]['hyperparameters']})")
        for j, (ref, by_seed) in enumerate(_references(result, task).items()):
            ax.axhline(statistics.median(by_seed), color="0.4", ls=("--", ":")[j % 2], lw=1,
                       label=f"{ref} (median)")
        ax.set_yscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("best validation loss so far")
        ax.set_title(titles.get(task, task), fontsize=10)
        ax.set_xlim(0, budget)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"Hypergradient vs Optuna TPE at equal wall time ({len(result['seeds'])} seeds; thick: median)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=50.0, help="wall-clock seconds per method, task and seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="data splits (and TPE sampler seeds)")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the rows (with the best-so-far curves) here")
    ap.add_argument("--plot", help="write the figure (PNG) here")
    ap.add_argument("--from-json", help="table and figure from a saved --json file, without running")
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error(f"--budget {args.budget:g} must be > 0 seconds")
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        import_optuna()
        torch.set_num_threads(args.threads)
        torch.set_default_dtype(torch.float64)
        result = bench(args.tasks, args.seeds, args.budget, lambda msg: print(msg, flush=True))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    print(table(result))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
