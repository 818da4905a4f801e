"""The task: what ``metaopt run ridge`` builds from a config. Only ``evaluate`` is required; the
other hooks of :class:`metaopt.run.task.Task` (report, summary, figures, ...) keep their no-op defaults."""

from collections.abc import Mapping

import torch
from torch import Tensor

from metaopt import optim
from metaopt.hypergrad import train
from metaopt.run.task import Task

from .config import RidgeConfig
from .objective import RidgeObjective


class RidgeTask(Task):
    """Ridge regression whose penalty ``exp(log_lam)`` is the hyperparameter."""

    def __init__(self, cfg: RidgeConfig, device: torch.device) -> None:
        r = cfg.ridge
        self.objective = RidgeObjective(r.n, r.features, r.noise, cfg.seed)
        self.optimizer = optim.sgd(lr=r.lr)
        self.hyper = {"log_lam": torch.tensor(r.log_lam)}
        self.steps = r.steps  # inner steps per hypergradient (method: the default, full unroll)

    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        """Retrain with ``hyper``: validation and test error, and the penalty (every ``outer.eval_every``)."""
        params = train(self.objective, self.optimizer, hyper, self.steps, generator)
        return {"val_mse": float(self.objective.outer_loss(params, hyper, None)),
                "test_mse": self.objective.test_error(params), "lam": float(hyper["log_lam"].exp())}
