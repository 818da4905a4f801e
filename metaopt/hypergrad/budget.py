"""Memory as a budget: the member-chunked full unroll, and the exact policy chosen within ``max_memory``.

:func:`within` runs ``Full(chunk=c)`` and ``Full(max_memory=B)`` for :func:`metaopt.hypergradient`:

* **member-chunked** (``chunk = c``): an objective that splits into ``m`` ensemble members
  (:meth:`~metaopt.MetaObjective.ensemble_size`, :meth:`~metaopt.MetaObjective.share`) is run as
  ``ceil(m / c)`` shares of ``c`` members, each a full unroll from the same generator state (so the
  same draws), recorded, swept and freed before the next; loss and hypergradient are the shares'
  sums, the final params the shares' concatenated along the member axis, the peak the largest
  share's.
* **a budget** (``max_memory``): the first inner steps are measured (the bytes of the inner state
  ``S`` and the most one recorded step adds to the stored trajectory ``B``, by
  :class:`~metaopt.hypergrad.problem.Meter`: full unrolls of 1, 2 and 3 steps, :func:`measure`),
  each candidate's peak is predicted by its own ``peak_bound(n, S, B, n_hyper)``, and the first
  that fits runs, in this order (fastest first): the full unroll; member-chunked with the
  largest chunk that fits (its ``S``, ``B`` measured on a share of that size); checkpointed with the
  largest interval that fits (fewest segments); recursive with the largest base span that fits.
  None fits: a one-line :class:`BudgetError` naming the smallest budget that would work. The sizes
  are measured once per objective, optimizer, hyperparameter shapes and settings, and reused.

The chosen policy (``extras["policy"]``), its predicted peak (``extras["predicted_peak_bytes"]``)
and the measured one (``HypergradResult.peak_bytes``) land in ``extras``, and in ``extras["log"]``,
which the runner writes into every step's metrics row.
"""

from __future__ import annotations

import math
import re
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._tree import tree_flatten
from ..objective import MetaObjective
from ..optim.base import Optimizer, Params
from .methods import Method
from .problem import _unique_bytes
from .result import HypergradResult
from .unroll import Checkpointed, Full, Recursive

__all__ = ["BudgetError", "Plan", "choose", "groups", "measure", "parse_size", "share", "within"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


class BudgetError(ValueError):
    """No exact policy fits ``max_memory``; the message names the smallest budget that would."""


def parse_size(value: int | str, field: str = "max_memory") -> int:
    """Bytes from an int or a size string (``"512MB"``, ``"2GiB"``, ``"1.5 GB"``, ``"300000"``):
    decimal units (``kB``, ``MB``, ``GB``, ``TB``) are powers of 1000, binary ones (``KiB``,
    ``MiB``, ``GiB``, ``TiB``) of 1024. A one-line ``ValueError`` naming ``field`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"{field} = {value!r} must be a positive number of bytes")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{field} = {value!r} must be bytes (an int) or a size like '512MB' or '2GiB' "
                         "(units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"{field} = {value!r} must be at least 1 byte")
    return size


def _size_text(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


@dataclass(frozen=True)
class Plan:
    """One way to hold the trajectory: ``method`` run on the whole problem, or (``chunk``) the full
    unroll over shares of ``chunk`` members; ``predicted`` is its ``peak_bound`` in bytes."""

    method: Method
    chunk: int | None
    predicted: float

    @property
    def label(self) -> str:
        return f"full (chunk={self.chunk})" if self.chunk is not None else self.method.label


Sizes = Callable[[int | None], tuple[int, int]]
"""``sizes(chunk) -> (state_bytes, step_bytes)`` of the whole problem (``None``) or a share."""


def choose(budget: int, steps: int, n_hyper: int, sizes: Sizes, members: int | None = None) -> Plan:
    """The fastest exact plan whose predicted peak is at most ``budget`` bytes, in this order: the
    full unroll; member-chunked (``members > 1``) with the largest chunk that fits (bisection: a
    larger chunk has a larger peak; ``sizes(c)`` is asked only for the chunks tried); checkpointed
    with the largest interval that fits (fewest segments); recursive with the largest base span that
    fits. None fits: a :class:`BudgetError` naming the smallest budget that would do."""
    S, B = sizes(None)
    full = Plan(Full(), None, Full().peak_bound(steps, S, B, n_hyper))
    if full.predicted <= budget:
        return full
    least = [full]
    if members is not None and members > 1:

        def chunked(c: int) -> Plan:
            S_c, B_c = sizes(c)
            return Plan(Full(chunk=c), c, Full().peak_bound(steps, S_c, B_c, n_hyper))

        least.append(chunked(1))
        if least[-1].predicted <= budget:
            lo, hi = 1, members - 1  # c = lo fits: the largest c <= hi that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if chunked(mid).predicted <= budget else (lo, mid - 1)
            return chunked(lo)
    for family in ([Plan(Checkpointed(e), None, Checkpointed(e).peak_bound(steps, S, B, n_hyper))
                    for e in range(steps, 0, -1)],
                   [Plan(Recursive(b), None, Recursive(b).peak_bound(steps, S, B, n_hyper))
                    for b in range(steps, 0, -1)]):
        fits = [p for p in family if p.predicted <= budget]
        if fits:
            return fits[0]
        least.append(min(family, key=lambda p: p.predicted))
    smallest = min(least, key=lambda p: p.predicted)
    need = math.ceil(smallest.predicted)
    raise BudgetError(f"max_memory = {budget} B ({_size_text(budget)}) is below every exact policy's predicted "
                      f"peak for {steps} inner steps: the smallest, {smallest.label}, needs {need} B "
                      f"({_size_text(need)}); raise max_memory to at least {need}")


_MEASURED: weakref.WeakKeyDictionary[MetaObjective, dict[Any, dict[int | None, tuple[int, int]]]] = (
    weakref.WeakKeyDictionary())
"""The measured ``(state_bytes, step_bytes)`` of an objective (``None``) and of its shares (by size),
per optimizer, hyperparameter shapes and settings: measured on the first call, reused by the next
(an outer loop's later steps plan without probing)."""

_SHARES: weakref.WeakKeyDictionary[MetaObjective, dict[tuple[int, ...], MetaObjective]] = weakref.WeakKeyDictionary()


def share(objective: MetaObjective, members: Sequence[int]) -> MetaObjective:
    """``objective.share(members)``, memoised per objective (a compiled step is compiled once per
    objective object, so every outer step reuses the shares' graphs)."""
    per = _SHARES.setdefault(objective, {})
    key = tuple(members)
    if key not in per:
        per[key] = objective.share(list(members))
    return per[key]


def groups(m: int, chunk: int) -> list[list[int]]:
    """Members ``0 .. m-1`` in consecutive groups of ``chunk`` (the last one may be smaller)."""
    return [list(range(i, min(i + chunk, m))) for i in range(0, m, chunk)]


def within(
    objective: MetaObjective, optimizer: Optimizer, hyper: Mapping[str, Tensor], steps: int, method: Full, *,
    generator: torch.Generator | None, params0: Mapping[str, Tensor] | None, create_graph: bool,
    **kwargs: Any,
) -> HypergradResult:
    """:func:`metaopt.hypergradient` for ``Full(chunk=...)`` / ``Full(max_memory=...)`` (see the
    module); ``kwargs`` are its other keyword arguments (``check_finite``, ``exact_memory``,
    ``compile``, ``autocast``), passed to every run."""
    from .api import hypergradient

    if create_graph:
        raise ValueError(f"method {method.label!r} does not combine with create_graph=True (every policy then keeps "
                         "the whole run's graph for the level above); use Full() and bound memory at that level")
    m = objective.ensemble_size()
    if method.chunk is not None and m is None:
        raise ValueError(f"Full(chunk={method.chunk}) needs an objective that splits into ensemble members: "
                         f"{type(objective).__name__} declares none (implement MetaObjective.ensemble_size and "
                         "share), or use Full()")
    if method.chunk is not None and params0 is not None:
        raise ValueError(f"Full(chunk={method.chunk}) draws each share's initialisation, so it cannot start from "
                         "params0; use Full() (or Checkpointed) with params0")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    start = generator.get_state()
    t0 = time.perf_counter()

    def call(obj: MetaObjective, how: Method, n: int = steps, exact: bool | None = None,
             gen: torch.Generator | None = None) -> HypergradResult:
        if gen is None:
            gen = torch.Generator(generator.device)
            gen.set_state(start)
        kw = kwargs if exact is None else {**kwargs, "exact_memory": exact}
        return hypergradient(obj, optimizer, hyper, n, method=how, generator=gen, params0=params0, **kw)

    splits = m is not None and m > 1 and params0 is None
    predicted: float | None = None
    if method.max_memory is not None:
        key = (id(optimizer), tuple((k, tuple(t.shape), t.dtype, t.device) for k, t in hyper.items()), steps >= 3,
               params0 is None, tuple(sorted(kwargs.items(), key=lambda kv: kv[0])))
        measured = _MEASURED.setdefault(objective, {}).setdefault(key, {})

        def sizes(chunk: int | None) -> tuple[int, int]:
            if chunk not in measured:
                obj = objective if chunk is None else share(objective, list(range(chunk)))
                measured[chunk] = measure([call(obj, Full(), k) for k in range(1, min(3, steps) + 1)], optimizer)
            return measured[chunk]

        n_hyper = sum(t.numel() for t in hyper.values())
        plan = choose(method.max_memory, steps, n_hyper, sizes, m if splits else None)
        predicted = plan.predicted
    else:
        plan = Plan(Full(), method.chunk, float("nan"))
    if plan.chunk is None or m is None or plan.chunk >= m:
        res = call(objective, plan.method, gen=generator)  # the caller's generator advances as a plain call's
    else:
        parts, gen = [], generator
        for members in groups(m, plan.chunk):
            gen = torch.Generator(generator.device)
            gen.set_state(start)
            parts.append(call(share(objective, members), Full(), gen=gen))
        res = _joined(parts, steps)
        generator.set_state(gen.get_state())  # a share draws what the whole problem draws: a plain call's state
    res.seconds = time.perf_counter() - t0
    res.method = "full"
    res.extras["policy"] = plan.label
    log = {"memory_policy": plan.label, "memory_peak_bytes": float(res.peak_bytes)}
    if predicted is not None:
        res.extras["predicted_peak_bytes"] = predicted
        res.extras["max_memory"] = method.max_memory
        log["memory_predicted_bytes"] = float(predicted)
    res.extras["log"] = {**res.extras.get("log", {}), **log}
    return res


def measure(probes: Sequence[HypergradResult], optimizer: Optimizer) -> tuple[int, int]:
    """``(state_bytes, step_bytes)`` from full unrolls of 1, 2, 3 inner steps (fewer for a shorter
    run), as metered by default: the bytes of the inner state (params, optimizer state, buffers),
    and the most that one more recorded step adds to the stored trajectory: the first step's (its
    constants included), the second's (metered), the third's (the meter's estimate for every later
    step). The prediction ``peak_bound(n, state_bytes, step_bytes, ...)`` then bounds what the meter
    reports, with ``exact_memory`` or without, when the steps are alike."""
    p = probes[0]
    state = _unique_bytes(tree_flatten((p.params, optimizer.init(p.params), p.buffers))[0])
    peaks = [state] + [q.peak_bytes for q in probes]
    return state, max(max(b - a for a, b in zip(peaks, peaks[1:])), 0)


def _joined(parts: list[HypergradResult], steps: int) -> HypergradResult:
    """The shares' results as the whole problem's: losses and hypergradients summed, params and
    buffers concatenated along the member axis (in share order), the largest peak."""
    grads = {k: sum((p.grads[k] for p in parts[1:]), parts[0].grads[k]) for k in parts[0].grads}
    loss = sum((p.loss for p in parts[1:]), parts[0].loss)
    return HypergradResult(loss=loss, grads=grads, params=_cat([p.params for p in parts]), method="full", steps=steps,
                           peak_bytes=max(p.peak_bytes for p in parts), seconds=0.0,
                           extras={"chunks": len(parts)}, buffers=_cat([p.buffers for p in parts]))


def _cat(trees: list[Mapping[str, Tensor]]) -> Params:
    keys = list(dict.fromkeys(k for t in trees for k in t))
    return {k: torch.cat([t[k] for t in trees if k in t]) for k in keys}
