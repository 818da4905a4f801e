"""Every hypergradient method against central finite differences (float64) and against each other."""

import pytest
import torch
import torch.nn.functional as F
from problems import Distill, distill_hyper, mlp_ensemble

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.models import MLP

STEPS = 10
OPTIMIZERS = {
    "sgd": lambda: optim.sgd(),
    "momentum": lambda: optim.momentum(momentum=0.8, weight_decay=1e-3),
    "nesterov": lambda: optim.nesterov(momentum=0.7),
    # Adam's first steps are ~ g / (|g| + eps): near g = 0 that is steep at scale eps, where central
    # differences (step 1e-5) are not accurate; a larger eps keeps F smooth at the FD scale
    "adam": lambda: optim.adam(b1=0.8, b2=0.9, eps=1e-3),
}
METHODS = [hg.Full(), hg.Checkpointed(), hg.Checkpointed(every=3), hg.Truncated(STEPS), hg.Forward(chunk_size=16)]


def run(obj, opt, hyper, method, seed=3):
    return metaopt.hypergradient(obj, opt, hyper, STEPS, method=method, generator=torch.Generator().manual_seed(seed))


def fd_check(obj, opt, hyper, grads, directions=3, eps=1e-4):
    """Finite differences of F along random directions vs <dF/dh, v>; returns the worst relative error.

    The five-point stencil (8 (F(h+e) - F(h-e)) - (F(h+2e) - F(h-2e))) / 12e is fourth order: its
    truncation error (~e^4 F^(5)) stays far below 1e-6 even where the inner run makes F steep (Adam),
    and its round-off (~1e-16 / e) too.
    """
    g = torch.Generator().manual_seed(11)
    worst = 0.0
    for _ in range(directions):
        v = {k: torch.randn(t.shape, generator=g) for k, t in hyper.items()}

        def f(t, v=v):
            return float(run(obj, opt, {k: hyper[k] + t * v[k] for k in hyper}, "full").loss)

        fd = (8 * (f(eps) - f(-eps)) - (f(2 * eps) - f(-2 * eps))) / (12 * eps)
        an = float(sum((grads[k] * v[k]).sum() for k in hyper))
        worst = max(worst, abs(fd - an) / max(abs(an), 1e-12))
    return worst


def make(kind):
    if kind == "m1":
        return Distill(mlp_ensemble(m=1))
    if kind == "m3":
        return Distill(mlp_ensemble(m=3))
    if kind == "per_param":
        return Distill(mlp_ensemble(m=3), lr_mode="per_param")
    if kind == "per_member":
        return Distill(mlp_ensemble(m=3), lr_mode="per_member")
    if kind == "two_arch":
        groups = {"lin": mlp_ensemble((2, 1), m=2), "mlp": mlp_ensemble((2, 4, 4, 1), m=2)}
        return Distill(metaopt.MultiEnsemble(groups))
    if kind == "vmap":
        return Distill(mlp_ensemble(m=2, batched=False))
    raise ValueError(kind)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["m1", "m3", "per_param", "per_member", "two_arch", "vmap"])
def test_methods_match_finite_differences_and_each_other(opt_name, kind):
    obj = make(kind)
    opt = OPTIMIZERS[opt_name]()
    hyper = distill_hyper(obj, STEPS)
    results = [run(obj, opt, hyper, m) for m in METHODS]
    full = results[0]
    assert fd_check(obj, opt, hyper, full.grads) <= 1e-6
    for res in results[1:]:
        assert torch.allclose(res.loss, full.loss, rtol=0, atol=1e-12), res.method
        for k in hyper:
            assert res.grads[k].shape == hyper[k].shape
            torch.testing.assert_close(res.grads[k], full.grads[k], rtol=0, atol=1e-10, msg=f"{res.method} {k}")
            assert full.grads[k].abs().max() > 0


def test_truncation_is_biased_and_memory_policies_order():
    obj = make("m3")
    opt = OPTIMIZERS["momentum"]()
    hyper = distill_hyper(obj, STEPS)
    full = run(obj, opt, hyper, hg.Full())
    short = run(obj, opt, hyper, hg.Truncated(2))
    ckpt = run(obj, opt, hyper, hg.Checkpointed(every=3))
    # the learning rates of steps the truncated sweep never reaches get no gradient
    assert torch.all(short.grads["lr"][: STEPS - 2] == 0)
    torch.testing.assert_close(short.grads["lr"][STEPS - 2 :], short.grads["lr"][STEPS - 2 :])
    assert not torch.allclose(short.grads["x"], full.grads["x"])
    assert ckpt.peak_bytes < full.peak_bytes
    assert short.peak_bytes < full.peak_bytes


def test_checkpointed_memory_grows_like_sqrt_n():
    obj = make("m3")
    opt = OPTIMIZERS["sgd"]()
    peaks = {}
    for n in (16, 64):
        hyper = distill_hyper(obj, n)
        f = metaopt.hypergradient(obj, opt, hyper, n, method="full", generator=torch.Generator().manual_seed(0))
        c = metaopt.hypergradient(obj, opt, hyper, n, method="checkpointed", generator=torch.Generator().manual_seed(0))
        peaks[n] = (f.peak_bytes, c.peak_bytes)
    full_ratio = peaks[64][0] / peaks[16][0]
    ckpt_ratio = peaks[64][1] / peaks[16][1]
    assert 3.5 < full_ratio < 4.5  # linear in n
    assert ckpt_ratio < 2.5  # ~ sqrt(n): 2x


@pytest.mark.parametrize("method", [hg.Full(), hg.Truncated(7), hg.Checkpointed(every=4)])
def test_sampled_memory_meter_equals_exact(method):
    obj = make("two_arch")
    hyper = distill_hyper(obj, STEPS)
    for opt in (OPTIMIZERS["sgd"](), OPTIMIZERS["adam"]()):
        kw = {"generator": torch.Generator().manual_seed(0)}
        sampled = metaopt.hypergradient(obj, opt, hyper, STEPS, method=method, **kw)
        kw = {"generator": torch.Generator().manual_seed(0)}
        exact = metaopt.hypergradient(obj, opt, hyper, STEPS, method=method, exact_memory=True, **kw)
        assert sampled.peak_bytes == exact.peak_bytes > 0


class MetaInit(metaopt.MetaObjective):
    """MAML-style: the initial parameters are the hyperparameters."""

    def __init__(self):
        # smooth (tanh) and seeded: central differences are only valid away from ReLU kinks, and
        # the start point must not depend on which tests ran before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = MLP([2, 3, 1], activation="tanh")
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(16, 2, generator=g)
        self.y = torch.sin(self.x.sum(1, keepdim=True))

    def init_params(self, hyper, generator):
        return {k: v * 1.0 for k, v in hyper.items()}

    def _loss(self, p):
        pred = torch.func.functional_call(self.model, p, (self.x,))
        return ((pred - self.y) ** 2).mean()

    def inner_loss(self, params, hyper, k, batch):
        return self._loss(params)

    def outer_loss(self, params, hyper, batch):
        return self._loss(params) + 0.1 * sum((p**2).sum() for p in params.values())


@pytest.mark.parametrize("method", ["full", "checkpointed", hg.Forward()])
def test_hyper_dependent_initialisation(method):
    obj = MetaInit()
    hyper = {k: v.detach().double() for k, v in obj.model.named_parameters()}
    opt = optim.sgd(lr=0.1)
    res = run(obj, opt, hyper, method)
    assert fd_check(obj, opt, hyper, res.grads) <= 1e-6


def test_result_reports_loss_params_and_time():
    obj = make("m3")
    hyper = distill_hyper(obj, STEPS)
    res = run(obj, optim.sgd(), hyper, "full")
    assert res.method == "full" and res.steps == STEPS and res.seconds > 0 and res.peak_bytes > 0
    assert set(res.params) == set(obj.ens.shapes) and res.params["layers.0.weight"].shape[0] == 3
    assert res.loss.dim() == 0 and not res.loss.requires_grad
    # the caller's tensors are left alone
    assert all(not v.requires_grad for v in hyper.values())


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_steps_and_methods():
    obj = make("m1")
    hyper = distill_hyper(obj, STEPS)
    opt = optim.sgd()
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps must be a positive int"):
            metaopt.hypergradient(obj, opt, hyper, steps)
    with pytest.raises(ValueError, match=r"Truncated\(k=11\) needs 1 <= k <= steps = 10"):
        metaopt.hypergradient(obj, opt, hyper, STEPS, method=hg.Truncated(11))
    with pytest.raises(ValueError, match="Checkpointed"):
        metaopt.hypergradient(obj, opt, hyper, STEPS, method=hg.Checkpointed(every=0))
    with pytest.raises(ValueError, match="unknown hypergradient method 'reversed'"):
        metaopt.hypergradient(obj, opt, hyper, STEPS, method="reversed")
    with pytest.raises(ValueError, match="needs its length"):
        metaopt.hypergradient(obj, opt, hyper, STEPS, method="truncated")
    with pytest.raises(TypeError, match=r"hyper\['x'\] must be a floating-point tensor"):
        metaopt.hypergradient(obj, opt, {**hyper, "x": [1.0]}, STEPS)


def test_per_parameter_keys_must_match():
    obj = make("per_param")
    hyper = distill_hyper(obj, STEPS)
    hyper.pop("layers.1.bias")
    with pytest.raises(ValueError, match=r"missing \['layers.1.bias'\]"):
        run(obj, optim.sgd(), hyper, "full")


def test_hyperparameter_shape_mismatch():
    obj = make("per_member")  # table [n, m=3]
    hyper = distill_hyper(obj, STEPS)
    hyper["lr"] = hyper["lr"][:, :2]
    with pytest.raises(ValueError, match=r"shape \(2,\), which does not fit parameter 'layers.0.weight'"):
        run(obj, optim.sgd(), hyper, "full")


def test_table_shorter_than_the_run():
    obj = make("m1")
    hyper = distill_hyper(obj, STEPS - 1)
    with pytest.raises(IndexError, match="table schedule has 9 steps; step 9 is outside it"):
        run(obj, optim.sgd(), hyper, "full")


@pytest.mark.parametrize("method", ["full", "checkpointed", "forward"])
def test_non_finite_outer_loss(method):
    class Diverging(Distill):
        def outer_loss(self, params, hyper, batch):  # e.g. a log of a probability that reached 0
            return torch.log(super().outer_loss(params, hyper, batch) * 0.0)

    obj = Diverging(mlp_ensemble(m=1))
    hyper = distill_hyper(obj, STEPS)
    with pytest.raises(metaopt.NonFiniteError, match="outer loss is"):
        run(obj, optim.sgd(), hyper, method)
    # a caller with its own guard (the runner's NaN policy) can take the non-finite result
    res = metaopt.hypergradient(obj, optim.sgd(), hyper, STEPS, method=method, check_finite=False)
    assert torch.isinf(res.loss)


def test_method_names_are_not_arguments():
    assert hg.Truncated(5).name == "truncated" and hg.Checkpointed(3).name == "checkpointed"
    with pytest.raises(TypeError):
        hg.Truncated(5, "x")


@pytest.mark.parametrize("method", ["full", "forward"])
def test_inner_loss_must_be_scalar_in_every_mode(method):
    class Bad(Distill):
        def inner_loss(self, params, hyper, k, batch):
            return self.ens.losses(params, hyper["x"][0], self.y_syn, lambda a, t: (a - t) ** 2)

    obj = Bad(mlp_ensemble(m=3))
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar tensor"):
        run(obj, optim.sgd(), distill_hyper(obj, STEPS), method)


def test_inner_loss_must_be_scalar():
    class Bad(Distill):
        def inner_loss(self, params, hyper, k, batch):
            return self.ens.losses(params, hyper["x"][0], self.y_syn, lambda a, t: (a - t) ** 2)

    obj = Bad(mlp_ensemble(m=3))
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar tensor .* got \(3,\) at step 0"):
        run(obj, optim.sgd(), distill_hyper(obj, STEPS), "full")


class CompileFriendly(Distill):
    """The distillation objective written for compile=True: per-step values picked with at_step."""

    def inner_loss(self, params, hyper, k, batch):
        x = metaopt.optim.schedule.at_step(hyper["x"], k % hyper["x"].shape[0])
        return self.ens.losses(params, x, self.y_syn, lambda a, t: F.binary_cross_entropy_with_logits(
            a, t, reduction="none")).sum()


def test_compiled_steps_equal_eager():
    obj = CompileFriendly(mlp_ensemble(m=3))
    hyper = distill_hyper(obj, STEPS)
    opt = optim.adam(b1=0.8, b2=0.9)
    eager = run(obj, opt, hyper, "full")
    for method in (hg.Full(), hg.Checkpointed(every=4)):
        res = metaopt.hypergradient(obj, opt, hyper, STEPS, method=method, generator=torch.Generator().manual_seed(3),
                                    compile=True)
        torch.testing.assert_close(res.loss, eager.loss, rtol=0, atol=1e-12)
        for k in hyper:
            torch.testing.assert_close(res.grads[k], eager.grads[k], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="compile=True does not apply to method .forward."):
        metaopt.hypergradient(obj, opt, hyper, STEPS, method="forward", compile=True)


@pytest.mark.parametrize("method", ["forward", "checkpointed", "drmad"])
def test_a_given_start_point_is_used_by_every_method(method):
    obj = make("m3")
    hyper = distill_hyper(obj, STEPS)
    start = obj.ens.init_params(torch.Generator().manual_seed(42), dtype=torch.float64)
    ref = metaopt.hypergradient(obj, optim.sgd(), hyper, STEPS, method="full", params0=start)
    res = metaopt.hypergradient(obj, optim.sgd(), hyper, STEPS, method=method, params0=start)
    torch.testing.assert_close(res.loss, ref.loss, rtol=0, atol=1e-12)
    other = metaopt.hypergradient(obj, optim.sgd(), hyper, STEPS, method="full",
                                  generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other.loss, ref.loss)
    if method != "drmad":
        torch.testing.assert_close(res.grads["x"], ref.grads["x"], rtol=0, atol=1e-10)
