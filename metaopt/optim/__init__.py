"""Differentiable optimizers: pure ``init``/``update`` pairs over dicts of tensors, and schedules."""

from . import schedule
from ._adam import Adam, adam, adamw
from ._sgd import SGD, momentum, nesterov, sgd
from .base import HParam, Optimizer, Params, State

__all__ = ["SGD", "Adam", "sgd", "momentum", "nesterov", "adam", "adamw", "Optimizer", "Params", "State", "HParam",
           "schedule"]
