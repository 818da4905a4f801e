"""The inner state carried across hypergradient calls (``start=`` / ``result.final``, issue 24 item 3):
windows of a long inner run compose into the one run bit for bit, every method that takes a start
continues the global step index, and a bad start is a one-line error."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.hypergrad.problem import Problem
from metaopt.optim import schedule

N, WINDOW, B = 500, 50, 8
DT = torch.float64


class Windows(metaopt.MetaObjective):
    """A 3-6-1 tanh MLP regression: minibatches drawn from the generator by ``inner_batch(k)``, an
    optional dropout in the inner loss, a learned per-step learning rate (``lr [N]``) and a penalty
    ``exp(log_wd) |w|^2``; the outer loss on a fixed validation set."""

    def __init__(self, dropout: float = 0.0) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(64, 3, generator=g, dtype=DT)
        self.y = torch.sin(self.x @ torch.tensor([1.0, -2.0, 0.5], dtype=DT)).unsqueeze(1)
        self.xv = torch.randn(32, 3, generator=g, dtype=DT)
        self.yv = torch.sin(self.xv @ torch.tensor([1.0, -2.0, 0.5], dtype=DT)).unsqueeze(1)
        self.dropout = dropout

    def init_params(self, hyper, generator):
        return {"w1": 0.5 * torch.randn(3, 6, generator=generator, dtype=DT), "b1": torch.zeros(6, dtype=DT),
                "w2": 0.5 * torch.randn(6, 1, generator=generator, dtype=DT)}

    def inner_batch(self, k, generator):
        return torch.randint(0, 64, (B,), generator=generator)

    def _pred(self, params, x, drop):
        h = torch.tanh(x @ params["w1"] + params["b1"])
        if drop:
            h = F.dropout(h, self.dropout, training=True)
        return h @ params["w2"]

    def inner_loss(self, params, hyper, k, batch):
        r = self._pred(params, self.x[batch], self.dropout > 0) - self.y[batch]
        return (r**2).mean() + hyper["log_wd"].exp() * sum((p**2).sum() for p in params.values())

    def outer_loss(self, params, hyper, batch):
        return ((self._pred(params, self.xv, False) - self.yv) ** 2).mean()

    def hparams(self, hyper):
        return {"lr": schedule.table(hyper["lr"], positive="softplus")}


def hyper(scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    raw = schedule.inverse_positive(torch.tensor(scale, dtype=DT), "softplus")
    return {"lr": raw + 0.1 * torch.randn(N, generator=g, dtype=DT), "log_wd": torch.tensor(-5.0, dtype=DT)}


OPTIMIZERS = {"momentum": (optim.momentum(momentum=0.9), 0.05), "adam": (optim.adam(), 0.01)}


def windows(obj: metaopt.MetaObjective, opt: optim.Optimizer, h: dict, method="full") -> metaopt.HypergradResult:
    """Ten calls of 50 steps, each starting from the previous call's final state, one generator
    passed along (it continues where the previous window left it)."""
    g, start, res = torch.Generator().manual_seed(0), None, None
    for w in range(N // WINDOW):
        res = metaopt.hypergradient(obj, opt, h, WINDOW, method=method, generator=g, start=start)
        assert res.final.step == (w + 1) * WINDOW
        start = res.final
    return res


def assert_same_state(a: hg.InnerState, b: hg.InnerState) -> None:
    assert a.step == b.step and a.seed == b.seed
    assert a.params.keys() == b.params.keys() and all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert a.opt_state.keys() == b.opt_state.keys()
    for slot in a.opt_state:
        assert all(torch.equal(a.opt_state[slot][k], b.opt_state[slot][k]) for k in a.opt_state[slot])


@pytest.mark.parametrize("name", ["momentum", "adam"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_ten_windows_are_one_run_bit_for_bit(name: str, dropout: float) -> None:
    """Ten windows of 50 steps (momentum SGD, Adam with its bias correction, a per-step learning rate,
    minibatches and dropout drawn per global step) end in exactly the state of one run of 500
    steps, and the last window's hypergradient is exactly ``Truncated(50)``'s over the 500 steps."""
    opt, scale = OPTIMIZERS[name]
    obj, h = Windows(dropout), hyper(scale)
    one = metaopt.hypergradient(obj, opt, h, N, method=hg.Truncated(WINDOW), generator=torch.Generator().manual_seed(0))
    last = windows(obj, opt, h)
    assert one.final.step == N and set(one.final.opt_state) == set(opt.init(one.params))
    assert_same_state(last.final, one.final)
    assert torch.equal(last.loss, one.loss)
    for k in h:
        assert torch.equal(last.grads[k], one.grads[k]), k
    assert torch.count_nonzero(last.grads["lr"][: N - WINDOW]) == 0  # the window reads only its own rates
    assert torch.count_nonzero(last.grads["lr"][N - WINDOW :]) == WINDOW
    # train's windows continue the same run
    g, state = torch.Generator().manual_seed(0), None
    for _ in range(N // WINDOW):
        state = hg.train(obj, opt, h, WINDOW, g, start=state, return_state=True)
    assert_same_state(state, one.final)
    trained = hg.train(obj, opt, h, N, torch.Generator().manual_seed(0))
    assert all(torch.equal(trained[k], one.params[k]) for k in trained)


def test_restarting_the_state_is_not_the_same_run() -> None:
    """The control: windows that carry only the params (``params0=``: Adam's moments and step index
    restart) end elsewhere, so the equality above is not vacuous."""
    opt, scale = OPTIMIZERS["adam"]
    obj, h = Windows(), hyper(scale)
    g, params = torch.Generator().manual_seed(0), None
    for _ in range(3):
        res = metaopt.hypergradient(obj, opt, h, WINDOW, generator=g, params0=params)
        params = res.params
    g, start = torch.Generator().manual_seed(0), None
    for _ in range(3):
        start = metaopt.hypergradient(obj, opt, h, WINDOW, generator=g, start=start).final
    one = hg.train(obj, opt, h, 3 * WINDOW, torch.Generator().manual_seed(0), return_state=True)
    assert start.step == 3 * WINDOW and torch.equal(start.params["w1"], one.params["w1"])
    assert not torch.equal(params["w1"], start.params["w1"])


def test_every_method_that_takes_a_start_continues_the_global_steps() -> None:
    """Each method of ``names(start=True)`` runs from a carried state at global step 450: the exact
    ones agree with ``full`` from there (hypergradient and final state), random truncation stops at
    ``450 + t``, the implicit ones at ``450 + steps``; every other method refuses with the list."""
    opt, scale = OPTIMIZERS["momentum"]
    obj, h = Windows(), hyper(scale)
    start = hg.train(obj, opt, h, N - WINDOW, torch.Generator().manual_seed(0), return_state=True)
    assert start.step == N - WINDOW and set(start.opt_state) == {"velocity"}

    def run(method):
        return metaopt.hypergradient(obj, opt, h, WINDOW, method=method, generator=torch.Generator().manual_seed(1),
                                     start=start)

    full = run("full")
    exact = {"checkpointed": hg.Checkpointed(7), "recursive": hg.Recursive(4), "truncated": hg.Truncated(WINDOW),
             "forward": hg.Forward(), "random_truncated": hg.RandomTruncated(WINDOW)}
    takes = hg.names(start=True)
    assert {"full", "checkpointed", "truncated", "recursive", "random_truncated", "forward", "drmad", "implicit",
            "cg", "neumann", "fixed_point", "dense"} <= set(takes)
    for name, method in exact.items():
        res = run(method)
        assert res.final.step == N, name
        for k in h:
            torch.testing.assert_close(res.grads[k], full.grads[k], rtol=1e-9, atol=1e-12, msg=name)
        for k in full.params:
            torch.testing.assert_close(res.final.params[k], full.final.params[k], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(res.final.opt_state["velocity"][k], full.final.opt_state["velocity"][k],
                                       rtol=1e-12, atol=1e-14)
    assert torch.count_nonzero(full.grads["lr"][: N - WINDOW]) == 0
    rt = run(hg.RandomTruncated(10, seed=0))
    assert rt.final.step == N - WINDOW + rt.extras["t"]
    res = run("drmad")
    assert res.final.step == N and torch.isfinite(res.grads["lr"]).all()
    assert torch.count_nonzero(res.grads["lr"][: N - WINDOW]) == 0
    for name in set(hg.names()) - set(takes):
        with pytest.raises(ValueError, match=r"start= does not apply to method .*; use one of full, "):
            run(name)
    for zo in (hg.ES(particles=256, sigma=1e-3), hg.PES(particles=256, sigma=1e-3, window=10)):
        res = run(zo)  # the unperturbed run continues the carried state; the estimate is full's within its error
        assert res.final.step == N, zo.name
        for k in full.params:
            torch.testing.assert_close(res.final.params[k], full.final.params[k], rtol=1e-12, atol=1e-14)
        err, se = res.grads["lr"] - full.grads["lr"], res.extras["stderr"]["lr"]
        assert torch.count_nonzero(full.grads["lr"][N - WINDOW:]) > 0
        assert bool((err[N - WINDOW:].abs() <= 4 * se[N - WINDOW:] + 1e-12).all()), zo.name


class Ridge(metaopt.MetaObjective):
    """A convex inner problem (full batch), for the implicit methods."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(30, 4, generator=g, dtype=DT)
        self.y = self.x @ torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=DT) + 0.1 * torch.randn(30, generator=g, dtype=DT)

    def init_params(self, hyper, generator):
        return {"w": torch.zeros(4, dtype=DT)}

    def inner_loss(self, params, hyper, k, batch):
        r = self.x[:20] @ params["w"] - self.y[:20]
        return (r**2).mean() + hyper["log_lam"].exp() * (params["w"] ** 2).sum()

    def outer_loss(self, params, hyper, batch):
        return ((self.x[20:] @ params["w"] - self.y[20:]) ** 2).mean()


def test_implicit_methods_continue_a_carried_state() -> None:
    """The implicit methods from a carried Adam state at step 300 (its bias correction continues, the
    rounds restart at step 300) reach the stationary point's hypergradient, and end at step 300 + steps."""
    obj, opt, h = Ridge(), optim.adam(lr=0.05), {"log_lam": torch.tensor(-2.0, dtype=DT)}
    start = hg.train(obj, opt, h, 300, torch.Generator().manual_seed(0), return_state=True)
    ref = metaopt.hypergradient(obj, optim.sgd(lr=0.2), h, 2000, method="dense").grads["log_lam"]
    for name in ("implicit", "cg", "neumann", "dense"):
        method = hg.as_method(name, 100, {"inner_tol": 1e-9, "max_inner_rounds": 50})
        res = metaopt.hypergradient(obj, opt, h, 100, method=method, start=start)
        assert res.final.step == 400 and set(res.final.opt_state) == {"mu", "nu"}, name
        torch.testing.assert_close(res.grads["log_lam"], ref, rtol=1e-5, atol=1e-8, msg=name)


def test_the_step_offset_reaches_every_index() -> None:
    """The optimizer's ``step=``, ``inner_loss``'s ``k``, ``hparams``' schedule and ``inner_batch``'s
    ``k`` are the global indices, and a compiled step gets them too."""
    seen: dict[str, list] = {"inner": [], "batch": [], "opt": []}

    class Spy(Windows):
        def inner_batch(self, k, generator):
            seen["batch"].append(k)
            return super().inner_batch(k, generator)

        def inner_loss(self, params, hyper, k, batch):
            seen["inner"].append(int(k))
            return super().inner_loss(params, hyper, k, batch)

    base = optim.sgd(lr=0.1)

    def update(grads, state, params, step, **hp):
        seen["opt"].append(step)
        return base.update(grads, state, params, step=step, **hp)

    spy_opt = base._replace(update=update)
    obj, h = Spy(), hyper(0.05)
    start = hg.InnerState(obj.init_params(h, torch.Generator().manual_seed(0)), {}, step=120)
    res = metaopt.hypergradient(obj, spy_opt, h, 5, generator=torch.Generator().manual_seed(0), start=start)
    assert seen["batch"] == list(range(120, 125)) and set(seen["opt"]) == set(range(120, 125))
    assert set(seen["inner"]) == set(range(120, 125))
    assert res.final.step == 125 and res.final.opt_state == {}
    problem = Problem(objective=obj, optimizer=base, hyper=h, steps=3, batches=[None] * 3, compile=True, step0=120)
    assert [int(k) for k in problem.ks] == [120, 121, 122] and problem.index(2) == 122


def test_a_bad_start_is_a_one_line_error() -> None:
    opt = optim.adam()
    obj, h = Windows(), hyper(0.01)
    params = obj.init_params(h, torch.Generator().manual_seed(0))
    good = opt.init(params)

    def run(start, **kw):
        return metaopt.hypergradient(obj, opt, h, 3, generator=torch.Generator().manual_seed(0), start=start, **kw)

    cases = [
        (hg.InnerState(params, {"mu": good["mu"]}),
         r"start.opt_state has the slots \['mu'\] but adam keeps \['mu', 'nu'\]"),
        (hg.InnerState(params, good | {"module_buffers": {}}), r"must not hold the module buffers"),
        (hg.InnerState(params, {"mu": {"w1": good["mu"]["w1"]}, "nu": good["nu"]}),
         r"start.opt_state\['mu'\] has the names \['w1'\] but the params have \['b1', 'w1', 'w2'\]"),
        (hg.InnerState(params, {"mu": good["mu"] | {"w1": torch.zeros(6, 3, dtype=DT)}, "nu": good["nu"]}),
         r"start.opt_state\['mu'\]\['w1'\] must have the shape \(3, 6\) and dtype torch.float64"),
        (hg.InnerState(params, {"mu": good["mu"] | {"b1": torch.zeros(6, dtype=torch.float32)}, "nu": good["nu"]}),
         r"start.opt_state\['mu'\]\['b1'\] must have the shape \(6,\) and dtype torch.float64 .*float32"),
        (hg.InnerState(params, "adam"), r"start.opt_state must be a dict"),
        (hg.InnerState(params, good, step=-1), r"start.step must be an int >= 0"),
        (hg.InnerState(params, good, seed=1.5), r"start.seed must be None or an int"),
        (hg.InnerState(params, good, buffers={"running": torch.zeros(3)}), r"start.buffers must have the objective's"),
    ]
    for start, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            run(start)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"give params0= or start=, not both"):
        run(hg.InnerState(params, good), params0=params)
    with pytest.raises(TypeError, match=r"start must be a metaopt.hypergrad.InnerState .* got dict"):
        run({"params": params})
    with pytest.raises(TypeError, match=r"start.params must be a non-empty dict \{name: tensor\} .* got list"):
        run(hg.InnerState([params["w1"]]))
    with pytest.raises(ValueError, match=r"give params0= or start=, not both"):
        hg.train(obj, opt, h, 3, params0=params, start=hg.InnerState(params))
    with pytest.raises(ValueError, match=r"start= does not apply to method 'reversible'"):
        metaopt.hypergradient(obj, optim.momentum(momentum=0.9), h, 3, method="reversible", start=hg.InnerState(params))
    with pytest.raises(ValueError, match=r"train: give buffers=True or return_state=True, not both"):
        hg.train(obj, opt, h, 3, buffers=True, return_state=True)
    # opt_state=None: a fresh state at the given step
    res = run(hg.InnerState(params, None, step=10))
    assert res.final.step == 13 and torch.count_nonzero(res.final.opt_state["nu"]["w1"]) > 0


def squared(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target) ** 2


class BatchNormed(metaopt.MetaObjective):
    """An ensemble of 2 BatchNorm MLPs: the running statistics are inner state (module buffers)."""

    def __init__(self) -> None:
        module = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                     torch.nn.Linear(6, 1)).double().train()
        self.ens = metaopt.Ensemble(module, 2)
        g = torch.Generator().manual_seed(0)
        self.x, self.xv = torch.randn(24, 3, generator=g, dtype=DT), torch.randn(24, 3, generator=g, dtype=DT)
        self.y, self.yv = self.x[:, :1].sin(), self.xv[:, :1].sin()

    def init_params(self, hyper, generator):
        return self.ens.init_params(generator, dtype=DT)

    def init_buffers(self, hyper, generator):
        return self.ens.init_buffers(DT)

    def inner_loss_and_buffers(self, params, buffers, hyper, k, batch):
        losses, new = self.ens.losses_with_buffers(params, buffers, self.x * hyper["scale"], self.y, squared,
                                                   training=True)
        return losses.sum(), new

    def outer_loss_with_buffers(self, params, buffers, hyper, batch):
        losses, _ = self.ens.losses_with_buffers(params, buffers, self.xv, self.yv, squared, training=False)
        return losses.mean()


def test_module_buffers_are_carried_with_the_state() -> None:
    """BatchNorm's running statistics travel in ``InnerState.buffers``: four windows of 5 steps equal
    one run of 20 (the outer loss reads the statistics in eval mode); ``buffers={}`` restarts them.
    ``train``'s windows are bit for bit; the hypergradient's windows record every step while the
    truncated run advances its first 15 unrecorded, and BatchNorm's kernels differ at round-off
    between the two (as ``train`` and ``full`` do without windows), so those compare to round-off."""
    obj, opt, h = BatchNormed(), optim.momentum(lr=0.1, momentum=0.9), {"scale": torch.ones(3, dtype=DT)}
    one = metaopt.hypergradient(obj, opt, h, 20, method=hg.Truncated(5), generator=torch.Generator().manual_seed(0))
    g, start = torch.Generator().manual_seed(0), None
    for _ in range(4):
        start = hg.train(obj, opt, h, 5, g, start=start, return_state=True)
    assert start.buffers["1.num_batches_tracked"].tolist() == [20, 20]
    trained = hg.train(obj, opt, h, 20, torch.Generator().manual_seed(0), return_state=True)
    assert_same_state(start, trained)
    assert all(torch.equal(start.buffers[k], b) for k, b in trained.buffers.items())
    g, start = torch.Generator().manual_seed(0), None
    for _ in range(4):
        res = metaopt.hypergradient(obj, opt, h, 5, generator=g, start=start)
        start = res.final
    assert start.step == 20 and start.buffers["1.num_batches_tracked"].tolist() == [20, 20]
    for k, b in one.final.buffers.items():
        torch.testing.assert_close(start.buffers[k], b, rtol=0, atol=1e-14, msg=k)
        torch.testing.assert_close(res.buffers[k], one.buffers[k], rtol=0, atol=1e-14, msg=k)
    for k, p in one.final.params.items():
        torch.testing.assert_close(start.params[k], p, rtol=0, atol=1e-14)
    torch.testing.assert_close(res.grads["scale"], one.grads["scale"], rtol=1e-12, atol=1e-14)
    assert not torch.equal(start.buffers["1.running_mean"], one_window(obj, opt, h).buffers["1.running_mean"])
    fresh = dataclasses.replace(start, buffers={})
    again = metaopt.hypergradient(obj, opt, h, 5, generator=torch.Generator().manual_seed(0), start=fresh)
    assert again.final.buffers["1.num_batches_tracked"].tolist() == [5, 5]


def one_window(obj: metaopt.MetaObjective, opt: optim.Optimizer, h: dict) -> hg.InnerState:
    return hg.train(obj, opt, h, 5, torch.Generator().manual_seed(0), return_state=True)


class TorchLoop(metaopt.MetaObjective):
    """The squared error of an MLP on fixed data: the loss a plain torch.optim loop minimises."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model, x, y

    def init_params(self, hyper, generator):
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def inner_loss(self, params, hyper, k, batch):
        return ((torch.func.functional_call(self.model, params, (self.x,)) - self.y) ** 2).mean()

    def outer_loss(self, params, hyper, batch):
        return self.inner_loss(params, hyper, 0, None) + 0 * hyper["unused"]


@pytest.mark.parametrize("cls", ["Adam", "RMSprop", "NAdam"])
def test_a_torch_optim_run_continues_through_an_inner_state_and_back(cls: str) -> None:
    """torch.optim trains 4 steps; its state becomes an InnerState (functional_state), metaopt trains 5
    more; the final state loads back (load_functional_state) and torch.optim trains 3 more: the same
    as 12 torch.optim steps, to round-off."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    make = getattr(torch.optim, cls)

    def net() -> torch.nn.Module:
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()

    def loop(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    ref, model = net(), net()
    ref_opt = make(ref.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    loop(ref, ref_opt, 12)
    opt = make(model.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    loop(model, opt, 4)
    named = dict(model.named_parameters())
    start = hg.InnerState({n: p.detach().clone() for n, p in named.items()}, *optim.functional_state(opt, named))
    assert start.step == 4
    [(_, fopt)] = optim.functional_of(opt)
    final = hg.train(TorchLoop(model, x, y), fopt, {"unused": torch.zeros((), dtype=torch.float64)}, 5, start=start,
                     return_state=True)
    assert final.step == 9
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(final.params[n])
    optim.load_functional_state(opt, named, final.opt_state, final.step)
    loop(model, opt, 3)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)
