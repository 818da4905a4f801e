"""Checkpoints that survive a kill: written atomically, refused loudly when foreign or corrupt.

A checkpoint holds the run's whole state (hyperparameters, meta-optimizer state, outer step, the
metrics so far, the recipe's generator and the global RNG states of torch, numpy and Python) so
that ``--resume`` ends in the same state as an uninterrupted run.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "metaopt-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, corrupt, from another recipe or config)."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half:
    a temporary file in the same directory, flushed and fsynced, then renamed over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def load(path: str | Path, recipe: str, config: dict[str, Any]) -> dict[str, Any]:
    """The saved ``state`` (and the global RNGs restored), or a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {str(path)!r}; start without --resume")
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
    set_rng_state(blob["rng"])
    return blob["state"]
