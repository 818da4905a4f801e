"""Structure selection building blocks: the graph of basis functions, the Gaussian KL, Concrete
(Gumbel-Softmax) sampling and density, the bilevel objective's hypergradient and its single-level
identity."""

import math

import pytest
import torch

from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.hypergrad.problem import Problem, outer_partials
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
    res = hg.hypergradient(obj, opt, h, n, method=hg.Implicit("cg", tol=1e-12, inner_tol=1e-10, max_inner_rounds=40),
                           generator=torch.Generator().manual_seed(1))
    assert res.extras["inner_grad_norm"] < 1e-10
    leaves = {k: v.detach().requires_grad_() for k, v in h.items()}
    batches = [obj.inner_batch(0, torch.Generator())] * n
    problem = Problem(objective=obj, optimizer=opt, hyper=leaves, steps=n, batches=batches)
    _, _, partial = outer_partials(problem, res.params, obj.outer_batch(torch.Generator()))
    diff = math.sqrt(sum(float((res.grads[k] - partial[k]).norm() ** 2) for k in h))
    return diff / math.sqrt(sum(float(partial[k].norm() ** 2) for k in h))


def test_hyperprior_is_the_inverse_gamma_density_in_log_a():
    X, y = tanh_data(10)
    obj = StructureSelection(StructureGraph([2, 1], [(1, 0, ["const", "tanh"])]), X, y, invgamma=(2.5, 0.7))
    h = obj.init_hyper(1.0)
    h = {k: (v + 0.3 * i if k.startswith("logA") else v) for i, (k, v) in enumerate(h.items())}
    expected = 0.0
    for n in obj.shapes:
        var = torch.exp(-h[f"logA.{n}"])
        # density of log A = -log v: p_v(v) |dv / dlog A| = p_v(v) v
        expected += float(torch.distributions.InverseGamma(2.5, 0.7).log_prob(var) + torch.log(var))
    assert math.isclose(float(obj.hyperprior(h)), expected, rel_tol=1e-12)


def test_multi_edge_graph_with_repulsion_matches_finite_differences():
    X, y = tanh_data(30)
    graph = StructureGraph([2, 3, 1], [(1, 0, ["tanh", "relu"]), (2, 1, ["linear", "const"]),
                                       (2, 0, ["linear", "zero"])])
    avoid = [{"e1_0": torch.tensor([2.0, -2.0]), "e2_1": torch.tensor([0.0, 1.0]), "e2_0": torch.tensor([1.0, 0.0])}]
    obj = StructureSelection(graph, X, y, noise_std=0.3, samples=2, avoid=avoid, coef=Coefficients(comb=-1.0, temp=0.5))
    h = obj.init_hyper(1.0)
    rows = hg.check(obj, optim.adam(lr=0.05), h, 8, methods={"full": hg.Full()})
    assert "error" not in rows[0] and rows[0]["rel_error"] < 1e-6, rows
    noise = obj.outer_batch(torch.Generator().manual_seed(0))["noise"]
    params = obj.init_params(h, torch.Generator().manual_seed(1))
    without = StructureSelection(graph, X, y, noise_std=0.3, samples=2, coef=Coefficients(comb=-1.0, temp=0.5))
    # repelling the found structures lowers the outer loss by c_comb * KL, and the KL is positive
    gap = float(without.outer_loss(params, h, {"noise": noise}) - obj.outer_loss(params, h, {"noise": noise}))
    _, lg = obj.sample(params, noise)
    kl = float(obj.kl_structure(params, lg, avoid[0], 0.5))
    assert kl > 0 and math.isclose(gap, kl / obj.N, rel_tol=1e-10)


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


def _task(**structure):
    from metaopt.recipes.structure.config import Config
    from metaopt.recipes.structure.task import StructureTask
    from metaopt.run.config import from_dict

    outer = structure.pop("outer", {"steps": 20})
    return StructureTask(from_dict(Config, {"structure": structure, "outer": outer}), torch.device("cpu"))


def test_gradual_modes_anneal_the_coefficients():
    task = _task(mode="increase", prior_start=100.0, prior_end=1.0, temp_start=1.0, temp_end=0.1, reg_start=2.0,
                 reg_end=0.5, outer={"steps": 11})
    assert (task.coef.prior, task.coef.temp, task.coef.reg) == (100.0, 1.0, 2.0)  # built at the start values
    task.begin_step(5, 11)
    assert math.isclose(task.coef.prior, 10.0) and math.isclose(task.coef.temp, 0.1**0.5)
    assert math.isclose(task.coef.reg, 1.0)
    task.begin_step(10, 11)
    assert math.isclose(task.coef.prior, 1.0) and math.isclose(task.coef.temp, 0.1) and math.isclose(task.coef.reg, 0.5)
    from metaopt.run.config import ConfigError

    with pytest.raises(ConfigError, match="'decrease' needs prior_end and reg_end >="):
        _task(mode="decrease", prior_start=100.0, prior_end=1.0)
    with pytest.raises(ConfigError, match="enumeration repels"):
        _task(mode="enumerate")
    fixed = _task(prior_start=100.0, prior_end=1.0)  # evidence mode: no annealing
    fixed.begin_step(5, 11)
    assert (fixed.coef.prior, fixed.coef.temp, fixed.coef.reg) == (1.0, 1.0, 1.0)
    assert task.objective.coef is task.coef  # the objective sees the annealed values


def test_enumeration_visits_every_structure():
    task = _task(mode="enumerate", c_comb=-1.0, q_temp=0.1, steps=30, samples=2)
    from metaopt.recipes.structure import evaluate as ev

    h, p = ev.run(task, task.objective, 20, 0)
    found = ev.enumerate_structures(task, ev.describe(task, h, p))
    assert found["all_visited"] and found["distinct"] == 3 == found["structures"], found
    assert sorted(set(found["visited"])) == ["const", "mlp:10:tanh", "tanh"]


def test_kendall_tau_and_bad_settings():
    from metaopt.recipes.structure.evaluate import kendall_tau
    from metaopt.run.config import ConfigError

    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="structure.graph = 'wine8' does not fit structure.data = 'tanh'"):
        _task(graph="wine8")
    with pytest.raises(ConfigError, match="structure.invgamma"):
        _task(invgamma=[1.0])


def test_smoke_end_to_end(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    ran = subprocess.run([sys.executable, "-m", "metaopt", "run", "structure", "--preset", "smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads((out / "metrics.json").read_text())
    res = summary["results"]
    assert set(res["main"]["q"]["e1_0"]) and abs(sum(res["main"]["q"]["e1_0"]) - 1) < 1e-9
    assert [p["value"] for p in res["sweep_prior"]] == [0.1, 10.0]
    assert all("q/e1_0/tanh" in r and "c_prior" in r for r in summary["history"])  # per-step q(Gamma)
    assert "## Structure selection: tanh3 on tanh" in (out / "summary.md").read_text()
    for fig in ("structure_probs.png", "c_param_vs_c_prior.png"):
        assert (out / "figures" / fig).is_file(), fig


def test_multistart_estimate_on_a_gaussian_model():
    """Bayesian linear regression: Hutchinson traces equal the exact ones, one step's entropy change
    is log det(I - lr H) to second order, and the estimate is a lower bound close to the exact
    log evidence."""
    from metaopt.recipes.structure.multistart import hutchinson_traces, multistart_elbo

    g = torch.Generator().manual_seed(0)
    N, d, beta, alpha = 40, 4, 4.0, 1.0
    Phi = torch.randn(N, d, generator=g)
    y = Phi @ torch.randn(d, generator=g) + torch.randn(N, generator=g) / beta**0.5

    def log_joint(w):
        return (-0.5 * beta * ((y - Phi @ w) ** 2).sum() + 0.5 * N * math.log(beta / (2 * math.pi))
                - 0.5 * alpha * (w**2).sum() + 0.5 * d * math.log(alpha / (2 * math.pi)))

    H = beta * Phi.T @ Phi + alpha * torch.eye(d)
    signs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0])] * d)  # all 2^d Rademacher vectors: exact traces
    tr, tr2 = hutchinson_traces(log_joint, torch.randn(2, d, generator=g), signs)
    torch.testing.assert_close(tr, torch.full((2,), float(torch.trace(H))), rtol=1e-10, atol=0)
    torch.testing.assert_close(tr2, torch.full((2,), float(torch.trace(H @ H))), rtol=1e-10, atol=0)
    lr = 0.3 / float(torch.linalg.eigvalsh(H).max())
    one = multistart_elbo(log_joint, d, k=4, steps=1, lr=lr, probes=4000)
    exact = float(torch.logdet(torch.eye(d) - lr * H))
    bound = float(-lr * torch.trace(H) - lr**2 * torch.trace(H @ H))  # what the step adds, in expectation
    assert bound < exact and abs((one.entropy[1] - one.entropy[0]) - bound) < 0.01 * abs(bound)
    log_ev = float(torch.distributions.MultivariateNormal(torch.zeros(N), torch.eye(N) / beta + Phi @ Phi.T / alpha)
                   .log_prob(y))
    run = multistart_elbo(log_joint, d, k=32, steps=300, lr=4 * lr, probes=16)
    assert log_ev - 8 < max(run.elbo) < log_ev + 0.5
