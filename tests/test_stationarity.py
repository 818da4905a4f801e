"""Stationarity comes from the optimizer: the implicit methods, HOAG and ``train(tol=)`` solve and
differentiate the optimizer's fixed-point residual (its weight decay included), float64."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.models import MLP
from metaopt.optim import schedule

F64 = torch.float64
EXACT = ["cg", "neumann", "dense", "fixed_point", "hoag"]


class Ridge(metaopt.MetaObjective):
    """inner: mse(X w + b, y) [+ exp(log_lam) |w|^2]; outer: validation mse; ``hparams(h)`` gives the
    optimizer's weight decay (``decay(h, k)``: a value, a per-parameter dict or a schedule value)."""

    def __init__(self, lam=True, decay=None, n=50, d=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.X, self.Xv = (torch.randn(n, d, generator=g, dtype=F64) for _ in range(2))
        w = torch.randn(d, generator=g, dtype=F64)
        self.y = self.X @ w + 0.5 * torch.randn(n, generator=g, dtype=F64)
        self.yv = self.Xv @ w + 0.5 * torch.randn(n, generator=g, dtype=F64)
        self.lam, self.decay = lam, decay

    def init_params(self, hyper, generator):
        return {"w": torch.zeros(self.X.shape[1], dtype=F64), "b": torch.zeros((), dtype=F64)}

    def inner_loss(self, params, hyper, k, batch):
        loss = ((self.X @ params["w"] + params["b"] - self.y) ** 2).mean()
        return loss + (hyper["log_lam"].exp() * params["w"] ** 2).sum() if self.lam else loss

    def outer_loss(self, params, hyper, batch):
        return ((self.Xv @ params["w"] + params["b"] - self.yv) ** 2).mean()

    def hparams(self, hyper):
        return {} if self.decay is None else {"weight_decay": self.decay(hyper)}

    def closed_form(self, hyper, wd_w, wd_b):
        """F at the optimum of mse + lam |w|^2 + (wd_w |w|^2 + wd_b b^2) / 2 (differentiable in hyper)."""
        n, d = self.X.shape
        Z = torch.cat([self.X, torch.ones(n, 1, dtype=F64)], 1)
        lam = hyper["log_lam"].exp() if self.lam else torch.zeros((), dtype=F64)
        diag = torch.cat([(2 * lam + wd_w).expand(d), torch.as_tensor(wd_b, dtype=F64).reshape(1)])
        theta = torch.linalg.solve(2 * Z.T @ Z / n + torch.diag(diag), 2 * Z.T @ self.y / n)
        return ((torch.cat([self.Xv, torch.ones(n, 1, dtype=F64)], 1) @ theta - self.yv) ** 2).mean()


def closed_grad(obj, hyper, decay_of):
    """dF/dh of the closed form, ``decay_of(h) -> (wd_w, wd_b)``."""
    h = {k: v.clone().requires_grad_() for k, v in hyper.items()}
    return dict(zip(h, torch.autograd.grad(obj.closed_form(h, *decay_of(h)), list(h.values()))))


def method(name):
    if name == "hoag":
        return hg.HOAG(tol0=1e-12, min_tol=1e-12)
    return hg.Implicit(name, tol=1e-12, inner_tol=1e-12)


def run(obj, opt, hyper, name, steps):
    return metaopt.hypergradient(obj, opt, hyper, steps, method=name if name == "full" else method(name),
                                 generator=torch.Generator().manual_seed(0))


def t(x):
    return torch.tensor(x, dtype=F64)


LOG_LAM, LOG_WD = t(-1.0), t(math.log(0.5))
# (objective, optimizer, hyper, decay of the closed form): the four ways a weight decay reaches the problem
CASES = {
    "constant": (lambda: Ridge(), lambda: optim.sgd(lr=0.1, weight_decay=0.5), {"log_lam": LOG_LAM},
                 lambda h: (0.5, 0.5)),
    "learnable": (lambda: Ridge(decay=lambda h: h["log_wd"].exp()), lambda: optim.sgd(lr=0.1),
                  {"log_lam": LOG_LAM, "log_wd": LOG_WD}, lambda h: (h["log_wd"].exp(), h["log_wd"].exp())),
    "per_parameter": (lambda: Ridge(decay=lambda h: {"w": h["log_wd"].exp(), "b": 0.0}), lambda: optim.sgd(lr=0.1),
                      {"log_lam": LOG_LAM, "log_wd": LOG_WD}, lambda h: (h["log_wd"].exp(), 0.0)),
    "decay_only": (lambda: Ridge(lam=False, decay=lambda h: h["log_wd"].exp()), lambda: optim.sgd(lr=0.1),
                   {"log_wd": LOG_WD}, lambda h: (h["log_wd"].exp(), h["log_wd"].exp())),
    # a schedule whose value changes with k: the residual reads step n - 1's value
    "schedule": (lambda: Ridge(decay=lambda h: lambda k: h["log_wd"].exp() * (3.0 if k < 40 else 1.0)),
                 lambda: optim.sgd(lr=0.1), {"log_lam": LOG_LAM, "log_wd": LOG_WD},
                 lambda h: (h["log_wd"].exp(), h["log_wd"].exp())),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_finds_the_decayed_optimum(case):
    make_obj, make_opt, hyper, decay_of = CASES[case]
    obj = make_obj()
    exact = closed_grad(obj, hyper, decay_of)
    full = run(obj, make_opt(), hyper, "full", 300).grads
    for k in hyper:
        torch.testing.assert_close(full[k], exact[k], rtol=1e-9, atol=1e-12)
        assert abs(float(exact[k])) > 0.05  # the decay's share is not zero (it was, before)
    for name in EXACT:
        res = run(obj, make_opt(), hyper, name, 300 if case == "schedule" else 100)
        assert res.extras["inner_grad_norm"] <= 1e-12  # the residual's norm, decay included
        for k in hyper:
            torch.testing.assert_close(res.grads[k], exact[k], rtol=1e-9, atol=1e-12, msg=f"{name} {k}")
            torch.testing.assert_close(res.grads[k], full[k], rtol=1e-10, atol=1e-12, msg=f"{name} vs full {k}")


def test_the_issue_reproduction_in_numbers():
    """Ridge 50 x 5, sgd(lr=0.1), weight_decay = exp(log_wd) = 0.5 through hparams: cg used to give
    a decay-free value and exactly 0 for log_wd."""
    obj, _, hyper, decay_of = CASES["learnable"][0](), None, CASES["learnable"][2], CASES["learnable"][3]
    exact = closed_grad(obj, hyper, decay_of)
    res = run(obj, optim.sgd(lr=0.1), hyper, "cg", 100)
    assert float(res.grads["log_wd"]) == pytest.approx(float(exact["log_wd"]), rel=1e-9)
    assert float(res.grads["log_wd"]) == pytest.approx(1.410272, abs=1e-6)


@pytest.mark.parametrize("make", [
    lambda: optim.momentum(lr=0.05, momentum=0.5, weight_decay=0.5),
    lambda: optim.nesterov(lr=0.05, momentum=0.5, weight_decay=0.5),
    lambda: optim.adam(lr=0.02, b2=0.99, eps=0.1, weight_decay=0.5),
], ids=["momentum", "nesterov", "adam"])
def test_coupled_decay_of_every_family(make):
    obj, hyper = Ridge(), {"log_lam": LOG_LAM}
    exact = closed_grad(obj, hyper, lambda h: (0.5, 0.5))
    for name in ("cg", "fixed_point"):
        res = run(obj, make(), hyper, name, 400)
        assert res.extras["inner_rounds"] <= 3
        torch.testing.assert_close(res.grads["log_lam"], exact["log_lam"], rtol=1e-9, atol=1e-12)


def test_adamw_decoupled_decay_matches_the_long_full_unroll():
    """AdamW's fixed point phi(g) + wd w = 0 (eps = 0.1): the implicit hypergradient through the
    decoupled residual equals the full unroll trained to that point, for lambda and for wd."""
    obj = Ridge(decay=lambda h: h["log_wd"].exp())
    hyper = {"log_lam": LOG_LAM, "log_wd": LOG_WD}
    opt = optim.adamw(lr=0.02, b2=0.9, eps=0.1, weight_decay=0.0)
    steps = 700
    full = run(obj, opt, hyper, "full", steps)
    p = {k: v.detach().requires_grad_() for k, v in full.params.items()}
    g = obj.inner_value_and_grad(p, hyper, steps - 1, None, create_graph=False)[1]
    r = opt.residual(g, full.params, step=steps - 1, **obj.hparams(hyper))
    assert max(float(x.abs().max()) for x in r.values()) < 1e-13  # the run reached the residual's zero
    assert float(g["w"].norm()) > 0.1  # ... which is not a zero of the gradient
    for name in ("cg", "dense", "fixed_point"):
        res = run(obj, opt, hyper, name, steps)
        for k in hyper:
            torch.testing.assert_close(res.grads[k], full.grads[k], rtol=1e-8, atol=1e-11, msg=f"{name} {k}")
    assert abs(float(full.grads["log_wd"])) > 0.1


def test_adamw_residual_jacobian_is_symmetric_and_refuses_without_a_fixed_point():
    opt = optim.adamw(eps=0.1, eps_root=1e-4, weight_decay=0.5)
    A = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    A = A @ A.T

    def r(w):
        return opt.residual({"w": A @ w}, {"w": w}, step=0)["w"]

    J = torch.autograd.functional.jacobian(r, t([0.3, -1.2, 0.0, 1.9]))
    torch.testing.assert_close(J, J.T, rtol=0, atol=1e-13)
    assert torch.linalg.eigvalsh(J - A).min() > 0  # the decay adds positive curvature
    with pytest.raises(ValueError, match=r"adamw: \|weight_decay \* w\| reaches 1.5 >= 1 on parameter 'w'"):
        r(t([3.0, 0.0, 0.0, 0.0]))


def test_train_to_tolerance_stops_with_a_decay():
    obj, hyper = CASES["learnable"][0](), CASES["learnable"][2]
    calls = [0]
    inner = obj.inner_loss

    def counting(*args):
        calls[0] += 1
        return inner(*args)

    obj.inner_loss = counting
    params = hg.train(obj, optim.sgd(lr=0.1), hyper, 100, torch.Generator().manual_seed(0), tol=1e-8, max_rounds=50)
    assert calls[0] <= 3 * 101  # was 50 rounds (5050 calls): the decay kept ||grad|| away from 0
    obj.inner_loss = inner
    w = {k: v.requires_grad_() for k, v in params.items()}
    g = obj.inner_value_and_grad(w, hyper, 99, None, create_graph=False)[1]
    assert float((g["w"] + 0.5 * params["w"]).detach().norm()) <= 1e-8 < float(g["w"].norm())


def test_create_graph_differentiates_the_decayed_hypergradient():
    """The Hessian of F in (log_lam, log_wd) through create_graph=True, against the closed form's and
    against central differences of the implicit gradient."""
    obj, hyper, decay_of = CASES["learnable"][0](), CASES["learnable"][2], CASES["learnable"][3]
    names = list(hyper)
    h = {k: v.clone().requires_grad_() for k, v in hyper.items()}
    res = metaopt.hypergradient(obj, optim.sgd(lr=0.1), h, 100, method=method("cg"), create_graph=True,
                                generator=torch.Generator().manual_seed(0))
    H = torch.stack([torch.stack(torch.autograd.grad(res.grads[a], [h[b] for b in names], retain_graph=True))
                     for a in names])
    hc = {k: v.clone().requires_grad_() for k, v in hyper.items()}
    first = torch.autograd.grad(obj.closed_form(hc, *decay_of(hc)), list(hc.values()), create_graph=True)
    exact = torch.stack([torch.stack(torch.autograd.grad(f, list(hc.values()), retain_graph=True)) for f in first])
    torch.testing.assert_close(H, exact, rtol=1e-8, atol=1e-10)
    eps = 1e-5
    for j, b in enumerate(names):
        up = run(obj, optim.sgd(lr=0.1), {**hyper, b: hyper[b] + eps}, "cg", 100).grads
        down = run(obj, optim.sgd(lr=0.1), {**hyper, b: hyper[b] - eps}, "cg", 100).grads
        for i, a in enumerate(names):
            assert float(H[i, j]) == pytest.approx(float(up[a] - down[a]) / (2 * eps), rel=1e-6, abs=1e-8)


def test_a_hand_made_optimizer_is_refused_by_the_residual_methods():
    obj, hyper = CASES["constant"][0](), CASES["constant"][2]
    sgd = optim.sgd(lr=0.1, weight_decay=0.5)
    hand_made = optim.Optimizer(sgd.init, sgd.update, sgd.defaults)
    assert hand_made.residual is None
    for name in ("cg", "neumann", "dense", "hoag"):
        with pytest.raises(ValueError, match="does not state.*use one of full, .*fixed_point$") as e:
            run(obj, hand_made, hyper, name, 100)
        assert "\n" not in str(e.value)
        assert method(name).skip_reason(hand_made, 1) == str(e.value)
    exact = closed_grad(obj, hyper, lambda h: (0.5, 0.5))
    res = metaopt.hypergradient(obj, hand_made, hyper, 300, method=hg.Implicit("fixed_point", tol=1e-12),
                                generator=torch.Generator().manual_seed(0))  # iterates update itself: right
    torch.testing.assert_close(res.grads["log_lam"], exact["log_lam"], rtol=1e-9, atol=1e-12)
    assert method("fixed_point").skip_reason(hand_made, 1) is None


def test_hyper_in_another_dtype_than_the_params_is_refused():
    obj = Ridge()
    with pytest.raises(TypeError, match=r"hyper\['log_lam'\] is torch.float32 but the inner params are torch.float64"
                                        r".*hyper\['log_lam'\].to\(torch.float64\)"):
        metaopt.hypergradient(obj, optim.sgd(lr=0.1), {"log_lam": LOG_LAM.float()}, 5)


# -- argument checks at construction ---------------------------------------------------------------

BAD = [
    (lambda: optim.sgd(lr=-0.1), ValueError, r"optim.sgd\(lr=...\): lr must satisfy 0 <= lr, got -0.1"),
    (lambda: optim.sgd(lr=float("nan")), ValueError, "lr must be finite, got nan"),
    (lambda: optim.sgd(lr=0.1, weight_decay=float("inf")), ValueError, "weight_decay must be finite"),
    (lambda: optim.sgd(lr=0.1, weight_decay=-1e-4), ValueError, "0 <= weight_decay"),
    (lambda: optim.momentum(momentum=1.0), ValueError, r"optim.momentum\(momentum=...\): .*momentum < 1, got 1.0"),
    (lambda: optim.nesterov(momentum=-0.5), ValueError, "0 <= momentum < 1"),
    (lambda: optim.adam(b1=1.5), ValueError, r"optim.adam\(b1=...\): b1 must satisfy 0 <= b1 < 1, got 1.5"),
    (lambda: optim.adam(b2=1.0), ValueError, "0 <= b2 < 1"),
    (lambda: optim.adam(eps=-1e-8), ValueError, "0 <= eps,"),
    (lambda: optim.adam(eps_root=-1.0), ValueError, "0 <= eps_root"),
    (lambda: optim.adamw(weight_decay=float("nan")), ValueError, r"optim.adamw\(weight_decay=...\): .* finite"),
    (lambda: optim.sgd(lr=t([0.1, -0.2])), ValueError, r"lr must satisfy 0 <= lr, got a tensor with values in"),
    (lambda: optim.sgd(lr={"w": 0.1, "b": -1.0}), ValueError, r"optim.sgd\(lr\['b'\]=...\)"),
    (lambda: optim.AdamSpec(b1=2.0), ValueError, "0 <= b1 < 1"),
    (lambda: optim.SGDSpec(lr=0.1, momentum=1.0), ValueError, "momentum < 1"),
    (lambda: optim.sgd(nesterov=True), ValueError, "nesterov=True needs a momentum"),
]


@pytest.mark.parametrize("build, error, match", BAD)
def test_bad_optimizer_arguments_are_refused_at_construction(build, error, match):
    with pytest.raises(error, match=match) as e:
        build()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("build", [
    lambda m: optim.adam(m.parameters()),
    lambda m: optim.AdamSpec(m.parameters()),
    lambda m: optim.SGDSpec(m.parameters(), lr=0.1),
    lambda m: optim.sgd(list(m.parameters()), momentum=0.9),
    lambda m: optim.adamw([{"params": m.parameters()}]),
])
def test_torch_optim_style_parameter_lists_are_refused(build):
    """The functional optimizers and specs called torch.optim's way name the torch-shaped class."""
    with pytest.raises(TypeError, match=r"for torch.optim's shape write optim.(SGD|Adam|AdamW)\(model.parameters\(\), "
                                        r"lr=...\) \(see docs/optim.md\)") as e:
        build(MLP([2, 3, 1]))
    assert "\n" not in str(e.value)


def test_valid_edge_values_and_forms_still_build():
    for opt in (optim.sgd(lr=0.0), optim.momentum(momentum=0.0), optim.adam(b1=0.0, b2=0.0, eps=0.0),
                optim.sgd(lr=schedule.cosine(0.1, 10)), optim.sgd(lr=t([0.1, 0.0]).requires_grad_()),
                optim.adamw(weight_decay={"w": t(0.1), "b": 0.0})):
        assert opt.residual is not None
    lrs = t([0.1, 0.2, 0.3])  # an optimizer built inside vmap: its batched values are not read
    out = vmap(lambda lr: optim.sgd(lr=lr).update({"w": torch.ones(2, dtype=F64)}, {},
                                                  {"w": torch.zeros(2, dtype=F64)}, step=0)[0]["w"])(lrs)
    torch.testing.assert_close(out[:, 0], -lrs)


@settings(max_examples=60, deadline=None)
@given(x=st.floats(allow_nan=True, allow_infinity=True))
def test_range_checks_hold_for_every_float(x):
    """sgd(lr=x) builds iff x is finite and >= 0; adam(b2=x) iff 0 <= x < 1; refusals are one line
    naming the argument."""
    for build, ok in ((lambda: optim.sgd(lr=x), math.isfinite(x) and x >= 0),
                      (lambda: optim.adam(b2=x), math.isfinite(x) and 0 <= x < 1)):
        if ok:
            build()
        else:
            with pytest.raises(ValueError, match=r"^optim\.(sgd\(lr|adam\(b2)=\.\.\.\): [^\n]*$"):
                build()


@pytest.mark.parametrize("name", ["cg", "hoag"])
def test_an_inner_run_that_misses_inner_tol_warns(name):
    """AdamW's short rounds restart its bias correction and never reach the fixed point: the call
    returns its number with a NotStationaryWarning and extras['inner_converged'] False; SGD's
    converged run neither warns nor flags."""
    obj = Ridge(decay=lambda h: h["log_wd"].exp())
    hyper = {"log_lam": LOG_LAM, "log_wd": LOG_WD}
    short = hg.Implicit("cg", tol=1e-12, inner_tol=1e-10, max_inner_rounds=3) if name == "cg" else hg.HOAG(
        tol0=1e-10, min_tol=1e-10, max_inner_rounds=3)
    with pytest.warns(hg.NotStationaryWarning, match=r"inner_tol = 1e-10 after 3 rounds of 20 steps"):
        res = metaopt.hypergradient(obj, optim.adamw(lr=0.02, b2=0.9, eps=0.1, weight_decay=0.0), hyper, 20,
                                    method=short, generator=torch.Generator().manual_seed(0))
    assert res.extras["inner_rounds"] == 3 and res.extras["inner_grad_norm"] > 1e-10
    if name == "cg":
        assert res.extras["inner_converged"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.NotStationaryWarning)
        ok = run(obj, optim.sgd(lr=0.1), hyper, name, 50)
    assert ok.extras["inner_grad_norm"] <= 1e-12 and ok.extras["inner_converged"] is True
