"""Differentiable optimizers: pure ``init``/``update`` pairs over dicts of tensors, and schedules."""

from . import schedule
from .adam import adam, adamw
from .base import HParam, Optimizer, Params, State
from .sgd import momentum, nesterov, sgd

__all__ = ["HParam", "Optimizer", "Params", "State", "adam", "adamw", "momentum", "nesterov", "schedule", "sgd"]
