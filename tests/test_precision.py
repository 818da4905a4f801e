"""Mixed precision: ``hypergradient(..., autocast=...)`` against the float32 hypergradient, to the
tolerances docs/hypergrad.md documents (a 20-step distillation of a 2-64-64-1 tanh MLP ensemble)."""

import pytest
import torch
import torch.nn.functional as F

import metaopt
from metaopt import hypergrad as hg
from metaopt.models import MLP
from metaopt.optim import schedule

N = 20


class Distill32(metaopt.MetaObjective):
    """Float32 distillation: 3 MLPs trained on 4 learnable points per step, per-step learning rates."""

    def __init__(self):
        self.ens = metaopt.Ensemble(MLP([2, 64, 64, 1], activation="tanh"), 3, init="xavier")
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 2, generator=g, dtype=torch.float32)
        self.y = ((self.x[:, 0] * self.x[:, 1]) > 0).float().unsqueeze(1).expand(3, 256, 1)
        self.y_syn = torch.tensor([[0.0], [1.0], [0.0], [1.0]], dtype=torch.float32)
        self.y_syn = self.y_syn.expand(3, 4, 1)

    def init_params(self, hyper, generator):
        return self.ens.init_params(generator, dtype=torch.float32)

    def inner_loss(self, params, hyper, k, batch):
        x = hyper["x"][k % hyper["x"].shape[0]]
        return F.binary_cross_entropy_with_logits(self.ens(params, x), self.y_syn, reduction="sum")

    def outer_loss(self, params, hyper, batch):
        return F.binary_cross_entropy_with_logits(self.ens(params, self.x), self.y)

    def hparams(self, hyper):
        return {"lr": schedule.table(hyper["lr"], positive="softplus")}


def hyper():
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(4, 4, 2, generator=g, dtype=torch.float32),
            "lr": torch.full((N,), -1.0, dtype=torch.float32)}


# (relative error of dF/dh, cosine to it, relative error of F): what docs/hypergrad.md promises
TOLERANCE = {torch.float16: (3e-2, 0.999, 1e-4), torch.bfloat16: (0.35, 0.97, 5e-3)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("method", ["full", "truncated"])
def test_autocast_against_float32(dtype, method):
    m = hg.Truncated(5) if method == "truncated" else method
    obj, opt, h = Distill32(), metaopt.optim.sgd(momentum=0.5), hyper()

    def call(autocast):
        return metaopt.hypergradient(obj, opt, h, N, method=m, autocast=autocast,
                                     generator=torch.Generator().manual_seed(0))

    ref, low = call(None), call(dtype)
    a = torch.cat([ref.grads[k].flatten() for k in h])
    b = torch.cat([low.grads[k].flatten() for k in h])
    assert b.dtype == torch.float32 and all(p.dtype == torch.float32 for p in low.params.values())
    rel, cos = float((a - b).norm() / a.norm()), float(a @ b / (a.norm() * b.norm()))
    loss_rel = abs(float(ref.loss - low.loss)) / float(ref.loss)
    max_rel, min_cos, max_loss_rel = TOLERANCE[dtype]
    assert rel <= max_rel and cos >= min_cos and loss_rel <= max_loss_rel, (rel, cos, loss_rel)
    assert rel > 0  # autocast really ran in lower precision


def test_autocast_errors_name_the_fix():
    obj, opt, h = Distill32(), metaopt.optim.sgd(momentum=0.5), hyper()
    with pytest.raises(ValueError, match="autocast must be torch.bfloat16 or torch.float16"):
        metaopt.hypergradient(obj, opt, h, N, autocast=torch.float64)
    for method in ("forward", "reversible"):
        with pytest.raises(ValueError, match=f"autocast does not apply to method '{method}'.*use one of full"):
            metaopt.hypergradient(obj, opt, h, N, method=method, autocast=torch.bfloat16)
