"""The demo's figure: the distilled points over the training data, and the learned learning rates."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor

from ..report import save_figure
from .objective import MoonsDistillation


def distilled(objective: MoonsDistillation, hyper: Mapping[str, Tensor], out: Path) -> Path:
    """``out/distilled.png``: the first restart's synthetic points over the training data, and the
    learned per-step learning rates."""
    import matplotlib.pyplot as plt

    obj = objective
    x = hyper["x"][0].reshape(-1, 2)
    y = obj.y_class.repeat(obj.s)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.scatter(obj.data.X[:, 0], obj.data.X[:, 1], c=obj.data.y, cmap="coolwarm", s=4, alpha=0.25)
    a.scatter(x[:, 0], x[:, 1], c=y, cmap="coolwarm", s=22, edgecolors="k", linewidths=0.5)
    a.set_title("distilled points over the training data")
    b.plot(F.softplus(hyper["lr"][:, 0]).numpy())
    b.set_xlabel("inner step")
    b.set_ylabel("learning rate")
    b.set_title("learned learning rates")
    return save_figure(fig, out / "distilled.png")
