"""The ``MetaObjective`` protocol: everything a user writes to plug a bilevel problem into metaopt.

The bilevel problem::

    params[0]   = init_params(hyper, generator)
    params[k+1] = optimizer.update(grad inner_loss(params[k], hyper, k, batch_k), ..., **hparams(hyper))
    F(hyper)    = outer_loss(params[n], hyper, outer_batch)

Three methods are required (``init_params``, ``inner_loss``, ``outer_loss``); the rest have
defaults. ``params`` and ``hyper`` are dicts of tensors. For an ensemble, ``inner_loss`` returns the
*sum* of the members' losses (so each member's gradient is its own) and ``outer_loss`` usually their
mean.

Randomness: random draws inside the losses (dropout, ``torch.rand*``) come from torch's global RNG,
which metaopt seeds per inner step from the hypergradient's ``generator`` (see docs/hypergrad.md,
"Randomness and module buffers"), so every recomputation of step ``k`` draws the same values.

Module buffers (BatchNorm's running statistics) are inner state: an objective that has them returns
them from :meth:`~MetaObjective.init_buffers` and implements :meth:`~MetaObjective.inner_loss_and_buffers`
(the loss and the updated buffers, e.g. :meth:`metaopt.Ensemble.forward_with_buffers`) and
:meth:`~MetaObjective.outer_loss_with_buffers` instead of ``inner_loss`` and ``outer_loss``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .optim.base import HParam

__all__ = ["MetaObjective"]


class MetaObjective(ABC):
    """Base class for a bilevel problem; subclass it and implement the three abstract methods.

    ``functional`` (class attribute): the inner step direction is the autograd gradient of
    :meth:`inner_loss`, so the ``torch.func`` paths apply (forward mode, ``compile=True``). A
    :class:`metaopt.Level`, whose direction is a lower level's hypergradient, sets it ``False``.
    """

    functional: ClassVar[bool] = True

    @abstractmethod
    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Initial inner parameters ``params[0]``; may depend on ``hyper`` (e.g. a meta-learned init)."""

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: int, batch: Any) -> Tensor:
        """Scalar training loss at inner step ``k`` (``batch`` is what :meth:`inner_batch` drew).
        Required, unless the objective has buffers and implements :meth:`inner_loss_and_buffers`."""
        if _overrides(self, "inner_loss_and_buffers"):
            return self.inner_loss_and_buffers(params, {}, hyper, k, batch)[0]
        raise NotImplementedError(f"{type(self).__name__} must implement inner_loss(params, hyper, k, batch) (or "
                                  "inner_loss_and_buffers, for an objective with module buffers)")

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        """Scalar validation loss ``F`` of the trained params (``batch`` from :meth:`outer_batch`).
        Required, unless the objective has buffers and implements :meth:`outer_loss_with_buffers`."""
        if _overrides(self, "outer_loss_with_buffers"):
            return self.outer_loss_with_buffers(params, {}, hyper, batch)
        raise NotImplementedError(f"{type(self).__name__} must implement outer_loss(params, hyper, batch) (or "
                                  "outer_loss_with_buffers, for an objective with module buffers)")

    def init_buffers(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """The module buffers ``{name: tensor}`` at step 0 (BatchNorm's ``running_mean [m, C]``,
        ``running_var``, ``num_batches_tracked``; :meth:`metaopt.Ensemble.init_buffers` stacks a
        module's). They travel through the inner run beside the params and the optimizer state, are
        updated by :meth:`inner_loss_and_buffers` and read by :meth:`outer_loss_with_buffers`, and are
        constants of the hypergradient (never differentiated, as torch updates them under no_grad).
        Called after the outer batch is drawn. Default: ``{}`` (no buffers)."""
        return {}

    def inner_loss_and_buffers(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: int,
        batch: Any,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(inner_loss, new buffers)`` at step ``k`` from the buffers of step ``k``: the new buffers
        keep the names, shapes and dtypes, and ``buffers`` itself must not be modified (compute on
        copies, as :meth:`metaopt.Ensemble.forward_with_buffers` does). Default: :meth:`inner_loss`,
        buffers unchanged."""
        return self.inner_loss(params, hyper, k, batch), dict(buffers)

    def outer_loss_with_buffers(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any
    ) -> Tensor:
        """The outer loss at the final params and the final buffers (e.g. BatchNorm in eval mode,
        reading the running statistics). Default: :meth:`outer_loss`."""
        return self.outer_loss(params, hyper, batch)

    def inner_value_and_grad(
        self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: int, batch: Any, *, create_graph: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``inner_loss`` and the direction the inner optimizer steps along, ``{name: tensor}`` shaped
        like ``params`` (zeros where the loss does not read a param). Default: the loss's autograd
        gradient, with its graph kept when ``create_graph`` (a recorded step). Override only when the
        direction is not the gradient of a scalar you can write (a :class:`metaopt.Level`)."""
        with torch.enable_grad():
            loss = self.inner_loss(params, hyper, k, batch)
            check_inner_loss(loss, k)
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph, allow_unused=True)
        return loss, {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)}

    def hparams(self, hyper: Mapping[str, Tensor]) -> Mapping[str, HParam]:
        """Optimizer hyperparameters as functions of ``hyper`` (e.g. ``{"lr": schedule.table(...)}``);
        passed to ``optimizer.update`` at every step. Default: none (the optimizer's own defaults)."""
        return {}

    def ensemble_size(self) -> int | None:
        """The number ``m`` of ensemble members the problem splits into (for the member-chunked full
        unroll, ``Full(chunk=c)``, and a memory budget, ``Full(max_memory=...)``), or ``None``
        (default): it does not split. An objective that returns ``m`` implements :meth:`share`."""
        return None

    def share(self, members: Sequence[int]) -> MetaObjective:
        """This problem restricted to ``members`` (increasing indices in ``0 .. m-1``), such that
        the shares' losses and hypergradients add up to the whole problem's:

        * :meth:`init_params`, :meth:`inner_batch`, :meth:`outer_batch` and :meth:`init_buffers`
          draw what the whole problem draws from the generator and keep these members' part;
        * every params (and buffers) tensor is the whole's restricted along its leading member axis
          to these members, in order (a tensor no held member has is absent);
        * the inner loss sums these members' terms, and the outer loss is these members' terms of
          the whole's (a sum or mean over members: divide by ``m``, not by ``len(members)``).

        Default: not available (:meth:`ensemble_size` is ``None``)."""
        raise NotImplementedError(f"{type(self).__name__} does not split into ensemble members: implement "
                                  "MetaObjective.ensemble_size and share")

    def inner_batch(self, k: int, generator: torch.Generator) -> Any:
        """The data for inner step ``k``, drawn once per hypergradient before the inner run (so the
        recomputations of the reverse sweep see the same batches). Default: ``None``."""
        return None

    def outer_batch(self, generator: torch.Generator) -> Any:
        """The data for the outer loss, drawn once per hypergradient. Default: ``None``."""
        return None


def _overrides(obj: MetaObjective, name: str) -> bool:
    """Whether ``obj``'s class overrides the base's method ``name``."""
    return getattr(type(obj), name) is not getattr(MetaObjective, name)


def check_inner_loss(loss: Any, k: int) -> None:
    """A scalar inner loss, or a clear error naming the step."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"inner_loss must return a scalar tensor (sum the members' losses for an ensemble); "
            f"got {shape} at step {k}"
        )
