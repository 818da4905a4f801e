"""Datasets generated offline, bit-identical to scikit-learn's generators (no scikit-learn needed)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["bundled", "make_moons", "moons_split", "stratified_split", "train_test_split_indices"]


def numpy_seed(seed: int | None) -> int | list[int] | None:
    """``seed`` (any integer in [0, 2**63), or ``None``) as numpy's legacy seeding accepts it: itself
    below 2**32 (so every seed used so far draws what it drew), else its two 32-bit words, which keep
    distinct seeds distinct."""
    if seed is None or 0 <= seed < 2**32:
        return seed
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed = {seed} must be in [0, 2**63)")
    return [seed & 0xFFFFFFFF, seed >> 32]


def make_moons(n_samples: int = 100, noise: float | None = None, random_state: int | None = None) -> tuple[
    np.ndarray, np.ndarray
]:
    """Two interleaving half circles; the same points as ``sklearn.datasets.make_moons(n, shuffle=True,
    noise=noise, random_state=random_state)``. Returns ``X [n, 2]`` (float64) and ``y [n]`` (int64)."""
    if n_samples <= 1:
        raise ValueError(f"make_moons: n_samples must be >= 2, got {n_samples}")
    rng = np.random.RandomState(numpy_seed(random_state))
    n_out = n_samples // 2
    n_in = n_samples - n_out
    t_out, t_in = np.linspace(0, np.pi, n_out), np.linspace(0, np.pi, n_in)
    X = np.vstack([np.append(np.cos(t_out), 1 - np.cos(t_in)), np.append(np.sin(t_out), 1 - np.sin(t_in) - 0.5)]).T
    y = np.hstack([np.zeros(n_out, dtype=np.int64), np.ones(n_in, dtype=np.int64)])
    order = np.arange(n_samples)
    rng.shuffle(order)
    X, y = X[order], y[order]
    if noise is not None:
        X = X + rng.normal(scale=noise, size=X.shape)
    return X, y


def train_test_split_indices(n_samples: int, test_size: float, random_state: int | None = None) -> tuple[
    np.ndarray, np.ndarray
]:
    """Train and test indices as ``sklearn.model_selection.train_test_split(..., test_size=test_size,
    random_state=random_state)`` draws them (no stratification)."""
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    n_test = math.ceil(test_size * n_samples)
    perm = np.random.RandomState(numpy_seed(random_state)).permutation(n_samples)
    return perm[n_test:], perm[:n_test]


def moons_split(
    n_samples: int = 1500, noise: float = 0.05, random_state: int = 8, test_size: float = 0.33
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distillation seed paper's data: ``X_train, X_test, y_train, y_test`` (1005 / 495 points)."""
    X, y = make_moons(n_samples, noise=noise, random_state=random_state)
    train, test = train_test_split_indices(n_samples, test_size, random_state)
    return X[train], X[test], y[train], y[test]


def bundled(name: str, field: str) -> tuple[np.ndarray, np.ndarray]:
    """``X, y`` of one of scikit-learn's bundled datasets (shipped inside the package: no download):
    ``"digits"`` (1797 x 64, 10 classes), ``"breast_cancer"`` (569 x 30, 2), ``"wine"`` (178 x 13, 3).
    ``field`` names the config setting that asked for it, for the error when scikit-learn is missing."""
    loaders = {"digits": "load_digits", "breast_cancer": "load_breast_cancer", "wine": "load_wine"}
    if name not in loaders:
        raise ValueError(f"{field} = {name!r} is not a bundled dataset; use one of {', '.join(sorted(loaders))}")
    try:
        from sklearn import datasets
    except ImportError:
        raise ImportError(
            f"{field} = {name!r} needs scikit-learn's bundled {name} data: pip install 'metaopt[data]'"
        ) from None
    X, y = getattr(datasets, loaders[name])(return_X_y=True)
    return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)


def stratified_split(
    y: np.ndarray, fractions: tuple[float, ...], random_state: int = 0
) -> list[np.ndarray]:
    """Indices of ``len(fractions)`` disjoint parts of ``range(len(y))``, each class dealt into the
    parts in the given proportions (a stratified shuffle split; the last part takes the remainder)."""
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"stratified_split: fractions {fractions} must be positive and sum to 1")
    rng = np.random.RandomState(numpy_seed(random_state))
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = np.round(np.cumsum(fractions)[:-1] * idx.size).astype(int)
        for p, chunk in zip(parts, np.split(idx, cuts)):
            p.append(chunk)
    return [rng.permutation(np.concatenate(p)) for p in parts]
