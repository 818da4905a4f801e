"""Method configuration is the method's own: a ``[method]`` table (name + that class's fields),
parsed and checked by the class; every registered method is usable from every recipe or refused at
config validation with one line; the protocol module imports no method."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import metaopt.hypergrad as hg
from metaopt.hypergrad.methods import REQUIRED
from metaopt.run import ConfigError
from metaopt.run.config import MethodTable, dumps_toml, load_toml, merge
from metaopt.run.launch import resolve_config
from metaopt.run.recipe import get

ROOT = Path(__file__).resolve().parent.parent

# a small instance of each recipe's smoke preset, so that a hypergradient of it takes well under a second
SMALL = {
    "demo": ["inner.steps_per_epoch=3", "inner.epochs=2", "inner.members=1"],
    "distill": ["distill.steps_per_epoch=3", "distill.restarts=1", "distill.rows=[\"1-layer\"]",
                "distill.compile=false"],
    "hpo": ["hpo.steps=12"],
    "structure": ["structure.steps=4", "structure.samples=1"],
}
REQUIRED_FIELDS = {"truncated": ["method.k=2"], "random_truncated": ["method.window=2"]}


def test_the_fields_come_from_the_dataclass():
    fields = hg.registered()["hoag"].fields()
    assert list(fields) == ["solver", "tol0", "decrease", "min_tol", "damping", "max_inner_rounds", "maxiter"]
    assert fields["tol0"].type is float and fields["tol0"].default == 1e-3
    assert "t" not in fields and "params" not in fields  # state, not settings
    assert "solver" not in hg.registered()["cg"].fields()  # fixed by the variant
    assert "warm_start" not in hg.registered()["implicit"].fields()  # a tensor: no setting
    assert hg.registered()["truncated"].fields()["k"].default is REQUIRED
    assert hg.registered()["checkpointed"].fields()["every"].optional
    assert hg.from_config({"name": "cg", "tol": 1e-6, "maxiter": 50}, 10) == hg.Implicit("cg", tol=1e-6, maxiter=50)
    assert hg.from_config({"name": "recursive", "base": 4}, 10) == hg.Recursive(4)
    assert hg.as_method("truncated", 100, {"k": 10}) == hg.Truncated(10)
    assert hg.as_method("truncated", 100, hg.Settings(truncate=10)) == hg.Truncated(10)  # the internal union
    assert hg.Truncated(3).config() == {"k": 3}


@pytest.mark.parametrize("table, message", [
    ({"name": "truncated"}, "method.k is required by method 'truncated'"),
    ({"name": "truncated", "k": 11}, r"method.k = 11 needs 1 <= k <= steps = 10 \(method 'truncated'\)"),
    ({"name": "truncated", "k": True}, "method.k = True must be an integer"),
    ({"name": "checkpointed", "evry": 3}, "method.evry is not a setting of method 'checkpointed'; did you mean"),
    ({"name": "drmad", "every": 3}, "method.every is not a setting of method 'drmad'; it has no settings"),
    ({"name": "full", "every": 3}, "method.every is not a setting of method 'full'; its settings: chunk, max_memory"),
    ({"name": "cg", "solver": "dense"}, "method.solver is not a setting of method 'cg'; its settings: tol,"),
    ({"name": "hoag", "decrease": 1.5}, r"method.decrease = 1.5 must be in \(0, 1\]"),
    ({"name": "hoag", "solver": "fixed_point"}, "method.solver = 'fixed_point' is not a solver"),
    ({"name": "neumann", "alpha": -1}, "method.alpha = -1.0 must be > 0"),
    ({"name": "random_truncated", "window": "4"}, "method.window = '4' must be an integer"),
    ({"name": "reversible", "radix_bits": 70}, "method.radix_bits = 70 needs 1 <= radix_bits <= 60"),
    ({"name": "forward", "chunk_size": 0}, "method.chunk_size = 0 needs a positive int"),
    ({"name": "greedy"}, "'greedy' is now 'truncated' with k = 1"),
    ({"every": 3}, r"\[method\] needs a name"),
])
def test_a_bad_table_is_one_line_naming_the_field(table, message):
    with pytest.raises(hg.MethodConfigError, match=message) as e:
        hg.from_config(table, 10)
    assert "\n" not in str(e.value)


def test_the_protocol_module_imports_no_method():
    """methods.py is the protocol and the table; builtins.py lists the built-ins (no import loop)."""
    tree = ast.parse((ROOT / "metaopt/hypergrad/methods.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0}
    assert imported <= {"optim.base", "problem"}, imported
    builtins = ast.parse((ROOT / "metaopt/hypergrad/builtins.py").read_text())
    listed = {n.module for n in ast.walk(builtins) if isinstance(n, ast.ImportFrom)}
    assert {"unroll", "implicit", "forward", "reversible", "drmad", "random_truncation", "zero_order"} <= listed
    # importing the protocol module alone (a fresh interpreter) registers the built-ins, once
    code = "import metaopt.hypergrad.methods as m; print(len(m.registered()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(hg.registered()) == 16


def _config(recipe: str, name: str, *extra: str):
    return resolve_config(get(recipe), preset="smoke",
                          overrides=[*SMALL[recipe], f"method.name={name}", *REQUIRED_FIELDS.get(name, []), *extra])


# what each recipe refuses, and why (the rest must run)
REFUSED = {
    "demo": {"implicit", "cg", "neumann", "fixed_point", "dense", "hoag", "reversible"},
    "distill": {"implicit", "cg", "neumann", "fixed_point", "dense", "hoag", "reversible"},
    "hpo": {"reversible"},  # the l2 task's step size is fixed but the recipe keeps reversal to its schedule task
    "structure": {"implicit", "cg", "neumann", "fixed_point", "dense", "hoag", "reversible"},
}


@pytest.mark.parametrize("recipe", list(SMALL))
def test_every_registered_method_runs_in_every_recipe_or_is_refused(recipe):
    """``--set method.name=X`` for every registered X: refused at config validation with one line
    naming ``method.name``, or one hypergradient of the recipe's task is finite."""
    refused = set()
    for name in hg.names():
        try:
            cfg, cfg_dict = _config(recipe, name)
        except ConfigError as e:
            assert str(e).startswith("method.name = ") and "\n" not in str(e), str(e)
            refused.add(name)
            continue
        assert cfg_dict["method"]["name"] == name
        task = get(recipe).build(cfg, torch.device("cpu"))
        res = task.hypergradient(task.objective, task.hyper, torch.Generator().manual_seed(0))
        assert all(torch.isfinite(g).all() for g in res.grads.values()), (recipe, name)
    assert refused == REFUSED[recipe]


def test_the_reasons_name_the_fix():
    with pytest.raises(ConfigError, match="method.name = 'cg' is implicit .* act along the inner trajectory: it has "
                                          "no stationary point; use one of full, checkpointed"):
        _config("distill", "cg")
    with pytest.raises(ConfigError, match="method.name = 'reversible' cannot run this recipe's inner optimizer: "
                                          "Reversible needs heavy-ball momentum SGD"):
        _config("structure", "reversible")
    with pytest.raises(ConfigError, match="draws fresh Monte Carlo noise every step"):
        _config("structure", "hoag")
    cfg, _ = resolve_config(get("hpo"), preset="schedule-reversible", overrides=["hpo.steps=5"])
    assert cfg.method == {"name": "reversible"}


def test_tables_layer_like_presets():
    """The recipe's default table is the base: naming the same method changes only the fields given,
    naming another starts from that method's defaults; --set method.<field> in any order."""
    hpo = get("hpo")
    _, d = resolve_config(hpo, overrides=["method.min_tol=1e-8"])
    assert d["method"] == {"name": "hoag", "min_tol": 1e-8, "max_inner_rounds": 20, "maxiter": 100}
    _, d = resolve_config(hpo, overrides=["method.maxiter=7", "method.name=cg"])
    assert d["method"] == {"name": "cg", "maxiter": 7}
    _, d = resolve_config(hpo, config={"method": "full"})
    assert d["method"] == {"name": "full"}
    _, d = resolve_config(get("demo"), preset="smoke", overrides=["method.every=5"])
    assert d["method"] == {"name": "checkpointed", "every": 5}
    assert merge({"method": {"name": "a", "x": 1}}, {"method": {"name": "b"}}) == {"method": {"name": "b"}}
    assert merge({"method": {"name": "a", "x": 1}}, {"method": {"y": 2}}) == {"method": {"name": "a", "x": 1, "y": 2}}


def test_moved_keys_say_what_to_write():
    cases = {
        ("demo", "inner.method=full"): 'inner.method is gone: the hypergradient method is the [method] table now',
        ("distill", "distill.window=5"): 'distill.window is gone: W is a field of its method now: write [method] '
                                         'name = "random_truncated", window = 5 (or name = "truncated", k = 5)',
        ("hpo", "hpo.method=random_truncated"): 'hpo.method is gone: the [method] table now: write [method] name = '
                                                '"random_truncated" (or --set method.name=random_truncated)',
        ("hpo", "hpo.truncate=5"): 'hpo.truncate is gone: a field of its method\'s [method] table now',
        ("hpo", "hpo.hoag_tol0=0.1"): "method.tol0",
        ("hpo", "hpo.solve_iters=5"): "method.maxiter",
        ("hpo", "hpo.max_rounds=5"): "method.max_inner_rounds",
        ("structure", "structure.truncate=2"): 'structure.truncate is gone: K is a field of its method now: write '
                                               '[method] name = "truncated", k = 2',
        ("structure", "structure.method=full"): "structure.method is gone",
    }
    for (recipe, override), message in cases.items():
        with pytest.raises(ConfigError) as e:
            resolve_config(get(recipe), overrides=[override])
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
        key, value = override.split("=")
        section, field = key.split(".")
        with pytest.raises(ConfigError, match=f"{section}.{field} is gone"):  # a TOML file, likewise
            resolve_config(get(recipe), config={section: {field: value}})


def test_resolved_configs_with_method_tables_round_trip_through_toml(tmp_path):
    for recipe in ("hpo", "distill"):
        _, d = resolve_config(get(recipe), preset="smoke",
                              overrides=["method.name=random_truncated", "method.window=3"])
        (tmp_path / "c.toml").write_text(dumps_toml(d))
        assert load_toml(tmp_path / "c.toml") == d
        assert isinstance(resolve_config(get(recipe), config=tmp_path / "c.toml")[0].method, MethodTable)
    _, d = resolve_config(get("hpo"), preset="smoke")  # a list of inline tables
    text = dumps_toml(d)
    assert 'compare = [{name = "hoag", min_tol = 1e-06' in text
    (tmp_path / "h.toml").write_text(text)
    assert load_toml(tmp_path / "h.toml") == d


def test_a_plugin_method_is_configured_from_every_recipe_by_its_fields():
    @dataclasses.dataclass(frozen=True)
    class Scaled(hg.Full):
        """Full, scaled (a plug-in for the test)."""

        scale: float = 1.0
        name: ClassVar[str] = "scaled_full_test"

        def validate(self, steps):
            if self.scale <= 0:
                raise hg.FieldError("Scaled", "scale", self.scale, "must be > 0")

        def run(self, problem, params0, outer):
            sweep = super().run(problem, params0, outer)
            sweep.grads = {k: g * self.scale for k, g in sweep.grads.items()}
            return sweep

    hg.register(Scaled)
    try:
        cfg, d = _config("demo", "scaled_full_test", "method.scale=2")
        assert d["method"] == {"name": "scaled_full_test", "scale": 2.0}
        task = get("demo").build(cfg, torch.device("cpu"))
        assert task.method == Scaled(2.0)
        with pytest.raises(ConfigError, match=r"method.scale = -1.0 must be > 0 \(method 'scaled_full_test'\)"):
            _config("hpo", "scaled_full_test", "method.scale=-1")
        row = next(r for r in hg.methods.reference_table().splitlines() if r.startswith("| `scaled_full_test` |"))
        assert row.endswith("`scale` (float = 1.0) |")  # after Full's own (keyword-only) settings
    finally:
        hg.unregister("scaled_full_test")


def test_docs_list_every_method_and_its_fields():
    """docs/cli.md carries the registry's table of [method] settings (regenerate it with
    ``python -c "import metaopt.hypergrad as hg; print(hg.methods.reference_table())"``)."""
    assert hg.methods.reference_table() in (ROOT / "docs/cli.md").read_text()


def test_a_bad_method_on_the_command_line_exits_2_before_running(tmp_path):
    out = tmp_path / "r"
    res = subprocess.run([sys.executable, "-m", "metaopt", "run", "hpo", "--preset", "smoke", "--out", str(out),
                          "--set", "method.name=random_truncated", "--set", "method.window=500"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "method.window = 500 needs 1 <= window <= steps = 50 (method 'random_truncated')" in res.stderr
    assert not (out / "checkpoint.pt").exists()
