"""Differentiable optimizers: pure ``init``/``update`` pairs over dicts of tensors, composition, and schedules;
torch.optim-shaped classes over them (``optim.SGD(model.parameters(), lr=0.1)``, :mod:`.stateful`)."""

from . import schedule
from ._adam import AdamSpec, adam, adamw
from ._adaptive import adagrad, adamax, nadam, radam, rmsprop
from ._sgd import SGDSpec, momentum, nesterov, sgd
from .base import HParam, Optimizer, Params, State
from .compose import Transform, chain, clip_by_global_norm, masked, partition
from .stateful import (
    SGD,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    NAdam,
    RAdam,
    RMSprop,
    functional_of,
    functional_state,
    load_functional_state,
)

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "functional_of",
           "functional_state", "load_functional_state", "SGDSpec", "AdamSpec", "sgd", "momentum", "nesterov", "adam",
           "adamw", "rmsprop", "adagrad", "adamax", "nadam", "radam", "chain", "clip_by_global_norm", "masked",
           "partition", "Transform", "Optimizer", "Params", "State", "HParam", "schedule"]
