"""What ``metaopt run`` and ``metaopt show`` do, from Python: :func:`launch` a recipe into a run
directory (config precedence, the directory checks, the multi-process world, the runner) and
:func:`read_run` a run directory back.

    from metaopt.run import launch, read_run

    st = launch("demo", preset="smoke", overrides=["outer.steps=20"], out="runs/demo")
    info = read_run("runs/demo")  # status, steps, final metrics, the recipe's results, figures

Bad input raises :class:`~metaopt.run.ConfigError` (the command line's exit code 2) with the same
one-line messages the command line prints.
"""

from __future__ import annotations

import difflib
import math
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import ConfigError, from_dict, load_toml, merge, parse_override, to_dict
from .distributed import RankLost, World
from .recipe import Recipe, get
from .rundir import RunDir
from .runner import Interrupted, Runner, RunState
from .show import RunInfo, read_run
from .usercode import load_objective

__all__ = ["RunInfo", "launch", "load_objective", "ranks", "read_run", "resolve_config"]


def resolve_config(
    recipe: Recipe, *, preset: str | None = None, config: str | Path | Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (), seed: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """``(config, config_dict)`` of ``recipe``: defaults <- ``preset`` <- ``config`` (a TOML file, or a
    dict of the same shape) <- ``overrides`` (``"key=value"``, as ``--set``) <- ``seed``, validated
    into the recipe's config dataclass. A bad name, key or value is a :class:`ConfigError` naming it."""
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(f"overrides = {overrides!r} must be a list of 'key=value' strings, "
                          "e.g. ['outer.steps=100']")
    data: dict[str, Any] = {}
    if preset:
        if preset not in recipe.presets:
            close = difflib.get_close_matches(preset, list(recipe.presets), n=1)
            hint = (f"; did you mean {close[0]!r}?" if close
                    else f"; choose one of {', '.join(sorted(recipe.presets)) or '(none)'}")
            raise ConfigError(f"recipe {recipe.name!r} has no preset {preset!r}{hint}")
        data = merge(data, dict(recipe.presets[preset]))
    if config is not None:
        data = merge(data, dict(config) if isinstance(config, Mapping) else load_toml(config))
    over: dict[str, Any] = {}
    for text in overrides:  # gathered first: --set method.k=5 --set method.name=truncated is one table
        over = merge(over, parse_override(text, recipe.config))
    data = merge(data, over)
    if seed is not None:
        data["seed"] = seed
    cfg = from_dict(recipe.config, data)
    return cfg, to_dict(cfg)


def ranks() -> tuple[int, int]:
    """``(rank, size)`` of this process as ``torchrun`` describes it in the environment (``(0, 1)``
    in a plain process): whether :func:`launch` will show progress here (rank 0 only), before it runs."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), size) if size > 1 else (0, 1)


def launch(
    recipe: Recipe | str, *, preset: str | None = None, config: str | Path | Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (), out: str | Path | None = None, device: str = "cpu", seed: int | None = None,
    resume: bool = False, timeout: float = 300.0,
    progress: Callable[[RunState, dict[str, Any], int], None] | None = None, log: Callable[[str], None] | None = None,
) -> RunState:
    """Run ``recipe`` (a :class:`Recipe`, or a name found by :func:`metaopt.run.recipes`) into the
    run directory ``out`` (default ``runs/<name>``), as ``metaopt run`` does; the final state.

    The config is :func:`resolve_config`'s. Under ``torchrun`` every rank calls this: it joins the
    process group (``timeout`` seconds bound the wait for a lost rank), rank 0 locks and checks ``out``
    and all ranks stop on its verdict, and the world is closed at the end (a failing rank tells the
    others why). ``resume`` continues from ``out``'s checkpoint. ``progress(state, row, total)`` is
    called after every outer step on rank 0 (``total``: ``outer.steps``); ``log`` receives rank 0's
    messages (default: stderr).

    ``out`` is a transaction (:mod:`metaopt.run.rundir`): it is locked while the run lasts (a second
    run into it is a :class:`ConfigError` naming the holder's pid), and nothing in it changes until
    the config is valid, the checkpoint (``resume``) fits it and ``recipe.build`` returned: a start
    refused or failed before then leaves ``out`` byte for byte as it was, or absent.

    Raises :class:`ConfigError` for bad input, :class:`~metaopt.run.CheckpointError` for a missing,
    corrupt or foreign checkpoint, :class:`~metaopt.run.RunStopped` when the NaN guard stops the run,
    :class:`~metaopt.run.RankLost` when a rank is lost, :class:`~metaopt.run.Interrupted` on
    SIGINT/SIGTERM (checkpoint saved).
    """
    recipe = get(recipe) if isinstance(recipe, str) else recipe
    cfg, cfg_dict = resolve_config(recipe, preset=preset, config=config, overrides=overrides, seed=seed)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"--timeout = {timeout:g} must be > 0 and finite (seconds)")
    try:
        world = World.init(device, timeout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    outdir = Path(out) if out is not None else Path("runs") / recipe.name
    rundir = RunDir(outdir)
    try:
        with _interrupting(rundir):  # until the runner takes SIGINT/SIGTERM over
            problem: Exception | None = None
            saved = None
            if world.main:  # one rank locks and checks the run directory; all of them stop on its verdict
                try:
                    rundir.open(resume)
                    if resume:  # checked before anything is built or written
                        saved = checkpoint.read(rundir.checkpoint, recipe.name, cfg_dict)
                except (ConfigError, checkpoint.CheckpointError) as e:
                    problem = e
            problem = world.broadcast(problem, what="checking --out")
            if problem is not None:
                raise problem
            task = recipe.build(cfg, world.device)
            runner = Runner(recipe, cfg, cfg_dict, task, outdir, log=log, world=world, rundir=rundir)
        return runner.run(resume=resume, progress=progress if world.main else None, saved=saved)
    except (RankLost, Interrupted):
        raise  # every rank knows already
    except BaseException as e:  # tell the other ranks why this one stops, so they can say so
        world.fail(f"{type(e).__name__}: {e}")
        raise
    finally:
        rundir.close()  # the lock released; a start that did not commit leaves --out as it found it
        world.close()


@contextmanager
def _interrupting(rundir: RunDir) -> Iterator[None]:
    """SIGINT/SIGTERM while a run starts (before :class:`Runner` handles them) raise
    :class:`Interrupted`, so that the start is undone rather than killed half-way (main thread only:
    signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(f"interrupted ({signal.Signals(signum).name}) before the run started; "
                          f"--out {str(rundir.path)!r} is as it was")

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
