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

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["RankLost", "World", "balance", "block", "deal", "launched"]

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
    gloo otherwise, with ``timeout`` seconds for every collective.
    """

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, device: torch.device | None = None,
                 timeout: float = 300.0, local_size: int = 1) -> None:
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size
        self.device = device or torch.device("cpu")
        self.timeout = timeout
        self.backend = "none"
        self.calls = 0  # collectives entered (compared across ranks when one fails)
        self._store: Any = None
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
            if local >= torch.cuda.device_count():
                raise ValueError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): start at "
                                 f"most {torch.cuda.device_count()} processes per node (torchrun --nproc-per-node)")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        world = cls(rank, size, local, device, timeout, local_size)
        world.backend = backend
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout), rank=rank, world_size=size,
                                **({"device_id": device} if backend == "nccl" else {}))
        world._store = dist.distributed_c10d._get_default_store()
        world._start_heartbeat()
        world.barrier("start-up")
        return world

    def _start_heartbeat(self) -> None:
        store = self._store.clone() if hasattr(self._store, "clone") else self._store

        def beat() -> None:
            n = 0
            while not self._stop.wait(HEARTBEAT_S):
                n += 1
                try:
                    store.set(f"metaopt/beat/{self.rank}", str(n))
                except Exception:  # the store is gone (the launcher is tearing the run down)
                    return

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

    @property
    def main(self) -> bool:
        """Whether this is rank 0: the one that writes checkpoints, metrics and figures."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, device={self.device}, backend={self.backend})"

    # -- collectives ------------------------------------------------------------------------------

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        """Run collective ``fn``; if it fails or times out, find the ranks that stopped answering."""
        self.calls += 1
        try:
            self._store.set(f"metaopt/calls/{self.rank}", str(self.calls))
            return fn()
        except RankLost:
            raise
        except Exception as e:  # gloo/NCCL report a lost peer as a RuntimeError subclass (DistError, ...)
            raise RankLost(self._diagnose(what, e)) from None

    def _diagnose(self, what: str, error: Exception) -> str:
        """Which ranks are behind this one, or have stopped beating, after ``what`` failed."""
        others = [r for r in range(self.size) if r != self.rank]

        def read(prefix: str) -> dict[int, int]:
            out = {}
            for r in others:
                key = f"metaopt/{prefix}/{r}"
                try:
                    out[r] = int(self._store.get(key)) if self._store.check([key]) else 0
                except Exception:
                    out[r] = -1  # the store itself is unreachable
            return out

        try:
            beats0 = read("beat")
            time.sleep(3 * HEARTBEAT_S)
            beats1, calls = read("beat"), read("calls")
            silent = [r for r in others if beats1[r] <= beats0[r]]
            behind = [r for r in others if 0 <= calls[r] < self.calls]
        except Exception:
            silent, behind = [], []
        lost = sorted(set(silent) | set(behind))
        if lost:
            how = ", ".join(f"rank {r} ({'no heartbeat: dead or stopped' if r in silent else 'alive but behind'}; "
                            f"its last collective {calls.get(r, '?')}, this rank's {self.calls})" for r in lost)
            who = f"lost {how}"
        else:
            who = "no rank identified as lost (one may have failed with its own error above)"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"rank {self.rank}: {what} failed ({first}); {who}. The run stops; the last checkpoint is intact: "
                f"continue with --resume (timeout {self.timeout:g} s, set with --timeout)")

    def barrier(self, what: str = "barrier") -> None:
        if self.size == 1:
            return
        import torch.distributed as dist

        self._guard(what, lambda: dist.barrier())

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
        """``obj`` of rank ``src`` on every rank (any picklable object; tensors come back on CPU)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [_to_cpu(obj) if self.rank == src else None]
        self._guard(what, lambda: dist.broadcast_object_list(box, src=src))
        return box[0]

    def all_gather(self, obj: T, what: str = "all-gather") -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        self._guard(what, lambda: dist.all_gather_object(out, _to_cpu(obj)))
        return out

    def map(self, fn: Callable[[T], R], items: Sequence[T], what: str = "trials") -> list[R]:
        """Restart-parallel: ``[fn(item) for item in items]`` with the items dealt round-robin to the
        ranks (so order them by cost, dearest first, or alike); every rank gets the whole list, in
        order. ``fn`` must not use collectives, and each item must carry its own seed."""
        if self.size == 1:
            return [fn(item) for item in items]
        mine = {i: fn(items[i]) for i in deal(len(items), self.rank, self.size)}
        out: list[Any] = [None] * len(items)
        for part in self.all_gather(mine, what=f"gathering {what}"):
            for i, v in part.items():
                out[i] = v
        return out


def _to_cpu(obj: Any) -> Any:
    """Tensors inside ``obj`` (dicts, lists, tuples) moved to the CPU for pickling across ranks."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
