"""The named architectures of the distillation recipe (the paper's three MLPs, digits models, and
Wang et al. 2018's LeNet and AlexNet-like CIFAR network)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...models import MLP, AlexCifarNet, ConvNet, LeNet
from ...run.config import ConfigError
from .data import Dataset

ARCHS: dict[str, Callable[[Dataset], nn.Module]] = {
    "1-layer": lambda d: MLP([d.features, d.outputs]),
    "2-layer": lambda d: MLP([d.features, 10, d.outputs]),
    "4-layer": lambda d: MLP([d.features, 10, 10, 10, d.outputs]),
    "mlp": lambda d: MLP([d.features, 128, d.outputs]),
    "convnet": lambda d: ConvNet(d.image or (1, 1, d.features), d.outputs),
    "lenet": lambda d: LeNet(d.image or (1, 1, d.features), d.outputs),
    "alexnet": lambda d: AlexCifarNet(d.image or (1, 1, d.features), d.outputs),
}
"""``1-layer`` 2->1 (logistic regression), ``2-layer`` 2->10->1 ReLU, ``4-layer`` 2->10->10->10->1 ReLU
(Medvedev & D'yakonov 2020, Fig. 1; inputs/outputs follow the dataset); ``mlp`` d->128->out ReLU and
``convnet`` (two conv blocks) for images; ``lenet`` (LeNet-5, Wang et al.'s MNIST model) and
``alexnet`` (their AlexNet-like CIFAR-10 model, :class:`metaopt.models.AlexCifarNet`) for 28x28 and
32x32 images."""

IMAGE_ONLY = ("convnet", "lenet", "alexnet")
"""Architectures that need ``Dataset.image``."""


def build(name: str, data: Dataset) -> nn.Module:
    if name not in ARCHS:
        raise ConfigError(f"architecture {name!r} is not known; use one of {', '.join(ARCHS)}")
    if name in IMAGE_ONLY and data.image is None:
        raise ConfigError(f"architecture {name!r} needs image data; dataset {data.name!r} is tabular")
    try:
        return ARCHS[name](data)
    except ValueError as e:
        raise ConfigError(f"architecture {name!r} on dataset {data.name!r}: {e}") from None
