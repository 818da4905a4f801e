"""The recipe's settings: a ``seed``, its own ``[ridge]`` table and the ``[outer]`` table every recipe shares.

Each field's type is its schema (:mod:`metaopt.run.schema`): ``Count`` is an integer >= 1, ``Positive``
a finite number > 0; every float is finite and every integer fits in 64 bits without saying so.
metaopt checks them when the config is read and names the field in a one-line error.
"""

from dataclasses import dataclass, field
from typing import Annotated

from metaopt.run.recipe import OuterConfig
from metaopt.run.schema import Count, Positive, Range, Seed


@dataclass
class Ridge:
    """``[ridge]``: the data and the inner training."""

    n: Count = 100  # training points (as many for validation, and for test)
    features: Count = 20
    noise: Positive = 1.0  # noise std of y = X w* + noise
    steps: Count = 100  # inner gradient steps per hypergradient
    lr: Positive = 0.05  # inner step size
    log_lam: Annotated[float, Range(-30, 30)] = 0.0  # initial log of the L2 penalty (the hyperparameter)


@dataclass
class RidgeConfig:
    seed: Seed = 0
    ridge: Ridge = field(default_factory=Ridge)
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(steps=50, meta_lr=0.1))
