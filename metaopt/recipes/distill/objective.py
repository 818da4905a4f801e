"""Dataset distillation as one :class:`metaopt.MetaObjective` (Wang et al. 2018; Medvedev & D'yakonov 2020).

Many independent distillations run as one batched problem. A *row* is one distillation protocol,
named by the architectures of its ``m`` internal models (``["2-layer"] * 3``, or ``["1-layer",
"2-layer", "4-layer"]`` for multi-architecture distillation); each row runs ``restarts`` times, so
there are ``D = rows * restarts`` distillations, each with its own slice of every hyperparameter:

* ``x  [D, s, P, d]``: synthetic inputs, ``P = classes * per_class`` per inner step, ``s`` steps per epoch;
* ``lr [n, D]``: one learning rate per inner step (``n = s * epochs``), softplus-positive;
* ``y  [D, s, P, outputs]`` (``labels="soft"`` only): learnable labels (Sucholutsky & Schonlau 2019),
  initialised to the hard labels and used as unconstrained targets.

All internal models of one architecture, across rows and restarts, form one group of a
:class:`metaopt.MultiEnsemble`; ``owner`` maps each member to its distillation. Inner step ``k``
trains every member on its distillation's ``x[:, k % s]``. The outer loss is, per distillation, the
mean loss of its members on its own real batch, averaged over distillations, so each distillation
receives exactly the gradient it would get alone (up to the 1/D scale that Adam ignores).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ensemble import Ensemble, MultiEnsemble
from ...models import classification_loss as loss_fn
from ...models import correct, hard_targets
from ...objective import MetaObjective
from ...optim import schedule
from .data import Dataset


def _repeats(owner: Tensor, D: int) -> int | None:
    """``c`` when ``owner`` is ``[0]*c + [1]*c + ... + [D-1]*c`` (every distillation's members in one
    consecutive run of equal length), else ``None``."""
    if owner.numel() % D:
        return None
    c = owner.numel() // D
    same = torch.equal(owner.cpu(), torch.arange(D).repeat_interleave(c))
    return c if same else None


class Distillation(MetaObjective):
    """``rows x restarts`` distillations of ``data``'s training set, batched (see the module docstring).

    Args:
        data: the dataset (its training part is distilled).
        models: ``{arch name: module}`` for every architecture the rows use.
        rows: ``{row name: [arch of internal model 1, ..., arch of model m]}``.
        restarts: independent distillations per row.
        steps_per_epoch: ``s``, inner steps per epoch (one batch of synthetic points each).
        epochs: ``e``; the inner run has ``n = s * e`` steps.
        per_class: synthetic points of each class per inner step.
        batch: real points per distillation per outer step (``None``: the whole training set).
        shared_batch: one real batch for all distillations per outer step (cheaper, but their
            gradients are then correlated) instead of one batch each.
        init: ``"fresh"`` draws new initialisations every outer step (the paper); ``"fixed"`` uses the
            same ones throughout (Wang et al.'s fixed-init mode), drawn from ``fixed_seed``.
        labels: ``"fixed"`` (hard, class-major) or ``"soft"`` (learnable).
        init_scheme: the :class:`metaopt.Ensemble` initialiser (the paper: ``"xavier"``).
        hold: train only these members (indices in the order rows, restarts, slots; see
            :meth:`members_by_arch`), e.g. one rank's share in a multi-process run. Random draws are the
            whole problem's and the outer loss is this share's terms of the whole one, so the
            shares' losses and hypergradients add up to the whole problem's, whatever the split.
    """

    def __init__(
        self,
        data: Dataset,
        models: Mapping[str, nn.Module],
        rows: Mapping[str, Sequence[str]],
        restarts: int = 1,
        steps_per_epoch: int = 40,
        epochs: int = 5,
        per_class: int = 4,
        batch: int | None = 64,
        shared_batch: bool = False,
        init: Literal["fresh", "fixed"] = "fresh",
        labels: Literal["fixed", "soft"] = "fixed",
        init_scheme: str = "xavier",
        fixed_seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        hold: Sequence[int] | None = None,
    ) -> None:
        self._config = {"data": data, "models": models, "rows": rows, "restarts": restarts,
                        "steps_per_epoch": steps_per_epoch, "epochs": epochs, "per_class": per_class, "batch": batch,
                        "shared_batch": shared_batch, "init": init, "labels": labels, "init_scheme": init_scheme,
                        "fixed_seed": fixed_seed, "dtype": dtype, "device": device}
        self.data = data.to(torch.device(device), dtype)
        self.rows = {r: list(a) for r, a in rows.items()}
        self.restarts, self.s, self.epochs, self.per_class = restarts, steps_per_epoch, epochs, per_class
        self.steps = steps_per_epoch * epochs
        self.batch, self.shared_batch, self.init, self.labels = batch, shared_batch, init, labels
        self.fixed_seed, self.dtype, self.device = fixed_seed, dtype, torch.device(device)
        self.D = len(self.rows) * restarts
        self.P = data.classes * per_class
        M = sum(len(a) for a in self.rows.values()) * restarts
        held = set(range(M)) if hold is None else {int(m) for m in hold}
        if not held or not held <= set(range(M)):
            raise ValueError(f"hold = {sorted(held)} must name some of the {M} members (0 .. {M - 1})")
        self.sharded = len(held) < M
        self.held = sorted(held)  # the whole problem's indices of this objective's members
        owners: dict[str, list[int]] = {}
        everyone: dict[str, int] = {}  # members of each architecture in the whole problem
        keep: dict[str, list[int]] = {}  # the held ones' positions among them
        per_distillation = []  # members of each distillation in the whole problem
        self.member_keys: dict[str, list[str]] = {}  # per member: "row/restart/j", stable across shardings
        m = 0
        for i, (row, archs) in enumerate(self.rows.items()):
            for r in range(restarts):
                per_distillation.append(len(archs))
                for j, a in enumerate(archs):
                    pos = everyone.get(a, 0)
                    everyone[a] = pos + 1
                    if m in held:
                        owners.setdefault(a, []).append(i * restarts + r)
                        keep.setdefault(a, []).append(pos)
                        self.member_keys.setdefault(a, []).append(f"{row}/{r}/{j}")
                    m += 1
        self.archs = [a for a in models if a in owners]
        self.owner = {a: torch.tensor(owners[a], device=self.device) for a in self.archs}
        self.owner_all = torch.cat([self.owner[a] for a in self.archs])
        self._per = _repeats(self.owner_all, self.D)
        self.counts = torch.tensor(per_distillation, dtype=dtype, device=self.device)  # the whole problem's
        self.ens = MultiEnsemble({a: Ensemble(models[a], len(owners[a]), init=init_scheme) for a in self.archs})
        # the whole problem's groups, to draw fresh initialisations as the whole problem does
        self._all = MultiEnsemble({a: Ensemble(models[a], everyone[a], init=init_scheme) for a in models
                                   if a in everyone}) if self.sharded else self.ens
        self._keep = {a: torch.tensor(keep[a]) for a in self.archs} if self.sharded else None
        self.sizes = [len(owners[a]) for a in self.archs]
        self._arch_of = {f"{a}.{n}": a for a in self.archs for n in self.ens.groups[a].shapes}  # param -> arch
        self.y_class = torch.arange(data.classes, device=self.device).repeat_interleave(per_class)  # [P]
        hard = hard_targets(self.y_class, data.outputs, dtype)
        self._y_members = hard.expand(self.owner_all.numel(), *hard.shape)  # fixed labels, every member
        self._fixed: dict[str, Tensor] | None = None

    def members_by_arch(self) -> dict[str, list[int]]:
        """The whole problem's member indices (for ``hold``) of each architecture, in order."""
        out: dict[str, list[int]] = {}
        m = 0
        for archs in self.rows.values():
            for _ in range(self.restarts):
                for a in archs:
                    out.setdefault(a, []).append(m)
                    m += 1
        return out

    def ensemble_size(self) -> int:
        """The members this objective trains (all of them, or its ``hold``)."""
        return len(self.held)

    def share(self, members: Sequence[int]) -> Distillation:
        """Only ``members`` of this objective's (indices into its own, see :meth:`ensemble_size`)."""
        return Distillation(**self._config, hold=[self.held[i] for i in members])

    @property
    def members(self) -> int:
        """Internal models of the whole problem (all rows, restarts and slots)."""
        return int(self.counts.sum())

    # -- hyperparameters -----------------------------------------------------------------------

    def init_hyper(self, generator: torch.Generator, lr: float = 0.02) -> dict[str, Tensor]:
        """Random synthetic inputs ``N(0, 1)``, rates ``lr``, and (soft labels) the hard labels."""
        d = self.data.features
        x = torch.randn(self.D, self.s, self.P, d, generator=generator, dtype=self.dtype)
        raw = schedule.inverse_positive(torch.full((self.steps, self.D), lr, dtype=self.dtype), "softplus")
        hyper = {"x": x.to(self.device), "lr": raw.to(self.device)}
        if self.labels == "soft":
            hard = F.one_hot(self.y_class, self.data.classes).to(self.dtype)
            hard = hard[:, 1:] if self.data.outputs == 1 else hard
            hyper["y"] = hard.expand(self.D, self.s, -1, -1).clone()
        return hyper

    def rates(self, hyper: Mapping[str, Tensor]) -> Tensor:
        """The learned learning rates ``[n, D]``."""
        return F.softplus(hyper["lr"])

    def targets(self, hyper: Mapping[str, Tensor]) -> Tensor:
        """Labels of the synthetic points ``[D, s, P, ...]`` (soft, or hard class targets)."""
        if self.labels == "soft":
            return hyper["y"]
        hard = hard_targets(self.y_class, self.data.outputs, self.dtype)
        return hard.expand(self.D, self.s, *hard.shape)

    # -- MetaObjective --------------------------------------------------------------------------

    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        if self.init == "fixed":
            if self._fixed is None:
                self._fixed = self._fixed_init()
            return dict(self._fixed)
        drawn = self._all.init_params(generator, keep=self._keep, dtype=self.dtype)
        return {k: v.to(self.device) for k, v in drawn.items()}

    def _fixed_init(self) -> dict[str, Tensor]:
        """Each member's fixed init drawn from a seed of its own (``fixed_seed``, row, restart, slot),
        so it does not depend on which other rows share the problem (e.g. in another process)."""
        out: dict[str, Tensor] = {}
        for a, ens in self.ens.groups.items():
            one = Ensemble(ens.module, 1, init=ens.init)
            members = [one.init_params(torch.Generator().manual_seed(zlib.crc32(f"{self.fixed_seed}/{key}".encode())),
                                       dtype=self.dtype) for key in self.member_keys[a]]
            out.update({f"{a}.{n}": torch.cat([m[n] for m in members]).to(self.device) for n in ens.shapes})
        return out

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: Any, batch: Any) -> Tensor:
        j = k % self.s
        x = self._by_member(schedule.at_step(hyper["x"], j, dim=1))  # [M, P, d]
        y = self._by_member(schedule.at_step(hyper["y"], j, dim=1)) if self.labels == "soft" else self._y_members
        sums = [v.sum() for v in self.ens.losses(params, x, y, loss_fn, per_member=True).values()]
        total = sums[0]
        for v in sums[1:]:
            total = total + v
        return total

    def _by_member(self, per_distillation: Tensor) -> Tensor:
        """``[D, ...]`` -> ``[M, ...]``, each member's row of its distillation: ``t[owner_all]``, or
        when the members come in equal consecutive runs per distillation (one row), a broadcast view
        (``D = 1``) or a repeat, whose backward is a sum instead of an index_put."""
        if self._per is None:
            return per_distillation[self.owner_all]
        if self.D == 1:
            return per_distillation.expand(self._per, *per_distillation.shape[1:])
        return per_distillation.repeat_interleave(self._per, dim=0)

    def hparams(self, hyper: Mapping[str, Tensor]) -> dict[str, Any]:
        def lr(k: Any) -> dict[str, Tensor]:
            rate = self._by_member(F.softplus(schedule.at_step(hyper["lr"], k)))  # [M], groups in order
            if len(self.archs) == 1:
                return dict.fromkeys(self._arch_of, rate)
            per_group = dict(zip(self.archs, rate.split(self.sizes)))
            return {name: per_group[a] for name, a in self._arch_of.items()}

        return {"lr": lr}

    def outer_batch(self, generator: torch.Generator) -> Tensor | None:
        """Real-point indices ``[D, batch]`` (``[batch]`` with ``shared_batch``), or ``None`` for all."""
        if self.batch is None:
            return None
        n = self.data.X.shape[0]
        draws = 1 if self.shared_batch else self.D
        idx = torch.stack([torch.randperm(n, generator=generator)[: self.batch] for _ in range(draws)])
        return (idx[0] if self.shared_batch else idx).to(self.device)

    def member_losses(self, params: Mapping[str, Tensor], batch: Tensor | None) -> Tensor:
        """Every member's loss on real data ``[M]``: its distillation's batch (``batch [D, B]``), one
        shared batch (``[B]``), or all training points (``None``)."""
        X, y = self.data.X, hard_targets(self.data.y, self.data.outputs, self.dtype)
        if batch is None or batch.dim() == 1:
            losses = self.ens.losses(params, X if batch is None else X[batch], y if batch is None else y[batch],
                                     loss_fn)
        else:
            sel = batch[self.owner_all]  # [M, B]
            losses = self.ens.losses(params, X[sel], y[sel], loss_fn, per_member=True)
        return torch.cat(list(losses.values()))

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        per = torch.zeros(self.D, dtype=self.dtype, device=self.device)
        per = per.index_add(0, self.owner_all, self.member_losses(params, batch))
        if self.sharded:  # this share's terms of the whole problem's mean (unheld distillations add 0)
            return (per / self.counts).sum() / self.D
        return (per / self.counts).mean()

    def test_accuracy(self, params: Mapping[str, Tensor]) -> Tensor:
        """Every member's accuracy on the test set ``[M]`` (groups in order)."""
        with torch.no_grad():
            preds = self.ens(params, self.data.X_test)
            return torch.cat([correct(p, self.data.y_test).to(self.dtype).mean(1) for p in preds.values()])
