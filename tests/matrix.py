"""The agreement matrix (issue 21): every registered hypergradient method x optimizer x kind of
hyperparameter x module kind x dtype, each cell checked against its method's ``reference``.

A cell either *agrees* with the reference within the tolerance below, or *refuses* before computing
(a ``ValueError``/``TypeError`` with a one-line message, raised before the first inner step), or is
*not applicable* for a documented reason (the table in docs/choosing-a-method.md shows which and why).
Anything else (a number off the reference, an unexpected crash, a refusal after computing, the
user's module mutated) is a failing cell: a silently wrong hypergradient.

References (all in float64, on the same problem, the same generator seed):

* ``unrolled`` methods (and ``truncated``/``random_truncated`` configured with ``K = W = n``, where
  their definitions are the full unroll): the full unroll (``full``); ``full`` itself against
  five-point central differences of ``F`` along one random direction.
* ``stationary`` methods: the implicit function theorem at the inner optimizer's fixed point,
  computed here independently of the library: the fixed point is solved by Newton's method on the
  optimizer's fixed-point residual written out below (``grad + wd * w`` for coupled decay, AdamW's
  ``m/(sqrt(v + eps_root) + eps) + wd * w`` at ``m = g, v = g^2``), with dense Jacobians;
  ``tests/test_agreement_matrix.py`` checks that reference against finite differences of ``F`` at the
  re-solved optimum.
* ``smoothed`` (the zero-order ES and PES): Monte Carlo estimates of a Gaussian-smoothed ``F``'s
  gradient, compared with the full unroll: a cell agrees when ``‖g − g_ref‖ <= SMOOTHED_K ‖se‖``,
  ``se`` the estimate's own standard errors (``extras["stderr"]``; ``E‖g − g_ref‖² = ‖se‖²`` up to
  the ``O(sigma^2)`` smoothing), with a fixed seed (deterministic) and enough particles that the
  bound is at most ``RTOL_SMOOTHED_MAX`` relative.
* ``straight_line`` (DrMAD): exact only on a straight inner trajectory, which no module kind here
  follows: not applicable (approximate by design; the table shows its measured error).

float32 cells run the same problem in float32 and are compared with the float64 reference.

The method settings for these small problems are in :func:`make_method` (one place).
"""

from __future__ import annotations

import functools
import math
import random
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.optim import schedule

STEPS = 8  # inner steps n of every cell
SAMPLES = 16  # training and validation points
GEN_SEED = 5  # the hypergradient's generator (init params, batches)
SAMPLE_SEED = 21  # which cells the default test run samples
SAMPLES_PER_METHOD = 5  # cells per registered method in the default run (each optimizer and kind once)

# Tolerances: relative error ||g - g_ref|| / ||g_ref|| over all hyperparameters together.
RTOL_EXACT = 1e-10  # exact unrolled methods vs the full unroll, float64 (issue 21's bound)
RTOL_FD = 1e-6  # full vs five-point central differences (eps 1e-4), float64, one random direction
RTOL_STATIONARY = 1e-6  # implicit/HOAG (linear and inner tolerance 1e-12) vs the IFT at the Newton-solved fixed point
RTOL_FLOAT32 = 1e-4  # float32 unrolled cells vs the float64 reference: 8 steps of round-off (measured <= 3e-6)
RTOL_STATIONARY_FLOAT32 = 1e-4  # float32 implicit vs the float64 IFT (measured <= 3e-7; ignoring AdamW decay: 2e-3)
SMOOTHED_K = 3.0  # ES/PES: ||g - g_ref|| within this many standard errors (in norm) of the full unroll
RTOL_SMOOTHED_MAX = 0.3  # ... and that bound at most this relative error (enough particles: not vacuous)

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
HYPERS = ("none", "const_decay", "learn_decay", "per_param", "schedule")
MODULES = ("mlp", "dropout", "batchnorm", "conv")
DTYPES = ("float64", "float32")

HYPER_LABEL = {"none": "no decay", "const_decay": "constant decay", "learn_decay": "learnable decay",
               "per_param": "per-parameter", "schedule": "per-step schedule"}
MODULE_LABEL = {"mlp": "MLP 2-8-1 (tanh)", "dropout": "dropout MLP 2-8-1 (p = 0.25 on the hidden layer)",
                "batchnorm": "BatchNorm MLP 2-8-1 (BatchNorm1d before tanh; outer loss in eval mode)",
                "conv": "small conv (1x6x6 input, 2 channels 3x3, tanh, linear head)"}

LR = {"sgd": 0.3, "momentum": 0.2, "nesterov": 0.2, "adam": 0.02, "adamw": 0.02}
MOMENTUM = 0.5  # heavy ball and Nesterov; a Python float (reversible makes it the rational 1/2)
DECAY = 0.05  # constant, and the initial learnable, weight decay
LAMBDA = 2.0  # the inner loss's own L2 penalty exp(log_lam) * |w|^2 / 2: a strict minimum (eigenvalues >= 0.2)
ADAM_EPS, ADAM_EPS_ROOT = 1e-8, 1e-16
DROPOUT = 0.25


@dataclass(frozen=True)
class Cell:
    method: str
    optimizer: str
    hyper: str
    module: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.method}-{self.optimizer}-{self.hyper}-{self.module}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# -- methods ---------------------------------------------------------------------------------------

IMPLICIT_SOLVER = {"implicit": "cg", "cg": "cg", "neumann": "neumann", "fixed_point": "fixed_point", "dense": "dense"}


def make_method(name: str, steps: int = STEPS) -> hg.Method:
    """The registered method ``name`` with its settings for these small problems (the one place that
    configures methods): a fresh object per call (HOAG and random truncation keep state)."""
    cls = hg.registered()[name].cls
    tight = {"tol": 1e-12, "inner_tol": 1e-12, "max_inner_rounds": 60, "maxiter": 1000}
    make: dict[str, Callable[[], hg.Method]] = {
        "checkpointed": lambda: cls(every=3),
        "recursive": lambda: cls(base=1),
        "truncated": lambda: cls(steps),  # K = n: its definition is the full unroll
        "random_truncated": lambda: cls(window=steps, seed=0),  # W = n: t = n, the full unroll
        "hoag": lambda: cls(tol0=1e-12, min_tol=1e-12, max_inner_rounds=60, maxiter=1000),
        "es": lambda: cls(particles=4096, sigma=1e-3),  # a few percent relative standard error; sigma = 0.01 smooths
        # Adam (eps_root 1e-16) measurably: 10 standard errors off at N = 4096
        "pes": lambda: cls(window=3, particles=4096, sigma=1e-3),  # three windows (3, 3, 2 steps): persistence used
    }
    if name in IMPLICIT_SOLVER:
        return cls(IMPLICIT_SOLVER[name], **tight)
    if name in make:
        return make[name]()
    return hg.as_method(name, steps)  # a newly registered method: its defaults


# -- the problems ----------------------------------------------------------------------------------


class Dropout(nn.Module):
    """Inverted dropout whose mask is drawn in float64 (the same mask in float32 and float64 cells)
    from torch's random stream, as any user's ``torch.rand`` inside ``inner_loss``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = torch.rand(x.shape, dtype=torch.float64, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


def build_module(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    if kind == "dropout":
        return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), Dropout(DROPOUT), nn.Linear(8, 1))
    if kind == "batchnorm":
        return nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    if kind == "conv":
        return nn.Sequential(nn.Unflatten(1, (1, 6, 6)), nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 1))
    raise ValueError(f"unknown module kind {kind!r}; use one of {MODULES}")


BUFFER_API = hasattr(metaopt.MetaObjective, "init_buffers")
"""Whether metaopt carries module buffers as inner state (``init_buffers``/``inner_loss_and_buffers``/
``outer_loss_with_buffers``); without it the BatchNorm problem uses the module's own buffers, as a
user's code did before (and the matrix shows what that does)."""


class Problem(metaopt.MetaObjective):
    """A regression of ``SAMPLES`` points by ``module`` (full batch), inner loss
    ``mse + exp(log_lam) |w|^2 / 2``, outer loss the validation mse (eval mode) plus ``1e-3 |h|^2``;
    the optimizer's hyperparameters come from ``hyper`` as the hyperparameter kind says. Counts its
    inner-loss calls (a refusal must come before the first). With module buffers (BatchNorm) and
    metaopt's buffer API, the buffers travel through the inner run and the module is never modified."""

    def __init__(self, module: str, hyper_kind: str, dtype: torch.dtype) -> None:
        self.kind, self.hyper_kind, self.dtype = module, hyper_kind, dtype
        self.net = build_module(module).to(dtype)
        g = torch.Generator().manual_seed(0)
        d = 36 if module == "conv" else 2
        x = torch.randn(2 * SAMPLES, d, generator=g, dtype=torch.float64)
        y = torch.sin(x.sum(1, keepdim=True)) + 0.5 * torch.tanh(x[:, :1] * x[:, -1:])
        self.x, self.xv = x[:SAMPLES].to(dtype), x[SAMPLES:].to(dtype)
        self.y, self.yv = y[:SAMPLES].to(dtype), y[SAMPLES:].to(dtype)
        self.shapes = {n: p.shape for n, p in self.net.named_parameters()}
        self.buffered = BUFFER_API and any(True for _ in self.net.buffers())
        self.inner_calls = 0

    def init_params(self, hyper, generator):
        out = {}
        for n, s in self.shapes.items():
            fan_in = math.prod(s[1:]) if len(s) > 1 else 4
            out[n] = (torch.randn(s, generator=generator, dtype=torch.float64) / math.sqrt(fan_in)).to(self.dtype)
        return out

    def predict(self, params: Mapping[str, Tensor], x: Tensor, buffers: Mapping[str, Tensor] | None = None,
                train: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """The module's output and its buffers after the call (updated copies of ``buffers``; without
        ``buffers``, the module's own, updated in place in train mode)."""
        self.net.train(train)
        try:
            if buffers is None:
                return functional_call(self.net, dict(params), (x,)), {}
            fresh = {k: b.clone() for k, b in buffers.items()}
            return functional_call(self.net, (dict(params), fresh), (x,)), fresh
        finally:
            self.net.train()

    def _inner(self, params, buffers, hyper) -> tuple[Tensor, dict[str, Tensor]]:
        self.inner_calls += 1
        pred, new = self.predict(params, self.x, buffers)
        r = pred - self.y
        penalty = sum((w * w).sum() for w in params.values())
        return (r * r).mean() + 0.5 * hyper["log_lam"].exp() * penalty, new

    def _outer(self, params, buffers, hyper) -> Tensor:
        r = self.predict(params, self.xv, buffers, train=False)[0] - self.yv
        return (r * r).mean() + 1e-3 * sum((h * h).sum() for h in hyper.values())

    def _own_buffers(self) -> dict[str, Tensor] | None:
        return {k: b.detach().clone() for k, b in self.net.named_buffers()} if self.buffered else None

    def inner_loss(self, params, hyper, k, batch):
        return self._inner(params, self._own_buffers(), hyper)[0]

    def outer_loss(self, params, hyper, batch):
        return self._outer(params, self._own_buffers(), hyper)

    def init_buffers(self, hyper, generator):
        return self._own_buffers() or {}

    def inner_loss_and_buffers(self, params, buffers, hyper, k, batch):
        return self._inner(params, buffers if self.buffered else None, hyper)

    def outer_loss_with_buffers(self, params, buffers, hyper, batch):
        return self._outer(params, buffers if self.buffered else None, hyper)

    def hparams(self, hyper):
        kind = self.hyper_kind
        if kind in ("none", "const_decay"):
            return {"lr": hyper["log_lr"].exp()}
        if kind == "learn_decay":
            return {"lr": hyper["log_lr"].exp(), "weight_decay": hyper["log_wd"].exp()}
        if kind == "per_param":
            return {"lr": {n: hyper["lr/" + n].exp() for n in self.shapes},
                    "weight_decay": {n: hyper["wd/" + n].exp() for n in self.shapes}}
        if kind == "schedule":
            return {"lr": schedule.table(hyper["lr_raw"], positive="softplus")}
        raise ValueError(f"unknown hyperparameter kind {kind!r}; use one of {HYPERS}")

    def decay(self, hyper: Mapping[str, Tensor]) -> dict[str, Tensor | float]:
        """The weight decay per parameter as the optimizer applies it (for the reference's residual)."""
        kind = self.hyper_kind
        if kind == "const_decay":
            return dict.fromkeys(self.shapes, DECAY)
        if kind == "learn_decay":
            return dict.fromkeys(self.shapes, hyper["log_wd"].exp())
        if kind == "per_param":
            return {n: hyper["wd/" + n].exp() for n in self.shapes}
        return dict.fromkeys(self.shapes, 0.0)


def make_optimizer(name: str, hyper_kind: str) -> optim.Optimizer:
    wd = DECAY if hyper_kind == "const_decay" else 0.0
    lr = LR[name]
    if name == "sgd":
        return optim.sgd(lr=lr, weight_decay=wd)
    if name == "momentum":
        return optim.momentum(lr=lr, momentum=MOMENTUM, weight_decay=wd)
    if name == "nesterov":
        return optim.nesterov(lr=lr, momentum=MOMENTUM, weight_decay=wd)
    if name == "adam":
        return optim.adam(lr=lr, eps=ADAM_EPS, eps_root=ADAM_EPS_ROOT, weight_decay=wd)
    if name == "adamw":
        return optim.adamw(lr=lr, eps=ADAM_EPS, eps_root=ADAM_EPS_ROOT, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")


def make_hyper(obj: Problem, optimizer: str) -> dict[str, Tensor]:
    """The hyperparameters of the cell, in the problem's dtype (values drawn once, in float64)."""
    g = torch.Generator().manual_seed(3)
    log_lr = math.log(LR[optimizer])
    h = {"log_lam": torch.tensor(math.log(LAMBDA), dtype=torch.float64)}
    kind = obj.hyper_kind
    if kind in ("none", "const_decay", "learn_decay"):
        h["log_lr"] = torch.tensor(log_lr, dtype=torch.float64)
    if kind == "learn_decay":
        h["log_wd"] = torch.tensor(math.log(DECAY), dtype=torch.float64)
    if kind == "per_param":
        for n in obj.shapes:
            noise = 0.1 * torch.randn(2, generator=g, dtype=torch.float64)
            h["lr/" + n] = math.log(LR[optimizer]) + noise[0]
            h["wd/" + n] = math.log(DECAY) + noise[1]
    if kind == "schedule":
        raw = schedule.inverse_positive(torch.tensor(LR[optimizer], dtype=torch.float64), "softplus")
        h["lr_raw"] = raw + 0.1 * torch.randn(STEPS, generator=g, dtype=torch.float64)
    return {k: v.to(obj.dtype) for k, v in h.items()}


def setup(cell: Cell, dtype: torch.dtype | None = None) -> tuple[Problem, optim.Optimizer, dict[str, Tensor]]:
    """A fresh problem (its own module), the optimizer and the hyperparameters of ``cell``."""
    obj = Problem(cell.module, cell.hyper, dtype or cell.torch_dtype)
    return obj, make_optimizer(cell.optimizer, cell.hyper), make_hyper(obj, cell.optimizer)


def run(obj: Problem, opt: optim.Optimizer, hyper: Mapping[str, Tensor], method: hg.Method | str) -> Any:
    generator = torch.Generator().manual_seed(GEN_SEED)
    return metaopt.hypergradient(obj, opt, hyper, STEPS, method=method, generator=generator)


# -- what each cell must do ------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """``allowed``: the outcomes that pass (``"agrees"``, ``"refuses"``); empty for not applicable."""

    allowed: frozenset[str]
    why: str = ""

    @property
    def applicable(self) -> bool:
        return bool(self.allowed)


AGREE = frozenset({"agrees"})
REFUSE = frozenset({"refuses"})
EITHER = frozenset({"agrees", "refuses"})
FLAGGED = frozenset({"agrees", "refuses", "warns"})  # warns: NotStationaryWarning, the inner run missed inner_tol
NA_DRMAD = ("approximate by design: it reverses along the straight line from w_0 to w_n, exact only when the "
            "trajectory is one (a linear inner loss under SGD), which no module kind here follows")
NO_STATIONARY = {
    "dropout": "random draws in the inner loss: no deterministic inner problem, so no stationary point to "
               "differentiate at; the implicit methods refuse it (one probe evaluation of step 0)",
    "batchnorm": "the outer loss reads running statistics accumulated along the inner trajectory (constants of the "
                 "hypergradient), not a function of the stationary point: nothing to compare with",
}
PROBE_CALLS = 1  # inner-loss evaluations a refusal may spend first (the one probe of step 0 for random draws)
STATIONARY_OFF_ASSUMPTION = {"dropout": REFUSE, "batchnorm": frozenset()}
"""What a stationary method must do where its assumption fails (``NO_STATIONARY``): refuse (dropout:
metaopt detects the draws), or documented not applicable (``frozenset()``: BatchNorm)."""
MUST_AGREE_UNROLLED = {"full", "checkpointed", "recursive", "truncated", "random_truncated"}


def expect(cell: Cell) -> Expect:
    """What ``cell`` must do: agree, refuse, either, or nothing (not applicable, with the reason)."""
    reference = hg.registered()[cell.method].cls.reference
    if reference == "straight_line":
        return Expect(frozenset(), NA_DRMAD)
    if reference == "stationary":
        if cell.module in NO_STATIONARY:
            return Expect(STATIONARY_OFF_ASSUMPTION[cell.module], NO_STATIONARY[cell.module])
        sgd_family = cell.optimizer in ("sgd", "momentum", "nesterov")
        return Expect(AGREE if sgd_family else FLAGGED)
    if cell.method == "reversible":
        if cell.optimizer != "momentum":
            return Expect(REFUSE, "reversible learning reverses heavy-ball momentum SGD only")
        return Expect(AGREE if cell.module != "batchnorm" else EITHER)
    if cell.method == "forward":  # float32: torch.func's jvp-of-grad dtype promotion is refused after one probe step
        return Expect(AGREE if cell.module in ("mlp", "conv") and cell.dtype == "float64" else EITHER)
    if reference == "smoothed":  # vmapped runs of every module kind, with the dropout masks and buffers shared
        return Expect(AGREE)
    if cell.method in MUST_AGREE_UNROLLED:
        return Expect(AGREE)
    return Expect(EITHER)


def all_cells() -> list[Cell]:
    return [Cell(m, o, h, mod, d) for m in hg.registered() for o in OPTIMIZERS for h in HYPERS for mod in MODULES
            for d in DTYPES]


def sampled_cells() -> list[Cell]:
    """The default run: per registered method, one applicable cell under each optimizer with each
    kind of hyperparameter once (``SAMPLES_PER_METHOD`` cells), the module kinds taken in turn (a
    module where the method does not apply is passed over) and the dtype drawn, with a fixed seed
    per method (adding a method does not reshuffle the others). A method with no applicable cell
    (DrMAD) has none: the table documents why."""
    out = []
    for name in hg.registered():
        rng = random.Random(f"{SAMPLE_SEED}:{name}")
        hypers, modules = list(HYPERS), list(MODULES)
        rng.shuffle(hypers)
        rng.shuffle(modules)
        turn = 0
        for optimizer, kind in list(zip(OPTIMIZERS, hypers))[:SAMPLES_PER_METHOD]:
            for j in range(len(modules)):
                cell = Cell(name, optimizer, kind, modules[(turn + j) % len(modules)], rng.choice(DTYPES))
                if expect(cell).applicable:
                    out.append(cell)
                    turn += j + 1
                    break
    return out


# -- references ------------------------------------------------------------------------------------


def _flat(grads: Mapping[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([grads[k].detach().to(torch.float64).reshape(-1) for k in names])


def rel_error(got: Tensor, ref: Tensor) -> float:
    scale = float(ref.norm())
    return float((got - ref).norm()) / (scale if scale > 0 else 1.0)


@functools.cache
def full_reference(optimizer: str, hyper_kind: str, module: str) -> Tensor:
    """``dF/dh`` of the full unroll in float64 (flattened in ``hyper``'s order)."""
    obj, opt, h = setup(Cell("full", optimizer, hyper_kind, module, "float64"))
    return _flat(run(obj, opt, h, hg.Full()).grads, list(h))


def five_point(f: Callable[[float], float], eps: float = 1e-4) -> float:
    return (8 * (f(eps) - f(-eps)) - (f(2 * eps) - f(-2 * eps))) / (12 * eps)


def direction(h: Mapping[str, Tensor], seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in h.items()}
    norm = math.sqrt(sum(float((x * x).sum()) for x in v.values()))
    return {k: x / norm for k, x in v.items()}


def fd_full_error(grads: Mapping[str, Tensor], optimizer: str, hyper_kind: str, module: str) -> float:
    """Relative error of ``<dF/dh, v>`` (``grads``: full's, float64) against five-point central
    differences of the full unroll's ``F`` along a random unit ``v`` (each ``F`` on a fresh problem);
    relative to ``max(|FD|, 1e-2 ||dF/dh||)`` (a direction nearly orthogonal to the gradient).

    With module buffers carried as inner state, metaopt documents them as constants of the
    hypergradient: ``F`` is then differenced with the buffers the outer loss reads held at their
    values at ``h`` (the inner steps, in train mode, do not read them)."""
    _, _, h = setup(Cell("full", optimizer, hyper_kind, module, "float64"))
    v = direction(h)
    obj0, opt0, _ = setup(Cell("full", optimizer, hyper_kind, module, "float64"))
    frozen = run(obj0, opt0, h, hg.Full()).buffers if obj0.buffered else None

    def f(t: float) -> float:
        obj, opt, _ = setup(Cell("full", optimizer, hyper_kind, module, "float64"))
        ht = {k: h[k] + t * v[k] for k in h}
        res = run(obj, opt, ht, hg.Full())
        if frozen is None:
            return float(res.loss)
        return float(obj.outer_loss_with_buffers(res.params, frozen, ht, None))

    fd = five_point(f)
    an = float(sum((grads[k].detach().double() * v[k]).sum() for k in h))
    g_norm = float(_flat(grads, list(h)).norm())
    return abs(an - fd) / max(abs(fd), 1e-2 * g_norm, 1e-300)


def residual(obj: Problem, optimizer: str, w: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
    """The optimizer's fixed-point residual (zero where its step map stands still), flattened.

    Coupled decay (SGD, momentum, Nesterov, Adam: their steps vanish exactly there): ``g + wd * w``
    with ``g`` the inner loss's gradient. AdamW, at ``m = g, v = g^2`` (bias corrections at 1), stands
    still where ``phi(g) = g / (sqrt(g^2 + eps_root) + eps) = -wd * w``; ``phi`` is increasing, so that
    is ``g - phi^-1(-wd * w) = 0``, the same roots without ``phi``'s 1/eps stiffness."""
    loss = obj.inner_loss(w, h, STEPS - 1, None)
    g = torch.autograd.grad(loss, list(w.values()), create_graph=True)
    wd = obj.decay(h)
    out = []
    for (n, p), gn in zip(w.items(), g):
        r = gn - _phi_inverse(-wd[n] * p) if optimizer == "adamw" else gn + wd[n] * p
        out.append(r.reshape(-1))
    return torch.cat(out)


def _phi_inverse(s: Tensor | float) -> Tensor | float:
    """``g`` with ``g / (sqrt(g^2 + a) + e) = s`` (``|s| < 1``; ``a = eps_root``, ``e = eps``): with
    ``q = sqrt(g^2 + a)``, ``(1 - s^2) q^2 - 2 s^2 e q - s^2 e^2 - a = 0`` and ``g = s (q + e)``."""
    if not isinstance(s, Tensor):
        return 0.0 * s
    a, e = ADAM_EPS_ROOT, ADAM_EPS
    s2 = s * s
    q = (s2 * e + (s2 * s2 * e * e + (1 - s2) * (s2 * e * e + a)).sqrt()) / (1 - s2)
    return s * (q + e)


@dataclass
class Stationary:
    """The reference at the fixed point: ``w*`` and ``dF/dh`` by the implicit function theorem."""

    w: dict[str, Tensor]
    grads: Tensor
    newton_iterations: int
    extras: dict[str, Any] = field(default_factory=dict)


def _unflat(x: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    sizes = [t.numel() for t in like.values()]
    return {k: c.reshape(t.shape) for (k, t), c in zip(like.items(), x.split(sizes))}


def solve_fixed_point(obj: Problem, optimizer: str, h: dict[str, Tensor], w0: dict[str, Tensor],
                      tol: float = 1e-13, iters: int = 60) -> tuple[dict[str, Tensor], int]:
    """Newton's method on :func:`residual` from ``w0`` (float64, dense Jacobian)."""
    x = _flat(w0, list(w0)).detach()
    hc = {k: t.detach() for k, t in h.items()}

    def r_of(xf: Tensor) -> Tensor:
        with torch.enable_grad():
            xf = xf if xf.requires_grad else xf.detach().requires_grad_()
            return residual(obj, optimizer, _unflat(xf, w0), hc)

    r = r_of(x).detach()
    for it in range(iters):
        if float(r.norm()) <= tol:
            return _unflat(x, w0), it
        J = torch.autograd.functional.jacobian(r_of, x, vectorize=True)
        step = torch.linalg.solve(J, r)
        for _ in range(40):  # backtracking on |r|: Newton from a point not yet in its quadratic basin
            x_new = x - step
            r_new = r_of(x_new).detach()
            if float(r_new.norm()) < float(r.norm()):
                break
            step = step / 2
        x, r = x_new, r_new
    raise RuntimeError(f"reference: Newton did not reach the fixed point (|r| = {float(r.norm()):.3g})")


@functools.cache
def stationary_reference(optimizer: str, hyper_kind: str, module: str) -> Stationary:
    """``dF/dh = d_h F - (d_h r)^T (d_w r)^-T d_w F`` at the Newton-solved fixed point of the float64
    problem, started where the cell's optimizer heads (:func:`start_point`)."""
    obj, opt, h = setup(Cell("full", optimizer, hyper_kind, module, "float64"))
    w = start_point(obj, optimizer, h)
    w_star, iters = solve_fixed_point(obj, optimizer, h, w)
    names = list(h)
    x = _flat(w_star, list(w_star))
    hx = _flat(h, names)

    def r_of(xw: Tensor, xh: Tensor) -> Tensor:
        with torch.enable_grad():
            return residual(obj, optimizer, _unflat(xw, w_star), _unflat(xh, h))

    Jw, Jh = torch.autograd.functional.jacobian(r_of, (x, hx), vectorize=True)
    lowest = float(torch.linalg.eigvalsh((Jw + Jw.T) / 2).min())
    if optimizer != "adamw" and lowest <= 0:
        raise RuntimeError(f"reference: the fixed point is not a strict minimum (lowest eigenvalue {lowest:.3g})")

    def f_of(xw: Tensor, xh: Tensor) -> Tensor:
        return obj.outer_loss(_unflat(xw, w_star), _unflat(xh, h), None)

    dw, dh = torch.autograd.functional.jacobian(f_of, (x, hx))
    grads = dh - Jh.T @ torch.linalg.solve(Jw.T, dw)
    return Stationary(w_star, grads, iters)


def start_point(obj: Problem, optimizer: str, h: dict[str, Tensor], rounds: int = 50) -> dict[str, Tensor]:
    """The cell's own optimizer run from the cell's initial params for ``rounds`` rounds of ``STEPS``
    steps (the step index restarting each round, as the implicit methods train on): the fixed point
    it heads for, close enough for Newton."""
    opt = make_optimizer(optimizer, obj.hyper_kind)
    hc = {k: t.detach() for k, t in h.items()}
    params = {k: t.detach() for k, t in obj.init_params(hc, torch.Generator().manual_seed(GEN_SEED)).items()}
    state = opt.init(params)
    for i in range(rounds * STEPS):
        with torch.enable_grad():
            w = {k: t.requires_grad_() for k, t in params.items()}
            g = torch.autograd.grad(obj.inner_loss(w, hc, i % STEPS, None), list(w.values()))
        params, state = opt.update(dict(zip(w, g)), state, params, step=i % STEPS, **obj.hparams(hc))
        params = {k: t.detach() for k, t in params.items()}
    return params


def stationary_fd_error(optimizer: str, hyper_kind: str, module: str) -> float:
    """The stationary reference against five-point differences of ``F(w*(h), h)``, ``w*`` re-solved
    by Newton at each point (relative as in :func:`fd_full_error`)."""
    ref = stationary_reference(optimizer, hyper_kind, module)
    obj, _, h = setup(Cell("full", optimizer, hyper_kind, module, "float64"))
    v = direction(h)

    def f(t: float) -> float:
        ht = {k: h[k] + t * v[k] for k in h}
        w, _ = solve_fixed_point(obj, optimizer, ht, ref.w)
        return float(obj.outer_loss(w, ht, None))

    fd = five_point(f)
    an = float(ref.grads @ _flat(v, list(h)))
    return abs(an - fd) / max(abs(fd), 1e-2 * float(ref.grads.norm()), 1e-300)


# -- running a cell --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """``status``: ``"agrees"``, ``"refuses"``, ``"n/a"``, ``"warns"`` (off the reference, with a
    ``NotStationaryWarning``), ``"fails"`` (off the reference, silently) or
    ``"error"`` (crashed, refused after computing, mutated the module); ``error``: the relative
    error measured (agrees/fails), ``message``: the refusal, the reason or what went wrong."""

    cell: Cell
    status: str
    error: float | None = None
    message: str = ""
    tol: float | None = None

    @property
    def passed(self) -> bool:
        e = expect(self.cell)
        return (not e.applicable and self.status == "n/a") or self.status in e.allowed


def tolerance(cell: Cell) -> float:
    stationary = hg.registered()[cell.method].cls.reference == "stationary"
    if cell.dtype == "float32":
        return RTOL_STATIONARY_FLOAT32 if stationary else RTOL_FLOAT32
    if stationary:
        return RTOL_STATIONARY
    return RTOL_FD if cell.method == "full" else RTOL_EXACT


def smoothed_tolerance(cell: Cell, stderr: Mapping[str, Tensor], names: list[str]) -> float:
    """A Monte Carlo cell's relative tolerance: ``SMOOTHED_K`` standard errors (in norm) over the
    reference's norm, at most ``RTOL_SMOOTHED_MAX``."""
    ref = full_reference(cell.optimizer, cell.hyper, cell.module)
    return min(SMOOTHED_K * float(_flat(stderr, names).norm()) / float(ref.norm()), RTOL_SMOOTHED_MAX)


def _state(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _reference(cell: Cell, method: hg.Method, grads: Mapping[str, Tensor], names: list[str]) -> float:
    """The cell's relative error against its method's reference (raises for a reference this matrix
    does not know: add it here)."""
    reference = method.reference
    if reference in ("truncated", "random_truncated"):
        length = getattr(method, "k", None) if reference == "truncated" else getattr(method, "window", None)
        if length != STEPS:
            raise AssertionError(f"{cell.method}: the matrix references truncation only at K = W = n; set it so in "
                                 "make_method")
        reference = "unrolled"
    got = _flat(grads, names)
    key = (cell.optimizer, cell.hyper, cell.module)
    if reference == "smoothed":
        return rel_error(got, full_reference(*key))
    if reference == "unrolled":
        if cell.method == "full" and cell.dtype == "float64":
            return fd_full_error(grads, *key)
        return rel_error(got, full_reference(*key))
    if reference == "stationary":
        return rel_error(got, stationary_reference(*key).grads)
    raise AssertionError(f"no reference for {cell.method!r} (reference {reference!r}): add one to tests/matrix.py")


@functools.cache
def run_cell(cell: Cell) -> Outcome:
    """Run one cell and judge it (not-applicable cells are not run); memoised, so the docs test
    reuses what the cell tests measured."""
    e = expect(cell)
    if not e.applicable:
        return Outcome(cell, "n/a", message=e.why)
    method = make_method(cell.method)
    obj, opt, h = setup(cell)
    before = _state(obj.net)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", hg.NotStationaryWarning)
            res = run(obj, opt, h, method)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        if obj.inner_calls > PROBE_CALLS:
            return Outcome(cell, "error", message=f"refused after {obj.inner_calls} inner steps: {msg}")
        if "\n" in msg or not msg:
            return Outcome(cell, "error", message=f"refusal not one line: {msg!r}")
        return Outcome(cell, "refuses", message=msg)
    except Exception as exc:  # noqa: BLE001 (a crash is a failing cell, reported with its type)
        first = (str(exc).strip().splitlines() or [""])[0]
        return Outcome(cell, "error", message=f"{type(exc).__name__}: {first[:300]}")
    if e.allowed == REFUSE:
        return Outcome(cell, "error", message=f"computed where it must refuse ({e.why})")
    after = _state(obj.net)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if changed:
        return Outcome(cell, "error", message=f"mutated the module's {', '.join(changed)}")
    bad = [k for k in h if res.grads[k].dtype != h[k].dtype or res.grads[k].shape != h[k].shape]
    if bad:
        return Outcome(cell, "error", message=f"grads of {bad} not shaped/typed like hyper")
    err = _reference(cell, method, res.grads, list(h))
    tol = tolerance(cell) if method.reference != "smoothed" else smoothed_tolerance(cell, res.extras["stderr"], list(h))
    status = "agrees" if err <= tol else "fails"
    flagged = [w for w in caught if issubclass(w.category, hg.NotStationaryWarning)]
    if flagged and status == "fails":  # off the reference, but not silently: the call warned
        return Outcome(cell, "warns", error=err, tol=tol,
                       message="the inner run missed inner_tol (Adam's restarting rounds); the call warns with "
                               "NotStationaryWarning and extras['inner_converged'] is False")
    return Outcome(cell, status, error=err, tol=tol)


# -- the table in docs/choosing-a-method.md ---------------------------------------------------------

START = "<!-- agreement-matrix:start (generated by tools/agreement_table.py; do not edit by hand) -->"
END = "<!-- agreement-matrix:end -->"
HYPER_CODE = {"none": "none", "const_decay": "const", "learn_decay": "learn", "per_param": "per-param",
              "schedule": "sched"}
DTYPE_CODE = {"float64": "f64", "float32": "f32"}
CODE_HYPER = {v: k for k, v in HYPER_CODE.items()}


def up(x: float) -> str:
    """``x`` rounded up to one significant digit (``3e-12``): the table's error bound."""
    if x <= 0:
        return "0"
    e = math.floor(math.log10(x))
    m = math.ceil(x / 10**e - 1e-9)
    if m == 10:
        m, e = 1, e + 1
    return f"{m}e{e}"


def _where(cells: list[Cell]) -> str:
    """The hyperparameter kinds (and dtype, where only one of the two) of ``cells``."""
    out = []
    for h in HYPERS:
        dts = [c.dtype for c in cells if c.hyper == h]
        if len(dts) == len(DTYPES):
            out.append(HYPER_CODE[h])
        out += [f"{HYPER_CODE[h]}/{DTYPE_CODE[d]}" for d in dts if len(dts) < len(DTYPES)]
    return ", ".join(out)


def render(outcomes: list[Outcome]) -> str:
    """The markdown between :data:`START` and :data:`END`: one table per module kind, rows the
    registered methods, columns the optimizers; notes for the refusals, the reasons and the errors."""
    by_class: dict[tuple[str, str, str], list[Outcome]] = {}
    for o in outcomes:
        by_class.setdefault((o.cell.module, o.cell.method, o.cell.optimizer), []).append(o)
    notes: dict[str, str] = {}  # text -> label

    def note(prefix: str, text: str) -> str:
        if text not in notes:
            notes[text] = f"{prefix}{sum(1 for v in notes.values() if v.startswith(prefix)) + 1}"
        return notes[text]

    def entry(group: list[Outcome]) -> str:
        if all(o.status == "n/a" for o in group):
            return f"n/a ({note('N', group[0].message)})"
        parts = []
        agree = [o for o in group if o.status == "agrees"]
        if agree:
            worst = {d: max((o.error for o in agree if o.cell.dtype == d), default=None) for d in DTYPES}
            parts.append("✓ " + " / ".join(up(worst[d]) if worst[d] is not None else "–" for d in DTYPES))
        for text in dict.fromkeys(o.message for o in group if o.status == "refuses"):
            cells = [o.cell for o in group if o.status == "refuses" and o.message == text]
            label = note("R", text)
            parts.append(f"refuses ({label})" + ("" if len(cells) == len(group) else f" for {_where(cells)}"))
        for text in dict.fromkeys(o.message for o in group if o.status == "warns"):
            cells = [o.cell for o in group if o.status == "warns" and o.message == text]
            parts.append(f"warns ({note('W', text)})" + ("" if len(cells) == len(group) else f" for {_where(cells)}"))
        wrong = [o for o in group if o.status == "fails"]
        if wrong:
            parts.append(f"✗ {_where([o.cell for o in wrong])}: {up(max(o.error for o in wrong))}")
        for text in dict.fromkeys(o.message for o in group if o.status == "error"):
            cells = [o.cell for o in group if o.status == "error" and o.message == text]
            parts.append(f"✗ {_where(cells)}: error {note('E', text)}")
        return "; ".join(parts)

    lines = [START, ""]
    for module in MODULES:
        lines += [f"**{MODULE_LABEL[module]}**", "", "| method | " + " | ".join(OPTIMIZERS) + " |",
                  "|---|" + "---|" * len(OPTIMIZERS)]
        for method in hg.registered():
            row = [entry(by_class[(module, method, o)]) if (module, method, o) in by_class else "not run"
                   for o in OPTIMIZERS]
            lines.append(f"| `{method}` | " + " | ".join(row) + " |")
        lines.append("")
    for prefix, title in (("N", "Not applicable"), ("R", "Refusals (the library's message)"),
                          ("W", "Warnings (a number off the reference, returned with a NotStationaryWarning)"),
                          ("E", "Errors (a crash, a refusal after computing, or the module mutated)")):
        items = [(label, text) for text, label in notes.items() if label.startswith(prefix)]
        if items:
            lines += [f"{title}:", ""] + [f"- {label}: {text}" for label, text in items] + [""]
    lines.append(END)
    return "\n".join(lines)


def parse(markdown: str) -> dict[tuple[str, str, str], str]:
    """The entries of the generated section of ``markdown``: ``(module, method, optimizer) -> text``."""
    if START not in markdown or END not in markdown:
        raise AssertionError("docs/choosing-a-method.md has no agreement-matrix section: run tools/agreement_table.py")
    section = markdown[markdown.index(START):markdown.index(END)]
    label_module = {f"**{v}**": k for k, v in MODULE_LABEL.items()}
    out: dict[tuple[str, str, str], str] = {}
    module = None
    for line in section.splitlines():
        if line.strip() in label_module:
            module = label_module[line.strip()]
        elif module and line.startswith("| `"):
            cols = [c.strip() for c in line.strip().strip("|").split("|")]
            method = cols[0].strip("`")
            for opt, text in zip(OPTIMIZERS, cols[1:]):
                out[(module, method, opt)] = text
    return out


def documented(text: str, cell: Cell) -> tuple[str, float | None]:
    """What an entry says of ``cell``: ``("agrees", bound)``, ``("refuses", None)``, ``("n/a", None)``
    or ``("fails", None)``."""
    if text.startswith("n/a"):
        return "n/a", None
    codes = {HYPER_CODE[cell.hyper], f"{HYPER_CODE[cell.hyper]}/{DTYPE_CODE[cell.dtype]}"}
    bound = None
    for part in text.split("; "):
        if part.startswith(("refuses", "warns")):
            where = part.split(" for ", 1)
            if len(where) == 1 or codes & {w.strip() for w in where[1].split(",")}:
                return part.split(" ", 1)[0], None
        elif part.startswith("✗"):
            if codes & {item.strip() for item in part[1:].rsplit(":", 1)[0].split(", ")}:
                return "fails", None
        elif part.startswith("✓"):
            value = part[1:].split("/")[DTYPES.index(cell.dtype)].strip()
            bound = None if value == "–" else float(value)
    return ("agrees", bound) if bound is not None else ("missing", None)
