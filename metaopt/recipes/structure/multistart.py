"""The multi-start evidence estimate (Bakhteev 2016; Duvenaud, Maclaurin & Adams 2016, "early
stopping as nonparametric variational inference").

``k`` gradient-descent runs on ``-log p(y, w)`` from ``k`` samples of an initial Gaussian
``q_0 = N(0, s0^2 I)`` are ``k`` samples of the distribution ``q_t`` that ``t`` steps map ``q_0`` to.
One step ``w <- w - beta grad`` changes its entropy by ``E log|det(I - beta H(w))|``, bounded below
by ``-beta Tr H - beta^2 Tr(H^2)`` (``log(1 - x) >= -x - x^2`` for every eigenvalue ``x = beta
lambda <= 0.68``: keep ``beta`` below ``0.68 / lambda_max``) and estimated per run with Hutchinson
probes (``v^T H v`` and ``||H v||^2`` for Rademacher ``v``), so

    ELBO_t  ~=  mean_r log p(y, w_r^t)  +  S(q_0)  +  sum_{s < t} mean_r dS_r^s

is, in expectation, a lower bound on the log evidence that needs no posterior family, only
Hessian-vector products. The ``k`` runs and the probes are one batched program (``torch.func.vmap``
over ``jvp`` of ``grad``). The slides write the entropy change as ``beta Tr H - beta^2 Tr H^2``, the
entropy *lost*: the same bound with the opposite sign. (The second-order Taylor term
``-beta^2 Tr H^2 / 2`` would overestimate the entropy where the loss is convex.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap


@dataclass
class MultiStart:
    """Per step ``t = 0 .. steps``: the ELBO estimate, ``mean_r log p(y, w_r)`` and the entropy."""

    elbo: list[float]
    log_joint: list[float]
    entropy: list[float]
    final: Tensor  # the runs' weights ``[k, d]`` after the last step


def hutchinson_traces(log_joint: Callable[[Tensor], Tensor], w: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    """``(Tr H, Tr H^2)`` of ``H = -Hessian of log_joint`` at every row of ``w [k, d]``, from
    ``probes [p, d]`` Rademacher vectors: ``mean_v v^T H v`` and ``mean_v ||H v||^2``, each ``[k]``."""
    g = grad(lambda x: -log_joint(x))

    def hvp(x: Tensor, v: Tensor) -> Tensor:
        return jvp(g, (x,), (v,))[1]

    Hv = vmap(lambda x: vmap(lambda v: hvp(x, v))(probes))(w)  # [k, p, d]
    return (Hv * probes).sum(-1).mean(-1), (Hv**2).sum(-1).mean(-1)


def multistart_elbo(log_joint: Callable[[Tensor], Tensor], d: int, k: int = 16, steps: int = 100, lr: float = 1e-3,
                    init_std: float = 1.0, probes: int = 8, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> MultiStart:
    """Run the estimate for ``log_joint(w [d]) -> scalar`` (``log p(y | w) + log p(w)``)."""
    g = generator or torch.Generator().manual_seed(0)
    w = (torch.randn(k, d, generator=g, dtype=dtype) * init_std).to(device)
    entropy = 0.5 * d * (1 + math.log(2 * math.pi)) + d * math.log(init_std)  # S(N(0, s0^2 I))
    lj = vmap(log_joint)
    step_grad = vmap(grad(log_joint))
    out = MultiStart([], [], [], w)
    for t in range(steps + 1):
        mean_lj = float(lj(w).mean())
        out.log_joint.append(mean_lj)
        out.entropy.append(entropy)
        out.elbo.append(mean_lj + entropy)
        if t == steps:
            break
        v = (torch.randint(0, 2, (probes, d), generator=g) * 2 - 1).to(device, dtype)
        tr, tr2 = hutchinson_traces(log_joint, w, v)
        entropy += float((-lr * tr - lr**2 * tr2).mean())
        w = w + lr * step_grad(w)
    out.final = w
    return out
