"""The torch.optim face (metaopt/optim/stateful.py): ``optim.SGD(model.parameters(), lr=...)`` and the
seven others step exactly as torch.optim on a real training loop (BatchNorm, dropout, a frozen layer,
a sometimes-unused head, two param groups, an lr scheduler), their state_dicts load into torch.optim
and back, and the functional views (functional_of, functional_state, load_functional_state) read and
write real torch.optim instances."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt import optim

# class name -> (constructor keywords, the second param group's overrides)
CASES = {
    "SGD": (dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
            dict(lr=0.1, momentum=0.5, nesterov=False, weight_decay=0.0)),
    "Adam": (dict(lr=0.01, betas=(0.8, 0.95), weight_decay=1e-3), dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6)),
    "AdamW": (dict(lr=0.01, weight_decay=0.05), dict(lr=0.005, weight_decay=0.0)),
    "RMSprop": (dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=1e-3),
                dict(momentum=0.0, centered=False)),
    "Adagrad": (dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-3),
                dict(lr=0.05, initial_accumulator_value=0.3)),
    "Adamax": (dict(lr=0.01, betas=(0.8, 0.9), weight_decay=1e-3), dict(lr=0.02)),
    "NAdam": (dict(lr=0.01, momentum_decay=0.01, weight_decay=1e-3), dict(lr=0.02, betas=(0.8, 0.95))),
    "RAdam": (dict(lr=0.01, betas=(0.9, 0.9), weight_decay=1e-3), dict(lr=0.02, betas=(0.8, 0.99))),
    "NAdam+decoupled": (dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True), dict(lr=0.02, weight_decay=0.1)),
    "RAdam+decoupled": (dict(lr=0.01, betas=(0.9, 0.9), weight_decay=0.05, decoupled_weight_decay=True),
                        dict(lr=0.02, weight_decay=0.0)),
}


def cls(module, name: str):
    """The class a CASES key names (``"NAdam+decoupled"``: NAdam) in ``module`` (ours or torch.optim)."""
    return getattr(module, name.split("+")[0])
TOL = dict(rtol=1e-11, atol=1e-13)


class Net(nn.Module):
    """A small CNN: conv, BatchNorm, dropout, a frozen linear layer, a head, and an extra head used on
    even steps only (its grads are None on odd steps, so it has taken fewer steps than the rest)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, bias=False)  # a bias before BatchNorm has a zero gradient
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.25)
        self.frozen = nn.Linear(3 * 4 * 4, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 3)
        self.extra = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1)
        out = self.head(torch.tanh(self.frozen(h)))
        return self.extra(out) if k % 2 == 0 else out


def groups(model: Net, second: dict) -> list[dict]:
    return [{"params": [*model.conv.parameters(), *model.bn.parameters()]},
            {"params": [*model.frozen.parameters(), *model.head.parameters(), *model.extra.parameters()], **second}]


def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def train(model: Net, opt: torch.optim.Optimizer, sched, start: int, steps: int) -> None:
    model.train()
    for k in range(start, start + steps):
        x, y = batch(k)
        opt.zero_grad()
        torch.manual_seed(1000 + k)  # the same dropout masks for both models
        F.cross_entropy(model(x, k), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def pair(name: str, seed: int = 0):
    """(ours, torch's) over two copies of one seeded Net."""
    torch.manual_seed(seed)
    a = Net()
    b = copy.deepcopy(a)
    kwargs, second = CASES[name]
    return (a, cls(optim, name)(groups(a, second), **kwargs)), (b, cls(torch.optim, name)(groups(b, second),
                                                                                                  **kwargs))


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, **TOL, msg=lambda m, n=n: f"{n}: {m}")


def assert_same_state_dict(sa: dict, sb: dict) -> None:
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, st in sa["state"].items():
        assert st.keys() == sb["state"][i].keys(), i
        for key, v in st.items():
            assert v.dtype == sb["state"][i][key].dtype and v.shape == sb["state"][i][key].shape, (i, key)
            torch.testing.assert_close(v, sb["state"][i][key], **TOL,
                                       msg=lambda m, i=i, key=key: f"state[{i}][{key!r}]: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_trains_as_torch_optim_on_a_real_loop(name):
    (a, ours), (b, ref) = pair(name)
    assert isinstance(ours, torch.optim.Optimizer) and len(ours.param_groups) == 2
    frozen = a.frozen.weight.detach().clone()
    sa = torch.optim.lr_scheduler.StepLR(ours, step_size=4, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ref, step_size=4, gamma=0.5)
    train(a, ours, sa, 0, 12)
    train(b, ref, sb, 0, 12)
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == CASES[name][0]["lr"] / 8  # the scheduler ran
    assert_same_model(a, b)
    assert torch.equal(a.frozen.weight, frozen)  # grad None: never stepped
    assert not torch.equal(a.head.weight, b.head.weight.new_zeros(()))
    assert_same_state_dict(ours.state_dict(), ref.state_dict())
    if name != "SGD":  # the extra head took 6 steps, the rest 12: torch.optim's per-parameter counts
        assert int(ours.state[a.extra.weight]["step"]) == 6 and int(ours.state[a.head.weight]["step"]) == 12


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "NAdam"])
def test_one_cycle_schedules_the_rate_and_the_momentum(name):
    (a, ours), (b, ref) = pair(name, seed=1)
    kw = dict(max_lr=0.05, total_steps=10, base_momentum=0.8, max_momentum=0.9)
    sa, sb = (torch.optim.lr_scheduler.OneCycleLR(o, **kw) for o in (ours, ref))
    momenta = []
    for k in range(10):
        train(a, ours, sa, k, 1)
        train(b, ref, sb, k, 1)
        g = ours.param_groups[0]
        momenta.append(g["betas"][0] if "betas" in g else g["momentum"])
    assert len(set(momenta)) > 5  # the momentum did change along the cycle
    assert_same_model(a, b)
    assert_same_state_dict(ours.state_dict(), ref.state_dict())


@pytest.mark.parametrize("name", list(CASES))
def test_state_dicts_load_both_ways_and_training_continues(name):
    (a, ours), (b, ref) = pair(name, seed=2)
    train(a, ours, None, 0, 5)
    train(b, ref, None, 0, 5)
    # ours -> torch.optim (and a deep copy of ours, which must stay usable)
    c = copy.deepcopy(a)
    kwargs, second = CASES[name]
    to_torch = cls(torch.optim, name)(groups(c, second), **kwargs)
    to_torch.load_state_dict(copy.deepcopy(ours).state_dict())
    # torch.optim -> ours
    d = copy.deepcopy(b)
    to_ours = cls(optim, name)(groups(d, second), **kwargs)
    to_ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # torch.optim's load aliases
    for model, opt in ((a, ours), (b, ref), (c, to_torch), (d, to_ours)):
        train(model, opt, None, 5, 5)
    assert_same_model(c, a)
    assert_same_model(d, b)
    assert_same_model(a, b)
    assert_same_state_dict(to_torch.state_dict(), ours.state_dict())
    assert_same_state_dict(to_ours.state_dict(), ref.state_dict())


@pytest.mark.parametrize("name", list(CASES))
def test_functional_views_of_a_real_torch_optimizer(name):
    """functional_of + functional_state of a real torch.optim instance step as it does; load_functional_state
    puts that state into a fresh one, which then continues identically."""
    _, (b, ref) = pair(name, seed=3)
    train(b, ref, None, 0, 4)
    head = dict(b.head.named_parameters())
    [(_, f0), (p1, f1)] = optim.functional_of(ref)
    ours = optim.functional_of(cls(optim, name)(groups(copy.deepcopy(b), CASES[name][1]), **CASES[name][0]))
    assert p1[2] is b.head.weight and [f0.name, f1.name] == [f.name for _, f in ours]
    assert f1.defaults == ours[1][1].defaults
    state, k = optim.functional_state(ref, head)
    assert k == (0 if name == "SGD" else 4) and set(state) == set(f1.init(head))
    # the next step: functional beside torch.optim, and a fresh torch.optim loaded with the functional state
    c = copy.deepcopy(b)
    fresh = cls(torch.optim, name)(groups(c, CASES[name][1]), **CASES[name][0])
    fresh_head = dict(c.head.named_parameters())
    optim.load_functional_state(fresh, fresh_head, state, k)
    x, y = batch(4)
    ref.zero_grad()
    torch.manual_seed(1004)
    F.cross_entropy(b(x, 4), y).backward()
    grads = {n: p.grad for n, p in head.items()}
    new, new_state = f1.update(grads, state, {n: p.detach() for n, p in head.items()}, step=k)
    fresh.zero_grad()
    for n, p in fresh_head.items():
        p.grad = grads[n].clone()
    ref.step()
    fresh.step()
    for n, p in head.items():
        torch.testing.assert_close(new[n], p.detach(), **TOL, msg=n)
        torch.testing.assert_close(fresh_head[n].detach(), p.detach(), **TOL, msg=n)
    state2, k2 = optim.functional_state(ref, head)
    assert k2 == (0 if name == "SGD" else 5)
    for s in new_state:
        for n in head:
            torch.testing.assert_close(state2[s][n], new_state[s][n], **TOL, msg=f"{s} {n}")


def test_functional_state_refuses_mixed_counts_and_wrong_slots():
    (a, ours), _ = pair("Adam")
    train(a, ours, None, 0, 3)  # extra: 2 steps, head: 3
    with pytest.raises(ValueError, match=r"different numbers of steps") as e:
        optim.functional_state(ours, [a.head.weight, a.extra.weight])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"needs the slots \['mu', 'nu'\]"):
        optim.load_functional_state(ours, [a.head.weight], {"velocity": {"0": a.head.weight}}, 3)
    with pytest.raises(ValueError, match=r"in none of the optimizer's param groups"):
        optim.functional_state(ours, [torch.zeros(2)])
    state, k = optim.functional_state(ours, {"w": a.head.weight})
    with pytest.raises(ValueError, match=r"step must be an int >= 0"):
        optim.load_functional_state(ours, {"w": a.head.weight}, state, -1)
    state["mu"]["w"] = state["mu"]["w"].expand(2, *a.head.weight.shape)  # a per-member NAdam-like slip: a shape
    with pytest.raises(ValueError, match=r"state\['mu'\]\['w'\] has shape"):
        optim.load_functional_state(ours, {"w": a.head.weight}, state, k)


def test_nadam_mu_product_is_one_value_per_parameter():
    w = nn.Parameter(torch.ones(3))
    opt = optim.NAdam([w], lr=0.1)
    state, k = optim.functional_state(opt, [w])
    assert k == 0 and torch.equal(state["mu_product"]["0"], torch.ones(3))
    state["mu_product"]["0"] = torch.tensor([0.5, 0.5, 0.4])
    with pytest.raises(ValueError, match="one mu_product per parameter"):
        optim.load_functional_state(opt, [w], state, 1)
    state["mu_product"]["0"] = torch.full((3,), 0.5)
    optim.load_functional_state(opt, [w], state, 1)
    assert opt.state[w]["mu_product"].shape == () and float(opt.state[w]["mu_product"]) == 0.5


def test_functional_of_names_the_optimizers_it_cannot_read():
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match=r"torch.optim.lbfgs.LBFGS has no functional counterpart") as e:
        optim.functional_of(torch.optim.LBFGS([w]))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"optim.Adam\(amsgrad=True\) is not supported"):
        optim.functional_of(torch.optim.Adam([w], amsgrad=True))
    [(_, f)] = optim.functional_of(torch.optim.AdamW([w], lr=0.1, weight_decay=0.2))
    assert f.name == "adamw" and f.defaults["weight_decay"] == 0.2 and f.defaults["eps_root"] == 0.0


def test_the_step_reads_the_group_at_each_call_and_takes_a_closure():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = optim.SGD([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == 5.0 and torch.allclose(w.detach(), torch.tensor([0.8, -1.6]))
    opt.param_groups[0]["lr"] = 0.5
    opt.step()  # the same grad [2, -4], the new rate
    assert torch.allclose(w.detach(), torch.tensor([-0.2, 0.4]))
    opt.zero_grad()
    opt.step()  # grad None: nothing moves
    assert torch.allclose(w.detach(), torch.tensor([-0.2, 0.4]))


def test_adam_with_decoupled_weight_decay_is_adamw():
    torch.manual_seed(4)
    a = Net()
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    kw = dict(lr=0.01, weight_decay=0.1)
    opts = (optim.Adam(a.parameters(), decoupled_weight_decay=True, **kw),
            torch.optim.Adam(b.parameters(), decoupled_weight_decay=True, **kw), optim.AdamW(c.parameters(), **kw))
    for model, opt in zip((a, b, c), opts):
        train(model, opt, None, 0, 6)
    assert_same_model(a, b)
    assert_same_model(c, b)
    assert optim.functional_of(opts[0])[0][1].name == "adamw"


@pytest.mark.parametrize("name", list(CASES))
def test_float32_keeps_torch_optims_float32_step_counts(name):
    torch.set_default_dtype(torch.float32)  # the conftest fixture restores float64
    (a, ours), (b, ref) = pair(name, seed=5)
    train(a, ours, None, 0, 4)
    train(b, ref, None, 0, 4)
    sa, sb = ours.state_dict(), ref.state_dict()
    for i, st in sb["state"].items():
        assert {k: (v.dtype, v.shape) for k, v in sa["state"][i].items()} == {k: (v.dtype, v.shape)
                                                                              for k, v in st.items()}
        if "step" in st:
            assert st["step"].dtype == torch.float32
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_adagrad_makes_its_state_at_construction_as_torch_optim():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    assert_same_state_dict(optim.Adagrad([a], initial_accumulator_value=0.25).state_dict(),
                           torch.optim.Adagrad([b], initial_accumulator_value=0.25).state_dict())


BAD = [
    (lambda p: optim.SGD(p, lr=0.1, dampening=0.1), ValueError, r"optim.SGD\(dampening=0.1\) is not supported: "
                                                                  "metaopt's sgd has no dampening"),
    (lambda p: optim.Adam(p, amsgrad=True), ValueError, r"optim.Adam\(amsgrad=True\) is not supported"),
    (lambda p: optim.Adam(p, foreach=True), ValueError, r"optim.Adam\(foreach=True\) is not supported"),
    (lambda p: optim.SGD(p, fused=True), ValueError, r"optim.SGD\(fused=True\)"),
    (lambda p: optim.AdamW(p, maximize=True), ValueError, r"optim.AdamW\(maximize=True\).*negate the loss"),
    (lambda p: optim.RMSprop(p, capturable=True), ValueError, r"optim.RMSprop\(capturable=True\)"),
    (lambda p: optim.Adagrad(p, differentiable=True), ValueError, r"use the functional optimizer \(optim.adagrad"),
    (lambda p: optim.SGD(0.1), TypeError, r"optim.SGD\(params=...\): got float; params must be an iterable"),
    (lambda p: optim.Adam(torch.ones(2)), TypeError, r"optim.Adam\(params=...\): got Tensor"),
    (lambda p: optim.SGD(p, lr=-0.1), ValueError, r"optim.SGD\(lr=...\): lr must satisfy 0 <= lr, got -0.1"),
    (lambda p: optim.Adam(p, lr=float("nan")), ValueError, r"optim.Adam\(lr=...\): lr must be finite, got nan"),
    (lambda p: optim.RMSprop(p, lr=torch.tensor([0.1, 0.2])), ValueError, r"a tensor lr must have one element"),
    (lambda p: optim.Adamax(p, betas=(1.5, 0.9)), ValueError, r"betas\[0\] must satisfy 0 <= betas\[0\] < 1"),
    (lambda p: optim.NAdam(p, betas=0.9), ValueError, r"optim.NAdam\(betas=0.9\): betas must be a pair"),
    (lambda p: optim.SGD(p, momentum=None), TypeError, r"optim.SGD\(momentum=None\): momentum must be a number"),
    (lambda p: optim.SGD(p, nesterov=True), ValueError, r"nesterov=True needs a momentum"),
    (lambda p: optim.SGD(p).add_param_group({"params": [torch.zeros(1)], "lr": -1.0}), ValueError,
     r"optim.SGD\(lr=...\): lr must satisfy 0 <= lr"),
    # the old spelling of the specs: a one-line TypeError saying what to write
    (lambda p: optim.SGD(lr=0.1), TypeError, r"optim.SGD\(lr=0.1\): no parameters; .*optim.SGD\(model.parameters\(\), "
                                             r"lr=...\).*optim.sgd\(lr=0.1\), or its spec optim.SGDSpec\(lr=0.1\)"),
    (lambda p: optim.Adam(lr=0.01, b1=0.8), TypeError, r"optim.adam\(lr=0.01, b1=0.8\), or its spec optim.AdamSpec"),
    (lambda p: optim.Adam(p, b1=0.8), TypeError, r"b1 belongs to the functional spelling .*betas=\(b1, b2\)"),
    (lambda p: optim.RAdam(eps=1e-3), TypeError, r"optim.RAdam\(eps=0.001\): no parameters; .*optim.radam\(eps="),
    (lambda p: optim.SGDSpec(p, lr=0.1), TypeError, r"optim.SGDSpec is the functional spec and takes keywords.*"
                                                    r"optim.SGD\(model.parameters\(\), lr=...\)"),
    (lambda p: optim.AdamSpec(p), TypeError, r"optim.Adam\(model.parameters\(\), lr=...\)"),
]


@pytest.mark.parametrize("build, error, match", BAD)
def test_bad_input_is_refused_in_one_line(build, error, match):
    params = nn.Linear(2, 1).parameters()
    with pytest.raises(error, match=match) as e:
        build(params)
    assert "\n" not in str(e.value)


def test_the_specs_keep_their_meaning_under_their_new_names():
    assert optim.sgd(lr=0.1, momentum=0.9).spec == optim.SGDSpec(lr=0.1, momentum=0.9)
    assert optim.adamw(lr=0.1).spec == optim.AdamSpec(lr=0.1, weight_decay=1e-2, decoupled=True)
    assert optim.SGDSpec(lr=0.1, momentum=0.9).build().name == "momentum"
    assert not math.isnan(optim.AdamSpec().build().defaults["lr"])
