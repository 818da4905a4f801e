"""Reversible learning (Maclaurin, Duvenaud & Adams 2015): momentum SGD run forward keeping only
its final state, then reversed *exactly* in the backward sweep.

Parameters ``w`` and velocities ``v`` live in fixed point (int64, ``value = int * 2**-radix_bits``).
The update (torch's momentum form, ``v' = mu v + g(w)``, ``w' = w - lr v'``) is then exactly
invertible given ``w'`` and ``v'``, except for the multiplication by ``mu``, which destroys
``log2(1/mu)`` bits per element and step. With ``mu`` as a rational ``n / d``, those bits are kept
in a compact information buffer: a per-element arbitrary-precision integer in mixed radix
(:class:`InfoBuffer`), so ``w_0`` is recovered bit for bit. The reverse sweep feeds each recovered
state to the same one-step vjp as the unrolled methods, so the hypergradient equals the full
unroll's to fixed-point precision. Memory: the final state plus about ``log2(1/mu)`` bits per
element and step (0.15 for ``mu = 0.9``), instead of every step's graph.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..optim import SGDSpec
from ..optim.base import Optimizer, Params, merge_hparams, resolve
from .methods import FieldError, Method, Sweep
from .problem import Problem, final_adjoint, outer_partials

_BASE_BITS = 32
_BASE = 1 << _BASE_BITS


class InfoBuffer:
    """Per-element arbitrary-precision non-negative integers ``B`` (one per element of ``shape``),
    as limbs of base 2**32 in an int64 tensor ``[limbs, *shape]``. ``push(r, R)``: ``B = B*R + r``;
    ``pop(R)``: ``r = B % R, B = B // R``. Radices ``R`` are Python ints below 2**31."""

    def __init__(self, shape: torch.Size, device: torch.device) -> None:
        self.limbs = torch.zeros((1, *shape), dtype=torch.int64, device=device)

    def push(self, r: Tensor, radix: int) -> None:
        carry = r.to(torch.int64)
        out = []
        for limb in self.limbs:
            t = limb * radix + carry
            out.append(t & (_BASE - 1))
            carry = t >> _BASE_BITS
        if bool((carry != 0).any()):
            out.append(carry)
        self.limbs = torch.stack(out)

    def pop(self, radix: int) -> Tensor:
        rem = torch.zeros_like(self.limbs[0])
        out = []
        for limb in reversed(self.limbs):
            cur = (rem << _BASE_BITS) + limb
            out.append(cur // radix)
            rem = cur % radix
        limbs = torch.stack(out[::-1])
        while limbs.shape[0] > 1 and not bool(limbs[-1].any()):
            limbs = limbs[:-1]
        self.limbs = limbs
        return rem

    @property
    def nbytes(self) -> int:
        """Bytes of limbs held (4 significant bytes per int64 limb are counted)."""
        return self.limbs.numel() * (_BASE_BITS // 8)

    def bits(self) -> float:
        """Information actually stored: the sum over elements of ``log2(B + 1)``."""
        value = sum(self.limbs[i].double() * 2.0 ** (_BASE_BITS * i) for i in range(self.limbs.shape[0]))
        return float(value.add(1).log2().sum())


@dataclass(frozen=True)
class Reversible(Method):
    """Exact reversal of momentum SGD (``optim.momentum``, with a constant Python-float momentum).

    The momentum becomes the nearest rational ``n / d`` with ``d <= max_denominator`` (0.9 is 9/10),
    used by the float steps of the sweep too, so the result is the hypergradient of momentum SGD with
    exactly that momentum (``extras["momentum"]``). The exact multiplication ``x * n / d`` is
    ``floor(x / d) * n`` plus ``n`` units of buffered information, so each step deviates from the float
    dynamics by up to ``n * 2**-radix_bits``: small ``n`` and many ``radix_bits`` keep that at
    round-off. Values must stay below ``2**(62 - radix_bits)`` in magnitude (16384 by default)."""

    radix_bits: int = 48
    max_denominator: int = 1000
    name: ClassVar[str] = "reversible"
    supports_buffers: ClassVar[bool] = False  # a running average cannot be reversed

    def validate(self, steps: int) -> None:
        if not 1 <= self.radix_bits <= 60:
            raise FieldError("Reversible", "radix_bits", self.radix_bits, "needs 1 <= radix_bits <= 60")
        if self.max_denominator < 1:
            raise FieldError("Reversible", "max_denominator", self.max_denominator, "needs a positive int")

    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        return reversible(problem, params0, self, outer)

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        # int64 params and velocities (twice the float32 state at most 4x), the information buffer
        # (about log2(max_denominator) bits per element and step, in 32-bit limbs, plus one limb of
        # slack per push), one step's graph and the final state
        bits = math.log2(self.max_denominator) + 1
        return 4 * state_bytes + state_bytes * (2 + steps * bits / 32) + step_bytes + state_bytes

    def skip_reason(self, optimizer: Optimizer, n_hyper: int) -> str | None:
        return _not_heavy_ball(optimizer)


def _not_heavy_ball(optimizer: Optimizer) -> str | None:
    spec = optimizer.spec
    if not isinstance(spec, SGDSpec) or not spec.heavy_ball:
        return (f"Reversible needs heavy-ball momentum SGD (metaopt.optim.momentum), got {optimizer.name}: plain SGD "
                "cannot be reversed without storing states, and Nesterov/Adam are not implemented")
    if isinstance(spec.momentum, Tensor) or callable(spec.momentum):
        return "Reversible needs a constant Python-float momentum (it is made an exact rational)"
    return None


def reversible(problem: Problem, params0: Params, method: Reversible, outer: Any) -> Sweep:
    """Momentum SGD forward in fixed point keeping only the final state, then reversed exactly,
    each recovered state fed to the one-step vjp of the unrolled methods."""
    obj, n = problem.objective, problem.steps
    why = _not_heavy_ball(problem.optimizer)
    if why is None and "momentum" in obj.hparams(problem.hyper_const):
        why = "Reversible needs a constant Python-float momentum (it is made an exact rational)"
    if why is not None:
        raise ValueError(why)
    spec: SGDSpec = problem.optimizer.spec
    if not 0 < float(spec.momentum) < 1:
        raise ValueError(f"Reversible needs 0 < momentum < 1, got {spec.momentum}")
    frac = Fraction(float(spec.momentum)).limit_denominator(method.max_denominator)
    numer, denom = frac.numerator, frac.denominator
    mu_exact = numer / denom
    # the float steps of the sweep use the same rational momentum as the integer dynamics
    opt = dataclasses.replace(spec, momentum=mu_exact).build()
    problem = problem.replace(optimizer=opt)
    scale = 2.0 ** method.radix_bits
    limit = 2.0 ** (62 - method.radix_bits)
    names = list(params0)
    dtype = next(iter(params0.values())).dtype

    def enc(x: Tensor) -> Tensor:
        if not bool((x.abs() < limit).all()):
            raise ValueError(f"Reversible: a value exceeds the fixed-point range +-{limit:g}; lower radix_bits")
        return torch.round(x.double() * scale).to(torch.int64)

    def dec(x: Tensor) -> Tensor:
        return (x.double() / scale).to(dtype)

    def hps(k: int) -> dict[str, Any]:
        return merge_hparams(opt.defaults, obj.hparams(problem.hyper_const), params0, opt.name, k)

    def direction(W: dict[str, Tensor], k: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Fixed-point ``g = grad L(w) + weight_decay * w`` and the step's resolved hyperparameters."""
        w = {p: dec(W[p]).requires_grad_() for p in names}
        with torch.enable_grad(), problem.draws.at(k):  # the same draws forward and in reverse
            loss = obj.inner_loss(w, problem.hyper_const, k, problem.batches[k])
            gs = torch.autograd.grad(loss, [w[p] for p in names], allow_unused=True)
        hp = hps(k)
        out = {}
        for p, g in zip(names, gs):
            g = torch.zeros_like(w[p]) if g is None else g
            wd = resolve("weight_decay", hp["weight_decay"], p, w[p], k)
            out[p] = enc(g.detach() + wd * w[p].detach())
        return out, hp

    def lr_times(hp: dict[str, Any], V: dict[str, Tensor], k: int) -> dict[str, Tensor]:
        return {p: enc(resolve("lr", hp["lr"], p, dec(V[p]), k) * dec(V[p])) for p in names}

    buffers = {p: InfoBuffer(params0[p].shape, params0[p].device) for p in names}

    def mul_mu(x: Tensor, buf: InfoBuffer) -> Tensor:  # x * numer / denom, exactly (with the buffer)
        buf.push(torch.remainder(x, denom), denom)
        return torch.div(x, denom, rounding_mode="floor") * numer + buf.pop(numer)

    def div_mu(y: Tensor, buf: InfoBuffer) -> Tensor:  # the inverse of mul_mu
        buf.push(torch.remainder(y, numer), numer)
        return torch.div(y, numer, rounding_mode="floor") * denom + buf.pop(denom)

    W0 = {p: enc(params0[p]) for p in names}
    W = dict(W0)
    V = {p: torch.zeros_like(W[p]) for p in names}
    for k in range(n):
        G, hp = direction(W, k)
        V = {p: mul_mu(V[p], buffers[p]) + G[p] for p in names}
        step = lr_times(hp, V, k)
        W = {p: W[p] - step[p] for p in names}
    buffer_bytes = sum(b.nbytes for b in buffers.values())
    buffer_bits = sum(b.bits() for b in buffers.values())
    state_bytes = sum(2 * t.numel() * 8 for t in W.values())

    final = {p: dec(W[p]) for p in names}
    loss, p_bar, hyper_bar = outer_partials(problem, final, outer)
    adjoint = final_adjoint(p_bar, {"velocity": final})
    for k in reversed(range(n)):
        step = lr_times(hps(k), V, k)
        W = {p: W[p] + step[p] for p in names}
        G, _ = direction(W, k)
        V = {p: div_mu(V[p] - G[p], buffers[p]) for p in names}
        state = {"velocity": {p: dec(V[p]) for p in names}}
        _, _, seg = problem.record(k, k + 1, {p: dec(W[p]) for p in names}, state)
        adjoint = problem.sweep(seg, adjoint, hyper_bar)
    exact = all(torch.equal(W[p], W0[p]) for p in names) and all(not bool(V[p].any()) for p in names)
    extras = {
        "w0_recovered_exactly": exact,
        "buffer_bytes": buffer_bytes,
        "buffer_bits_per_element_step": buffer_bits / max(1, n * sum(params0[p].numel() for p in names)),
        "momentum": mu_exact,
    }
    return Sweep(loss, final, hyper_bar, adjoint, state_bytes + buffer_bytes + problem.meter.peak, extras)
