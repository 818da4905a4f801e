"""The outer loop shared by every recipe: configs, checkpoints, the runner and the recipe registry."""

from .checkpoint import CheckpointError
from .config import ConfigError
from .recipe import OuterConfig, Recipe, Task, recipes
from .runner import Interrupted, Runner, RunStopped

__all__ = ["CheckpointError", "ConfigError", "Interrupted", "OuterConfig", "Recipe", "RunStopped", "Runner", "Task",
           "recipes"]
