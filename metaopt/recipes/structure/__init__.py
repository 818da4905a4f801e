"""Variational model-structure selection (Bakhteev & Strijov): the structure graph and the bilevel
objective. The ``structure`` recipe (runs, modes, experiments) builds on these; see issue 7."""

from .graph import Edge, StructureGraph
from .objective import Coefficients, StructureSelection, concrete_log_prob, concrete_sample, gaussian_kl

__all__ = ["Coefficients", "Edge", "StructureGraph", "StructureSelection", "concrete_log_prob", "concrete_sample",
           "gaussian_kl"]
