"""The outer loop shared by every recipe: configs, checkpoints, the runner, the recipe registry,
multi-process runs (:class:`World`), and :func:`launch` / :func:`read_run`, which do what
``metaopt run`` / ``metaopt show`` do, from Python."""

from .checkpoint import CheckpointError
from .config import ConfigError
from .distributed import RankLost, World
from .launch import launch, resolve_config
from .recipe import OuterConfig, Recipe, recipes
from .runner import Interrupted, Runner, RunState, RunStopped
from .show import RunInfo, read_run
from .task import Task

__all__ = ["CheckpointError", "ConfigError", "Interrupted", "OuterConfig", "RankLost", "Recipe", "RunInfo", "RunState",
           "RunStopped", "Runner", "Task", "World", "launch", "read_run", "recipes", "resolve_config"]
