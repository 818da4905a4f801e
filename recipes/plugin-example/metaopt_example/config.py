"""The recipe's settings: a ``seed``, its own ``[ridge]`` table and the ``[outer]`` table every recipe shares."""

from dataclasses import dataclass, field

from metaopt.run.config import ConfigError
from metaopt.run.recipe import OuterConfig


@dataclass
class Ridge:
    """``[ridge]``: the data and the inner training."""

    n: int = 100  # training points (as many for validation, and for test)
    features: int = 20
    noise: float = 1.0  # noise std of y = X w* + noise
    steps: int = 100  # inner gradient steps per hypergradient
    lr: float = 0.05  # inner step size
    log_lam: float = 0.0  # initial log of the L2 penalty (the hyperparameter)

    def validate(self) -> None:  # called by metaopt after the config is read; raise ConfigError naming the key
        for name in ("n", "features", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ridge.{name} = {getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"ridge.lr = {self.lr} must be > 0")


@dataclass
class RidgeConfig:
    seed: int = 0
    ridge: Ridge = field(default_factory=Ridge)
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(steps=50, meta_lr=0.1))
