"""The ``structure`` recipe's figures: q(Gamma) over the outer steps, and the sweeps' complexities."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..report import save_figure

if TYPE_CHECKING:
    from .task import StructureTask


def figures(task: StructureTask, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
    """``structure_probs.png`` (q(Gamma) per edge over the outer steps) and, after a sweep, its
    complexities against the swept coefficient."""
    import matplotlib.pyplot as plt

    paths = []
    edges = task.graph.edges
    fig, axes = plt.subplots(1, len(edges), figsize=(4.2 * len(edges), 3.2), squeeze=False)
    steps = [r["step"] for r in history]
    for ax, e in zip(axes[0], edges):
        for b in e.basis:
            ax.plot(steps, [r.get(f"q/{e.name}/{b}", math.nan) for r in history], label=b)
        ax.set_title(f"q(Gamma) on edge {e.name}")
        ax.set_xlabel("outer step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "structure_probs.png"))
    r = task.results
    for key, name, ys in (("sweep_prior", "c_prior", ("c_param",)),
                          ("sweep_temp", "c_temp", ("c_struct", "sample_entropy"))):
        if key in r:
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            for y in ys:
                ax.plot([p["value"] for p in r[key]], [p[y] for p in r[key]], "o-", label=y.replace("c_", "C_"))
            ax.set_xscale("log")
            ax.set_xlabel(name)
            ax.legend(fontsize=8)
            paths.append(save_figure(fig, out / f"{ys[0]}_vs_{name}.png"))
    return paths
