"""The runner in-process: NaN guard, clipping, figures without matplotlib, config parsing."""

import dataclasses
import sys

import pytest
import torch

from metaopt.recipes.demo import RECIPE, DemoConfig, DemoTask
from metaopt.run import ConfigError, Runner, RunStopped
from metaopt.run.config import dumps_toml, from_dict, load_toml, merge, parse_override


def make(tmp_path, **outer):
    cfg = from_dict(DemoConfig, merge(dict(RECIPE.presets["smoke"]), {"outer": outer}))
    cfg_dict = dataclasses.asdict(cfg)
    logs = []
    return Runner(RECIPE, cfg, cfg_dict, DemoTask(cfg, torch.device("cpu")), tmp_path, log=logs.append), logs


def test_nan_guard_skips_lowers_the_rate_and_stops(tmp_path):
    runner, logs = make(tmp_path, steps=20, max_bad_steps=3, bad_lr_factor=0.5)
    real = runner.task.objective.outer_loss
    calls = {"n": 0}

    def sometimes_nan(params, hyper, batch):  # outer step 2 fails once, from step 6 on always
        calls["n"] += 1
        loss = real(params, hyper, batch)
        return loss * float("nan") if calls["n"] == 2 or calls["n"] >= 6 else loss

    runner.task.objective.outer_loss = sometimes_nan
    with pytest.raises(RunStopped, match="3 non-finite hypergradients in a row"):
        runner.run()
    rows = [r for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if r.startswith('{"step"')]
    assert len(rows) == 8  # 5 good or recovered steps, then 3 bad ones
    assert sum('"skipped": true' in r for r in rows) == 4
    assert any("update skipped, meta_lr lowered to 0.025" in m for m in logs)  # 0.05 * 0.5 after step 2
    assert any("lowered to 0.00625" in m for m in logs)  # three halvings in a row at the end


def test_clipping_limits_the_update(tmp_path):
    runner, _ = make(tmp_path / "a", steps=3, clip=1e-6)
    st = runner.run()
    assert all(r.get("clipped") for r in st.history)
    assert all(r["grad_norm"] > 1e-6 for r in st.history)


def test_run_succeeds_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    runner, logs = make(tmp_path, steps=2)
    runner.run()
    assert any("matplotlib is not installed" in m for m in logs)
    assert (tmp_path / "metrics.json").is_file() and not list((tmp_path / "figures").glob("*.png"))


def test_config_parsing():
    assert parse_override("outer.steps=5", DemoConfig) == {"outer": {"steps": 5}}
    assert parse_override("inner.arch=[2, 4, 1]", DemoConfig) == {"inner": {"arch": [2, 4, 1]}}
    assert parse_override("method.name=full", DemoConfig) == {"method": {"name": "full"}}
    assert parse_override("method.every=5", DemoConfig) == {"method": {"every": 5}}
    cfg = from_dict(DemoConfig, {"outer": {"meta_lr": 1}, "inner": {"arch": [2, 3, 3, 1]}})
    assert cfg.outer.meta_lr == 1.0 and isinstance(cfg.outer.meta_lr, float) and cfg.inner.arch == [2, 3, 3, 1]
    with pytest.raises(ConfigError, match=r"inner.arch\[1\] = 'x' must be an integer"):
        from_dict(DemoConfig, {"inner": {"arch": [2, "x", 1]}})
    with pytest.raises(ConfigError, match="true or false"):
        from_dict(DemoConfig, {"inner": {"compile": 1}})
    with pytest.raises(ConfigError, match="inner.arch = \\[3, 1\\] must start with 2 inputs"):
        from_dict(DemoConfig, {"inner": {"arch": [3, 1]}})
    with pytest.raises(ConfigError, match="has no setting 'lrr'; did you mean 'lr'"):
        parse_override("inner.lrr=1", DemoConfig)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = dataclasses.asdict(from_dict(DemoConfig, dict(RECIPE.presets["paper"])))
    path = tmp_path / "c.toml"
    path.write_text(dumps_toml(cfg))
    assert load_toml(path) == cfg


def test_recipes_from_the_entry_point_group(monkeypatch):
    from importlib import metadata

    from metaopt.run import recipe as registry

    mine = dataclasses.replace(RECIPE, name="mine", description="a user's recipe")

    class EP:
        def __init__(self, name, obj):
            self.name, self.value, self._obj = name, f"pkg:{name}", obj

        def load(self):
            if isinstance(self._obj, Exception):
                raise self._obj
            return self._obj

    installed = list(metadata.entry_points(group="metaopt.recipes"))  # the built-ins register here too
    assert {"demo", "distill", "hpo", "structure"} <= {ep.name for ep in installed}
    assert all(ep.value.startswith("metaopt.recipes.") for ep in installed if ep.name in ("demo", "hpo"))

    def fake(group):
        assert group == "metaopt.recipes"
        return [*installed, EP("mine", mine)]

    monkeypatch.setattr(metadata, "entry_points", fake)
    found = registry.recipes()
    assert found["mine"] is mine and found["demo"] is RECIPE
    assert registry.get("demo") is RECIPE
    with pytest.raises(ConfigError, match="unknown recipe 'demox'; did you mean 'demo'"):
        registry.get("demox")
    clash = dataclasses.replace(RECIPE, description="another package's demo")
    monkeypatch.setattr(metadata, "entry_points", lambda group: [EP("demo2", clash), *installed])
    with pytest.warns(registry.PluginWarning, match="two recipes are named 'demo': pkg:demo2 and "
                      "metaopt.recipes.demo:RECIPE; using metaopt.recipes.demo:RECIPE"):
        assert registry.recipes()["demo"] is RECIPE  # the built-in is kept, the clashing plug-in left out
    broken = [EP("broken", ImportError("no module named x")), EP("odd", object()), *installed]
    monkeypatch.setattr(metadata, "entry_points", lambda group: broken)
    with pytest.warns(registry.PluginWarning) as caught:
        found = registry.recipes()
    assert {"demo", "hpo"} <= set(found) and not {"broken", "odd"} & set(found)  # the others still work
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 2 and "'broken' (pkg:broken) failed to load: ImportError: no module named x" in said[0]
    assert "'odd' (pkg:odd) is not a metaopt.run.Recipe (it is a object)" in said[1]
    with pytest.raises(ConfigError, match="recipe plug-in 'broken' .* failed to load: ImportError: no module named x"):
        registry.get("broken")  # the one asked for is an error
    assert registry.get("demo") is RECIPE


def _toy(bad_calls):
    """A hypergradient of F(h) = |h|^2 / 2 whose calls in ``bad_calls`` (1-based) return NaN."""
    from metaopt.hypergrad import HypergradResult

    calls = {"n": 0}

    def hypergrad(hyper, generator):
        calls["n"] += 1
        h = hyper["h"]
        scale = float("nan") if calls["n"] in bad_calls else 1.0
        return HypergradResult(loss=(h ** 2).sum() / 2 * scale, grads={"h": h * scale}, params={}, method="toy",
                               steps=1, peak_bytes=0, seconds=0.0)

    return hypergrad


def test_descend_and_the_runner_share_one_nan_policy():
    from metaopt import NonFiniteError
    from metaopt.run.meta import OuterLoop, descend

    h0 = {"h": torch.ones(3)}
    with pytest.raises(NonFiniteError, match="stopped at outer step 2: a non-finite outer loss"):
        descend(_toy({2}), h0, 5, 0.1, torch.Generator())  # default: the first non-finite step stops it
    with pytest.raises(RunStopped, match="stopped at outer step 4: 2 non-finite hypergradients in a row"):
        descend(_toy({3, 4}), h0, 6, 0.1, torch.Generator(), max_bad_steps=2)
    run = descend(_toy({2}), h0, 4, 0.1, torch.Generator(), max_bad_steps=2, bad_lr_factor=0.5)
    assert [r.get("skipped", False) for r in run.history] == [False, True, False, False]
    assert [r["meta_lr"] for r in run.history] == [0.1, 0.1, 0.05, 0.05]
    # the same steps by hand through the runner's OuterLoop: the same hyperparameters
    loop = OuterLoop("adam", max_bad_steps=2, bad_lr_factor=0.5)
    st, hypergrad = loop.init(h0, 0.1), _toy({2})
    for _ in range(4):
        loop.step(st, hypergrad, torch.Generator())
        st.step += 1
    assert st.updates == 3 and torch.equal(st.hyper["h"], run.hyper["h"])
