"""How a hypergradient method gets the inner trajectory back: the trajectory policies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Full:
    """Reverse mode through all ``n`` steps, every step's graph kept: memory O(n)."""

    name: ClassVar[str] = "full"


@dataclass(frozen=True)
class Truncated:
    """Reverse mode through the last ``k`` steps only (Shaban et al. 2019): memory O(k), biased
    for ``k < n``; ``k = n`` is the full unroll."""

    k: int
    name: ClassVar[str] = "truncated"


@dataclass(frozen=True)
class Checkpointed:
    """Keep every ``every``-th inner state, recompute each segment in the reverse sweep:
    memory O(n/c + c) states and graphs, one extra forward; exact. Default ``every = ceil(sqrt(n))``."""

    every: int | None = None
    name: ClassVar[str] = "checkpointed"

    def interval(self, n: int) -> int:
        return self.every if self.every is not None else max(1, math.ceil(math.sqrt(n)))


@dataclass(frozen=True)
class Forward:
    """Forward mode: push one tangent per hyperparameter element through the inner run (batched
    with ``vmap``, ``chunk_size`` directions at a time). No trajectory is stored; cost grows with the
    number of hyperparameters, so it suits few of them."""

    chunk_size: int | None = None
    name: ClassVar[str] = "forward"


Method = Full | Truncated | Checkpointed | Forward
"""The unrolled trajectory policies; :func:`metaopt.hypergradient` also takes ``Reversible()``,
``DrMAD()`` and ``Implicit(solver)``, or a method's name."""

_BY_NAME = {"full": Full, "checkpointed": Checkpointed, "forward": Forward}


def as_method(method: Method | str) -> Method:
    from .drmad import DrMAD
    from .implicit import Implicit
    from .reversible import Reversible

    if isinstance(method, (Implicit, Reversible, DrMAD)):
        return method
    if method == "drmad":
        return DrMAD()
    if method == "implicit":
        return Implicit()
    if method == "reversible":
        return Reversible()
    """Accept a method object or one of ``"full"``, ``"checkpointed"``, ``"forward"``."""
    if isinstance(method, (Full, Truncated, Checkpointed, Forward)):
        return method
    if isinstance(method, str) and method in _BY_NAME:
        return _BY_NAME[method]()
    if method == "truncated":
        raise ValueError("method 'truncated' needs its length: use Truncated(k=...)")
    raise ValueError(
        f"unknown hypergradient method {method!r}; use one of {sorted(_BY_NAME)} or Truncated(k=...)"
    )
