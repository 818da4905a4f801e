"""``check``: is my hypergradient right? Every applicable method against central finite differences.

For the unrolled methods the reference is F(h) = outer loss after ``steps`` inner steps; for the
implicit ones it is F at the re-solved inner problem (trained until ``||grad_w L|| <= 1e-12``). Finite
differences are taken along ``directions`` random unit directions (five-point stencil, float64), so
the cost does not grow with the number of hyperparameters.

Every run uses a generator seeded with ``seed``, so random draws inside the losses (dropout) are the
same in the finite differences as in the methods. Module buffers are constants of every method but
not of the finite differences: where the outer loss reads them (BatchNorm in eval mode) the rows show
that difference (docs/hypergrad.md, "Randomness and module buffers"); methods that cannot carry
buffers (reversible, drmad) come back as rows with their refusal.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..objective import MetaObjective
from ..optim.base import Optimizer
from .api import hypergradient
from .implicit import Implicit
from .methods import Method, Settings, registered
from .unroll import Full


def default_methods(optimizer: Optimizer, hyper: Mapping[str, Tensor], steps: int) -> dict[str, Method]:
    """Every registered method that ``check`` runs by default (``in_check``) and that applies to this
    optimizer and number of hyperparameters, by label: truncated to ``K = steps // 4``, the implicit
    ones solved to 1e-12 (Neumann to 1e-10 in at most 10000 terms)."""
    n_hyper = sum(h.numel() for h in hyper.values())
    out: dict[str, Method] = {}
    for name, entry in registered().items():
        if not entry.in_check:
            continue
        settings = Settings(truncate=max(1, steps // 4), chunk_size=64, tol=1e-12)
        if name == "neumann":
            settings = Settings(tol=1e-10, solve_iters=10000)
        method = entry.make(steps, settings)
        if isinstance(method, Implicit):
            method = dataclasses.replace(method, inner_tol=1e-12)
        if method.skip_reason(optimizer, n_hyper) is None:
            out[method.label] = method
    return out


def check(
    objective: MetaObjective,
    optimizer: Optimizer,
    hyper: Mapping[str, Tensor],
    steps: int,
    methods: Mapping[str, Any] | None = None,
    directions: int = 3,
    eps: float = 1e-4,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows ``{method, rel_error, cosine, seconds, peak_bytes}`` (plus ``error`` when a method failed).

    ``rel_error``: worst relative error of the directional derivative against central differences;
    ``cosine``: to the exact hypergradient of the same kind (the full unroll, or implicit CG).
    """
    hyper = {k: v.detach().to(torch.float64) for k, v in hyper.items()}
    methods = dict(methods or default_methods(optimizer, hyper, steps))
    g = torch.Generator().manual_seed(seed + 1)
    dirs = []
    for _ in range(directions):
        v = {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in hyper.items()}
        norm = math.sqrt(sum(float((x**2).sum()) for x in v.values()))
        dirs.append({k: x / norm for k, x in v.items()})

    def run(h: Mapping[str, Tensor], method: Any) -> Any:
        return hypergradient(objective, optimizer, h, steps, method=method,
                             generator=torch.Generator().manual_seed(seed))

    def fd(v: Mapping[str, Tensor], reference: Any) -> float:
        def f(t: float) -> float:
            return float(run({k: hyper[k] + t * v[k] for k in hyper}, reference).loss)

        return (8 * (f(eps) - f(-eps)) - (f(2 * eps) - f(-2 * eps))) / (12 * eps)

    unrolled_fd = [fd(v, Full()) for v in dirs]
    implicit_fd: list[float] | str | None = None  # a string: why the implicit reference does not exist
    exact: dict[str, Tensor] = {}
    rows = []

    def failed(name: str, why: str) -> dict[str, Any]:
        return {"method": name, "rel_error": math.nan, "cosine": math.nan, "seconds": math.nan, "peak_bytes": 0,
                "error": why}

    for name, method in methods.items():
        is_implicit = method.reference == "stationary"
        if is_implicit and implicit_fd is None:
            try:
                implicit_fd = [fd(v, Implicit("cg", tol=1e-12, inner_tol=1e-12)) for v in dirs]
            except (ValueError, RuntimeError) as e:
                implicit_fd = "not applicable: " + str(e).splitlines()[0]
        if is_implicit and isinstance(implicit_fd, str):
            rows.append(failed(name, implicit_fd))
            continue
        t0 = time.perf_counter()
        try:
            res = run(hyper, method)
        except (ValueError, RuntimeError) as e:
            rows.append(failed(name, str(e).splitlines()[0]))
            continue
        seconds = time.perf_counter() - t0
        ref = implicit_fd if is_implicit and isinstance(implicit_fd, list) else unrolled_fd
        rel = max(
            abs(sum(float((res.grads[k] * v[k]).sum()) for k in hyper) - r) / max(abs(r), 1e-300)
            for v, r in zip(dirs, ref)
        )
        flat = torch.cat([res.grads[k].reshape(-1) for k in hyper])
        key = "implicit" if is_implicit else "unrolled"
        exact.setdefault(key, flat)
        cos = float(torch.nn.functional.cosine_similarity(flat, exact[key], dim=0))
        rows.append({"method": name, "rel_error": rel, "cosine": cos, "seconds": seconds,
                     "peak_bytes": res.peak_bytes})
    return rows
