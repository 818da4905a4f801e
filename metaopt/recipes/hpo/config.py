"""The ``hpo`` recipe's settings: ``[hpo]`` (which task), ``[method]`` (its hypergradient) and one
table per task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from ... import optim
from ...run.config import ConfigError, MethodTable, check_method, method_table
from ...run.recipe import OuterConfig
from ...run.schema import Count, Fraction, Length, NonNegative, Note, Positive, Range, Seed, Size

LogPenalty = Annotated[float, Range(-50, 50), Note("a natural log of the L2 penalty")]

Task = Literal["l2", "schedule", "cleaning", "evidence"]

IMPLICIT = {"tol": 1e-6, "inner_tol": 1e-6, "max_inner_rounds": 20, "maxiter": 100}
"""The implicit methods' settings in the recipe's defaults and presets: inner and linear-solve
tolerance 1e-6, at most 20 rounds of ``hpo.steps`` and 100 solver iterations."""
HOAG = {"min_tol": 1e-6, "max_inner_rounds": 20, "maxiter": 100}
"""HOAG's: the tolerance ``max(1e-3 * 0.9**t, 1e-6)``, the same caps."""

_METHOD = 'the [method] table now: write [method] name = "{value}" (or --set method.name={value})'
_FIELD = "a field of its method's [method] table now: "


def _compare() -> list[MethodTable]:
    implicit = [MethodTable(name=n, **IMPLICIT) for n in ("cg", "neumann", "fixed_point")]
    return [MethodTable(name="hoag", **HOAG), *implicit, MethodTable(name="full"), MethodTable(name="truncated", k=10)]


@dataclass
class HPOConfig:
    """``[hpo]``: the task (its hypergradient method: ``[method]``)."""

    MOVED: ClassVar[dict[str, str]] = {
        "method": _METHOD,
        "truncate": _FIELD + '[method] name = "truncated", k = {value}',
        "tol": _FIELD + "method.tol and method.inner_tol (cg, neumann, fixed_point, dense), method.min_tol (hoag)",
        "solve_iters": _FIELD + "method.maxiter (the implicit methods and hoag)",
        "max_rounds": _FIELD + "method.max_inner_rounds (the implicit methods and hoag)",
        "hoag_tol0": _FIELD + 'method.tol0 (with [method] name = "hoag")',
        "hoag_decrease": _FIELD + 'method.decrease (with [method] name = "hoag")',
    }

    task: Task = "l2"
    dataset: Literal["breast_cancer", "digits", "wine"] = "breast_cancer"  # l2, schedule, cleaning
    # train / validation / test
    split: Annotated[list[Fraction], Length(3, 3)] = field(default_factory=lambda: [0.5, 0.25, 0.25])
    steps: Count = 100  # inner steps per hypergradient (a round, for the implicit methods)
    # inner trainings given to each search baseline
    budget: Annotated[Size, Note("0: as many as outer.steps, equal compute")] = 0
    compile: bool = False  # torch.compile the inner step (methods that support it: full, checkpointed, truncated)

    def validate(self) -> None:
        if abs(sum(self.split) - 1) > 1e-9:
            raise ConfigError(f"hpo.split = {self.split} must be three positive fractions (train, validation, "
                              "test) that sum to 1")


@dataclass
class L2Config:
    """``[l2]``: per-feature (or per-weight, or single) L2 penalties of logistic regression."""

    penalty: Literal["single", "per_feature", "per_weight"] = "per_feature"
    init: LogPenalty = -3.0  # initial log(lambda) of every penalty
    low: LogPenalty = -12.0  # the search box for log(lambda): random and grid search, the dense curve
    high: LogPenalty = 4.0
    # points of the dense brute-force validation curve over a single lambda
    curve: Annotated[Size, Note("0: off")] = 0
    # [method] tables (or bare names: that method's defaults) run side by side from the same start
    compare: list[MethodTable] = field(default_factory=_compare)
    compare_steps: Annotated[Size, Note("0: outer.steps")] = 0  # outer steps of each compared method
    greedy: bool = True  # also run greedy T1-T2 (Luketina et al. 2016) online
    eval_steps: Count = 500  # inner steps per round when judging a setting (trained to convergence)
    eval_rounds: Count = 10  # at most this many rounds (until the inner gradient norm <= 1e-9)

    def validate(self) -> None:
        if self.low >= self.high:
            raise ConfigError(f"l2.low = {self.low} must be below l2.high = {self.high}")
        names = [m["name"] for m in self.compare]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"l2.compare names {name!r} twice: compare each method once")


@dataclass
class ScheduleConfig:
    """``[schedule]``: one learning rate (and momentum) per inner step of an MLP (Maclaurin et al. 2015)."""

    hidden: Annotated[list[Count], Length(1)] = field(default_factory=lambda: [32])
    members: Count = 4  # fresh initialisations per hypergradient
    batch: Count = 100
    lr: Positive = 0.05  # initial learning rate of every step
    momentum: Fraction = 0.9  # initial (learn_momentum) or fixed momentum
    learn_momentum: bool = True
    lr_low: Positive = 1e-3  # the constant-rate grid search
    lr_high: Positive = 3.0
    eval_inits: Count = 20  # fresh initialisations (and batches) when judging a schedule

    def validate(self) -> None:
        if not self.lr_low < self.lr_high:
            raise ConfigError(f"schedule.lr_low = {self.lr_low}, lr_high = {self.lr_high}: need 0 < low < high")


@dataclass
class CleaningConfig:
    """``[cleaning]``: one weight per training example against label noise (Franceschi et al. 2017)."""

    noise: Fraction = 0.5  # fraction of training labels replaced by a random other class
    l2: NonNegative = 1e-3  # fixed ridge penalty of the softmax regression
    init_weight: Fraction = 0.5  # initial weight sigmoid(logit) of every example
    threshold: Fraction = 0.5  # weights below it flag an example as corrupted


@dataclass
class EvidenceConfig:
    """``[evidence]``: ARD evidence maximisation of a polynomial regression, closed-form oracle."""

    n: Count = 40  # training points
    n_test: Count = 1000
    degree: Count = 9  # Legendre features P_0..P_degree
    # the true polynomial
    coef: Annotated[list[float], Length(1)] = field(default_factory=lambda: [0.5, -1.0, 0.0, 0.8])
    noise: Positive = 0.3
    ard: bool = True  # one precision per coefficient (else one shared)
    alpha: Positive = 1.0  # initial prior precision(s)
    beta: Positive = 1.0  # initial noise precision
    # inner momentum-SGD step, relative to the inverse curvature bound of each coefficient
    step: Annotated[float, Range(0, 2, open_low=True)] = 1.0
    prune: Positive = 1e3  # a coefficient with alpha above this counts as switched off


@dataclass
class Config:
    seed: Seed = 0
    hpo: HPOConfig = field(default_factory=HPOConfig)
    method: MethodTable = method_table("hoag", **HOAG)  # name + that method's fields (docs/cli.md)
    l2: L2Config = field(default_factory=L2Config)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(steps=100, meta_lr=0.1, eval_every=20,
                                                                     checkpoint_every=10))

    def validate(self) -> None:
        h = self.hpo
        if self.method["name"] == "reversible" and (h.task != "schedule" or self.schedule.learn_momentum):
            raise ConfigError("method.name = 'reversible' needs a fixed momentum: use it with hpo.task = 'schedule' "
                              "and schedule.learn_momentum = false")
        momentum = optim.momentum(momentum=self.schedule.momentum if h.task == "schedule" else 0.9)
        why = "the schedule task's hyperparameters act only along the inner trajectory: it has no stationary point"
        check_method(self.method, h.steps, stationary=h.task != "schedule", why=why, optimizer=momentum)
        for i, m in enumerate(self.l2.compare if h.task == "l2" else ()):  # the l2 task's report runs them
            check_method(m, h.steps, where=f"l2.compare[{i}]", optimizer=optim.momentum(momentum=0.9))
