"""The outer loop shared by every recipe: meta-optimizer on h, clipping, NaN guard, evaluation,
metrics, atomic checkpoints, resume, progress and figures."""

from __future__ import annotations

import json
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import numpy_seed
from ..objective import MetaObjective
from . import checkpoint
from .distributed import World, to_device
from .meta import MetaState, OuterLoop, RunStopped
from .recipe import OuterConfig, Recipe
from .rundir import RunDir
from .task import Task


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM: the state was checkpointed; ``--resume`` continues."""


@dataclass
class RunState(MetaState):
    """A run's state: the outer loop's (:class:`~metaopt.run.meta.MetaState`), the metrics so far,
    the run's generator, its seconds and the task's own state (:meth:`Task.state_dict`: the
    hypergradient method's); what ``checkpoint.pt`` holds."""

    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    generator_state: Tensor
    seconds: float
    task_state: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(numpy_seed(seed))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Runner:
    """Run ``task`` for ``outer.steps`` outer steps, writing into ``out``.

    ``out`` receives ``config.toml``, ``metrics.jsonl`` (one line per outer step, plus eval lines),
    ``metrics.json`` (final), ``checkpoint.pt``, ``summary.md`` and ``figures/*.png``.

    ``task`` is a :class:`~metaopt.run.Task`; every hook of it is called (the base class's defaults
    are no-ops). With a multi-rank ``world`` (see :mod:`.distributed`) every rank runs this loop in
    lockstep: a task whose ``distribute(world)`` returns its rank's share of the objective gets the
    shares' hypergradients summed (ensemble-parallel); one that returns ``None`` computes the whole
    one on every rank and rank 0's is used. The stop signal travels in the same
    all-reduce, so all ranks stop after the same step. Only rank 0 writes files; ``--resume`` reads
    rank 0's checkpoint and broadcasts it.

    Nothing in ``out`` changes before the run's state is ready (the checkpoint read and checked on
    resume) on every rank: then ``rundir`` (a :class:`~metaopt.run.rundir.RunDir` of ``out``, locked
    by :func:`~metaopt.run.launch`; default an unlocked one) is committed: stale temporary files
    removed, ``figures/`` and ``config.toml`` written.
    """

    def __init__(
        self, recipe: Recipe, config: Any, config_dict: dict[str, Any], task: Task, out: Path, log: Any = None,
        world: World | None = None, rundir: RunDir | None = None,
    ) -> None:
        if not isinstance(task, Task):
            raise TypeError(f"recipe {recipe.name!r}: build() returned a {type(task).__name__}, not a "
                            "metaopt.run.Task (subclass it: its hooks have defaults)")
        self.recipe, self.config, self.config_dict, self.task, self.out = recipe, config, config_dict, task, out
        self.outer: OuterConfig = config.outer
        self.world = world or World()
        say = log or (lambda msg: print(msg, file=sys.stderr))
        self.log = say if self.world.main else (lambda msg: None)
        self.ckpt = out / "checkpoint.pt"
        self.rundir = rundir or RunDir(out)
        self._signal: int | None = None
        self._stop = False  # a rank was signalled by the time it entered this step's reduce
        self.loop = OuterLoop(self.outer.meta_optimizer, clip=self.outer.clip, max_bad_steps=self.outer.max_bad_steps,
                              bad_lr_factor=self.outer.bad_lr_factor, log=self.log)
        self.sharded = False
        self.share: MetaObjective | None = None  # this rank's share of the objective, if the task gave one

    # -- state ----------------------------------------------------------------------------------

    def fresh_state(self) -> RunState:
        generator = seed_everything(self.config.seed)
        start = self.loop.init(self.task.hyper, self.outer.meta_lr)
        return RunState(**vars(start), history=[], evals=[], generator_state=generator.get_state(), seconds=0.0,
                        task_state=self.task.state_dict())

    def save(self, st: RunState) -> None:
        if self.world.main:
            checkpoint.save(self.ckpt, self.recipe.name, self.config_dict, vars(st))

    def load(self, saved: dict[str, Any] | None = None) -> RunState:
        """Rank 0's checkpoint, on every rank (no shared file system needed); a bad checkpoint is
        reported by every rank. ``saved``: rank 0's checkpoint as :func:`checkpoint.read` gave it
        (already read and checked), else it is read from ``out``."""
        found: Any = None
        if self.world.main:
            try:
                saved = saved or checkpoint.read(self.ckpt, self.recipe.name, self.config_dict)
                found = (saved["state"], saved["rng"])
            except checkpoint.CheckpointError as e:
                found = e
        if self.world.size > 1:
            found = self.world.broadcast(found, what="sending the checkpoint")
        if isinstance(found, Exception):
            raise checkpoint.CheckpointError(str(found))
        state, rng = found
        checkpoint.set_rng_state(rng)  # the global RNGs as saved, on every rank
        st = RunState(**state)
        # on the task's device (the checkpoint is read onto the CPU)
        device = next(iter(self.task.hyper.values())).device if self.task.hyper else torch.device("cpu")
        st.hyper = {k: v.to(self.task.hyper[k].device) if k in self.task.hyper else v for k, v in st.hyper.items()}
        st.meta_state = to_device(st.meta_state, device)
        st.task_state = to_device(st.task_state, device)
        self.task.load_state_dict(st.task_state)
        return st

    def _distribute(self) -> None:
        """Give a multi-rank world to the task: ensemble-parallel if it returns this rank's share of
        the objective, else replicated."""
        if self.world.size == 1:
            return
        self.share = self.task.distribute(self.world)
        self.sharded = self.share is not None
        how = "its share of the ensemble" if self.sharded else "the whole hypergradient (rank 0's is used)"
        self.log(f"{self.recipe.name}: {self.world.size} ranks ({self.world.backend}); each computes {how}")

    def run(self, resume: bool = False, progress: Callable[[RunState, dict[str, Any], int], None] | None = None,
            saved: dict[str, Any] | None = None) -> RunState:
        """The outer loop from a fresh state or, with ``resume``, from ``out``'s checkpoint (``saved``:
        rank 0's, already read by :func:`checkpoint.read`), then the task's report and the files;
        ``progress(state, row, total)`` after every outer step."""
        torch.set_num_threads(self.outer.threads)
        # from here a signal stops the run after its next step (a checkpoint saved), never half-way
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            st = self._start(resume, saved)
            generator = torch.Generator()
            generator.set_state(st.generator_state)
            while st.step < self.outer.steps:
                t0 = time.perf_counter()
                row, stop = self._outer_step(st, generator)
                st.seconds += time.perf_counter() - t0
                st.step += 1
                st.history.append(row)
                self._append(row)
                if st.step % self.outer.eval_every == 0 or st.step == self.outer.steps:
                    ev = {"step": st.step, **self.task.evaluate(st.hyper, generator)}
                    st.evals.append(ev)
                    self._append({"eval": ev})
                st.generator_state = generator.get_state()
                st.task_state = self.task.state_dict()
                if progress is not None:
                    progress(st, row, self.outer.steps)
                if st.step % self.outer.checkpoint_every == 0 or st.step == self.outer.steps:
                    self.save(st)
                if stop:
                    self.save(st)
                    self.world.barrier("stopping")  # rank 0's checkpoint is written before anyone exits
                    raise Interrupted(
                        f"interrupted at outer step {st.step} of {self.outer.steps}; checkpoint saved, "
                        f"continue with --resume"
                    )
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            self.task.close()
        self.finish(st)
        return st

    def _start(self, resume: bool, saved: dict[str, Any] | None) -> RunState:
        """The state to run from, and only then (every rank has its state) ``out`` committed."""
        st = self.load(saved) if resume else self.fresh_state()
        self.world.barrier("starting the run")  # every rank built its task and has its state
        if self.world.main:
            removed = self.rundir.commit(self.config_dict)
            if removed:
                self.log(f"removed {len(removed)} temporary file(s) a killed write left: "
                         f"{', '.join(str(p.relative_to(self.out)) for p in removed)}")
        if resume:
            self.log(f"resuming {self.recipe.name} at outer step {st.step} of {self.outer.steps}")
        self._rewrite_jsonl(st)
        self._distribute()
        return st

    def _reduce(self, res: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, grads)`` agreed by all ranks: the shares summed (ensemble-parallel) or rank 0's
        (replicated); notes in ``self._stop`` whether any rank was signalled by the time it entered
        this step's reduce (the stop signal travels in the same all-reduce)."""
        stop = torch.tensor([float(self._signal is not None)])
        if self.world.size == 1:
            self._stop = bool(stop)
            return res.loss, res.grads
        keep = self.sharded or self.world.main  # replicated: rank 0's alone (zeros, not 0 * NaN, elsewhere)
        mine = lambda v: v if keep else torch.zeros_like(v)  # noqa: E731
        parts = {f"g/{k}": mine(v) for k, v in res.grads.items()}
        parts |= {"loss": mine(torch.as_tensor(res.loss).reshape(1)), "stop": stop}
        what = f"outer step {res.extras['step']}: all-reducing the hypergradient"
        total = self.world.all_reduce_sum(parts, what=what)
        self._stop = bool(total["stop"] > 0)
        return total["loss"].reshape(()), {k: total[f"g/{k}"] for k in res.grads}

    def _outer_step(self, st: RunState, generator: torch.Generator) -> tuple[dict[str, Any], bool]:
        """One :class:`~metaopt.run.meta.OuterLoop` step on the task's (or this rank's share's)
        hypergradient: ``(row, stop)``; a stopping NaN guard's row is written before it raises."""
        task = self.task
        task.begin_step(st.step, self.outer.steps)  # outer-step schedules (e.g. annealed coefficients)
        objective = self.share if self.share is not None else task.objective
        try:
            row, _ = self.loop.step(st, lambda h, g: task.hypergradient(objective, h, g), generator,
                                    reduce=self._reduce)
        except RunStopped as e:
            self._append(e.row)
            self.world.barrier("stopping")  # rank 0 has written the last row before anyone exits
            raise
        return row, self._stop

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal = signum

    # -- files ----------------------------------------------------------------------------------

    def _append(self, row: dict[str, Any]) -> None:
        if not self.world.main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _rewrite_jsonl(self, st: RunState) -> None:
        """metrics.jsonl as of the state (drops lines a killed run wrote after its last checkpoint)."""
        if not self.world.main:
            return
        lines = []
        evals = {e["step"]: e for e in st.evals}
        for row in st.history:
            lines.append(json.dumps(row))
            if row["step"] in evals:
                lines.append(json.dumps({"eval": evals[row["step"]]}))
        checkpoint.atomic_write_text(self.out / "metrics.jsonl", "".join(line + "\n" for line in lines))

    def finish(self, st: RunState) -> None:
        final = st.evals[-1] if st.evals else {}
        extra_md = ""
        generator = torch.Generator()
        generator.set_state(st.generator_state)
        if type(self.task).report is not Task.report:  # say so before a recipe's (long) final protocol
            self.log(f"{self.recipe.name}: final evaluation")
        t0 = time.perf_counter()
        results = self.task.report(st.hyper, generator)  # tables, baselines; None: the task has none
        if results is not None:
            results["report_seconds"] = time.perf_counter() - t0
            extra_md = self.task.summary(results)
        summary = {
            "recipe": self.recipe.name,
            "steps": st.step,
            "updates": st.updates,
            "seconds": st.seconds,
            "final_loss": st.history[-1]["loss"] if st.history else None,
            "final": final,
            "history": st.history,
            "evals": st.evals,
        }
        if results is not None:
            summary["results"] = results
            summary["report"] = extra_md  # the recipe's tables as markdown (`metaopt show` renders this)
        if not self.world.main:  # the other ranks took part in the report's trials; rank 0 writes
            return
        figures = self._figures(st)
        summary["figures"] = [str(p.relative_to(self.out)) for p in figures]
        checkpoint.atomic_write_text(self.out / "metrics.json", json.dumps(summary, indent=1))
        checkpoint.atomic_write_text(self.out / "summary.md", summary_markdown(summary, self.config_dict) + extra_md)

    def _figures(self, st: RunState) -> list[Path]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.log("matplotlib is not installed (pip install 'metaopt[plots]'): figures skipped")
            return []
        fig_dir = self.out / "figures"
        fig, ax = plt.subplots(figsize=(5, 3.2))
        steps = [r["step"] for r in st.history]
        ax.plot(steps, [r["loss"] for r in st.history], lw=1)
        ax.set_xlabel("outer step")
        ax.set_ylabel("outer loss")
        ax.set_title(f"{self.recipe.name}: outer loss")
        fig.tight_layout()
        path = fig_dir / "outer_loss.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return [path, *self.task.figures(st.hyper, st.history, fig_dir)]


def summary_markdown(summary: dict[str, Any], config: dict[str, Any]) -> str:
    lines = [f"# {summary['recipe']} run", "",
             f"{summary['steps']} outer steps ({summary['updates']} updates) in {summary['seconds']:.1f} s; "
             f"final outer loss {summary['final_loss']:.6g}." if summary["final_loss"] is not None else "", ""]
    if summary["final"]:
        lines += ["| metric | value |", "|---|---|"]
        for k, v in summary["final"].items():
            lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    if summary.get("figures"):
        lines += ["Figures:", ""] + [f"- `{p}`" for p in summary["figures"]] + [""]
    lines += ["Config: `config.toml`; metrics: `metrics.jsonl`, `metrics.json`.", ""]
    return "\n".join(lines)
