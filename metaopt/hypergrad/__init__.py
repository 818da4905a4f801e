"""Hypergradients ``dF/dh`` through inner training: one entry point, several trajectory policies."""

from .api import hypergradient, train
from .drmad import DrMAD
from .fdcheck import check
from .greedy import GreedyResult, t1t2
from .implicit import HOAG, Implicit, custom_root
from .methods import Checkpointed, Forward, Full, Method, Truncated
from .result import HypergradResult, NonFiniteError
from .reversible import Reversible

__all__ = [
    "hypergradient",
    "HypergradResult",
    "Full",
    "Truncated",
    "Checkpointed",
    "Forward",
    "Reversible",
    "DrMAD",
    "Implicit",
    "Method",
    "HOAG",
    "custom_root",
    "t1t2",
    "GreedyResult",
    "train",
    "check",
    "NonFiniteError",
]
