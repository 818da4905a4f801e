"""One outer (meta) step on the hyperparameters, shared by the runner and by in-process outer loops
(:func:`descend`: comparisons, restarts and sweeps inside a recipe's report)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..hypergrad.result import HypergradResult, NonFiniteError
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


class RunStopped(NonFiniteError):
    """The outer loop stopped: ``max_bad_steps`` non-finite outer losses or hypergradients in a row
    (:class:`OuterLoop`'s NaN guard). ``row`` is the last step's row (``"skipped": True``)."""

    def __init__(self, message: str, row: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.row = row or {}


@dataclass
class MetaState:
    """The outer loop's state on the hyperparameters: what :meth:`OuterLoop.step` reads and updates."""

    step: int  # outer steps done
    updates: int  # successful meta-updates (the meta-optimizer's own step count)
    hyper: dict[str, Tensor]
    meta_state: Any  # the meta-optimizer's state
    meta_lr: HParam  # lowered by the NaN guard
    bad_in_a_row: int  # consecutive non-finite steps


class OuterLoop:
    """One outer step, the same for the :class:`~metaopt.run.Runner` and for :func:`descend`:
    hypergradient -> NaN guard -> global-norm clipping -> meta-update -> the step's row.

    NaN guard (one policy): a non-finite outer loss or hypergradient skips the update, multiplies the
    meta learning rate by ``bad_lr_factor`` and marks the row ``"skipped"``; the ``max_bad_steps``-th
    such step in a row raises :class:`RunStopped` (a :class:`metaopt.NonFiniteError`).
    ``max_bad_steps = 1`` stops at the first one. ``log`` receives a line per skipped step.
    """

    def __init__(self, meta: str = "adam", *, clip: float = 0.0, max_bad_steps: int = 5, bad_lr_factor: float = 0.5,
                 log: Callable[[str], None] | None = None) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps = {max_bad_steps} must be >= 1")
        if not 0 < bad_lr_factor <= 1:
            raise ValueError(f"bad_lr_factor = {bad_lr_factor} must be in (0, 1]")
        self.meta = meta_optimizer(meta)
        self.clip, self.max_bad_steps, self.bad_lr_factor = clip, max_bad_steps, bad_lr_factor
        self.log = log or (lambda msg: None)

    def init(self, hyper: Mapping[str, Tensor], meta_lr: HParam) -> MetaState:
        """The state before the first step: a detached copy of ``hyper``, fresh meta-optimizer state."""
        hyper = {k: v.detach().clone() for k, v in hyper.items()}
        return MetaState(0, 0, hyper, self.meta.init(hyper), meta_lr, 0)

    def step(
        self, st: MetaState, hypergrad: Callable[[Mapping[str, Tensor], torch.Generator], HypergradResult],
        generator: torch.Generator,
        reduce: Callable[[HypergradResult], tuple[Tensor, dict[str, Tensor]]] | None = None,
    ) -> tuple[dict[str, Any], HypergradResult]:
        """One outer step on ``st`` (updated in place, except ``st.step``, which the caller advances):
        ``(row, result)``. ``reduce(result) -> (loss, grads)`` combines the ranks' results of a
        multi-process run (default: the result's own). Row: ``step``, ``loss``, ``grad_norm``,
        ``meta_lr``, ``seconds`` (the hypergradient's), the floats of ``result.extras["log"]``, and
        ``skipped`` or ``clipped`` when they apply."""
        res = hypergrad(st.hyper, generator)
        res.extras.setdefault("step", st.step + 1)
        loss, grads = reduce(res) if reduce is not None else (res.loss, res.grads)
        norm = grad_norm(grads)
        row: dict[str, Any] = {"step": st.step + 1, "loss": float(loss), "grad_norm": norm,
                               "meta_lr": float(st.meta_lr) if isinstance(st.meta_lr, Tensor) else st.meta_lr,
                               "seconds": res.seconds}
        row |= res.extras.get("log", {})  # a task's own per-step numbers
        if not (math.isfinite(row["loss"]) and math.isfinite(norm)):
            st.bad_in_a_row += 1
            st.meta_lr = st.meta_lr * self.bad_lr_factor
            row["skipped"] = True
            self.log(f"outer step {st.step + 1}: non-finite outer loss or hypergradient; update skipped, meta_lr "
                     f"lowered to {float(st.meta_lr):.3g} ({st.bad_in_a_row} of {self.max_bad_steps} in a row)")
            if st.bad_in_a_row >= self.max_bad_steps:
                bad = ("a non-finite outer loss or hypergradient" if st.bad_in_a_row == 1
                       else f"{st.bad_in_a_row} non-finite hypergradients in a row")
                raise RunStopped(f"stopped at outer step {st.step + 1}: {bad}. Lower the inner learning rates or "
                                 "outer.meta_lr, or clip with outer.clip", row)
            return row, res
        st.bad_in_a_row = 0
        st.hyper, st.meta_state, clipped = meta_update(self.meta, grads, st.meta_state, st.hyper, step=st.updates,
                                                       lr=st.meta_lr, clip=self.clip, norm=norm)
        if clipped:
            row["clipped"] = True
        st.updates += 1
        return row, res


@dataclass
class Descent:
    """What :func:`descend` returns: the final hyperparameters and one row per outer step."""

    hyper: dict[str, Tensor]
    history: list[dict[str, float]]
    seconds: float


def descend(hypergrad: Callable[[Mapping[str, Tensor], torch.Generator], HypergradResult],
            hyper: Mapping[str, Tensor], steps: int, meta_lr: HParam, generator: torch.Generator,
            clip: float = 0.0, meta: str = "adam",
            before: Callable[[int, int], None] | None = None, max_bad_steps: int = 1,
            bad_lr_factor: float = 0.5) -> Descent:
    """``steps`` outer steps on ``hyper`` along ``hypergrad``: the runner's loop (:class:`OuterLoop`:
    meta-optimizer ``meta``, NaN guard, global-norm clipping) without its files and checkpoints, for
    side-by-side comparisons in one process. The NaN guard is the runner's with ``max_bad_steps = 1``
    by default: the first non-finite outer loss or hypergradient raises :class:`RunStopped` (a
    :class:`metaopt.NonFiniteError`; a comparison reports the method as failed). Rows:
    :meth:`OuterLoop.step`'s, plus the wall time since the start (``elapsed``), inner steps,
    matvecs and peak stored bytes. ``before(step, steps)`` is called before every step (a task's
    ``begin_step``)."""
    loop = OuterLoop(meta, clip=clip, max_bad_steps=max_bad_steps, bad_lr_factor=bad_lr_factor)
    st = loop.init(hyper, meta_lr)
    rows, t0 = [], time.perf_counter()
    for i in range(steps):
        if before is not None:
            before(i, steps)
        row, res = loop.step(st, hypergrad, generator)
        st.step += 1
        rows.append({**row, "elapsed": time.perf_counter() - t0,
                     "inner_steps": res.steps * int(res.extras.get("inner_rounds", 1)),
                     "matvecs": int(res.extras.get("matvecs", 0)), "peak_bytes": res.peak_bytes})
    return Descent(st.hyper, rows, time.perf_counter() - t0)
