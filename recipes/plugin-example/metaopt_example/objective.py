"""The bilevel problem: inner ridge regression on the training split, outer validation error."""

import torch

from metaopt import MetaObjective


class RidgeObjective(MetaObjective):
    """``w`` minimises ``|X w - y|^2 / n + exp(log_lam) |w|^2`` on the training split (inner, by
    gradient steps); ``F`` is the mean squared error of ``w`` on the validation split."""

    def __init__(self, n: int, features: int, noise: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        w_true = torch.randn(features, generator=g)

        def split() -> tuple[torch.Tensor, torch.Tensor]:
            X = torch.randn(n, features, generator=g)
            return X, X @ w_true + noise * torch.randn(n, generator=g)

        (self.X, self.y), (self.X_val, self.y_val), (self.X_test, self.y_test) = split(), split(), split()

    def init_params(self, hyper, generator):
        return {"w": torch.zeros(self.X.shape[1])}

    def inner_loss(self, params, hyper, k, batch):
        residual = self.X @ params["w"] - self.y
        return (residual**2).mean() + hyper["log_lam"].exp() * (params["w"] ** 2).sum()

    def outer_loss(self, params, hyper, batch):
        return ((self.X_val @ params["w"] - self.y_val) ** 2).mean()

    def test_error(self, params) -> float:
        return float(((self.X_test @ params["w"] - self.y_test) ** 2).mean())
