"""Differentiable optimizers: pure ``init``/``update`` pairs over dicts of tensors, composition, and schedules."""

from . import schedule
from ._adam import Adam, adam, adamw
from ._adaptive import adagrad, adamax, nadam, radam, rmsprop
from ._sgd import SGD, momentum, nesterov, sgd
from .base import HParam, Optimizer, Params, State
from .compose import Transform, chain, clip_by_global_norm, masked

__all__ = ["SGD", "Adam", "sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "adamax", "nadam",
           "radam", "chain", "clip_by_global_norm", "masked", "Transform", "Optimizer", "Params", "State", "HParam",
           "schedule"]
