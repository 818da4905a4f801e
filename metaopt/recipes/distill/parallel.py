"""Distillations sharded over local processes: both cores of a small machine working at once.

The outer loop's cost is dispatch (many tiny kernels per inner step), not arithmetic, so more
members in one process are nearly free but a second process is a second interpreter dispatching
in parallel. Rows are dealt round-robin to ``workers`` shards; shard 0 runs in the calling process,
the others in spawned worker processes that each build and compile their own
:class:`Distillation`. Every outer step the parent draws one seed per shard from the run's
generator (so results depend on the number of workers only through which seeds each row sees),
sends each worker its rows' slice of ``h``, computes its own slice meanwhile, and stitches the
hypergradients together, weighted so the result is the gradient of the whole problem's outer loss.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
import traceback
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ...hypergrad import hypergradient
from ...hypergrad.result import HypergradResult
from ...run.runner import RunStopped


def shard_rows(rows: list[str], workers: int) -> list[list[str]]:
    """Rows dealt round-robin: ``[1-layer, 2-layer, 4-layer, all]`` over 2 -> ``[[1, 4], [2, all]]``
    (measured as the most even split of the paper protocol's per-step cost)."""
    w = max(1, min(workers, len(rows)))
    return [rows[i::w] for i in range(w)]


def _worker(build: Any, args: tuple, conn: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it checkpoints)
    torch.set_num_threads(1)
    try:
        objective, optimizer, method, compile = build(*args)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent is gone
            return
        if msg is None:
            return
        hyper, seed = msg
        try:
            res = hypergradient(objective, optimizer, hyper, objective.steps, method,
                                generator=torch.Generator().manual_seed(seed), check_finite=False, compile=compile)
            conn.send(("ok", (float(res.loss), {k: v.detach() for k, v in res.grads.items()}, res.peak_bytes)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Sharded:
    """``hypergradient`` of the whole distillation from ``len(shards)`` processes.

    ``build(rows) -> (objective, optimizer, method, compile)`` makes one shard's problem (it must be
    picklable: a module-level function with picklable arguments); ``index[s]`` lists the whole
    problem's distillation indices that shard ``s`` holds, in its own order.
    """

    def __init__(self, build: Any, build_args: list[tuple], index: list[Tensor], D: int, timeout: float = 600.0):
        self.index, self.D, self.timeout = index, D, timeout
        self.local = build(*build_args[0])
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for args in build_args[1:]:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(build, args, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for s, conn in enumerate(self.conns, 1):
            self._recv(s, conn)

    def _recv(self, s: int, conn: Any) -> Any:
        resume = "the last checkpoint is intact: continue with --resume (or set distill.workers = 1)"
        try:
            if not conn.poll(self.timeout):
                raise RunStopped(f"distillation worker {s} did not answer within {self.timeout:.0f} s; {resume}")
            kind, payload = conn.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError):
            self.procs[s - 1].join(timeout=1)
            raise RunStopped(
                f"distillation worker {s} died (exit code {self.procs[s - 1].exitcode}); {resume}"
            ) from None
        if kind == "error":
            raise RunStopped(f"distillation worker {s} failed:\n{payload}")
        return payload

    @staticmethod
    def _slice(hyper: Mapping[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
        # x, y: [D, ...]; lr: [n, D]
        return {k: (v[:, idx] if k == "lr" else v[idx]).detach().clone() for k, v in hyper.items()}

    def __call__(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> HypergradResult:
        t0 = time.perf_counter()
        seeds = torch.randint(0, 2**62, (len(self.index),), generator=generator).tolist()
        for s, conn in enumerate(self.conns, 1):
            try:
                conn.send((self._slice(hyper, self.index[s]), seeds[s]))
            except (BrokenPipeError, ConnectionResetError, OSError):
                self._recv(s, conn)  # reports the dead worker
        obj, opt, method, compile = self.local
        res = hypergradient(obj, opt, self._slice(hyper, self.index[0]), obj.steps, method,
                            generator=torch.Generator().manual_seed(seeds[0]), check_finite=False, compile=compile)
        parts = [(float(res.loss), res.grads, res.peak_bytes)]
        parts += [self._recv(s, conn) for s, conn in enumerate(self.conns, 1)]
        grads = {k: torch.zeros_like(v) for k, v in hyper.items()}
        loss, peak = 0.0, 0
        for idx, (loss_s, grads_s, peak_s) in zip(self.index, parts):
            w = len(idx) / self.D  # shard loss = mean over its distillations; the whole = mean over all
            loss += w * loss_s
            peak += peak_s
            for k, g in grads_s.items():
                if k == "lr":
                    grads[k][:, idx] = w * g
                else:
                    grads[k][idx] = w * g
        return HypergradResult(torch.tensor(loss), grads, {}, "sharded", obj.steps, peak, time.perf_counter() - t0,
                               {"shards": len(self.index)})

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass  # that worker is already gone: nothing to tell it
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        self.conns, self.procs = [], []
