"""Checkpoints that survive a kill: written atomically, refused loudly when foreign or corrupt.

A checkpoint holds the run's whole state (hyperparameters, meta-optimizer state, outer step, the
metrics so far, the recipe's generator and the global RNG states of torch, numpy and Python) so
that ``--resume`` ends in the same state as an uninterrupted run.
"""

from __future__ import annotations

import io
import os
import random
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "metaopt-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, corrupt, from another recipe or config)."""


TEMPORARY = re.compile(r"^\..+\.[0-9a-z_]{8}\.tmp$")
"""The name of :func:`atomic_write_bytes`'s temporary files (``.NAME.XXXXXXXX.tmp``): one that
outlives its write was left by a killed process (see :func:`remove_temporaries`)."""


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty ``.NAME.XXXXXXXX.tmp`` beside ``path``, opened for writing, with the mode the
    umask gives (``tempfile.mkstemp`` would make it 0600 whatever the umask)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {str(path)!r}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half:
    a temporary file in the same directory, flushed and fsynced, then renamed over ``path``. The
    file's mode is ``0o666`` less the umask, as ``open(path, "w")`` would give."""
    path = Path(path)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files (:data:`TEMPORARY`) that killed writes left in ``folder``; the
    paths removed. Call it only while no other process writes there (the run directory's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if TEMPORARY.match(p.name) and p.is_file() and not p.is_symlink())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(path: str | Path, recipe: str, config: dict[str, Any], state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "recipe": recipe, "config": config,
                "rng": rng_state(), "state": state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def require(path: str | Path) -> None:
    """A :class:`CheckpointError` unless ``path`` is a file (what ``--resume`` says without one)."""
    if not Path(path).is_file():
        raise CheckpointError(f"--resume: no checkpoint at {str(path)!r}; start without --resume")


def read(path: str | Path, recipe: str, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path`` checked against ``recipe`` and ``config``: its ``state`` and the
    global ``rng`` states saved with it (a dict with those keys), changing nothing; a
    :class:`CheckpointError` when it is missing, corrupt, or another recipe's or config's."""
    path = Path(path)
    require(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or overwritten file: say so, never start afresh silently
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a checkpoint ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a metaopt checkpoint")
    if blob.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {blob.get('version')}, expected {VERSION}")
    if blob.get("recipe") != recipe:
        raise CheckpointError(
            f"checkpoint {str(path)!r} belongs to recipe {blob.get('recipe')!r}, not {recipe!r}; "
            "resume with the same recipe or use a new --out"
        )
    if blob.get("config") != config:
        changed = sorted(k for k in set(config) | set(blob["config"]) if config.get(k) != blob["config"].get(k))
        raise CheckpointError(
            f"the config differs from the checkpoint's in {changed}; resume with the same settings "
            "or use a new --out"
        )
    return {"state": blob["state"], "rng": blob["rng"]}


def load(path: str | Path, recipe: str, config: dict[str, Any]) -> dict[str, Any]:
    """The saved ``state`` (and the global RNGs restored), or a :class:`CheckpointError` (see :func:`read`)."""
    saved = read(path, recipe, config)
    set_rng_state(saved["rng"])
    return saved["state"]
