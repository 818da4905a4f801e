"""RMSprop, Adagrad, Adamax, NAdam, RAdam and the composition (chain, clipping, masking): equal to
torch.optim to round-off, vmappable, differentiable in every hyperparameter (against central
differences), and stationary where their residual says (against the long full unroll), float64."""

import math

import pytest
import torch
from problems import train_beside_torch
from torch.func import functional_call, vmap

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.models import MLP
from metaopt.optim import schedule

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


# (ours, torch.optim's, torch's kwargs): every variant with a weight decay
CASES = {
    "rmsprop": (lambda: optim.rmsprop(lr=0.01, alpha=0.9, weight_decay=0.1),
                lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, weight_decay=0.1, foreach=False)),
    "rmsprop_centered_momentum": (
        lambda: optim.rmsprop(lr=0.005, alpha=0.95, eps=1e-6, weight_decay=0.05, momentum=0.8, centered=True),
        lambda p: torch.optim.RMSprop(p, lr=0.005, alpha=0.95, eps=1e-6, weight_decay=0.05, momentum=0.8,
                                      centered=True, foreach=False)),
    "rmsprop_momentum": (lambda: optim.rmsprop(lr=0.005, momentum=0.5),
                         lambda p: torch.optim.RMSprop(p, lr=0.005, momentum=0.5, foreach=False)),
    "adagrad": (lambda: optim.adagrad(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.5),
                lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, weight_decay=0.1,
                                              initial_accumulator_value=0.5, foreach=False)),
    "adamax": (lambda: optim.adamax(lr=0.01, b1=0.8, b2=0.99, weight_decay=0.1),
               lambda p: torch.optim.Adamax(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, foreach=False)),
    "nadam": (lambda: optim.nadam(lr=0.01, b2=0.99, weight_decay=0.1, momentum_decay=0.01),
              lambda p: torch.optim.NAdam(p, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, momentum_decay=0.01,
                                          foreach=False)),
    "radam": (lambda: optim.radam(lr=0.01, b2=0.9, weight_decay=0.1),  # rho_t crosses 5 at step 5: both branches
              lambda p: torch.optim.RAdam(p, lr=0.01, betas=(0.9, 0.9), weight_decay=0.1, foreach=False)),
}


def mlp_problem(seed=0):
    torch.manual_seed(seed)
    model, ref = MLP([3, 8, 2]).double(), MLP([3, 8, 2]).double()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(32, 3, dtype=F64)
    y = torch.sin(x[:, :2]) + x[:, 2:] ** 2
    return model, ref, x, y


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_optim_over_50_steps(case):
    ours, theirs = CASES[case]
    model, ref, x, y = mlp_problem()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    params = train_beside_torch(ours(), theirs(ref.parameters()), model, ref, x, y, 50)
    for n, v in ref.named_parameters():
        torch.testing.assert_close(params[n], v.detach(), rtol=1e-12, atol=1e-13, msg=n)
        assert float((v.detach() - start[n]).abs().max()) > 1e-3  # it moved


MAKERS = {"rmsprop": lambda: optim.rmsprop(centered=True, momentum=0.9), "adagrad": optim.adagrad,
          "adamax": optim.adamax, "nadam": optim.nadam, "radam": lambda: optim.radam(b2=0.9)}
SECOND = {"rmsprop": "alpha", "adagrad": "lr_decay", "adamax": "b2", "nadam": "momentum_decay", "radam": "b2"}


@pytest.mark.parametrize("name", list(MAKERS))
def test_vmap_over_members_with_different_hyperparameters_equals_a_loop(name):
    g = torch.Generator().manual_seed(0)
    m = 4
    params = {"w": torch.randn(m, 3, 2, generator=g, dtype=F64), "b": torch.randn(m, 2, generator=g, dtype=F64)}
    grads = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    lrs = torch.rand(m, generator=g, dtype=F64)
    second = 0.8 + 0.15 * torch.rand(m, generator=g, dtype=F64)  # a second hyperparameter per member
    if name == "radam":
        second = t([0.5, 0.9, 0.99, 0.999])  # members on both sides of the rectifier's switch
    opt = MAKERS[name]()
    state = opt.init(params)
    state = {s: {k: v + 0.1 for k, v in d.items()} for s, d in state.items()}
    step = 7

    def one(p, gr, st, lr, sec):
        return opt.update(gr, st, p, step=step, lr=lr, **{SECOND[name]: sec})

    batched = vmap(one)(params, grads, state, lrs, second)
    stacked = opt.update(grads, state, params, step=step, lr=lrs, **{SECOND[name]: second})
    as_tensor = opt.update(grads, state, params, step=torch.tensor(step), lr=lrs, **{SECOND[name]: second})
    for i in range(m):
        pi = {k: v[i] for k, v in params.items()}
        gi = {k: v[i] for k, v in grads.items()}
        si = {s: {k: v[i] for k, v in d.items()} for s, d in state.items()}
        loop = opt.update(gi, si, pi, step=step, lr=float(lrs[i]), **{SECOND[name]: float(second[i])})
        for k in params:
            for out in (batched, stacked, as_tensor):
                torch.testing.assert_close(out[0][k][i], loop[0][k], rtol=1e-14, atol=1e-15)
            for s in state:
                torch.testing.assert_close(batched[1][s][k][i], loop[1][s][k], rtol=1e-14, atol=1e-15)


class Regression(metaopt.MetaObjective):
    """inner: mse of a linear model on 30 points; outer: validation mse; every optimizer hyperparameter
    comes from ``hyper`` through ``hparams`` (a ``*_table`` entry is a per-step schedule)."""

    def __init__(self, seed=0, lam=False):
        g = torch.Generator().manual_seed(seed)
        self.X, self.Xv = (torch.randn(30, 4, generator=g, dtype=F64) for _ in range(2))
        w = torch.randn(4, generator=g, dtype=F64)
        self.y = self.X @ w + 0.3 * torch.randn(30, generator=g, dtype=F64)
        self.yv = self.Xv @ w + 0.3 * torch.randn(30, generator=g, dtype=F64)
        self.lam = lam

    def init_params(self, hyper, generator):
        return {"w": torch.full((4,), 0.1, dtype=F64), "b": torch.zeros((), dtype=F64)}

    def inner_loss(self, params, hyper, k, batch):
        loss = ((self.X @ params["w"] + params["b"] - self.y) ** 2).mean()
        return loss + hyper["log_lam"].exp() * (params["w"] ** 2).sum() if self.lam else loss

    def outer_loss(self, params, hyper, batch):
        return ((self.Xv @ params["w"] + params["b"] - self.yv) ** 2).mean()

    def hparams(self, hyper):
        out = {}
        for n, v in hyper.items():
            if n.endswith("_table"):
                out[n[:-6]] = schedule.table(v, positive="sigmoid")
            elif n == "log_wd":
                out["weight_decay"] = v.exp()
            elif n != "log_lam":
                out[n] = v
        return out


# (optimizer with the flags, hyperparameter values): every hyperparameter of each optimizer
HYPER = {
    "rmsprop": (lambda: optim.rmsprop(centered=True, momentum=0.5),
                dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.1, momentum=0.5, eps_root=1e-3)),
    "adagrad": (optim.adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.2,
                                    eps=1e-3, eps_root=1e-3)),
    "adamax": (optim.adamax, dict(lr=0.02, b1=0.8, b2=0.95, eps=0.05, weight_decay=0.1)),
    "nadam": (optim.nadam, dict(lr=0.02, b1=0.8, b2=0.95, eps=1e-3, weight_decay=0.1, momentum_decay=0.05,
                                eps_root=1e-3)),
    "radam": (optim.radam, dict(lr=0.02, b1=0.8, b2=0.9, eps=1e-3, weight_decay=0.1, eps_root=1e-3)),
    "nadam_decoupled": (lambda: optim.nadam(decoupled=True),
                        dict(lr=0.02, b1=0.8, b2=0.95, eps=1e-3, weight_decay=0.1, momentum_decay=0.05)),
    "radam_decoupled": (lambda: optim.radam(decoupled=True), dict(lr=0.02, b1=0.8, b2=0.9, eps=1e-3, weight_decay=0.1)),
    "chain_clip_momentum": (lambda: optim.chain(optim.clip_by_global_norm(), optim.momentum()),
                            dict(max_norm=0.5, lr=0.05, momentum=0.7, weight_decay=0.1)),
    "rmsprop_alpha_schedule": (optim.rmsprop, dict(lr=0.01, alpha_table=[2.0, 1.0, 3.0, 2.5, 1.5, 2.0, 2.2, 1.8])),
}


@pytest.mark.parametrize("case", list(HYPER))
def test_hypergradient_in_every_hyperparameter_matches_central_differences(case):
    make, values = HYPER[case]
    obj = Regression()
    hyper = {n: t(v) for n, v in values.items()}
    steps = 8
    res = metaopt.hypergradient(obj, make(), hyper, steps, method="full")
    eps = 1e-6
    for n, v in hyper.items():
        fd = torch.zeros_like(v)
        for j in range(v.numel()):
            e = torch.zeros_like(v).reshape(-1)
            e[j] = eps
            e = e.reshape(v.shape)
            up = metaopt.hypergradient(obj, make(), {**hyper, n: v + e}, steps, method="full").loss
            down = metaopt.hypergradient(obj, make(), {**hyper, n: v - e}, steps, method="full").loss
            fd.reshape(-1)[j] = (up - down) / (2 * eps)
        torch.testing.assert_close(res.grads[n], fd, rtol=1e-6, atol=1e-9, msg=f"{case}: d/d{n}")
        assert float(res.grads[n].abs().max()) > 1e-6, f"{case}: d/d{n} is zero"


# optimizer settings that reach the fixed point to round-off in a few hundred steps on the ridge problem
STATIONARY = {
    "rmsprop": lambda: optim.rmsprop(lr=0.01, alpha=0.9, eps=0.1),
    "rmsprop_centered_momentum": lambda: optim.rmsprop(lr=0.005, alpha=0.9, eps=0.1, momentum=0.5, centered=True),
    "adagrad": lambda: optim.adagrad(lr=0.3, eps=0.1),
    "adamax": lambda: optim.adamax(lr=0.02, b2=0.9, eps=0.1),
    "nadam": lambda: optim.nadam(lr=0.02, b2=0.9, eps=0.1),
    "radam": lambda: optim.radam(lr=0.02, b2=0.9, eps=0.1),
    # decoupled decay: the long run's fixed point phi(g) + wd w = 0 (NAdam's momentum warm-up done fast)
    "nadam_decoupled": lambda: optim.nadam(lr=0.02, b2=0.9, eps=0.1, momentum_decay=1.0, decoupled=True),
    "radam_decoupled": lambda: optim.radam(lr=0.02, b2=0.9, eps=0.1, decoupled=True),
    "chain_clip_adamax": lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.adamax(lr=0.02, b2=0.9, eps=0.1)),
}


@pytest.mark.parametrize("case", list(STATIONARY))
def test_residual_is_zero_where_the_run_stops_and_cg_agrees_with_the_full_unroll(case):
    obj = Regression(lam=True)
    hyper = {"log_lam": t(-2.0), "log_wd": t(math.log(0.2))}  # the decay is a hyperparameter too
    opt, steps = STATIONARY[case](), 600
    full = metaopt.hypergradient(obj, opt, hyper, steps, method="full")
    p = {k: v.detach().requires_grad_() for k, v in full.params.items()}
    g = obj.inner_value_and_grad(p, hyper, steps - 1, None, create_graph=False)[1]
    r = opt.residual(g, full.params, step=steps - 1, **obj.hparams(hyper))
    assert max(float(x.abs().max()) for x in r.values()) < 1e-12  # the run stopped at the residual's zero
    assert float(g["w"].norm()) > 1e-2  # ... which is not the gradient's (the decay is in it)
    res = metaopt.hypergradient(obj, opt, hyper, steps, method=hg.Implicit("cg", tol=1e-13))
    for k in hyper:
        torch.testing.assert_close(res.grads[k], full.grads[k], rtol=1e-8, atol=1e-11, msg=f"{case} {k}")
        assert abs(float(full.grads[k])) > 1e-3


# -- composition ------------------------------------------------------------------------------------

def test_clip_by_global_norm_by_hand():
    clip = optim.clip_by_global_norm(max_norm=1.0)
    g = {"a": t([3.0]), "b": t([[4.0, 0.0]])}
    out = clip.apply(g, {}, step=0)
    s = 1.0 / (5.0 + 1e-6)
    torch.testing.assert_close(out["a"], t([3.0 * s]), rtol=0, atol=1e-16)
    torch.testing.assert_close(out["b"], t([[4.0 * s, 0.0]]), rtol=0, atol=1e-16)
    small = clip.apply({"a": t([0.3]), "b": t([[0.4, 0.0]])}, {}, step=0)  # below max_norm: unchanged
    assert small["a"].item() == 0.3 and small["b"][0, 0].item() == 0.4
    mx = t(1.0).requires_grad_()
    (d,) = torch.autograd.grad(clip.apply(g, {}, step=0, max_norm=mx)["a"].sum(), mx)
    assert d.item() == pytest.approx(3.0 * s)


@pytest.mark.parametrize("inner, theirs", [
    (lambda: optim.adam(lr=0.01, eps_root=0.0, weight_decay=0.1),
     lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, foreach=False)),
    (lambda: optim.rmsprop(lr=0.01, momentum=0.5, centered=True),
     lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True, foreach=False)),
])
def test_chain_clip_equals_clip_grad_norm_then_torch_optim(inner, theirs):
    model, ref, x, y = mlp_problem(1)
    opt = optim.chain(optim.clip_by_global_norm(2.0), inner())
    clipped = []

    def torch_clip(module):
        clipped.append(float(torch.nn.utils.clip_grad_norm_(module.parameters(), 2.0)) > 2.0)

    params = train_beside_torch(opt, theirs(ref.parameters()), model, ref, x, y, 40, torch_clip=torch_clip)
    assert any(clipped) and not all(clipped)  # the clip was active on some steps and not on others
    for n, v in ref.named_parameters():
        torch.testing.assert_close(params[n], v.detach(), rtol=1e-12, atol=1e-13, msg=n)


@pytest.mark.parametrize("frozen", [{"layers.0.weight": True, "layers.0.bias": True, "layers.1.weight": False,
                                     "layers.1.bias": False}, lambda n: n.startswith("layers.0.")])
def test_masked_equals_torch_optim_over_the_trainable_params(frozen):
    model, ref, x, y = mlp_problem(2)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    for n, v in ref.named_parameters():
        v.requires_grad_(not n.startswith("layers.0."))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = optim.masked(optim.adamw(lr=0.01, eps_root=0.0, weight_decay=0.1), frozen)
    ref_opt = torch.optim.AdamW([v for v in ref.parameters() if v.requires_grad], lr=0.01, weight_decay=0.1,
                                foreach=False)
    assert sorted(opt.init({k: v for k, v in model.named_parameters()})["mu"]) == ["layers.1.bias", "layers.1.weight"]
    params = train_beside_torch(opt, ref_opt, model, ref, x, y, 30)
    for n, v in ref.named_parameters():
        torch.testing.assert_close(params[n], v.detach(), rtol=1e-12, atol=1e-13, msg=n)
        assert torch.equal(params[n], start[n]) == n.startswith("layers.0.")


def test_masked_keeps_per_parameter_hyperparameters_of_all_params_and_is_refused_by_implicit_methods():
    params = {"a": t([1.0, 2.0]), "b": t([1.0])}
    grads = {"a": t([1.0, 1.0]), "b": t([1.0])}
    opt = optim.masked(optim.sgd(lr={"a": 0.1, "b": 0.5}), {"a": False, "b": True})
    new, _ = opt.update(grads, opt.init(params), params, step=0, weight_decay={"a": 1.0, "b": 3.0})
    torch.testing.assert_close(new["a"], t([1.0 - 0.1 * 2.0, 2.0 - 0.1 * 3.0]))
    assert torch.equal(new["b"], params["b"])
    assert opt.residual is None
    with pytest.raises(ValueError, match="does not state") as e:
        metaopt.hypergradient(Regression(), optim.masked(optim.sgd(lr=0.1), lambda n: n == "b"), {"lr": t(0.1)}, 5,
                              method=hg.Implicit("cg"))
    assert "\n" not in str(e.value)


def test_chain_residual_is_the_optimizers_at_the_clipped_gradient():
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.rmsprop(weight_decay=0.5))
    g, w = {"w": t([3.0, 4.0])}, {"w": t([1.0, -1.0])}
    s = 1.0 / (5.0 + 1e-6)
    torch.testing.assert_close(opt.residual(g, w, step=0)["w"], t([3.0 * s + 0.5, 4.0 * s - 0.5]))
    torch.testing.assert_close(opt.residual(g, w, step=0, max_norm=10.0)["w"], t([3.5, 3.5]))
    assert sorted(opt.defaults) == ["alpha", "eps", "eps_root", "lr", "max_norm", "weight_decay"]
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['momentum'\]"):
        optim.rmsprop().update(g, optim.rmsprop().init(w), w, step=0, momentum=0.5)  # built without a buffer


def test_a_schedule_on_any_hyperparameter_equals_per_step_values():
    model, _, x, y = mlp_problem(3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    sched = {"max_norm": schedule.exponential(1.0, 0.9), "lr": schedule.cosine(0.01, 20),
             "alpha": schedule.table(torch.linspace(0.8, 0.99, 20, dtype=F64)), "weight_decay": lambda k: 0.01 * k}
    a = optim.chain(optim.clip_by_global_norm(), optim.rmsprop(centered=True))
    b = optim.chain(optim.clip_by_global_norm(sched["max_norm"]),
                    optim.rmsprop(lr=sched["lr"], alpha=sched["alpha"], weight_decay=sched["weight_decay"],
                                  centered=True))
    pa, pb = dict(params), dict(params)
    sa, sb = a.init(pa), b.init(pb)
    for k in range(20):
        ga = torch.func.grad(lambda p: ((functional_call(model, p, (x,)) - y) ** 2).mean())(pa)
        gb = torch.func.grad(lambda p: ((functional_call(model, p, (x,)) - y) ** 2).mean())(pb)
        pa, sa = a.update(ga, sa, pa, step=k, **{n: s(k) for n, s in sched.items()})
        pb, sb = b.update(gb, sb, pb, step=k)
    for n in params:
        assert torch.equal(pa[n], pb[n])
        assert not torch.equal(pa[n], params[n])


# -- argument checks --------------------------------------------------------------------------------

BAD = [
    (lambda m: optim.rmsprop(alpha=1.0), ValueError, r"optim.rmsprop\(alpha=...\): alpha must satisfy 0 <= alpha < 1"),
    (lambda m: optim.rmsprop(momentum=-0.1), ValueError, "0 <= momentum < 1"),
    (lambda m: optim.rmsprop(centered=1), TypeError, r"optim.rmsprop\(centered=1\): centered must be True or False"),
    (lambda m: optim.adagrad(lr_decay=-1.0), ValueError, r"optim.adagrad\(lr_decay=...\)"),
    (lambda m: optim.adagrad(initial_accumulator_value=float("nan")), ValueError, "must be finite"),
    (lambda m: optim.adamax(b2=1.5), ValueError, "0 <= b2 < 1"),
    (lambda m: optim.nadam(momentum_decay=-1e-3), ValueError, "0 <= momentum_decay"),
    (lambda m: optim.radam(eps=float("inf")), ValueError, "eps must be finite"),
    (lambda m: optim.radam(m.parameters()), TypeError, r"optim.radam\(...\) is the functional optimizer.*optim.RAdam"),
    (lambda m: optim.nadam(list(m.parameters())), TypeError, r"optim.NAdam\(model.parameters\(\), lr=...\)"),
    (lambda m: optim.clip_by_global_norm(-1.0), ValueError, "0 <= max_norm"),
    (lambda m: optim.chain(optim.sgd(), optim.clip_by_global_norm()), TypeError, "the last part must be an optimizer"),
    (lambda m: optim.chain(optim.sgd(), optim.sgd()), TypeError, "only the last part may be an optimizer"),
    (lambda m: optim.chain(optim.clip_by_global_norm(), optim.clip_by_global_norm(), optim.sgd()), ValueError,
     "hyperparameter 'max_norm' belongs to two parts"),
    (lambda m: optim.masked(optim.sgd(), {"w": True}).init({"v": t(1.0)}), ValueError,
     r"frozen's keys do not match the params \(missing \['v'\], unexpected \['w'\]\)"),
    (lambda m: optim.masked(optim.sgd(), "layers.0"), TypeError, "frozen must be a predicate"),
]


@pytest.mark.parametrize("build, error, match", BAD)
def test_bad_arguments_are_one_line_errors(build, error, match):
    with pytest.raises(error, match=match) as e:
        build(MLP([2, 3, 1]))
    assert "\n" not in str(e.value)


def test_every_new_optimizer_states_its_spec_and_rebuilds():
    for make in (optim.rmsprop, optim.adagrad, optim.adamax, optim.nadam, optim.radam):
        opt = make(lr=0.123)
        assert opt.name == make.__name__ and opt.residual is not None
        again = opt.spec.build()
        assert again.defaults == opt.defaults and again.spec == opt.spec


def test_compile_traces_the_rectifier_switch_and_the_clip():
    """hypergradient(compile=True) passes the step as a 0-d integer tensor: RAdam's rho_t > 5 switch is
    then a torch.where (with a tensor b2 too), and the chain's clip is traced; equal to eager."""
    hyper = {"lr": t(0.02), "b2": t(0.9), "max_norm": t(0.5)}

    def make():
        return optim.chain(optim.clip_by_global_norm(), optim.radam())

    eager = metaopt.hypergradient(Regression(), make(), hyper, 8, method="full")
    compiled = metaopt.hypergradient(Regression(), make(), hyper, 8, method="full", compile=True)
    for k in hyper:
        torch.testing.assert_close(compiled.grads[k], eager.grads[k], rtol=1e-12, atol=1e-14)
        assert float(eager.grads[k].abs()) > 1e-6


def test_a_chain_with_a_stateful_transformation_states_no_residual():
    def update(grads, state, params, *, step, **hp):  # a running mean of the gradients (state: "avg")
        avg = {k: 0.5 * state["avg"][k] + 0.5 * g for k, g in grads.items()}
        return avg, {"avg": avg}

    average = optim.Transform(lambda p: {"avg": {k: torch.zeros_like(v) for k, v in p.items()}}, update, {}, "avg")
    opt = optim.chain(average, optim.sgd(lr=1.0))
    assert opt.residual is None
    params = {"w": t([0.0])}
    state = opt.init(params)
    assert sorted(state) == ["t0.avg"]
    new, state = opt.update({"w": t([2.0])}, state, params, step=0)
    assert new["w"].item() == -1.0 and state["t0.avg"]["w"].item() == 1.0


def test_partition_equals_torch_optim_param_groups_of_different_kinds():
    """Two torch.optim param groups (one with momentum, one without, different rates) as one
    functional optimizer: functional_of's per-group optimizers under partition."""
    model, ref, x, y = mlp_problem(3)
    names = [n for n, _ in model.named_parameters()]
    rp = dict(ref.named_parameters())
    ref_opt = torch.optim.SGD([{"params": [rp[n] for n in names[:2]], "lr": 0.05, "momentum": 0.9},
                               {"params": [rp[n] for n in names[2:]], "lr": 0.1, "weight_decay": 0.01}],
                              lr=0.1, foreach=False)
    groups = optim.functional_of(ref_opt)
    assert [g[1].name for g in groups] == ["momentum", "sgd"]
    opt = optim.partition([(names[:2], groups[0][1]), (names[2:], groups[1][1])])
    assert opt.defaults["lr"] == {names[0]: 0.05, names[1]: 0.05, names[2]: 0.1, names[3]: 0.1}
    assert sorted(opt.init(dict(model.named_parameters()))["velocity"]) == sorted(names[:2])
    params = train_beside_torch(opt, ref_opt, model, ref, x, y, 20)
    for n, v in ref.named_parameters():
        torch.testing.assert_close(params[n], v.detach(), rtol=1e-12, atol=1e-13, msg=n)


def test_partition_splits_per_parameter_overrides_and_states_each_groups_residual():
    params = {"a": t([1.0, -2.0]), "b": t([0.5])}
    grads = {"a": t([0.1, 0.2]), "b": t([0.3])}
    opt = optim.partition([(["a"], optim.sgd(lr=0.1, weight_decay=0.5)), (["b"], optim.adam(lr=0.01))])
    lr = {"a": t(0.2), "b": t(0.02)}
    new, _ = opt.update(grads, opt.init(params), params, step=0, lr=lr)
    a, _ = optim.sgd(lr=0.2, weight_decay=0.5).update({"a": grads["a"]}, {}, {"a": params["a"]}, step=0)
    b_opt = optim.adam(lr=0.02)
    b, _ = b_opt.update({"b": grads["b"]}, b_opt.init({"b": params["b"]}), {"b": params["b"]}, step=0)
    assert torch.equal(new["a"], a["a"]) and torch.equal(new["b"], b["b"])
    r = opt.residual(grads, params, step=0)
    torch.testing.assert_close(r["a"], grads["a"] + 0.5 * params["a"])
    torch.testing.assert_close(r["b"], grads["b"])
    assert optim.partition([(["a", "b"], optim.sgd(lr=0.1))]).defaults["lr"] == 0.1  # one group: itself
    assert optim.partition([(["a"], optim.sgd()), (["b"], optim.masked(optim.sgd(), {"b": False}))]).residual is None


@pytest.mark.parametrize("groups, params, error, match", [
    ([(["a"], optim.sgd()), (["a"], optim.sgd())], {"a": 1}, ValueError, "'a' is in groups 0 and 1"),
    ([(["a"], "sgd")], {"a": 1}, TypeError, "group 0's optimizer must be a metaopt optimizer"),
    ([], {}, ValueError, "at least one"),
    ([(["a"], optim.sgd()), (["b"], optim.adam())], {"a": 1, "c": 1}, ValueError, r"missing \['b'\], in no group"),
])
def test_partition_bad_groups_are_one_line_errors(groups, params, error, match):
    with pytest.raises(error, match=match):
        opt = optim.partition(groups)
        opt.init({k: t([1.0]) for k in params})


class DeadUnit(Regression):
    """Regression with three inputs that are exactly zero in the training data and not in the
    validation data (a feature never active in training): their weights' gradient is exactly zero at
    every step, yet on the graph, so their second moment stays 0, where ``sqrt`` has an infinite
    derivative (0 * inf = nan in the reverse sweep)."""

    def init_params(self, hyper, generator):
        return {**super().init_params(hyper, generator), "dead": torch.ones(3, dtype=F64)}

    def inner_loss(self, params, hyper, k, batch):
        r = self.X @ params["w"] + torch.zeros(30, 3, dtype=F64) @ params["dead"] + params["b"] - self.y
        return (r ** 2).mean()

    def outer_loss(self, params, hyper, batch):
        return ((self.Xv @ params["w"] + params["dead"].sum() + params["b"] - self.yv) ** 2).mean()


@pytest.mark.parametrize("make", [optim.rmsprop, lambda **kw: optim.rmsprop(centered=True, momentum=0.5, **kw),
                                  optim.adagrad, optim.nadam, optim.radam])
def test_eps_root_keeps_a_dead_unit_finite(make):
    hyper = {"lr": t(0.01)}
    plain = metaopt.hypergradient(DeadUnit(), make(), hyper, 10, method="full", check_finite=False)
    assert torch.isnan(plain.grads["lr"]).all()  # torch's step (eps_root = 0): 0 * inf in the reverse sweep
    rooted = metaopt.hypergradient(DeadUnit(), make(eps_root=1e-16), hyper, 10, method="full")
    assert torch.isfinite(rooted.grads["lr"]).all()
    # the dead weights never move, so the hypergradient is the finite difference of the same run
    up, down = (metaopt.hypergradient(DeadUnit(), make(eps_root=1e-16), {"lr": t(0.01 + d)}, 10, method="full").loss
                for d in (1e-6, -1e-6))
    torch.testing.assert_close(rooted.grads["lr"], (up - down) / 2e-6, rtol=1e-6, atol=0)
