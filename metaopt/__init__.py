"""metaopt: differentiable optimizers, functional ensembles and hypergradients for PyTorch."""

from . import ensemble, hypergrad, optim
from .ensemble import Ensemble, MultiEnsemble
from .hypergrad import HypergradResult, Level, NonFiniteError, hypergradient
from .objective import MetaObjective

__version__ = "0.1.0"

__all__ = [
    "Ensemble",
    "HypergradResult",
    "Level",
    "MetaObjective",
    "MultiEnsemble",
    "NonFiniteError",
    "ensemble",
    "hypergrad",
    "hypergradient",
    "optim",
]
