"""One outer (meta) step on the hyperparameters, shared by the runner and by in-process comparisons."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..optim import adam, sgd
from ..optim.base import HParam, Optimizer


def meta_optimizer(name: str) -> Optimizer:
    """The meta-optimizer on the hyperparameters: ``"adam"`` or ``"sgd"`` (``outer.meta_optimizer``)."""
    if name not in ("adam", "sgd"):
        raise ValueError(f"meta_optimizer {name!r}: use 'adam' or 'sgd'")
    return adam() if name == "adam" else sgd()


def grad_norm(grads: Mapping[str, Tensor]) -> float:
    """Global L2 norm of a hypergradient (in float64; NaN/inf pass through for the caller's guard)."""
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def meta_update(
    meta: Optimizer, grads: Mapping[str, Tensor], state: Any, hyper: Mapping[str, Tensor], *, step: int,
    lr: HParam, clip: float = 0.0, norm: float | None = None,
) -> tuple[dict[str, Tensor], Any, bool]:
    """``(hyper, state, clipped)`` after one ``meta`` step along ``grads``, their global norm clipped
    to ``clip`` first (``clip = 0``: off). ``norm`` saves recomputing :func:`grad_norm`."""
    norm = grad_norm(grads) if norm is None else norm
    clipped = clip > 0 and norm > clip
    if clipped:
        grads = {k: g * (clip / norm) for k, g in grads.items()}
    hyper, state = meta.update(grads, state, hyper, step=step, lr=lr)
    return {k: v.detach() for k, v in hyper.items()}, state, clipped
