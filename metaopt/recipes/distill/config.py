"""The ``distill`` recipe's settings (defaults: Medvedev & D'yakonov 2020's moons protocol)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ... import optim
from ...run.config import ConfigError, MethodTable, check_method, method_table
from ...run.recipe import OuterConfig
from .archs import ARCHS
from .data import IMAGE_FILES, expected_files
from .evaluate import STRATEGIES

NO_STATIONARY_POINT = ("the distillation's hyperparameters (synthetic data and learning rates) act along the "
                       "inner trajectory: it has no stationary point")
"""Why the recipe refuses the implicit methods."""


@dataclass
class DistillConfig:
    """What is distilled and how (``[distill]`` in TOML; the hypergradient method: ``[method]``)."""

    MOVED: ClassVar[dict[str, str]] = {
        "method": 'the hypergradient method is the [method] table now: write [method] name = "{value}" '
                  "(or --set method.name={value})",
        "window": 'W is a field of its method now: write [method] name = "random_truncated", window = {value} '
                  '(or name = "truncated", k = {value})',
    }

    # moons, digits: no files; mnist, fashion (Fashion-MNIST), cifar10: read from data_dir
    dataset: Literal["moons", "digits", "mnist", "fashion", "cifar10"] = "moons"
    data_dir: str = ""  # the folder holding the dataset's files (mnist, fashion, cifar10); no downloads
    train_size: int = 0  # use at most this many training points, drawn at random (0: all)
    test_size: int = 0  # and at most this many test points (0: all)
    archs: list[str] = field(default_factory=lambda: ["1-layer", "2-layer", "4-layer"])  # test architectures
    # one distillation protocol per row: an architecture name (``members`` internal models of it) or
    # "all" (one internal model of every architecture in ``archs``: multi-architecture distillation)
    rows: list[str] = field(default_factory=lambda: ["1-layer", "2-layer", "4-layer", "all"])
    restarts: int = 10  # independent distillations per row
    members: int = 3  # internal models per distillation (rows named after one architecture)
    steps_per_epoch: int = 40
    epochs: int = 5
    per_class: int = 4  # synthetic points of each class per inner step
    lr: float = 0.02  # initial learnable learning rate of every inner step
    batch: int = 64  # real points per distillation per outer step (0: the whole training set)
    init: Literal["fresh", "fixed"] = "fresh"  # fresh Xavier inits every outer step, or one fixed init (Wang)
    labels: Literal["fixed", "soft"] = "fixed"  # soft: learnable labels (Sucholutsky & Schonlau 2019)
    init_scheme: Literal["xavier", "kaiming", "default"] = "xavier"
    compile: bool = True

    def validate(self) -> None:
        for name in ("restarts", "members", "steps_per_epoch", "epochs", "per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.{name} = {getattr(self, name)} must be >= 1")
        for name in ("train_size", "test_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"distill.{name} = {getattr(self, name)} must be >= 0 (0: all)")
        if self.dataset in IMAGE_FILES and not self.data_dir:
            raise ConfigError(f"distill.dataset = {self.dataset!r} needs distill.data_dir: the folder holding "
                              f"{expected_files(self.dataset)}; get them from {IMAGE_FILES[self.dataset].source}")
        if self.batch < 0:
            raise ConfigError(f"distill.batch = {self.batch} must be >= 0 (0: the whole training set)")
        if self.lr <= 0:
            raise ConfigError(f"distill.lr = {self.lr} must be > 0")
        for a in self.archs:
            if a not in ARCHS:
                raise ConfigError(f"distill.archs: {a!r} is not an architecture; use {', '.join(ARCHS)}")
        if not self.archs:
            raise ConfigError("distill.archs must name at least one architecture")
        if not self.rows:
            raise ConfigError("distill.rows must name at least one row")
        for r in self.rows:
            if r != "all" and r not in self.archs:
                raise ConfigError(f"distill.rows: {r!r} must be 'all' or one of distill.archs {self.archs}")
        if len(set(self.rows)) != len(self.rows):
            raise ConfigError(f"distill.rows {self.rows} names a row twice")


@dataclass
class EvalConfig:
    """How distilled data is judged (``[eval]``)."""

    inits: int = 25  # fresh initialisations per (distillation, test architecture, strategy)
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    epochs: int = 50  # length of every train-longer strategy (a multiple of distill.epochs)
    gamma: float = 0.98  # strategies 2 and 3 (the paper; its public code used 0.9)
    ramp_init: float = 0.3  # strategy 1: per-epoch rate ramp_init * ramp_up**e, then * ramp_down
    ramp_up: float = 1.1
    ramp_up_epochs: int = 10
    ramp_down: float = 0.95
    shuffled_lr: float = 0.01  # Adam for the shuffled-order evaluation
    quick_inits: int = 3  # initialisations for the evaluations during distillation (raw steps only)
    baseline_epochs: int = 500  # full-data baselines: shuffled minibatches, each optimizer below
    baseline_batch: int = 64
    baseline_lr: float = 0.01
    # "sgd" reproduces the paper's "original" row for the 2- and 4-layer models; "adam" converges
    baseline_optimizers: list[str] = field(default_factory=lambda: ["sgd", "adam"])
    baseline_inits: int = 25
    random_real_lrs: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3, 1.0])  # 0 items: skip
    random_real_runs: int = 10
    threads: int = 2  # torch threads for the final evaluation (compute-bound; the distillation is not)

    def validate(self) -> None:
        for name in ("inits", "epochs", "quick_inits", "baseline_epochs", "baseline_batch", "baseline_inits",
                     "random_real_runs", "threads", "ramp_up_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} = {getattr(self, name)} must be >= 1")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ConfigError(f"eval.strategies: {s!r} is not a strategy; use {', '.join(STRATEGIES)}")
        if "raw" not in self.strategies:
            raise ConfigError("eval.strategies must include 'raw' (the distilled schedule as learned)")
        for o in self.baseline_optimizers:
            if o not in ("sgd", "adam"):
                raise ConfigError(f"eval.baseline_optimizers: {o!r} is not 'sgd' or 'adam'")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"eval.gamma = {self.gamma} must be in (0, 1]")
        if any(lr <= 0 for lr in self.random_real_lrs) or self.baseline_lr <= 0 or self.shuffled_lr <= 0:
            raise ConfigError("eval: learning rates (random_real_lrs, baseline_lr, shuffled_lr) must be > 0")


@dataclass
class Config:
    seed: int = 0
    distill: DistillConfig = field(default_factory=DistillConfig)
    # the hypergradient method: name + that method's fields (e.g. name = "random_truncated", window = 30)
    method: MethodTable = method_table("full")
    eval: EvalConfig = field(default_factory=EvalConfig)
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(steps=800, meta_lr=0.01, eval_every=200,
                                                                     checkpoint_every=50))

    def validate(self) -> None:
        check_method(self.method, self.distill.steps_per_epoch * self.distill.epochs, stationary=False,
                     why=NO_STATIONARY_POINT, optimizer=optim.sgd())
        if self.eval.epochs % self.distill.epochs:
            raise ConfigError(
                f"eval.epochs = {self.eval.epochs} must be a multiple of distill.epochs = {self.distill.epochs} "
                "(strategy 2 repeats the distilled epochs)"
            )
