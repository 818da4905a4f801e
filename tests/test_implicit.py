"""Implicit differentiation on ridge regression with per-feature penalties (closed form), float64."""

import pytest
import torch

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.hypergrad import solvers


class Ridge(metaopt.MetaObjective):
    """inner: mean squared error + sum_i exp(log_lam_i) w_i^2; outer: validation mean squared error."""

    def __init__(self, n=40, d=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.X, self.Xv = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        w_true = torch.randn(d, generator=g)
        self.y = self.X @ w_true + 0.5 * torch.randn(n, generator=g)
        self.yv = self.Xv @ w_true + 0.5 * torch.randn(n, generator=g)

    def init_params(self, hyper, generator):
        return {"w": torch.zeros(self.X.shape[1])}

    def inner_loss(self, params, hyper, k, batch):
        w = params["w"]
        return ((self.X @ w - self.y) ** 2).mean() + (hyper["log_lam"].exp() * w**2).sum()

    def outer_loss(self, params, hyper, batch):
        return ((self.Xv @ params["w"] - self.yv) ** 2).mean()

    def closed_form(self, log_lam):
        """w*(lambda) and dF/dlog_lam from the normal equations."""
        n = self.X.shape[0]
        lam = log_lam.exp()
        A = 2 * self.X.T @ self.X / n + 2 * torch.diag(lam)
        w = torch.linalg.solve(A, 2 * self.X.T @ self.y / n)
        dF_dw = 2 * self.Xv.T @ (self.Xv @ w - self.yv) / n
        v = torch.linalg.solve(A, dF_dw)
        return w, -(2 * lam * w) * v, A


LOG_LAM = torch.tensor([-2.0, -1.0, 0.0, -3.0, -1.5], dtype=torch.float64)
SGD = optim.sgd(lr=0.2)


def run(method, steps=300, **kw):
    return metaopt.hypergradient(Ridge(), SGD, {"log_lam": LOG_LAM}, steps, method=method, **kw)


@pytest.mark.parametrize("solver", ["cg", "neumann", "fixed_point", "dense"])
def test_implicit_matches_the_closed_form(solver):
    obj = Ridge()
    w, grad, _ = obj.closed_form(LOG_LAM)
    res = run(hg.Implicit(solver, tol=1e-12, inner_tol=1e-13))
    assert res.method == "implicit" and res.extras["converged"]
    torch.testing.assert_close(res.params["w"], w, rtol=0, atol=1e-11)
    torch.testing.assert_close(res.grads["log_lam"], grad, rtol=1e-8, atol=1e-12)
    assert res.extras["inner_grad_norm"] <= 1e-13


def test_cg_needs_far_fewer_matvecs_than_neumann():
    cg = run(hg.Implicit("cg", tol=1e-10, inner_tol=1e-13))
    ne = run(hg.Implicit("neumann", tol=1e-10, inner_tol=1e-13))
    torch.testing.assert_close(cg.grads["log_lam"], ne.grads["log_lam"], rtol=1e-8, atol=1e-12)
    assert cg.extras["matvecs"] <= 6  # d = 5: CG is exact in at most d steps
    assert ne.extras["matvecs"] > 5 * cg.extras["matvecs"]


def test_truncated_k_from_the_optimum_equals_the_k_term_neumann_series():
    obj, alpha, K = Ridge(), 0.2, 7
    w_star, _, _ = obj.closed_form(LOG_LAM)
    trunc = metaopt.hypergradient(obj, optim.sgd(lr=alpha), {"log_lam": LOG_LAM}, K, method=hg.Truncated(K),
                                  params0={"w": w_star})
    neumann = metaopt.hypergradient(obj, optim.sgd(lr=alpha), {"log_lam": LOG_LAM}, 1,
                                    method=hg.Implicit("neumann", alpha=alpha, tol=0.0,
                                                       maxiter=K), params0={"w": w_star})
    assert neumann.extras["iterations"] == K
    torch.testing.assert_close(trunc.grads["log_lam"], neumann.grads["log_lam"], rtol=1e-10, atol=1e-14)
    exact = run(hg.Implicit("cg", tol=1e-12, inner_tol=1e-13)).grads["log_lam"]
    assert not torch.allclose(trunc.grads["log_lam"], exact, rtol=1e-3)  # K terms are not yet the inverse


def test_hoag_converges_with_warm_starts():
    obj = Ridge()
    hoag = hg.HOAG(tol0=1e-2, decrease=0.5)  # one object for the outer loop: it keeps the warm starts
    errors, iters = [], []
    for _ in range(25):
        res = metaopt.hypergradient(obj, SGD, {"log_lam": LOG_LAM}, 20, method=hoag)
        _, grad, _ = obj.closed_form(LOG_LAM)
        errors.append(float((res.grads["log_lam"] - grad).norm() / grad.norm()))
        iters.append(res.extras["iterations"])
    assert errors[0] > 1e-4 and errors[-1] < 1e-9  # the tolerance shrinks, the answer sharpens
    assert hoag.params is not None and hoag.adjoint is not None
    assert max(iters[-5:]) <= 2  # warm-started from the previous adjoint
    assert hoag.t == 25 and res.method == "hoag"


def test_cg_refuses_non_positive_curvature():
    A = torch.diag(torch.tensor([1.0, -2.0, 3.0]))
    with pytest.raises(solvers.NonPositiveCurvature, match="set damping > 0"):
        solvers.cg(lambda v: A @ v, torch.ones(3))
    x, info = solvers.cg(lambda v: A @ v, torch.ones(3), damping=3.0)
    torch.testing.assert_close((A + 3 * torch.eye(3)) @ x, torch.ones(3))


def test_solvers_agree_on_a_random_spd_system():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(8, 8, generator=g)
    A = M @ M.T + 0.5 * torch.eye(8)
    b = torch.randn(8, generator=g)
    exact = torch.linalg.solve(A, b)
    for solve in (solvers.cg, solvers.neumann, solvers.dense):
        x, info = solve(lambda v: A @ v, b, tol=1e-11, maxiter=100000)
        torch.testing.assert_close(x, exact, rtol=1e-8, atol=1e-10)
        assert info.converged
    with pytest.raises(ValueError, match="diverged"):
        solvers.neumann(lambda v: A @ v, b, alpha=10.0)


def test_custom_root_makes_any_solver_implicitly_differentiable():
    obj = Ridge()
    n = obj.X.shape[0]

    def inner(w, h):
        return ((obj.X @ w["w"] - obj.y) ** 2).mean() + (h["log_lam"].exp() * w["w"] ** 2).sum()

    calls = {"n": 0}

    @hg.custom_root(lambda w, h: torch.func.grad(inner)(w, h))
    def closed_form(h):  # any solver at all: here the normal equations, with no graph
        calls["n"] += 1
        A = 2 * obj.X.T @ obj.X / n + 2 * torch.diag(h["log_lam"].exp())
        return {"w": torch.linalg.solve(A, 2 * obj.X.T @ obj.y / n)}

    log_lam = LOG_LAM.clone().requires_grad_()
    w = closed_form({"log_lam": log_lam})
    obj.outer_loss(w, None, None).backward()
    _, exact, _ = obj.closed_form(LOG_LAM)
    torch.testing.assert_close(log_lam.grad, exact, rtol=1e-9, atol=1e-13)
    assert calls["n"] == 1
    with pytest.raises(ValueError, match="unknown solver 'qr'"):
        hg.custom_root(lambda w, h: w, solver="qr")


def test_custom_root_with_an_optimizers_residual_sees_its_weight_decay():
    """``opt.residual`` as the optimality condition: the root where sgd with a learnable decay stops."""
    obj = Ridge()
    n, d = obj.X.shape
    opt = optim.sgd(lr=0.1)

    def inner(w, h):
        return ((obj.X @ w["w"] - obj.y) ** 2).mean() + (h["log_lam"].exp() * w["w"] ** 2).sum()

    def optimality(w, h):
        return opt.residual(torch.func.grad(inner)(w, h), w, step=0, weight_decay=h["log_wd"].exp())

    def A(h):
        return 2 * obj.X.T @ obj.X / n + torch.diag(2 * h["log_lam"].exp() + h["log_wd"].exp())

    @hg.custom_root(optimality)
    def solve(h):
        return {"w": torch.linalg.solve(A(h), 2 * obj.X.T @ obj.y / n)}

    h = {"log_lam": LOG_LAM.clone().requires_grad_(), "log_wd": torch.tensor(-0.5, dtype=torch.float64,
                                                                             requires_grad=True)}
    got = torch.autograd.grad(obj.outer_loss(solve(h), None, None), list(h.values()))
    hc = {k: v.detach().clone().requires_grad_() for k, v in h.items()}
    w = torch.linalg.solve(A(hc), 2 * obj.X.T @ obj.y / n)  # differentiable closed form
    exact = torch.autograd.grad(obj.outer_loss({"w": w}, None, None), list(hc.values()))
    for g, e in zip(got, exact):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-13)
    assert abs(float(got[1])) > 1e-3
