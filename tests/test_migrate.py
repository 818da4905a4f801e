"""metaopt.migrate: the eager differentiable context (against torch.optim's trajectories, finite
differences and higher) and migrate.backward with every registered method (against the eager context)."""

from __future__ import annotations

import copy

import matrix as M
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt import hypergrad as hg
from metaopt import migrate, optim

STEPS = 4
D = torch.float64


def make_net(bn: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, 2)]
    return nn.Sequential(*layers).to(D)


def data(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x, xq = torch.randn(8, 3, generator=g, dtype=D), torch.randn(8, 3, generator=g, dtype=D)
    return x, x.sin() @ torch.ones(3, 2, dtype=D), xq, xq.sin() @ torch.ones(3, 2, dtype=D)


def sq(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()  # written out: forward mode's jvp-of-grad fails through F.mse_loss


def eager(net: nn.Module, opt, steps: int = STEPS, **kw) -> torch.Tensor:  # noqa: ANN001
    """The query loss after ``steps`` inner steps in the context, backward() called."""
    x, y, xq, yq = data()
    with migrate.innerloop(net, opt, **kw) as (fnet, diffopt):
        for _ in range(steps):
            diffopt.step(sq(fnet(x), y))
        loss = sq(fnet(xq), yq)
        if kw.get("track", True):
            loss.backward()
    return loss.detach()


TORCH_OPTS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.2),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.99), weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.05),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.05),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.05),
}


def step_beside_torch(fnet, diffopt, ref: nn.Module, topt, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """``steps`` differentiable steps of the context beside the same torch.optim steps on ``ref``; then
    the two models' parameters agree to round-off."""
    for _ in range(steps):
        diffopt.step(sq(fnet(x), y))
        topt.zero_grad()
        sq(ref(x), y).backward()
        topt.step()
    for (n, w), p in zip(fnet.named_parameters(), ref.parameters()):
        torch.testing.assert_close(w, p, rtol=1e-12, atol=1e-13, msg=n)


@pytest.mark.parametrize("kind", sorted(TORCH_OPTS))
def test_trajectory_equals_torch_optim_and_gradient_matches_finite_differences(kind: str) -> None:
    x, y, xq, yq = data()
    net = make_net()
    ref = copy.deepcopy(net)
    opt = TORCH_OPTS[kind](net.parameters())
    topt = TORCH_OPTS[kind](ref.parameters())
    with migrate.innerloop(net, opt) as (fnet, diffopt):
        step_beside_torch(fnet, diffopt, ref, topt, x, y, STEPS)
        sq(fnet(xq), yq).backward()
    # dF/dw0 along one direction against central differences of the untracked loop
    v = [torch.randn_like(p) for p in net.parameters()]
    analytic = sum((p.grad * vi).sum() for p, vi in zip(net.parameters(), v))

    def at(eps: float) -> float:
        moved = copy.deepcopy(net)
        with torch.no_grad():
            for p, vi in zip(moved.parameters(), v):
                p.add_(eps * vi)
        return float(eager(moved, TORCH_OPTS[kind](moved.parameters()), track=False))

    eps = 1e-5
    fd = (at(eps) - at(-eps)) / (2 * eps)
    assert abs(float(analytic) - fd) <= 1e-6 * max(1.0, abs(fd)), (float(analytic), fd)


def test_agrees_with_higher_and_leaves_the_module_alone() -> None:
    import higher
    x, y, xq, yq = data()
    net, ref = make_net(bn=True), make_net(bn=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params_before = list(net.parameters())
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    with migrate.innerloop(net, torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5),
                           override={"lr": lr}) as (fnet, diffopt):
        for _ in range(STEPS):
            diffopt.step(sq(fnet(x), y))
        sq(fnet(xq), yq).backward()
        assert not torch.equal(dict(fnet.named_buffers())["1.running_mean"], before["1.running_mean"])
    lr_ref = torch.tensor(0.1, dtype=D, requires_grad=True)
    with higher.innerloop_ctx(ref, torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.5),
                              copy_initial_weights=False, override={"lr": [lr_ref]}) as (fref, dref):
        for _ in range(STEPS):
            dref.step(sq(fref(x), y))
        sq(fref(xq), yq).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(lr.grad, lr_ref.grad, rtol=1e-10, atol=1e-13)
    assert list(net.parameters()) == params_before  # the same Parameter objects
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # buffers and weights untouched


def test_param_groups_frozen_and_first_order() -> None:
    x, y, xq, yq = data()
    net = make_net()
    ref = copy.deepcopy(net)
    net[0].bias.requires_grad_(False)
    ref[0].bias.requires_grad_(False)
    groups = lambda m: [{"params": [m[0].weight]}, {"params": [m[2].weight, m[2].bias], "lr": 0.05}]  # noqa: E731
    topt = torch.optim.SGD(groups(ref), lr=0.2, momentum=0.5)
    with migrate.innerloop(net, torch.optim.SGD(groups(net), lr=0.2, momentum=0.5)) as (fnet, diffopt):
        for _ in range(STEPS):
            diffopt.step(sq(fnet(x), y))
            topt.zero_grad()
            sq(ref(x), y).backward()
            topt.step()
        for w, p in zip(fnet.parameters(), ref.parameters()):
            torch.testing.assert_close(w, p, rtol=1e-12, atol=1e-13)
        assert fnet.fast_params().keys() == {"0.weight", "2.weight", "2.bias"}
        assert dict(fnet.named_parameters())["0.bias"] is net[0].bias
    # first order: dF/dw0 is the outer gradient at the final weights (SGD's update is w - lr g(const))
    with migrate.innerloop(net, torch.optim.SGD(net.parameters(), lr=0.2), first_order=True) as (fnet, diffopt):
        for _ in range(STEPS):
            diffopt.step(sq(fnet(x), y))
        final = {n: w.detach().requires_grad_() for n, w in fnet.fast_params().items()}
        sq(fnet(xq), yq).backward()
    frozen = {"0.bias": net[0].bias}
    expect = torch.autograd.grad(sq(torch.func.functional_call(net, {**final, **frozen}, (xq,)), yq),
                                 list(final.values()))
    for (n, p), g in zip([(n, p) for n, p in net.named_parameters() if p.requires_grad], expect):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14, msg=n)
    assert net[0].bias.grad is None


def test_per_group_override_and_metaopt_optimizer() -> None:
    x, y, xq, yq = data()
    net = make_net()
    lrs = [torch.tensor(0.1, dtype=D, requires_grad=True), torch.tensor(0.2, dtype=D, requires_grad=True)]
    groups = [{"params": net[0].parameters()}, {"params": net[2].parameters()}]
    eager(net, torch.optim.SGD(groups, lr=0.3), override={"lr": lrs})
    # the same lrs as a per-parameter dict of a metaopt optimizer
    net2 = make_net()
    lr2 = [t.detach().clone().requires_grad_() for t in lrs]
    per = {"0.weight": lr2[0], "0.bias": lr2[0], "2.weight": lr2[1], "2.bias": lr2[1]}
    eager(net2, optim.sgd(lr=0.3), override={"lr": per})
    for a, b in zip(lrs, lr2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)
    for p, q in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)


def test_bad_input_is_refused_in_one_line() -> None:
    net = make_net()
    cases = [
        (lambda: torch.optim.LBFGS(net.parameters()), TypeError, "no functional counterpart"),
        (lambda: torch.optim.Adam(net.parameters(), amsgrad=True), ValueError, r"amsgrad=True\) is not supported"),
        (lambda: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, dampening=0.1), ValueError,
         r"dampening=0.1\) is not supported"),
    ]
    for make, err, text in cases:
        with pytest.raises(err, match=text), migrate.innerloop(net, make()):
            pass
    with pytest.raises(ValueError, match="has no hyperparameter 'b1'"), \
            migrate.innerloop(net, torch.optim.SGD(net.parameters(), lr=0.1), override={"b1": 0.5}):
        pass
    with pytest.raises(ValueError, match="one per group"), \
            migrate.innerloop(net, torch.optim.SGD(net.parameters(), lr=0.1), override={"lr": [0.1, 0.2]}):
        pass
    with pytest.raises(ValueError, match="not a parameter of model"), \
            migrate.innerloop(net, torch.optim.SGD(make_net().parameters(), lr=0.1)):
        pass


# -- every registered method, from the same two losses ---------------------------------------------------------


def _losses():  # noqa: ANN202
    x, y, xq, yq = data()
    return (lambda fnet, k: sq(fnet(x), y)), (lambda fnet: sq(fnet(xq), yq))


def _grads(net: nn.Module, lr: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters()] + [lr.grad.flatten()])


def _run_method(name: str, bn: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(eager context's dF/d(w0, lr), migrate.backward's) on the same problem; momentum SGD, lr learned."""
    inner, outer = _losses()
    net, ref = make_net(bn), make_net(bn)
    lr, lr_ref = (torch.tensor(0.1, dtype=D, requires_grad=True) for _ in range(2))
    eager(ref, torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.5), override={"lr": lr_ref})
    migrate.backward(net, torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5), inner, outer, STEPS,
                     method=M.make_method(name, STEPS), override={"lr": lr}, generator=torch.Generator().manual_seed(0))
    return _grads(net, lr), _grads(ref, lr_ref)


EXACT = {"full": 1e-10, "checkpointed": 1e-10, "recursive": 1e-10, "truncated": 1e-10, "random_truncated": 1e-10,
         "forward": 1e-10, "reversible": 1e-8}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_every_exact_method_agrees_with_the_eager_context(name: str) -> None:
    assert name in hg.names()
    got, want = _run_method(name, bn=name not in ("reversible", "forward"))
    err = float((got - want).norm() / want.norm())
    print(f"{name}: relative error against the eager context {err:.1e}")
    assert err <= EXACT[name], name


def test_every_registered_method_agrees_refuses_or_is_approximate_by_design() -> None:
    inner, outer = _losses()
    stationary = [n for n, e in hg.registered().items() if e.cls.reference == "stationary"]
    assert set(EXACT) | set(stationary) | {"drmad"} <= set(hg.names())
    net = make_net()
    for name in stationary:  # a learned init has no effect at the inner fixed point
        with pytest.raises(ValueError, match="does not depend on the initial weights") as err:
            migrate.backward(net, torch.optim.SGD(net.parameters(), lr=0.1), inner, outer, STEPS, method=name)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="heavy-ball|momentum") as err:  # reversible: momentum SGD only
        migrate.backward(net, torch.optim.Adam(net.parameters()), inner, outer, STEPS, method="reversible")
    assert "\n" not in str(err.value)
    assert all(p.grad is None for p in net.parameters())  # nothing written by a refusal
    # DrMAD is approximate by design (a straight-line trajectory): it runs and writes finite grads; so must any
    # method registered later (e.g. a zero-order estimator), or refuse in one line before writing anything
    for name in ["drmad", *sorted(set(hg.names()) - set(EXACT) - set(stationary) - {"drmad"})]:
        net.zero_grad()
        try:
            migrate.backward(net, torch.optim.SGD(net.parameters(), lr=0.1), inner, outer, STEPS,
                             method=M.make_method(name, STEPS), generator=torch.Generator().manual_seed(0))
        except (ValueError, TypeError) as refusal:
            assert name != "drmad" and "\n" not in str(refusal), (name, refusal)
            assert all(p.grad is None for p in net.parameters()), name
            continue
        assert all(torch.isfinite(p.grad).all() for p in net.parameters()), name


def test_implicit_with_a_learned_decay_matches_the_converged_eager_run() -> None:
    """init=False: only the weight decay is learned; on a convex inner problem, 300 eager steps reach the
    fixed point and the eager unroll's dF/d(decay) equals the implicit method's."""
    g = torch.Generator().manual_seed(3)
    x, xq = torch.randn(20, 4, generator=g, dtype=D), torch.randn(20, 4, generator=g, dtype=D)
    y, yq = x @ torch.ones(4, dtype=D), xq @ torch.ones(4, dtype=D) + 0.1
    inner = lambda f, k: ((f(x).squeeze(-1) - y) ** 2).mean()  # noqa: E731
    outer = lambda f: ((f(xq).squeeze(-1) - yq) ** 2).mean()  # noqa: E731
    wd, wd_ref = (torch.tensor(0.5, dtype=D, requires_grad=True) for _ in range(2))
    torch.manual_seed(0)
    net = nn.Linear(4, 1).to(D)
    with migrate.innerloop(net, torch.optim.SGD(net.parameters(), lr=0.1), override={"weight_decay": wd_ref}) as (
            f, d):
        for k in range(300):
            d.step(inner(f, k))
        outer(f).backward()
    net.zero_grad()
    res = migrate.backward(net, torch.optim.SGD(net.parameters(), lr=0.1), inner, outer, 300, method="cg",
                           override={"weight_decay": wd}, init=False)
    assert res.method == "implicit" or res.method == "cg"
    torch.testing.assert_close(wd.grad, wd_ref.grad, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in net.parameters())  # init=False: the weights get nothing


# -- the ported examples beside their originals ------------------------------------------------------------------

PORT_ARGS = ["--n_way", "5", "--k_spt", "1", "--k_qry", "2", "--task_num", "2", "--epochs", "1", "--tasks", "2",
             "--width", "8", "--dtype", "float64"]


def _compare(a: nn.Module, b: nn.Module) -> float:
    """The largest relative difference of the params and of the last meta-gradients; asserts round-off."""
    worst = 0.0
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        for x, y in ((p.detach(), q.detach()), (p.grad, q.grad)):
            worst = max(worst, float((x - y).norm() / y.norm()))
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13, msg=n)
    return worst


def _beside_original(port, monkeypatch: pytest.MonkeyPatch, attr: str, original, label: str) -> list[dict]:  # noqa: ANN001
    """Run the port as written and with ``port.<attr>`` set to the original library's code; the params after
    the meta-steps, the last meta-gradients and every logged loss agree to round-off. Returns the port's log."""
    net, log = port.main(PORT_ARGS)
    monkeypatch.setattr(port, attr, original)
    ref, ref_log = port.main(PORT_ARGS)
    worst = _compare(net, ref)
    print(f"{label}: largest relative difference of params and meta-gradients {worst:.1e}")
    assert worst < 1e-10
    for e, f in zip(log, ref_log, strict=True):
        assert e["loss"] == pytest.approx(float(f["loss"]), rel=1e-10)
    return log


def test_higher_port_agrees_with_higher(monkeypatch: pytest.MonkeyPatch) -> None:
    import higher

    import examples.maml_omniglot_higher as port

    class Higher:  # the original's calls, through the port's one changed line
        @staticmethod
        def innerloop(model, opt, track=True):  # noqa: ANN001, ANN205
            return higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=track)

    log = _beside_original(port, monkeypatch, "migrate", Higher, "higher port vs higher")
    assert [e["mode"] for e in log] == ["train", "train", "test"]


def _torchopt_train(db, net, meta_opt, epoch, log):  # noqa: ANN001, ANN202
    """The original torchopt example's train loop (MetaSGD stepping net in place, state dicts recovered)."""
    import torchopt

    net.train()
    inner_opt = torchopt.MetaSGD(net, lr=1e-1)
    for _ in range(db.n_train_iter):
        x_spt, y_spt, x_qry, y_qry = db.next()
        qry_losses = []
        meta_opt.zero_grad()
        net_state_dict = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        optim_state_dict = torchopt.extract_state_dict(inner_opt, by="reference")
        for i in range(x_spt.size(0)):
            for _ in range(5):
                inner_opt.step(F.cross_entropy(net(x_spt[i]), y_spt[i]))
            qry_losses.append(F.cross_entropy(net(x_qry[i]), y_qry[i]))
            torchopt.recover_state_dict(net, net_state_dict)
            torchopt.recover_state_dict(inner_opt, optim_state_dict)
        qry_losses = torch.mean(torch.stack(qry_losses))
        qry_losses.backward()
        meta_opt.step()
        log.append({"loss": qry_losses.item(), "mode": "train"})


def test_torchopt_port_agrees_with_torchopt(monkeypatch: pytest.MonkeyPatch) -> None:
    import examples.maml_omniglot_torchopt as port

    log = _beside_original(port, monkeypatch, "train", _torchopt_train, "torchopt port vs torchopt")
    assert [e["mode"] for e in log] == ["test", "train", "train", "test"]


def test_backward_with_param_groups_frozen_params_and_truncation() -> None:
    """Per-group learned rates and a frozen bias through migrate.backward equal the eager context; a truncated
    unroll (K = 1 < n) is biased (the test can tell), and first_order is the eager context's switch."""
    inner, outer = _losses()

    def setup():  # noqa: ANN202
        net = make_net()
        net[0].bias.requires_grad_(False)
        lrs = [torch.tensor(v, dtype=D, requires_grad=True) for v in (0.1, 0.2)]
        groups = [{"params": [net[0].weight]}, {"params": net[2].parameters(), "momentum": 0.3}]
        return net, torch.optim.SGD(groups, lr=0.3, momentum=0.5), lrs

    ref, opt_ref, lrs_ref = setup()
    eager(ref, opt_ref, override={"lr": lrs_ref})
    want = torch.cat([p.grad.flatten() for p in ref.parameters() if p.requires_grad]
                     + [t.grad.reshape(1) for t in lrs_ref])
    for method, close in (("full", True), (hg.Truncated(1), False)):
        net, opt, lrs = setup()
        res = migrate.backward(net, opt, inner, outer, STEPS, method=method, override={"lr": lrs})
        got = torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad]
                        + [t.grad.reshape(1) for t in lrs])
        err = float((got - want).norm() / want.norm())
        assert (err <= 1e-12) if close else (err > 1e-3), (method, err)
        assert net[0].bias.grad is None and set(res.grads) == {"init.0.weight", "init.2.weight", "init.2.bias",
                                                                "lr.0", "lr.1"}
    with pytest.raises(TypeError, match="first_order=True"):
        migrate.backward(net, opt, inner, outer, STEPS, first_order=True)
    table = torch.full((STEPS,), 0.1, dtype=D, requires_grad=True)
    with pytest.raises(TypeError, match="is a schedule"):  # its table would silently get no gradient
        migrate.backward(net, opt, inner, outer, STEPS, override={"lr": optim.schedule.table(table)})
    net, opt, _ = setup()  # in the eager context a schedule's table is differentiated like any tensor
    eager(net, opt, override={"lr": optim.schedule.table(table)})
    assert table.grad is not None and bool((table.grad != 0).all())


@pytest.mark.parametrize("kind", sorted(TORCH_OPTS))
def test_a_stepped_torch_optimizer_is_continued_from_its_state(kind: str) -> None:
    """As higher copies it: 2 torch.optim steps, then 3 in the context, equal 5 torch.optim steps."""
    x, y, _, _ = data()
    net = make_net()
    opt = TORCH_OPTS[kind](net.parameters())
    for _ in range(2):
        opt.zero_grad()
        sq(net(x), y).backward()
        opt.step()
    ref = copy.deepcopy(net)
    topt = TORCH_OPTS[kind](ref.parameters())
    topt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares the step tensors
    saved = copy.deepcopy(opt.state_dict())
    with migrate.innerloop(net, opt) as (fnet, diffopt):
        step_beside_torch(fnet, diffopt, ref, topt, x, y, 3)
    for key, value in opt.state_dict()["state"].items():  # the torch optimizer's own state is not touched
        for slot, t in value.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(saved["state"][key][slot])), (key, slot)
