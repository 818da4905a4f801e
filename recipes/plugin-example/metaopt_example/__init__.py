"""A metaopt recipe plug-in: the L2 penalty of ridge regression on synthetic data, tuned by its
hypergradient. The ``RECIPE`` is found through this package's ``metaopt.recipes`` entry point; its
presets are the TOML files of ``metaopt_example/presets/``, read with
:func:`metaopt.run.recipe.load_presets`."""

from importlib.resources import files

from metaopt.run.recipe import Recipe, load_presets

from .config import RidgeConfig
from .task import RidgeTask

__all__ = ["RECIPE", "RidgeConfig", "RidgeTask"]

RECIPE = Recipe(
    name="ridge",
    description="plug-in example: the L2 penalty of ridge regression, tuned by hypergradient",
    config=RidgeConfig,
    build=RidgeTask,
    presets=load_presets(files(__name__) / "presets"),
)
