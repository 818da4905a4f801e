"""Recipes: what the runner needs from a problem, and the registry that finds them.

A :class:`Recipe` names a config dataclass (which has an ``outer: OuterConfig`` table and a ``seed``),
its presets (partial config dicts; ``smoke`` must finish in under a minute on a 2-core CPU), and a
``build(config, device) -> Task``. Recipes are found in the ``metaopt.recipes`` entry-point group
only (:func:`recipes`): the built-ins are registered there by metaopt's own ``pyproject.toml``, and a
user's package adds one the same way, without touching metaopt::

    [project.entry-points."metaopt.recipes"]
    mine = "my_package.recipe:RECIPE"

Presets are TOML files, one per preset, in a folder of their own (the built-ins' live in the
repository's ``recipes/<name>/`` and ship inside the package); :func:`load_presets` reads them, and
:class:`Presets` (what a ``Recipe`` given a folder holds) reads them on first use only.

A recipe is loaded only when it is named (:func:`get`): ``metaopt run demo`` imports no other recipe
and reads no other presets. :func:`recipes` loads all of them; a plug-in that fails to load is a
:class:`PluginWarning` naming it, and the others still work.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from ..objective import MetaObjective
from ..optim.base import Optimizer
from .config import ConfigError, merge
from .schema import Count, NonNegative, Note, Positive, Range
from .task import Task


@dataclass
class OuterConfig:
    """The outer loop every recipe shares (``[outer]``)."""

    steps: Count = 100
    meta_optimizer: Literal["adam", "sgd"] = "adam"
    meta_lr: Positive = 0.01
    clip: Annotated[NonNegative, Note("0 turns clipping off")] = 0.0  # clip the hypergradient's global norm to this
    eval_every: Count = 10
    checkpoint_every: Count = 10
    max_bad_steps: Count = 5  # consecutive non-finite hypergradients before the run stops
    # the meta learning rate is multiplied by this after a bad step
    bad_lr_factor: Annotated[float, Range(0, 1, open_low=True)] = 0.5
    threads: Annotated[int, Range(1, 1024)] = 1  # torch intra-op threads (1 is fastest for tiny models)


@dataclass(frozen=True)
class Recipe:
    """A runnable problem: its name, settings dataclass, presets and the ``build`` that makes a
    :class:`Task` of a config on a device; ``check`` gives the tiny instance ``metaopt check`` uses."""

    name: str
    description: str
    config: type
    build: Callable[[Any, torch.device], Task]
    # the presets: a dict, or the folder of their TOML files (read on first use, as :class:`Presets`)
    presets: Mapping[str, Mapping[str, Any]] | PresetSource = field(default_factory=dict)
    # a tiny float64 instance for `metaopt check`: () -> (objective, optimizer, hyper, steps)
    check: Callable[[], tuple[MetaObjective, Optimizer, dict[str, Tensor], int]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.presets, str | Path | Traversable):
            object.__setattr__(self, "presets", Presets(self.presets))

    def default_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config())


EXTENDS = "extends"
"""The reserved top-level key of a preset file naming the preset it varies: ``extends = "digits"``
starts from that preset (resolved first) and merges this file over it, tables key by key."""

PresetSource = str | Path | Traversable
"""Where presets live: a folder path, or an ``importlib.resources`` folder of a package."""


def _preset_order(name: str) -> tuple[int, str]:
    return ({"smoke": 0, "paper": 1}.get(name, 2), name)


def load_presets(folder: PresetSource) -> dict[str, dict[str, Any]]:
    """The presets in ``folder``: one per ``NAME.toml`` file (a partial config dict, as ``--config``
    takes), named after the file, ``smoke`` first, then ``paper``, then the others sorted by name.

    A preset that varies another says so with a top-level ``extends = "OTHER"``: it is ``OTHER``'s
    resolved dict with this file's tables merged over it key by key (values and lists replace).
    ``folder`` is a path or an ``importlib.resources`` folder (``files("my_package") / "presets"``),
    so a plug-in reads presets that ship inside its package the same way. Raises
    :class:`ConfigError` naming the file for bad TOML, an unknown or circular ``extends``, or a
    missing folder.
    """
    root: Traversable = Path(folder) if isinstance(folder, (str, Path)) else folder
    if not root.is_dir():
        raise ConfigError(f"preset folder {str(root)!r} does not exist")
    raw: dict[str, tuple[str, dict[str, Any]]] = {}
    for entry in root.iterdir():
        if not (entry.name.endswith(".toml") and entry.is_file()):
            continue
        where = str(entry)
        try:
            raw[entry.name.removesuffix(".toml")] = (where, tomllib.loads(entry.read_text(encoding="utf-8")))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"preset file {where!r} is not valid TOML: {e}") from None
    resolved: dict[str, dict[str, Any]] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> dict[str, Any]:
        if name in resolved:
            return resolved[name]
        where, data = raw[name]
        data = dict(data)
        base = data.pop(EXTENDS, None)
        if base is not None:
            if not isinstance(base, str) or base not in raw:
                known = ", ".join(sorted(raw))
                raise ConfigError(f"preset file {where!r}: {EXTENDS} = {base!r} names no preset here ({known})")
            if base in chain:
                raise ConfigError(f"preset file {where!r}: {EXTENDS} = {base!r} is circular "
                                  f"({' -> '.join((*chain, base))})")
            data = merge(copy.deepcopy(resolve(base, (*chain, base))), data)
        resolved[name] = data
        return data

    return {name: resolve(name, (name,)) for name in sorted(raw, key=_preset_order)}


class Presets(Mapping[str, Mapping[str, Any]]):
    """The presets of a folder (:func:`load_presets`), read on first use: a recipe's presets cost
    nothing until its ``--preset`` (or ``metaopt list``) asks for them. ``folder`` is a preset folder
    or a function that returns one (called on first use too)."""

    def __init__(self, folder: PresetSource | Callable[[], PresetSource]) -> None:
        self._folder = folder
        self._presets: dict[str, dict[str, Any]] | None = None

    @property
    def loaded(self) -> bool:
        """Whether the files have been read."""
        return self._presets is not None

    def _read(self) -> dict[str, dict[str, Any]]:
        if self._presets is None:
            folder = self._folder() if callable(self._folder) else self._folder
            self._presets = load_presets(folder)
        return self._presets

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self._read()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())

    def __repr__(self) -> str:
        return f"Presets({dict(self._presets)!r})" if self._presets is not None else f"Presets({self._folder!r})"


class PluginWarning(UserWarning):
    """A recipe plug-in that could not be used (fails to import, is not a :class:`Recipe`, or takes a
    name another recipe has): the other recipes still work."""


GROUP = "metaopt.recipes"


def _load(ep: Any) -> Recipe:
    """The :class:`Recipe` of the entry point ``ep``; a :class:`ConfigError` naming it (and the file
    and line its import failed at) otherwise."""
    from .usercode import describe, module_roots, origin

    try:
        recipe = ep.load()
    except Exception as e:  # the plug-in's package failed to import: say which, and where
        where = origin(e, module_roots(ep.value.split(":")[0]), fallback=False)
        raise ConfigError(f"recipe plug-in {ep.name!r} ({ep.value}) failed to load: {describe(e)}"
                          f"{f' at {where}' if where else ''}") from None
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe plug-in {ep.name!r} ({ep.value}) is not a metaopt.run.Recipe "
                          f"(it is a {type(recipe).__name__})")
    return recipe


def _gather(eps: list[Any]) -> tuple[dict[str, Recipe], list[str]]:
    """``(recipes by name, problems)`` of the entry points ``eps``: one that fails to load is a problem,
    and of two recipes with one name the built-in (else the first) is kept, the other a problem."""
    found: dict[str, Recipe] = {}
    where: dict[str, str] = {}
    problems: list[str] = []
    for ep in eps:
        try:
            recipe = _load(ep)
        except ConfigError as e:
            problems.append(str(e))
            continue
        name = recipe.name
        if name in found and found[name] is not recipe:
            old = where[name]
            if ep.value.startswith("metaopt.") and not old.startswith("metaopt."):  # the built-in wins
                found[name], where[name] = recipe, ep.value
            problems.append(f"two recipes are named {name!r}: {old} and {ep.value}; using {where[name]} "
                            "(uninstall or rename the other)")
            continue
        found[name], where[name] = recipe, ep.value
    return found, problems


def _warn(problems: list[str]) -> None:
    for text in problems:
        warnings.warn(text, PluginWarning, stacklevel=3)


def recipes() -> dict[str, Recipe]:
    """Every recipe, by name: the entry points of the ``metaopt.recipes`` group, where the built-ins
    (``demo``, ``distill``, ``hpo``, ``structure``, registered in metaopt's own ``pyproject.toml``)
    and plug-ins are found alike, each imported. A plug-in that fails to load, is not a
    :class:`Recipe`, or takes a name another recipe already has (the built-in is kept) is left out
    with a :class:`PluginWarning` naming it (and, for a clash, both entry points)."""
    found, problems = _gather(list(metadata.entry_points(group=GROUP)))
    _warn(problems)
    return found


def get(name: str) -> Recipe:
    """The recipe ``name``, loading only the entry points named ``name`` (no other recipe is imported);
    all of them (:func:`recipes`) only when none is. An unknown name is a :class:`ConfigError` with the
    closest match; the named plug-in failing to load, a :class:`ConfigError` naming it."""
    named = [ep for ep in metadata.entry_points(group=GROUP) if ep.name == name]
    if named:
        found, problems = _gather(named)
        if name in found:
            _warn(problems)
            return found[name]
        if problems:
            raise ConfigError(problems[0])
    found = recipes()
    if name not in found:
        close = difflib.get_close_matches(name, list(found), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; choose one of {', '.join(sorted(found)) or '(none)'}"
        raise ConfigError(f"unknown recipe {name!r}{hint} (see metaopt list)")
    return found[name]
