"""Presets are TOML files (``recipes/<name>/*.toml``, shipped as ``metaopt/_presets``): they resolve to
exactly the dicts the recipes had as Python before (commit 1d3762c), and the loader names the file
of a bad one."""

import json
import tomllib
from pathlib import Path

import pytest

from metaopt.run.config import ConfigError, from_dict
from metaopt.run.recipe import load_presets, recipes

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ("demo", "distill", "hpo", "structure")
# every built-in preset as the recipes defined it in Python at 1d3762c, before the TOML files
BEFORE_1D3762C = json.loads((Path(__file__).parent / "presets_1d3762c.json").read_text())
HOAG = {"min_tol": 1e-6, "max_inner_rounds": 20, "maxiter": 100}  # the old [hpo] defaults, for HOAG
IMPLICIT = {"tol": 1e-6, "inner_tol": 1e-6, "max_inner_rounds": 20, "maxiter": 100}  # and cg / neumann / ...


def _table(name: str) -> dict:
    """The [method] table of an old hpo method name under the old [hpo] defaults (truncate = 10, tol = 1e-6,
    max_rounds = 20, solve_iters = 100)."""
    return ({"name": name, **HOAG} if name == "hoag" else {"name": name, **IMPLICIT} if name in ("cg", "neumann")
            else {"name": name, "k": 10} if name == "truncated" else {"name": name})


def _moved(recipe: str, preset: dict) -> dict:
    """An old preset in the [method] table of issue 21 (the per-recipe method keys moved there)."""
    preset = json.loads(json.dumps(preset))
    table = {"demo": "inner", "distill": "distill", "hpo": "hpo", "structure": "structure"}[recipe]
    name = preset.get(table, {}).pop("method", None)
    if name is not None:
        preset["method"] = _table(name) if recipe == "hpo" else {"name": name}
    if "compare" in preset.get("l2", {}):
        preset["l2"]["compare"] = [_table(n) if n != "full" else n for n in preset["l2"]["compare"]]
    for section in list(preset):
        if preset[section] == {}:
            del preset[section]
    return preset


BEFORE = {recipe: {name: _moved(recipe, p) for name, p in presets.items()}
          for recipe, presets in BEFORE_1D3762C.items()}
# presets added since, each checked to validate (the files themselves are the reference)
ADDED = {"distill": {"mnist", "mnist-fixed", "mnist-small", "cifar10", "cifar10-fixed"}}


def test_a_few_presets_pinned():
    distill, hpo = recipes()["distill"].presets, recipes()["hpo"].presets
    assert distill["paper"] == {}  # the defaults are the paper's protocol
    assert distill["digits-fixed"] == {
        "distill": {"dataset": "digits", "archs": ["mlp", "convnet"], "rows": ["mlp", "convnet"], "restarts": 4,
                    "members": 1, "steps_per_epoch": 1, "epochs": 3, "per_class": 1, "lr": 0.1, "batch": 256,
                    "init": "fixed"},
        "eval": {"inits": 10, "strategies": ["raw", "strategy2", "strategy3", "shuffled"], "epochs": 30,
                 "baseline_epochs": 30, "baseline_inits": 5, "baseline_lr": 0.003, "baseline_optimizers": ["adam"],
                 "random_real_runs": 5, "random_real_lrs": [0.03, 0.1, 0.3, 1.0], "quick_inits": 2},
        "outer": {"steps": 800, "meta_lr": 0.01, "eval_every": 200, "checkpoint_every": 50},
    }
    assert hpo["l2-single"] == {
        "hpo": {"task": "l2", "dataset": "breast_cancer", "steps": 100},
        "method": {"name": "hoag", "min_tol": 1e-6, "max_inner_rounds": 20, "maxiter": 100},
        "outer": {"steps": 100, "meta_lr": 0.1, "eval_every": 20, "checkpoint_every": 10},
        "l2": {"penalty": "single", "curve": 81},
    }


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_preset_resolves_as_before(name):
    recipe = recipes()[name]
    assert set(recipe.presets) == set(BEFORE[name]) | ADDED.get(name, set())
    for preset, data in BEFORE[name].items():
        assert recipe.presets[preset] == data, f"{name} --preset {preset}"
        from_dict(recipe.config, json.loads(json.dumps(recipe.presets[preset])))  # and it validates
    for preset in ADDED.get(name, ()):
        data = json.loads(json.dumps(recipe.presets[preset]))
        if data.get("distill", {}).get("data_dir") == "":  # the user's folder: any name validates
            data["distill"]["data_dir"] = "DIR"
        from_dict(recipe.config, data)
    assert list(recipe.presets)[0] == "smoke"  # `metaopt list` shows smoke first, then paper, then by name
    rest = [p for p in recipe.presets if p not in ("smoke", "paper")]
    assert rest == sorted(rest)


@pytest.mark.parametrize("name", BUILTIN)
def test_recipe_folder_has_a_readme_and_commented_presets(name):
    folder = ROOT / "recipes" / name
    assert (folder / "README.md").is_file()
    for path in folder.glob("*.toml"):
        text = path.read_text()
        assert text.startswith(f"# metaopt run {name} --preset {path.stem}\n"), path
        tomllib.loads(text)


def test_loader_extends_orders_and_names_bad_files(tmp_path):
    (tmp_path / "base.toml").write_text('[a]\nx = 1\ny = [1, 2]\n[b]\nz = "s"\n')
    (tmp_path / "smoke.toml").write_text('extends = "base"\n[a]\ny = [3]\n[c]\nw = true\n')
    (tmp_path / "notes.md").write_text("not a preset")
    presets = load_presets(tmp_path)
    assert list(presets) == ["smoke", "base"]
    assert presets["smoke"] == {"a": {"x": 1, "y": [3]}, "b": {"z": "s"}, "c": {"w": True}}
    presets["smoke"]["b"]["z"] = "changed"
    assert presets["base"]["b"]["z"] == "s"  # a variant is a copy

    (tmp_path / "bad.toml").write_text("[a\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*not valid TOML"):
        load_presets(tmp_path)
    (tmp_path / "bad.toml").write_text('extends = "nope"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*extends = 'nope' names no preset"):
        load_presets(tmp_path)
    (tmp_path / "bad.toml").write_text('extends = "bad"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*circular"):
        load_presets(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_presets(tmp_path / "missing")


def test_presets_ship_in_the_wheel():
    """pyproject.toml maps recipes/ to the metaopt._presets package and ships its TOML files; every
    package under metaopt/ is listed (setuptools needs the explicit list for the mapping)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"metaopt._presets": "recipes"}
    assert "*/*.toml" in config["package-data"]["metaopt._presets"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "metaopt").rglob("__init__.py")}
    assert set(config["packages"]) == found | {"metaopt._presets"}


ROLES = ("__init__", "config", "data", "objective", "task", "evaluate", "plots", "report")


@pytest.mark.parametrize("name", BUILTIN)
def test_recipes_are_shaped_alike(name):
    """Every built-in recipe package has the same modules with the same roles; an empty role is a
    module whose docstring says so."""
    import importlib

    for role in ROLES:
        module = importlib.import_module(f"metaopt.recipes.{name}.{role}" if role != "__init__" else
                                         f"metaopt.recipes.{name}")
        assert (module.__doc__ or "").strip(), f"metaopt.recipes.{name}.{role} has no docstring"
    assert importlib.import_module(f"metaopt.recipes.{name}").RECIPE.name == name
