"""Zero-order hypergradients: antithetic evolution strategies (:class:`ES`) and Persistent Evolution
Strategies (:class:`PES`, Vicol, Metz & Sohl-Dickstein 2021).

Neither differentiates the inner run: each runs it ``2N`` more times with perturbed hyperparameters
``h ± eps`` (``N`` antithetic pairs, ``eps ~ N(0, sigma^2 I)``, one element per hyperparameter element)
and one time at ``h`` itself (the returned loss and params), and estimates the gradient from the
outer losses. Nothing of the trajectory is stored: memory is the inner states of the runs in flight,
time ``2N + 1`` forward runs. The estimates are unbiased for the gradient of a Gaussian-smoothed
``F`` (``reference = "smoothed"``), which differs from ``dF/dh`` by ``O(sigma^2)``; the statistical
error, one standard error per hyperparameter element, comes back in ``extras["stderr"]``.

The runs are batched: ``chunk_size`` runs at once through ``torch.func.vmap`` over the perturbed
hyperparameters (one vectorised inner step for the whole chunk), or, with ``chunk_size = 1``, one run
at a time through :meth:`Problem.advance`. The random draws of the inner loss (dropout) are the same
in every run (``vmap(..., randomness="same")`` under the run's seeded draws): common random numbers,
so ``F(h + eps) - F(h - eps)`` sees the hyperparameters' effect only. The noise is drawn from a
generator seeded by ``seed`` mixed with the hypergradient's ``generator`` (through
:attr:`Problem.draws`): the same generator gives the same estimate, another generator (the next outer
step) fresh noise.

Tested against the exact ``dF/dh`` of the full unroll, not to round-off: ``tests/test_method_contract.py``
asks every element within 4 of its standard errors (float64, a fixed seed, enough pairs that the
standard error is under 10 % of ``|dF/dh|``: the check is deterministic and not vacuous), the
agreement matrix ``‖g - g_full‖ <= 3 ‖se‖`` (``sigma = 1e-3``; at ``0.01`` the smoothing of an Adam
inner run is measurable). Why not finite differences to 1e-6: the estimate's own statistical error
is ``O(1 / sqrt(N))``, and the smoothed ``F`` differs from ``F`` by ``O(sigma^2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import vmap

from .._tree import nbytes, tree_flatten, tree_unflatten
from ..optim.base import Params, State
from . import inner
from .inner import _mix, split_buffers
from .methods import FieldError, Method, Settings, Sweep
from .problem import Problem, check_outer_loss
from .result import NonFiniteError

_NOISE_STREAM = 0x5E5  # the noise generator's stream of the inner run's seed (apart from the steps' draws)


@dataclass(frozen=True)
class ES(Method):
    """Antithetic evolution strategies (zero-order): ``N`` pairs of Gaussian perturbations ``eps_i`` of
    ``h`` (scale ``sigma``), ``g = sum_i eps_i (F(h + eps_i) - F(h - eps_i)) / (2 N sigma^2)``. Unbiased
    for the gradient of the smoothed ``E_eps F(h + eps)``; memory: ``chunk_size`` inner states.

    Args:
        particles: ``N``, the antithetic pairs (``2N`` perturbed inner runs), at least 2 (the standard
            error needs two samples). The standard error falls as ``1 / sqrt(N)``.
        sigma: the perturbation's standard deviation, in the hyperparameters' units (> 0). Smaller:
            closer to ``dF/dh`` (bias ``O(sigma^2)``) but more round-off in ``F(h+eps) - F(h-eps)``.
        seed: mixed with the hypergradient's ``generator`` into the noise's seed (different seeds:
            independent noise for the same generator).
        chunk_size: runs advanced at once with ``vmap`` (``None``: all ``2N + 1``; ``1``: one at a
            time through the eager inner step, no ``vmap``).
        samples: also return the ``N`` per-pair estimates (``extras["samples"]``, ``{name: [N, *shape]}``,
            whose mean is the estimate): independent estimates for diagnostics, e.g. the variance of
            an ``M``-pair estimate from groups of ``M`` pairs of one run.

    ``Sweep.extras``: ``stderr`` (``{name: tensor}`` shaped like ``hyper``: the estimate's standard
    error per element, the sample standard deviation of the ``N`` pair estimates over ``sqrt(N)``),
    ``particles``, ``sigma``, ``windows`` (1), and with ``samples`` the per-pair estimates.
    ``Sweep.loss`` and ``params`` are the unperturbed run's.
    """

    particles: int = 64
    sigma: float = 0.01
    seed: int = 0
    chunk_size: int | None = None
    samples: bool = False
    name: ClassVar[str] = "es"
    reference: ClassVar[str] = "smoothed"
    supports_start: ClassVar[bool] = True  # every run continues the carried state at the global steps

    @classmethod
    def configure(cls, steps: int, settings: Settings) -> ES:
        return cls(chunk_size=settings.chunk_size)

    def validate(self, steps: int) -> None:
        cls = type(self).__name__
        if isinstance(self.particles, bool) or not isinstance(self.particles, int) or self.particles < 2:
            raise FieldError(cls, "particles", self.particles, "needs an int >= 2 (antithetic pairs)")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not (
                math.isfinite(self.sigma) and self.sigma > 0):
            raise FieldError(cls, "sigma", self.sigma, "must be a finite number > 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise FieldError(cls, "seed", self.seed, "needs a non-negative int")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise FieldError(cls, "chunk_size", self.chunk_size, "needs a positive int (unset: all runs at once)")

    def windows(self, steps: int) -> int:
        """The number of windows the ``steps`` inner steps are cut into (one for ES)."""
        return 1

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        sweep = zero_order(problem, params0, outer, self.particles, float(self.sigma), self.seed,
                           self._window(problem.steps), self.chunk_size)
        if not self.samples:
            del sweep.extras["samples"]
        return sweep

    def _window(self, steps: int) -> int:
        return steps

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        runs = 2 * self.particles + 1
        held = runs if self.windows(steps) > 1 else min(self.chunk_size or runs, runs)
        return held * state_bytes

    @property
    def label(self) -> str:
        return f"{self.name} (N={self.particles}, sigma={self.sigma:g})"


@dataclass(frozen=True)
class PES(ES):
    """Persistent evolution strategies (Vicol, Metz & Sohl-Dickstein 2021, "Unbiased gradient estimation
    in unrolled computation graphs with persistent evolution strategies", ICML, Algorithm 2): the inner
    run in windows of ``K`` steps, fresh antithetic noise ``±eps_{i,j}`` for pair ``i`` in window ``j``,
    the ``2N`` perturbed inner states carried across windows (the persistence: no run restarts from
    the unperturbed state, unlike truncated ES), and the accumulated perturbation
    ``xi_i = sum_j eps_{i,j}`` scaling the estimate ``g = sum_i xi_i (F_i^+ - F_i^-) / (2 N sigma^2)``.
    Memory: the ``2N + 1`` inner states; no stored trajectory.

    What it estimates. Let ``F(h_1, ..., h_W)`` be the outer loss at the final params when window
    ``j`` runs with hyperparameters ``h_j`` (and the initialisation and window 0 read ``h_1``; the outer
    loss reads ``h_W``). PES is unbiased for the gradient at ``h`` of the smoothed
    ``E F(h + eps_1, ..., h + eps_W)`` with independent ``eps_j ~ N(0, sigma^2 I)``: per-window
    smoothing over the whole (untruncated) run, ``O(sigma^2)`` from ``dF/dh``, with no truncation bias
    however short ``K`` is. With one window (``K >= n``) it is :class:`ES`. When the meta-objective is
    instead a sum of per-window losses ``sum_j L_j`` (the paper's online setting, ``h`` updated after
    each window), the paper's estimate for window ``j`` is ``xi_{i,j} (L_j^+ - L_j^-) / (2 sigma^2)``
    with ``xi_{i,j} = sum_{t <= j} eps_{i,t}``, and their sum over windows is unbiased for the gradient
    of the smoothed sum; here ``F`` reads the final params only, so only the last window's loss enters.
    Its variance grows with the number of windows (``xi`` sums ``W`` noises), the price of unbiasedness:
    within one call, where nothing is updated between windows, :class:`ES` (one perturbation for the
    whole run: "ES-Single", Vicol, Kolter & Swersky 2023; "noise reuse", Li et al. 2023) has the lower
    variance (measured in ``benchmarks/pes_schedule.py``); PES's windows are what an online outer loop
    that updates ``h`` every ``K`` steps would use.

    Args:
        window: ``K``, the steps per window (>= 1; the last window may be shorter; ``K >= n``: ES).

    The other settings (``particles``, ``sigma``, ``seed``, ``chunk_size``, ``samples``) are
    :class:`ES`'s; ``chunk_size`` batches the runs within each window, and all ``2N + 1`` states
    persist across windows.

    ``Sweep.extras``: as for :class:`ES`, with ``windows`` the number of windows.
    """

    window: int = 10
    name: ClassVar[str] = "pes"

    @classmethod
    def configure(cls, steps: int, settings: Settings) -> PES:
        return cls(chunk_size=settings.chunk_size, **({"window": settings.window} if settings.window else {}))

    def validate(self, steps: int) -> None:
        super().validate(steps)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise FieldError("PES", "window", self.window, "needs a positive int (inner steps per window)")

    def windows(self, steps: int) -> int:
        return -(-steps // self.window)

    def _window(self, steps: int) -> int:
        return self.window

    @property
    def label(self) -> str:
        return f"pes (K={self.window}, N={self.particles}, sigma={self.sigma:g})"


def zero_order(problem: Problem, params0: Params, outer: Any, pairs: int, sigma: float, seed: int, window: int,
               chunk_size: int | None) -> Sweep:
    """The (persistent) antithetic ES estimate: ``2 * pairs + 1`` runs (run 0 at ``h``, runs ``1..N``
    at ``h + eps``, runs ``N+1..2N`` at ``h - eps``), windows of ``window`` steps with fresh noise each,
    the runs' states carried across windows; ``window >= steps`` is ES."""
    n, hyper = problem.steps, problem.hyper_const
    names = list(hyper)
    shapes = [hyper[k].shape for k in names]
    sizes = [hyper[k].numel() for k in names]
    flat = torch.cat([hyper[k].reshape(-1) for k in names])
    runs = 2 * pairs + 1
    chunk = min(chunk_size or runs, runs)
    sign = torch.cat([flat.new_zeros(1), flat.new_ones(pairs), -flat.new_ones(pairs)])
    base = problem.draws.seed if problem.draws.seed is not None else 0
    gen = torch.Generator().manual_seed(_mix(_mix(base, _NOISE_STREAM), seed))
    xi = flat.new_zeros(pairs, flat.numel())
    bounds = [(k0, min(k0 + window, n)) for k0 in range(0, n, window)]

    def hypers(eps: Tensor, lo: int, hi: int) -> dict[str, Tensor]:
        """``{name: [hi - lo, *shape]}``: runs ``lo .. hi-1``'s hyperparameters in this window."""
        rows = flat + sign[lo:hi, None] * torch.cat([eps.new_zeros(1, eps.shape[1]), eps, eps])[lo:hi]
        return {k: t.reshape(hi - lo, *s) for k, t, s in zip(names, rows.split(sizes, dim=1), shapes)}

    def one(h: dict[str, Tensor], i: int) -> dict[str, Tensor]:
        return {k: t[i] for k, t in h.items()}

    state_bytes = nbytes(params0) + nbytes(split_buffers(problem.init_state(params0))[0])
    held: list[Any] = [None] * runs  # per chunk start: its runs' (params, state), stacked unless chunk == 1
    losses = flat.new_zeros(runs)
    final: tuple[Params, State] | None = None
    # the states in flight: every run's across windows (the persistence), one chunk's within a single window
    peak = (runs if len(bounds) > 1 else chunk) * state_bytes
    with torch.no_grad(), problem.draws.scope():
        for j, (k0, k1) in enumerate(bounds):
            eps = sigma * torch.randn(pairs, flat.numel(), generator=gen, dtype=torch.float64).to(flat)
            xi += eps
            last = j == len(bounds) - 1
            for lo in range(0, runs, chunk):
                hi = min(lo + chunk, runs)
                h = hypers(eps, lo, hi)
                if j == 0:
                    held[lo] = _start(problem, params0, h, chunk == 1)
                params, state = held[lo]
                if chunk == 1:
                    params, state = problem.replace(hyper=one(h, 0)).advance(k0, k1, params, state)
                else:
                    params, state = _advance(problem, k0, k1, params, state, h)
                if not last:
                    held[lo] = (params, state)
                    continue
                held[lo] = None
                losses[lo:hi] = _outer(problem, params, state, h, outer, chunk == 1)
                if lo == 0:
                    final = (params, state) if chunk == 1 else _first((params, state))
    assert final is not None
    params, state = final
    loss = losses[0]
    check_outer_loss(loss, problem.check_finite)
    problem.final_buffers = dict(split_buffers(state)[1] or {})
    if problem.check_finite and not torch.isfinite(losses).all():
        bad = int((~torch.isfinite(losses)).sum())
        raise NonFiniteError(f"the outer loss is not finite at {bad} of the {2 * pairs} perturbed hyperparameters "
                             f"(sigma = {sigma:g}): lower sigma")
    diff = (losses[1 : pairs + 1] - losses[pairs + 1 :]) / (2 * sigma**2)
    samples = xi * diff[:, None]  # [N, D]: one unbiased estimate per pair
    grad = samples.mean(0)
    stderr = samples.std(0) / math.sqrt(pairs)
    split = dict(zip(names, [g.reshape(s) for g, s in zip(grad.split(sizes), shapes)]))
    return Sweep(loss, params, split, None, peak, state=state,
                 extras={"stderr": dict(zip(names, [e.reshape(s) for e, s in zip(stderr.split(sizes), shapes)])),
                         "particles": pairs, "sigma": sigma, "windows": len(bounds),
                         "samples": {k: t.reshape(pairs, *s) for k, t, s in zip(names, samples.split(sizes, dim=1),
                                                                                  shapes)}})


def _start(problem: Problem, params0: Params, h: dict[str, Tensor], single: bool) -> tuple[Params, State]:
    """The runs' initial (params, state): ``init_params`` replayed at each run's hyperparameters when
    the initialisation depends on ``h`` (a meta-learned init), else ``params0`` for every run."""
    count = next(iter(h.values())).shape[0]
    if problem.init is None or not any(p.requires_grad for p in params0.values()):
        start = {k: p.detach() for k, p in params0.items()}
        pair = (start, problem.init_state(start))
        if single:
            return pair
        leaves, spec = tree_flatten(pair)
        return tree_unflatten([t.expand(count, *t.shape) for t in leaves], spec)
    starts = [{k: p.detach() for k, p in problem.init({k: t[i] for k, t in h.items()}).items()} for i in range(count)]
    pairs = [(p, problem.init_state(p)) for p in starts]
    if single:
        return pairs[0]
    leaves = [tree_flatten(pair) for pair in pairs]
    stacked = [torch.stack(ts) for ts in zip(*(lv for lv, _ in leaves))]
    return tree_unflatten(stacked, leaves[0][1])


def _first(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([t[0] for t in leaves], spec)


def _advance(problem: Problem, k0: int, k1: int, params: Params, state: State,
             hyper: dict[str, Tensor]) -> tuple[Params, State]:
    """Steps ``k0 .. k1-1`` of a chunk of runs at once (``vmap`` over the runs' params, state and
    hyperparameters; every run sees the same data and the same random draws)."""

    def run(p: Params, s: State, h: dict[str, Tensor]) -> tuple[Params, State]:
        for k in range(k0, k1):
            p, s = inner.step_functional(problem.objective, problem.optimizer, problem.index(k), p, s, h,
                                         problem.batches[k], problem.draws)
        return p, s

    params, state = vmap(run, randomness="same")(params, state, hyper)
    leaves, spec = tree_flatten((params, state))
    # vmap's outputs can be strided views: the next window starts from contiguous ones
    return tree_unflatten([t.contiguous() for t in leaves], spec)


def _outer(problem: Problem, params: Params, state: State, hyper: dict[str, Tensor], outer: Any,
           single: bool) -> Tensor:
    """The outer loss of each run of a chunk: ``[runs]``."""
    if single:
        h = {k: t[0] for k, t in hyper.items()}
        return problem.outer_loss(params, h, outer, state).detach().reshape(1)

    def f(p: Params, s: State, h: dict[str, Tensor]) -> Tensor:
        loss = problem.outer_loss(p, h, outer, s)
        check_outer_loss(loss, finite=False)
        return loss

    out = vmap(f, randomness="same")(params, state, hyper)
    problem.final_buffers = {}  # set from the unperturbed run's state by the caller
    return out.detach()
