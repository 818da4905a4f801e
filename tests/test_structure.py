"""Structure selection building blocks: the graph of basis functions, the Gaussian KL, Concrete
(Gumbel-Softmax) sampling and density, the bilevel objective's hypergradient and its single-level
identity."""

import math

import pytest
import torch

from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.hypergrad.unroll import Meter, Problem, outer_partials
from metaopt.recipes.structure import (
    Coefficients,
    StructureGraph,
    StructureSelection,
    concrete_log_prob,
    concrete_sample,
    gaussian_kl,
)


def tanh_data(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 2, generator=g) * 4 - 2
    return X, torch.tanh(X[:, 0]) + 0.1 * torch.randn(n, generator=g)


def test_graph_at_a_vertex_is_the_plain_model():
    graph = StructureGraph([3, 4, 2], [(1, 0, ["tanh", "relu:2", "zero"]), (2, 1, ["linear", "mlp:5:sigmoid"]),
                                       (2, 0, ["const", "linear"])])
    assert graph.structures == 3 * 2 * 2 and len(graph.all_structures()) == 12
    g = torch.Generator().manual_seed(0)
    W = {n: torch.randn((1, *s), generator=g) for n, s in graph.weight_shapes().items()}
    x = torch.randn(7, 3, generator=g)
    out = graph.forward(W, graph.vertex({"e1_0": 1, "e2_1": 0, "e2_0": 0}), x)[0]
    h = torch.relu(x @ W["e1_0.1.W"][0] + W["e1_0.1.b"][0]) * torch.tensor([1.0, 1, 0, 0])  # width 2 of 4
    expected = h @ W["e2_1.0.W"][0] + W["e2_1.0.b"][0] + W["e2_0.0.b"][0]
    torch.testing.assert_close(out, expected)
    mixed = graph.forward(W, {"e1_0": torch.tensor([[0.5, 0.5, 0.0]]), "e2_1": torch.tensor([[1.0, 0.0]]),
                              "e2_0": torch.tensor([[1.0, 0.0]])}, x)[0]
    h2 = 0.5 * torch.tanh(x @ W["e1_0.0.W"][0] + W["e1_0.0.b"][0]) + 0.5 * h
    torch.testing.assert_close(mixed, h2 @ W["e2_1.0.W"][0] + W["e2_1.0.b"][0] + W["e2_0.0.b"][0])
    with pytest.raises(ValueError, match="unknown basis function 'tahn'"):
        StructureGraph([2, 1], [(1, 0, ["tahn"])])
    with pytest.raises(ValueError, match="node 1 has no incoming edge"):
        StructureGraph([2, 3, 1], [(2, 0, ["linear"])])


def test_gaussian_kl_closed_form_vs_torch_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, rho = torch.randn(5, generator=g), 0.3 * torch.randn(5, generator=g) - 0.5
    log_a = 0.5 * torch.randn(5, generator=g)
    ours = gaussian_kl(mu, rho, log_a)
    q, p = torch.distributions.Normal(mu, rho.exp()), torch.distributions.Normal(0.0, (-0.5 * log_a).exp())
    torch.testing.assert_close(ours, torch.distributions.kl_divergence(q, p).sum())
    w = q.sample((200000,))
    mc = (q.log_prob(w) - p.log_prob(w)).sum(1)
    assert abs(float(mc.mean() - ours)) < 4 * float(mc.std()) / math.sqrt(len(mc))


def test_concrete_sampling_statistics():
    logits = torch.tensor([0.5, -1.0, 1.5, 0.0])
    u = torch.rand(40000, 4, generator=torch.Generator().manual_seed(0)).clamp(1e-12, 1 - 1e-12)
    for t in (0.1, 1.0, 5.0):
        gamma = concrete_sample(logits, t, u).exp()
        torch.testing.assert_close(gamma.sum(1), torch.ones(len(u)))
        # Gumbel-max: the argmax is Categorical(softmax(logits)) at every temperature
        freq = torch.bincount(gamma.argmax(1), minlength=4) / len(u)
        p = torch.softmax(logits, 0)
        assert torch.all((freq - p).abs() < 4 * torch.sqrt(p * (1 - p) / len(u)))
    assert float(concrete_sample(logits, 0.05, u).exp().max(1).values.median()) > 0.99  # near the vertices
    assert float(concrete_sample(logits, 50.0, u).exp().max(1).values.mean()) < 0.3  # near the centre
    # the log-space density integrates to one: E_p[q/p] = 1 for two Concretes of one temperature
    other = torch.tensor([0.0, 0.0, 0.0, 0.0])
    z = concrete_sample(other, 0.7, u)
    ratio = (concrete_log_prob(z, logits, 0.7) - concrete_log_prob(z, other, 0.7)).exp()
    assert abs(float(ratio.mean()) - 1) < 4 * float(ratio.std()) / math.sqrt(len(u))
    # KL(q || q) = 0 and KL(q || p) > 0 (Monte Carlo with q's samples)
    zq = concrete_sample(logits, 0.7, u)
    kl = concrete_log_prob(zq, logits, 0.7) - concrete_log_prob(zq, other, 0.7)
    assert float(kl.mean()) > 10 * float(kl.std()) / math.sqrt(len(u))


def test_structure_hypergradient_matches_finite_differences():
    X, y = tanh_data(30)
    graph = StructureGraph([2, 1], [(1, 0, ["const", "tanh"])])
    obj = StructureSelection(graph, X, y, noise_std=0.3, samples=2, coef=Coefficients(prior=2.0, reg=0.5, temp=0.7),
                             scale_by_gamma=True, invgamma=(2.0, 1.0))
    h = obj.init_hyper(1.0)
    h["m.e1_0"] = torch.tensor([0.3, -0.2])
    rows = hg.check(obj, optim.adam(lr=0.05), h, 15, methods={"full": hg.Full(), "checkpointed": hg.Checkpointed()})
    for r in rows:
        assert "error" not in r and r["rel_error"] < 1e-6, r


def _partial_vs_total(coef):
    X, y = tanh_data(50)
    graph = StructureGraph([2, 1], [(1, 0, ["const", "tanh"])])
    obj = StructureSelection(graph, X, y, noise_std=0.3, samples=2, common_noise=True, coef=coef)
    h, opt, n = obj.init_hyper(1.0), optim.momentum(lr=0.06, momentum=0.9), 500
    res = hg.hypergradient(obj, opt, h, n, hg.Implicit("cg", tol=1e-12, inner_tol=1e-10, max_inner_rounds=40),
                           generator=torch.Generator().manual_seed(1))
    assert res.extras["inner_grad_norm"] < 1e-10
    leaves = {k: v.detach().requires_grad_() for k, v in h.items()}
    problem = Problem(obj, opt, leaves, n, [obj.inner_batch(0, torch.Generator())] * n, Meter())
    _, _, partial = outer_partials(problem, res.params, obj.outer_batch(torch.Generator()))
    diff = math.sqrt(sum(float((res.grads[k] - partial[k]).norm() ** 2) for k in h))
    return diff / math.sqrt(sum(float(partial[k].norm() ** 2) for k in h))


def test_single_level_identity():
    """c_prior / c_train = c_reg makes Q = c_train * L: at the inner optimum the exact hypergradient
    is the direct partial derivative of Q; any other ratio makes them differ."""
    assert _partial_vs_total(Coefficients(train=2.0, prior=1.0, reg=0.5)) < 1e-7
    assert _partial_vs_total(Coefficients(train=1.0, prior=3.0, reg=0.5)) > 1e-2


def test_inner_training_finds_the_generating_structure():
    X, y = tanh_data(200)
    graph = StructureGraph([2, 1], [(1, 0, ["const", "tanh", "mlp:10:tanh"])])
    obj = StructureSelection(graph, X, y, noise_std=0.1, samples=4, common_noise=True)
    params = hg.train(obj, optim.adam(lr=0.05), obj.init_hyper(1.0), 500, torch.Generator().manual_seed(1))
    assert obj.selected(params) == {"e1_0": "tanh"}
    assert float(obj.structure_probs(params)["e1_0"][1]) > 0.8
    assert 0 < obj.structural_entropy(params) < math.log(3)
