"""Built-in recipes (more are found through the ``metaopt.recipes`` entry-point group).

Every recipe package has the same modules with the same roles: ``config`` (the settings
dataclasses and their validation), ``data`` (loading or generating the data), ``objective`` (the
:class:`metaopt.MetaObjective`), ``task`` (the :class:`metaopt.run.task.Task`: wiring, and the
runner's hooks as thin methods), ``evaluate`` (judging hyperparameters: fresh models, metrics,
baselines), ``plots`` (figures), ``report`` (the final protocol's tables and markdown summary) and
``__init__`` (the ``RECIPE`` and the exports). Their presets are TOML files in the repository's
``recipes/<name>/`` folder, shipped inside the package as ``metaopt/_presets/<name>/``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..run.recipe import Presets, PresetSource

CHECKOUT = Path(__file__).resolve().parents[2] / "recipes"
"""The repository's ``recipes/`` folder (used when metaopt runs from a checkout, not a wheel)."""


def preset_folder(name: str) -> PresetSource:
    """Where the built-in recipe ``name``'s preset files are: ``metaopt/_presets/<name>/`` of an
    installed wheel (``pyproject.toml`` maps the repository's ``recipes/`` there), else the
    checkout's ``recipes/<name>/``."""
    try:
        packaged = resources.files("metaopt._presets") / name
        if packaged.is_dir():
            return packaged
    except ModuleNotFoundError:  # a source checkout without the mapped package: read recipes/ directly
        pass
    return CHECKOUT / name


def builtin_presets(name: str) -> Presets:
    """The presets of the built-in recipe ``name`` (:func:`metaopt.run.recipe.load_presets`), read on
    first use: naming one recipe reads no other recipe's files."""
    return Presets(lambda: preset_folder(name))
