"""The named architectures of the distillation recipe (the paper's three MLPs, and digits models)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...models import MLP, ConvNet
from ...run.config import ConfigError
from .data import Dataset

ARCHS: dict[str, Callable[[Dataset], nn.Module]] = {
    "1-layer": lambda d: MLP([d.features, d.outputs]),
    "2-layer": lambda d: MLP([d.features, 10, d.outputs]),
    "4-layer": lambda d: MLP([d.features, 10, 10, 10, d.outputs]),
    "mlp": lambda d: MLP([d.features, 128, d.outputs]),
    "convnet": lambda d: ConvNet(d.image or (1, 1, d.features), d.outputs),
}
"""``1-layer`` 2->1 (logistic regression), ``2-layer`` 2->10->1 ReLU, ``4-layer`` 2->10->10->10->1 ReLU
(Medvedev & D'yakonov 2020, Fig. 1; inputs/outputs follow the dataset); ``mlp`` d->128->out ReLU and
``convnet`` (two conv blocks) for images."""


def build(name: str, data: Dataset) -> nn.Module:
    if name not in ARCHS:
        raise ConfigError(f"architecture {name!r} is not known; use one of {', '.join(ARCHS)}")
    if name == "convnet" and data.image is None:
        raise ConfigError(f"architecture 'convnet' needs image data; dataset {data.name!r} is tabular")
    return ARCHS[name](data)
