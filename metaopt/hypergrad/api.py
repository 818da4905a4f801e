"""The one entry point for every hypergradient method."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ..objective import MetaObjective
from ..optim.base import Optimizer, Params
from . import inner
from .budget import within
from .implicit import converge
from .inner import split_buffers
from .methods import Method, as_method, names, registered
from .problem import Problem, check_like, check_opt_state
from .result import HypergradResult, InnerState, NonFiniteError
from .unroll import Full


def hypergradient(
    objective: MetaObjective,
    optimizer: Optimizer,
    hyper: Mapping[str, Tensor],
    steps: int,
    *,
    method: Method | str = "full",
    generator: torch.Generator | None = None,
    check_finite: bool = True,
    exact_memory: bool = False,
    compile: bool = False,
    params0: Mapping[str, Tensor] | None = None,
    create_graph: bool = False,
    autocast: torch.dtype | None = None,
    start: InnerState | None = None,
    compile_block: int | None = None,
) -> HypergradResult:
    """Outer loss ``F(h)`` after ``steps`` inner optimizer steps and its hypergradient ``dF/dh``.

    Validates, builds the :class:`~metaopt.hypergrad.problem.Problem` (the initial params and every
    batch drawn once, up front), and runs ``method`` on it.

    Examples:
        Ridge regression with a learnable penalty ``exp(log_lam)``, 50 steps of SGD; the full
        unroll and checkpointing agree to round-off, and the result is shaped like ``hyper``.

        >>> import torch, metaopt
        >>> from metaopt import optim
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(20, 3, generator=g, dtype=torch.float64)
        >>> y = X @ torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64) + torch.randn(20, generator=g).double()
        >>> class Ridge(metaopt.MetaObjective):
        ...     def init_params(self, hyper, generator):
        ...         return {"w": torch.zeros(3, dtype=torch.float64)}
        ...     def inner_loss(self, params, hyper, k, batch):  # the first 10 points train...
        ...         r = X[:10] @ params["w"] - y[:10]
        ...         return (r**2).mean() + hyper["log_lam"].exp() * (params["w"] ** 2).sum()
        ...     def outer_loss(self, params, hyper, batch):  # ...the other 10 validate
        ...         return ((X[10:] @ params["w"] - y[10:]) ** 2).mean()
        >>> hyper = {"log_lam": torch.tensor(-1.0, dtype=torch.float64)}
        >>> res = metaopt.hypergradient(Ridge(), optim.sgd(lr=0.1), hyper, 50)
        >>> res.method, res.grads["log_lam"].shape, round(res.loss.item(), 4), round(res.grads["log_lam"].item(), 4)
        ('full', torch.Size([]), 3.2641, 0.4063)
        >>> ck = metaopt.hypergradient(Ridge(), optim.sgd(lr=0.1), hyper, 50, method="checkpointed")
        >>> torch.allclose(ck.grads["log_lam"], res.grads["log_lam"], rtol=1e-12), ck.peak_bytes < res.peak_bytes
        (True, True)

    Args:
        objective: the bilevel problem (:class:`metaopt.MetaObjective`).
        optimizer: the differentiable inner optimizer (:mod:`metaopt.optim`); its hyperparameters
            come from its defaults and ``objective.hparams(hyper)``.
        hyper: ``{name: tensor}``, the hyperparameters ``h`` (floating point, any shapes, e.g.
            ``x [S, P, d]``, ``lr [n]``), in the inner params' dtype (a ``TypeError`` names a
            hyperparameter that is not); not modified.
        steps: number of inner steps ``n >= 1``.
        method: a :class:`~metaopt.hypergrad.Method` (``Full()``, ``Truncated(k)``,
            ``RandomTruncated(window)``, ``Checkpointed(every)``, ``Recursive(base)``,
            ``Forward(chunk_size)``, ``Reversible()``, ``DrMAD()``, ``Implicit(solver)``, ``HOAG()``)
            or a registered name (:func:`metaopt.hypergrad.names`; see docs/choosing-a-method.md).
            ``Full(chunk=c)`` runs an ensemble's members ``c`` at a time, ``Full(max_memory=B)``
            the fastest exact policy whose predicted trajectory fits ``B`` bytes
            (:mod:`metaopt.hypergrad.budget`). Keyword-only, like every argument after it.
        generator: random source for ``init_params`` and the batches (a fresh one from the global
            RNG if ``None``); pass a seeded one for repeatable results. Random draws inside the
            losses (dropout, ``torch.rand*``) are seeded per inner step from a hash of its state
            just before the inner batches (it is not advanced further; ``start.seed`` when given),
            so every method and every recomputation sees the same draws (docs/hypergrad.md,
            "Randomness and module buffers"). It is consumed in this order: ``init_params`` (not
            with ``params0``/``start``), ``inner_batch(k)`` for each step, ``outer_batch``,
            ``init_buffers``.
        check_finite: raise :class:`NonFiniteError` for a NaN/inf outer loss or hypergradient.
        exact_memory: meter the tensors saved by every recorded step (slower: a Python hook per
            saved tensor); by default only the first two steps of each recorded segment are metered
            and every later step is counted as the second one, which is exact when the inner steps
            are alike.
        compile: run each inner step through ``torch.compile``. The methods that take it are
            ``names(compilable=True)``: ``full``, ``checkpointed``, ``truncated``, ``drmad``,
            ``recursive``, ``random_truncated``; the first call compiles for seconds, later ones
            are several times faster on small models. The step index then reaches ``inner_loss``
            and ``hparams`` as a 0-d int64 tensor: select per-step values with
            :func:`metaopt.optim.schedule.at_step`, and keep Python ``if`` off ``k``. Refused for an
            inner loss that draws random numbers at step 0 (dropout: the compiled recorded and
            unrecorded steps draw different values).
        compile_block: with ``compile``, run the inner steps this many at a time as one compiled graph
            (forward and reverse; the step index and the per-step data are picked inside it), which
            takes less time per step than one graph per step on small models but compiles longer;
            ``None``: :func:`~metaopt.hypergrad.inner.default_block` (2 for an even run of 100 steps
            or more of a small model with at most 4 parameter tensors, else 1). The same hypergradient
            either way (to round-off).
        params0: start the inner run here instead of ``objective.init_params`` (a warm start, e.g.
            HOAG's previous inner solution) with a fresh optimizer state at step 0; then nothing
            flows back through the initialisation.
        start: continue an earlier run from its :class:`~metaopt.hypergrad.InnerState` (params,
            optimizer state, global step, buffers, draws' seed; e.g. the previous call's
            ``result.final``): this call runs the global steps ``start.step .. start.step + steps -
            1`` (the optimizer's ``step=``, ``inner_loss``/``hparams``' ``k``, ``inner_batch(k)``
            and the draws see the global index; a per-step schedule must cover it). The carried
            state is a constant of this window, as ``params0`` is: the hypergradient is that of
            ``F`` with ``h`` held fixed before ``start.step`` (truncated windows), so ten windows of
            50 steps give the last window's hypergradient of ``Truncated(50)`` over the 500 steps.
            Not with ``params0``; the methods that take it are ``names(start=True)`` (docs/hypergrad.md,
            "Carrying the inner state across calls").
        create_graph: return ``loss``, ``grads`` and ``params`` as differentiable functions of
            ``hyper``'s tensors and whatever made them (a level above: a meta-learned learning rate,
            the hyperparameters' initialisation), like ``torch.autograd.grad(create_graph=True)``.
            For the unrolled methods anything upstream that the objective reads counts too; for the
            implicit ones it must reach the inner problem through ``hyper``. The methods that take
            it are ``names(differentiable=True)``: ``full``, ``checkpointed``, ``truncated``,
            ``recursive``, ``implicit``, ``cg``, ``neumann``, ``dense``, ``hoag``; the unrolled ones
            keep the graph of the whole run, the implicit ones attach the inner solution by the
            implicit function theorem. See docs/tutorials/multilevel.md.
        autocast: ``torch.bfloat16`` or ``torch.float16``: every inner step's loss and gradient run
            under ``torch.autocast`` (mixed precision: matmuls and convolutions in that dtype),
            while params, optimizer state, updates, the outer loss and the reverse sweep's adjoints
            stay in the params' dtype (float32). The methods that take it are
            ``names(autocast=True)``: ``full``, ``checkpointed``, ``truncated``, ``drmad``,
            ``recursive``, ``random_truncated``, ``implicit``, ``cg``, ``neumann``, ``fixed_point``,
            ``dense``, ``hoag``; the implicit ones' linear solve stays in full precision.
            Tolerances against float32: docs/hypergrad.md.

    Returns:
        :class:`HypergradResult`: ``loss`` (0-d), ``grads`` shaped like ``hyper``, the final inner
        ``params``, ``peak_bytes`` of stored trajectory, ``seconds``, the method's ``extras``, and
        ``buffers``: the module buffers the outer loss read (``{}`` for an objective without
        :meth:`~metaopt.MetaObjective.init_buffers`). Buffers are constants of the hypergradient;
        methods that cannot carry them (reversible, drmad) refuse an objective that has them.
        ``final``: the :class:`~metaopt.hypergrad.InnerState` the run ended in, to pass as the next
        call's ``start`` (``None`` for a method that does not return its optimizer state: reversible).
    """
    method = as_method(method, steps)
    _validate(hyper, steps)
    method.validate(steps)
    if isinstance(method, Full) and method.planned:  # member-chunked, or a memory budget: see budget.py
        if type(method) is not Full:
            raise ValueError(f"chunk and max_memory apply to Full itself, not to its subclass {type(method).__name__} "
                             "(the plan runs Full, Checkpointed or Recursive); leave them unset")
        _check_start_args(start, params0, method)
        return within(objective, optimizer, hyper, steps, method, generator=generator, params0=params0,
                      start=start, create_graph=create_graph, check_finite=check_finite, exact_memory=exact_memory,
                      compile=compile, autocast=autocast)
    _check_nesting(objective, method, compile, create_graph)
    _check_autocast(autocast, method)
    if compile and not method.supports_compile:
        raise ValueError(f"compile=True does not apply to method {method.name!r}; use one of "
                         f"{', '.join(names(compilable=True))}, or compile=False")
    _check_start_args(start, params0, method)
    _check_block(compile_block, compile)
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    t0 = time.perf_counter()
    h_fixed = None
    if create_graph:
        # hyper's own tensors (or fresh leaves) carry the upstream graph; h and h_fixed are two
        # distinct nodes on them, so dF/dh sees exactly the uses the method differentiates
        source = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in hyper.items()}
        with torch.enable_grad():
            h = {k: v.clone() for k, v in source.items()}
            h_fixed = {k: v.clone() for k, v in source.items()}
    else:
        h = {k: v.detach().requires_grad_() for k, v in hyper.items()}
    if start is not None:
        params0 = start.params
    if params0 is None:
        params0 = method.start_params()
    init: Callable[[Mapping[str, Tensor]], Params] | None = None
    if params0 is not None:
        params0 = {k: v.detach() for k, v in params0.items()}
    else:
        init = _replay_init(objective, generator)
        with torch.enable_grad():
            params0 = objective.init_params(h, generator)
    _validate_params(params0)
    _check_dtypes(hyper, params0)
    step0, state0, seed = _start_of(start, optimizer, params0, generator)
    batches = [objective.inner_batch(step0 + k, generator) for k in range(steps)]
    draws = inner.Draws(seed, next(iter(params0.values())).device)
    outer = objective.outer_batch(generator)
    buffers = _start_buffers(start, _init_buffers(objective, h, generator, method))
    problem = Problem(objective=objective, optimizer=optimizer, hyper=h, steps=steps, batches=batches,
                      exact_memory=exact_memory, compile=compile, check_finite=check_finite, init=init,
                      create_graph=create_graph, hyper_fixed=h_fixed, autocast=autocast, draws=draws,
                      buffers=buffers, step0=step0, state0=state0,
                      block=compile_block or (inner.default_block(steps, params0) if compile else 1))
    stationary = method.reference == "stationary"
    if (compile or stationary) and problem.draws_random(params0, problem.init_state(params0)):
        if compile:
            raise ValueError("compile=True does not apply to an inner_loss that draws random numbers (dropout, "
                             "torch.rand*): the compiled recorded and unrecorded steps draw different values; use "
                             "compile=False (the eager steps replay every draw exactly)")
        raise ValueError(f"method {method.label!r} needs an inner stationary point, but inner_loss draws random "
                         "numbers (dropout, torch.rand*), so the inner run has none; use one of "
                         f"{', '.join(n for n, e in registered().items() if e.cls.reference == 'unrolled')}, or make "
                         "the inner loss deterministic (e.g. dropout off in inner_loss)")
    sweep = method.run(problem, params0, outer)
    grads = dict(sweep.grads)
    if sweep.adjoint is not None:
        _through_init(params0, sweep.adjoint, h, grads)
    if not create_graph:
        grads = {k: g.detach() for k, g in grads.items()}
    loss = sweep.loss
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
        params=sweep.params,
        method=method.name,
        steps=steps,
        peak_bytes=int(sweep.peak_bytes),
        seconds=time.perf_counter() - t0,
        extras=sweep.extras,
        buffers=problem.final_buffers,
        final=_final(sweep.params, sweep.state, step0 + (steps if sweep.end is None else sweep.end), seed),
    )


def _check_block(block: int | None, compile: bool) -> None:
    """``compile_block`` is ``None`` or a positive int given with ``compile=True``."""
    if block is None:
        return
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"compile_block must be a positive int (inner steps per compiled graph) or None, "
                         f"got {block!r}")
    if not compile:
        raise ValueError("compile_block applies to compile=True only; drop it or pass compile=True")


def _check_start_args(
    start: InnerState | None, params0: Mapping[str, Tensor] | None, method: Method | None = None
) -> None:
    """``start`` is an :class:`InnerState`, not given beside ``params0``, and ``method`` takes it."""
    if start is None:
        return
    if not isinstance(start, InnerState):
        raise TypeError(f"start must be a metaopt.hypergrad.InnerState (e.g. a result's .final), got "
                        f"{type(start).__name__}")
    if params0 is not None:
        raise ValueError("give params0= or start=, not both: start=InnerState(params, opt_state, step) carries "
                         "the params")
    p = start.params
    if not isinstance(p, Mapping) or not p or not all(isinstance(v, Tensor) for v in p.values()):
        raise TypeError(f"start.params must be a non-empty dict {{name: tensor}} (the inner params), got "
                        f"{type(p).__name__}")
    if method is not None and not getattr(method, "supports_start", False):
        raise ValueError(f"start= does not apply to method {method.label!r} (it cannot continue a given optimizer "
                         f"state and step); use one of {', '.join(names(start=True))}, or params0= (a fresh "
                         "optimizer state at step 0)")


def _start_of(
    start: InnerState | None, optimizer: Optimizer, params0: Params, generator: torch.Generator
) -> tuple[int, dict | None, int]:
    """``(step0, opt_state0 or None, draws' seed)`` of a run from ``start`` (checked), or from step 0
    with a fresh optimizer state and the seed of ``generator``'s current state."""
    if start is None:
        return 0, None, inner.seed_of(generator)
    step = start.step
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"start.step must be an int >= 0 (the global index of the next inner step), got {step!r}")
    seed = start.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"start.seed must be None or an int in [0, 2**63) (a result's final.seed), got {seed!r}")
    state0 = None if start.opt_state is None else check_opt_state(optimizer, params0, start.opt_state)
    return step, state0, inner.seed_of(generator) if seed is None else seed


def _start_buffers(start: InnerState | None, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
    """The buffers a run starts with: ``start.buffers`` (checked against ``init_buffers``' names,
    shapes and dtypes) when given and not empty, else ``buffers`` (``init_buffers``')."""
    if start is None or not start.buffers:
        return buffers
    given = start.buffers
    if not isinstance(given, Mapping) or set(given) != set(buffers):
        got = sorted(given) if isinstance(given, Mapping) else type(given).__name__
        raise ValueError(f"start.buffers must have the objective's buffers {sorted(buffers)} (init_buffers), got "
                         f"{got}; give {{}} to start them from init_buffers")
    check_like(given, buffers, "start.buffers", "init_buffers")
    return {n: given[n].detach() for n in buffers}


def _final(params: Params, state: dict | None, step: int, seed: int | None) -> InnerState | None:
    """The detached :class:`InnerState` a run ended in (``None`` when the method returns no state)."""
    if state is None:
        return None
    opt_state, buffers = split_buffers(state)
    return InnerState(params={k: p.detach() for k, p in params.items()},
                      opt_state={s: {k: t.detach() for k, t in v.items()} for s, v in opt_state.items()},
                      step=step, buffers={k: t.detach() for k, t in (buffers or {}).items()}, seed=seed)


def _init_buffers(
    objective: MetaObjective, hyper: Mapping[str, Tensor], generator: torch.Generator, method: Method | None = None
) -> dict[str, Tensor]:
    """The objective's buffers at step 0 (``{}``: none), checked; and ``method`` takes them."""
    buffers = objective.init_buffers(hyper, generator)
    if not isinstance(buffers, Mapping) or not all(isinstance(t, Tensor) for t in buffers.values()):
        raise TypeError(f"init_buffers must return a dict {{name: tensor}} (or {{}}), got {type(buffers).__name__}")
    if buffers and method is not None and not getattr(method, "supports_buffers", True):
        ok = [n for n, e in registered().items() if getattr(e.cls, "supports_buffers", True)]
        raise ValueError(f"method {method.label!r} cannot carry module buffers (the objective's init_buffers gives "
                         f"{sorted(buffers)}); use one of {', '.join(ok)}")
    return {k: t.detach() for k, t in buffers.items()}


def _check_nesting(objective: MetaObjective, method: Method, compile: bool, create_graph: bool) -> None:
    """Clear errors for the combinations a level above cannot differentiate (or a Level cannot run)."""
    nested = not objective.functional
    if (create_graph or nested) and compile:
        why = "create_graph=True" if create_graph else "a Level objective (its inner step is a hypergradient)"
        raise ValueError(f"compile=True does not combine with {why}: torch.compile cannot trace a double backward "
                         "taken outside the compiled step; use compile=False")
    if (create_graph or nested) and not method.differentiable:
        why = ("create_graph=True needs a hypergradient autograd can differentiate" if create_graph
               else "a Level objective steps along a lower level's hypergradient, which only autograd-based methods "
                    "can record")
        raise ValueError(f"method {method.label!r} does not support nesting: {why}; use one of "
                         f"{', '.join(names(differentiable=True))}")


def _check_autocast(autocast: torch.dtype | None, method: Method | None = None) -> None:
    """``autocast`` is ``None``, ``torch.bfloat16`` or ``torch.float16``, and ``method`` (if given) takes it."""
    if autocast is None:
        return
    if autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be torch.bfloat16 or torch.float16 (or None), got {autocast!r}")
    if method is not None and not method.supports_autocast:
        raise ValueError(f"autocast does not apply to method {method.label!r} (its steps do not all run through "
                         f"the inner step that autocast wraps); use one of {', '.join(names(autocast=True))}, "
                         "or autocast=None")


def _replay_init(objective: MetaObjective, generator: torch.Generator) -> Callable[[Mapping[str, Tensor]], Params]:
    """``init_params`` as a function of ``hyper`` with the generator's current draw replayed (forward
    mode differentiates through it); called before the real draw, so it sees the same state."""
    state, device = generator.get_state(), generator.device

    def init(hyper: Mapping[str, Tensor]) -> Params:
        gen = torch.Generator(device)
        gen.set_state(state)
        return objective.init_params(hyper, gen)

    return init


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


def _validate(hyper: Mapping[str, Tensor], steps: int) -> None:
    if not isinstance(hyper, Mapping) or not hyper:
        raise TypeError("hyper must be a non-empty dict {name: tensor} of hyperparameters")
    for k, v in hyper.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            kind = v.dtype if isinstance(v, Tensor) else type(v).__name__
            raise TypeError(f"hyper[{k!r}] must be a floating-point tensor, got {kind}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int (the number of inner steps), got {steps!r}")


def _validate_params(params0: object) -> None:
    if not isinstance(params0, Mapping) or not params0 or not all(isinstance(v, Tensor) for v in params0.values()):
        raise TypeError("init_params must return a non-empty dict {name: tensor}")


def _check_dtypes(hyper: Mapping[str, Tensor], params0: Mapping[str, Tensor]) -> None:
    """Every hyperparameter in the inner params' floating dtype (when they share one): a float32 ``h``
    on a float64 problem would mix precisions and return float32 grads."""
    dtypes = {p.dtype for p in params0.values() if p.is_floating_point()}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for k, v in hyper.items():
        if v.dtype != dtype:
            raise TypeError(f"hyper[{k!r}] is {v.dtype} but the inner params are {dtype}: give it in the "
                            f"params' dtype, hyper[{k!r}].to({dtype})")


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
    autocast: torch.dtype | None = None,
    buffers: bool = False,
    start: InnerState | None = None,
    return_state: bool = False,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]] | InnerState:
    """The inner run alone: ``params[steps]`` trained with ``hyper`` held fixed, nothing recorded
    (for evaluating hyperparameters). Draws ``init_params`` and the batches like :func:`hypergradient`.

    Args:
        objective: as for :func:`hypergradient`.
        optimizer: as for :func:`hypergradient`.
        hyper: as for :func:`hypergradient` (held fixed).
        steps: inner steps.
        generator: as for :func:`hypergradient`.
        every: with ``callback``, call it every ``every`` steps (0: only at ``k = 0`` and ``k = steps``).
        callback: ``callback(k, params[k])`` at ``k = 0``, every ``every`` steps and at ``k = steps``
            (learning curves; ``k`` is the global step: ``start.step`` is added).
        compile: use the ``torch.compile``d step.
        params0: start there instead of ``objective.init_params`` (a fresh optimizer state at step 0).
        tol: train on in further rounds of ``steps`` (the same batches: a deterministic problem, as
            for :class:`Implicit`'s ``inner_tol``; the step index restarts at the first step, ``start.step``
            or 0, in each round) until
            the norm of the optimizer's fixed-point residual at the last step is ``<= tol`` (the
            gradient plus its weight decay; ``grad_w inner_loss`` for a hand-made optimizer without
            ``residual``), at most ``max_rounds`` rounds in all (``callback`` sees the first round only).
        max_rounds: the rounds' cap.
        autocast: as for :func:`hypergradient` (mixed-precision inner steps).
        buffers: return ``(params, buffers)``: also the final module buffers (``{}`` for an
            objective without :meth:`~metaopt.MetaObjective.init_buffers`), e.g. BatchNorm's running
            statistics for evaluating in eval mode.
        start: continue from an :class:`~metaopt.hypergrad.InnerState` (params, optimizer state,
            global step, buffers, draws' seed), as for :func:`hypergradient`; not with ``params0``.
        return_state: return the final :class:`~metaopt.hypergrad.InnerState` (detached; ``step``
            is the start's plus ``steps``) instead of the params, to continue from (not with ``buffers``).

    Random draws in ``inner_loss`` and the buffers' updates are those of :func:`hypergradient`
    with the same generator, so ``train`` reproduces its inner run.

    Returns:
        The trained params ``{name: tensor}`` (detached), shaped like ``init_params``' output
        (with ``buffers=True``: ``(params, buffers)``; with ``return_state=True``: the
        :class:`~metaopt.hypergrad.InnerState`).
    """
    _validate(hyper, steps)
    if every < 0:
        raise ValueError(f"train: every must be >= 0, got {every}")
    if start is not None:
        _check_start_args(start, params0)
        params0 = start.params
    if buffers and return_state:
        raise ValueError("train: give buffers=True or return_state=True, not both (the InnerState holds the buffers)")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    h = {k: v.detach() for k, v in hyper.items()}
    params0 = objective.init_params(h, generator) if params0 is None else {k: v.detach() for k, v in params0.items()}
    _validate_params(params0)
    step0, state0, seed = _start_of(start, optimizer, params0, generator)
    batches = [objective.inner_batch(step0 + k, generator) for k in range(steps)]
    draws = inner.Draws(seed, next(iter(params0.values())).device)
    _check_autocast(autocast)
    buffers0 = _start_buffers(start, _init_buffers(objective, h, generator))
    problem = Problem(objective=objective, optimizer=optimizer, hyper=h, steps=steps, batches=batches, compile=compile,
                      autocast=autocast, draws=draws, buffers=buffers0, step0=step0, state0=state0)
    params, state = {k: p.detach() for k, p in params0.items()}, problem.init_state(params0)
    stride = every if (callback is not None and every > 0) else steps
    if callback is not None:
        callback(step0, params)
    for k0 in range(0, steps, stride):
        k1 = min(k0 + stride, steps)
        params, state = problem.advance(k0, k1, params, state)
        if callback is not None:
            callback(step0 + k1, params)
    if tol is not None:
        params, state, _, _ = converge(problem, params, state, tol, max_rounds)
    if return_state:
        return _final(params, state, step0 + steps, seed)
    if buffers:
        return params, dict(state.get(inner.BUFFERS, {}))
    return params
