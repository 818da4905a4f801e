"""Small shared models. ``MLP`` also offers a hand-batched forward used by ensembles as a fast path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AlexCifarNet", "ConvNet", "LeNet", "MLP", "classification_loss", "correct", "hard_targets"]


def classification_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample loss of logits ``pred [B, outputs]``: binary cross-entropy with logits for one output
    (``target [B, 1]`` or ``[B]``, floats in [0, 1]), cross-entropy otherwise (``target [B]`` class
    indices, or ``[B, outputs]`` soft labels)."""
    if pred.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype).reshape(pred.shape), reduction="none")
    if target.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(pred, target, reduction="none")
    return -(target * F.log_softmax(pred, -1)).sum(-1)


def hard_targets(y: Tensor, outputs: int, dtype: torch.dtype) -> Tensor:
    """Class indices ``[...]`` as targets of :func:`classification_loss`: ``[..., 1]`` floats for one
    output, the indices themselves otherwise."""
    return y.to(dtype).unsqueeze(-1) if outputs == 1 else y


def correct(pred: Tensor, y: Tensor) -> Tensor:
    """``[m, B]`` booleans: the predictions ``[m, B, outputs]`` against class indices ``y [B]``
    (one output: the sign of the logit)."""
    label = (pred[..., 0] > 0).long() if pred.shape[-1] == 1 else pred.argmax(-1)
    return label == y


TINY_LAYER = 1024
"""Weight elements of a layer, all members together (``m * out * in``), up to which a compiled CPU
forward of :meth:`MLP.forward_batched` multiplies by broadcasting and summing instead of calling a
batched matmul."""


def _fused_linear(w: Tensor) -> bool:
    """Whether ``w [m, out, in]`` is a :data:`TINY_LAYER` on the CPU inside ``torch.compile``. Inductor
    then fuses the layer's product and sum into the loops around it, so a compiled step of a tiny MLP is
    one C++ kernel per graph instead of one per stretch between matmul calls: a third of the cold
    compile (fewer files for the C++ compiler) and faster steps (no library call per matmul of a few
    dozen elements). Bigger layers keep the matmul, whose vector code wins from about 3 members of
    32 x 32 or 30 members of 10 x 10 on (docs/benchmarks.md, "Compile latency")."""
    return torch.compiler.is_compiling() and w.device.type == "cpu" and w.numel() <= TINY_LAYER


_ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda x: x}


class MLP(nn.Module):
    """Fully connected network ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between layers.

    ``MLP([2, 1])`` is logistic regression, ``MLP([2, 10, 1])`` a one-hidden-layer ReLU network.
    Parameter names: ``layers.{i}.weight`` ``[out, in]`` and ``layers.{i}.bias`` ``[out]``.
    ``dropout``: the probability of zeroing a hidden unit after each activation, in train mode
    (drawn from torch's global RNG, which metaopt seeds per inner step).
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        if len(sizes) < 2 or any(int(s) <= 0 for s in sizes):
            raise ValueError(f"MLP: sizes must list >= 2 positive layer widths, got {list(sizes)}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MLP: unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP: dropout must be in [0, 1), got {dropout}")
        self.sizes = [int(s) for s in sizes]
        self.activation = activation
        self.dropout = float(dropout)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    def _hidden(self, x: Tensor) -> Tensor:
        x = _ACTIVATIONS[self.activation](x)
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self._hidden(x)
        return x

    def forward_batched(self, params: Mapping[str, Tensor], x: Tensor, per_member: bool) -> Tensor:
        """Forward of ``m`` stacked members at once with batched matmuls (compiled on the CPU, a
        layer of at most :data:`TINY_LAYER` weights is a broadcast product and a sum, which inductor
        fuses).

        ``params[name]`` has a leading member axis ``m``; ``x`` is ``[*, in]`` shared by all members,
        or ``[m, *, in]`` with ``per_member``; returns ``[m, *, out]``. Same result as
        ``vmap(functional_call)``, with a fraction of its per-op dispatch (with ``dropout``, each
        member draws its own mask, as ``vmap(..., randomness="different")`` does, but not the same
        values).
        """
        n = len(self.layers)
        if not per_member:
            x = x.unsqueeze(0)  # [1, *, in], broadcast against the members
        lead = (1,) * (x.dim() - 3)  # extra sample dims beyond [m, B, in]
        for i in range(n):
            w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
            m = w.shape[0]
            if _fused_linear(w):  # sum over in of [m | 1, *, B, 1, in] * [m, *, 1, out, in]
                x = (x.unsqueeze(-2) * w.reshape(m, *lead, 1, *w.shape[1:])).sum(-1) \
                    + b.reshape(m, *lead, 1, b.shape[1])
            elif x.dim() == 3 and x.shape[0] == m:  # [m, B, in] @ [m, in, out] + [m, 1, out]
                x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            else:
                wt = w.transpose(1, 2).reshape(m, *lead, w.shape[2], w.shape[1])
                x = torch.matmul(x, wt) + b.reshape(m, *lead, 1, b.shape[1])
            if i < n - 1:
                x = self._hidden(x)
        return x


class ConvNet(nn.Module):
    """A small ConvNet for flat image inputs ``[B, C*H*W]``: two 3x3 conv + ReLU + 2x2 max-pool
    blocks and a linear head. Runs in ensembles through the generic ``vmap(functional_call)`` path."""

    def __init__(self, image: Sequence[int], outputs: int, channels: Sequence[int] = (8, 16)) -> None:
        super().__init__()
        c, h, w = (int(v) for v in image)
        self.image = (c, h, w)
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, int(out), 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = int(out), h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"ConvNet: image {tuple(image)} is too small for {len(channels)} pooling blocks")
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * h * w, outputs)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        z = self.features(x.reshape(-1, *self.image))
        return self.head(z.flatten(1)).reshape(*lead, -1)


def _flat_size(features: nn.Module, image: tuple[int, int, int], name: str) -> int:
    """Features per image after ``features`` (one dry run on a blank image)."""
    try:
        with torch.no_grad():
            return int(features(torch.zeros(1, *image)).numel())
    except RuntimeError as e:
        raise ValueError(f"{name}: image {image} is too small for its convolutions and pooling ({e})") from None


class LeNet(nn.Module):
    """LeCun et al. 1998's LeNet-5 as Wang et al. 2018 use it for MNIST, on flat image inputs
    ``[B, C*H*W]``: 5x5 conv (6 channels; padding 2 for 28x28 inputs, none for 32x32) + ReLU + 2x2
    max-pool, 5x5 conv (16) + ReLU + 2x2 max-pool, then 120 -> 84 -> ``outputs`` fully connected with
    ReLU. 61,706 parameters for 28x28x1 and 10 classes (62,006 for 32x32x3)."""

    def __init__(self, image: Sequence[int], outputs: int) -> None:
        super().__init__()
        c, h, w = (int(v) for v in image)
        self.image = (c, h, w)
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2 if (h, w) == (28, 28) else 0), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = _flat_size(self.features, self.image, "LeNet")
        self.head = nn.Sequential(nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                  nn.Linear(84, outputs))

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        z = self.features(x.reshape(-1, *self.image))
        return self.head(z.flatten(1)).reshape(*lead, -1)


class AlexCifarNet(nn.Module):
    """The AlexNet-like CIFAR-10 network of Wang et al. 2018 (from Krizhevsky's cuda-convnet), on
    flat image inputs ``[B, C*H*W]``: two blocks of 5x5 conv (64 channels, padding 2) + ReLU + 3x3/2
    max-pool (padding 1) + local response normalisation (size 4, alpha 0.001/9, beta 0.75, k 1; the
    second block normalises before pooling), then 384 -> 192 -> ``outputs`` fully connected with
    ReLU. 32x32 inputs give 64 x 8 x 8 = 4096 features; 1,756,426 parameters for 32x32x3 and 10 classes."""

    def __init__(self, image: Sequence[int], outputs: int) -> None:
        super().__init__()
        c, h, w = (int(v) for v in image)
        self.image = (c, h, w)
        lrn = {"size": 4, "alpha": 0.001 / 9.0, "beta": 0.75, "k": 1.0}
        self.features = nn.Sequential(
            nn.Conv2d(c, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1), nn.LocalResponseNorm(**lrn),
            nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(), nn.LocalResponseNorm(**lrn), nn.MaxPool2d(3, 2, padding=1),
        )
        self.head = nn.Sequential(nn.Linear(_flat_size(self.features, self.image, "AlexCifarNet"), 384), nn.ReLU(),
                                  nn.Linear(384, 192), nn.ReLU(), nn.Linear(192, outputs))

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        z = self.features(x.reshape(-1, *self.image))
        return self.head(z.flatten(1)).reshape(*lead, -1)
