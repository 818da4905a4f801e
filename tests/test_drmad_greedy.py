"""DrMAD and greedy T1-T2 against their exact counterparts, float64."""

import torch
from problems import Distill, distill_hyper, mlp_ensemble
from test_implicit import LOG_LAM, Ridge

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim


class LinearPath(metaopt.MetaObjective):
    """A linear inner loss h . w: constant gradient, so SGD with a constant rate moves on a straight
    line at constant speed and DrMAD's interpolated states are the true ones."""

    def init_params(self, hyper, generator):
        return {"w": torch.tensor([0.5, -1.0, 2.0])}

    def inner_loss(self, params, hyper, k, batch):
        return (hyper["h"] * params["w"]).sum()

    def outer_loss(self, params, hyper, batch):
        w = params["w"]
        return (w**4).sum() + (w[0] * w[1]) + hyper["h"].pow(2).sum()


def test_drmad_equals_the_full_unroll_on_a_straight_path():
    obj, hyper = LinearPath(), {"h": torch.tensor([0.3, -0.2, 0.1])}
    full = metaopt.hypergradient(obj, optim.sgd(lr=0.05), hyper, 20, method="full")
    dr = metaopt.hypergradient(obj, optim.sgd(lr=0.05), hyper, 20, method=hg.DrMAD())
    assert dr.method == "drmad"
    torch.testing.assert_close(dr.grads["h"], full.grads["h"], rtol=1e-12, atol=1e-14)


def test_drmad_approximates_a_curved_path_in_little_memory():
    obj = Distill(mlp_ensemble(m=3))
    hyper = distill_hyper(obj, 30)
    kw = {"generator": torch.Generator().manual_seed(0)}
    full = metaopt.hypergradient(obj, optim.momentum(momentum=0.5), hyper, 30, method="full", **kw)
    kw = {"generator": torch.Generator().manual_seed(0)}
    dr = metaopt.hypergradient(obj, optim.momentum(momentum=0.5), hyper, 30, method="drmad", **kw)
    a, b = full.grads["x"].reshape(-1), dr.grads["x"].reshape(-1)
    assert not torch.allclose(a, b, rtol=1e-3)  # biased: the path is not straight
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.5  # but pointing the same way
    assert dr.peak_bytes * 5 < full.peak_bytes


def test_t1t2_lookahead_at_the_optimum_is_the_one_term_neumann_approximation():
    obj, alpha = Ridge(), 0.2
    w_star, _, _ = obj.closed_form(LOG_LAM)
    greedy = hg.t1t2(obj, optim.sgd(lr=alpha), {"log_lam": LOG_LAM}, 1, optim.sgd(lr=0.0), params0={"w": w_star})
    one_term = metaopt.hypergradient(obj, optim.sgd(lr=alpha), {"log_lam": LOG_LAM}, 1,
                                     method=hg.Implicit("neumann", alpha=alpha, tol=0.0,
                                                        maxiter=1), params0={"w": w_star})
    trunc = metaopt.hypergradient(obj, optim.sgd(lr=alpha), {"log_lam": LOG_LAM}, 1, method=hg.Truncated(1),
                                  params0={"w": w_star})
    torch.testing.assert_close(greedy.first_hypergrad["log_lam"], one_term.grads["log_lam"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(greedy.first_hypergrad["log_lam"], trunc.grads["log_lam"], rtol=1e-10, atol=1e-14)


def test_t1t2_tunes_while_training():
    obj = Ridge()
    start = {"log_lam": torch.full((5,), 1.0, dtype=torch.float64)}  # far too much regularisation
    res = hg.t1t2(obj, optim.sgd(lr=0.2), start, 300, optim.adam(lr=0.05))
    plain = metaopt.hypergrad.train(obj, optim.sgd(lr=0.2), start, 300)
    assert len(res.history) == 300
    assert (res.hyper["log_lam"] < start["log_lam"]).all()
    assert obj.outer_loss(res.params, res.hyper, None) < 0.8 * obj.outer_loss(plain, start, None)
