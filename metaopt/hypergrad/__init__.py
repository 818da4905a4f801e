"""Hypergradients ``dF/dh`` through inner training: one entry point, several trajectory policies."""

from .api import hypergradient, train
from .check import check
from .drmad import DrMAD
from .greedy import GreedyResult, t1t2
from .implicit import HOAG, Implicit, custom_root
from .methods import Checkpointed, Forward, Full, Method, Truncated
from .result import HypergradResult, NonFiniteError
from .reversible import Reversible

__all__ = [
    "custom_root",
    "check",
    "DrMAD",
    "GreedyResult",
    "t1t2",
    "HOAG",
    "Implicit",
    "Checkpointed",
    "Forward",
    "Full",
    "HypergradResult",
    "Method",
    "NonFiniteError",
    "Reversible",
    "Truncated",
    "hypergradient",
    "train",
]
