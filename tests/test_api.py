"""Public API hygiene: every public module declares ``__all__``; every name in it resolves, is
documented (what the API pages of the docs site show) and, for functions and methods, annotates
its return type; each concept has one import path."""

import importlib
import inspect
import sys
from pathlib import Path

import pytest

import metaopt

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = ["metaopt", "metaopt.optim", "metaopt.optim.schedule", "metaopt.hypergrad", "metaopt.ensemble",
          "metaopt.objective", "metaopt.data", "metaopt.models", "metaopt.recipes.demo", "metaopt.run",
          "metaopt.run.distributed"]


def _exported(module_name):
    module = importlib.import_module(module_name)
    assert isinstance(getattr(module, "__all__", None), list), f"{module_name} has no __all__ list"
    return module, module.__all__


@pytest.mark.parametrize("module_name", PUBLIC)
def test_every_exported_name_resolves(module_name):
    module, names = _exported(module_name)
    assert len(names) == len(set(names)), f"{module_name}.__all__ lists a name twice"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{module_name}.__all__ names {missing}, which the module does not define"


def _functions(obj, name):
    """(qualified name, function) for a function, or a class's own public methods, properties and
    __init__ / __call__, skipping what dataclasses and NamedTuple generate."""
    if inspect.isfunction(obj):
        return [(name, obj)]
    if not inspect.isclass(obj):
        return []
    out = []
    for attr, value in vars(obj).items():
        if attr.startswith("_") and attr not in ("__init__", "__call__"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value) and value.__module__.startswith("metaopt") and "<" not in value.__qualname__:
            out.append((f"{name}.{attr}", value))
    return out


@pytest.mark.parametrize("module_name", PUBLIC)
def test_public_functions_annotate_their_return_types(module_name):
    module, names = _exported(module_name)
    bare = []
    for n in names:
        for qual, fn in _functions(getattr(module, n), f"{module_name}.{n}"):
            sig = inspect.signature(fn)
            if sig.return_annotation is inspect.Signature.empty:
                bare.append(f"{qual} (return)")
            bare += [f"{qual}({p})" for p in sig.parameters
                     if p not in ("self", "cls") and sig.parameters[p].annotation is inspect.Parameter.empty]
    assert not bare, f"unannotated: {bare}"


def test_every_exported_name_has_a_docstring():
    griffe = pytest.importorskip("griffe", reason="griffe comes with mkdocstrings[python] (the docs extra)")
    # statically, as the docs site sees them: type aliases and constants are documented by the string
    # literal after their assignment, which only the source holds
    package = griffe.load("metaopt", search_paths=[str(ROOT)], resolve_aliases=True)
    undocumented = []
    for module_name in PUBLIC:
        _, names = _exported(module_name)
        prefix = module_name.removeprefix("metaopt").lstrip(".")
        for n in names:
            obj = package[f"{prefix}.{n}" if prefix else n]
            doc = obj.docstring.value.strip() if obj.docstring else ""
            if len(doc) < 10:
                undocumented.append(f"{module_name}.{n}")
    assert not undocumented, f"no docstring: {undocumented}"


def test_one_import_path_per_concept():
    from metaopt import ensemble, hypergrad, objective, optim

    assert metaopt.MetaObjective is objective.MetaObjective
    assert metaopt.hypergradient is hypergrad.hypergradient
    assert metaopt.HypergradResult is hypergrad.HypergradResult
    assert metaopt.NonFiniteError is hypergrad.NonFiniteError
    assert metaopt.Ensemble is ensemble.Ensemble and metaopt.MultiEnsemble is ensemble.MultiEnsemble
    # a function and a module of the same name would make `metaopt.optim.adam` mean two things (and the
    # API pages document the module): implementation modules are private
    for package, names in ((optim, ["sgd", "momentum", "nesterov", "adam", "adamw"]), (hypergrad, ["check"])):
        for n in names:
            assert inspect.isfunction(getattr(package, n)), f"{package.__name__}.{n}"
            assert f"{package.__name__}.{n}" not in sys.modules, f"{package.__name__}.{n} is also a module"


def test_py_typed_is_packaged():
    import tomllib

    assert (ROOT / "metaopt" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["metaopt"]
