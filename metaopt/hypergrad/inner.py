"""One inner optimisation step, in the variants the hypergradient methods need.

* :func:`step` — eager; the inner gradient by ``torch.autograd.grad``, with its graph kept
  (``create_graph=True``) when the step is recorded for the reverse sweep, or not at all.
* :func:`step_functional` — the inner gradient by ``torch.func.grad``, so the step composes with
  ``jvp``/``vmap`` (forward mode) and with ``torch.compile``.

Both take the inner run's :class:`Draws` (the random draws of step ``k`` replayed from one seed) and
carry the module buffers that ride in the optimizer state under :data:`BUFFERS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from ..objective import MetaObjective, check_inner_loss
from ..optim.base import Optimizer, Params, State

Hyper = Mapping[str, Tensor]

BUFFERS = "module_buffers"
"""The slot of the inner state (beside the optimizer's slots) that carries the objective's module
buffers ``{name: tensor}`` (:meth:`metaopt.MetaObjective.init_buffers`) through the inner run: stored
at checkpoints and replayed by recomputation like the optimizer state, never differentiated."""

OUTER = -1
"""The stream index of the outer loss's draws (the steps use ``0 .. n-1``)."""

_MASK = (1 << 64) - 1


def _mix(seed: int, k: int) -> int:
    """A 63-bit seed for stream ``k`` of ``seed`` (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + (k + 2) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) >> 1


def seed_of(generator: torch.Generator) -> int:
    """The seed of an inner run's draws, a hash of ``generator``'s state (the generator is not
    advanced: the same state gives the same draws, in :func:`metaopt.hypergradient` and
    :func:`metaopt.hypergrad.train` alike)."""
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8, person=b"metaopt.rng").digest()
    return int.from_bytes(digest, "little") >> 1


class Draws:
    """The random draws of an inner run: step ``k``'s calls of the inner loss run with torch's
    global RNG (CPU, and ``device`` when it is a CUDA device) seeded from ``(seed, k)``, the outer
    loss's from ``(seed, OUTER)``; the global RNG state is restored afterwards. So dropout and any
    ``torch.rand*`` in ``inner_loss`` draw the same values in every recomputation of step ``k``.

    ``seed=None``: no seeding (the global RNG as it is). Cost: one ``get_state``/``set_state`` pair
    per :meth:`scope` and one ``manual_seed`` per step inside it (a few microseconds each).
    """

    def __init__(self, seed: int | None, device: torch.device | str = "cpu") -> None:
        self.seed = seed
        device = torch.device(device)
        self.generators = [torch.default_generator]
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.generators.append(torch.cuda.default_generators[index])
        self._open = 0

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Save the global RNG state now and restore it at exit (nested scopes save once)."""
        if self.seed is None or self._open:
            self._open += 1
            try:
                yield
            finally:
                self._open -= 1
            return
        saved = [g.get_state() for g in self.generators]
        self._open += 1
        try:
            yield
        finally:
            self._open -= 1
            for g, s in zip(self.generators, saved):
                g.set_state(s)

    @contextlib.contextmanager
    def at(self, k: int) -> Iterator[None]:
        """Run the block with the global RNG seeded for stream ``k`` (inside a :meth:`scope`: one
        ``manual_seed``; outside: a scope of its own)."""
        if self.seed is None:
            yield
            return
        if self._open:  # inside a scope: it restores the RNG, only seed
            s = _mix(self.seed, int(k))
            for g in self.generators:
                g.manual_seed(s)
            yield
            return
        with self.scope():
            s = _mix(self.seed, int(k))
            for g in self.generators:
                g.manual_seed(s)
            yield


NO_DRAWS = Draws(None)


def split_buffers(state: State) -> tuple[State, dict[str, Tensor] | None]:
    """``(optimizer state, buffers)``: the state without its :data:`BUFFERS` slot, and that slot
    (``None`` when the objective has no buffers)."""
    if BUFFERS not in state:
        return state, None
    rest = {s: v for s, v in state.items() if s != BUFFERS}
    return rest, state[BUFFERS]


def value_and_grad(
    objective: MetaObjective, params: Params, buffers: dict[str, Tensor] | None, hyper: Hyper, k: int, batch: Any,
    *, create_graph: bool,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor] | None]:
    """``inner_loss``, the step direction and the new buffers (``None`` without buffers): the
    objective's ``inner_value_and_grad``, or, with buffers, the gradient of
    ``inner_loss_and_buffers`` (the new buffers detached: constants of the reverse sweep)."""
    if buffers is None:
        loss, grads = objective.inner_value_and_grad(params, hyper, k, batch, create_graph=create_graph)
        return loss, grads, None
    with torch.enable_grad():
        loss, new = objective.inner_loss_and_buffers(params, buffers, hyper, k, batch)
        check_inner_loss(loss, k)
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph, allow_unused=True)
    grads = {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)}
    return loss, grads, check_buffers(new, buffers, k)


def check_buffers(new: Any, old: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """The new buffers, detached, with the old ones' names, shapes and dtypes; or a one-line error."""
    if not isinstance(new, Mapping) or new.keys() != old.keys():
        got = sorted(new) if isinstance(new, Mapping) else type(new).__name__
        raise ValueError(f"inner_loss_and_buffers must return (loss, buffers) with the buffers' names "
                         f"{sorted(old)}; got {got} at step {k}")
    for n, t in new.items():
        if not isinstance(t, Tensor) or t.shape != old[n].shape or t.dtype != old[n].dtype:
            what = (tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"inner_loss_and_buffers: buffer {n!r} must keep shape {tuple(old[n].shape)} and dtype "
                             f"{old[n].dtype}; got {what} at step {k}")
    return {n: t.detach() for n, t in new.items()}


def step(
    objective: MetaObjective,
    optimizer: Optimizer,
    k: int,
    params: Params,
    state: State,
    hyper: Hyper,
    batch: Any,
    record: bool,
    autocast: torch.dtype | None = None,
    draws: Draws = NO_DRAWS,
) -> tuple[Params, State]:
    """``params[k+1], state[k+1]``. With ``record`` the result is differentiable w.r.t. ``params``,
    ``state`` and ``hyper`` (the caller makes them leaves that require grad); without it nothing is kept.
    ``autocast``: the inner loss and its gradient under ``torch.autocast`` at that dtype (the update
    and the state stay in the params' dtype). ``draws``: the inner loss's random draws for step ``k``.
    A :data:`BUFFERS` slot of ``state`` is the buffers the loss reads; the step puts the new ones there."""
    if not record:
        params = {n: p.detach().requires_grad_() for n, p in params.items()}
    state, buffers = split_buffers(state)
    with precision(autocast, params), draws.at(k):
        _, grads, buffers = value_and_grad(objective, params, buffers, hyper, k, batch, create_graph=record)
    with torch.set_grad_enabled(record):
        if not record:
            params = {n: p.detach() for n, p in params.items()}
        params, state = optimizer.update(grads, state, params, step=k, **objective.hparams(hyper))
    return params, (state if buffers is None else state | {BUFFERS: buffers})


def precision(dtype: torch.dtype | None, params: Params) -> contextlib.AbstractContextManager:
    """``torch.autocast`` at ``dtype`` on the params' device type, or nothing for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(iter(params.values())).device.type, dtype=dtype)


def step_functional(
    objective: MetaObjective,
    optimizer: Optimizer,
    k: int,
    params: Params,
    state: State,
    hyper: Hyper,
    batch: Any,
    draws: Draws = NO_DRAWS,
) -> tuple[Params, State]:
    """The same step written with ``torch.func.grad`` (composes with every ``torch.func`` transform).
    ``draws`` as for :func:`step`; under ``torch.compile`` pass none and seed around the call."""
    state, buffers = split_buffers(state)

    def loss(p: Params) -> Tensor:
        value = objective.inner_loss(p, hyper, k, batch)
        check_inner_loss(value, k)
        return value

    def loss_and_buffers(p: Params) -> tuple[Tensor, dict[str, Tensor]]:
        value, new = objective.inner_loss_and_buffers(p, buffers, hyper, k, batch)
        check_inner_loss(value, k)
        return value, new

    with draws.at(k):
        if buffers is None:
            grads, new = grad(loss)(params), None
        else:
            grads, new = grad(loss_and_buffers, has_aux=True)(params)
    params, state = optimizer.update(grads, state, params, step=k, **objective.hparams(hyper))
    if buffers is None:
        return params, state
    return params, state | {BUFFERS: check_buffers(new, buffers, k)}


CompiledBlock = Callable[[Tensor, Params, State, Hyper, tuple], tuple[Params, State]]
_COMPILED: weakref.WeakKeyDictionary[MetaObjective, dict[tuple[int, int, bool], tuple[Optimizer, CompiledBlock]]] = (
    weakref.WeakKeyDictionary()
)

SMALL = 100_000
"""Parameter elements (all members together) up to which an inner step counts as dispatch-bound."""

BLOCK_TENSORS = 4
"""Parameter tensors up to which :func:`default_block` compiles two inner steps per graph."""


def small(params: Params) -> bool:
    """At most :data:`SMALL` parameter elements in all: a step of a few hundred tiny kernels."""
    return sum(p.numel() for p in params.values()) <= SMALL


def default_block(steps: int, params: Params | None = None) -> int:
    """The compiled block length when none is given: 2 for an even run of at least 100 steps of a
    :func:`small` model with at most :data:`BLOCK_TENSORS` parameter tensors (two linear layers), where
    one step is a few hundred microsecond-sized kernels and the per-call and per-backward overhead of a
    one-step graph is a large part of its time; else 1. A block's graph compiles longer with every step
    and layer in it: 2 keeps the cold first compiled step of the seed's 1- and 2-layer models under
    10 s on two CPU cores, where blocks of 5 took 9 to 16 s (and 27 s for 4 layers) for at most a
    fifth less time per step (docs/benchmarks.md, "Compile latency"). An odd run would need a second
    graph for its last step."""
    if steps < 100 or steps % 2 or (params is not None and (not small(params) or len(params) > BLOCK_TENSORS)):
        return 1
    return 2


def scalar_kernels(params: Params) -> bool:
    """Whether inductor compiles a step on ``params`` without SIMD code: for a :func:`small` model on
    the CPU, unless ``TORCHINDUCTOR_VEC_ISA_OK`` says otherwise. Its kernels are a few hundred
    elements wide, so vector code buys nothing at run time, while the C++ compiler takes about a
    third less time without it (docs/benchmarks.md, "Compile latency")."""
    if "TORCHINDUCTOR_VEC_ISA_OK" in os.environ or not params:
        return False
    return next(iter(params.values())).device.type == "cpu" and small(params)


def compiled_graphs(block: CompiledBlock) -> frozenset:
    """The graphs dynamo holds for a :func:`compiled_block` now (its cache entries' code objects): a
    graph that was there and is gone was dropped (``torch._dynamo.reset()``), and a call that found it
    compiles again."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return frozenset(entry.code for entry in _debug_get_cache_entry_list(block.__wrapped__.__code__))


# inductor's generated code checks the size and stride of every graph input (and of the backward's
# tangents and saved tensors) on each call: a debugging aid that dynamo's guards (the forward's
# inputs) and AOTAutograd (the tangents' layout) already make redundant, and a tenth of a small step's
# time (43 checks per 4-layer step, docs/benchmarks.md "Against hand-written code").
NO_SIZE_ASSERTS = {"size_asserts": False}


def compiled_block(objective: MetaObjective, optimizer: Optimizer, length: int, scalar: bool = False) -> CompiledBlock:
    """``length`` consecutive steps of :func:`step_functional` as one ``torch.compile``d graph:
    ``block(k0, params, state, hyper, batches)`` runs the steps ``k0 .. k0 + length - 1`` (``k0`` a 0-d
    int64 tensor, the step indices ``k0 + i`` made inside the graph; ``batches`` the ``length`` steps'
    batches), so one call (and, recorded, one backward) replaces ``length`` dispatches of the one-step
    graph, and the compiler fuses across steps. ``scalar``: compile without SIMD code
    (:func:`scalar_kernels`). Memoised per (objective, optimizer, length, scalar): compiling costs seconds.

    The objective's ``inner_loss`` and ``hparams`` see ``k`` as a tensor: select per-step values with
    :func:`metaopt.optim.schedule.at_step` (a gather), not Python indexing or ``if`` on ``k``.
    """
    per_objective = _COMPILED.setdefault(objective, {})
    key = (id(optimizer), length, scalar)
    hit = per_objective.get(key)
    if hit is not None and hit[0] is optimizer:
        return hit[1]

    def steps(k0: Tensor, params: Params, state: State, hyper: Hyper, batches: tuple) -> tuple[Params, State]:
        for i, batch in enumerate(batches):
            params, state = step_functional(objective, optimizer, k0 + i if i else k0, params, state, hyper, batch)
        return params, state

    # dynamo caches graphs per code object, with a limit of recompiles on each: a fresh code object
    # per memo key keeps their graphs apart instead of piling guards on one function (and keeps a
    # graph compiled with other inductor options from being reused).
    fresh = types.FunctionType(steps.__code__.replace(), steps.__globals__, f"steps_{length}", None,
                               steps.__closure__)
    fn = torch.compile(fresh, options={**NO_SIZE_ASSERTS, **({"cpp.vec_isa_ok": False} if scalar else {})})
    per_objective[key] = (optimizer, fn)
    return fn
