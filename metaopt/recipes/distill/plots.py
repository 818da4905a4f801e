"""Figures like the paper's: data, decision boundaries, synthetic points, learned rates, accuracy
distributions, learning curves under each strategy; an image grid for image data."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...ensemble import Ensemble
from ..report import save_figure


def all_figures(task: Any, hyper: Mapping[str, Tensor], out: Path) -> list[Path]:
    obj = task.objective
    paths = [learning_rates(obj, hyper, out)]
    if obj.data.features == 2:
        paths += [dataset(obj.data, out), synthetic_points(obj, hyper, out)]
    if obj.data.image is not None:
        paths.append(image_grid(obj, hyper, out))
    if task.table is not None:
        paths += [accuracy_distributions(task, out), curves(task, out)]
        if obj.data.features == 2 and task.baseline is not None:
            paths.append(boundaries(task, out))
    return paths


def dataset(data: Any, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.scatter(data.X[:, 0], data.X[:, 1], c=data.y, cmap="coolwarm", s=5, label="train")
    ax.scatter(data.X_test[:, 0], data.X_test[:, 1], c=data.y_test, cmap="coolwarm", s=5, marker="x", alpha=0.4,
               label="test")
    ax.set_title(f"{data.name}: {len(data.y)} train / {len(data.y_test)} test")
    ax.legend(loc="lower left", fontsize=7)
    return save_figure(fig, out / "dataset.png", dpi=100)


def synthetic_points(obj: Any, hyper: Mapping[str, Tensor], out: Path) -> Path:
    """Synthetic points of restart 0 of every row at (up to) four inner steps of the epoch."""
    import matplotlib.pyplot as plt

    steps = sorted({0, round((obj.s - 1) / 3), round(2 * (obj.s - 1) / 3), obj.s - 1})
    rows = list(obj.rows)
    fig, axes = plt.subplots(len(rows), len(steps), figsize=(2.6 * len(steps), 2.4 * len(rows)), squeeze=False)
    X, y = obj.data.X.cpu(), obj.data.y.cpu()
    labels = obj.y_class.cpu()
    firsts = [hyper["x"][i * obj.restarts, steps].detach().cpu().reshape(-1, 2) for i in range(len(rows))]
    shown = torch.cat([X, *firsts])
    lo, hi = shown.min(0).values - 0.2, shown.max(0).values + 0.2
    for i, row in enumerate(rows):
        d = i * obj.restarts
        for j, k in enumerate(steps):
            ax = axes[i, j]
            ax.scatter(X[:, 0], X[:, 1], c=y, cmap="coolwarm", s=2, alpha=0.15)
            pts = hyper["x"][d, k].detach().cpu()
            ax.scatter(pts[:, 0], pts[:, 1], c=labels, cmap="coolwarm", s=40, edgecolors="k", vmin=0, vmax=1)
            ax.set_title(f"{row}: step {k + 1}", fontsize=8)
            ax.set_xlim(float(lo[0]), float(hi[0]))
            ax.set_ylim(float(lo[1]), float(hi[1]))
            ax.set_xticks([])
            ax.set_yticks([])
    return save_figure(fig, out / "synthetic_points.png", dpi=80)


def learning_rates(obj: Any, hyper: Mapping[str, Tensor], out: Path) -> Path:
    """Learned rates per inner step, averaged over restarts, one line per row."""
    import matplotlib.pyplot as plt

    rates = obj.rates(hyper).detach().cpu()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, row in enumerate(obj.rows):
        ax.plot(rates[:, i * obj.restarts:(i + 1) * obj.restarts].mean(1), lw=1, label=row)
    for e in range(1, obj.epochs):
        ax.axvline(e * obj.s - 0.5, color="0.85", lw=0.5)
    ax.set_xlabel("inner step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"learned learning rates (mean of {obj.restarts} restarts)")
    ax.legend(fontsize=7)
    return save_figure(fig, out / "learning_rates.png", dpi=100)


def accuracy_distributions(task: Any, out: Path) -> Path:
    """Per test architecture: the accuracy distribution of every (strategy, data row)."""
    import matplotlib.pyplot as plt

    obj, table = task.objective, task.table
    archs = list(task.models)
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.6), squeeze=False)
    for j, a in enumerate(archs):
        data, names = [], []
        for opt, curves_ in task.baselines.items():
            data.append(curves_.accuracy[a][-1].cpu().numpy())
            names.append(f"full data, {opt}")
        for strategy, per_arch in table.acc.items():
            for i, row in enumerate(obj.rows):
                data.append(per_arch[a][i * obj.restarts:(i + 1) * obj.restarts].flatten().cpu().numpy())
                names.append(f"{strategy[:1] + strategy[-1] if strategy.startswith('strategy') else strategy} {row}")
        ax = axes[0, j]
        ax.boxplot(data, vert=False, showfliers=True, flierprops={"markersize": 2})
        ax.set_yticks(range(1, len(names) + 1), names, fontsize=6)
        ax.set_title(f"test model: {a}", fontsize=9)
        ax.set_xlabel("test accuracy")
    return save_figure(fig, out / "accuracy_distributions.png", dpi=100)


def curves(task: Any, out: Path) -> Path:
    """Test accuracy and log-loss per epoch when training on each row's data (its own first
    architecture) under each strategy; the full-data baseline's curve for reference."""
    import matplotlib.pyplot as plt

    obj, table = task.objective, task.table
    rows = list(obj.rows)
    fig, axes = plt.subplots(2, len(rows), figsize=(3.6 * len(rows), 5.6), squeeze=False)
    for j, row in enumerate(rows):
        a = obj.rows[row][0] if row != "all" else list(task.models)[-1]
        sl = slice(j * obj.restarts, (j + 1) * obj.restarts)
        for strategy in table.curve_acc:
            axes[0, j].plot(table.curve_acc[strategy][a][:, sl].mean(1).cpu().numpy(), lw=1, label=strategy)
            axes[1, j].plot(table.curve_loss[strategy][a][:, sl].mean(1).cpu().numpy(), lw=1, label=strategy)
        axes[0, j].set_title(f"data: {row}, model: {a}", fontsize=9)
        axes[1, j].set_xlabel("epoch")
        axes[1, j].set_yscale("log")
    axes[0, 0].set_ylabel("test accuracy")
    axes[1, 0].set_ylabel("test log-loss")
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, out / "curves.png", dpi=100)


def _median(acc: Tensor) -> int:
    order = acc.argsort()
    return int(order[(acc.numel() - 1) // 2])


def boundaries(task: Any, out: Path) -> Path:
    """Decision boundaries of the median-quality model of every architecture: trained on the full
    data (top) and on the data distilled for it, raw steps (bottom)."""
    import matplotlib.pyplot as plt

    obj, data = task.objective, task.objective.data
    archs = [a for a in task.models if a in obj.rows]
    X = torch.cat([data.X, data.X_test]).cpu()
    lo, hi = X.min(0).values - 0.3, X.max(0).values + 0.3
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 150), torch.linspace(lo[1], hi[1], 150), indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1).to(data.X)
    fig, axes = plt.subplots(2, len(archs), figsize=(3.4 * len(archs), 6.4), squeeze=False)
    for j, a in enumerate(archs):
        ens = Ensemble(task.models[a], 1)
        i = list(obj.rows).index(a)
        acc_full = task.baseline.accuracy[a][-1]
        acc_dist = task.table.acc["raw"][a][i * obj.restarts:(i + 1) * obj.restarts].flatten()
        inits = task.table.acc["raw"][a].shape[1]
        k_full, k_dist = _median(acc_full), i * obj.restarts * inits + _median(acc_dist)
        for r, (params, k, acc, what) in enumerate([
            (task.baseline.params[a], k_full, acc_full, f"full data ({next(iter(task.baselines))})"),
            (task.table.params["raw"][a], k_dist, acc_dist, "distilled"),
        ]):
            p = {n: v[k:k + 1] for n, v in params.items()}
            with torch.no_grad():
                z = ens(p, grid)[0, :, 0].reshape(gx.shape).cpu()
            ax = axes[r, j]
            ax.contourf(gx, gy, (z > 0).float(), levels=[-0.5, 0.5, 1.5], cmap="coolwarm", alpha=0.25)
            ax.scatter(data.X_test[:, 0].cpu(), data.X_test[:, 1].cpu(), c=data.y_test.cpu(), cmap="coolwarm", s=3)
            ax.set_title(f"{a}, {what}: median acc {float(acc.median()):.3f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    return save_figure(fig, out / "decision_boundaries.png", dpi=100)


def image_grid(obj: Any, hyper: Mapping[str, Tensor], out: Path) -> Path:
    """Distilled images of restart 0 of the first row: one row per inner step, one column per point."""
    import matplotlib.pyplot as plt

    c, h, w = obj.data.image
    x = hyper["x"][0].detach().cpu()  # [s, P, d]
    s, P = x.shape[:2]
    fig, axes = plt.subplots(s, P, figsize=(0.8 * P, 0.85 * s + 0.3), squeeze=False)
    labels = obj.y_class.cpu()
    for i in range(s):
        for j in range(P):
            ax = axes[i, j]
            img = x[i, j].reshape(c, h, w)
            if c == 3:  # colour: each image's own range mapped to [0, 1]
                lo, hi = img.min(), img.max()
                ax.imshow(((img - lo) / (hi - lo).clamp_min(1e-12)).permute(1, 2, 0).numpy())
            else:
                ax.imshow(img[0].numpy(), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(str(int(labels[j])), fontsize=8)
    return save_figure(fig, out / "distilled_images.png", dpi=100)
