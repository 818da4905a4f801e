"""The ``structure`` recipe's data: the synthetic ``y = tanh(x0) + noise`` or scikit-learn's bundled wine."""

from __future__ import annotations

import torch
from torch import Tensor

from ...data import bundled, stratified_split
from ...run.config import ConfigError
from .config import Config


def make_data(cfg: Config) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """``X, y, X_test, y_test, likelihood``: the synthetic ``y = tanh(x0) + noise`` (``x1`` a
    distractor) or scikit-learn's bundled wine (standardised, stratified 60/40)."""
    s = cfg.structure
    if s.data == "tanh":
        g = torch.Generator().manual_seed(cfg.seed + 101)

        def draw(n: int) -> tuple[Tensor, Tensor]:
            X = torch.rand(n, 2, generator=g, dtype=torch.float64) * 4 - 2
            return X, torch.tanh(X[:, 0]) + s.noise * torch.randn(n, generator=g, dtype=torch.float64)

        X, y = draw(s.n_train)
        Xt, yt = draw(1000)
        return X, y, Xt, yt, "gaussian"
    try:
        Xn, yn = bundled("wine", "structure.data")
    except (ImportError, ValueError) as e:
        raise ConfigError(str(e)) from None
    tr, te = stratified_split(yn, (0.6, 0.4), cfg.seed)
    mean, std = Xn[tr].mean(0), Xn[tr].std(0)
    Xn = (Xn - mean) / std
    t = torch.tensor
    return t(Xn[tr]), t(yn[tr]), t(Xn[te]), t(yn[te]), "categorical"
