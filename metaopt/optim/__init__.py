"""Differentiable optimizers: pure ``init``/``update`` pairs over dicts of tensors, and schedules."""

from . import schedule
from ._adam import adam, adamw
from ._sgd import momentum, nesterov, sgd
from .base import HParam, Optimizer, Params, State

__all__ = ["sgd", "momentum", "nesterov", "adam", "adamw", "Optimizer", "Params", "State", "HParam", "schedule"]
