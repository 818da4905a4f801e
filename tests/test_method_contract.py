"""The method contract, parametrized from the name table: every registered hypergradient method
against five-point finite differences of the function it claims to differentiate (its
``reference``), in float64, and its peak memory against its own ``peak_bound``; a Monte Carlo
method (``reference = "smoothed"``: ES, PES) against the exact ``dF/dh`` within a few of its own
standard errors instead (:func:`check_smoothed`). A new method is
tested here without editing any list; ``test_a_new_method_is_one_class`` shows that."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt._tree import nbytes

STEPS = 12
SETTINGS = hg.Settings(truncate=STEPS // 3, window=STEPS // 4, tol=1e-12, max_rounds=300, solve_iters=3000,
                       hoag_tol0=1e-12)


class Ridge(metaopt.MetaObjective):
    """Per-feature L2 penalties of a least-squares fit: ``hyper = {"log_lam": [d]}``; strongly convex
    (the implicit methods' optimum exists), float64. ``linear=True`` makes the inner loss linear in
    ``w`` (a constant gradient ``c(h)``), so SGD moves on a straight line at constant speed."""

    def __init__(self, linear: bool = False, d: int = 4, n: int = 40) -> None:
        g = torch.Generator().manual_seed(0)
        self.X = torch.randn(n, d, generator=g, dtype=torch.float64)
        self.y = self.X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
            n, generator=g, dtype=torch.float64)
        self.Xv = torch.randn(n, d, generator=g, dtype=torch.float64)
        self.yv = self.Xv @ torch.ones(d, dtype=torch.float64)
        self.linear = linear

    def init_params(self, hyper, generator):
        return {"w": 0.1 * torch.randn(self.X.shape[1], generator=generator, dtype=torch.float64)}

    def inner_loss(self, params, hyper, k, batch):
        lam = hyper["log_lam"].exp()
        if self.linear:
            return (lam * params["w"]).sum() - (self.X.T @ self.y / len(self.y) * params["w"]).sum()
        r = self.X @ params["w"] - self.y
        return 0.5 * (r * r).mean() + 0.5 * (lam * params["w"] ** 2).sum()

    def outer_loss(self, params, hyper, batch):
        r = self.Xv @ params["w"] - self.yv
        return 0.5 * (r * r).mean() + 1e-3 * (hyper["log_lam"] ** 2).sum()


class Frozen(metaopt.MetaObjective):
    """``objective`` with ``hyper`` replaced by ``fixed`` in ``init_params`` and the first ``start``
    inner steps: the function whose exact gradient truncation to the last ``n - start`` steps is."""

    def __init__(self, objective: metaopt.MetaObjective, fixed: dict[str, torch.Tensor], start: int) -> None:
        self.objective, self.fixed, self.start = objective, fixed, start

    def init_params(self, hyper, generator):
        return self.objective.init_params(self.fixed, generator)

    def inner_loss(self, params, hyper, k, batch):
        return self.objective.inner_loss(params, self.fixed if k < self.start else hyper, k, batch)

    def outer_loss(self, params, hyper, batch):
        return self.objective.outer_loss(params, hyper, batch)


HYPER = {"log_lam": torch.tensor([-1.0, -0.5, 0.0, -2.0], dtype=torch.float64)}


def problem_for(reference: str) -> tuple[Ridge, optim.Optimizer]:
    """The problem each reference is checked on: heavy-ball momentum (reversible learning needs it;
    every other method takes it too), or SGD on a linear inner loss for the straight-line reference."""
    if reference == "straight_line":
        return Ridge(linear=True), optim.sgd(lr=0.1)
    return Ridge(), optim.momentum(lr=0.3, momentum=0.5)


def reference_loss(reference: str, method: hg.Method, obj: Ridge, opt: optim.Optimizer, extras: dict) -> Any:
    """``h -> F(h)`` of the function the method differentiates (``extras``: the method's result's,
    e.g. random truncation's drawn end point)."""
    def run(o: metaopt.MetaObjective, h: dict[str, torch.Tensor], m: Any, steps: int = STEPS) -> float:
        return float(metaopt.hypergradient(o, opt, h, steps, method=m, generator=torch.Generator().manual_seed(5)).loss)

    if reference in ("unrolled", "straight_line", "smoothed"):  # smoothed: F itself (the loss is the unperturbed run's)
        return lambda h: run(obj, h, hg.Full())
    if reference == "truncated":
        return lambda h: run(Frozen(obj, HYPER, STEPS - method.k), h, hg.Full())
    if reference == "random_truncated":
        t = extras["t"]
        return lambda h: run(Frozen(obj, HYPER, t - method.window), h, hg.Full(), t)
    if reference == "stationary":
        return lambda h: run(obj, h, hg.Implicit("cg", tol=1e-13, inner_tol=1e-13, max_inner_rounds=500))
    raise AssertionError(f"no finite-difference reference for {reference!r}: add one here")


def five_point(f: Any, v: dict[str, torch.Tensor], eps: float = 1e-4) -> float:
    def at(t: float) -> float:
        return f({k: HYPER[k] + t * v[k] for k in HYPER})

    return (8 * (at(eps) - at(-eps)) - (at(2 * eps) - at(-2 * eps))) / (12 * eps)


# Monte Carlo methods ("smoothed"): enough particles that the standard error is a few percent of dF/dh here
# (PES's grows with its number of windows, STEPS / window = 4 here)
MAKE = {"es": lambda steps, s: hg.ES(particles=1024), "pes": lambda steps, s: hg.PES(window=3, particles=4096)}
SMOOTHED_K = 4.0  # a "smoothed" estimate is within this many standard errors of the exact dF/dh, per element
SMOOTHED_SE = 0.1  # ... and its standard error below this fraction of |dF/dh| (the check is not vacuous)


def check_smoothed(name: str, res: Any, f: Any) -> None:
    """A Monte Carlo estimate of the smoothed ``F``'s gradient against the exact ``dF/dh`` (the full
    unroll, itself checked against finite differences here): within ``SMOOTHED_K`` of its own
    standard errors per element (the smoothing's ``O(sigma^2)`` bias, ~1e-4 relative at sigma = 0.01,
    is far below them), with a fixed seed, so the outcome is deterministic."""
    exact = metaopt.hypergradient(*problem_for("unrolled"), HYPER, STEPS, method="full",
                                  generator=torch.Generator().manual_seed(5)).grads["log_lam"]
    v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
         for k, t in HYPER.items()}
    fd = five_point(f, v)
    assert abs(float((exact * v["log_lam"]).sum()) - fd) <= 1e-6 * max(abs(fd), 1e-3)
    se = res.extras["stderr"]["log_lam"]
    assert float(se.norm()) < SMOOTHED_SE * float(exact.norm()), f"{name}: stderr {se} too large to test"
    z = (res.grads["log_lam"] - exact).abs() / se
    assert (z <= SMOOTHED_K).all(), f"{name}: {z} standard errors from the full unroll"


def check_contract(entry: hg.methods.Entry) -> None:
    """The whole contract of one registered method (see the module)."""
    method = MAKE.get(entry.name, entry.make)(STEPS, SETTINGS)
    assert isinstance(method, hg.Method) and isinstance(method.name, str) and method.name
    method.validate(STEPS)
    reference = method.reference
    obj, opt = problem_for(reference)
    res = metaopt.hypergradient(obj, opt, HYPER, STEPS, method=method, generator=torch.Generator().manual_seed(5))
    assert res.grads.keys() == HYPER.keys() and res.grads["log_lam"].shape == HYPER["log_lam"].shape
    f = reference_loss(reference, method, obj, opt, res.extras)
    torch.testing.assert_close(torch.as_tensor(f(HYPER), dtype=torch.float64), res.loss.double(), rtol=1e-9, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    for _ in range(0 if reference == "smoothed" else 2):
        v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in HYPER.items()}
        fd = five_point(f, v)
        an = float((res.grads["log_lam"] * v["log_lam"]).sum())
        assert abs(an - fd) <= 1e-6 * max(abs(fd), 1e-3), f"{entry.name}: <dF/dh, v> = {an:.10g}, FD {fd:.10g}"
    if reference == "smoothed":
        check_smoothed(entry.name, res, f)

    # the memory claim, with what one recorded step saves (its constants included) measured exactly
    params0 = obj.init_params(HYPER, torch.Generator().manual_seed(0))
    state_bytes = nbytes(params0) + nbytes(opt.init(params0))
    one = metaopt.hypergradient(obj, opt, HYPER, STEPS, method=hg.Truncated(1), exact_memory=True)
    step_bytes = one.peak_bytes - state_bytes
    bound = method.peak_bound(STEPS, state_bytes, step_bytes, HYPER["log_lam"].numel())
    assert 0 <= res.peak_bytes <= bound, f"{entry.name}: peak {res.peak_bytes} B over its claim {bound:.0f} B"


@pytest.mark.parametrize("name", list(hg.registered()))
def test_registered_method_keeps_its_contract(name):
    check_contract(hg.registered()[name])


def test_truncation_is_biased_and_drmad_approximate_off_their_exact_cases():
    """The contract's references are not vacuous: off them, the biased methods differ from the
    exact unrolled hypergradient."""
    obj, opt = problem_for("unrolled")
    exact = metaopt.hypergradient(obj, opt, HYPER, STEPS, method="full").grads["log_lam"]
    for method in (hg.Truncated(STEPS // 3), hg.DrMAD(), hg.RandomTruncated(STEPS // 4, seed=1)):
        got = metaopt.hypergradient(obj, opt, HYPER, STEPS, method=method).grads["log_lam"]
        assert not torch.allclose(got, exact, rtol=1e-3), method


def test_a_new_method_is_one_class():
    """What docs/concepts.md shows: one class and ``register`` add a method that every entry point
    (the name table, configs, ``check``) knows, and the contract above tests it."""

    @dataclass(frozen=True)
    class Stepwise(hg.Method):
        """The full unroll with one vjp per inner step (one recorded step at a time)."""

        name: ClassVar[str] = "stepwise-toy"

        def run(self, problem, params0, outer):
            n, states = problem.steps, []
            params, state = params0, problem.optimizer.init(params0)
            for k in range(n):
                states.append((params, state))
                params, state = problem.advance(k, k + 1, params, state)
            loss, p_bar, grads = hg.problem.outer_partials(problem, params, outer)
            adjoint = hg.problem.final_adjoint(p_bar, state)
            for k in reversed(range(n)):
                _, _, segment = problem.record(k, k + 1, *states[k])
                adjoint = problem.sweep(segment, adjoint, grads)
            return hg.Sweep(loss, {k: p.detach() for k, p in params.items()}, grads, adjoint, problem.meter.peak)

    hg.register(Stepwise, in_check=False)
    try:
        assert "stepwise-toy" in hg.names()
        assert isinstance(hg.as_method("stepwise-toy"), Stepwise)
        check_contract(hg.registered()["stepwise-toy"])
        with pytest.raises(ValueError, match="registered already"):
            hg.register(Stepwise)
    finally:
        hg.unregister("stepwise-toy")
    assert "stepwise-toy" not in hg.names()


@pytest.mark.parametrize("seed", [4, 1])
def test_random_truncation_keeps_its_contract_at_the_window_and_inside(seed):
    """The contract at other draws than the registry's: ``t = W`` (seed 4: the whole run of ``W``
    steps recorded) and an interior ``t`` (seed 1: ``t = 8``)."""
    method = hg.RandomTruncated(STEPS // 4, seed=seed)
    t = hg.RandomTruncated(STEPS // 4, seed=seed).draw(STEPS)
    assert t == {4: STEPS // 4, 1: 8}[seed]
    check_contract(hg.methods.Entry("random_truncated", hg.RandomTruncated, lambda steps, s: method, ""))


def test_random_truncation_draws_cover_the_range_and_repeat_with_the_seed():
    """End points are uniform on ``[W, n]``, one object's sequence is repeated by the same seed (and
    not by another), and ``extras`` reports the draw: ``F(params[t])``, not ``F(params[n])``."""
    W, n = 3, 12
    method = hg.RandomTruncated(W, seed=7)
    draws = torch.tensor([method.draw(n) for _ in range(4000)])
    counts = torch.bincount(draws, minlength=n + 1)
    assert counts[:W].sum() == 0 and (counts[W:] > 0).all()
    expected = 4000 / (n - W + 1)
    assert ((counts[W:] - expected).abs() < 0.25 * expected).all(), counts
    again = hg.RandomTruncated(W, seed=7)
    assert [again.draw(n) for _ in range(50)] == draws[:50].tolist()
    other = hg.RandomTruncated(W, seed=8)
    assert [other.draw(n) for _ in range(50)] != draws[:50].tolist()

    obj, opt = problem_for("random_truncated")
    one, two = hg.RandomTruncated(W, seed=7), hg.RandomTruncated(W, seed=7)
    for k in range(3):
        a = metaopt.hypergradient(obj, opt, HYPER, n, method=one, generator=torch.Generator().manual_seed(k))
        b = metaopt.hypergradient(obj, opt, HYPER, n, method=two, generator=torch.Generator().manual_seed(k))
        assert a.extras == b.extras == {"t": int(draws[k]), "window": W}
        torch.testing.assert_close(a.grads, b.grads, rtol=0, atol=0)
    t = a.extras["t"]
    at_t = metaopt.hypergradient(obj, opt, HYPER, t, method=hg.Truncated(W), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.grads, at_t.grads, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.loss, at_t.loss, rtol=1e-12, atol=1e-14)


def test_random_truncation_settings_fail_clearly():
    with pytest.raises(ValueError, match="needs its window"):
        hg.as_method("random_truncated", STEPS)
    for window in (0, STEPS + 1, 2.5):
        with pytest.raises(ValueError, match=rf"needs 1 <= window <= steps = {STEPS}"):
            metaopt.hypergradient(Ridge(), optim.sgd(lr=0.1), HYPER, STEPS, method=hg.RandomTruncated(window))
    assert hg.as_method("random_truncated", STEPS, hg.Settings(window=5)).label == "random truncated (W=5)"


def test_random_truncation_reaches_a_meta_learned_init_only_at_t_equal_w():
    """At ``t = W`` the whole run is recorded and ``dF/dh`` flows through ``init_params`` too (the
    full unroll of ``W`` steps); at ``t > W`` the initialisation gets nothing."""

    class MetaInit(Ridge):
        def init_params(self, hyper, generator):
            return {"w": hyper["w0"]}

    obj, opt, W = MetaInit(), optim.momentum(lr=0.3, momentum=0.5), STEPS // 4
    hyper = {**HYPER, "w0": torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)}
    at_w = metaopt.hypergradient(obj, opt, hyper, STEPS, method=hg.RandomTruncated(W, seed=4))
    full = metaopt.hypergradient(obj, opt, hyper, W, method=hg.Full())
    assert at_w.extras["t"] == W
    torch.testing.assert_close(at_w.grads, full.grads, rtol=1e-12, atol=1e-14)
    inside = metaopt.hypergradient(obj, opt, hyper, STEPS, method=hg.RandomTruncated(W, seed=1))
    assert inside.extras["t"] == 8 and torch.all(inside.grads["w0"] == 0)
