"""Unrolled hypergradients equal those of `higher` and `torchopt` (independent implementations)."""

import pytest
import torch
import torch.nn.functional as F
from problems import Distill, distill_hyper

import metaopt
from metaopt import optim
from metaopt.models import MLP

higher = pytest.importorskip("higher")
torchopt = pytest.importorskip("torchopt")

STEPS = 8
# name: (ours, torch.optim for higher, torchopt transform with unit lr). The per-step learnable rate
# multiplies torchopt's update outside the transform: building a torchopt transform anew each step is
# wrong (its `trace` keeps a hidden first-call flag). higher's Adam puts eps outside the bias
# correction (lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)), so Adam uses a negligible eps here.
KINDS = {
    "sgd": (lambda: optim.sgd(), lambda p: torch.optim.SGD(p, lr=0.1), lambda: torchopt.sgd(lr=1.0)),
    "momentum": (
        lambda: optim.momentum(momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda: torchopt.sgd(lr=1.0, momentum=0.9),
    ),
    "nesterov": (
        lambda: optim.nesterov(momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda: torchopt.sgd(lr=1.0, momentum=0.9, nesterov=True),
    ),
    "adam": (
        lambda: optim.adam(eps=1e-14, eps_root=0.0),
        lambda p: torch.optim.Adam(p, lr=0.1, eps=1e-14),
        lambda: torchopt.adam(lr=1.0, eps=1e-14),
    ),
}


def setup():
    ens = metaopt.Ensemble(MLP([2, 6, 1], activation="tanh"), 1)
    obj = Distill(ens)
    hyper = distill_hyper(obj, STEPS, lr=0.05)
    params0 = ens.init_params(torch.Generator().manual_seed(3), dtype=torch.float64)
    return obj, hyper, {k: v[0] for k, v in params0.items()}


def peer_problem(obj, hyper):
    x = hyper["x"].detach().clone().requires_grad_()
    raw = hyper["lr"].detach().clone().requires_grad_()

    def inner(out, k):
        return F.binary_cross_entropy_with_logits(out, obj.y_syn)

    return x, raw, inner


def ours(kind):
    obj, hyper, _ = setup()
    res = metaopt.hypergradient(obj, KINDS[kind][0](), hyper, STEPS, method="full",
                                generator=torch.Generator().manual_seed(3))
    return res


@pytest.mark.parametrize("kind", list(KINDS))
def test_equal_to_higher(kind):
    obj, hyper, p0 = setup()
    x, raw, inner = peer_problem(obj, hyper)
    model = MLP([2, 6, 1], activation="tanh").double()
    model.load_state_dict(p0)
    opt = KINDS[kind][1](model.parameters())
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for k in range(STEPS):
            loss = inner(fmodel(x[k % x.shape[0]]), k)
            diffopt.step(loss, override={"lr": [F.softplus(raw[k])]})
        outer = F.binary_cross_entropy_with_logits(fmodel(obj.x_real), obj.y_real)
        gx, graw = torch.autograd.grad(outer, [x, raw])
    res = ours(kind)
    torch.testing.assert_close(res.loss, outer.detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(res.grads["x"], gx, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(res.grads["lr"], graw, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", list(KINDS))
def test_equal_to_torchopt(kind):
    obj, hyper, p0 = setup()
    x, raw, inner = peer_problem(obj, hyper)
    model = MLP([2, 6, 1], activation="tanh").double()
    names = list(p0)
    params = tuple(p0[n].clone().requires_grad_() for n in names)
    transform = KINDS[kind][2]()
    state = transform.init(params)
    for k in range(STEPS):
        out = torch.func.functional_call(model, dict(zip(names, params)), (x[k % x.shape[0]],))
        grads = torch.autograd.grad(inner(out, k), params, create_graph=True)
        updates, state = transform.update(grads, state, params=params, inplace=False)
        lr = F.softplus(raw[k])
        params = torchopt.apply_updates(params, tuple(lr * u for u in updates), inplace=False)
    out = torch.func.functional_call(model, dict(zip(names, params)), (obj.x_real,))
    outer = F.binary_cross_entropy_with_logits(out, obj.y_real)
    gx, graw = torch.autograd.grad(outer, [x, raw])
    res = ours(kind)
    torch.testing.assert_close(res.loss, outer.detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(res.grads["x"], gx, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(res.grads["lr"], graw, rtol=1e-6, atol=1e-12)
