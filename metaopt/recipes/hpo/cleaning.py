"""Task ``cleaning``: data hyper-cleaning (Franceschi et al. 2017). Half the training labels are
replaced by a random other class; one weight per training example is learned through the inner
training so that the model fits the clean validation set. Judged by the test accuracy of a model
retrained with the weights, against training on all noisy data, the oracle (clean examples only) and
two searches at equal compute, and by how well low weights flag the corrupted examples."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import hypergrad as hg
from ... import optim
from . import data, plots, report
from .config import Config
from .objective import HyperCleaning
from .task import HPOTask


def flag_scores(flagged: Tensor, corrupted: Tensor) -> dict[str, float]:
    """Precision, recall and F1 of ``flagged [N]`` (booleans) as a detector of ``corrupted [N]``."""
    tp = float((flagged & corrupted).sum())
    precision = tp / max(float(flagged.sum()), 1.0)
    recall = tp / max(float(corrupted.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": int(flagged.sum())}


class CleaningTask(HPOTask):
    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        c = cfg.cleaning
        self.data = self.split()
        self.y_noisy, self.corrupted = data.corrupt(self.data.y, self.data.classes, c.noise,
                                                    torch.Generator().manual_seed(cfg.seed + 11))
        self.objective = HyperCleaning(self.data, self.y_noisy, l2=c.l2, device=device)
        self.optimizer = optim.momentum(momentum=0.9)
        self.hyper = self.objective.init_hyper(c.init_weight)
        self.results: dict[str, Any] = {}
        self._noisy_loss: Tensor | None = None  # per-example training loss of the all-data model

    def judge(self, logit: Tensor) -> dict[str, Tensor]:
        """Retrain softmax regression with per-example weights ``sigmoid(logit) [C, N]`` (``C`` at
        once); validation loss and test accuracy ``[C]``."""
        obj = HyperCleaning(self.data, self.y_noisy, l2=self.cfg.cleaning.l2, candidates=logit.shape[0],
                            device=self.device)
        params = hg.train(obj, self.optimizer, {"logit": logit}, self.steps, torch.Generator())
        val = obj.per_example(params, obj.data.X_val, obj.data.y_val).mean(1)
        return {"val_loss": val, "val_acc": obj.accuracy(params, "_val"), "test_acc": obj.accuracy(params, "_test")}

    def small_loss_keep(self, fractions: Tensor) -> Tensor:
        """Small-loss filtering, the low-dimensional alternative to one weight per example: for each
        fraction ``q`` of ``fractions [B]``, 0/1 weights ``[B, N]`` that keep the examples whose
        training loss under the model trained on all noisy data (trained once, then kept) is at most
        its ``q``-quantile."""
        if self._noisy_loss is None:
            c = self.cfg.cleaning
            obj = HyperCleaning(self.data, self.y_noisy, l2=c.l2, device=self.device)
            ones = obj.init_hyper(1 - 1e-6)
            params = hg.train(obj, self.optimizer, ones, self.steps, torch.Generator())
            self._noisy_loss = obj.per_example(params, obj.data.X, self.y_noisy)[0].cpu()
        thresholds = torch.quantile(self._noisy_loss, fractions.to(self._noisy_loss.dtype))
        return (self._noisy_loss.unsqueeze(0) <= thresholds.unsqueeze(1)).double()

    @staticmethod
    def logit_of(weights: Tensor) -> Tensor:
        w = weights.clamp(1e-6, 1 - 1e-6)
        return torch.log(w / (1 - w))

    def evaluate(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, float]:
        m = {k: float(v[0]) for k, v in self.judge(hyper["logit"]).items()}
        flagged = torch.sigmoid(hyper["logit"][0]).cpu() < self.cfg.cleaning.threshold
        return {**m, "f1": flag_scores(flagged, self.corrupted)["f1"]}

    def report(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        c, B = self.cfg.cleaning, self.budget
        N = self.corrupted.numel()
        t0 = time.perf_counter()
        ones = torch.ones(1, N, dtype=torch.float64)
        rows: dict[str, Any] = {}

        def row(name: str, weights: Tensor, trainings: int | str, flagged: Tensor | None) -> None:
            m = {k: float(v[0]) for k, v in self.judge(self.logit_of(weights)).items()}
            rows[name] = {**m, "trainings": trainings,
                          **(flag_scores(flagged, self.corrupted) if flagged is not None else {})}

        row("all noisy data (weights 1)", ones, 1, None)
        row("oracle: clean examples only", (~self.corrupted).double().unsqueeze(0), 1, None)
        # search 1: a threshold on the per-example training loss of the all-data model (small-loss filtering)
        qs = torch.linspace(0.05, 1.0, B, dtype=torch.float64)
        keep = self.small_loss_keep(qs)  # [B, N]
        m = self.judge(self.logit_of(keep))
        i = int(m["val_loss"].argmin())
        row(f"grid search: loss threshold ({B} quantiles)", keep[i:i + 1], B + 1, keep[i] == 0)
        rows[f"grid search: loss threshold ({B} quantiles)"]["kept_fraction"] = float(qs[i])
        # search 2: random per-example weights in [0, 1]^N
        g = torch.Generator().manual_seed(self.cfg.seed + 12)
        rand = torch.rand(B, N, generator=g, dtype=torch.float64)
        m = self.judge(self.logit_of(rand))
        i = int(m["val_loss"].argmin())
        row(f"random search: weights ({B} samples)", rand[i:i + 1], B, rand[i] < c.threshold)
        weights = torch.sigmoid(hyper["logit"][0]).cpu()
        row(f"hypergradient ({self.method_name}, {self.cfg.outer.steps} outer steps)", weights.unsqueeze(0),
            self.cfg.outer.steps, weights < c.threshold)
        out = {"task": "cleaning", "dataset": self.data.name, "noise": c.noise, "examples": N,
               "corrupted": int(self.corrupted.sum()), "threshold": c.threshold,
               "method": self.method_name, "rows": rows,
               "weights_clean": weights[~self.corrupted].tolist(),
               "weights_corrupted": weights[self.corrupted].tolist(),
               "seconds": time.perf_counter() - t0}
        self.results = out
        return out

    def summary(self, results: dict[str, Any]) -> str:
        return report.cleaning(results)

    def figures(self, hyper: Mapping[str, Tensor], history: list[dict[str, Any]], out: Path) -> list[Path]:
        return plots.cleaning(self, hyper, history, out)
