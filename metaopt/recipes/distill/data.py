"""Datasets of the distillation recipe, all offline: the paper's moons split, scikit-learn's
bundled 8x8 digits (stratified 70/30), and MNIST, Fashion-MNIST and CIFAR-10 read from the user's
files (``distill.data_dir``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...data import moons_split, numpy_seed
from ...images import CIFAR10_FILES, MNIST_FILES, read_cifar10, read_mnist
from ...run.config import ConfigError


@dataclass
class Dataset:
    """Train/test tensors. ``X [N, d]`` float; ``y [N]`` int64 class indices; ``classes`` >= 2.

    Binary problems (``classes == 2``) use one logit and binary cross-entropy, as the paper does;
    more classes use ``classes`` logits and cross-entropy. ``image`` is ``(C, H, W)`` when the
    flat ``d`` features are an image (for convolutional models and the image grid figure),
    channel-major as ``X.reshape(N, C, H, W)`` reads it.
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
    rng = np.random.RandomState(numpy_seed(seed))
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=test_size, random_state=rng, stratify=y)
    return Dataset("digits", torch.tensor(Xtr), torch.tensor(ytr), torch.tensor(Xte), torch.tensor(yte), 10,
                   image=(1, 8, 8))


@dataclass(frozen=True)
class ImageFiles:
    """A dataset read from files in ``distill.data_dir``: how, its per-channel pixel mean and std
    (of the training images in [0, 1]; used to standardise, as Wang et al.'s code does), and where to
    get it."""

    reader: str  # "idx" (MNIST_FILES) or "cifar10" (CIFAR10_FILES)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str


IMAGE_FILES = {
    "mnist": ImageFiles("idx", (0.1307,), (0.3081,), "http://yann.lecun.com/exdb/mnist/ (mirror: "
                        "https://ossci-datasets.s3.amazonaws.com/mnist/)"),
    "fashion": ImageFiles("idx", (0.2860,), (0.3530,), "https://github.com/zalandoresearch/fashion-mnist "
                          "(files: http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/)"),
    "cifar10": ImageFiles("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                          "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it)"),
}
"""The datasets read from ``distill.data_dir`` (no download at run time)."""


def expected_files(name: str) -> str:
    """The file names ``distill.dataset = name`` reads, for messages."""
    if IMAGE_FILES[name].reader == "idx":
        return ", ".join(MNIST_FILES.values()) + " (each may be .gz)"
    return ", ".join(CIFAR10_FILES) + " (in data_dir or data_dir/cifar-10-batches-py)"


def images(name: str, data_dir: str) -> Dataset:
    """MNIST, Fashion-MNIST or CIFAR-10 (``name`` in :data:`IMAGE_FILES`) from ``data_dir``:
    ``X [N, C*H*W]`` float32, pixels scaled to [0, 1] then standardised per channel with the
    dataset's usual mean and std (so the N(0, 1) initial synthetic images are on the data's scale),
    the official train/test split, ``image = (C, H, W)``. A missing or malformed file is a
    :class:`ConfigError` naming ``distill.data_dir``, the files expected and where to get them."""
    spec = IMAGE_FILES[name]
    where = f"distill.data_dir = {data_dir!r}"
    fix = f"distill.dataset = {name!r} reads {expected_files(name)}; get them from {spec.source}"
    if not data_dir:
        raise ConfigError(f"distill.data_dir is not set: {fix}")
    if not Path(data_dir).expanduser().is_dir():
        raise ConfigError(f"{where} is not a directory: {fix}")
    try:
        Xtr, ytr, Xte, yte = (read_mnist if spec.reader == "idx" else read_cifar10)(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}: {e}. {fix}") from None
    if Xtr.shape[1] != len(spec.mean):
        raise ConfigError(f"{where}: {name} images have {Xtr.shape[1]} channels, not {len(spec.mean)}. {fix}")
    labels = np.concatenate([ytr, yte])
    if labels.min() < 0 or labels.max() > 9:
        raise ConfigError(f"{where}: labels must be 0-9 for {name}, found {labels.min()}..{labels.max()}. {fix}")
    mean = torch.tensor(spec.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).reshape(1, -1, 1, 1)

    def flat(X: np.ndarray) -> Tensor:
        return ((torch.from_numpy(X).float() / 255.0 - mean) / std).flatten(1)

    c, h, w = Xtr.shape[1:]
    return Dataset(name, flat(Xtr), torch.from_numpy(ytr), flat(Xte), torch.from_numpy(yte), 10, image=(c, h, w))


def subsample(data: Dataset, train_size: int = 0, test_size: int = 0, seed: int = 0) -> Dataset:
    """At most ``train_size`` training and ``test_size`` test points (0: all), drawn at random
    without replacement with ``seed`` (kept in their original order), to keep CPU runs small."""
    rng = np.random.RandomState(numpy_seed(seed))

    def pick(n: int, size: int) -> Tensor | None:
        return None if not size or size >= n else torch.from_numpy(np.sort(rng.permutation(n)[:size]))

    tr, te = pick(len(data.y), train_size), pick(len(data.y_test), test_size)
    if tr is None and te is None:
        return data
    X, y = (data.X, data.y) if tr is None else (data.X[tr], data.y[tr])
    X_test, y_test = (data.X_test, data.y_test) if te is None else (data.X_test[te], data.y_test[te])
    return Dataset(data.name, X, y, X_test, y_test, data.classes, data.image)


DATASETS = {"moons": moons, "digits": digits}
"""The datasets that need no files."""


def load(name: str, data_dir: str = "", train_size: int = 0, test_size: int = 0) -> Dataset:
    """``distill.dataset`` ``name``: one of :data:`DATASETS`, or of :data:`IMAGE_FILES` read from
    ``data_dir``; then capped by :func:`subsample` (0: no cap)."""
    if name in DATASETS:
        data = DATASETS[name]()
    elif name in IMAGE_FILES:
        data = images(name, data_dir)
    else:
        known = ", ".join(sorted([*DATASETS, *IMAGE_FILES]))
        raise ConfigError(f"distill.dataset = {name!r} is not known; use one of {known}")
    return subsample(data, train_size, test_size)


def class_balanced(y: np.ndarray | Tensor, per_class: int, classes: int, generator: torch.Generator) -> Tensor:
    """Indices of ``per_class`` random examples of every class, class-major ``[classes * per_class]``."""
    y = torch.as_tensor(y)
    out = []
    for c in range(classes):
        idx = torch.nonzero(y == c).squeeze(1)
        out.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
    return torch.cat(out)
