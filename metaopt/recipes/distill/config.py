"""The ``distill`` recipe's settings (defaults: Medvedev & D'yakonov 2020's moons protocol)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from ... import optim
from ...run.config import ConfigError, MethodTable, check_method, method_table
from ...run.recipe import OuterConfig
from ...run.schema import CompileBlock, Count, Length, Note, Positive, Range, Seed, Size
from .archs import ARCHS
from .data import IMAGE_FILES, expected_files
from .evaluate import STRATEGIES

Arch = Literal[tuple(ARCHS)]  # type: ignore[valid-type]
"""A test architecture's name."""
Strategy = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]
"""An evaluation strategy's name."""

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
    train_size: Annotated[Size, Note("0: all")] = 0  # use at most this many training points, drawn at random
    test_size: Annotated[Size, Note("0: all")] = 0  # and at most this many test points
    # test architectures
    archs: Annotated[list[Arch], Length(1)] = field(default_factory=lambda: ["1-layer", "2-layer", "4-layer"])
    # one distillation protocol per row: an architecture name (``members`` internal models of it) or
    # "all" (one internal model of every architecture in ``archs``: multi-architecture distillation)
    rows: Annotated[list[str], Length(1)] = field(default_factory=lambda: ["1-layer", "2-layer", "4-layer", "all"])
    restarts: Count = 10  # independent distillations per row
    members: Count = 3  # internal models per distillation (rows named after one architecture)
    steps_per_epoch: Count = 40
    epochs: Count = 5
    per_class: Count = 4  # synthetic points of each class per inner step
    lr: Positive = 0.02  # initial learnable learning rate of every inner step
    # real points per distillation per outer step
    batch: Annotated[Size, Note("0: the whole training set")] = 64
    init: Literal["fresh", "fixed"] = "fresh"  # fresh Xavier inits every outer step, or one fixed init (Wang)
    labels: Literal["fixed", "soft"] = "fixed"  # soft: learnable labels (Sucholutsky & Schonlau 2019)
    init_scheme: Literal["xavier", "kaiming", "default"] = "xavier"
    compile: bool = True
    compile_block: CompileBlock = 0  # inner steps per compiled graph (1: the fastest first compile)

    def validate(self) -> None:
        if self.compile_block and not self.compile:
            raise ConfigError(f"distill.compile_block = {self.compile_block} applies only with distill.compile = "
                              f"true: set distill.compile = true or drop distill.compile_block")
        if self.dataset in IMAGE_FILES and not self.data_dir:
            raise ConfigError(f"distill.dataset = {self.dataset!r} needs distill.data_dir: the folder holding "
                              f"{expected_files(self.dataset)}; get them from {IMAGE_FILES[self.dataset].source}")
        for r in self.rows:
            if r != "all" and r not in self.archs:
                raise ConfigError(f"distill.rows: {r!r} must be 'all' or one of distill.archs {self.archs}")
        if len(set(self.rows)) != len(self.rows):
            raise ConfigError(f"distill.rows {self.rows} names a row twice")


@dataclass
class EvalConfig:
    """How distilled data is judged (``[eval]``)."""

    inits: Count = 25  # fresh initialisations per (distillation, test architecture, strategy)
    strategies: list[Strategy] = field(default_factory=lambda: list(STRATEGIES))
    epochs: Count = 50  # length of every train-longer strategy (a multiple of distill.epochs)
    # strategies 2 and 3 (the paper; its public code used 0.9)
    gamma: Annotated[float, Range(0, 1, open_low=True)] = 0.98
    ramp_init: Positive = 0.3  # strategy 1: per-epoch rate ramp_init * ramp_up**e, then * ramp_down
    ramp_up: Positive = 1.1
    ramp_up_epochs: Count = 10
    ramp_down: Positive = 0.95
    shuffled_lr: Positive = 0.01  # Adam for the shuffled-order evaluation
    quick_inits: Count = 3  # initialisations for the evaluations during distillation (raw steps only)
    baseline_epochs: Count = 500  # full-data baselines: shuffled minibatches, each optimizer below
    baseline_batch: Count = 64
    baseline_lr: Positive = 0.01
    # "sgd" reproduces the paper's "original" row for the 2- and 4-layer models; "adam" converges
    baseline_optimizers: list[Literal["sgd", "adam"]] = field(default_factory=lambda: ["sgd", "adam"])
    baseline_inits: Count = 25
    random_real_lrs: list[Positive] = field(default_factory=lambda: [0.03, 0.1, 0.3, 1.0])  # 0 items: skip
    random_real_runs: Count = 10
    # torch threads for the final evaluation (compute-bound; the distillation is not)
    threads: Annotated[int, Range(1, 1024)] = 2

    def validate(self) -> None:
        if "raw" not in self.strategies:
            raise ConfigError("eval.strategies must include 'raw' (the distilled schedule as learned)")


@dataclass
class Config:
    seed: Seed = 0
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
