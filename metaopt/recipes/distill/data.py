"""Datasets of the distillation recipe, all offline: the paper's moons split and scikit-learn's
bundled 8x8 digits (stratified 70/30)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ...data import moons_split
from ...run.config import ConfigError


@dataclass
class Dataset:
    """Train/test tensors. ``X [N, d]`` float; ``y [N]`` int64 class indices; ``classes`` >= 2.

    Binary problems (``classes == 2``) use one logit and binary cross-entropy, as the paper does;
    more classes use ``classes`` logits and cross-entropy. ``image`` is ``(C, H, W)`` when the
    flat ``d`` features are an image (for convolutional models and the image grid figure).
    """

    name: str
    X: Tensor
    y: Tensor
    X_test: Tensor
    y_test: Tensor
    classes: int
    image: tuple[int, int, int] | None = None

    @property
    def features(self) -> int:
        return self.X.shape[1]

    @property
    def outputs(self) -> int:
        return 1 if self.classes == 2 else self.classes

    def to(self, device: torch.device, dtype: torch.dtype) -> Dataset:
        return Dataset(self.name, self.X.to(device, dtype), self.y.to(device), self.X_test.to(device, dtype),
                       self.y_test.to(device), self.classes, self.image)


def moons() -> Dataset:
    """``make_moons(1500, noise=0.05, random_state=8)`` split 2:1 with ``random_state=8``: 1005/495."""
    Xtr, Xte, ytr, yte = moons_split()
    return Dataset("moons", torch.tensor(Xtr), torch.tensor(ytr), torch.tensor(Xte), torch.tensor(yte), 2)


def digits(test_size: float = 0.3, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), pixels scaled to [0, 1],
    split 70/30 stratified by class."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ConfigError(
            "distill.dataset = 'digits' needs scikit-learn's bundled digits: pip install 'metaopt[data]'"
        ) from None
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=test_size, random_state=seed, stratify=y)
    return Dataset("digits", torch.tensor(Xtr), torch.tensor(ytr), torch.tensor(Xte), torch.tensor(yte), 10,
                   image=(1, 8, 8))


DATASETS = {"moons": moons, "digits": digits}


def load(name: str) -> Dataset:
    if name not in DATASETS:
        raise ConfigError(f"distill.dataset = {name!r} is not known; use one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name]()


def class_balanced(y: np.ndarray | Tensor, per_class: int, classes: int, generator: torch.Generator) -> Tensor:
    """Indices of ``per_class`` random examples of every class, class-major ``[classes * per_class]``."""
    y = torch.as_tensor(y)
    out = []
    for c in range(classes):
        idx = torch.nonzero(y == c).squeeze(1)
        out.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
    return torch.cat(out)
