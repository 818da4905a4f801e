"""The one entry point for every hypergradient method."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ..objective import MetaObjective
from ..optim.base import Optimizer
from .drmad import DrMAD, drmad
from .forward import forward
from .implicit import Implicit, converge, implicit
from .methods import Checkpointed, Forward, Method, Truncated, as_method
from .result import HypergradResult, NonFiniteError
from .reversible import Reversible, reversible
from .unroll import Meter, Problem, reverse


def hypergradient(
    objective: MetaObjective,
    optimizer: Optimizer,
    hyper: Mapping[str, Tensor],
    steps: int,
    method: Method | str = "full",
    generator: torch.Generator | None = None,
    check_finite: bool = True,
    exact_memory: bool = False,
    compile: bool = False,
    params0: Mapping[str, Tensor] | None = None,
) -> HypergradResult:
    """Outer loss ``F(h)`` after ``steps`` inner optimizer steps and its hypergradient ``dF/dh``.

    Args:
        objective: the bilevel problem (:class:`metaopt.MetaObjective`).
        optimizer: the differentiable inner optimizer (:mod:`metaopt.optim`); its hyperparameters
            come from its defaults and ``objective.hparams(hyper)``.
        hyper: ``{name: tensor}``, the hyperparameters ``h`` (floating point); not modified.
        steps: number of inner steps ``n >= 1``.
        method: ``Full()``, ``Truncated(k)``, ``Checkpointed(every)``, ``Forward(chunk_size)``,
            ``Reversible()``, ``DrMAD()``, ``Implicit(solver)`` — or a name: ``"full"``,
            ``"checkpointed"``, ``"forward"``, ``"reversible"``, ``"drmad"``, ``"implicit"``
            (see docs/choosing-a-method.md).
        generator: random source for ``init_params`` and the batches (a fresh one from the global
            RNG if ``None``); pass a seeded one for repeatable results.
        check_finite: raise :class:`NonFiniteError` for a NaN/inf outer loss or hypergradient.
        exact_memory: meter the tensors saved by every recorded step (slower: a Python hook per
            saved tensor); by default the first step of each recorded segment is metered and scaled
            by the segment's length, which is exact when the inner steps are alike.
        compile: run each inner step through ``torch.compile`` (reverse-mode methods; the first call
            compiles for seconds, later ones are several times faster on small models). The step
            index then reaches ``inner_loss`` and ``hparams`` as a 0-d int64 tensor: select per-step
            values with :func:`metaopt.optim.schedule.at_step`, and keep Python ``if`` off ``k``.
        params0: start the inner run here instead of ``objective.init_params`` (a warm start, e.g.
            HOAG's previous inner solution); then nothing flows back through the initialisation.

    Returns:
        :class:`HypergradResult` with ``grads`` shaped like ``hyper``.
    """
    method = as_method(method)
    _validate(hyper, steps, method)
    if compile and isinstance(method, (Forward, Implicit, Reversible)):
        raise ValueError("compile=True applies to the unrolled reverse-mode methods (full, truncated, checkpointed)")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    t0 = time.perf_counter()
    h = {k: v.detach().requires_grad_() for k, v in hyper.items()}
    gen_state = generator.get_state()
    fixed_start = params0 is not None
    if params0 is not None:
        params0 = {k: v.detach() for k, v in params0.items()}
    else:
        with torch.enable_grad():
            params0 = objective.init_params(h, generator)
    _validate_params(params0)
    batches = [objective.inner_batch(k, generator) for k in range(steps)]
    outer = objective.outer_batch(generator)

    extras: dict = {}
    if isinstance(method, DrMAD):
        meter = Meter()
        problem = Problem(objective, optimizer, h, steps, batches, meter, exact_memory, compile, check_finite)
        loss, final, grads, adjoint = drmad(problem, params0, outer)
        _through_init(params0, adjoint, h, grads)
        peak = meter.peak
    elif isinstance(method, Reversible):
        meter = Meter()
        problem = Problem(objective, optimizer, h, steps, batches, meter, exact_memory, False, check_finite)
        loss, final, grads, extras, peak, adjoint = reversible(problem, params0, method, outer)
        _through_init(params0, adjoint, h, grads)
    elif isinstance(method, Implicit):
        meter = Meter()
        problem = Problem(objective, optimizer, h, steps, batches, meter, exact_memory, compile, check_finite)
        loss, final, grads, extras = implicit(problem, params0, method, outer)
        peak = meter.peak
    elif isinstance(method, Forward):
        loss, final, grads, peak = forward(
            objective, optimizer, h, steps, batches, outer, gen_state, generator.device, method, check_finite,
            params0 if fixed_start else None,
        )
    else:
        meter = Meter()
        problem = Problem(objective, optimizer, h, steps, batches, meter, exact_memory, compile, check_finite)
        loss, final, grads, adjoint = reverse(problem, params0, method, outer)
        if adjoint is not None:
            _through_init(params0, adjoint, h, grads)
        peak = meter.peak
    grads = {k: g.detach() for k, g in grads.items()}
    if check_finite:
        bad = [k for k, g in grads.items() if not torch.isfinite(g).all()]
        if bad:
            raise NonFiniteError(
                f"hypergradient of {bad} is not finite (outer loss {loss.item():.6g}); for Adam keep "
                "eps_root > 0, lower the inner learning rates, or clip the hyperparameters"
            )
    return HypergradResult(
        loss=loss,
        grads=grads,
        params=final,
        method=method.name,
        steps=steps,
        peak_bytes=int(peak),
        seconds=time.perf_counter() - t0,
        extras=extras,
    )


def _through_init(params0: Mapping[str, Tensor], adjoint: list[Tensor], h: Mapping[str, Tensor], grads: dict) -> None:
    """Add ``(dparams0/dh)^T adjoint`` for an ``init_params`` that depends on ``h`` (meta-learned init)."""
    # the adjoint is flattened (params, state): its first len(params0) entries belong to the params
    pairs = [(p, a) for p, a in zip(params0.values(), adjoint[: len(params0)]) if p.requires_grad]
    if not pairs:
        return
    outs, cots = zip(*pairs)
    names = list(h)
    g = torch.autograd.grad(outs, [h[n] for n in names], cots, allow_unused=True)
    for n, gi in zip(names, g):
        if gi is not None:
            grads[n] = grads[n] + gi


def _validate(hyper: Mapping[str, Tensor], steps: int, method: Method) -> None:
    if not isinstance(hyper, Mapping) or not hyper:
        raise TypeError("hyper must be a non-empty dict {name: tensor} of hyperparameters")
    for k, v in hyper.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            kind = v.dtype if isinstance(v, Tensor) else type(v).__name__
            raise TypeError(f"hyper[{k!r}] must be a floating-point tensor, got {kind}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int (the number of inner steps), got {steps!r}")
    if isinstance(method, Truncated) and not (isinstance(method.k, int) and 1 <= method.k <= steps):
        raise ValueError(f"Truncated(k={method.k!r}) needs 1 <= k <= steps = {steps}")
    if isinstance(method, Checkpointed) and method.every is not None and (
        not isinstance(method.every, int) or method.every < 1
    ):
        raise ValueError(f"Checkpointed(every={method.every!r}) needs a positive int (or None for sqrt(steps))")


def _validate_params(params0: object) -> None:
    if not isinstance(params0, Mapping) or not params0 or not all(isinstance(v, Tensor) for v in params0.values()):
        raise TypeError("init_params must return a non-empty dict {name: tensor}")


def train(
    objective: MetaObjective,
    optimizer: Optimizer,
    hyper: Mapping[str, Tensor],
    steps: int,
    generator: torch.Generator | None = None,
    *,
    every: int = 0,
    callback: Callable[[int, dict[str, Tensor]], None] | None = None,
    compile: bool = False,
    params0: Mapping[str, Tensor] | None = None,
    tol: float | None = None,
    max_rounds: int = 100,
) -> dict[str, Tensor]:
    """The inner run alone: ``params[steps]`` trained with ``hyper`` held fixed, nothing recorded
    (for evaluating hyperparameters). Draws ``init_params`` and the batches like :func:`hypergradient`.

    With ``callback`` and ``every > 0``, ``callback(k, params[k])`` is called at ``k = 0``, every
    ``every`` steps and at ``k = steps`` (learning curves). ``compile=True`` uses the compiled step.
    ``params0`` starts the run there instead of ``objective.init_params`` (e.g. to continue training).
    With ``tol``, training goes on in further rounds of ``steps`` (the same batches: a deterministic
    problem, as for :class:`Implicit`'s ``inner_tol``; the step index restarts at 0 in each round)
    until ``||grad_w inner_loss|| <= tol``, at most ``max_rounds`` rounds in all (``callback`` sees
    the first round only).
    """
    _validate(hyper, steps, as_method("full"))
    if every < 0:
        raise ValueError(f"train: every must be >= 0, got {every}")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    h = {k: v.detach() for k, v in hyper.items()}
    params0 = objective.init_params(h, generator) if params0 is None else {k: v.detach() for k, v in params0.items()}
    _validate_params(params0)
    batches = [objective.inner_batch(k, generator) for k in range(steps)]
    problem = Problem(objective, optimizer, h, steps, batches, Meter(), compile=compile)
    params, state = {k: p.detach() for k, p in params0.items()}, optimizer.init(params0)
    stride = every if (callback is not None and every > 0) else steps
    if callback is not None:
        callback(0, params)
    for k0 in range(0, steps, stride):
        k1 = min(k0 + stride, steps)
        params, state = problem.advance(k0, k1, params, state)
        if callback is not None:
            callback(k1, params)
    if tol is not None:
        params, state, _, _ = converge(problem, params, state, tol, max_rounds)
    return params
