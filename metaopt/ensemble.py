"""Functional model ensembles: ``m`` members of one architecture as one batched program.

Parameters are a flat dict of stacked tensors with a leading member axis ``m`` (as
``torch.func.stack_module_state`` makes them). The forward is ``vmap(functional_call)`` for any
``nn.Module``; a module that defines ``forward_batched(params, x, per_member)`` (as
:class:`metaopt.models.MLP`
does) gets that hand-batched fast path instead. Several architectures are a :class:`MultiEnsemble`:
a dict of groups whose parameters live in one flat dict under ``"{group}.{name}"`` keys.

Random layers (dropout) draw independently per member (``vmap(..., randomness="different")``; the
fast path draws one mask per member too), from torch's global RNG, which metaopt seeds per inner
step. Module buffers (BatchNorm's running statistics) are stacked per member like the parameters
(:meth:`Ensemble.init_buffers`) and updated functionally (:meth:`Ensemble.forward_with_buffers`):
the module given to :class:`Ensemble` is never modified.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = ["Ensemble", "InitFn", "LossFn", "MultiEnsemble"]

Params = dict[str, Tensor]
InitFn = Callable[[str, torch.Size, torch.Generator | None], Tensor]
"""A custom initialiser ``init(name, member_shape, generator) -> tensor of member_shape``, called
once per member and parameter."""
LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(pred [N, ...], target [N, ...]) -> [N]`` per-sample losses (``reduction="none"``)."""

_INITS = ("xavier", "kaiming", "normal", "default")


class Ensemble:
    """``members`` copies of one architecture with independently initialised, stacked parameters.

    Args:
        module: the architecture (its own parameter values are never used) or a zero-argument factory.
        members: ensemble size ``m``.
        init: ``"xavier"`` (Glorot-uniform weights, zero biases), ``"kaiming"`` (He-uniform for ReLU,
            zero biases), ``"normal"`` (``N(0, std^2)`` everything), ``"default"`` (the module's own
            ``reset_parameters``), or a function ``init(name, member_shape, generator) -> tensor``.
        std: standard deviation for ``init="normal"``.
        batched: use the module's ``forward_batched`` fast path when it has one.

    Params are ``{name: [m, *param_shape]}`` (:meth:`init_params`); ``forward(params, x)`` takes
    ``x [B, ...]`` shared by the members or ``[m, B, ...]`` one batch each and returns ``[m, B, ...]``.
    """

    def __init__(
        self,
        module: nn.Module | Callable[[], nn.Module],
        members: int,
        init: str | InitFn = "xavier",
        std: float = 0.01,
        batched: bool = True,
    ) -> None:
        if not isinstance(members, int) or members <= 0:
            raise ValueError(f"Ensemble: members must be a positive int, got {members!r}")
        if isinstance(init, str) and init not in _INITS:
            raise ValueError(f"Ensemble: unknown init {init!r}; use one of {_INITS} or a function")
        self.factory = module if not isinstance(module, nn.Module) else None
        self.module = module if isinstance(module, nn.Module) else module()
        self.members = members
        self.init = init
        self.std = std
        self.shapes = {k: p.shape for k, p in self.module.named_parameters()}
        self.buffer_shapes = {k: b.shape for k, b in self.module.named_buffers()}
        fast = getattr(self.module, "forward_batched", None)
        self._fast = fast if (batched and callable(fast) and not self.buffer_shapes) else None
        self._vmapped = {
            d: vmap(self._one, in_dims=(0, d), randomness="different") for d in (None, 0)
        }
        self._vmapped_buffers = {
            d: vmap(self._one_buffered, in_dims=(0, 0, d), randomness="different") for d in (None, 0)
        }

    def _one(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.module, params, (x,))

    def _one_buffered(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        fresh = {k: b.clone() for k, b in buffers.items()}  # the module's forward updates these in place
        out = functional_call(self.module, (dict(params), fresh), (x,))
        return out, fresh

    def init_buffers(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Params:
        """The module's buffers stacked per member, ``{name: [m, *shape]}`` (BatchNorm:
        ``running_mean``, ``running_var`` in ``dtype``, ``num_batches_tracked`` int64): the values of the
        module as given (a fresh BatchNorm's zeros and ones), copied. ``{}`` for a module without
        buffers."""
        dtype = dtype or torch.get_default_dtype()
        out: Params = {}
        for name, b in self.module.named_buffers():
            t = b.detach().to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)
            out[name] = t.unsqueeze(0).expand(self.members, *t.shape).clone()
        return out

    def forward_with_buffers(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, per_member: bool = False,
        training: bool | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Outputs ``[m, B, ...]`` and the updated buffers ``{name: [m, *shape]}`` (as a BatchNorm in
        train mode updates its running statistics), computed on copies: ``buffers`` and the module
        are left as they are. ``training``: run the module in train (``True``) or eval (``False``)
        mode for this call (``None``: its current mode); its mode is restored afterwards. The
        generic ``vmap(functional_call)`` path (a module with buffers does not take the fast path)."""
        self._check(params, x, per_member)
        if buffers.keys() != self.buffer_shapes.keys():
            raise ValueError(f"Ensemble: buffers keys {sorted(buffers)} do not match the module's "
                             f"{sorted(self.buffer_shapes)} (Ensemble.init_buffers makes them)")
        with _mode(self.module, training):
            return self._vmapped_buffers[0 if per_member else None](params, buffers, x)

    def losses_with_buffers(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor, loss: LossFn,
        per_member: bool = False, training: bool | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-member mean loss ``[m]`` (as :meth:`losses`) and the updated buffers (as
        :meth:`forward_with_buffers`)."""
        pred, new = self.forward_with_buffers(params, buffers, x, per_member, training)
        return self._reduce(pred, y, loss, per_member), new

    def init_params(
        self,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Params:
        """Fresh stacked parameters ``{name: [m, *shape]}`` drawn from ``generator``."""
        dtype = dtype or torch.get_default_dtype()
        m = self.members
        out: Params = {}
        if self.init == "default":
            out = self._default_init(generator, dtype, device)
        else:
            for name, shape in self.shapes.items():
                if callable(self.init):
                    t = torch.stack([torch.as_tensor(self.init(name, shape, generator)) for _ in range(m)])
                    if t.shape[1:] != shape:
                        raise ValueError(
                            f"Ensemble init function returned shape {tuple(t.shape[1:])} for {name!r}, "
                            f"expected {tuple(shape)}"
                        )
                    out[name] = t.to(dtype=dtype, device=device)
                    continue
                t = torch.empty((m, *shape), dtype=dtype, device=device)
                if self.init == "normal":
                    t.normal_(0.0, self.std, generator=generator)
                elif len(shape) < 2:
                    t.zero_()
                else:
                    fan_out, fan_in = shape[0], math.prod(shape[1:])
                    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
                    fan_out *= receptive
                    if self.init == "xavier":
                        bound = math.sqrt(6.0 / (fan_in + fan_out))
                    else:  # kaiming uniform, gain sqrt(2) (ReLU)
                        bound = math.sqrt(2.0) * math.sqrt(3.0 / fan_in)
                    t.uniform_(-bound, bound, generator=generator)
                out[name] = t
        return out

    def _default_init(self, generator: torch.Generator | None, dtype: torch.dtype, device: Any) -> Params:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        members = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(self.members):
                mod = self.factory() if self.factory is not None else _fresh_copy(self.module)
                members.append({k: p.detach() for k, p in mod.named_parameters()})
        return {k: torch.stack([p[k] for p in members]).to(dtype=dtype, device=device) for k in self.shapes}

    def __call__(self, params: Mapping[str, Tensor], x: Tensor, per_member: bool = False) -> Tensor:
        """Outputs ``[m, B, ...]``: ``x`` is ``[B, ...]`` shared by all members, or ``[m, B, ...]``
        with ``per_member=True`` (each member its own inputs, e.g. its own synthetic data)."""
        self._check(params, x, per_member)
        if self._fast is not None:
            return self._fast(params, x, per_member)
        if self.buffer_shapes:  # the module's own buffers, copied per member: it is never modified
            buffers = self.init_buffers(next(iter(params.values())).dtype, x.device)
            return self._vmapped_buffers[0 if per_member else None](params, buffers, x)[0]
        return self._vmapped[0 if per_member else None](params, x)

    def losses(
        self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss: LossFn, per_member: bool = False
    ) -> Tensor:
        """Per-member mean loss ``[m]``.

        ``loss(pred, target)`` gets the members' predictions flattened to ``[m * B, ...]`` and the
        targets likewise (``y`` is ``[B, ...]``, repeated for every member, or ``[m, B, ...]`` with
        ``per_member``) and must return per-sample losses (``reduction='none'``), e.g.
        ``F.cross_entropy(..., reduction='none')`` with ``y: [B]`` or
        ``F.binary_cross_entropy_with_logits(..., reduction='none')`` with ``y: [B, 1]``.
        """
        return self._reduce(self(params, x, per_member), y, loss, per_member)

    def _reduce(self, pred: Tensor, y: Tensor, loss: LossFn, per_member: bool) -> Tensor:
        m, b = pred.shape[:2]
        target = y if per_member else y.unsqueeze(0).expand((m, *y.shape))
        per_sample = loss(pred.reshape(m * b, *pred.shape[2:]), target.reshape(m * b, *target.shape[2:]))
        return per_sample.reshape(m, -1).mean(1)

    def _check(self, params: Mapping[str, Tensor], x: Tensor, per_member: bool) -> None:
        if params.keys() != self.shapes.keys():
            raise ValueError(
                f"Ensemble: params keys {sorted(params)} do not match the module's {sorted(self.shapes)}"
            )
        if per_member and x.shape[0] != self.members:
            raise ValueError(
                f"Ensemble: per_member inputs need a leading axis of {self.members} members, got shape "
                f"{tuple(x.shape)}"
            )


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool | None) -> Iterator[None]:
    """``module`` (and its submodules) in train or eval mode for the block, each restored after."""
    if training is None:
        yield
        return
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _fresh_copy(module: nn.Module) -> nn.Module:
    import copy

    mod = copy.deepcopy(module)
    for sub in mod.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return mod


class MultiEnsemble:
    """Several architectures trained together: ``{group: Ensemble}``.

    Parameters are one flat dict with keys ``"{group}.{name}"``; :meth:`losses` returns one ``[m_g]``
    tensor per group, and :meth:`mean_loss` averages groups equally (each group's members averaged
    first), which is how several architectures share one outer loss.
    """

    def __init__(self, groups: Mapping[str, Ensemble]) -> None:
        if not groups:
            raise ValueError("MultiEnsemble needs at least one group")
        for g in groups:
            if "." in g:
                raise ValueError(f"MultiEnsemble: group name {g!r} must not contain '.'")
        self.groups = dict(groups)

    @property
    def members(self) -> int:
        """The total number of members over all groups."""
        return sum(e.members for e in self.groups.values())

    def init_params(self, generator: torch.Generator | None = None, keep: Mapping[str, Tensor] | None = None,
                    **kw: Any) -> Params:
        """Fresh parameters of every group, drawn from ``generator`` group by group.

        ``keep = {group: member indices}`` returns only those members (groups not named are dropped),
        after drawing all of them: a shard of an ensemble (e.g. one rank's, see
        :mod:`metaopt.run.distributed`) then gets exactly the values the whole ensemble would."""
        out: Params = {}
        for g, ens in self.groups.items():
            if keep is not None and g not in keep:
                ens.init_params(generator, **kw)  # drawn, so the later groups' values do not move
                continue
            for k, v in ens.init_params(generator, **kw).items():
                out[f"{g}.{k}"] = v if keep is None else v[keep[g].to(v.device)]
        return out

    def split(self, params: Mapping[str, Tensor]) -> dict[str, Params]:
        """``{group: {name: tensor}}`` views of the flat parameter dict."""
        out: dict[str, Params] = {g: {} for g in self.groups}
        for key, v in params.items():
            g, _, name = key.partition(".")
            if g not in out:
                raise ValueError(f"MultiEnsemble: parameter {key!r} belongs to no group of {sorted(out)}")
            out[g][name] = v
        return out

    def _inputs(self, x: Tensor, per_member: bool) -> dict[str, Tensor]:
        """Each group's inputs: ``x`` shared, or with ``per_member`` split along the member axis
        (``x`` is ``[members, ...]``, groups in order)."""
        if not per_member or len(self.groups) == 1:
            if per_member and x.shape[0] != self.members:
                raise ValueError(
                    f"MultiEnsemble: per_member inputs need a leading axis of {self.members} members, got shape "
                    f"{tuple(x.shape)}"
                )
            return dict.fromkeys(self.groups, x)
        if x.shape[0] != self.members:
            raise ValueError(
                f"MultiEnsemble: per_member inputs need a leading axis of {self.members} members, got shape "
                f"{tuple(x.shape)}"
            )
        sizes = [e.members for e in self.groups.values()]
        return dict(zip(self.groups, x.split(sizes)))

    def __call__(self, params: Mapping[str, Tensor], x: Tensor, per_member: bool = False) -> dict[str, Tensor]:
        xs = self._inputs(x, per_member)
        return {g: self.groups[g](p, xs[g], per_member) for g, p in self.split(params).items()}

    def losses(
        self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss: LossFn, per_member: bool = False
    ) -> dict[str, Tensor]:
        """``{group: [m_g]}`` per-member losses (see :meth:`Ensemble.losses`)."""
        xs, ys = self._inputs(x, per_member), self._inputs(y, per_member)
        return {g: self.groups[g].losses(p, xs[g], ys[g], loss, per_member) for g, p in self.split(params).items()}

    def mean_loss(
        self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss: LossFn, per_member: bool = False
    ) -> Tensor:
        """One scalar: each group's members averaged, then the groups equally (a group of 10
        members counts as much as a group of 2)."""
        per_group = self.losses(params, x, y, loss, per_member)
        return torch.stack([v.mean() for v in per_group.values()]).mean()
