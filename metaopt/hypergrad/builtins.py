"""The built-in hypergradient methods, registered in the one name table of
:mod:`metaopt.hypergrad.methods` (imported once by :mod:`metaopt.hypergrad`; the protocol module
imports no method), in the order :func:`~metaopt.hypergrad.check` lists them. A plug-in registers its
own the same way: one :func:`~metaopt.hypergrad.register` line."""

from __future__ import annotations

from .drmad import DrMAD
from .forward import Forward
from .implicit import HOAG, Implicit
from .methods import register
from .random_truncation import RandomTruncated
from .reversible import Reversible
from .unroll import Checkpointed, Full, Recursive, Truncated
from .zero_order import ES, PES

SOLVERS = ("cg", "neumann", "fixed_point", "dense")
"""The registered variants of :class:`Implicit`, one per linear solve."""


def _register_builtins() -> None:
    for cls in (Full, Checkpointed, Truncated, DrMAD, Forward, Reversible):
        register(cls)
    register(Recursive, in_check=False)  # the memory end of checkpointing; `check` keeps its table
    register(Implicit, in_check=False)  # the CG solve by default, as "cg"
    for solver in SOLVERS:
        register(Implicit, name=solver, fixed={"solver": solver},
                 summary=f"implicit differentiation, {solver.replace('_', ' ')} linear solve",
                 in_check=solver in ("cg", "neumann"), differentiable=solver != "fixed_point")
    register(HOAG, in_check=False)
    # a random draw per call: check's finite differences of F(params[n]) do not apply
    register(RandomTruncated, in_check=False)
    # Monte Carlo estimates: check's finite differences to 1e-6 do not apply (their standard error is in extras)
    register(ES, in_check=False)
    register(PES, in_check=False)


_register_builtins()
