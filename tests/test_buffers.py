"""Module buffers (BatchNorm's running statistics) are inner state: carried through the inner run
beside params and optimizer state, replayed by recomputation, constants of the hypergradient, and
the user's module is never modified (float64, small problems)."""

import io

import problems
import pytest
import torch
import torch.nn.functional as F
from problems import SEAM_STEPS, bce, flat_grads, seam_exact_methods, seam_hyper, seam_run
from torch import nn

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim

N = SEAM_STEPS


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return problems.data(seed, n=24, d=3)


def snapshot(module: nn.Module) -> bytes:
    out = io.BytesIO()
    torch.save(module.state_dict(), out)
    return out.getvalue()


class BatchNormNet(metaopt.MetaObjective):
    """An ensemble of 2 BatchNorm MLPs trained in train mode; the outer loss in eval mode (reading
    the running statistics) or, with ``outer_train``, in train mode (batch statistics)."""

    def __init__(self, outer_train: bool = False) -> None:
        self.module = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double().train()
        self.ens = metaopt.Ensemble(self.module, 2)
        self.outer_train = outer_train
        self.x, self.y = data(0)
        self.xv, self.yv = data(1)

    def init_params(self, hyper, generator):
        return self.ens.init_params(generator, dtype=torch.float64)

    def init_buffers(self, hyper, generator):
        return self.ens.init_buffers(torch.float64)

    def inner_loss_and_buffers(self, params, buffers, hyper, k, batch):
        losses, new = self.ens.losses_with_buffers(params, buffers, self.x * hyper["scale"], self.y, bce, training=True)
        return losses.sum(), new

    def outer_loss_with_buffers(self, params, buffers, hyper, batch):
        losses, _ = self.ens.losses_with_buffers(params, buffers, self.xv, self.yv, bce, training=self.outer_train)
        return losses.mean()

    def hparams(self, hyper):
        return {"lr": F.softplus(hyper["lr"])}



def test_every_exact_method_equals_full_and_the_module_is_untouched():
    obj = BatchNormNet()
    before = snapshot(obj.module)
    full = seam_run(obj)
    for name, method in seam_exact_methods(N).items():
        res = seam_run(obj, method)
        assert abs(res.loss.item() - full.loss.item()) < 1e-12, name
        torch.testing.assert_close(flat_grads(res), flat_grads(full), rtol=0, atol=1e-10, msg=name)
        for k, b in full.buffers.items():
            torch.testing.assert_close(res.buffers[k], b, rtol=0, atol=1e-12, msg=f"{name}: {k}")
    assert snapshot(obj.module) == before
    # the buffers really were carried: N updates per member, statistics moved off their start
    assert full.buffers["1.num_batches_tracked"].tolist() == [N, N]
    assert full.buffers["1.running_mean"].shape == (2, 6) and full.buffers["1.running_mean"].abs().min() > 0


def test_methods_that_cannot_carry_buffers_refuse_before_computing():
    obj = BatchNormNet()
    for method in ("drmad", hg.Reversible()):
        with pytest.raises(ValueError, match=r"cannot carry module buffers .*; use one of full, checkpointed") as e:
            seam_run(obj, method)
        assert "\n" not in str(e.value)


def test_train_and_greedy_carry_buffers_and_leave_the_module_alone():
    obj = BatchNormNet()
    before = snapshot(obj.module)
    params, buffers = hg.train(obj, optim.momentum(momentum=0.9), seam_hyper(), N, torch.Generator().manual_seed(0),
                               buffers=True)
    full = seam_run(obj)
    for k in buffers:
        torch.testing.assert_close(buffers[k], full.buffers[k], rtol=0, atol=1e-12)
    for k in params:
        torch.testing.assert_close(params[k], full.params[k], rtol=0, atol=1e-12)
    out = hg.t1t2(obj, optim.sgd(lr=0.1), seam_hyper(), 4, optim.sgd(lr=0.01))
    assert len(out.history) == 4
    obj.ens(full.params, obj.x)  # the plain forward copies the module's buffers per call
    assert snapshot(obj.module) == before


def test_buffers_are_constants_so_check_agrees_where_the_outer_loss_does_not_read_them():
    # outer loss in train mode (batch statistics): F does not read the buffers, FD agrees exactly
    rows = hg.check(BatchNormNet(outer_train=True), optim.sgd(), seam_hyper(), N,
                    methods={"full": hg.Full(), "checkpointed": hg.Checkpointed(3)})
    for row in rows:
        assert row["rel_error"] < 1e-7, row


def test_objectives_without_buffers_are_unchanged():
    class Plain(metaopt.MetaObjective):
        def init_params(self, hyper, generator):
            return {"w": torch.zeros(3, dtype=torch.float64)}

        def inner_loss(self, params, hyper, k, batch):
            return ((params["w"] - hyper["t"]) ** 2).sum()

        def outer_loss(self, params, hyper, batch):
            return (params["w"] ** 2).sum()

    h = {"t": torch.ones(3, dtype=torch.float64)}
    res = hg.hypergradient(Plain(), optim.sgd(lr=0.1), h, 5)
    assert res.buffers == {}
    assert hg.train(Plain(), optim.sgd(lr=0.1), h, 5, buffers=True)[1] == {}


def test_a_buffered_objective_needs_only_the_buffered_losses_and_bad_buffers_are_named():
    class Counter(metaopt.MetaObjective):
        """A buffer counting the steps and averaging the params: read by the outer loss."""

        def __init__(self, bad=False):
            self.bad = bad

        def init_params(self, hyper, generator):
            return {"w": torch.zeros(3, dtype=torch.float64)}

        def init_buffers(self, hyper, generator):
            return {"avg": torch.zeros(3, dtype=torch.float64), "n": torch.zeros((), dtype=torch.int64)}

        def inner_loss_and_buffers(self, params, buffers, hyper, k, batch):
            loss = ((params["w"] - hyper["t"]) ** 2).sum()
            if self.bad:
                return loss, {"avg": buffers["avg"]}
            return loss, {"avg": 0.5 * buffers["avg"] + 0.5 * params["w"].detach(), "n": buffers["n"] + 1}

        def outer_loss_with_buffers(self, params, buffers, hyper, batch):
            return ((params["w"] - buffers["avg"]) ** 2).sum() + (params["w"] ** 2).sum()

    h = {"t": torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)}
    full = hg.hypergradient(Counter(), optim.sgd(lr=0.1), h, 6)
    assert full.buffers["n"].item() == 6
    for method in ("checkpointed", "recursive", "forward", "fixed_point", "cg", "dense"):
        res = hg.hypergradient(Counter(), optim.sgd(lr=0.1), h, 6, method=method)
        if method in ("fixed_point", "cg", "dense"):  # stationary reference: all three solve the same system
            torch.testing.assert_close(res.grads["t"], hg.hypergradient(Counter(), optim.sgd(lr=0.1), h, 6,
                                                                       method="dense").grads["t"])
        else:
            torch.testing.assert_close(res.grads["t"], full.grads["t"], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"inner_loss_and_buffers must return \(loss, buffers\) with the buffers' "
                                         r"names \['avg', 'n'\]; got \['avg'\] at step 0"):
        hg.hypergradient(Counter(bad=True), optim.sgd(lr=0.1), h, 6)

    class Neither(metaopt.MetaObjective):
        def init_params(self, hyper, generator):
            return {"w": torch.zeros(3)}

    with pytest.raises(NotImplementedError, match="must implement inner_loss"):
        hg.hypergradient(Neither(), optim.sgd(lr=0.1), {"t": torch.ones(3)}, 2)


def test_create_graph_carries_buffers_too():
    obj = BatchNormNet()
    full = seam_run(obj)
    for method in ("full", hg.Checkpointed(3), hg.Truncated(N)):
        res = seam_run(obj, method, create_graph=True)
        assert res.grads["scale"].requires_grad
        torch.testing.assert_close(flat_grads(res).detach(), flat_grads(full), rtol=0, atol=1e-10)
        assert res.buffers["1.num_batches_tracked"].tolist() == [N, N]
