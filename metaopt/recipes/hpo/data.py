"""Data of the ``hpo`` recipe, all offline: scikit-learn's bundled tables split three ways, the
label corruption of hyper-cleaning, and the synthetic polynomial regression of the evidence task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...data import bundled, stratified_split
from ...run.config import ConfigError


@dataclass
class Split:
    """Train / validation / test tensors of one classification table.

    ``X* [N, d]`` standardised with the training statistics; ``y* [N]`` int64 class indices.
    """

    name: str
    X: Tensor
    y: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    classes: int

    @property
    def features(self) -> int:
        return self.X.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Split:
        f = lambda t: t.to(device, dtype)  # noqa: E731
        return Split(self.name, f(self.X), self.y.to(device), f(self.X_val), self.y_val.to(device), f(self.X_test),
                     self.y_test.to(device), self.classes)


def table(name: str, fractions: tuple[float, float, float] = (0.5, 0.25, 0.25), seed: int = 0,
          field: str = "hpo.dataset") -> Split:
    """A bundled table (``breast_cancer``, ``digits``, ``wine``) split stratified into train /
    validation / test, features standardised by the training mean and std (constant pixels keep 0)."""
    try:
        X, y = bundled(name, field)
    except (ImportError, ValueError) as e:
        raise ConfigError(str(e)) from None
    tr, va, te = stratified_split(y, fractions, seed)
    mean, std = X[tr].mean(0), X[tr].std(0)
    std[std == 0] = 1.0
    X = (X - mean) / std
    t = lambda a: torch.tensor(a)  # noqa: E731
    return Split(name, t(X[tr]), t(y[tr]), t(X[va]), t(y[va]), t(X[te]), t(y[te]), int(y.max()) + 1)


def corrupt(y: Tensor, classes: int, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Franceschi et al. (2017)'s noise: ``fraction`` of the labels, chosen at random, replaced by a
    uniformly random *other* class. Returns ``(noisy labels, corrupted mask)``, both ``[N]``."""
    n = y.numel()
    flip = torch.zeros(n, dtype=torch.bool)
    flip[torch.randperm(n, generator=generator)[: round(fraction * n)]] = True
    shift = torch.randint(1, classes, (n,), generator=generator)
    noisy = torch.where(flip, (y + shift) % classes, y)
    return noisy, flip


@dataclass
class Regression:
    """``Phi [N, d]`` design (Legendre features of ``x``), targets ``y [N]``, and a test set."""

    Phi: Tensor
    y: Tensor
    Phi_test: Tensor
    y_test: Tensor
    x: Tensor  # the training inputs (for figures)
    coef: Tensor  # the true coefficients in the Legendre basis (zero beyond the true degree)
    noise: float


def legendre(x: Tensor, degree: int) -> Tensor:
    """``[N, degree + 1]`` Legendre polynomials P_0..P_degree of ``x`` in [-1, 1] (orthogonal under
    the uniform density, so the evidence problem stays well conditioned at high degree)."""
    cols = [torch.ones_like(x), x]
    for k in range(1, degree):
        cols.append(((2 * k + 1) * x * cols[k] - k * cols[k - 1]) / (k + 1))
    return torch.stack(cols[: degree + 1], dim=1)


def polynomial(n: int, n_test: int, degree: int, coef: list[float], noise: float, seed: int) -> Regression:
    """Synthetic polynomial regression: ``x ~ U[-1, 1]``, ``y = sum_j coef_j P_j(x) + N(0, noise^2)``,
    fitted with all Legendre features up to ``degree`` (more than the truth: the evidence should
    switch the extra ones off)."""
    if len(coef) > degree + 1:
        raise ConfigError(f"evidence.coef has {len(coef)} entries; the features only go to degree {degree}")
    g = torch.Generator().manual_seed(seed)
    true = torch.zeros(degree + 1, dtype=torch.float64)
    true[: len(coef)] = torch.tensor(coef, dtype=torch.float64)

    def draw(m: int) -> tuple[Tensor, Tensor, Tensor]:
        x = torch.rand(m, generator=g, dtype=torch.float64) * 2 - 1
        Phi = legendre(x, degree)
        return x, Phi, Phi @ true + noise * torch.randn(m, generator=g, dtype=torch.float64)

    x, Phi, y = draw(n)
    _, Phi_t, y_t = draw(n_test)
    return Regression(Phi, y, Phi_t, y_t, x, true, noise)
