"""Compiled blocks of inner steps (``hypergradient(..., compile=True, compile_block=b)``): several
steps as one compiled graph, forward and reverse, the same hypergradient as the eager steps."""

import pytest
import torch
from problems import Distill, bce, distill_hyper, mlp_ensemble
from torch._inductor.utils import run_and_get_code

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.hypergrad import inner
from metaopt.hypergrad.problem import Problem
from metaopt.optim import schedule

STEPS = 7  # blocks of 3: two full blocks and one single step (a checkpointed segment of 4: one block + one step)


class CompileFriendly(Distill):
    """The tiny distillation with the per-step inputs picked by ``at_step`` (a tensor ``k``)."""

    def inner_loss(self, params, hyper, k, batch):
        return self.ens.losses(params, schedule.at_step(hyper["x"], k % hyper["x"].shape[0]), self.y_syn, bce).sum()


def test_compiled_blocks_equal_eager_float64():
    obj = CompileFriendly(mlp_ensemble(m=3))
    hyper = distill_hyper(obj, STEPS)
    opt = optim.momentum(momentum=0.8)  # a state slot that crosses the blocks' boundaries
    eager = metaopt.hypergradient(obj, opt, hyper, STEPS, generator=torch.Generator().manual_seed(3))
    for method in (hg.Full(), hg.Checkpointed(every=4)):
        # run_and_get_code resets dynamo first: the checkpointed run then compiles afresh, and its
        # recorded segments are traced outside their saved-tensor hooks again (Problem._hooked)
        full = isinstance(method, hg.Full)
        with torch._inductor.config.patch(force_disable_caches=full):  # generate the code to read it
            res, code = run_and_get_code(metaopt.hypergradient, obj, opt, hyper, STEPS, method=method,
                                         generator=torch.Generator().manual_seed(3), compile=True, compile_block=3)
        if full:  # forward and backward graphs, without the per-call input checks (inner.NO_SIZE_ASSERTS)
            assert len(code) >= 2 and not any("assert_size_stride(" in c for c in code)
        torch.testing.assert_close(res.loss, eager.loss, rtol=0, atol=1e-12)
        for k in hyper:
            torch.testing.assert_close(res.grads[k], eager.grads[k], rtol=0, atol=1e-10)
        for k in eager.params:
            torch.testing.assert_close(res.params[k], eager.params[k], rtol=0, atol=1e-12)
        assert res.peak_bytes > 0


def test_spans_cover_the_steps_in_blocks():
    obj = CompileFriendly(mlp_ensemble(m=2))
    hyper = {k: v.detach().requires_grad_() for k, v in distill_hyper(obj, STEPS).items()}
    kw = dict(objective=obj, optimizer=optim.sgd(), hyper=hyper, steps=STEPS, batches=[None] * STEPS)
    assert Problem(**kw, compile=True, block=3).spans(0, STEPS) == [(0, 3), (3, 3), (6, 1)]
    assert Problem(**kw, compile=True, block=3).spans(4, 7) == [(4, 3)]
    assert Problem(**kw, block=3).spans(0, 3) == [(0, 1), (1, 1), (2, 1)]  # eager: one step at a time
    small, big = {"w": torch.zeros(3, 10)}, {"w": torch.zeros(inner.SMALL + 1)}
    assert inner.default_block(200, small) == 2 and inner.default_block(10, small) == 1
    assert inner.default_block(201, small) == 1  # an odd run would compile a second graph for its tail
    assert inner.default_block(200, big) == 1
    deep = {f"w{i}": torch.zeros(3, 10) for i in range(inner.BLOCK_TENSORS + 1)}  # a longer graph per step
    assert inner.default_block(200, deep) == 1


@pytest.mark.parametrize("per_member,lead", [(False, ()), (True, ()), (False, (4,)), (True, (4,))])
def test_tiny_layers_compile_to_a_broadcast_sum(per_member, lead):
    """Inside ``torch.compile`` on the CPU, ``MLP.forward_batched`` computes a layer of at most
    ``TINY_LAYER`` weights (all members) as a product and a sum (fused by inductor), a wider one as a matmul; the
    values equal the eager matmuls'."""
    from metaopt.models import MLP, TINY_LAYER

    torch.manual_seed(0)
    model, m = MLP([3, 16, 16, 40, 2], activation="tanh"), 3  # 144, 768, 1920 and 240 weights in all
    params = {k: torch.randn(m, *v.shape, dtype=torch.float64) for k, v in model.named_parameters()}
    x = torch.randn(*((m,) if per_member else ()), *lead, 5, 3, dtype=torch.float64)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda p, x: model.forward_batched(p, x, per_member), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(params, x), model.forward_batched(params, x, per_member), rtol=1e-13, atol=0)
    matmuls = sum(n.target in (torch.baddbmm, torch.matmul) for n in graphs[0].graph.nodes)
    assert matmuls == sum(w.numel() > TINY_LAYER for k, w in params.items() if k.endswith("weight")) == 1


def test_small_cpu_models_compile_without_simd(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK", raising=False)
    small, big = {"w": torch.zeros(3, 10)}, {"w": torch.zeros(inner.SMALL + 1)}
    assert inner.scalar_kernels(small) and not inner.scalar_kernels(big)
    assert not inner.scalar_kernels({"w": torch.zeros(3, 10, device="meta")})  # only the CPU's C++ kernels
    monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", "1")  # the user's own setting wins
    assert not inner.scalar_kernels(small)


@pytest.mark.parametrize("block", [0, -1, 2.0, True, "3"])
def test_compile_block_must_be_a_positive_int(block):
    obj = CompileFriendly(mlp_ensemble(m=2))
    with pytest.raises(ValueError, match="compile_block must be a positive int"):
        metaopt.hypergradient(obj, optim.sgd(), distill_hyper(obj, STEPS), STEPS, compile=True, compile_block=block)


def test_compile_block_needs_compile():
    obj = CompileFriendly(mlp_ensemble(m=2))
    with pytest.raises(ValueError, match="compile_block applies to compile=True only"):
        metaopt.hypergradient(obj, optim.sgd(), distill_hyper(obj, STEPS), STEPS, compile_block=2)


@pytest.mark.parametrize("rows,restarts", [({"a": ["1"] * 3}, 1), ({"a": ["1"] * 3}, 2),
                                          ({"a": ["1", "2"], "b": ["2"]}, 2)])
def test_distillation_members_read_their_distillations_rows(rows, restarts):
    """The recipe's per-member view of ``[D, ...]`` (a broadcast or repeat where it can) is ``t[owner_all]``."""
    from metaopt.models import MLP
    from metaopt.recipes.distill import Distillation
    from metaopt.recipes.distill.data import moons

    obj = Distillation(moons(), {"1": MLP([2, 1]), "2": MLP([2, 3, 1])}, rows, restarts=restarts, steps_per_epoch=2,
                       epochs=1, per_class=2, dtype=torch.float64)
    t = torch.randn(obj.D, 4, 2, dtype=torch.float64)
    assert torch.equal(obj._by_member(t), t[obj.owner_all])


def test_recipes_take_a_compile_block(monkeypatch):
    from metaopt.recipes.demo.task import DemoTask
    from metaopt.run import ConfigError, task
    from metaopt.run.launch import resolve_config
    from metaopt.run.recipe import get

    with pytest.raises(ConfigError, match=r"inner\.compile_block = 3 applies only with inner\.compile = true"):
        resolve_config(get("demo"), preset="smoke", overrides=["inner.compile=false", "inner.compile_block=3"])
    with pytest.raises(ConfigError, match=r"distill\.compile_block = 2 applies only with distill\.compile = true"):
        resolve_config(get("distill"), overrides=["distill.compile=false", "distill.compile_block=2"])
    with pytest.raises(ConfigError, match=r"inner\.compile_block"):  # the schema's range
        resolve_config(get("demo"), preset="smoke", overrides=["inner.compile_block=-1"])
    seen = {}
    monkeypatch.setattr(task, "hypergradient", lambda *a, **kw: seen.update(kw))
    for block, expected in ((1, 1), (0, None)):
        cfg, _ = resolve_config(get("demo"), preset="smoke",
                                overrides=["inner.compile=true", f"inner.compile_block={block}"])
        demo = DemoTask(cfg, torch.device("cpu"))
        demo.hypergradient(demo.objective, demo.hyper, torch.Generator())
        assert seen["compile"] is True and seen["compile_block"] == expected
