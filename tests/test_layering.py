"""The layers of DESIGN.md, checked on the source: imports point down only.

    cli -> recipes -> run -> hypergrad -> {objective, optim, ensemble, models, data, images, _tree}

Every ``import`` of ``metaopt/`` (absolute ``metaopt.x`` or relative, at module level or inside a
function, also under ``TYPE_CHECKING``) is resolved to the module it names and must not point to a
higher layer; ``optim`` imports nothing of metaopt but itself and ``_tree`` (the optimizers are usable
alone). The package's ``__init__`` (the public facade) sits at the hypergrad layer, ``__main__`` at
the cli's.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "metaopt"

LAYERS = {"cli": 5, "__main__": 5, "recipes": 4, "run": 3, "hypergrad": 2, "": 2,
          "objective": 1, "optim": 1, "ensemble": 1, "models": 1, "data": 1, "images": 1,
          "_tree": 1}
NAMES = {5: "cli", 4: "recipes", 3: "run", 2: "hypergrad", 1: "objective/optim/ensemble/models/data/images/_tree"}
OPTIM_MAY_IMPORT = ("optim", "_tree")

# (file, the layer it may reach upwards into) that the rules let through: none
KNOWN: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def targets(node: ast.AST, name: str, is_package: bool) -> list[str]:
    """The metaopt modules (or names of a metaopt package) an import statement refers to."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "metaopt" or a.name.startswith("metaopt.")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        base = node.module or ""
        if base != "metaopt" and not base.startswith("metaopt."):
            return []
    else:
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    # `from metaopt import hypergrad` / `from . import optim` name submodules: judge each name
    return [f"{base}.{a.name}" for a in node.names] if base == "metaopt" else [base]


def layer(module: str) -> str:
    """The top-level part of ``metaopt.<part>...`` ("" for the package itself or a name it exports)."""
    parts = module.split(".")
    part = parts[1] if len(parts) > 1 else ""
    return part if part in LAYERS else ""


def violations(path: Path, source: str) -> list[str]:
    name = module_name(path)
    here = layer(name)
    rel = str(path.relative_to(ROOT))
    out = []
    for node in ast.walk(ast.parse(source, filename=rel)):
        for target in targets(node, name, path.name == "__init__.py"):
            there = layer(target)
            if (rel, there) in KNOWN:
                continue
            if here == "optim" and there not in OPTIM_MAY_IMPORT:
                out.append(f"{rel}:{node.lineno}: imports {target}; optim imports nothing of metaopt but "
                           f"{' and '.join(OPTIM_MAY_IMPORT)} (the optimizers are usable alone)")
            elif LAYERS[there] > LAYERS[here]:
                out.append(f"{rel}:{node.lineno}: imports {target} ({NAMES[LAYERS[there]]} layer) from the "
                           f"{NAMES[LAYERS[here]]} layer; imports point down only: "
                           "cli -> recipes -> run -> hypergrad -> objective/optim/ensemble/models/data/images/_tree")
    return out


def test_imports_point_down_only():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += violations(path, path.read_text(encoding="utf-8"))
    assert not found, "layering violations:\n" + "\n".join(found)


def test_the_checker_catches_upward_and_relative_imports():
    run = PACKAGE / "run" / "recipe.py"
    assert violations(run, "from ..recipes.demo import RECIPE\n") == [
        "metaopt/run/recipe.py:1: imports metaopt.recipes.demo (recipes layer) from the run layer; imports point "
        "down only: cli -> recipes -> run -> hypergrad -> objective/optim/ensemble/models/data/images/_tree"]
    lazy = violations(run, "def f():\n    import metaopt.cli\n")
    assert lazy[0].startswith("metaopt/run/recipe.py:2: imports metaopt.cli")
    assert violations(run, "from .. import hypergrad, optim\nfrom .config import ConfigError\n") == []
    init = PACKAGE / "hypergrad" / "__init__.py"
    assert "imports metaopt.run" in violations(init, "from ..run import Runner\n")[0]
    assert violations(init, "from .api import hypergradient\n") == []
    adam = PACKAGE / "optim" / "adam.py"
    assert "optim imports nothing of metaopt" in violations(adam, "from ..objective import MetaObjective\n")[0]
    assert "optim imports nothing of metaopt" in violations(adam, "import metaopt\n")[0]
    assert violations(adam, "from .base import Optimizer\nfrom .._tree import tree_map\n") == []
