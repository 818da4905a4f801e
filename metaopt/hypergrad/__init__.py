"""Hypergradients ``dF/dh`` through inner training: one entry point, one method protocol, one name
table (:func:`registered`), several trajectory policies."""

from . import builtins as _builtins  # noqa: F401 (registers the built-in methods, first)
from .api import hypergradient, train
from .budget import BudgetError
from .drmad import DrMAD
from .fdcheck import check
from .forward import Forward
from .greedy import GreedyResult, t1t2
from .implicit import HOAG, Implicit, NotStationaryWarning, Solver, attach_root, custom_root
from .level import Level
from .methods import (
    FieldError,
    Method,
    MethodConfigError,
    Settings,
    Sweep,
    as_method,
    from_config,
    names,
    register,
    registered,
    unregister,
)
from .problem import Problem
from .random_truncation import RandomTruncated
from .result import HypergradResult, InnerState, NonFiniteError
from .reversible import Reversible
from .unroll import Checkpointed, Full, Recursive, Truncated
from .zero_order import ES, PES

__all__ = [
    "hypergradient",
    "HypergradResult",
    "InnerState",
    "Method",
    "Sweep",
    "Problem",
    "Settings",
    "register",
    "registered",
    "unregister",
    "names",
    "as_method",
    "from_config",
    "FieldError",
    "MethodConfigError",
    "Full",
    "Truncated",
    "Checkpointed",
    "Recursive",
    "RandomTruncated",
    "ES",
    "PES",
    "Forward",
    "Reversible",
    "DrMAD",
    "Implicit",
    "HOAG",
    "Solver",
    "custom_root",
    "attach_root",
    "Level",
    "t1t2",
    "GreedyResult",
    "train",
    "check",
    "NonFiniteError",
    "BudgetError",
    "NotStationaryWarning",
]
