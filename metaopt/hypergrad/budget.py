"""Memory as a budget: the member-chunked full unroll, and the exact policy chosen within ``max_memory``.

:func:`within` runs ``Full(chunk=c)`` and ``Full(max_memory=B)`` for :func:`metaopt.hypergradient`:

* **member-chunked** (``chunk = c``): an objective that splits into ``m`` ensemble members
  (:meth:`~metaopt.MetaObjective.ensemble_size`, :meth:`~metaopt.MetaObjective.share`) is run as
  ``ceil(m / c)`` shares of ``c`` members, each a full unroll from the same generator state (so the
  same draws), recorded, swept and freed before the next; loss and hypergradient are the shares'
  sums, the final params the shares' concatenated along the member axis, the peak the largest
  share's.
* **a budget** (``max_memory``): the first inner steps are measured (:func:`measure`: full unrolls
  of 1, 2 and 3 steps give the bytes of the inner state ``S``, the most one recorded step adds to the
  stored trajectory ``B``, by :class:`~metaopt.hypergrad.problem.Meter`, and the time of a step),
  each candidate's peak is predicted by its own ``peak_bound(n, S, B, n_hyper)``, and
  :func:`choose` runs the full unroll when it fits, else the fastest (by predicted time) of the
  member-chunked unroll with the largest chunk that fits (its ``S``, ``B`` measured on a share of
  that size), checkpointed with the largest interval that fits, and recursive with the largest base
  span that fits. None fits: a one-line :class:`BudgetError` naming the smallest budget that would
  work. The sizes are measured once per objective, optimizer, hyperparameter shapes and settings,
  and reused.

The chosen policy (``extras["policy"]``), its predicted peak (``extras["predicted_peak_bytes"]``),
the measured one (``HypergradResult.peak_bytes``) and the candidates that fit with their predicted
peaks and times (``extras["candidates"]``) land in ``extras``; policy and peaks also in
``extras["log"]``, which the runner writes into every step's metrics row.
"""

from __future__ import annotations

import math
import re
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._tree import tree_flatten
from ..objective import MetaObjective
from ..optim.base import Optimizer, Params
from .methods import Method
from .problem import _unique_bytes
from .result import HypergradResult, InnerState
from .unroll import Checkpointed, Full, Recursive

__all__ = ["REPLAY", "BudgetError", "Plan", "Sizes", "choose", "groups", "measure", "parse_size", "share", "within"]

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
    unroll over shares of ``chunk`` members; ``predicted`` is its ``peak_bound`` in bytes,
    ``seconds`` its predicted time (:func:`choose`)."""

    method: Method
    chunk: int | None
    predicted: float
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"full (chunk={self.chunk})" if self.chunk is not None else self.method.label


class Sizes(NamedTuple):
    """What :func:`measure` finds for a problem (or a share): ``state`` bytes of the inner state, ``step``
    bytes one recorded step adds at most, ``seconds`` of one recorded step and its sweep."""

    state: int
    step: int
    seconds: float


REPLAY = 0.5
"""The predicted cost of an unrecorded inner step (a checkpointed or recursive run's recomputation)
as a fraction of a recorded step and its sweep (measured 0.24-0.5 on the wide MLP, docs/benchmarks.md)."""


def choose(budget: int, steps: int, n_hyper: int, sizes: Callable[[int | None], Sizes],
           members: int | None = None) -> tuple[Plan, list[Plan]]:
    """The fastest exact plan whose predicted peak is at most ``budget`` bytes, and every family's
    candidate that fits. The full unroll when it fits (the least work); otherwise the fastest by
    predicted time of: member-chunked (``members > 1``) with the largest chunk that fits (bisection:
    a larger chunk has a larger peak; ``sizes(c)`` is asked only for the chunks tried), ``ceil(m/c)``
    runs of ``n`` steps of a share of ``c``; checkpointed with the largest interval that fits (fewest
    segments), ``n`` steps plus ``n`` replayed; recursive with the largest base span that fits, ``n``
    steps plus ``n/2 log2(n/base)`` replayed (a replayed step costs :data:`REPLAY` of a recorded one).
    None fits: a :class:`BudgetError` naming the smallest budget that would do."""
    whole = sizes(None)
    S, B, t = whole
    full = Plan(Full(), None, Full().peak_bound(steps, S, B, n_hyper), steps * t)
    if full.predicted <= budget:
        return full, [full]
    least, fits = [full], []
    if members is not None and members > 1:

        def chunked(c: int) -> Plan:
            share = sizes(c)
            return Plan(Full(chunk=c), c, Full().peak_bound(steps, share.state, share.step, n_hyper),
                        math.ceil(members / c) * steps * share.seconds)

        least.append(chunked(1))
        if least[-1].predicted <= budget:
            lo, hi = 1, members - 1  # c = lo fits: the largest c <= hi that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if chunked(mid).predicted <= budget else (lo, mid - 1)
            fits.append(chunked(lo))
    for family in ([Plan(Checkpointed(e), None, Checkpointed(e).peak_bound(steps, S, B, n_hyper),
                         steps * t * (1 + REPLAY)) for e in range(steps, 0, -1)],
                   [Plan(Recursive(b), None, Recursive(b).peak_bound(steps, S, B, n_hyper),
                         steps * t * (1 + REPLAY * math.log2(max(steps / b, 1)) / 2)) for b in range(steps, 0, -1)]):
        fitting = [p for p in family if p.predicted <= budget]
        if fitting:
            fits.append(fitting[0])
        least.append(min(family, key=lambda p: p.predicted))
    if fits:
        return min(fits, key=lambda p: p.seconds), fits
    smallest = min(least, key=lambda p: p.predicted)
    need = math.ceil(smallest.predicted)
    raise BudgetError(f"max_memory = {budget} B ({_size_text(budget)}) is below every exact policy's predicted "
                      f"peak for {steps} inner steps: the smallest, {smallest.label}, needs {need} B "
                      f"({_size_text(need)}); raise max_memory to at least {need}")


_MEASURED: weakref.WeakKeyDictionary[MetaObjective, dict[Any, dict[int | None, Sizes]]] = (
    weakref.WeakKeyDictionary())
"""The measured :class:`Sizes` of an objective (``None``) and of its shares (by size),
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
    start: InnerState | None = None, **kwargs: Any,
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
    if method.chunk is not None and (params0 is not None or start is not None):
        given = "params0" if params0 is not None else "start"
        raise ValueError(f"Full(chunk={method.chunk}) draws each share's initialisation, so it cannot start from "
                         f"{given}; use Full() (or Checkpointed) with {given}")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    gen_state = generator.get_state()
    t0 = time.perf_counter()

    def call(obj: MetaObjective, how: Method, n: int = steps, exact: bool | None = None,
             gen: torch.Generator | None = None) -> HypergradResult:
        if gen is None:
            gen = torch.Generator(generator.device)
            gen.set_state(gen_state)
        kw = kwargs if exact is None else {**kwargs, "exact_memory": exact}
        return hypergradient(obj, optimizer, hyper, n, method=how, generator=gen, params0=params0, start=start, **kw)

    splits = m is not None and m > 1 and params0 is None and start is None
    predicted: float | None = None
    if method.max_memory is not None:
        same = ("compile", "autocast")  # what changes a step's saved tensors or time (not exact_memory: the
        # probes meter by default, which bounds both ways of metering)
        key = (id(optimizer), tuple((k, tuple(t.shape), t.dtype, t.device) for k, t in hyper.items()), steps >= 3,
               params0 is None and start is None, tuple(kwargs.get(k) for k in same))
        measured = _MEASURED.setdefault(objective, {}).setdefault(key, {})

        def sizes(chunk: int | None) -> Sizes:
            if chunk not in measured:
                obj = objective if chunk is None else share(objective, list(range(chunk)))
                measured[chunk] = measure([call(obj, Full(), k, exact=False) for k in range(1, min(3, steps) + 1)],
                                          optimizer)
            return measured[chunk]

        n_hyper = sum(t.numel() for t in hyper.values())
        plan, fits = choose(method.max_memory, steps, n_hyper, sizes, m if splits else None)
        predicted = plan.predicted
    else:
        plan = Plan(Full(), method.chunk, float("nan"))
    if plan.chunk is None or m is None or plan.chunk >= m:
        res = call(objective, plan.method, gen=generator)  # the caller's generator advances as a plain call's
    else:
        parts, gen = [], generator
        for members in groups(m, plan.chunk):
            gen = torch.Generator(generator.device)
            gen.set_state(gen_state)
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
        res.extras["candidates"] = {p.label: {"predicted_peak_bytes": p.predicted, "predicted_seconds": p.seconds}
                                    for p in fits}
        log["memory_predicted_bytes"] = float(predicted)
    res.extras["log"] = {**res.extras.get("log", {}), **log}
    return res


def measure(probes: Sequence[HypergradResult], optimizer: Optimizer) -> Sizes:
    """:class:`Sizes` from full unrolls of 1, 2, 3 inner steps (fewer for a shorter run), as metered
    by default: the bytes of the inner state (params, optimizer state, buffers; plus what the first
    step saves beyond a later one: the constants every step shares, counted once), the most that a
    later recorded step adds to the stored trajectory (the second step's, metered, and the third's,
    the meter's estimate for every later step), and the time per step of the longest probe (its
    per-call costs included: a share of few members then looks no cheaper than it is, where one
    step's time alone was too noisy to rank policies by). The prediction ``peak_bound(n, state, step,
    ...)`` then bounds what the meter reports, with ``exact_memory`` or without, when the steps are
    alike."""
    p = probes[0]
    state = _unique_bytes(tree_flatten((p.params, optimizer.init(p.params), p.buffers))[0])
    peaks = [state] + [q.peak_bytes for q in probes]
    adds = [b - a for a, b in zip(peaks, peaks[1:])]
    step = max(adds[1:] or adds)
    seconds = probes[-1].seconds / len(probes)  # per step of the longest probe, its call's costs included
    return Sizes(state + max(adds[0] - step, 0), max(step, 0), seconds)


def _joined(parts: list[HypergradResult], steps: int) -> HypergradResult:
    """The shares' results as the whole problem's: losses and hypergradients summed, params and
    buffers concatenated along the member axis (in share order), the largest peak."""
    grads = {k: sum((p.grads[k] for p in parts[1:]), parts[0].grads[k]) for k in parts[0].grads}
    loss = sum((p.loss for p in parts[1:]), parts[0].loss)
    final = None
    if all(p.final is not None for p in parts):
        ends = [p.final for p in parts]
        slots = list(dict.fromkeys(s for e in ends for s in e.opt_state))
        final = InnerState(_cat([e.params for e in ends]), {s: _cat([e.opt_state[s] for e in ends]) for s in slots},
                           ends[0].step, _cat([e.buffers for e in ends]), ends[0].seed)
    return HypergradResult(loss=loss, grads=grads, params=_cat([p.params for p in parts]), method="full", steps=steps,
                           peak_bytes=max(p.peak_bytes for p in parts), seconds=0.0,
                           extras={"chunks": len(parts)}, buffers=_cat([p.buffers for p in parts]), final=final)


def _cat(trees: list[Mapping[str, Tensor]]) -> Params:
    keys = list(dict.fromkeys(k for t in trees for k in t))
    return {k: torch.cat([t[k] for t in trees if k in t]) for k in keys}
