"""The ``structure`` recipe's settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from ... import optim
from ...run.config import ConfigError, MethodTable, check_method, method_table
from ...run.recipe import OuterConfig
from ...run.schema import Count, Length, NonNegative, Note, Positive, Range, Seed, Size

GRAPHS = ("tanh3", "enum8", "wine8")


@dataclass
class StructureConfig:
    """``[structure]``: data, graph, variational inner problem and mode (the hypergradient method:
    ``[method]``)."""

    MOVED: ClassVar[dict[str, str]] = {
        "method": 'the hypergradient method is the [method] table now: write [method] name = "{value}" '
                  "(or --set method.name={value})",
        "truncate": 'K is a field of its method now: write [method] name = "truncated", k = {value}',
    }

    data: Literal["tanh", "wine"] = "tanh"  # tanh: y = tanh(x0) + noise, x in [-2, 2]^2; wine: bundled, 3 classes
    graph: Literal["tanh3", "enum8", "wine8"] = "tanh3"
    n_train: Count = 200  # tanh data only
    noise: Positive = 0.1  # tanh data: noise std (also the Gaussian likelihood's)
    mode: Literal["evidence", "increase", "decrease", "enumerate"] = "evidence"
    # coefficients (evidence maximisation: all 1, comb 0); "increase"/"decrease" anneal c_prior,
    # c_temp and c_reg geometrically from *_start to *_end over the outer steps
    c_train: float = 1.0
    c_reg: float = 1.0
    c_prior: float = 1.0
    c_comb: float = 0.0
    c_temp: Positive = 1.0
    q_temp: Annotated[NonNegative, Note("0: c_temp")] = 0.0  # temperature of q(Gamma)
    prior_start: Positive = 1.0
    prior_end: Positive = 1.0
    temp_start: Positive = 1.0
    temp_end: Positive = 1.0
    reg_start: Positive = 1.0
    reg_end: Positive = 1.0
    scale_by_gamma: bool = False
    # [a, b] of an inverse-gamma hyperprior on 1/A
    invgamma: Annotated[list[Positive], Length(0, 2), Note("[] or [a, b]")] = field(default_factory=list)
    precision: Literal["per_tensor", "per_weight"] = "per_tensor"
    init_precision: Positive = 1.0
    samples: Count = 4  # Monte Carlo samples of (W, Gamma)
    batch: Annotated[Size, Note("0: full batch")] = 0  # inner minibatch
    steps: Count = 50  # inner steps eta per hypergradient
    inner_lr: Positive = 0.05  # Adam on the variational parameters
    seeds: Annotated[int, Range(1, 10**6)] = 1  # independent runs (seed, seed + 1, ...) reported together
    enumerate_temp: Positive = 0.1  # enumeration: q(Gamma)'s temperature (collapse onto vertices)
    sweep_prior: list[Positive] = field(default_factory=list)  # c_prior values for the C_param sweep
    sweep_temp: list[Positive] = field(default_factory=list)  # c_temp values for the C_struct sweep
    sweep_steps: Count = 30  # outer steps of each sweep point
    exhaustive: bool = False  # also train every discrete structure alone (rank and Kendall tau)
    multistart_lr: Positive = 1e-3  # exhaustive: step of the multi-start evidence estimate (16 runs, 200 steps)

    def validate(self) -> None:
        if len(self.invgamma) == 1:
            raise ConfigError(f"structure.invgamma = {self.invgamma} must be [] or [a, b] with a, b > 0")
        if self.mode == "enumerate" and self.c_comb >= 0:
            raise ConfigError(f"structure.c_comb = {self.c_comb}: enumeration repels the structures found so far "
                              "and needs c_comb < 0 (e.g. -1)")
        if self.mode in ("increase", "decrease"):
            down = self.mode == "increase"  # complexity increases as the prior and regulariser weights fall
            pairs = [(self.prior_start, self.prior_end), (self.reg_start, self.reg_end)]
            ok = all((e <= s) if down else (e >= s) for s, e in pairs) and any(s != e for s, e in pairs)
            if not ok:
                raise ConfigError(f"structure.mode = {self.mode!r} needs prior_end and reg_end "
                                  f"{'<=' if down else '>='} their *_start values, one of them strictly "
                                  f"(got prior {self.prior_start} -> {self.prior_end}, reg {self.reg_start} -> "
                                  f"{self.reg_end})")
        want = {"tanh": ("tanh3", "enum8"), "wine": ("wine8",)}[self.data]
        if self.graph not in want:
            raise ConfigError(f"structure.graph = {self.graph!r} does not fit structure.data = {self.data!r}; "
                              f"use {' or '.join(map(repr, want))}")


@dataclass
class Config:
    seed: Seed = 0
    structure: StructureConfig = field(default_factory=StructureConfig)
    method: MethodTable = method_table("full")  # name + that method's fields (docs/cli.md)
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(steps=100, meta_lr=0.05, eval_every=10,
                                                                     checkpoint_every=10))

    def validate(self) -> None:
        s = self.structure
        why = ("its inner variational objective draws fresh Monte Carlo noise every step: it has no deterministic "
               "stationary point")
        check_method(self.method, s.steps, stationary=False, why=why, optimizer=optim.adam(lr=s.inner_lr))
