"""Plumbing of benchmarks/hpo_vs_optuna.py: the install message without Optuna, the best-so-far
curves, the table and figure from saved rows, and (when the bench extra is installed) a tiny run."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "hpo_vs_optuna.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hpo_vs_optuna", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_missing_optuna_names_the_bench_extra(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[bench\]"'):
        bench.import_optuna()


def test_best_so_far_counts_finished_finite_improvements_only(bench):
    evals = [[0.5, 2.0], [1.0, math.nan], [1.5, 1.0], [2.0, 1.5], [2.5, 0.5], [3.5, 0.1]]
    assert bench.best_so_far(evals, 3.0) == [[0.5, 2.0], [1.5, 1.0], [2.5, 0.5]]


def test_table_and_figure_from_saved_rows(bench, tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"task": "l2", "method": m, "hyperparameters": d, "seed": s, "budget": 3.0, "evaluations": 4,
             "seconds": 3.1, "cpu_seconds": 3.0, "best_val_loss": v, "judged_val_loss": v, "test_acc": 0.9,
             "curve": [[0.5, 2 * v], [2.0, v]]}
            for m, d, v in (("hypergradient (HOAG)", 30, 0.1), ("TPE, per-feature", 30, 0.2)) for s in (0, 1)]
    result = {"budget": 3.0, "seeds": [0, 1], "rows": rows,
              "references": {"cleaning": {"0": {"oracle": {"val_loss": 0.2, "test_acc": 0.95}}}}}
    md = bench.table(result)
    assert "| l2 | hypergradient (HOAG) | 30 | 3 | 0.1 (0.1–0.1) |" in md
    assert "*oracle*" in md and "CPU time / wall time over all runs: 0.97" in md
    bench.plot(result, str(tmp_path / "fig.png"))
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_tiny_run_of_both_kinds(bench):
    pytest.importorskip("optuna")
    from metaopt.recipes.hpo import RECIPE, build
    from metaopt.run import resolve_config

    tpe = bench.tpe_run(lambda tr: tr.suggest_float("x", -1.0, 1.0), lambda x: (x - 0.3) ** 2, 0.5, 0)
    assert (tpe.best - 0.3) ** 2 == min(loss for t, loss in tpe.evals if t <= 0.5)
    cfg, _ = resolve_config(RECIPE, preset="cleaning", overrides=["hpo.steps=5"])  # plumbing, not numbers
    task = build(cfg, torch.device("cpu"))
    run = bench.hypergradient_run(task, 1.5, 0)
    assert run.evals  # it starts one step at least; the first (cold) one may end after a loaded machine's budget
    if any(t <= 1.5 for t, _ in run.evals):
        assert run.best["logit"].shape == task.hyper["logit"].shape
    else:
        assert run.best is None
