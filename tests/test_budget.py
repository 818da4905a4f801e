"""Memory as a budget (issue 23, item 1): the member-chunked full unroll (``Full(chunk=c)``) gives the
full unroll's hypergradient with about ``c / m`` of its stored trajectory, and ``Full(max_memory=B)``
runs the fastest exact policy whose predicted peak fits, never exceeding its prediction."""

from __future__ import annotations

import json

import pytest
import torch

import metaopt
from metaopt import cli, optim
from metaopt import hypergrad as hg
from metaopt.hypergrad import budget
from metaopt.models import MLP
from metaopt.recipes.demo.objective import MoonsDistillation
from metaopt.recipes.distill.data import moons
from metaopt.recipes.distill.objective import Distillation
from metaopt.run import ConfigError
from metaopt.run.launch import resolve_config
from metaopt.run.recipe import get

M, SPE, EPOCHS = 4, 4, 2  # members, steps per epoch, epochs: n = 8 inner steps
N = SPE * EPOCHS


def moons_problem(members: int = M) -> tuple[MoonsDistillation, optim.Optimizer, dict]:
    obj = MoonsDistillation([2, 8, 1], members=members, steps_per_epoch=SPE, epochs=EPOCHS, batch=16,
                            dtype=torch.float64)
    return obj, optim.momentum(momentum=0.5), obj.init_hyper(torch.Generator().manual_seed(0), lr=0.3)


def run(obj, opt, hyper, method, seed: int = 1, **kw) -> metaopt.HypergradResult:
    return metaopt.hypergradient(obj, opt, hyper, N, method=method, generator=torch.Generator().manual_seed(seed), **kw)


def sizes_of(obj, opt, hyper) -> budget.Sizes:
    """``(state_bytes, step_bytes, seconds)`` of ``obj``: full unrolls of its first 1, 2, 3 steps metered."""
    return budget.measure([metaopt.hypergradient(obj, opt, hyper, n, method=hg.Full(),
                                                 generator=torch.Generator().manual_seed(1)) for n in (1, 2, 3)], opt)


def assert_same(a: metaopt.HypergradResult, b: metaopt.HypergradResult, rtol: float = 1e-12) -> None:
    torch.testing.assert_close(a.loss, b.loss, rtol=rtol, atol=1e-15)
    assert a.grads.keys() == b.grads.keys()
    for k in a.grads:
        torch.testing.assert_close(a.grads[k], b.grads[k], rtol=rtol, atol=1e-15 * float(b.grads[k].abs().max()))
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("chunk", [1, 2, 3, M])
def test_chunked_equals_full_with_a_chunk_of_its_memory(chunk):
    obj, opt, hyper = moons_problem()
    full = run(obj, opt, hyper, hg.Full())
    gen = torch.Generator().manual_seed(1)
    got = metaopt.hypergradient(obj, opt, hyper, N, method=hg.Full(chunk=chunk), generator=gen)
    assert_same(got, full)
    whole_gen = torch.Generator().manual_seed(1)
    run_whole = metaopt.hypergradient(obj, opt, hyper, N, method=hg.Full(), generator=whole_gen)
    assert torch.equal(gen.get_state(), whole_gen.get_state())  # the caller's generator moves as a plain call's
    assert run_whole.peak_bytes == full.peak_bytes
    # memory: the largest share's trajectory, about chunk / m of the whole one (plus its constants)
    assert got.peak_bytes <= full.peak_bytes * (chunk / M) * 1.1 + 2048, (got.peak_bytes, full.peak_bytes)
    assert got.extras["policy"] == f"full (chunk={chunk})" and got.method == "full"


def test_chunked_multi_architecture_distillation_joins_params_per_architecture():
    """Members of two architectures interleaved over two restarts: every share's params are its members'
    slices, concatenated back per architecture in member order."""
    obj = Distillation(moons(), {"a": MLP([2, 6, 1]), "b": MLP([2, 3, 1])}, {"r": ["a", "b", "a"]}, restarts=2,
                       steps_per_epoch=SPE, epochs=EPOCHS, per_class=3, batch=None, dtype=torch.float64)
    hyper = obj.init_hyper(torch.Generator().manual_seed(0), lr=0.2)
    opt = optim.sgd()
    assert obj.ensemble_size() == 6
    full = run(obj, opt, hyper, hg.Full())
    for chunk in (1, 4):
        assert_same(run(obj, opt, hyper, hg.Full(chunk=chunk)), full)
    share = obj.share([1, 2])  # a share of a share: its own indices
    assert share.ensemble_size() == 2 and share.share([1]).held == [2]


def test_chunked_learned_schedule_equals_full():
    """hpo's schedule task: every member its own minibatches, drawn by the whole problem."""
    from metaopt.recipes.hpo.data import table
    from metaopt.recipes.hpo.objective import LearnedSchedule

    obj = LearnedSchedule(table("breast_cancer", (0.5, 0.25, 0.25), 0), [8], 5, 6, 32)
    hyper, opt = obj.init_hyper(0.05, 0.5), optim.momentum(momentum=0.5)
    full = metaopt.hypergradient(obj, opt, hyper, 6, method=hg.Full(), generator=torch.Generator().manual_seed(1))
    got = metaopt.hypergradient(obj, opt, hyper, 6, method=hg.Full(chunk=2), generator=torch.Generator().manual_seed(1))
    assert got.extras["chunks"] == 3 and obj.ensemble_size() == 5
    assert_same(got, full)


@pytest.mark.parametrize("exact", [False, True])
def test_each_policy_stays_under_its_predicted_peak(exact):
    obj, opt, hyper = moons_problem()
    S, B, _ = sizes_of(obj, opt, hyper)
    n_hyper = sum(t.numel() for t in hyper.values())
    policies = [hg.Full(), hg.Checkpointed(1), hg.Checkpointed(3), hg.Checkpointed(N), hg.Recursive(1),
                hg.Recursive(3)]
    for method in policies:
        res = run(obj, opt, hyper, method, exact_memory=exact)
        bound = method.peak_bound(N, S, B, n_hyper)
        assert 0 < res.peak_bytes <= bound, (method.label, res.peak_bytes, bound)
    for chunk in (1, 2, 3):
        S_c, B_c, _ = sizes_of(budget.share(obj, list(range(chunk))), opt, hyper)
        res = run(obj, opt, hyper, hg.Full(chunk=chunk), exact_memory=exact)
        bound = hg.Full().peak_bound(N, S_c, B_c, n_hyper)
        assert 0 < res.peak_bytes <= bound, (chunk, res.peak_bytes, bound)


def test_choose_takes_full_when_it_fits_else_the_fastest_that_fits():
    """A hand-worked case: n = 8, m = 4; the whole problem S = 100 B, B = 1000 B, 1 s a step; a share
    of c members 25c B, 250c B, 0.2c + 0.05 s a step. Predicted peaks: full 8100; chunk c 2025c;
    checkpointed every e: ceil(8/e) 100 + 1000e + 100; recursive base b: (ceil(log2 ceil(8/b)) + 1)
    100 + 1000b. Times: full 8; chunk c ceil(4/c) 8 (0.2c + 0.05); checkpointed 12; recursive
    8 (1 + log2(8/b) / 4)."""
    asked = []

    def sizes(c):
        asked.append(c)
        return budget.Sizes(100, 1000, 1.0) if c is None else budget.Sizes(25 * c, 250 * c, 0.2 * c + 0.05)

    def pick(b):
        plan, fits = budget.choose(b, 8, 1, sizes, members=4)
        assert plan.predicted <= b and all(p.predicted <= b for p in fits)
        assert plan.seconds == min(p.seconds for p in fits)
        return plan.label

    assert pick(8100) == "full" and asked == [None]
    assert pick(8099) == "recursive (base=7)"  # 7200 B in 8.39 s; chunk 3 (6075 B) takes 10.4, every 7 12
    assert pick(4100) == "full (chunk=2)"  # 4050 B in 7.2 s; recursive base 3 (3300 B) 10.8, every 3 12
    assert pick(2100) == "full (chunk=1)"  # 2025 B in 8 s; every 1 (1900 B) 12, recursive base 1 (1400 B) 14
    assert pick(1500) == "recursive"  # base 1, 1400 B: nothing else fits
    with pytest.raises(budget.BudgetError, match="the smallest, recursive, needs 1400 B .*at least 1400$"):
        pick(1399)
    assert set(asked) == {None, 1, 2, 3}
    plan, _ = budget.choose(8099, 8, 1, sizes, members=None)  # no members: no chunks
    assert plan.label == "recursive (base=7)"


def test_the_budget_runs_the_fastest_candidate_that_fits_and_stays_under_it():
    obj, opt, hyper = moons_problem()
    full = run(obj, opt, hyper, hg.Full())
    S, B, _ = sizes_of(obj, opt, hyper)
    with pytest.raises(budget.BudgetError) as e:
        run(obj, opt, hyper, hg.Full(max_memory=1))
    need = int(str(e.value).rsplit(" ", 1)[1])  # the smallest budget that works
    ladder = [10 * full.peak_bytes, N * B + S, full.peak_bytes, 3 * full.peak_bytes // 4, full.peak_bytes // 2,
              full.peak_bytes // 3, (full.peak_bytes // 3 + need) // 2, need]
    chosen = []
    for b in ladder:
        res = run(obj, opt, hyper, hg.Full(max_memory=b))
        cands = res.extras["candidates"]
        assert res.extras["policy"] == min(cands, key=lambda k: cands[k]["predicted_seconds"]), b
        assert all(c["predicted_peak_bytes"] <= b for c in cands.values())
        assert res.peak_bytes <= res.extras["predicted_peak_bytes"] <= b
        assert (res.extras["policy"] == "full") == (b >= N * B + S)
        assert_same(res, full, rtol=1e-11)
        log = res.extras["log"]
        assert log["memory_policy"] == res.extras["policy"] and log["memory_peak_bytes"] == res.peak_bytes
        chosen.append(res.extras["policy"])
    assert chosen[0] == chosen[1] == "full"  # the full unroll's own bound fits exactly
    assert len(set(chosen)) >= 3  # the ladder walks through several policies


def test_an_objective_without_members_never_chunks():
    obj, opt, hyper = moons_problem()

    class Whole(MoonsDistillation):
        def ensemble_size(self):
            return None

    whole = Whole([2, 8, 1], members=M, steps_per_epoch=SPE, epochs=EPOCHS, batch=16, dtype=torch.float64)
    full = run(whole, opt, hyper, hg.Full())
    res = run(whole, opt, hyper, hg.Full(max_memory=full.peak_bytes // 2))
    assert res.extras["policy"].startswith(("checkpointed", "recursive"))
    with pytest.raises(ValueError, match=r"^Full\(chunk=2\) needs an objective that splits into ensemble members: "
                                         r"Whole declares none") as e:
        run(whole, opt, hyper, hg.Full(chunk=2))
    assert "\n" not in str(e.value)


def test_refusals_are_one_line_and_name_the_fix():
    obj, opt, hyper = moons_problem()
    with pytest.raises(budget.BudgetError) as e:
        run(obj, opt, hyper, hg.Full(max_memory=100))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("max_memory = 100 B") and "raise max_memory to at least" in msg
    need = int(msg.rsplit(" ", 1)[1])
    ok = run(obj, opt, hyper, hg.Full(max_memory=need))  # the named budget works, one byte less does not
    assert ok.peak_bytes <= ok.extras["predicted_peak_bytes"] <= need
    with pytest.raises(budget.BudgetError):
        run(obj, opt, hyper, hg.Full(max_memory=need - 1))
    params0 = run(obj, opt, hyper, hg.Full()).params
    with pytest.raises(ValueError, match="cannot start from params0"):
        run(obj, opt, hyper, hg.Full(chunk=2), params0=params0)
    with pytest.raises(ValueError, match="does not combine with create_graph=True"):
        run(obj, opt, hyper, hg.Full(max_memory="1GB"), create_graph=True)
    with pytest.raises(ValueError, match=r"Full\(chunk=0\) needs a positive int"):
        run(obj, opt, hyper, hg.Full(chunk=0))
    with pytest.raises(ValueError, match=r"Full\(chunk=2\) and max_memory do not combine"):
        run(obj, opt, hyper, hg.Full(chunk=2, max_memory="1GB"))
    with pytest.raises(ValueError, match="runs through metaopt.hypergradient"):
        hg.Full(chunk=2).run(None, {}, None)


def test_sizes_parse():
    assert budget.parse_size("512MB") == 512 * 10**6
    assert budget.parse_size("2GiB") == 2 * 2**30
    assert budget.parse_size(" 1.5 kb ") == 1500 and budget.parse_size(4096) == 4096
    assert hg.Full(max_memory="3KiB").max_memory == 3072
    for bad in ("lots", "12 parsecs", "-5MB", "", 0):
        with pytest.raises(ValueError, match=r"^max_memory = .* must be"):
            budget.parse_size(bad)


def test_a_bad_size_in_a_config_names_the_field():
    with pytest.raises(ConfigError, match=r"method\.max_memory = 'lots' must be bytes"):
        resolve_config(get("demo"), preset="smoke", overrides=["method.name=full", "method.max_memory=lots"])
    cfg, cfg_dict = resolve_config(get("demo"), preset="smoke", overrides=["method.name=full",
                                                                           "method.max_memory=2MiB"])
    assert cfg_dict["method"] == {"name": "full", "max_memory": 2 * 2**20}


def test_a_recipe_run_with_a_budget_in_method_writes_its_choice_into_the_metrics(tmp_path):
    small = ["--set", "outer.steps=2", "--set", "inner.steps_per_epoch=3", "--set", "inner.epochs=2",
             "--set", "outer.eval_every=100", "--set", "method.name=full"]
    out = tmp_path / "a"
    assert cli.main(["run", "demo", "--preset", "smoke", *small, "--set", "method.max_memory=1GB",
                     "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["memory_policy"] for r in rows] == ["full", "full"]
    full_peak = rows[0]["memory_peak_bytes"]
    assert rows[0]["memory_peak_bytes"] <= rows[0]["memory_predicted_bytes"] <= 10**9
    out = tmp_path / "b"  # a budget below the full unroll's peak: another policy, the same in every row
    assert cli.main(["run", "demo", "--preset", "smoke", *small, "--set", f"method.max_memory={int(full_peak) - 1}",
                     "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())["history"]
    assert rows[0]["memory_policy"] != "full" and rows[0]["memory_policy"] == rows[1]["memory_policy"], rows
    assert all(r["memory_peak_bytes"] <= r["memory_predicted_bytes"] <= full_peak for r in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.max_memory_allocated")
def test_on_cuda_the_allocated_peak_stays_under_the_prediction_plus_one_steps_work():
    """On CUDA the allocator's peak growth during the call: the predicted trajectory plus what the
    trajectory meter does not count (one step's working memory, the adjoints and the hypergradient)."""
    obj = MoonsDistillation([2, 64, 64, 1], members=M, steps_per_epoch=SPE, epochs=EPOCHS, batch=64,
                            dtype=torch.float32)
    obj = Distillation(**{**obj._config, "device": "cuda"})
    opt = optim.momentum(momentum=0.5)
    hyper = obj.init_hyper(torch.Generator().manual_seed(0), lr=0.3)
    S, B, _ = sizes_of(obj, opt, hyper)
    full = run(obj, opt, hyper, hg.Full())
    for b in (full.peak_bytes * 2, full.peak_bytes // 2, full.peak_bytes // 4):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = run(obj, opt, hyper, hg.Full(max_memory=b))
        torch.cuda.synchronize()
        grown = torch.cuda.max_memory_allocated() - base
        assert grown <= res.extras["predicted_peak_bytes"] + 2 * B + 4 * S, (res.extras["policy"], grown)


def test_a_budget_continues_a_carried_state_and_the_chunked_run_returns_the_joined_final_state():
    obj, opt, hyper = moons_problem()
    full = run(obj, opt, hyper, hg.Full())
    chunked = run(obj, opt, hyper, hg.Full(chunk=2))
    assert chunked.final.step == N
    for slot in full.final.opt_state:
        for k, t in full.final.opt_state[slot].items():
            torch.testing.assert_close(chunked.final.opt_state[slot][k], t, rtol=1e-12, atol=1e-14)
    half = N // 2  # the second half from a carried first half, under a budget and as a plain full unroll
    start = metaopt.hypergradient(obj, opt, hyper, half, generator=torch.Generator().manual_seed(1)).final
    plain = metaopt.hypergradient(obj, opt, hyper, half, generator=torch.Generator().manual_seed(1), start=start)
    for b in sorted({plain.peak_bytes * 4, plain.peak_bytes // 2}):
        got = metaopt.hypergradient(obj, opt, hyper, half, method=hg.Full(max_memory=b), start=start,
                                    generator=torch.Generator().manual_seed(1))
        assert got.final.step == N and got.peak_bytes <= got.extras["predicted_peak_bytes"] <= b
        assert_same(got, plain, rtol=1e-10)
    with pytest.raises(ValueError, match="cannot start from start"):
        run(obj, opt, hyper, hg.Full(chunk=2), start=start)
    with pytest.raises(IndexError, match="a per-step table of 8 steps has no step 8: a call from start="):
        run(obj, opt, hyper, hg.Full(), start=full.final)  # the learned rates cover steps 0 .. 7 only
