"""Code that is not metaopt's: a user's ``--objective MODULE:FUNCTION`` and recipe plug-ins.

Their exceptions become one line naming the file and line they came from (:class:`UserCodeError`,
``"your objective raised ValueError: ... at my_problem.py:12"``); :func:`origin` finds that line in
a traceback and :func:`load_objective` imports, calls and checks a user's problem factory.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from .config import ConfigError

__all__ = ["UserCodeError", "describe", "load_objective", "module_roots", "origin", "run_user_code"]

T = TypeVar("T")
PACKAGE = Path(__file__).resolve().parents[1]  # metaopt/


class UserCodeError(Exception):
    """An exception raised by a user's code (``who``: "your objective", "recipe plug-in 'ridge'"): one
    line ``"{who} raised {type}: {message} at {file}:{line}"``; ``__cause__`` is the original."""

    def __init__(self, who: str, exc: BaseException, where: str | None) -> None:
        self.who, self.exc, self.where = who, exc, where
        super().__init__(f"{who} raised {describe(exc)}{f' at {where}' if where else ''}")


def describe(exc: BaseException) -> str:
    """``"Type: message"`` of ``exc`` in one line (the message's lines joined)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def module_roots(module: str) -> list[Path]:
    """Where the code of ``module`` (a dotted name) lives, without importing it: its top-level
    package's folder, or the file of a top-level module ([] when it is not found)."""
    top = module.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
    origin_file = Path(spec.origin).resolve()
    return [origin_file.parent] if spec.submodule_search_locations else [origin_file]


def _show(path: Path) -> str:
    """``path`` as a user reads it: relative to the current directory or to metaopt's parent if under them."""
    for base in (Path.cwd(), PACKAGE.parent):
        try:
            return str(path.relative_to(base))
        except ValueError:
            continue
    return str(path)


def origin(exc: BaseException, roots: Iterable[Path] = (), fallback: bool = True) -> str | None:
    """``"file:line"`` that ``exc`` came from: the innermost frame under ``roots`` (the user's code),
    else (with ``fallback``) the innermost frame of metaopt, else the innermost frame; a
    ``SyntaxError``'s own line first."""
    roots = [Path(r).resolve() for r in roots]

    def under(path: Path, root: Path) -> bool:
        return path == root or root in path.parents

    if isinstance(exc, SyntaxError) and exc.filename and not exc.filename.startswith("<"):
        return f"{_show(Path(exc.filename).resolve())}:{exc.lineno}"
    frames = [(Path(f.filename).resolve(), f.lineno) for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<")]
    picks = [lambda p: any(under(p, r) for r in roots)]
    if fallback:
        picks += [lambda p: under(p, PACKAGE), lambda p: True]
    for pick in picks:
        mine = [(p, n) for p, n in frames if pick(p)]
        if mine:
            return f"{_show(mine[-1][0])}:{mine[-1][1]}"
    return None


def run_user_code(who: str, roots: Iterable[Path], fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, where an exception that passed through the user's code (a frame under ``roots``)
    becomes a :class:`UserCodeError` naming its line, and metaopt's own ``ValueError``/``TypeError``
    about the user's problem (NaN loss, non-scalar loss, zero steps) a :class:`ConfigError` with their
    message. The runner's own exceptions (``ConfigError``, ``RunStopped``, ``Interrupted``, ...), others
    that never passed through the user's code, and ``KeyboardInterrupt`` pass through unchanged."""
    roots = list(roots)
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if type(e).__module__.startswith(__package__):  # metaopt.run's own: already says what happened
            raise
        tb_files = [Path(f.filename).resolve() for f in traceback.extract_tb(e.__traceback__)]
        if isinstance(e, SyntaxError) or any(r == p or r in p.parents for p in tb_files for r in roots):
            raise UserCodeError(who, e, origin(e, roots)) from e
        if tb_files and PACKAGE in tb_files[-1].parents and isinstance(e, ValueError | TypeError):
            raise ConfigError(f"{who}: {' '.join(str(e).split()) or type(e).__name__}") from e
        raise


def load_objective(spec: str) -> tuple[Any, Any, Any, int]:
    """``FUNCTION()`` of ``MODULE`` for ``spec = "MODULE:FUNCTION"`` (``metaopt check --objective``): the
    tuple ``(objective, optimizer, hyper, steps)``, checked. The module is found as ``python -m`` finds
    modules (the current directory first). A bad spec, a missing module or function, or a factory that
    returns the wrong thing is a :class:`ConfigError`; an exception from the user's code (importing the
    module, calling the factory) a :class:`UserCodeError` naming its file and line."""
    import torch

    from ..optim.base import Optimizer

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"--objective {spec!r}: use MODULE:FUNCTION, e.g. my_package.problems:ridge")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the installed `metaopt` script lacks it
        sys.path.insert(0, os.getcwd())
    roots = module_roots(module)
    if not roots and module not in sys.modules:
        raise ConfigError(f"--objective {spec!r}: no module named {module!r} (looked in the current directory "
                          "and on sys.path)")
    try:
        mod = run_user_code("your objective", roots, importlib.import_module, module)
    except UserCodeError as e:
        if isinstance(e.exc, ModuleNotFoundError) and (module == e.exc.name or module.startswith(f"{e.exc.name}.")):
            raise ConfigError(f"--objective {spec!r}: no module named {e.exc.name!r}") from None
        raise
    factory = getattr(mod, attr, None)
    if factory is None:
        raise ConfigError(f"--objective {spec!r}: module {module!r} has no {attr!r}")
    if not callable(factory):
        raise ConfigError(f"--objective {spec!r}: {attr} is a {type(factory).__name__}, not a function")
    got = run_user_code("your objective", roots, factory)
    what = f"--objective {spec!r}: {attr}() must return (objective, optimizer, hyper, steps)"
    if not isinstance(got, tuple | list) or len(got) != 4:
        shape = f"a {len(got)}-tuple" if isinstance(got, tuple | list) else repr(got) if got is None else \
            f"a {type(got).__name__}"
        raise ConfigError(f"{what}, got {shape}")
    objective, optimizer, hyper, steps = got
    for need, ok in (("objective: an object with inner_loss, outer_loss and init_params (a metaopt.MetaObjective)",
                      all(callable(getattr(objective, m, None)) for m in ("inner_loss", "outer_loss", "init_params"))),
                     ("optimizer: a metaopt.optim optimizer (init/update)", isinstance(optimizer, Optimizer)
                      or all(callable(getattr(optimizer, m, None)) for m in ("init", "update"))),
                     ("hyper: a non-empty dict {name: floating-point tensor}", isinstance(hyper, dict) and hyper
                      and all(isinstance(k, str) and isinstance(v, torch.Tensor) and v.is_floating_point()
                              for k, v in hyper.items()))):
        if not ok:
            raise ConfigError(f"{what}; its {need}")
    return objective, optimizer, hyper, steps
