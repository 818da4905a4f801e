"""Hypergradients of hypergradients: ``create_graph=True`` and :class:`metaopt.Level`, checked in
float64 against five-point finite differences of the level above's loss (three and four levels)."""

import pytest
import torch
import torch.nn.functional as F
from test_implicit import LOG_LAM, SGD, Ridge

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.optim import schedule

N_INNER, T = 6, 3


def data(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, ((x[:, 0] * x[:, 1]) > 0).double()


X_VAL, Y_VAL = data(0)


class Distill(metaopt.MetaObjective):
    """Level 1: a fresh tanh MLP trained on synthetic points ``h["x"]`` with a learnable per-step
    learning rate ``softplus(h["lr"][k])``; the validation loss reads ``h["temp"]`` when present."""

    y_syn = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)

    def init_params(self, hyper, generator):
        return {"w1": torch.randn(2, 6, generator=generator) * 0.7, "b1": torch.zeros(6),
                "w2": torch.randn(6, generator=generator) * 0.4}

    def predict(self, params, x):
        return torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]

    def inner_loss(self, params, hyper, k, batch):
        return F.binary_cross_entropy_with_logits(self.predict(params, hyper["x"]), self.y_syn)

    def outer_loss(self, params, hyper, batch):
        return F.binary_cross_entropy_with_logits(self.predict(params, X_VAL), Y_VAL)

    def hparams(self, hyper):
        return {"lr": schedule.table(hyper["lr"], positive="softplus")}


X0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


class MetaDistill(metaopt.Level):
    """Level 2: SGD on ``h = {x, lr}`` with learning rate ``exp(lam["log_meta_lr"])`` from the initial
    schedule ``lam["lr0"]``."""

    def init_params(self, lam, generator):
        return {"x": X0, "lr": lam["lr0"]}

    def hparams(self, lam):
        return {"lr": lam["log_meta_lr"].exp()}


LAM = {"log_meta_lr": torch.tensor(-0.5, dtype=torch.float64), "lr0": torch.full((N_INNER,), 0.3, dtype=torch.float64)}


def level3(lower_method="full", method="full", lam=LAM, seed=1):
    level2 = MetaDistill(Distill(), optim.momentum(momentum=0.5), N_INNER, method=lower_method)
    return metaopt.hypergradient(level2, optim.sgd(), lam, T, method=method,
                                 generator=torch.Generator().manual_seed(seed))


def assert_fd(grads, f, lam, directions=2, rtol=1e-6, eps=1e-4):
    """``<grads, v>`` against the five-point central difference of ``f`` along random ``v``."""
    g = torch.Generator().manual_seed(7)
    for _ in range(directions):
        v = {k: torch.randn(t.shape, generator=g) for k, t in lam.items()}

        def at(e, v=v):
            return float(f({k: lam[k] + e * v[k] for k in lam}))

        fd = (8 * (at(eps) - at(-eps)) - (at(2 * eps) - at(-2 * eps))) / (12 * eps)
        an = float(sum((grads[k] * v[k]).sum() for k in lam))
        assert abs(an - fd) <= rtol * abs(fd), (an, fd)


@pytest.mark.parametrize("lower", ["full", "truncated", "checkpointed"])
def test_three_level_distillation_matches_finite_differences(lower):
    lower_method = hg.Truncated(3) if lower == "truncated" else lower
    res = level3(lower_method)
    assert set(res.grads) == set(LAM) and all(g.abs().sum() > 0 for g in res.grads.values())
    assert_fd(res.grads, lambda lam: level3(lower_method, lam=lam).loss, LAM)


def test_the_top_level_may_use_any_trajectory_policy():
    full = level3()
    for method in (hg.Checkpointed(1), hg.Checkpointed(2)):
        res = level3(method=method)
        for k in LAM:
            torch.testing.assert_close(res.grads[k], full.grads[k], rtol=1e-10, atol=1e-13)
    truncated = level3(method=hg.Truncated(1))  # the level-3 truncation: lr0 is only seen through step 0
    assert truncated.grads["lr0"].abs().max() == 0 and truncated.grads["log_meta_lr"] != 0


@pytest.mark.parametrize("method", ["full", "truncated", "checkpointed"])
def test_create_graph_gives_the_hessian_of_the_bilevel_loss(method):
    """d/dh <dF/dh, u> (a Hessian-vector product of F) against finite differences of the hypergradient
    itself, and the values equal the plain call's bit for bit."""
    m = hg.Truncated(3) if method == "truncated" else method
    obj, opt = Distill(), optim.momentum(momentum=0.5)
    h0 = {"x": X0, "lr": torch.full((N_INNER,), 0.3)}

    def call(h, create_graph=False):
        return metaopt.hypergradient(obj, opt, h, N_INNER, method=m, create_graph=create_graph,
                                     generator=torch.Generator().manual_seed(5))

    h = {k: v.clone().requires_grad_() for k, v in h0.items()}
    res, plain = call(h, create_graph=True), call(h0)
    assert res.grads["x"].requires_grad and res.loss.requires_grad
    for k in h0:  # checkpointed: the same sums, grouped by segment
        torch.testing.assert_close(res.grads[k].detach(), plain.grads[k], rtol=1e-13, atol=1e-15)
    u = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(9)) for k, v in h0.items()}
    s = sum((res.grads[k] * u[k]).sum() for k in h0)
    hvp = dict(zip(h, torch.autograd.grad(s, list(h.values()))))
    assert_fd(hvp, lambda hh: sum((call(hh).grads[k] * u[k]).sum() for k in h0), h0)


@pytest.mark.parametrize("solver", ["cg", "neumann", "dense"])
def test_implicit_hypergradient_is_differentiable(solver):
    """Ridge: the derivative of the implicit hypergradient equals autograd through the closed form."""
    lam = LOG_LAM.clone().requires_grad_()
    res = metaopt.hypergradient(Ridge(), SGD, {"log_lam": lam}, 300, create_graph=True,
                                method=hg.Implicit(solver, tol=1e-13, inner_tol=1e-13))
    u = torch.linspace(-1, 1, 5)
    ours = torch.autograd.grad((res.grads["log_lam"] * u).sum(), lam, retain_graph=True)[0]
    lam2 = LOG_LAM.clone().requires_grad_()
    exact = torch.autograd.grad((Ridge().closed_form(lam2)[1] * u).sum(), lam2)[0]
    torch.testing.assert_close(ours, exact, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(res.loss, lam)[0], Ridge().closed_form(LOG_LAM)[1])


class RidgeLevel(metaopt.Level):
    """Level 2 over ridge: the penalties ``log_lam`` by SGD from ``lam["start"]``; level 3 also learns
    the strength of a pull of ``log_lam`` towards -1."""

    def init_params(self, lam, generator):
        return {"log_lam": lam["start"]}

    def penalty(self, params, lam):
        return lam["pull"] * ((params["log_lam"] + 1) ** 2).sum()


def test_three_levels_with_an_implicit_level_one():
    lam = {"start": LOG_LAM.clone(), "pull": torch.tensor(0.01)}
    level2 = RidgeLevel(Ridge(), SGD, 200, method=hg.Implicit("cg", tol=1e-13, inner_tol=1e-13))
    res = metaopt.hypergradient(level2, optim.sgd(lr=2.0), lam, 3)
    assert_fd(res.grads, lambda x: metaopt.hypergradient(level2, optim.sgd(lr=2.0), x, 3).loss, lam, rtol=1e-6)


class Outer(metaopt.Level):
    """Level 3 of a four-level problem: learns level 3's own starting meta-learning rate."""

    def init_params(self, mu, generator):
        return {"log_meta_lr": mu["a"], "lr0": torch.full((N_INNER,), 0.3)}


def test_four_levels():
    level2 = MetaDistill(Distill(), optim.sgd(), N_INNER)
    level3_ = Outer(level2, optim.sgd(lr=0.5), 2)
    mu = {"a": torch.tensor(-0.5)}
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    res = metaopt.hypergradient(level3_, optim.sgd(lr=0.3), mu, 2, generator=gen())
    assert_fd(res.grads, lambda m: metaopt.hypergradient(level3_, optim.sgd(lr=0.3), m, 2, generator=gen()).loss,
              mu, directions=1)


@pytest.mark.parametrize("method", ["reversible", "forward", "drmad", "fixed_point"])
def test_methods_that_cannot_nest_say_so(method):
    obj, h = Distill(), {"x": X0, "lr": torch.full((N_INNER,), 0.3)}
    with pytest.raises(ValueError, match="use one of full, checkpointed, truncated"):
        metaopt.hypergradient(obj, optim.sgd(), h, N_INNER, method=method, create_graph=True)
    with pytest.raises(ValueError, match="use one of full, checkpointed, truncated"):
        MetaDistill(Distill(), optim.sgd(), N_INNER, method=method)
    level2 = MetaDistill(Distill(), optim.sgd(), N_INNER)
    with pytest.raises(ValueError, match="does not support nesting: a Level objective"):
        metaopt.hypergradient(level2, optim.sgd(), LAM, T, method=method)


def test_compile_does_not_nest():
    obj, h = Distill(), {"x": X0, "lr": torch.full((N_INNER,), 0.3)}
    with pytest.raises(ValueError, match="compile=True does not combine with create_graph=True.*compile=False"):
        metaopt.hypergradient(obj, optim.sgd(), h, N_INNER, create_graph=True, compile=True)
    level2 = MetaDistill(Distill(), optim.sgd(), N_INNER)
    with pytest.raises(ValueError, match="compile=True does not combine with a Level"):
        metaopt.hypergradient(level2, optim.sgd(), LAM, T, compile=True)
