"""Exact reversible learning (Maclaurin et al. 2015) against the full unroll, float64."""

import pytest
import torch
from problems import Distill, distill_hyper, mlp_ensemble

import metaopt
import metaopt.models
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.hypergrad.reversible import InfoBuffer


def both(obj, opt, hyper, n):
    kw = {"generator": torch.Generator().manual_seed(3)}
    full = metaopt.hypergradient(obj, opt, hyper, n, method="full", **kw)
    kw = {"generator": torch.Generator().manual_seed(3)}
    return full, metaopt.hypergradient(obj, opt, hyper, n, method=hg.Reversible(), **kw)


@pytest.mark.parametrize("kind", ["m3", "two_arch"])
@pytest.mark.parametrize("mu", [0.9, 0.95])
def test_reversible_equals_the_full_unroll_and_recovers_w0_exactly(kind, mu):
    ens = mlp_ensemble(m=3) if kind == "m3" else metaopt.MultiEnsemble(
        {"a": mlp_ensemble((2, 1), m=2), "b": mlp_ensemble((2, 4, 4, 1), m=2)})
    obj = Distill(ens)
    hyper = distill_hyper(obj, 40)
    full, rev = both(obj, optim.momentum(momentum=mu, weight_decay=1e-3), hyper, 40)
    assert rev.method == "reversible" and rev.extras["w0_recovered_exactly"]
    assert rev.extras["momentum"] == mu
    torch.testing.assert_close(rev.loss, full.loss, rtol=1e-12, atol=0)
    for k in hyper:
        torch.testing.assert_close(rev.grads[k], full.grads[k], rtol=1e-10, atol=1e-12)
    # the buffer holds about log2(1/mu) bits per element and step (a little less: the first pops are free)
    bits = rev.extras["buffer_bits_per_element_step"]
    assert 0.5 * torch.log2(torch.tensor(1 / mu)) < bits <= 1.01 * torch.log2(torch.tensor(1 / mu))


def test_memory_at_1000_steps_is_a_small_fraction_of_the_full_unroll():
    obj = Distill(mlp_ensemble((2, 8, 1), m=3))
    hyper = distill_hyper(obj, 1000, lr=0.05)
    full, rev = both(obj, optim.momentum(momentum=0.9), hyper, 1000)
    assert rev.extras["w0_recovered_exactly"]
    torch.testing.assert_close(rev.grads["x"], full.grads["x"], rtol=1e-9, atol=1e-12)
    assert rev.peak_bytes * 20 <= full.peak_bytes
    assert rev.extras["buffer_bytes"] < 0.02 * full.peak_bytes


def test_reversible_refuses_what_it_cannot_reverse():
    obj = Distill(mlp_ensemble(m=2))
    hyper = distill_hyper(obj, 5)
    with pytest.raises(ValueError, match="needs heavy-ball momentum SGD"):
        metaopt.hypergradient(obj, optim.sgd(), hyper, 5, method="reversible")
    with pytest.raises(ValueError, match="needs heavy-ball momentum SGD"):
        metaopt.hypergradient(obj, optim.adam(), hyper, 5, method="reversible")
    with pytest.raises(ValueError, match="constant Python-float momentum"):
        metaopt.hypergradient(obj, optim.momentum(momentum=torch.tensor(0.9)), hyper, 5, method="reversible")
    big = Distill(metaopt.Ensemble(metaopt.models.MLP([2, 5, 1]), 2, init="normal", std=10.0))
    with pytest.raises(ValueError, match="fixed-point range"):  # |w| ~ 10 > 2**(62 - 59) = 8
        metaopt.hypergradient(big, optim.momentum(momentum=0.9), hyper, 5, method=hg.Reversible(radix_bits=59))


def test_info_buffer_round_trips_mixed_radices():
    g = torch.Generator().manual_seed(0)
    buf = InfoBuffer(torch.Size([7]), torch.device("cpu"))
    pushed = []
    for i in range(400):  # far past one 32-bit limb
        radix = [10, 9, 1000, 3, 2**30][i % 5]
        r = torch.randint(0, radix, (7,), generator=g)
        buf.push(r, radix)
        pushed.append((r, radix))
    assert buf.limbs.shape[0] > 10
    for r, radix in reversed(pushed):
        assert torch.equal(buf.pop(radix), r)
    assert buf.limbs.shape[0] == 1 and not buf.limbs.any()
