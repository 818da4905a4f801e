"""metaopt: differentiable optimizers, functional ensembles and hypergradients for PyTorch.

The names below load on first use (PEP 562), so ``import metaopt`` is cheap and the ``metaopt``
command starts (``--version``, ``--help``) without importing torch; ``from metaopt import
hypergradient`` and ``metaopt.hypergradient`` work as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = ("ensemble", "hypergrad", "migrate", "optim")
_NAMES = {  # public name -> the submodule that defines it
    "Ensemble": "ensemble",
    "MultiEnsemble": "ensemble",
    "HypergradResult": "hypergrad",
    "InnerState": "hypergrad",
    "Level": "hypergrad",
    "NonFiniteError": "hypergrad",
    "hypergradient": "hypergrad",
    "MetaObjective": "objective",
}

__all__ = ["Ensemble", "HypergradResult", "InnerState", "Level", "MetaObjective", "MultiEnsemble", "NonFiniteError",
           "ensemble", "hypergrad", "hypergradient", "migrate", "optim"]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import ensemble, hypergrad, migrate, optim
    from .ensemble import Ensemble, MultiEnsemble
    from .hypergrad import HypergradResult, InnerState, Level, NonFiniteError, hypergradient
    from .objective import MetaObjective


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value: Any = importlib.import_module(f".{name}", __name__)
    elif name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'metaopt' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
