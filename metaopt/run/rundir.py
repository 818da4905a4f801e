"""The run directory as a transaction: one run at a time holds ``--out`` (an exclusive ``flock``
on ``.metaopt.lock``), nothing in it changes until the start is accepted, and a start that is
refused or fails leaves it as it was (or absent, with the parent folders it needed).

    rd = RunDir(Path("runs/demo"))
    try:
        rd.open(resume=False)    # make the missing folders (noted), lock, refuse a run already there
        ...                      # check the checkpoint, build the task: nothing written yet
        rd.commit(config_dict)   # stale temporary files removed, figures/, config.toml
        ...                      # the run writes its files
    finally:
        rd.close()               # unlock; before commit(): undo open(), byte for byte

Only one process of a multi-process run (rank 0) opens it. :func:`metaopt.run.launch` does all of
this; a :class:`~metaopt.run.Runner` used alone commits an unlocked one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import ConfigError, dumps_toml

__all__ = ["LOCK", "RunDir", "holder"]

LOCK = ".metaopt.lock"
"""The lock file's name in the run directory: the holder's pid, host and start time (JSON), removed
when the run ends. One left by a killed run is stale: its ``flock`` died with the process."""


def holder(path: str | Path) -> dict[str, Any]:
    """What the lock file of the run directory ``path`` says of its holder (``pid``, ``host``,
    ``started``: seconds since the epoch); ``{}`` when it says nothing readable. It does not tell
    whether the holder still runs (a killed run's file stays): only ``flock`` does."""
    for attempt in range(10):  # the holder writes it just after it locks: give it a moment
        try:
            info = json.loads((Path(path) / LOCK).read_text(encoding="utf-8"))
            if isinstance(info, dict) and "pid" in info:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.01 * attempt)
    return {}


class RunDir:
    """The run directory ``path`` of one start (see the module's docstring for the order of calls)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.committed = False
        self._created: list[Path] = []  # folders open()/commit() made, outermost first
        self._fd: int | None = None  # the locked lock file
        self._found: bytes | None = None  # the lock file's bytes when open() found one (a killed run's)

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def open(self, resume: bool = False) -> RunDir:
        """Make the missing folders of ``path`` (noted, to be removed if the start fails), take the
        lock, and check that ``path`` holds no run yet unless ``resume``. A :class:`ConfigError`
        (an unwritable ``--out``, one in use by another run, one that holds a run) or, for ``resume``
        with no run there, a :class:`~metaopt.run.CheckpointError`; either way nothing is left changed."""
        if resume and not self.path.exists():  # nothing to resume: refuse before creating anything
            checkpoint.require(self.checkpoint)
        try:
            try:
                self._make(self.path)
                self._lock()
            except OSError as e:
                why = e.strerror or e
                raise ConfigError(f"cannot write to --out {str(self.path)!r}: {why}; choose a writable directory") \
                    from None
            if not resume and self.checkpoint.exists():
                raise ConfigError(f"{str(self.path)!r} already holds a run; continue it with --resume, or choose "
                                  "another --out")
        except BaseException:
            self.close()
            raise
        return self

    def commit(self, config: dict[str, Any]) -> list[Path]:
        """The start is accepted: remove the temporary files killed writes left (in ``path`` and
        ``figures/``), make ``figures/`` and write ``config.toml``; the temporary files removed.
        Without :meth:`open` (a :class:`~metaopt.run.Runner` used alone) ``path`` is made, unlocked."""
        if not self.locked:
            self._make(self.path)
        figures = self.path / "figures"
        removed = checkpoint.remove_temporaries(self.path) + checkpoint.remove_temporaries(figures)
        self._make(figures)
        checkpoint.atomic_write_text(self.path / "config.toml", dumps_toml(config))
        self.committed = True
        return removed

    def close(self) -> None:
        """Release the lock and remove the lock file. Before :meth:`commit`: leave ``path`` as
        :meth:`open` found it (a lock file found there gets its bytes back; folders it made are removed)."""
        fd, self._fd = self._fd, None
        lock = self.path / LOCK
        try:
            if fd is not None:
                if self._found is not None and not self.committed:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, self._found, 0)
                elif _names(lock, fd):
                    lock.unlink()  # while still locked: a run that opened it meanwhile sees it gone and retries
        finally:
            if fd is not None:
                os.close(fd)  # the flock goes with it
            if not self.committed:
                for d in reversed(self._created):
                    try:
                        d.rmdir()
                    except OSError:
                        break  # not empty: another run works there now; its folders are its own
                self._created = []

    # -- inside ---------------------------------------------------------------------------------

    def _make(self, path: Path) -> None:
        """``path`` and its missing parents, each noted when this start made it."""
        missing = []
        p = path
        while not os.path.lexists(p) and p != p.parent:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue  # another process made it meanwhile: not ours to remove
            self._created.append(d)

    def _lock(self) -> None:
        path = self.path / LOCK
        for _ in range(100):
            self._make(self.path)  # again: a start that made it and failed may have just removed it
            try:
                fd, found = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), False
            except FileExistsError:
                try:
                    fd, found = os.open(path, os.O_RDWR), True
                except FileNotFoundError:
                    continue  # its holder removed it (or the folder) between our two opens
            except FileNotFoundError:
                continue  # a failed start that had made the folder removed it just now
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(self._busy()) from None
                raise ConfigError(f"cannot lock --out {str(self.path)!r}: {e.strerror or e} (its file system "
                                  "lacks flock); choose a directory on a local disk") from None
            if not _names(path, fd):  # the holder removed the file between our open and flock: again
                os.close(fd)
                continue
            self._fd = fd
            if found:
                self._found = _read_all(fd)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            return
        raise ConfigError(f"cannot lock --out {str(self.path)!r}: it keeps vanishing under this run (another "
                          "process removes it?); choose another --out")

    def _busy(self) -> str:
        info = holder(self.path)
        who = f"pid {info['pid']}" if info else "pid unknown"
        if info.get("host") and info["host"] != socket.gethostname():
            who += f" on {info['host']}"
        if isinstance(info.get("started"), (int, float)):
            who += f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))}"
        return (f"--out {str(self.path)!r} is in use by another metaopt run ({who}); wait for it to end or "
                "choose another --out")


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        a, b = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
