"""Multilevel problems: a level whose inner steps follow the hypergradient of the level below.

A three-level problem, written as two nested bilevel ones::

    level 1   params w          trained by `optimizer` on lower.inner_loss(w, h)           (steps)
    level 2   h  = Level params trained along dF1/dh (+ d penalty/dh) by the optimizer
              given to hypergradient(level, meta_optimizer, lam, T)                         (T steps)
    level 3   lam = Level hyper  updated along dF2/dlam, F2 = Level.outer_loss(h[T], lam)

:class:`Level` is level 2 as a :class:`~metaopt.MetaObjective` for level 3: its params are the
level below's hyperparameters ``h``, its hyperparameters ``lam`` are level 3's variables (the
meta-learning rate, through :meth:`Level.hparams`; ``h``'s initialisation, through
:meth:`Level.init_params`; a regulariser's strength, through :meth:`Level.penalty`). Each of its
inner steps calls :func:`~metaopt.hypergradient` on the level below, with ``create_graph=True``
when level 3 records the step, so :func:`~metaopt.hypergradient` on a ``Level`` is level 3's
hypergradient. A ``Level`` of a ``Level`` is a fourth level. Both the level below's method and the
method :func:`~metaopt.hypergradient` runs on a ``Level`` must be differentiable once more
(:func:`~metaopt.hypergrad.names` with ``differentiable=True``), and ``compile=True`` does not
apply (a refusal names the alternatives). docs/tutorials/multilevel.md is a worked example.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..objective import MetaObjective
from ..optim.base import Optimizer
from .api import hypergradient
from .methods import Method, as_method, names
from .result import HypergradResult


class Level(MetaObjective):
    """Level k+1 of a multilevel problem: trains the hyperparameters of ``lower`` (level k) by
    hypergradient descent, as the inner problem of level k+2.

    Subclass it and implement :meth:`init_params` (``h[0]`` from ``lam``); override
    :meth:`hparams` (e.g. ``{"lr": lam["meta_lr"]}`` for a learned meta-learning rate), :meth:`penalty`
    (a regulariser of ``h`` whose strength is in ``lam``), :meth:`lower_hyper` (when the level below
    reads ``lam`` too) and :meth:`outer_loss` (default: the level below's outer loss at ``h``) as
    needed. Every step's data (the level below's initialisation and batches) is drawn from one seed
    per step, drawn up front like any batch, so recomputations (checkpointing, finite differences)
    see the same draws.

    Examples:
        Level 1 trains ``w`` for 5 SGD steps on ``(w - h)^2`` and scores it by ``(w - 2)^2``;
        level 2 moves ``h`` by 3 steps of SGD along that score's hypergradient, from ``lam["h0"]`` at the
        rate ``lam["meta_lr"]``; level 3's hypergradient ``dF/dlam`` is one call, checked here against
        central differences:

        >>> import torch, metaopt
        >>> from metaopt import optim
        >>> class Lower(metaopt.MetaObjective):
        ...     def init_params(self, hyper, generator):
        ...         return {"w": torch.zeros((), dtype=torch.float64)}
        ...     def inner_loss(self, params, hyper, k, batch):
        ...         return (params["w"] - hyper["h"]) ** 2
        ...     def outer_loss(self, params, hyper, batch):
        ...         return (params["w"] - 2) ** 2
        >>> class Meta(metaopt.Level):
        ...     def init_params(self, lam, generator):
        ...         return {"h": lam["h0"]}
        ...     def hparams(self, lam):
        ...         return {"lr": lam["meta_lr"]}
        >>> level = Meta(Lower(), optim.sgd(lr=0.25), steps=5)
        >>> lam = {"h0": torch.tensor(0.0, dtype=torch.float64), "meta_lr": torch.tensor(0.2, dtype=torch.float64)}
        >>> res = metaopt.hypergradient(level, optim.sgd(), lam, 3)
        >>> sorted(res.grads), res.grads["meta_lr"].shape
        (['h0', 'meta_lr'], torch.Size([]))
        >>> def F(lr):
        ...     return metaopt.hypergradient(level, optim.sgd(), {**lam, "meta_lr": lr}, 3).loss
        >>> eps = 1e-6
        >>> fd = (F(lam["meta_lr"] + eps) - F(lam["meta_lr"] - eps)) / (2 * eps)
        >>> torch.allclose(res.grads["meta_lr"], fd, rtol=1e-6), round(res.grads["meta_lr"].item(), 4)
        (True, -4.2826)
        >>> c = 1 - 0.5**5  # closed form: w_5 = c h, so F = 4 (1 - 2 c^2 meta_lr)^6
        >>> round(4 * 6 * (1 - 2 * c * c * 0.2) ** 5 * (-2 * c * c), 4)
        -4.2826
        >>> Meta(Lower(), optim.sgd(lr=0.25), steps=5, method="reversible")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Level: the level below's method 'reversible' cannot be differentiated ...; use one of full, ...

    Args:
        lower: the level below (a :class:`~metaopt.MetaObjective`, or another ``Level``).
        optimizer: the level below's inner optimizer.
        steps: the level below's inner steps.
        method: the level below's hypergradient method, which the level above differentiates: one
            of ``names(differentiable=True)``: ``full``, ``checkpointed``, ``truncated``,
            ``recursive``, ``implicit``, ``cg``, ``neumann``, ``dense``, ``hoag``; another raises a
            ``ValueError`` naming them.
    """

    functional: ClassVar[bool] = False

    def __init__(self, lower: MetaObjective, optimizer: Optimizer, steps: int, method: Method | str = "full") -> None:
        self.lower = lower
        self.optimizer = optimizer
        self.steps = steps
        self.method = as_method(method, steps)
        if not self.method.differentiable:
            raise ValueError(f"Level: the level below's method {self.method.label!r} cannot be differentiated by the "
                             f"level above; use one of {', '.join(names(differentiable=True))}")

    @abstractmethod
    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """``h[0]``, the level below's hyperparameters before the first step; may depend on ``hyper``
        (``lam``: a learned initialisation)."""

    def lower_hyper(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The ``hyper`` dict the level below sees. Default: ``params`` (``h``) alone; add entries of
        ``hyper`` when the level below reads level 3's variables."""
        return dict(params)

    def penalty(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor]) -> Tensor | None:
        """A scalar added to this level's loss (a regulariser of ``h``, e.g. ``lam * ||h||^2``);
        its gradient joins the hypergradient. Default: none."""
        return None

    def lower_result(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], seed: int,
                     create_graph: bool) -> HypergradResult:
        """The level below's :func:`~metaopt.hypergradient` at ``h = params``, its draws from ``seed``."""
        generator = torch.Generator(_device(params)).manual_seed(seed)
        return hypergradient(self.lower, self.optimizer, self.lower_hyper(params, hyper), self.steps,
                             method=self.method, generator=generator, create_graph=create_graph)

    def inner_value_and_grad(
        self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: int, batch: Any, *, create_graph: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The level below's outer loss (plus :meth:`penalty`) and its hypergradient w.r.t. ``h``."""
        res = self.lower_result(params, hyper, batch, create_graph)
        missing = [n for n in params if n not in res.grads]
        if missing:
            raise ValueError(f"Level: lower_hyper must pass every param of this level to the level below; "
                             f"{missing} are missing")
        loss, grads = res.loss, {n: res.grads[n] for n in params}
        with torch.enable_grad():
            pen = self.penalty(params, hyper)
            if pen is not None:
                pg = torch.autograd.grad(pen, list(params.values()), create_graph=create_graph, allow_unused=True)
                grads = {n: g if d is None else g + d for (n, g), d in zip(grads.items(), pg)}
                loss = loss + pen
        if not create_graph:
            loss, grads = loss.detach(), {n: g.detach() for n, g in grads.items()}
        return loss, grads

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: int, batch: Any) -> Tensor:
        """The level below's outer loss at ``h = params`` (plus :meth:`penalty`), differentiable."""
        return self.inner_value_and_grad(params, hyper, k, batch, create_graph=True)[0]

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        """This level's objective after its steps: by default the level below's outer loss at the final
        ``h`` (how good ``T`` steps of hypergradient descent made ``h``), differentiable."""
        return self.lower_result(params, hyper, batch, create_graph=True).loss

    def inner_batch(self, k: int, generator: torch.Generator) -> int:
        """The seed of step ``k``'s draws at the level below."""
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())

    def outer_batch(self, generator: torch.Generator) -> int:
        """The seed of :meth:`outer_loss`'s draws at the level below."""
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def _device(params: Mapping[str, Tensor]) -> torch.device:
    return next(iter(params.values())).device if params else torch.device("cpu")


__all__ = ["Level"]
