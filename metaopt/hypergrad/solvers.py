"""Linear solvers for implicit differentiation behind one signature: ``solve(matvec, b, ...) -> (x, info)``.

``matvec`` applies a symmetric matrix ``A`` (a Hessian, via Hessian-vector products: never
materialised) to a flat vector; ``b`` is a flat vector. Tolerances are relative: stop when
``||A x - b|| <= tol * ||b||``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


class NonPositiveCurvature(ValueError):
    """CG met a direction with ``p^T A p <= 0``: the Hessian is not positive definite there."""


@dataclass
class SolveInfo:
    iterations: int
    matvecs: int
    residual: float  # final ||A x - b|| / ||b||
    converged: bool


def cg(
    matvec: MatVec, b: Tensor, x0: Tensor | None = None, tol: float = 1e-10, maxiter: int = 1000,
    damping: float = 0.0,
) -> tuple[Tensor, SolveInfo]:
    """Conjugate gradients on ``(A + damping I) x = b``; raises :class:`NonPositiveCurvature` (suggesting
    ``damping``) instead of returning garbage when ``A`` is indefinite along a search direction."""
    calls = [0]

    def A(v: Tensor) -> Tensor:
        calls[0] += 1
        out = matvec(v)
        return out + damping * v if damping else out

    bnorm = float(b.norm()) or 1.0
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - A(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = r @ r
    it = 0
    while it < maxiter and float(rr.sqrt()) > tol * bnorm:
        Ap = A(p)
        curvature = p @ Ap
        if curvature <= 0:
            raise NonPositiveCurvature(
                f"CG: non-positive curvature p^T A p = {float(curvature):.3g} at iteration {it}; the inner "
                "problem is not at a strict local minimum: train the inner problem longer or set damping > 0"
            )
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
        it += 1
    res = float(rr.sqrt()) / bnorm
    return x, SolveInfo(it, calls[0], res, res <= tol)


def power_iteration(matvec: MatVec, like: Tensor, iters: int = 50, seed: int = 0) -> tuple[float, int]:
    """Largest eigenvalue magnitude of ``A`` by power iteration; returns ``(lambda_max, matvecs)``."""
    g = torch.Generator(device=like.device).manual_seed(seed)
    v = torch.randn(like.shape, generator=g, dtype=like.dtype, device=like.device)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        lam = float(w.norm())
        if lam == 0.0:
            return 0.0, iters
        v = w / lam
    return lam, iters


def neumann(
    matvec: MatVec, b: Tensor, x0: Tensor | None = None, tol: float = 1e-10, maxiter: int = 1000,
    alpha: float | None = None, damping: float = 0.0,
) -> tuple[Tensor, SolveInfo]:
    """Neumann series ``x = alpha * sum_j (I - alpha A)^j b`` (Lorraine et al. 2020), i.e. Richardson
    iteration ``x <- x + alpha (b - A x)``. Converges for ``0 < alpha < 2 / lambda_max``; by default
    ``alpha = 1 / lambda_max`` from power iteration (its matvecs are counted)."""
    calls = [0]

    def A(v: Tensor) -> Tensor:
        calls[0] += 1
        out = matvec(v)
        return out + damping * v if damping else out

    if alpha is None:
        lam, used = power_iteration(A, b)
        if lam <= 0:
            raise ValueError("neumann: the matrix is zero along the power-iteration direction; give alpha")
        alpha = 1.0 / lam
    bnorm = float(b.norm()) or 1.0
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - A(x) if x0 is not None else b.clone()
    it = 0
    while it < maxiter and float(r.norm()) > tol * bnorm:
        x = x + alpha * r
        r = b - A(x)
        it += 1
        if not torch.isfinite(r).all():
            raise ValueError(f"neumann: diverged at iteration {it}; alpha = {alpha:.3g} must be below 2 / lambda_max")
    res = float(r.norm()) / bnorm
    return x, SolveInfo(it, calls[0], res, res <= tol)


def dense(matvec: MatVec, b: Tensor, damping: float = 0.0, **_: object) -> tuple[Tensor, SolveInfo]:
    """Materialise ``A`` column by column (n matvecs) and solve exactly: an oracle for tiny problems."""
    n = b.numel()
    eye = torch.eye(n, dtype=b.dtype, device=b.device)
    A = torch.stack([matvec(eye[i]) for i in range(n)], dim=1)
    if damping:
        A = A + damping * eye
    x = torch.linalg.solve(A, b)
    res = float((A @ x - b).norm() / (b.norm() or 1.0))
    return x, SolveInfo(1, n, res, True)


SOLVERS = {"cg": cg, "neumann": neumann, "dense": dense}
