"""Differentiable optimizers: equal to torch.optim, composable with vmap, hyperparameter forms, schedules."""

import math

import pytest
import torch
from problems import train_beside_torch
from torch.func import vmap

from metaopt import optim
from metaopt.models import MLP
from metaopt.optim import schedule

CASES = [
    (lambda: optim.sgd(lr=0.1, weight_decay=0.01), lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01)),
    (lambda: optim.momentum(lr=0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (
        lambda: optim.nesterov(lr=0.05, momentum=0.8, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
    ),
    (
        lambda: optim.adam(lr=0.01, eps_root=0.0, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    ),
    (
        lambda: optim.adamw(lr=0.01, eps_root=0.0, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ),
]


@pytest.mark.parametrize("ours, theirs", CASES)
def test_trains_an_nn_module_like_torch_optim(ours, theirs):
    torch.manual_seed(0)
    model = MLP([3, 8, 2])
    ref = MLP([3, 8, 2])
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 3), torch.randn(32, 2)
    params = train_beside_torch(ours(), theirs(ref.parameters()), model, ref, x, y, 20)
    for n, v in ref.named_parameters():
        torch.testing.assert_close(params[n], v.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [optim.sgd, optim.momentum, optim.nesterov, optim.adam])
def test_vmap_over_members_with_different_hyperparameters_equals_a_loop(make):
    g = torch.Generator().manual_seed(0)
    m = 4
    params = {"w": torch.randn(m, 3, 2, generator=g), "b": torch.randn(m, 2, generator=g)}
    grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    lrs = torch.rand(m, generator=g)
    opt = make()
    state = opt.init(params)
    state = {s: {k: v + 0.1 for k, v in d.items()} for s, d in state.items()}

    def one(p, gr, st, lr):
        return opt.update(gr, st, p, step=3, lr=lr)

    batched = vmap(one)(params, grads, state, lrs)
    stacked = opt.update(grads, state, params, step=3, lr=lrs)  # per-member tensor [m] broadcast
    for i in range(m):
        pi = {k: v[i] for k, v in params.items()}
        gi = {k: v[i] for k, v in grads.items()}
        si = {s: {k: v[i] for k, v in d.items()} for s, d in state.items()}
        loop = opt.update(gi, si, pi, step=3, lr=lrs[i])
        for k in params:
            torch.testing.assert_close(batched[0][k][i], loop[0][k], rtol=0, atol=1e-15)
            torch.testing.assert_close(stacked[0][k][i], loop[0][k], rtol=0, atol=1e-15)


def test_hyperparameter_forms_broadcast():
    params = {"w": torch.ones(3, 2), "b": torch.ones(3)}
    grads = {"w": torch.ones(3, 2), "b": torch.ones(3)}
    opt = optim.sgd()
    forms = {
        "float": 0.5,
        "scalar": torch.tensor(0.5),
        "leading": torch.full((3,), 0.5),
        "per_param": {"w": torch.full((3, 2), 0.5), "b": 0.5},
        "schedule": schedule.table(torch.full((5,), 0.5)),
        "per_param_schedule": {"w": schedule.constant(0.5), "b": schedule.exponential(0.5, 1.0)},
    }
    for name, lr in forms.items():
        new, _ = opt.update(grads, {}, params, step=2, lr=lr)
        assert torch.allclose(new["w"], torch.full((3, 2), 0.5)), name
        assert torch.allclose(new["b"], torch.full((3,), 0.5)), name


def test_bad_hyperparameters_are_named():
    params = {"w": torch.ones(3, 2)}
    grads = {"w": torch.ones(3, 2)}
    opt = optim.momentum()
    state = opt.init(params)
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['betas'\]"):
        opt.update(grads, state, params, step=0, betas=0.1)
    with pytest.raises(ValueError, match=r"'lr' has shape \(2,\), which does not fit parameter 'w' of shape \(3, 2\)"):
        opt.update(grads, state, params, step=0, lr=torch.ones(2))
    with pytest.raises(ValueError, match=r"missing \['w'\], unexpected \['v'\]"):
        opt.update(grads, state, params, step=0, lr={"v": 0.1})
    with pytest.raises(ValueError, match="grads keys"):
        opt.update({"v": torch.ones(3, 2)}, state, params, step=0)
    with pytest.raises(TypeError, match="must be a float, a tensor"):
        opt.update(grads, state, params, step=0, lr="fast")
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'step'"):
        opt.update(grads, state, params)
    with pytest.raises(ValueError, match="nesterov=True needs a momentum"):
        optim.sgd(nesterov=True)


def test_learnable_momentum_and_adam_betas_get_gradients():
    params = {"w": torch.randn(4)}
    grads = {"w": torch.randn(4)}
    for opt, names in ((optim.momentum(), ("momentum",)), (optim.adam(), ("b1", "b2", "lr"))):
        hp = {n: torch.tensor(0.5, requires_grad=True) for n in names}
        state = {s: {k: torch.rand(4) for k in d} for s, d in opt.init(params).items()}
        new, _ = opt.update(grads, state, params, step=1, **hp)
        gs = torch.autograd.grad(new["w"].sum(), list(hp.values()))
        assert all(torch.isfinite(g) and g != 0 for g in gs)


@pytest.mark.parametrize("eps_root, finite", [(1e-16, True), (0.0, False)])
def test_adam_second_derivative_at_zero_gradient(eps_root, finite):
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    lr = torch.tensor(0.1, requires_grad=True)
    opt = optim.adam(eps_root=eps_root)
    state = opt.init({"w": w})

    hess = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # a dead direction: its gradient is exactly zero

    def loss(v):
        return 0.5 * v @ hess @ v

    g = torch.autograd.grad(loss(w), w, create_graph=True)[0]
    new, _ = opt.update({"w": g}, state, {"w": w}, step=0, lr=lr)
    d2 = torch.autograd.grad(loss(new["w"]) + new["w"].sum(), [w, lr])
    assert all(bool(torch.isfinite(t).all()) for t in d2) == finite


def test_schedules():
    raw = torch.tensor([0.0, 1.0, -1.0])
    t = schedule.table(raw, positive="softplus")
    assert torch.allclose(torch.stack([t(k) for k in range(3)]), torch.nn.functional.softplus(raw))
    assert torch.allclose(schedule.table(raw, positive="exp")(1), torch.tensor(math.e))
    for kind in ("softplus", "exp"):
        v = torch.tensor([0.02, 0.3, 5.0, 40.0])
        torch.testing.assert_close(schedule.positive(schedule.inverse_positive(v, kind), kind), v)
    with pytest.raises(ValueError, match="must be > 0"):
        schedule.inverse_positive(torch.tensor([0.0]), "softplus")
    e = schedule.exponential(1.0, 0.5, every=2)
    assert e(0) == 1.0 and e(2) == 0.5 and math.isclose(e(1), 0.5**0.5)
    assert schedule.exponential(1.0, 0.5, every=2, staircase=True)(3) == 0.5
    c = schedule.cosine(1.0, 10, final=0.1)
    assert c(0) == 1.0 and math.isclose(c(5), 0.55) and math.isclose(c(10), 0.1) and math.isclose(c(99), 0.1)


def test_train_longer_strategies_of_medvedev_dyakonov():
    s = 3  # steps per epoch
    one = schedule.ramp_epochs(s, epochs=50, init=0.3)
    assert one.shape == (150,)
    per_epoch = one[::s]
    assert torch.allclose(one[:s], torch.full((s,), 0.3))
    assert math.isclose(per_epoch[10], 0.3 * 1.1**10) and math.isclose(per_epoch[11], 0.3 * 1.1**10 * 0.95)
    assert int(per_epoch.argmax()) == 10
    rates = torch.arange(1.0, 2 * s + 1)  # 2 distilled epochs of 3 steps
    two = schedule.repeat_epochs(rates, s, repeats=10, gamma=0.98)
    assert two.shape == (60,)
    assert torch.allclose(two[:6], rates) and torch.allclose(two[6:12], 0.98 * rates)
    assert torch.allclose(two[-6:], 0.98**9 * rates)
    three = schedule.repeat_last_epoch(rates, s, extra_epochs=4, gamma=0.98)
    assert three.shape == (18,)
    assert torch.allclose(three[:6], rates)
    assert torch.allclose(three[6:9], 0.98 * rates[3:]) and torch.allclose(three[-3:], 0.98**4 * rates[3:])
    per_member = torch.rand(6, 4)  # learned per step and member
    assert schedule.repeat_epochs(per_member, s, repeats=2).shape == (12, 4)
    with pytest.raises(ValueError, match="not a whole number of epochs"):
        schedule.repeat_epochs(torch.ones(7), s)


@pytest.mark.parametrize("make", [
    lambda wd: optim.sgd(lr=0.1, weight_decay=wd),
    lambda wd: optim.momentum(lr=0.05, momentum=0.5, weight_decay=wd),
    lambda wd: optim.nesterov(lr=0.05, momentum=0.5, weight_decay=wd),
    lambda wd: optim.adam(lr=0.02, b2=0.9, eps=0.1, weight_decay=wd),
    lambda wd: optim.adamw(lr=0.02, b2=0.9, eps=0.1, eps_root=1e-6, weight_decay=wd),
], ids=["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_residual_is_zero_where_update_stops(make):
    """Run each optimizer on a quadratic with a per-member decay ``[m]`` until ``update`` no longer moves
    the params: its ``residual`` is zero there, and not at a zero of the bare gradient."""
    g = torch.Generator().manual_seed(0)
    m, d = 3, 4
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = A @ A.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    c = torch.randn(m, d, generator=g, dtype=torch.float64)
    wd = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    opt = make(wd)
    params = {"w": torch.zeros(m, d, dtype=torch.float64)}
    state = opt.init(params)

    def grad(p):
        return {"w": p["w"] @ A - c}

    for k in range(2000):
        params, state = opt.update(grad(params), state, params, step=k)
    moved, _ = opt.update(grad(params), state, params, step=2000)
    assert float((moved["w"] - params["w"]).abs().max()) < 1e-13
    r = opt.residual(grad(params), params, step=2000)
    assert r.keys() == params.keys() and r["w"].shape == (m, d)
    assert float(r["w"].abs().max()) < 1e-12 < 0.1 < float(grad(params)["w"].abs().max())


@pytest.mark.parametrize("eps, eps_root", [(0.1, 0.0), (0.1, 1e-16), (1e-3, 1e-2), (0.0, 1e-4)])
def test_adamw_phi_inverse_inverts_the_long_run_direction(eps, eps_root):
    from metaopt.optim._adam import phi_inverse

    g = torch.linspace(-20, 20, 401, dtype=torch.float64)
    u = g / (torch.sqrt(g * g + eps_root) + eps)
    torch.testing.assert_close(phi_inverse(u, eps, eps_root), g, rtol=1e-9, atol=1e-9)
    x = torch.tensor([0.0, 0.3, -0.7], dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(phi_inverse(x, eps, eps_root).sum(), x)
    assert bool(torch.isfinite(d).all() and (d > 0).all())  # smooth and increasing, also at u = 0
    with pytest.raises(ValueError, match="eps = eps_root = 0"):
        phi_inverse(x, 0.0, 0.0)
