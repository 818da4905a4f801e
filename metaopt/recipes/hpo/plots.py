"""The ``hpo`` recipe's figures: one function per task, of its hyperparameters and the results its
``report`` kept on the task."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..report import save_figure
from . import data

if TYPE_CHECKING:
    from .cleaning import CleaningTask
    from .evidence import EvidenceTask
    from .l2 import L2Task
    from .schedule import ScheduleTask


def l2(task: L2Task, hyper: Mapping[str, Tensor], history: list[dict[str, Any]],
       out: Path) -> list[Path]:
    """``validation_curve.png`` (the dense curve), ``methods.png`` (the outer loop by method) and ``penalties.png``."""
    import matplotlib.pyplot as plt

    paths = []
    r = task.results
    if "curve" in r:
        c = r["curve"]
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.plot(c["log_lam"], c["val_loss"], label="validation (brute force)")
        ax.plot(c["log_lam"], c["test_loss"], lw=0.8, ls="--", label="test")
        if "learned_log_lam" in c:
            ax.axvline(c["learned_log_lam"], color="k", lw=0.8, label="hypergradient")
        ax.set_xlabel("log lambda")
        ax.set_ylabel("loss")
        ax.set_title("single L2 penalty: validation curve")
        ax.legend(fontsize=8)
        paths.append(save_figure(fig, out / "validation_curve.png"))
    if "compare" in r:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for name, m in r["compare"]["methods"].items():
            if "curve" in m:
                t, loss = zip(*m["curve"])
                ax.plot(t, loss, label=name, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("validation loss")
        ax.set_title("outer loop by method")
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out / "methods.png"))
    lam = hyper["log_lam"][0].reshape(-1)
    if lam.numel() > 1:
        fig, ax = plt.subplots(figsize=(6, 3))
        v = lam.reshape(task.objective.d, -1).mean(1) if task.cfg.l2.penalty == "per_weight" else lam
        ax.bar(range(v.numel()), (v / math.log(10)).tolist())
        ax.set_xlabel("feature")
        ax.set_ylabel("log10 lambda" + (" (mean over classes)" if task.cfg.l2.penalty == "per_weight" else ""))
        ax.set_title("learned penalties")
        paths.append(save_figure(fig, out / "penalties.png"))
    return paths


def schedule(task: ScheduleTask, hyper: Mapping[str, Tensor], history: list[dict[str, Any]],
             out: Path) -> list[Path]:
    """The learned learning rates (and momenta) per inner step against the best constant ones."""
    import matplotlib.pyplot as plt

    r = task.results
    lr = hyper["log_lr"].exp().tolist()
    fig, axes = plt.subplots(1, 2 if "logit_mom" in hyper else 1, figsize=(9 if "logit_mom" in hyper else 5, 3.4))
    axes = axes if isinstance(axes, (list, tuple)) or hasattr(axes, "__len__") else [axes]
    axes[0].plot(range(1, len(lr) + 1), lr, label="learned")
    if r.get("grid"):
        axes[0].axhline(r["grid"]["lr"], color="k", ls="--", lw=0.8, label="best constant (grid)")
    axes[0].axhline(task.cfg.schedule.lr, color="gray", ls=":", lw=0.8, label="initial")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("inner step")
    axes[0].set_ylabel("learning rate")
    axes[0].legend(fontsize=8)
    if "logit_mom" in hyper:
        axes[1].plot(range(1, len(lr) + 1), torch.sigmoid(hyper["logit_mom"]).tolist())
        axes[1].set_xlabel("inner step")
        axes[1].set_ylabel("momentum")
    fig.suptitle("learned schedule")
    return [save_figure(fig, out / "schedule.png")]


def cleaning(task: CleaningTask, hyper: Mapping[str, Tensor], history: list[dict[str, Any]],
             out: Path) -> list[Path]:
    """``weights.png``: the learned weights of the clean and of the corrupted examples."""
    import matplotlib.pyplot as plt

    weights = torch.sigmoid(hyper["logit"][0]).cpu()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    bins = torch.linspace(0, 1, 41).tolist()
    ax.hist(weights[~task.corrupted].tolist(), bins=bins, alpha=0.6, label="clean")
    ax.hist(weights[task.corrupted].tolist(), bins=bins, alpha=0.6, label="corrupted")
    ax.axvline(task.cfg.cleaning.threshold, color="k", lw=0.8)
    ax.set_xlabel("learned example weight")
    ax.set_ylabel("training examples")
    ax.set_title("hyper-cleaning: learned weights")
    ax.legend()
    return [save_figure(fig, out / "weights.png")]


def evidence(task: EvidenceTask, hyper: Mapping[str, Tensor], history: list[dict[str, Any]],
             out: Path) -> list[Path]:
    """The posterior mean and band over the data and the truth, and the learned precisions."""
    import matplotlib.pyplot as plt

    r = task.results
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = torch.linspace(-1, 1, 200, dtype=torch.float64)
    Phi = data.legendre(x, task.objective.d - 1)
    with torch.no_grad():
        mean, cov = task.objective.posterior(hyper)
        mu, sd = Phi @ mean, ((Phi @ cov) * Phi).sum(1).sqrt()
    a.scatter(task.reg.x.tolist(), task.reg.y.tolist(), s=8, c="k", label="training data")
    a.plot(x.tolist(), (Phi @ task.reg.coef).tolist(), "g--", lw=1, label="truth")
    a.plot(x.tolist(), mu.tolist(), "b", lw=1, label="posterior mean")
    a.fill_between(x.tolist(), (mu - 2 * sd).tolist(), (mu + 2 * sd).tolist(), alpha=0.2)
    a.set_title("posterior at the learned hyperparameters")
    a.legend(fontsize=7)
    if r.get("rows"):
        keys = list(r["rows"])
        for k, marker in zip((keys[2], keys[3]), ("o", "x")):
            b.semilogy(range(task.objective.d), r["rows"][k]["alpha"], marker, label=k)
        b.axhline(task.cfg.evidence.prune, color="gray", lw=0.8, ls=":")
        b.set_xlabel("Legendre degree")
        b.set_ylabel("prior precision alpha")
        b.legend(fontsize=7)
        b.set_title("learned vs directly optimised precisions")
    return [save_figure(fig, out / "evidence.png")]
