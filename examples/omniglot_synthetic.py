"""Synthetic few-shot data shaped like Omniglot's N-way K-shot loaders (no download).

``SyntheticNShot(...).next(mode)`` returns ``x_spt [task_num, n_way * k_shot, 1, imgsz, imgsz]``,
``y_spt [task_num, n_way * k_shot]`` (labels ``0 .. n_way - 1``), ``x_qry [task_num, n_way * k_query, 1,
imgsz, imgsz]`` and ``y_qry``, as the loaders of higher's and torchopt's MAML examples do. Each class is a
random smooth prototype image; a sample is its prototype plus noise, so the tasks are learnable.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SyntheticNShot:
    """``n_train_iter`` / ``n_test_iter`` batches of ``batchsz`` tasks per epoch; classes drawn from
    ``classes`` training prototypes (and as many test ones), with a seeded generator."""

    def __init__(self, batchsz: int, n_way: int, k_shot: int, k_query: int, imgsz: int = 28,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n_iter: int = 10,
                 classes: int = 64, seed: int = 0) -> None:
        self.batchsz, self.n_way, self.k_shot, self.k_query, self.imgsz = batchsz, n_way, k_shot, k_query, imgsz
        self.device, self.dtype = torch.device(device), dtype
        self.n_train_iter = self.n_test_iter = n_iter
        self.gen = torch.Generator().manual_seed(seed)
        coarse = torch.rand(2 * classes, 1, 7, 7, generator=self.gen, dtype=torch.float64)
        protos = torch.nn.functional.interpolate(coarse, size=(imgsz, imgsz), mode="bilinear", align_corners=False)
        self.protos = {"train": protos[:classes], "test": protos[classes:]}

    def next(self, mode: str = "train") -> tuple[Tensor, Tensor, Tensor, Tensor]:
        protos = self.protos[mode]
        xs, ys, xq, yq = [], [], [], []
        for _ in range(self.batchsz):
            cls = torch.randperm(len(protos), generator=self.gen)[: self.n_way]
            for shots, xo, yo in ((self.k_shot, xs, ys), (self.k_query, xq, yq)):
                labels = torch.arange(self.n_way).repeat_interleave(shots)
                perm = torch.randperm(len(labels), generator=self.gen)
                labels = labels[perm]
                noise = 0.3 * torch.randn(len(labels), 1, self.imgsz, self.imgsz, generator=self.gen,
                                          dtype=torch.float64)
                xo.append(protos[cls[labels]] + noise)
                yo.append(labels)
        out = (torch.stack(xs), torch.stack(ys), torch.stack(xq), torch.stack(yq))
        return tuple(t.to(self.device, self.dtype if t.is_floating_point() else t.dtype) for t in out)
