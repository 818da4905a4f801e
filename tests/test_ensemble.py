"""Functional ensembles: batched and vmapped forwards equal a Python loop over the members."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metaopt
from metaopt.models import MLP


def loop_forward(module, params, x, per_member=False):
    m = next(iter(params.values())).shape[0]
    return torch.stack(
        [functional_call(module, {k: v[i] for k, v in params.items()}, (x[i] if per_member else x,)) for i in range(m)]
    )


@pytest.mark.parametrize("sizes", [[2, 1], [2, 10, 1], [2, 10, 10, 10, 1]])
@pytest.mark.parametrize("per_member", [False, True])
def test_fast_path_and_vmap_equal_a_loop(sizes, per_member):
    fast = metaopt.Ensemble(MLP(sizes), 5)
    generic = metaopt.Ensemble(MLP(sizes), 5, batched=False)
    params = fast.init_params(torch.Generator().manual_seed(0))
    x = torch.randn(5, 7, 2) if per_member else torch.randn(7, 2)
    ref = loop_forward(fast.module, params, x, per_member)
    torch.testing.assert_close(fast(params, x, per_member), ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(generic(params, x, per_member), ref, rtol=0, atol=1e-14)


def test_any_module_through_vmap():
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    ens = metaopt.Ensemble(conv, 3, init="kaiming")
    params = ens.init_params(torch.Generator().manual_seed(0))
    assert params["0.weight"].shape == (3, 3, 1, 3, 3)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(ens(params, x), loop_forward(conv, params, x), rtol=0, atol=1e-13)
    y = torch.tensor([1, 3])
    losses = ens.losses(params, x, y, lambda a, t: F.cross_entropy(a, t, reduction="none"))
    ref = torch.stack([F.cross_entropy(o, y) for o in loop_forward(conv, params, x)])
    torch.testing.assert_close(losses, ref)


def test_members_are_independent_and_initialisers_have_the_right_scale():
    ens = metaopt.Ensemble(MLP([64, 256, 10]), 8, init="xavier")
    p = ens.init_params(torch.Generator().manual_seed(0))
    w = p["layers.0.weight"]
    bound = math.sqrt(6 / (64 + 256))
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert abs(w.var().item() - bound**2 / 3) < 0.05 * bound**2 / 3
    assert torch.all(p["layers.0.bias"] == 0)
    assert not torch.allclose(w[0], w[1])
    again = ens.init_params(torch.Generator().manual_seed(0))
    assert torch.equal(again["layers.0.weight"], w)  # seeded draws repeat
    fresh = ens.init_params(torch.Generator().manual_seed(1))
    assert not torch.equal(fresh["layers.0.weight"], w)
    normal = metaopt.Ensemble(MLP([64, 256, 10]), 8, init="normal", std=0.1).init_params(torch.Generator())
    assert abs(normal["layers.0.weight"].std().item() - 0.1) < 0.005
    default = metaopt.Ensemble(MLP([3, 4]), 2, init="default").init_params(torch.Generator().manual_seed(0))
    assert default["layers.0.bias"].abs().max() > 0
    custom = metaopt.Ensemble(MLP([3, 4]), 2, init=lambda name, shape, g: torch.full(shape, 0.5))
    assert torch.all(custom.init_params()["layers.0.weight"] == 0.5)


def test_per_member_gradients_of_the_summed_loss():
    ens = metaopt.Ensemble(MLP([2, 4, 1]), 3)
    params = {k: v.requires_grad_() for k, v in ens.init_params(torch.Generator().manual_seed(0)).items()}
    x, y = torch.randn(6, 2), torch.randn(6, 1)
    mse = lambda a, t: (a - t) ** 2  # noqa: E731
    grads = torch.autograd.grad(ens.losses(params, x, y, mse).sum(), list(params.values()))
    for i in range(3):
        pi = {k: v[i].detach().requires_grad_() for k, v in params.items()}
        li = ((functional_call(ens.module, pi, (x,)) - y) ** 2).mean()
        for g, gi in zip(grads, torch.autograd.grad(li, list(pi.values()))):
            torch.testing.assert_close(g[i], gi)


def test_multi_ensemble_groups():
    multi = metaopt.MultiEnsemble({"one": metaopt.Ensemble(MLP([2, 1]), 2), "two": metaopt.Ensemble(MLP([2, 5, 1]), 3)})
    params = multi.init_params(torch.Generator().manual_seed(0))
    assert multi.members == 5
    assert set(multi.split(params)) == {"one", "two"} and "two.layers.1.weight" in params
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    mse = lambda a, t: (a - t) ** 2  # noqa: E731
    per = multi.losses(params, x, y, mse)
    assert per["one"].shape == (2,) and per["two"].shape == (3,)
    torch.testing.assert_close(multi.mean_loss(params, x, y, mse), (per["one"].mean() + per["two"].mean()) / 2)


def test_bad_input():
    with pytest.raises(ValueError, match="members must be a positive int"):
        metaopt.Ensemble(MLP([2, 1]), 0)
    with pytest.raises(ValueError, match="unknown init 'glorot'"):
        metaopt.Ensemble(MLP([2, 1]), 2, init="glorot")
    ens = metaopt.Ensemble(MLP([2, 1]), 2)
    params = ens.init_params()
    with pytest.raises(ValueError, match="leading axis of 2 members"):
        ens(params, torch.randn(3, 4, 2), per_member=True)
    with pytest.raises(ValueError, match="params keys"):
        ens({"w": torch.ones(2)}, torch.randn(4, 2))
    with pytest.raises(ValueError, match="sizes must list"):
        MLP([2])


@pytest.mark.parametrize("per_member", [False, True])
def test_fast_and_generic_paths_agree_on_extra_sample_dims(per_member):
    fast = metaopt.Ensemble(MLP([2, 4, 3]), 3)
    generic = metaopt.Ensemble(MLP([2, 4, 3]), 3, batched=False)
    params = fast.init_params(torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 6, 2) if per_member else torch.randn(5, 6, 2)  # a sequence axis, say
    ref = loop_forward(fast.module, params, x, per_member)
    assert ref.shape == (3, 5, 6, 3)
    torch.testing.assert_close(fast(params, x, per_member), ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(generic(params, x, per_member), ref, rtol=0, atol=1e-14)


def test_multi_ensemble_per_member_inputs():
    multi = metaopt.MultiEnsemble({"a": metaopt.Ensemble(MLP([2, 1]), 2), "b": metaopt.Ensemble(MLP([2, 3, 1]), 1)})
    params = multi.init_params(torch.Generator().manual_seed(0))
    x, y = torch.randn(3, 4, 2), torch.randn(3, 4, 1)
    per = multi.losses(params, x, y, lambda a, t: (a - t) ** 2, per_member=True)
    split = multi.split(params)
    ref_b = ((loop_forward(multi.groups["b"].module, split["b"], x[2:], True) - y[2:]) ** 2).mean((1, 2))
    torch.testing.assert_close(per["b"], ref_b)
    with pytest.raises(ValueError, match="leading axis of 3 members"):
        multi(params, torch.randn(2, 4, 2), per_member=True)
