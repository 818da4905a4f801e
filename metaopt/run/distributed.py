"""Runs over several processes with ``torch.distributed`` (started by ``torchrun``).

A :class:`World` is this process's place in the run: its rank, the number of ranks, the device it
computes on and the collectives the outer loop needs, each guarded so that a rank that dies or
hangs stops the others within ``timeout`` seconds with an error naming it (:class:`RankLost`),
never a silent hang. Two kinds of parallelism use it:

* **ensemble-parallel**: each rank holds a share of the ensemble members (:func:`deal`, :func:`block`)
  and computes its share of the outer loss; :meth:`World.all_reduce_sum` adds the shares, so every
  rank applies the identical update;
* **restart-parallel**: independent trials are dealt to the ranks and gathered
  (:meth:`World.map`), every rank receiving the whole list in the order one process makes it.

Results do not depend on the world size: a member's randomness is its own wherever it runs (an
objective draws the whole ensemble's random numbers, cheap next to training it, and keeps its
members' part; a trial carries its own seed), so only the order of floating-point sums changes.
``World()`` is the single-process world: every collective is the identity.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["RankLost", "World", "balance", "block", "deal", "launched", "to_device"]

T = TypeVar("T")
R = TypeVar("R")

HEARTBEAT_S = 0.5  # how often a rank says it is alive (through the rendezvous store)


class RankLost(RuntimeError):
    """Another rank died, hung or failed; the message names it. The last checkpoint is intact."""


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or anything that sets ``WORLD_SIZE``) with more
    than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def deal(n: int, rank: int, size: int) -> list[int]:
    """Items ``0 .. n-1`` dealt round-robin: rank ``r`` gets ``r, r + size, ...`` (balanced when the
    items are alike and ordered by cost)."""
    return list(range(rank, n, size))


def block(n: int, rank: int, size: int) -> range:
    """Rank ``rank``'s contiguous block of ``n`` items, sizes differing by at most one."""
    q, r = divmod(n, size)
    start = rank * q + min(rank, r)
    return range(start, start + q + (rank < r))


def balance(costs: Sequence[float], size: int) -> list[list[int]]:
    """Items of the given costs split into ``size`` bins of near-equal total cost (longest
    processing time first: dearest item to the lightest bin); each bin's item indices, sorted."""
    bins: list[list[int]] = [[] for _ in range(size)]
    load = [0.0] * size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        k = min(range(size), key=lambda k: (load[k], k))
        bins[k].append(i)
        load[k] += costs[i]
    return [sorted(b) for b in bins]


class World:
    """One process of a run: ``rank`` of ``size``, computing on ``device``.

    ``World()`` is the single-process world. :meth:`World.init` joins the process group that
    ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``): NCCL when ``device`` is CUDA (each rank on ``cuda:LOCAL_RANK``),
    gloo otherwise; Python objects always travel over gloo.

    Liveness: each rank beats into torchrun's rendezvous store every ``HEARTBEAT_S`` seconds while
    its main thread makes progress, and before every collective it waits, through the store, for
    the others to arrive. A peer that is busy (a long trial of :meth:`map`, a slow first compile) is
    waited for as long as it beats; one whose beats stop — dead, stopped, or its main thread stuck
    in one place for ``timeout`` seconds — is named in a :class:`RankLost` within a few beats. The
    collectives themselves then run among ranks that are all present, under the same ``timeout``.
    """

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, device: torch.device | None = None,
                 timeout: float = 300.0, local_size: int = 1) -> None:
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size
        self.device = device or torch.device("cpu")
        self.timeout = timeout
        self.backend = "none"
        self.calls = 0  # collectives entered (compared across ranks when one fails)
        self._store: Any = None  # torchrun's rendezvous store, with a short timeout of its own
        self._objects: Any = None  # the gloo group for Python objects (None: the default group)
        self._progress = 0  # bumped while this rank waits for others (the heartbeat's sign of life)
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    # -- setting up -------------------------------------------------------------------------------

    @classmethod
    def init(cls, device: str | torch.device = "cpu", timeout: float = 300.0) -> World:
        """Join the process group of a ``torchrun`` launch (one process: the single-process world)."""
        import torch.distributed as dist

        if timeout <= 0:
            raise ValueError(f"--timeout = {timeout} must be > 0 seconds")
        if not launched():
            return cls(device=torch.device(device), timeout=timeout)
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local, local_size = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: CUDA is not available on this machine; use --device cpu")
            visible = torch.cuda.device_count()
            if visible == 1:  # one GPU per process (CUDA_VISIBLE_DEVICES set per rank)
                device = torch.device("cuda", 0)
            elif local < visible:
                device = torch.device("cuda", local)
            else:
                raise ValueError(f"local rank {local} has no GPU ({visible} visible): start at most {visible} "
                                 "processes per node (torchrun --nproc-per-node)")
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        world = cls(rank, size, local, device, timeout, local_size)
        world.backend = backend
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout), rank=rank, world_size=size,
                                **({"device_id": device} if backend == "nccl" else {}))
        if backend == "nccl":
            world._objects = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        world._store = dist.distributed_c10d._get_default_store().clone()
        world._store.set_timeout(timedelta(seconds=max(2.0, 4 * HEARTBEAT_S)))
        world._start_heartbeat()
        world.barrier("start-up")
        return world

    def _start_heartbeat(self) -> None:
        """Beat while the main thread makes progress: its CPU time grows (computing, in Python or in
        kernels) or this rank's wait loop turns. A main thread blocked for ``timeout`` seconds
        (deadlocked, waiting on something that never comes) stops the beats, so its peers name it.
        Where per-thread CPU clocks are missing, the beats go on while the process lives."""
        store = self._store.clone()
        main = threading.main_thread().ident
        try:
            clock: int | None = time.pthread_getcpuclockid(main)  # type: ignore[arg-type]
        except (AttributeError, OSError, TypeError):
            clock = None

        def beat() -> None:
            n, last, since = 0, None, time.monotonic()
            while not self._stop.wait(HEARTBEAT_S):
                now = time.monotonic()
                try:
                    cpu = time.clock_gettime(clock) if clock is not None else now
                except OSError:
                    cpu = now
                where = (cpu, self._progress)
                if where != last:
                    last, since = where, now
                if now - since > self.timeout:
                    continue  # stuck: say nothing, and the others will say so
                n += 1
                try:
                    store.set(f"metaopt/beat/{self.rank}", str(n))
                except Exception:  # a store hiccup (or the launcher tearing the run down): try again
                    continue

        self._beat = threading.Thread(target=beat, name="metaopt-heartbeat", daemon=True)
        self._beat.start()

    def close(self) -> None:
        """Leave the process group (the single-process world: nothing to do)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        self._stop.set()
        if dist.is_initialized():
            dist.destroy_process_group()

    def fail(self, message: str) -> None:
        """Tell the other ranks why this one is about to exit (they quote it when they stop)."""
        if self.size == 1 or self._store is None:
            return
        try:
            self._store.set(f"metaopt/failed/{self.rank}", message.strip().splitlines()[0][:500])
        except Exception:
            pass  # the store is gone: the others will see the missing heartbeat instead

    @property
    def main(self) -> bool:
        """Whether this is rank 0: the one that writes checkpoints, metrics and figures."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, device={self.device}, backend={self.backend})"

    # -- liveness ---------------------------------------------------------------------------------

    def _read(self, prefix: str, ranks: Sequence[int]) -> dict[int, str | None]:
        """``metaopt/{prefix}/{r}`` for each rank (None: not set); raises if the store is unreachable."""
        keys = {r: f"metaopt/{prefix}/{r}" for r in ranks}
        return {r: (self._store.get(k).decode() if self._store.check([k]) else None) for r, k in keys.items()}

    def _arrive(self, what: str) -> None:
        """Wait until every rank has reached collective number ``self.calls``, for as long as the
        missing ones beat; name them if they stop."""
        n = self.calls
        key = lambda r: f"metaopt/arrived/{n}/{r}"  # noqa: E731
        try:
            self._store.set(key(self.rank), "1")
            if n > 2:
                self._store.delete_key(f"metaopt/arrived/{n - 2}/{self.rank}")
        except Exception as e:
            raise RankLost(self._unreachable(what, e)) from None
        missing = [r for r in range(self.size) if r != self.rank]
        seen: dict[int, tuple[str | None, float]] = {}
        t0 = look = time.monotonic()
        while True:
            self._progress += 1
            now = time.monotonic()
            try:
                if self._store.check([key(r) for r in missing]):
                    return
                if now - look >= HEARTBEAT_S / 2:  # who is still missing, and are they alive?
                    look = now
                    missing = [r for r in missing if not self._store.check([key(r)])]
                    beats = self._read("beat", missing)
                    for r in missing:
                        if r not in seen or seen[r][0] != beats[r]:
                            seen[r] = (beats[r], now)
                    silent = [r for r in missing if now - seen[r][1] > 6 * HEARTBEAT_S]
                    if silent:
                        raise RankLost(self._describe(what, silent, "no heartbeat: dead, stopped or stuck"))
            except RankLost:
                raise
            except Exception as e:
                raise RankLost(self._unreachable(what, e)) from None
            waited = now - t0  # poll finely while the others are close (the common case), coarsely after
            time.sleep(0.0005 if waited < 0.2 else 0.005 if waited < 2 else 0.05 if waited < 20 else HEARTBEAT_S / 2)

    def _unreachable(self, what: str, error: Exception) -> str:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"rank {self.rank}: {what}: torchrun's rendezvous store is unreachable ({first}); the launcher "
                "on the first node is gone. The run stops; the last checkpoint is intact: continue with --resume")

    def _describe(self, what: str, lost: Sequence[int], how: str, error: Exception | None = None) -> str:
        try:
            why = self._read("failed", lost)
            calls = self._read("calls", lost)
        except Exception:
            why, calls = {}, {}
        parts = []
        for r in lost:
            if why.get(r):
                parts.append(f"rank {r} failed: {why[r]}")
            else:
                parts.append(f"rank {r} ({how}; its last collective {calls.get(r) or '?'}, this rank's {self.calls})")
        cause = ""
        if error is not None:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            cause = f" ({first})"
        return (f"rank {self.rank}: {what} failed{cause}; lost {', '.join(parts)}. The run stops; the last "
                f"checkpoint is intact: continue with --resume (timeout {self.timeout:g} s, set with --timeout)")

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        """Wait for every rank to arrive, then run collective ``fn``; name the ranks lost on the way."""
        self.calls += 1
        try:
            self._store.set(f"metaopt/calls/{self.rank}", str(self.calls))
        except Exception as e:
            raise RankLost(self._unreachable(what, e)) from None
        self._arrive(what)
        try:
            return fn()
        except RankLost:
            raise
        except Exception as e:  # gloo/NCCL report a lost peer as a RuntimeError subclass (DistError, ...)
            raise RankLost(self._diagnose(what, e)) from None

    def _diagnose(self, what: str, error: Exception) -> str:
        """Which ranks stopped beating or are behind, after collective ``what`` failed."""
        others = [r for r in range(self.size) if r != self.rank]
        try:
            beats0 = self._read("beat", others)
            time.sleep(6 * HEARTBEAT_S)
            beats1, calls = self._read("beat", others), self._read("calls", others)
        except Exception:
            return self._unreachable(what, error)
        silent = [r for r in others if beats1[r] == beats0[r]]
        behind = [r for r in others if int(calls[r] or 0) < self.calls]
        lost = sorted(set(silent) | set(behind))
        if not lost:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return (f"rank {self.rank}: {what} failed ({first}); no rank identified as lost (one may have failed "
                    "with its own error above). The run stops; the last checkpoint is intact: continue with --resume")
        how = "no heartbeat: dead, stopped or stuck" if set(lost) <= set(silent) else "alive but behind"
        return self._describe(what, lost, how, error)

    # -- collectives ------------------------------------------------------------------------------

    def barrier(self, what: str = "barrier") -> None:
        if self.size == 1:
            return
        import torch.distributed as dist

        self._guard(what, lambda: dist.barrier(group=self._objects))

    def all_reduce_sum(self, tensors: Mapping[str, Tensor], what: str = "all-reduce") -> dict[str, Tensor]:
        """Every rank's ``tensors`` summed, as one flat buffer in one collective (float64 on the wire
        for float64 inputs). The single-process world returns them unchanged."""
        if self.size == 1:
            return dict(tensors)
        import torch.distributed as dist

        names = list(tensors)
        dtype = torch.float64 if any(tensors[k].dtype == torch.float64 for k in names) else torch.float32
        flat = torch.cat([tensors[k].detach().reshape(-1).to(self.device, dtype) for k in names])
        self._guard(what, lambda: dist.all_reduce(flat))
        out, i = {}, 0
        for k in names:
            t = tensors[k]
            out[k] = flat[i:i + t.numel()].reshape(t.shape).to(t.device, t.dtype)
            i += t.numel()
        return out

    def broadcast(self, obj: T, src: int = 0, what: str = "broadcast") -> T:
        """``obj`` of rank ``src`` on every rank (any picklable object; tensors arrive on this rank's
        device)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [to_device(obj, "cpu") if self.rank == src else None]
        self._guard(what, lambda: dist.broadcast_object_list(box, src=src, group=self._objects))
        return to_device(box[0], self.device)

    def all_gather(self, obj: T, what: str = "all-gather") -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank (tensors on this rank's device)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        self._guard(what, lambda: dist.all_gather_object(out, to_device(obj, "cpu"), group=self._objects))
        return [to_device(o, self.device) for o in out]

    def map(self, fn: Callable[[T], R], items: Sequence[T], what: str = "trials") -> list[R]:
        """Restart-parallel: ``[fn(item) for item in items]`` with the items dealt round-robin to the
        ranks (so order them by cost, dearest first, or alike); every rank gets the whole list, in
        order. ``fn`` must not use collectives, and each item must carry its own seed. A rank that
        finishes early waits for the others as long as they are alive."""
        if self.size == 1:
            return [fn(item) for item in items]
        mine = {i: fn(items[i]) for i in deal(len(items), self.rank, self.size)}
        out: list[Any] = [None] * len(items)
        for part in self.all_gather(mine, what=f"gathering {what}"):
            for i, v in part.items():
                out[i] = v
        return out


def to_device(obj: Any, device: str | torch.device) -> Any:
    """``obj`` with every tensor inside it (dicts, lists, tuples, named tuples, dataclasses) on ``device``."""
    if isinstance(obj, Tensor):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj
