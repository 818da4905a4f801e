"""Zero-order hypergradients (ES, PES): statistically equal to the full unroll, exactly reproducible,
batched either way with the same numbers, and refused clearly where they do not apply."""

from __future__ import annotations

import pytest
import torch

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt._tree import nbytes

STEPS = 12


class Ridge(metaopt.MetaObjective):
    """Per-feature L2 penalties ``exp(log_lam)`` of a least-squares fit (float64); ``meta_init``: the
    initial weights are the hyperparameter ``w0``; ``dropout``: the inner loss drops residuals."""

    def __init__(self, meta_init: bool = False, dropout: float = 0.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.X = torch.randn(30, 4, generator=g, dtype=torch.float64)
        self.y = self.X @ torch.randn(4, generator=g, dtype=torch.float64)
        self.Xv = torch.randn(30, 4, generator=g, dtype=torch.float64)
        self.yv = self.Xv @ torch.ones(4, dtype=torch.float64)
        self.meta_init, self.dropout = meta_init, dropout

    def init_params(self, hyper, generator):
        if self.meta_init:
            return {"w": hyper["w0"]}
        return {"w": 0.1 * torch.randn(4, generator=generator, dtype=torch.float64)}

    def inner_loss(self, params, hyper, k, batch):
        r = self.X @ params["w"] - self.y
        if self.dropout:
            r = r * (torch.rand(r.shape, dtype=r.dtype) > self.dropout) / (1 - self.dropout)
        return 0.5 * (r * r).mean() + 0.5 * (hyper["log_lam"].exp() * params["w"] ** 2).sum()

    def outer_loss(self, params, hyper, batch):
        r = self.Xv @ params["w"] - self.yv
        return 0.5 * (r * r).mean() + 1e-3 * (hyper["log_lam"] ** 2).sum()


HYPER = {"log_lam": torch.tensor([-1.0, -0.5, 0.0, -2.0], dtype=torch.float64)}
OPT = optim.momentum(lr=0.3, momentum=0.5)
SLOW = optim.sgd(lr=0.1)  # far from converged after 12 steps: truncation is off, the initialisation matters


def run(method, obj=None, hyper=HYPER, seed=5, opt=OPT, **kw):
    return metaopt.hypergradient(obj or Ridge(), opt, hyper, STEPS, method=method,
                                 generator=torch.Generator().manual_seed(seed), **kw)


def assert_within_stderr(res, full, k=4.0):
    """Every element within ``k`` standard errors (plus the O(sigma^2) smoothing, far below them), and
    the standard error small against the gradient: the check is not vacuous."""
    se_all = torch.cat([e.reshape(-1) for e in res.extras["stderr"].values()])
    g_all = torch.cat([g.reshape(-1) for g in full.grads.values()])
    assert float(se_all.norm()) < 0.15 * float(g_all.norm()), (se_all, g_all)
    for name, g in full.grads.items():
        se = res.extras["stderr"][name]
        assert se.shape == g.shape and (se > 0).all()
        err = (res.grads[name] - g).abs()
        assert (err <= k * se + 1e-4 * g.abs().max()).all(), (name, err / se)


@pytest.mark.parametrize("method", [hg.ES(particles=512), hg.PES(window=3, particles=2048)], ids=["es", "pes"])
def test_agrees_with_the_full_unroll_within_its_standard_error(method):
    full = run(hg.Full())
    res = run(method)
    assert_within_stderr(res, full)
    torch.testing.assert_close(res.loss, full.loss, rtol=1e-12, atol=0)  # the unperturbed run's
    torch.testing.assert_close(res.params, full.params, rtol=1e-12, atol=1e-14)
    assert res.extras["particles"] == method.particles and res.extras["windows"] == (1 if method.name == "es" else 4)


def test_truncation_is_off_where_pes_with_the_same_window_is_not():
    """The long-horizon claim in miniature: truncated(K=3) misses most of ``dF/dh`` (many standard
    errors off), PES with windows of 3 does not."""
    full = run(hg.Full(), opt=SLOW)
    pes = run(hg.PES(window=3, particles=2048), opt=SLOW)
    trunc = run(hg.Truncated(3), opt=SLOW)
    se = pes.extras["stderr"]["log_lam"]
    assert ((trunc.grads["log_lam"] - full.grads["log_lam"]).abs() > 10 * se).any()
    assert_within_stderr(pes, full)


def test_the_estimate_reaches_a_meta_learned_init_and_the_dropout_masks_are_shared():
    hyper = {**HYPER, "w0": torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)}
    for obj in (Ridge(meta_init=True), Ridge(dropout=0.3)):
        h = hyper if obj.meta_init else HYPER
        full = run(hg.Full(), obj, h, opt=SLOW)
        assert not obj.meta_init or (full.grads["w0"].abs() > 0.05).all()  # the initialisation's share is there
        for method in (hg.ES(particles=512), hg.PES(window=5, particles=2048)):
            res = run(method, obj, h, opt=SLOW)
            assert_within_stderr(res, full)
            torch.testing.assert_close(res.loss, full.loss, rtol=1e-12, atol=0)


def test_reproducible_from_the_generator_and_the_seed_and_the_same_in_every_batching():
    es = hg.ES(particles=16)
    a, b = run(es), run(es)
    torch.testing.assert_close(a.grads, b.grads, rtol=0, atol=0)
    assert not torch.equal(run(es, seed=6).grads["log_lam"], a.grads["log_lam"])  # the next outer step: fresh noise
    assert not torch.equal(run(hg.ES(particles=16, seed=1)).grads["log_lam"], a.grads["log_lam"])
    for chunk in (1, 5):  # a loop through the eager step, and vmap in chunks: the same noise, the same estimate
        c = run(hg.ES(particles=16, chunk_size=chunk))
        torch.testing.assert_close(c.grads, a.grads, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c.extras["stderr"], a.extras["stderr"], rtol=1e-10, atol=1e-12)
    pes = run(hg.PES(window=4, particles=16))
    for chunk in (1, 7):
        torch.testing.assert_close(run(hg.PES(window=4, particles=16, chunk_size=chunk)).grads, pes.grads,
                                   rtol=1e-10, atol=1e-12)
    # one window is ES (the same noise stream)
    torch.testing.assert_close(run(hg.PES(window=STEPS, particles=16)).grads, a.grads, rtol=0, atol=0)
    assert not torch.allclose(pes.grads["log_lam"], a.grads["log_lam"])


def test_the_standard_error_falls_as_one_over_sqrt_particles_and_describes_the_spread():
    small, large = run(hg.ES(particles=64)), run(hg.ES(particles=1024, samples=True))
    ratio = small.extras["stderr"]["log_lam"].norm() / large.extras["stderr"]["log_lam"].norm()
    assert 3.0 < float(ratio) < 5.3  # sqrt(16) = 4
    assert "samples" not in small.extras
    samples = large.extras["samples"]["log_lam"]
    assert samples.shape == (1024, 4)
    torch.testing.assert_close(samples.mean(0), large.grads["log_lam"], rtol=1e-12, atol=1e-15)
    # 32 independent estimates of 32 pairs each: their spread is the 32-pair standard error
    groups = samples.reshape(32, 32, 4).mean(1)
    spread = groups.std(0)
    se32 = large.extras["stderr"]["log_lam"] * (1024 / 32) ** 0.5
    assert ((spread / se32 - 1).abs() < 0.4).all(), spread / se32


def test_memory_is_the_states_in_flight():
    obj = Ridge()
    params0 = obj.init_params(HYPER, torch.Generator().manual_seed(0))
    state = nbytes(params0) + nbytes(OPT.init(params0))
    for method, held in ((hg.ES(particles=8), 17), (hg.ES(particles=8, chunk_size=4), 4),
                         (hg.PES(window=4, particles=8, chunk_size=4), 17), (hg.PES(window=STEPS, particles=8), 17)):
        res = run(method)
        assert res.peak_bytes == held * state == method.peak_bound(STEPS, state, 10**9, 4), method


def test_refusals_are_one_line():
    for kw, match in (({"create_graph": True}, "does not support nesting"),
                      ({"compile": True}, "compile=True does not apply to method 'es'")):
        with pytest.raises(ValueError, match=match) as e:
            run(hg.ES(), **kw)
        assert "\n" not in str(e.value)
    for table, match in (({"name": "es", "particles": 1}, "method.particles = 1 needs an int >= 2"),
                         ({"name": "es", "sigma": 0.0}, "method.sigma = 0.0 must be a finite number > 0"),
                         ({"name": "pes", "window": 0}, "method.window = 0 needs a positive int"),
                         ({"name": "pes", "chunk_size": 0}, "method.chunk_size = 0 needs a positive int")):
        with pytest.raises(hg.MethodConfigError, match=match):
            hg.from_config(table, STEPS)
    assert hg.from_config({"name": "pes", "window": 5, "particles": 8}, STEPS) == hg.PES(window=5, particles=8)
    assert hg.as_method("pes", STEPS, hg.Settings(window=4)).window == 4


def test_a_diverging_perturbed_run_is_named():
    with pytest.raises(metaopt.NonFiniteError, match="perturbed hyperparameters .* lower sigma"):
        run(hg.ES(particles=4, sigma=300.0))


def test_the_long_horizon_benchmark_runs_tiny(tmp_path):
    """benchmarks/pes_schedule.py end to end at tiny settings: the JSON's rows, the groups of pairs
    (their mean is the full run's estimate) and the figure."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "pes_schedule.py"
    spec = importlib.util.spec_from_file_location("pes_schedule", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        out = bench.main(["--steps", "40", "--pieces", "4", "--window", "10", "--particles", "4", "8",
                          "--batching-steps", "5", "--json", str(tmp_path / "r.json"),
                          "--plot", str(tmp_path / "f.png")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == out["rows"] and (tmp_path / "f.png").stat().st_size
    methods = [r["method"] for r in out["rows"]]
    assert methods == ["full (checkpointed)", "truncated (K=1)", "truncated (K=10)", "pes", "pes groups", "pes groups",
                       "es", "es groups", "es groups"]
    truncated = out["rows"][2]["grads"]
    assert truncated[:3] == [0.0, 0.0, 0.0] and truncated[3] != 0  # K = 10 steps see the last piece alone
    pes = out["rows"][3]
    assert pes["N"] == 8 and pes["windows"] == 4 and out["rows"][4]["estimates"] == 2
    assert [b["chunk_size"] for b in out["batching"]] == [None, 8, 1]
