"""The ``hpo`` recipe's settings: ``[hpo]`` (which task, which method) and one table per task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ... import hypergrad as hg
from ...run.config import ConfigError, check_method
from ...run.recipe import OuterConfig

Task = Literal["l2", "schedule", "cleaning", "evidence"]


@dataclass
class HPOConfig:
    """``[hpo]``: the task and how its hypergradient is taken."""

    task: Task = "l2"
    dataset: Literal["breast_cancer", "digits", "wine"] = "breast_cancer"  # l2, schedule, cleaning
    split: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.25])  # train / validation / test
    method: str = "hoag"  # a registered hypergradient method (metaopt.hypergrad.names())
    steps: int = 100  # inner steps per hypergradient (a round, for the implicit methods)
    truncate: int = 10  # K of method = "truncated"
    tol: float = 1e-6  # tolerance of the implicit methods cg / neumann / fixed_point
    solve_iters: int = 100  # their linear solve's iteration cap (Neumann terms, fixed-point iterations)
    hoag_tol0: float = 1e-3  # HOAG's tolerance max(hoag_tol0 * hoag_decrease**t, tol) at outer step t
    hoag_decrease: float = 0.9
    max_rounds: int = 20  # their inner run: at most this many rounds of hpo.steps to reach hpo.tol
    budget: int = 0  # inner trainings given to each search baseline (0: outer.steps, equal compute)
    compile: bool = False  # torch.compile the inner step (methods that support it: full, checkpointed, truncated)

    def validate(self) -> None:
        check_method("hpo.method", self.method)
        for name in ("steps", "truncate", "solve_iters", "max_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"hpo.{name} = {getattr(self, name)} must be >= 1")
        if self.budget < 0:
            raise ConfigError(f"hpo.budget = {self.budget} must be >= 0 (0: as many as outer.steps)")
        for name in ("tol", "hoag_tol0"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"hpo.{name} = {getattr(self, name)} must be > 0")
        if not 0 < self.hoag_decrease <= 1:
            raise ConfigError(f"hpo.hoag_decrease = {self.hoag_decrease} must be in (0, 1]")
        if len(self.split) != 3 or min(self.split) <= 0 or abs(sum(self.split) - 1) > 1e-9:
            raise ConfigError(f"hpo.split = {self.split} must be three positive fractions (train, validation, "
                              "test) that sum to 1")


@dataclass
class L2Config:
    """``[l2]``: per-feature (or per-weight, or single) L2 penalties of logistic regression."""

    penalty: Literal["single", "per_feature", "per_weight"] = "per_feature"
    init: float = -3.0  # initial log(lambda) of every penalty
    low: float = -12.0  # the search box for log(lambda): random and grid search, the dense curve
    high: float = 4.0
    curve: int = 0  # points of the dense brute-force validation curve over a single lambda (0: off)
    compare: list[str] = field(default_factory=lambda: ["hoag", "cg", "neumann", "fixed_point", "full",
                                                        "truncated"])
    compare_steps: int = 0  # outer steps of each compared method (0: outer.steps)
    greedy: bool = True  # also run greedy T1-T2 (Luketina et al. 2016) online
    eval_steps: int = 500  # inner steps per round when judging a setting (trained to convergence)
    eval_rounds: int = 10  # at most this many rounds (until the inner gradient norm <= 1e-9)

    def validate(self) -> None:
        if self.low >= self.high:
            raise ConfigError(f"l2.low = {self.low} must be below l2.high = {self.high}")
        for name, least in (("curve", 0), ("compare_steps", 0), ("eval_steps", 1), ("eval_rounds", 1)):
            if getattr(self, name) < least:
                raise ConfigError(f"l2.{name} = {getattr(self, name)} must be >= {least}")
        for m in self.compare:
            check_method("l2.compare", m)


@dataclass
class ScheduleConfig:
    """``[schedule]``: one learning rate (and momentum) per inner step of an MLP (Maclaurin et al. 2015)."""

    hidden: list[int] = field(default_factory=lambda: [32])
    members: int = 4  # fresh initialisations per hypergradient
    batch: int = 100
    lr: float = 0.05  # initial learning rate of every step
    momentum: float = 0.9  # initial (learn_momentum) or fixed momentum
    learn_momentum: bool = True
    lr_low: float = 1e-3  # the constant-rate grid search
    lr_high: float = 3.0
    eval_inits: int = 20  # fresh initialisations (and batches) when judging a schedule

    def validate(self) -> None:
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"schedule.hidden = {self.hidden} must list positive widths, e.g. [32]")
        for name in ("members", "batch", "eval_inits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"schedule.{name} = {getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"schedule.lr = {self.lr} must be > 0")
        if not 0 < self.momentum < 1:
            raise ConfigError(f"schedule.momentum = {self.momentum} must be in (0, 1)")
        if not 0 < self.lr_low < self.lr_high:
            raise ConfigError(f"schedule.lr_low = {self.lr_low}, lr_high = {self.lr_high}: need 0 < low < high")


@dataclass
class CleaningConfig:
    """``[cleaning]``: one weight per training example against label noise (Franceschi et al. 2017)."""

    noise: float = 0.5  # fraction of training labels replaced by a random other class
    l2: float = 1e-3  # fixed ridge penalty of the softmax regression
    init_weight: float = 0.5  # initial weight sigmoid(logit) of every example
    threshold: float = 0.5  # weights below it flag an example as corrupted

    def validate(self) -> None:
        if not 0 < self.noise < 1:
            raise ConfigError(f"cleaning.noise = {self.noise} must be in (0, 1)")
        for name in ("init_weight", "threshold"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"cleaning.{name} = {getattr(self, name)} must be in (0, 1)")
        if self.l2 < 0:
            raise ConfigError(f"cleaning.l2 = {self.l2} must be >= 0")


@dataclass
class EvidenceConfig:
    """``[evidence]``: ARD evidence maximisation of a polynomial regression, closed-form oracle."""

    n: int = 40  # training points
    n_test: int = 1000
    degree: int = 9  # Legendre features P_0..P_degree
    coef: list[float] = field(default_factory=lambda: [0.5, -1.0, 0.0, 0.8])  # the true polynomial
    noise: float = 0.3
    ard: bool = True  # one precision per coefficient (else one shared)
    alpha: float = 1.0  # initial prior precision(s)
    beta: float = 1.0  # initial noise precision
    step: float = 1.0  # inner momentum-SGD step, relative to the inverse curvature bound of each coefficient
    prune: float = 1e3  # a coefficient with alpha above this counts as switched off

    def validate(self) -> None:
        for name in ("n", "n_test", "degree"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evidence.{name} = {getattr(self, name)} must be >= 1")
        for name in ("noise", "alpha", "beta", "prune"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"evidence.{name} = {getattr(self, name)} must be > 0")
        if not 0 < self.step <= 2:
            raise ConfigError(f"evidence.step = {self.step} must be in (0, 2] (a fraction of the inverse curvature)")


@dataclass
class Config:
    seed: int = 0
    hpo: HPOConfig = field(default_factory=HPOConfig)
    l2: L2Config = field(default_factory=L2Config)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(steps=100, meta_lr=0.1, eval_every=20,
                                                                     checkpoint_every=10))

    def validate(self) -> None:
        h = self.hpo
        if h.method == "reversible" and (h.task != "schedule" or self.schedule.learn_momentum):
            raise ConfigError("hpo.method = 'reversible' needs a fixed momentum: use it with hpo.task = 'schedule' "
                              "and schedule.learn_momentum = false")
        if hg.registered()[h.method].cls.reference == "stationary" and h.task in ("schedule",):
            raise ConfigError(f"hpo.method = {h.method!r} is implicit (it needs an inner optimum), but the schedule "
                              "task's hyperparameters act only along the trajectory: use 'checkpointed', 'full' or "
                              "'reversible'")
