"""Implicit differentiation at the inner optimizer's fixed point (no trajectory stored).

The inner run stops where its optimizer stops: at a zero of the optimizer's *residual*
``r(w, h) = optimizer.residual(grad_w L(w, h), w, step=n-1, **hparams(h))`` (the gradient plus a
coupled weight decay; AdamW's decoupled condition in gradient form; see docs/optim.md). At
``r(w*(h), h) = 0`` the implicit function theorem gives::

    dF/dh = d_h F - (d_h r)^T v,     (d_w r)^T v = d_w F

``d_w r`` is the inner Hessian plus the decay's (diagonal) curvature, symmetric wherever the Hessian
is, so CG, Neumann and the dense solve apply; ``d_h r`` reaches every hyperparameter the residual
reads (the inner loss's, and a learnable weight decay: a tensor, a per-parameter dict, a schedule at
step ``n - 1``). Without a stated residual (a hand-made ``Optimizer`` pair) these methods refuse
before computing. Products with ``d_w r`` come from one retained graph of ``r`` (never a
materialised Hessian); the linear solve is any of :mod:`metaopt.hypergrad.solvers` (CG, Neumann,
dense), or the fixed-point iteration of Grazzi et al. (2020) on the inner optimizer's own step map
(right for any optimizer, residual or not). The inner loss at step ``steps - 1`` (its batch and the
optimizer's hyperparameters at that step included) is taken as *the* inner objective: implicit
methods assume a deterministic inner problem (full batch, no k-dependence). ``inner_tol`` and
``train(tol=)`` measure ``||r||`` (``extras["inner_grad_norm"]``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..optim.base import Params
from . import solvers
from .methods import FieldError, Method, Settings, Sweep, registered
from .problem import Problem, check_outer_loss, outer_partials


class NotStationaryWarning(RuntimeWarning):
    """An implicit hypergradient taken where the inner run did not reach its ``inner_tol``: the
    implicit function theorem's assumption (a fixed point) does not hold there. The number is
    returned (``extras["inner_grad_norm"]`` says how far off); filter this warning into an error
    (``warnings.simplefilter("error", NotStationaryWarning)``) to refuse such results."""


Solver = Callable[..., tuple[Tensor, solvers.SolveInfo]]
"""A linear solver ``solve(matvec, b, *, x0, tol, maxiter, damping) -> (x, SolveInfo)`` for the
symmetric system ``(A + damping I) x = b`` (see :mod:`metaopt.hypergrad.solvers`)."""


@dataclass(frozen=True)
class Implicit(Method):
    """Implicit differentiation after ``steps`` inner steps (run longer with ``inner_tol``).

    Args:
        solver: ``"cg"`` (needs a positive-definite Hessian; ``damping`` regularises),
            ``"neumann"`` (``alpha`` below ``2 / lambda_max``, estimated by power iteration when
            ``None``), ``"fixed_point"`` (iterates the adjoint of the inner optimizer's step; SGD and
            momentum), ``"dense"`` (materialises the Hessian: an oracle for tiny problems), or a
            callable :data:`Solver` (e.g. a wrapper around ``scipy.sparse.linalg.minres``).
        tol: relative residual of the linear solve.
        maxiter: iteration cap of the linear solve.
        damping: solve ``(H + damping I) v = dF/dw``.
        alpha: Neumann's step size.
        inner_tol: keep training (in rounds of ``steps``) until the norm of the optimizer's
            fixed-point residual (``grad_w L`` plus its weight decay) is ``<= inner_tol``, at most
            ``max_inner_rounds`` rounds (``None``: no extra rounds). The rounds restart Adam's bias
            correction, which kicks AdamW off its fixed point: give AdamW ``steps`` long enough for
            one round (docs/optim.md).
        warm_start: a flat initial guess for ``v [n_params]`` (HOAG passes the previous solution).
    """

    solver: str | Solver = "cg"
    tol: float = 1e-10
    maxiter: int = 1000
    damping: float = 0.0
    alpha: float | None = None
    inner_tol: float | None = None
    max_inner_rounds: int = 100
    warm_start: Tensor | None = None
    name: ClassVar[str] = "implicit"
    supports_autocast: ClassVar[bool] = True
    supports_start: ClassVar[bool] = True
    reference: ClassVar[str] = "stationary"
    supports_create_graph: ClassVar[bool] = True

    @classmethod
    def configure(cls, steps: int, settings: Settings, solver: str | Solver = "cg") -> Implicit:
        kw: dict[str, Any] = {}
        if settings.tol is not None:
            kw |= {"tol": settings.tol, "inner_tol": settings.tol}
        if settings.max_rounds is not None:
            kw["max_inner_rounds"] = settings.max_rounds
        if settings.solve_iters is not None:
            kw["maxiter"] = settings.solve_iters
        return cls(solver, **kw)

    def validate(self, steps: int) -> None:
        _check_solver("Implicit", self.solver, fixed_point=True)
        _check_positive("Implicit", self, ("maxiter", "max_inner_rounds", "alpha"))
        _check_positive("Implicit", self, ("tol", "inner_tol"), strict=False)
        if self.damping < 0:
            raise FieldError("Implicit", "damping", self.damping, "must be >= 0")

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        sweep = implicit(problem, params0, self, outer)
        warn_unconverged(self.label, sweep, self.inner_tol, problem.steps)
        return sweep

    def skip_reason(self, optimizer: Any, n_hyper: int) -> str | None:
        return needs_residual(optimizer, self.label, self.solver == "fixed_point")

    @property
    def differentiable(self) -> bool:
        return self.solver != "fixed_point"  # its adjoint iterates the step map: cg/neumann/dense give the same

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        return step_bytes + state_bytes  # fixed_point records one step; the others keep no trajectory

    @property
    def label(self) -> str:
        solver = self.solver if isinstance(self.solver, str) else getattr(self.solver, "__name__", "custom")
        return f"implicit ({solver})"


def implicit(problem: Problem, params0: Params, method: Implicit, outer: Any) -> Sweep:
    """Train to (near) the optimizer's fixed point ``r(w, h) = 0`` (:func:`residual_fn`), then
    ``dF/dh = d_h F - (d_h r)^T v`` with ``(d_w r)^T v = d_w F``. Refuses a hand-made optimizer
    without a residual before training, unless the solve is the fixed-point iteration."""
    opt, h, n = problem.optimizer, problem.hyper, problem.steps
    why = needs_residual(opt, method.label, method.solver == "fixed_point")
    if why is not None:
        raise ValueError(why)
    params, state = problem.advance(0, n, {k: p.detach() for k, p in params0.items()}, problem.init_state(params0))
    params, state, gnorm, rounds = converge(problem, params, state, method.inner_tol, method.max_inner_rounds)
    extras: dict[str, Any] = {"inner_grad_norm": gnorm, "inner_rounds": rounds,
                              "inner_converged": None if method.inner_tol is None else gnorm <= method.inner_tol}
    names = list(h)

    if problem.create_graph:
        loss, final, grads, v, info = _differentiable(problem, params, method, outer, state)
    else:
        final = {k: p.detach() for k, p in params.items()}
        loss, p_bar, dh = outer_partials(problem, params, outer, state)
        dw = torch.cat([p_bar[k].reshape(-1) for k in params])
        if method.solver == "fixed_point":
            part, v, info = _fixed_point(problem, params, state, dw, method)
            grads = {k: dh[k] + part[k] for k in names}
        else:
            with torch.enable_grad():
                w = {k: p.detach().requires_grad_() for k, p in params.items()}
                g_flat = _flat(residual_fn(problem)(w, h, state))
                v, info = _solve(g_flat, w, dw, method)
                cross = torch.autograd.grad(g_flat, [h[k] for k in names], v, allow_unused=True)
            grads = {k: dh[k] - _or_zero(c, h[k]) for k, c in zip(names, cross)}
    extras |= {"iterations": info.iterations, "matvecs": info.matvecs, "residual": info.residual,
               "converged": info.converged, "adjoint": v.detach()}
    return Sweep(loss, final, grads, None, problem.meter.peak, extras, state=state)


def warn_unconverged(label: str, sweep: Sweep, tol: float | None, steps: int) -> None:
    """A :class:`NotStationaryWarning` when the inner run stopped above its tolerance ``tol``."""
    norm, rounds = sweep.extras["inner_grad_norm"], sweep.extras["inner_rounds"]
    if tol is not None and not norm <= tol:
        warnings.warn(NotStationaryWarning(
            f"{label}: the inner run stopped at a fixed-point residual of {norm:.3g} > inner_tol = {tol:g} after "
            f"{rounds} rounds of {steps} steps, so the implicit hypergradient is taken off the optimizer's fixed "
            "point; raise max_inner_rounds or steps (Adam's rounds restart its bias correction: prefer longer "
            "rounds), or use an unrolled method"), stacklevel=4)


def needs_residual(optimizer: Any, label: str, fixed_point: bool = False) -> str | None:
    """Why an implicit method cannot run with ``optimizer`` (a hand-made pair that states no
    fixed-point residual), naming the methods that apply; ``None`` when it can."""
    if fixed_point or getattr(optimizer, "residual", None) is not None:
        return None
    apply = [n for n, e in registered().items() if e.cls.reference != "stationary"] + ["fixed_point"]
    return (f"method {label!r} needs the optimizer's fixed point, which this hand-made optimizer does not state "
            "(Optimizer(..., residual=fn), see docs/optim.md); use one of " + ", ".join(apply))


def residual_fn(problem: Problem) -> Callable[..., dict[str, Tensor]]:
    """``r(w, hyper)``: the optimizer's fixed-point residual at the last inner step's loss, batch and
    hyperparameters (``step = steps - 1``), with its graph (for Jacobian-vector products and the
    cross-derivative in ``hyper``). The bare inner gradient for an optimizer without a residual."""
    obj, opt, n = problem.objective, problem.optimizer, problem.steps

    def residual(
        w: Params, hyper: dict[str, Tensor], state: Any = None, create_graph: bool = True
    ) -> dict[str, Tensor]:
        g = problem.inner_value_and_grad(n - 1, w, hyper, state, create_graph=create_graph)[1]
        if opt.residual is None:
            return g
        with torch.set_grad_enabled(create_graph):
            return opt.residual(g, w, step=problem.index(n - 1), **obj.hparams(hyper))

    return residual


def _flat(tree: dict[str, Tensor]) -> Tensor:
    return torch.cat([x.reshape(-1) for x in tree.values()])


def _solve(g_flat: Tensor, w: Params, b: Tensor, method: Implicit) -> tuple[Tensor, solvers.SolveInfo]:
    """``(H + damping I) v = b`` with ``H v`` from the graph of ``g_flat`` (``w``'s gradient), by
    ``method``'s solver and settings."""
    def matvec(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(g_flat, list(w.values()), v, retain_graph=True)
        return torch.cat([x.reshape(-1) for x in hv]).detach()

    kw: dict[str, Any] = {"damping": method.damping}
    if method.solver != "dense":
        kw |= {"x0": method.warm_start, "tol": method.tol, "maxiter": method.maxiter}
    if method.solver == "neumann":
        kw["alpha"] = method.alpha
    solve = method.solver if callable(method.solver) else solvers.SOLVERS[method.solver]
    return solve(matvec, b, **kw)


def _differentiable(
    problem: Problem, w_star: Params, method: Implicit, outer: Any, state: Any
) -> tuple[Tensor, Params, dict[str, Tensor], Tensor, solvers.SolveInfo]:
    """``create_graph``: the implicit hypergradient ``d_h F - (d_h r)^T v`` as a differentiable
    function of ``h`` (and of whatever made ``h``). The inner solution ``w*(h)`` and the adjoint
    ``v(w*, h)`` (the root of ``(d_w r)^T v - d_w F``, ``r`` the optimizer's residual)
    enter through :func:`attach_root`, so their derivatives
    are the implicit function theorem's, solved with ``method``'s linear solver; the partial
    derivatives keep their graphs. Differentiable once more (three levels); upstream dependence must
    reach the inner problem through ``hyper``, not through the objective's closure. Returns the loss,
    ``w*``, the hypergradient, the adjoint ``v [n_params]`` and the solve's report."""
    h = problem.hyper
    opts: dict[str, Any] = {"solver": method.solver, "tol": method.tol, "maxiter": method.maxiter,
                            "damping": method.damping, "alpha": method.alpha}

    residual = residual_fn(problem)

    def stationarity(w: Params, hyper: dict[str, Tensor]) -> dict[str, Tensor]:
        return residual(w, hyper, state)

    def adjoint_equation(v: Params, theta: dict[str, Tensor]) -> dict[str, Tensor]:
        """``((d_w r)^T + damping I) v - d_w F`` at ``theta = (w, h, d_w F)``: zero at the adjoint."""
        w = {k: theta["w." + k] for k in v}
        g = stationarity(w, {k: theta["h." + k] for k in h})
        hv = torch.autograd.grad(list(g.values()), list(w.values()), list(v.values()), create_graph=True,
                                 allow_unused=True)
        return {k: _or_zero(x, v[k]) + method.damping * v[k] - theta["b." + k] for k, x in zip(v, hv)}

    names = list(h)
    with torch.enable_grad():
        w = attach_root(stationarity, w_star, h, **opts)
        h_direct = {k: t.clone() for k, t in h.items()}  # partial derivatives: w does not depend on these
        loss = problem.outer_loss(w, h_direct, outer, state)
        check_outer_loss(loss, problem.check_finite)
        leaves = list(w.values()) + [h_direct[k] for k in names]
        partial = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        b = {k: _or_zero(x, w[k]) for k, x in zip(w, partial)}
        d_h = {k: _or_zero(x, h[k]) for k, x in zip(names, partial[len(w):])}
        # the adjoint's value: one solve at the detached point (its graph comes from attach_root)
        w_leaf = {k: p.detach().requires_grad_() for k, p in w_star.items()}
        g_flat = _flat(stationarity(w_leaf, problem.hyper_const))
        v_flat, info = _solve(g_flat, w_leaf, torch.cat([x.detach().reshape(-1) for x in b.values()]), method)
        sizes = [t.numel() for t in w_star.values()]
        v0 = {k: x.reshape(t.shape) for (k, t), x in zip(w_star.items(), v_flat.split(sizes))}
        theta = ({"w." + k: t for k, t in w.items()} | {"h." + k: t for k, t in h.items()}
                 | {"b." + k: t for k, t in b.items()})
        v = attach_root(adjoint_equation, v0, theta, **opts)
        h_cross = {k: t.clone() for k, t in h.items()}
        g = stationarity(w, h_cross)
        cross = torch.autograd.grad(list(g.values()), [h_cross[k] for k in names], list(v.values()),
                                    create_graph=True, allow_unused=True)
    grads = {k: d_h[k] - _or_zero(c, h[k]) for k, c in zip(names, cross)}
    return loss, w, grads, v_flat, info


def _fixed_point(
    problem: Problem, params: Params, state: Any, dw: Tensor, method: Implicit
) -> tuple[dict[str, Tensor], Tensor, solvers.SolveInfo]:
    """Grazzi et al.: at the fixed point of the step map ``Phi(w, s; h)`` iterate
    ``v <- J_Phi^T v + (d_w F, 0)``; then ``(d_h Phi)^T v`` is the implicit part of ``dF/dh``.
    The Hessian solve happens inside the optimizer's own dynamics (converges when they contract)."""
    n, h = problem.steps, problem.hyper
    names = list(h)
    _, _, seg = problem.record(n - 1, n, params, state)
    leaves, outs = seg.inputs, seg.outputs
    sizes = [t.numel() for t in leaves]
    # (params, state) flatten params first: the first len(params) leaves are the parameters
    extra = sum(sizes[len(params):])
    b = torch.cat([dw, dw.new_zeros(extra)])
    v = torch.zeros_like(b) if method.warm_start is None else method.warm_start.clone()
    bnorm = float(b.norm()) or 1.0

    def vjp(v_flat: Tensor, wrt: list[Tensor]) -> tuple[Tensor | None, ...]:
        cots = [c.reshape(t.shape) for c, t in zip(v_flat.split(sizes), leaves)]
        return torch.autograd.grad(outs, wrt, cots, retain_graph=True, allow_unused=True)

    it, res = 0, float("inf")
    while it < method.maxiter:
        new = torch.cat([_or_zero(g, t).reshape(-1) for g, t in zip(vjp(v, leaves), leaves)]) + b
        res = float((new - v).norm()) / bnorm
        v = new
        it += 1
        if not torch.isfinite(v).all():
            raise ValueError(f"fixed_point: diverged at iteration {it}; the inner step map does not contract "
                             "there (lower the inner learning rate, or use solver='cg')")
        if res <= method.tol:
            break
    implicit_part = {k: _or_zero(g, h[k]) for k, g in zip(names, vjp(v, [h[k] for k in names]))}
    problem.meter.release(seg.keys)
    return implicit_part, v, solvers.SolveInfo(it, it + 1, res, res <= method.tol)


def converge(
    problem: Problem, params: Params, state: Any, tol: float | None, max_rounds: int
) -> tuple[Params, Any, float, int]:
    """After one round of ``problem.steps`` steps, train on in further rounds (the same batches, a
    deterministic problem; the step index restarts at the run's first step, ``problem.step0``, so
    schedules replay and Adam's bias correction restarts while its moments carry over) until the norm
    of the optimizer's fixed-point residual at the last step is ``<= tol`` (no extra rounds for
    ``tol=None``), ``max_rounds`` rounds in all; for a hand-made optimizer without a residual, the
    norm of ``grad_w inner_loss``.
    Returns ``(params, state, norm, rounds)``."""
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    residual = residual_fn(problem)
    gnorm = _grad_norm(residual, params, problem.hyper_const, state)
    rounds = 1
    while tol is not None and gnorm > tol and rounds < max_rounds:
        params, state = problem.advance(0, problem.steps, params, state)
        gnorm = _grad_norm(residual, params, problem.hyper_const, state)
        rounds += 1
    return params, state, gnorm, rounds


def _grad_norm(
    residual: Callable[..., dict[str, Tensor]], params: Params, hyper: dict[str, Tensor], state: Any
) -> float:
    """``||r(params, hyper)||``, the fixed-point residual's norm (no graph kept; ``state``'s buffers)."""
    with torch.enable_grad():
        w = {n: p.detach().requires_grad_() for n, p in params.items()}
        r = residual(w, hyper, state, create_graph=False).values()
    return float(torch.sqrt(sum((x.detach() ** 2).sum() for x in r)))


def _or_zero(g: Tensor | None, like: Tensor) -> Tensor:
    return g if g is not None else torch.zeros_like(like)


def _check_solver(cls: str, solver: Any, fixed_point: bool) -> None:
    known = [*solvers.SOLVERS, *(("fixed_point",) if fixed_point else ())]
    if not callable(solver) and solver not in known:
        raise FieldError(cls, "solver", solver, f"is not a solver: use one of {', '.join(known)} or a callable "
                         "solve(matvec, b, **options) -> (x, SolveInfo)")


def _check_positive(cls: str, method: Any, fields: tuple[str, ...], strict: bool = True) -> None:
    """Each of ``fields`` of ``method`` is ``None`` (where allowed) or > 0 (``strict``; else >= 0)."""
    for name in fields:
        value = getattr(method, name)
        if value is not None and not (value > 0 if strict else value >= 0):
            raise FieldError(cls, name, value, "must be > 0" if strict else "must be >= 0")


@dataclass(eq=False)
class HOAG(Method):
    """Pedregosa (2016)'s implicit hypergradient with a shrinking tolerance and warm starts: pass the
    same object as ``method`` at every outer step.

    Call ``t`` solves the inner problem to ``tol_t = max(tol0 * decrease**t, min_tol)`` (in rounds of
    ``steps``, at most ``max_inner_rounds``) starting from call ``t - 1``'s inner solution, and the
    linear system to ``tol_t`` (at most ``maxiter`` iterations) from its previous solution. A stateful
    method: one object per outer loop; ``t``, ``params`` and ``adjoint`` are its state
    (:meth:`state_dict`, which the runner checkpoints, so ``--resume`` continues the schedule and
    the warm starts exactly).

    Args:
        solver: as for :class:`Implicit` (``"cg"``, ``"neumann"``, ``"dense"`` or a callable).
        tol0: the first call's tolerance.
        decrease: the tolerance's factor per call.
        min_tol: the tolerance's floor.
        damping: as for :class:`Implicit`.
        max_inner_rounds: cap of each call's inner run, in rounds of ``steps``.
        maxiter: cap of each call's linear solve.

    Example::

        hoag = HOAG(min_tol=1e-6)
        for t in range(T):
            res = metaopt.hypergradient(objective, optimizer, hyper, steps, method=hoag)
            hyper = ...  # a meta-step along res.grads
    """

    solver: str | Solver = "cg"
    tol0: float = 1e-3
    decrease: float = 0.9
    min_tol: float = 1e-12
    damping: float = 0.0
    max_inner_rounds: int = 100
    maxiter: int = 1000
    t: int = field(default=0, metadata={"state": True})
    params: Params | None = field(default=None, metadata={"state": True})
    adjoint: Tensor | None = field(default=None, metadata={"state": True})
    name: ClassVar[str] = "hoag"
    supports_autocast: ClassVar[bool] = True
    reference: ClassVar[str] = "stationary"
    supports_create_graph: ClassVar[bool] = True

    @classmethod
    def configure(cls, steps: int, settings: Settings) -> HOAG:
        kw: dict[str, Any] = {}
        for key, name in (("hoag_tol0", "tol0"), ("hoag_decrease", "decrease"), ("tol", "min_tol"),
                          ("max_rounds", "max_inner_rounds"), ("solve_iters", "maxiter")):
            if getattr(settings, key) is not None:
                kw[name] = getattr(settings, key)
        return cls(**kw)

    def validate(self, steps: int) -> None:
        _check_solver("HOAG", self.solver, fixed_point=False)
        _check_positive("HOAG", self, ("tol0", "maxiter", "max_inner_rounds"))
        _check_positive("HOAG", self, ("min_tol",), strict=False)
        if not 0 < self.decrease <= 1:
            raise FieldError("HOAG", "decrease", self.decrease, "must be in (0, 1]")
        if self.damping < 0:
            raise FieldError("HOAG", "damping", self.damping, "must be >= 0")
        self.step_method().validate(steps)

    def state_dict(self) -> dict[str, Any]:
        """``{"t": calls so far, "params": the last inner solution or None, "adjoint": the last
        linear solve's solution [n_params] or None}``."""
        return {"t": self.t, "params": self.params, "adjoint": self.adjoint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.t, self.params, self.adjoint = state["t"], state["params"], state["adjoint"]

    def step_method(self) -> Implicit:
        """The :class:`Implicit` method of the next call."""
        tol = max(self.tol0 * self.decrease**self.t, self.min_tol)
        return Implicit(self.solver, tol=tol, inner_tol=tol, damping=self.damping, warm_start=self.adjoint,
                        max_inner_rounds=self.max_inner_rounds, maxiter=self.maxiter)

    def start_params(self) -> Params | None:
        return self.params

    def skip_reason(self, optimizer: Any, n_hyper: int) -> str | None:
        return needs_residual(optimizer, self.label, self.solver == "fixed_point")

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        why = self.skip_reason(problem.optimizer, 0)
        if why is not None:
            raise ValueError(why)
        step = self.step_method()
        sweep = implicit(problem, params0, step, outer)
        warn_unconverged(self.name, sweep, step.inner_tol, problem.steps)
        self.params, self.adjoint = sweep.params, sweep.extras["adjoint"]
        self.t += 1
        return sweep

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        return step_bytes + state_bytes


def custom_root(
    optimality: Any, solver: str | Solver = "cg", tol: float = 1e-10, maxiter: int = 1000, damping: float = 0.0,
    alpha: float | None = None,
) -> Any:
    """Make any inner solver implicitly differentiable (the jaxopt ``custom_root`` idea).

    ``optimality(params, hyper) -> dict`` is zero at the solution (usually the inner gradient, e.g.
    ``torch.func.grad(inner_loss)``; for the point where a metaopt optimizer stops, its fixed-point
    residual ``opt.residual(grad, params, step=k, **hparams)``, which adds the weight decay).
    Decorate ``solve(hyper, *args) -> params``: the solver runs
    without autograd (any algorithm, even a closed form or a call into another library), and its
    output gets the implicit-function-theorem gradient
    ``d params / d hyper = -(d_w optimality)^-1 d_h optimality``, applied to incoming cotangents with
    the linear solver ``solver`` on ``(d_w optimality)^T`` products (CG assumes it symmetric
    positive definite, as it is for the gradient of a loss at a strict minimum).

    Examples:
        Ridge regression solved in closed form without autograd, differentiated by the implicit
        function theorem, against autograd through the same closed form:

        >>> import torch
        >>> from metaopt.hypergrad import custom_root
        >>> g = torch.Generator().manual_seed(0)
        >>> X, y = torch.randn(30, 4, generator=g).double(), torch.randn(30, generator=g).double()
        >>> def inner(w, h):  # mean squared error + exp(log_lam) |w|^2
        ...     return ((X @ w["w"] - y) ** 2).mean() + h["log_lam"].exp() * (w["w"] ** 2).sum()
        >>> def normal_equations(log_lam):
        ...     A = 2 * X.T @ X / 30 + 2 * log_lam.exp() * torch.eye(4, dtype=torch.float64)
        ...     return torch.linalg.solve(A, 2 * X.T @ y / 30)
        >>> @custom_root(lambda w, h: torch.func.grad(inner)(w, h))
        ... def ridge(h):  # runs under no_grad: any solver will do
        ...     return {"w": normal_equations(h["log_lam"])}
        >>> log_lam = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
        >>> w = ridge({"log_lam": log_lam})["w"]
        >>> w.shape, w.requires_grad
        (torch.Size([4]), True)
        >>> (ifT,) = torch.autograd.grad(w.sum(), log_lam)
        >>> (direct,) = torch.autograd.grad(normal_equations(log_lam).sum(), log_lam)
        >>> torch.allclose(ifT, direct, rtol=1e-9), round(ifT.item(), 4)
        (True, 0.0301)

    Args:
        optimality: ``(params, hyper) -> {name: tensor}`` shaped like ``params``, zero at a solution.
        solver: ``"cg"``, ``"neumann"``, ``"dense"`` or a callable :data:`Solver`.
        tol: the linear solve's relative tolerance.
        maxiter: its iteration cap.
        damping: solve ``(A + damping I) v = b``.
        alpha: Neumann's step size (``None``: estimated by power iteration).

    Returns:
        A decorator: ``solve(hyper, *args) -> params`` becomes differentiable in ``hyper``.
    """
    if not callable(solver) and solver not in solvers.SOLVERS:
        raise ValueError(f"custom_root: unknown solver {solver!r}; use one of {sorted(solvers.SOLVERS)} or a callable "
                         "solve(matvec, b, **options) -> (x, SolveInfo)")

    def decorator(solve: Any) -> Any:
        def wrapped(hyper: dict[str, Tensor], *args: Any, **kwargs: Any) -> dict[str, Tensor]:
            with torch.no_grad():
                w_star = solve({k: v.detach() for k, v in hyper.items()}, *args, **kwargs)
            return attach_root(optimality, w_star, hyper, solver=solver, tol=tol, maxiter=maxiter, damping=damping,
                               alpha=alpha)

        wrapped.__doc__ = solve.__doc__
        wrapped.__name__ = getattr(solve, "__name__", "solve")
        return wrapped

    return decorator


def attach_root(
    optimality: Any, solution: dict[str, Tensor], hyper: dict[str, Tensor], *, solver: str | Solver = "cg",
    tol: float = 1e-10, maxiter: int = 1000, damping: float = 0.0, alpha: float | None = None,
) -> dict[str, Tensor]:
    """``solution`` (a root of ``optimality(params, hyper)``, found by any means) as a function of
    ``hyper`` whose derivative is the implicit function theorem's (what :func:`custom_root` applies
    to its solver's output). The values are ``solution``'s; differentiable once (the backward's own
    solve is not recorded)."""
    names, pnames = list(hyper), list(solution)
    outs = _RootFn.apply(pnames, names, optimality, (solver, tol, maxiter, damping, alpha),
                         *[solution[k].detach() for k in pnames], *[hyper[k] for k in names])
    return dict(zip(pnames, outs))


class _RootFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pnames: list[str], names: list[str], optimality: Any, opts: tuple, *tensors: Tensor):
        ctx.pnames, ctx.names, ctx.optimality, ctx.opts = pnames, names, optimality, opts
        ctx.save_for_backward(*tensors)
        return tuple(t.clone() for t in tensors[: len(pnames)])

    @staticmethod
    def backward(ctx: Any, *cots: Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        n_p = len(ctx.pnames)
        solver, tol, maxiter, damping, alpha = ctx.opts
        with torch.enable_grad():
            w = {k: t.detach().requires_grad_() for k, t in zip(ctx.pnames, saved[:n_p])}
            h = {k: t.detach().requires_grad_() for k, t in zip(ctx.names, saved[n_p:])}
            G = ctx.optimality(w, h)
            g_flat = torch.cat([G[k].reshape(-1) for k in ctx.pnames])
            b = torch.cat([(c if c is not None else torch.zeros_like(t)).reshape(-1) for c, t in zip(cots, saved)])

            def matvec(v: Tensor) -> Tensor:  # (d_w G)^T v
                out = torch.autograd.grad(g_flat, list(w.values()), v, retain_graph=True, allow_unused=True)
                return torch.cat([_or_zero(o, p).reshape(-1) for o, p in zip(out, w.values())]).detach()

            kw: dict[str, Any] = {"damping": damping}
            if solver != "dense":
                kw |= {"tol": tol, "maxiter": maxiter}
            if solver == "neumann":
                kw["alpha"] = alpha
            v, _ = (solver if callable(solver) else solvers.SOLVERS[solver])(matvec, b, **kw)
            grads = torch.autograd.grad(g_flat, list(h.values()), -v, allow_unused=True)
        return (None, None, None, None, *([None] * n_p), *[_or_zero(g, t) for g, t in zip(grads, saved[n_p:])])
