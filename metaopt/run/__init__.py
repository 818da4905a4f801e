"""The outer loop shared by every recipe: configs, checkpoints, the runner, the recipe registry and
multi-process runs (:class:`World`)."""

from .checkpoint import CheckpointError
from .config import ConfigError
from .distributed import RankLost, World
from .recipe import OuterConfig, Recipe, recipes
from .runner import Interrupted, Runner, RunStopped
from .task import Task

__all__ = ["CheckpointError", "ConfigError", "Interrupted", "OuterConfig", "RankLost", "Recipe", "RunStopped", "Runner",
           "Task", "World", "recipes"]
