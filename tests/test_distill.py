"""The distillation recipe: data, strategies, the batched objective, its hypergradient, the CLI run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.models import MLP
from metaopt.recipes.distill import check_instance
from metaopt.recipes.distill import data as dd
from metaopt.recipes.distill import evaluate as ev
from metaopt.recipes.distill.objective import Distillation
from metaopt.run.config import ConfigError, from_dict


def test_moons_split_is_the_papers():
    sk_data = pytest.importorskip("sklearn.datasets")
    sk_split = pytest.importorskip("sklearn.model_selection")
    X, y = sk_data.make_moons(n_samples=1500, noise=0.05, random_state=8)
    Xtr, Xte, ytr, yte = sk_split.train_test_split(X, y, test_size=0.33, random_state=8)
    ours = dd.moons()
    assert ours.X.shape == (1005, 2) and ours.X_test.shape == (495, 2)
    np.testing.assert_array_equal(ours.X.numpy(), Xtr)
    np.testing.assert_array_equal(ours.X_test.numpy(), Xte)
    np.testing.assert_array_equal(ours.y.numpy(), ytr)
    np.testing.assert_array_equal(ours.y_test.numpy(), yte)


def test_strategies_give_the_documented_schedules():
    s, e, D = 4, 2, 3
    rates = torch.rand(s * e, D, dtype=torch.float64) + 0.1
    cfg = ev.Strategies(epochs=6, gamma=0.9, ramp_init=0.3, ramp_up=1.1, ramp_up_epochs=2, ramp_down=0.95)
    t = ev.rate_tables(rates, s, ["raw", "strategy1", "strategy2", "strategy3"], cfg)
    assert all(v.shape == (6 * s, D) for v in t.values())
    # raw: the learned table, then nothing (the model stops after the distilled steps)
    assert torch.equal(t["raw"][: s * e], rates) and not t["raw"][s * e:].any()
    # strategy 1: one rate per epoch, 0.3 * 1.1^e up to epoch 2, then * 0.95 per epoch
    per_epoch = [0.3, 0.33, 0.363, 0.363 * 0.95, 0.363 * 0.95**2, 0.363 * 0.95**3]
    for ep, r in enumerate(per_epoch):
        torch.testing.assert_close(t["strategy1"][ep * s:(ep + 1) * s], torch.full((s, D), r, dtype=torch.float64))
    # strategy 2: all e epochs repeated, the r-th copy times gamma^r
    for r in range(3):
        torch.testing.assert_close(t["strategy2"][r * s * e:(r + 1) * s * e], rates * 0.9**r)
    # strategy 3: the distilled epochs, then the last epoch again with compounding gamma
    assert torch.equal(t["strategy3"][: s * e], rates)
    for j in range(1, 5):
        torch.testing.assert_close(t["strategy3"][(e + j - 1) * s:(e + j) * s], rates[-s:] * 0.9**j)
    with pytest.raises(ValueError, match="multiple"):
        ev.rate_tables(rates, s, ["strategy2"], ev.Strategies(epochs=5))


def test_the_paper_defaults_gamma_and_schedules():
    assert ev.Strategies().gamma == 0.98 and ev.Strategies().epochs == 50


def test_distillation_hypergradient_equals_finite_differences():
    obj, opt, hyper, steps = check_instance()
    assert set(hyper) == {"x", "lr", "y"}  # soft labels too
    rows = {r["method"]: r for r in hg.check(obj, opt, hyper, steps, {"full": hg.Full(), "forward": hg.Forward()})}
    for name in ("full", "forward"):
        assert rows[name]["rel_error"] < 1e-7, rows[name]


def _tiny(init="fixed", restarts=2):
    data = dd.moons()
    models = {"1-layer": MLP([2, 1], "tanh"), "2-layer": MLP([2, 5, 1], "tanh")}
    rows = {"2-layer": ["2-layer"] * 2, "all": ["1-layer", "2-layer"]}
    return Distillation(data, models, rows, restarts=restarts, steps_per_epoch=3, epochs=2, per_class=2,
                        batch=None, init=init, dtype=torch.float64)


def test_distillations_are_independent_and_fixed_init_is_fixed():
    obj = _tiny()
    assert obj.D == 4 and obj.owner["1-layer"].tolist() == [2, 3] and obj.owner["2-layer"].tolist() == [0, 0, 1, 1,
                                                                                                           2, 3]
    h = obj.init_hyper(torch.Generator().manual_seed(0), lr=0.3)
    g = lambda hh: hg.hypergradient(obj, optim.sgd(), hh, obj.steps, method="full",
                                    generator=torch.Generator().manual_seed(1)).grads
    a = g(h)
    h2 = {k: v.clone() for k, v in h.items()}
    h2["x"][1] += 0.5  # move distillation 1's data only
    h2["lr"][:, 1] *= 2
    b = g(h2)
    for d in (0, 2, 3):
        torch.testing.assert_close(a["x"][d], b["x"][d], rtol=0, atol=0)
        torch.testing.assert_close(a["lr"][:, d], b["lr"][:, d], rtol=0, atol=0)
    assert not torch.allclose(a["x"][1], b["x"][1])
    p1, p2 = obj.init_params(h, torch.Generator().manual_seed(5)), obj.init_params(h, torch.Generator())
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    fresh = _tiny("fresh")
    q1, q2 = fresh.init_params(h, torch.Generator().manual_seed(5)), fresh.init_params(h, torch.Generator())
    assert not all(torch.equal(q1[k], q2[k]) for k in q1)


def test_shuffled_replay_visits_every_point_once_per_epoch():
    pool = torch.arange(12, dtype=torch.float64).reshape(1, 12, 1).expand(3, 12, 1)
    replay = ev.Replay({"m": MLP([1, 1])}, 3, pool, torch.zeros(3, 12, 1, dtype=torch.float64), 4, order="shuffle")
    g = torch.Generator().manual_seed(0)
    batches = torch.cat([replay.inner_batch(k, g) for k in range(3)], 1)  # one epoch
    assert all(sorted(b.tolist()) == list(range(12)) for b in batches)
    assert not torch.equal(batches[0], batches[1])  # each run its own order


@pytest.mark.parametrize("setting, message", [
    ({"distill": {"archs": ["5-layer"]}}, "distill.archs"),
    ({"distill": {"rows": ["2-layer", "convnet"]}}, "distill.rows"),
    ({"distill": {"restarts": 0}}, "distill.restarts"),
    ({"eval": {"epochs": 12}}, "eval.epochs"),
    ({"eval": {"strategies": ["strategy9"]}}, "eval.strategies"),
    ({"method": {"name": "random_truncated"}}, "method.window is required by method 'random_truncated'"),
    ({"method": {"name": "random_truncated", "window": 201}}, r"method.window = 201 needs 1 <= window <= steps = 200"),
    ({"method": {"name": "truncated", "k": 0}}, "method.k = 0 needs 1 <= k"),
    ({"method": {"name": "cg"}}, "method.name = 'cg' is implicit"),
    ({"distill": {"window": 5}}, 'distill.window is gone: W is a field of its method now: write \\[method\\] name = '
                                 '"random_truncated", window = 5 \\(or name = "truncated", k = 5\\)'),
    ({"distill": {"method": "full"}}, "distill.method is gone: the hypergradient method is the \\[method\\] table"),
])
def test_bad_settings_name_the_field(setting, message):
    from metaopt.recipes.distill import Config

    with pytest.raises(ConfigError, match=message):
        from_dict(Config, setting)


def test_smoke_run_end_to_end_beats_random_real_points(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "metaopt", "run", "distill", "--preset", "smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "metrics.json").read_text())["results"]
    table = results["table"]
    assert set(table) == set(ev.STRATEGIES)
    for strategy in table.values():
        for cells in strategy.values():
            for cell in cells.values():
                assert set(cell) == {"mean", "std", "n"} and 0 <= cell["mean"] <= 1
    assert table["raw"]["1-layer"]["1-layer"]["n"] == 2 * 5  # restarts x inits
    assert set(results["full_data"]) == {"sgd 0.01", "adam 0.01"}
    assert set(results["full_data"]["adam 0.01"]) == {"1-layer", "2-layer", "4-layer"}
    # the regression check: distilled data beats as many random real points at the same step budget
    # (the baseline's constant rate is the best of a grid, chosen on the test set: in its favour)
    distilled, random = table["raw"]["1-layer"]["1-layer"]["mean"], results["random_real"]["1-layer"]["mean"]
    assert distilled > random + 0.02, (distilled, random)
    summary = (out / "summary.md").read_text()
    assert "(0.871 ± 0.003)" in summary and "original: full data, sgd 0.01" in summary
    for fig in ("dataset", "decision_boundaries", "synthetic_points", "learning_rates", "accuracy_distributions",
                "curves"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    show = subprocess.run([sys.executable, "-m", "metaopt", "show", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert show.returncode == 0 and "Distillation results (moons)" in show.stdout and "strategy3 + all" in show.stdout


def test_fixed_init_does_not_depend_on_the_other_rows():
    both, alone = _tiny(), Distillation(dd.moons(), {"1-layer": MLP([2, 1], "tanh"), "2-layer": MLP([2, 5, 1], "tanh")},
                                        {"all": ["1-layer", "2-layer"]}, restarts=2, steps_per_epoch=3, epochs=2,
                                        per_class=2, batch=None, init="fixed", dtype=torch.float64)
    p_both, p_alone = both.init_params({}, torch.Generator()), alone.init_params({}, torch.Generator())
    # in `both`, the 2-layer group holds rows 2-layer (4 members) then all (2 members)
    torch.testing.assert_close(p_both["2-layer.layers.0.weight"][4:], p_alone["2-layer.layers.0.weight"])
    torch.testing.assert_close(p_both["1-layer.layers.0.weight"], p_alone["1-layer.layers.0.weight"])


def test_rank_shares_deal_whole_architecture_groups_and_cover_every_member():
    from metaopt.recipes.distill import Config
    from metaopt.recipes.distill.task import make_objective, shares

    obj = make_objective(from_dict(Config, {"distill": {"restarts": 2, "compile": False}}), "cpu")  # 4 rows
    groups = obj.members_by_arch()
    two = shares(obj, 2)
    assert two == [groups["4-layer"], sorted(groups["1-layer"] + groups["2-layer"])]
    small = {"archs": ["1-layer", "2-layer"], "rows": ["all"], "restarts": 2, "compile": False}  # 4 members
    tiny = {"rows": ["1-layer", "2-layer", "4-layer", "all"], "restarts": 1, "members": 1, "compile": False}  # 6
    for cfg, sizes in (({"restarts": 2, "compile": False}, (1, 2, 3, 5, 8)), (small, (1, 2, 3, 4)),
                       (tiny, (1, 2, 3, 4, 6))):
        obj = make_objective(from_dict(Config, {"distill": cfg}), "cpu")
        for size in sizes:
            parts = shares(obj, size)
            assert sorted(sum(parts, [])) == list(range(obj.members)), (cfg, size)
            assert all(parts), (cfg, size, parts)  # every rank holds a member


def test_cli_errors_keep_brackets_and_name_the_field(tmp_path):
    res = subprocess.run([sys.executable, "-m", "metaopt", "run", "distill", "--set", 'distill.rows=["x[y]"]',
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "distill.rows: 'x[y]' must be 'all'" in res.stderr  # rich markup must not eat "[y]"




def test_random_truncation_is_one_method_object_with_its_generator_as_state():
    """[method] name = "random_truncated", window = W: one RandomTruncated(W) per run, seeded by the
    run's seed (method.seed unset), whose generator is its state: restoring the state repeats the
    draws (what --resume does); the draw is in [W, n] and reported."""
    from metaopt.recipes.distill import Config
    from metaopt.recipes.distill.task import DistillTask

    cfg = from_dict(Config, {"distill": {"restarts": 1, "rows": ["1-layer"], "archs": ["1-layer"], "members": 1,
                                         "steps_per_epoch": 5, "epochs": 2, "compile": False},
                             "method": {"name": "random_truncated", "window": 3}, "seed": 4})
    task = DistillTask(cfg, torch.device("cpu"))
    assert isinstance(task.method, hg.RandomTruncated) and task.method.window == 3 and task.method.seed == 4
    saved = task.state_dict()
    ts = []
    for _ in range(4):
        res = task.hypergradient(task.objective, task.hyper, torch.Generator().manual_seed(0))
        assert res.extras["window"] == 3 and 3 <= res.extras["t"] <= 10
        assert all(torch.isfinite(g).all() for g in res.grads.values())
        ts.append(res.extras["t"])
    assert len(set(ts)) > 1  # one generator for the run: the draws go on
    fresh = DistillTask(cfg, torch.device("cpu"))
    fresh.load_state_dict(saved)
    assert [fresh.method.draw(10) for _ in range(4)] == ts
    plain = DistillTask(from_dict(Config, {"distill": {"restarts": 1, "rows": ["1-layer"]}}), torch.device("cpu"))
    assert isinstance(plain.method, hg.Full) and plain.state_dict() == {"method": {}}
