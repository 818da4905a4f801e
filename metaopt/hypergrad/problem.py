"""The inner run of one hypergradient evaluation (:class:`Problem`), and the pieces every method's
reverse sweep shares: recorded segments of inner steps and their vjps, the trajectory-memory meter,
the outer loss's partial derivatives.

A recorded *segment* of consecutive inner steps keeps one autograd graph from its (detached) input
state to its output state; :meth:`Problem.sweep` pulls the adjoint ``(dF/dparams, dF/dstate)`` back
through it with one ``torch.autograd.grad`` (a vjp of the segment), accumulating ``dF/dhyper`` on
the way, then frees it. One vjp per segment rather than per step keeps the autograd engine's per-call
overhead out of the hot loop; the adjoint between segments is explicit, so memory is the method's
policy, not an accident of autograd.

The inner state is ``(params, state)``; ``state`` holds the optimizer's slots and, for an objective
with module buffers, the buffers under :data:`~metaopt.hypergrad.inner.BUFFERS` (made by
:meth:`Problem.init_state`). Buffers ride along everywhere the state goes (checkpoints, recomputation)
but are not leaves of a segment: no adjoint flows through them. Every evaluation of the inner loss at
step ``k`` draws its random numbers from :attr:`Problem.draws` stream ``k``, the outer loss from its own.

Methods count steps locally, ``0 .. n-1``; a run that continues an earlier one (``start=``, an
:class:`~metaopt.hypergrad.result.InnerState`) has ``step0 > 0``, and :class:`Problem` alone turns a
local index ``k`` into the global one ``step0 + k`` that the optimizer, the objective, the schedules
and the draws see (:meth:`Problem.index`); ``batches[k]`` is the local step's batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._tree import tree_flatten, tree_unflatten
from ..objective import MetaObjective
from ..optim.base import Optimizer, Params, State
from . import inner
from .inner import BUFFERS, NO_DRAWS, OUTER, Draws, split_buffers
from .result import NonFiniteError


class Meter:
    """Bytes of stored trajectory: tensors saved by recorded graphs (deduplicated by storage) plus
    explicitly stored states; tracks the peak."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, references]
        self.bytes = 0
        self.peak = 0
        self._estimates = 0

    def add_estimate(self, nbytes: int) -> int:
        """Count ``nbytes`` not tied to a storage (the unmetered steps); returns its key."""
        self._estimates += 1
        self.add(-self._estimates, nbytes)
        return -self._estimates

    def add(self, key: int, nbytes: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [nbytes, 1]
            self.bytes += nbytes
            self.peak = max(self.peak, self.bytes)
        else:
            entry[1] += 1

    def release(self, keys: Sequence[int]) -> None:
        for key in keys:
            entry = self.live[key]
            entry[1] -= 1
            if entry[1] == 0:
                self.bytes -= entry[0]
                del self.live[key]

    def add_tensors(self, tensors: Sequence[Tensor]) -> list[int]:
        keys = []
        for t in tensors:
            key = _storage_key(t)
            self.add(key, t.untyped_storage().nbytes())
            keys.append(key)
        return keys


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass
class Segment:
    """Recorded steps ``k0 .. k1-1``: detached input-state leaves and the output state that holds
    the segment's graph; ``keys`` are the storages counted in the meter."""

    k0: int
    k1: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    keys: list[int]


class Problem:
    """The inner run of one hypergradient evaluation: what every method's ``run`` gets.

    Built by :func:`metaopt.hypergradient` (keyword-only, not modified by the methods; a method that
    needs another optimizer makes a copy with :meth:`replace`).

    Args:
        objective: the bilevel problem.
        optimizer: the differentiable inner optimizer.
        hyper: ``{name: tensor}``, leaves that require grad (the sweeps differentiate w.r.t. them).
        steps: inner steps ``n``.
        batches: the ``n`` inner batches, drawn once (recomputations see the same data).
        meter: counts the stored trajectory's bytes (a fresh one by default).
        exact_memory: meter every recorded step instead of the first two of each segment.
        compile: run the inner steps through ``torch.compile``.
        block: with ``compile``, the inner steps run ``block`` at a time as one compiled graph
            (:func:`~metaopt.hypergrad.inner.compiled_block`, forward and reverse); a span of a
            segment shorter than ``block`` runs through the one-step graph. ``1``: one graph per step.
        check_finite: raise :class:`NonFiniteError` for a non-finite outer loss.
        init: ``init(hyper) -> params0``, the objective's ``init_params`` replayed with the same
            random draw (forward mode differentiates through it); ``None`` when the start point was
            given (nothing flows back through it).
        create_graph: the hypergradient must itself be differentiable (a level above differentiates
            it): the methods that support it keep the whole graph and differentiate with
            ``create_graph=True``.
        hyper_fixed: with ``create_graph``, ``h`` as it enters the steps where it is held fixed (a
            truncated sweep's first steps): the same values and the same upstream graph as ``hyper``,
            but not ``hyper`` itself, so ``dF/dhyper`` does not see those steps. ``None``: ``hyper``
            detached (nothing upstream).
        autocast: run every inner step's loss and gradient under ``torch.autocast`` at this dtype
            (``torch.bfloat16`` or ``torch.float16``); ``None``: the params' own precision.
        draws: the random draws of every inner-loss evaluation, one stream per step (default: none
            seeded, the global RNG as it is).
        buffers: the objective's module buffers at step 0 (``None``: it has none); :meth:`init_state`
            puts a copy into the inner state.
        step0: the global index of local step 0 (a run continued from an earlier one's state).
        state0: the optimizer state to start from (checked, :func:`check_opt_state`); ``None``: a
            fresh ``optimizer.init(params0)``.

    After the outer loss is evaluated, :attr:`final_buffers` holds the buffers it read (``{}``
    without buffers).
    """

    def __init__(
        self,
        *,
        objective: MetaObjective,
        optimizer: Optimizer,
        hyper: dict[str, Tensor],
        steps: int,
        batches: list[Any],
        meter: Meter | None = None,
        exact_memory: bool = False,
        compile: bool = False,
        check_finite: bool = True,
        init: Callable[[Mapping[str, Tensor]], Params] | None = None,
        create_graph: bool = False,
        hyper_fixed: dict[str, Tensor] | None = None,
        autocast: torch.dtype | None = None,
        draws: Draws = NO_DRAWS,
        buffers: dict[str, Tensor] | None = None,
        step0: int = 0,
        state0: State | None = None,
        block: int = 1,
    ) -> None:
        self.objective = objective
        self.optimizer = optimizer
        self.hyper = hyper
        self.hyper_const = {n: h.detach() for n, h in hyper.items()}
        self.steps = steps
        self.batches = batches
        self.meter = Meter() if meter is None else meter
        self.exact_memory = exact_memory
        self.compile = compile
        self.check_finite = check_finite
        self.init = init
        self.create_graph = create_graph
        self.hyper_fixed = self.hyper_const if hyper_fixed is None else hyper_fixed
        self.autocast = autocast
        self.draws = draws
        self.buffers = buffers or None
        self.final_buffers: dict[str, Tensor] = {}
        self.step0 = step0
        self.state0 = state0
        self.block = block
        self._blocks: dict[int, inner.CompiledBlock] = {}  # by length, made on first use
        device = next(iter(hyper.values())).device
        self.ks = [torch.tensor(step0 + k, device=device) for k in range(steps)] if compile else []

    def replace(self, **changes: Any) -> Problem:
        """A copy with some constructor arguments changed (the same meter unless one is given)."""
        kw = {"objective": self.objective, "optimizer": self.optimizer, "hyper": self.hyper, "steps": self.steps,
              "batches": self.batches, "meter": self.meter, "exact_memory": self.exact_memory,
              "compile": self.compile, "check_finite": self.check_finite, "init": self.init,
              "create_graph": self.create_graph, "hyper_fixed": self.hyper_fixed, "autocast": self.autocast,
              "draws": self.draws, "buffers": self.buffers, "step0": self.step0, "state0": self.state0,
              "block": self.block}
        return Problem(**(kw | changes))

    def index(self, k: int) -> int:
        """The global step index of local step ``k`` (``step0 + k``): what the optimizer's ``step=``,
        the objective's ``k`` and the draws see."""
        return self.step0 + k

    def init_state(self, params: Params) -> State:
        """The inner state at step 0: the optimizer's (the start's :attr:`state0` when given, else
        ``optimizer.init(params)``), plus a copy of the buffers (if any)."""
        if self.state0 is None:
            state = self.optimizer.init(params)
        else:
            state = {s: {k: t.detach() for k, t in v.items()} for s, v in self.state0.items()}
        if self.buffers is None:
            return state
        return state | {BUFFERS: {k: t.clone() for k, t in self.buffers.items()}}

    def one(self, k: int, params: Params, state: State, hyper: dict[str, Tensor] | None = None) -> tuple[Params, State]:
        """A recorded step (differentiable w.r.t. params, state and ``hyper``, by default :attr:`hyper`)."""
        if self.compile:
            return self.run_span(k, 1, params, state, hyper)
        hyper = self.hyper if hyper is None else hyper
        return inner.step(self.objective, self.optimizer, self.step0 + k, params, state, hyper, self.batches[k],
                          record=True, autocast=self.autocast, draws=self.draws)

    def spans(self, k0: int, k1: int) -> list[tuple[int, int]]:
        """Steps ``k0 .. k1-1`` as ``(first step, length)`` spans: :attr:`block` steps at a time while
        they fit (compiled), then single steps."""
        out, k, b = [], k0, max(1, self.block if self.compile else 1)
        while k < k1:
            length = b if k + b <= k1 else 1
            out.append((k, length))
            k += length
        return out

    def run_span(self, k: int, length: int, params: Params, state: State,
                 hyper: dict[str, Tensor] | None = None) -> tuple[Params, State]:
        """Steps ``k .. k+length-1`` through the compiled graph of ``length`` steps (recorded unless
        grad mode is off)."""
        hyper = self.hyper if hyper is None else hyper
        with inner.precision(self.autocast, params), self.draws.at(self.step0 + k):
            return self.block_fn(length, params)(self.ks[k], params, state, hyper, tuple(self.batches[k:k + length]))

    def block_fn(self, length: int, params: Params) -> inner.CompiledBlock:
        """The compiled graph of ``length`` steps (:func:`~metaopt.hypergrad.inner.compiled_block`),
        without SIMD code for a small CPU model (:func:`~metaopt.hypergrad.inner.scalar_kernels`,
        decided once per problem)."""
        fn = self._blocks.get(length)
        if fn is None:
            fn = self._blocks[length] = inner.compiled_block(self.objective, self.optimizer, length,
                                                             scalar=inner.scalar_kernels(params))
        return fn

    def functional_step(self, k: int, params: Params, state: State, hyper: dict[str, Tensor]) -> tuple[Params, State]:
        """Step ``k`` written with ``torch.func.grad`` (:func:`~metaopt.hypergrad.inner.step_functional`:
        composes with ``jvp``/``vmap``, for forward mode), with step ``k``'s draws."""
        return inner.step_functional(self.objective, self.optimizer, self.step0 + k, params, state, hyper,
                                     self.batches[k], self.draws)

    def advance(self, k0: int, k1: int, params: Params, state: State) -> tuple[Params, State]:
        """Steps ``k0 .. k1-1`` with nothing recorded."""
        if self.compile:
            with torch.no_grad(), self.draws.scope():
                for k, length in self.spans(k0, k1):
                    params, state = self.run_span(k, length, params, state, self.hyper_const)
            return params, state
        with self.draws.scope():
            for k in range(k0, k1):
                params, state = inner.step(self.objective, self.optimizer, self.step0 + k, params, state,
                                           self.hyper_const, self.batches[k], record=False, autocast=self.autocast,
                                           draws=self.draws)
        return params, state

    def inner_value_and_grad(
        self, k: int, params: Params, hyper: dict[str, Tensor], state: State | None = None, *, create_graph: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The inner loss at step ``k`` and its direction at ``params`` (with step ``k``'s draws and,
        for an objective with buffers, the buffers of ``state``): what the implicit methods
        differentiate."""
        buffers = self._buffers(state)
        with self.draws.at(self.step0 + k):
            loss, grads, _ = inner.value_and_grad(self.objective, params, buffers, hyper, self.step0 + k,
                                                  self.batches[k], create_graph=create_graph)
        return loss, grads

    def outer_loss(self, params: Params, hyper: dict[str, Tensor], batch: Any, state: State | None = None) -> Tensor:
        """The outer loss at ``params`` (with its own draws and, for an objective with buffers, the
        buffers of ``state``, kept in :attr:`final_buffers`)."""
        buffers = self._buffers(state)
        with self.draws.at(OUTER):
            if buffers is None:
                return self.objective.outer_loss(params, hyper, batch)
            self.final_buffers = buffers
            return self.objective.outer_loss_with_buffers(params, buffers, hyper, batch)

    def draws_random(self, params: Params, state: State) -> bool:
        """Whether local step 0's inner loss draws from torch's global RNG (dropout, ``torch.rand*``): one
        forward evaluation, nothing recorded, the global RNG restored."""
        buffers = split_buffers(state)[1]
        with self.draws.scope(), torch.no_grad():
            before = [g.get_state() for g in self.draws.generators]
            if buffers is None:
                self.objective.inner_loss(params, self.hyper_const, self.step0, self.batches[0])
            else:
                self.objective.inner_loss_and_buffers(params, buffers, self.hyper_const, self.step0, self.batches[0])
            return any(not torch.equal(a, g.get_state()) for a, g in zip(before, self.draws.generators))

    def _buffers(self, state: State | None) -> dict[str, Tensor] | None:
        if self.buffers is None:
            return None
        if state is None or BUFFERS not in state:
            raise RuntimeError("the objective has module buffers: pass the inner state that carries them "
                               "(Problem.init_state makes it)")
        return state[BUFFERS]

    def record(
        self, k0: int, k1: int, params: Params, state: State, *, connected: bool = False,
        hyper: dict[str, Tensor] | None = None,
    ) -> tuple[Params, State, Segment]:
        """Steps ``k0 .. k1-1`` as one graph from the (detached) state at ``k0`` to the state at ``k1``.

        With ``connected`` the state at ``k0`` is not detached: the graph reaches back through
        whatever made it (``create_graph``'s one graph for the whole run). ``hyper``: the
        hyperparameters the steps read (default :attr:`hyper`)."""
        state, buffers = split_buffers(state)
        leaves, spec = tree_flatten((params, state))
        leaves = [t if connected and t.requires_grad else t.detach().requires_grad_() for t in leaves]
        params, state = tree_unflatten(leaves, spec)
        state = _with(state, buffers)
        meter = self.meter
        # Saved-tensor hooks call Python for every saved tensor (forward and backward). By default
        # only the segment's first two spans (steps, or compiled blocks) are metered: storages that the
        # second span saves anew (not shared with the first: hyperparameters, data, constants) are its
        # steps' trajectory, and each unmetered step adds as much per step. Exact when the steps are
        # alike (a fixed-shape inner run); exact_memory=True meters every step.
        spans = self.spans(k0, k1)
        n_metered = len(spans) if self.exact_memory else min(2, len(spans))
        per_step: list[list[Tensor]] = []
        with self.draws.scope():
            for k, length in spans[:n_metered]:
                per_step.append([])
                params, state = self._hooked(k, length, params, state, hyper, per_step[-1])
            for k, length in spans[n_metered:]:
                params, state = self.run_span(k, length, params, state, hyper) if self.compile \
                    else self.one(k, params, state, hyper)
        out_leaves = tree_flatten((params, split_buffers(state)[0]))[0]
        keys = meter.add_tensors([t for saved in per_step for t in saved] + out_leaves)
        if n_metered < len(spans):
            first = {_storage_key(t) for t in per_step[0]}
            length = spans[n_metered - 1][1]
            step_bytes = _unique_bytes([t for t in per_step[-1] if _storage_key(t) not in first]) / length
            rest = k1 - spans[n_metered][0]
            keys.append(meter.add_estimate(round(step_bytes * rest)))
        return params, state, Segment(k0, k1, leaves, out_leaves, keys)

    def _hooked(self, k: int, length: int, params: Params, state: State, hyper: dict[str, Tensor] | None,
                saved: list[Tensor]) -> tuple[Params, State]:
        """A recorded span with its saved tensors collected into ``saved``. torch.func.grad refuses
        to be traced under saved-tensor hooks: a compiled span not yet traced for inputs of these
        shapes and dtypes is traced by one call outside them first (remembered per compiled graph, for
        as long as dynamo keeps the graphs that call made: ``torch._dynamo.reset()`` drops them)."""
        if self.compile:
            fn = self.block_fn(length, params)
            seen = _TRACED.setdefault(fn, {})
            sig = _signature((params, state, self.hyper if hyper is None else hyper, self.batches[k:k + length],
                              self.autocast))
            if sig not in seen or not seen[sig] <= inner.compiled_graphs(fn):
                leaves, spec = tree_flatten((params, state))
                self.run_span(k, length, *tree_unflatten([t.detach().requires_grad_() for t in leaves], spec), hyper)
                seen[sig] = inner.compiled_graphs(fn)
        with torch.autograd.graph.saved_tensors_hooks(_keep(saved), _identity):
            if self.compile:
                return self.run_span(k, length, params, state, hyper)
            return self.one(k, params, state, hyper)

    def sweep(self, segment: Segment, adjoint: list[Tensor], hyper_bar: dict[str, Tensor]) -> list[Tensor]:
        """Pull the adjoint of the segment's output state back to its input state (one vjp through
        the segment's graph, then freed), adding the segment's ``dF/dhyper`` into ``hyper_bar``."""
        names = list(self.hyper)
        pairs = [(o, a) for o, a in zip(segment.outputs, adjoint) if o.requires_grad and a is not None]
        if not pairs:
            adjoint = [torch.zeros_like(t) for t in segment.inputs]
        else:
            outs, cots = zip(*pairs)
            grads = torch.autograd.grad(outs, segment.inputs + [self.hyper[n] for n in names], cots, allow_unused=True)
            n_in = len(segment.inputs)
            adjoint = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads[:n_in], segment.inputs)]
            for name, g in zip(names, grads[n_in:]):
                if g is not None:
                    hyper_bar[name] = hyper_bar[name] + g
        self.meter.release(segment.keys)
        segment.outputs.clear()
        return adjoint


_TRACED: weakref.WeakKeyDictionary[Callable, dict[tuple, frozenset]] = weakref.WeakKeyDictionary()
"""Per compiled span function, the input signatures it has been traced for outside saved-tensor hooks,
each with the compiled graphs dynamo held just after (:func:`metaopt.hypergrad.inner.compiled_graphs`)."""


def _signature(tree: Any) -> tuple:
    """Shapes, dtypes, devices and ``requires_grad`` of a tree's tensors (other leaves by ``repr``):
    what makes a compiled graph recompile."""
    leaves, spec = tree_flatten(tree)
    return (str(spec), tuple(
        (tuple(t.shape), t.dtype, t.device, t.requires_grad) if isinstance(t, Tensor) else repr(t) for t in leaves))


def _with(state: State, buffers: dict[str, Tensor] | None) -> State:
    return state if buffers is None else state | {BUFFERS: buffers}


def _keep(saved: list[Tensor]) -> Any:
    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    return pack


def _unique_bytes(tensors: list[Tensor]) -> int:
    return sum({_storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


def _identity(t: Tensor) -> Tensor:
    return t


def final_adjoint(p_bar: Params, state: State) -> list[Tensor]:
    """The adjoint of the final inner state, flattened like ``(params, state)`` without the buffers
    (a segment's leaves): ``dF/dparams`` and zeros for the optimizer state (the outer loss does not
    read it)."""
    zeros = {s: {k: torch.zeros_like(t) for k, t in v.items()} for s, v in split_buffers(state)[0].items()}
    return tree_flatten((p_bar, zeros))[0]


def outer_partials(
    problem: Problem, params: Params, batch: Any, state: State | None = None
) -> tuple[Tensor, Params, dict[str, Tensor]]:
    """Outer loss at the final params (and the buffers of the final ``state``, needed when the
    objective has buffers) and its partial derivatives ``(dF/dparams, dF/dhyper)``, the latter for
    every hyperparameter (zeros where ``F`` does not read it): the start of every sweep's ``hyper_bar``."""
    with torch.enable_grad():
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = problem.outer_loss(p, problem.hyper, batch, state)
        check_outer_loss(loss, problem.check_finite)
        names = list(problem.hyper)
        leaves = list(p.values()) + [problem.hyper[n] for n in names]
        if not loss.requires_grad:
            grads: Sequence[Tensor | None] = [None] * len(leaves)
        else:
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    p_bar = {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(p.items(), grads)}
    h_bar = {n: (g if g is not None else torch.zeros_like(problem.hyper[n])) for n, g in zip(names, grads[len(p):])}
    return loss.detach(), p_bar, h_bar


def check_outer_loss(loss: Any, finite: bool = True) -> None:
    """A scalar (and, with ``finite``, finite) outer loss, or a clear error before any reverse sweep
    is spent on it."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"outer_loss must return a scalar tensor; got {shape}")
    if finite and not torch.isfinite(loss.detach()):
        raise NonFiniteError(
            f"outer loss is {loss.item()}: the inner run diverged or the objective produced NaN/inf; "
            "lower the inner learning rates or check the data"
        )


def check_opt_state(optimizer: Optimizer, params: Params, opt_state: Any) -> State:
    """``opt_state`` as a start for ``optimizer`` at ``params`` (detached), or a one-line ``ValueError``:
    it must have the optimizer's slots (``optimizer.init(params)``'s), each with the params' names,
    shapes and dtypes. Module buffers do not belong in it (:class:`InnerState`'s ``buffers``)."""
    like = optimizer.init(params)
    if not isinstance(opt_state, Mapping) or any(not isinstance(v, Mapping) for v in opt_state.values()):
        raise ValueError(f"start.opt_state must be a dict {{slot: {{name: tensor}}}} with {optimizer.name}'s slots "
                         f"{sorted(like)}; got {type(opt_state).__name__}")
    if BUFFERS in opt_state:
        raise ValueError(f"start.opt_state must not hold the module buffers ({BUFFERS!r}): give them as "
                         "InnerState(buffers=...)")
    if set(opt_state) != set(like):
        raise ValueError(f"start.opt_state has the slots {sorted(opt_state)} but {optimizer.name} keeps "
                         f"{sorted(like)}: give the state of the same optimizer (None: a fresh one)")
    for slot, ref in like.items():
        got = opt_state[slot]
        if set(got) != set(ref):
            raise ValueError(f"start.opt_state[{slot!r}] has the names {sorted(got)} but the params have "
                             f"{sorted(ref)}: give one tensor per parameter")
        check_like(got, ref, f"start.opt_state[{slot!r}]", "params[{name!r}]")
    return {slot: {name: opt_state[slot][name].detach() for name in ref} for slot, ref in like.items()}


def check_like(got: Mapping[str, Any], ref: Mapping[str, Tensor], where: str, source: str) -> None:
    """Each ``got[name]`` a tensor with ``ref[name]``'s shape and dtype, or a one-line ``ValueError``
    naming ``where[name]`` and ``source`` (formatted with ``name``) that it must match."""
    for name, t in ref.items():
        g = got[name]
        if not isinstance(g, Tensor) or g.shape != t.shape or g.dtype != t.dtype:
            what = (tuple(g.shape), g.dtype) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"{where}[{name!r}] must have the shape {tuple(t.shape)} and dtype {t.dtype} of "
                             f"{source.format(name=name)}; got {what}")
