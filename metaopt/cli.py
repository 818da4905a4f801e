"""``metaopt`` — run recipes from the command line.

    metaopt list
    metaopt run RECIPE [--config FILE.toml] [--preset NAME] [--set key=value ...] [--out DIR]
                       [--device cpu|cuda] [--seed N] [--resume] [--timeout SECONDS]
    torchrun --nproc-per-node N -m metaopt run RECIPE ...     (several processes: docs/distributed.md)
    metaopt show DIR
    metaopt check RECIPE | --objective MODULE:FUNCTION [--json PATH]
    metaopt demo

Bad input (unknown recipe or key, wrong type, missing file, unwritable --out, no CUDA) exits with
code 2 and a one- or two-line message; a run stopped by its NaN guard exits 3; a multi-process run
that lost a rank (dead, hung or failed) exits 4 naming it; an interrupted run (Ctrl-C, SIGTERM) saves
a checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

EXIT_USAGE, EXIT_STOPPED, EXIT_LOST, EXIT_INTERRUPTED = 2, 3, 4, 130


class UsageError(Exception):
    """Bad command-line input: printed in one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaopt", description="Hypergradients through training, for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="recipes, their descriptions and presets")
    run = sub.add_parser("run", help="run a recipe")
    run.add_argument("recipe")
    run.add_argument("--config", help="a TOML file of settings")
    run.add_argument("--preset", help="a preset of the recipe (see metaopt list)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    run.add_argument("--out", help="run directory (default: runs/RECIPE)")
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    run.add_argument("--seed", type=int)
    run.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    run.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                     help="multi-process runs: how long a rank waits for the others before naming the lost one")
    chk = sub.add_parser("check", help="every hypergradient method against finite differences")
    chk.add_argument("recipe", nargs="?", help="a recipe's tiny instance (see metaopt list)")
    chk.add_argument("--objective", metavar="MODULE:FUNCTION",
                     help="your own problem: FUNCTION() returns (objective, optimizer, hyper, steps)")
    chk.add_argument("--json", metavar="PATH", help="also write the rows here")
    show = sub.add_parser("show", help="summary of a finished or interrupted run")
    show.add_argument("dir")
    demo = sub.add_parser("demo", help="hypergradient table and a short moons distillation")
    demo.add_argument("--outer-steps", type=int, default=30, help="distillation steps after the table")
    demo.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out, err = Console(), Console(stderr=True)
    from .run.checkpoint import CheckpointError
    from .run.config import ConfigError
    from .run.distributed import RankLost
    from .run.runner import Interrupted, RunStopped

    try:
        if args.command == "list":
            return cmd_list(out)
        if args.command == "run":
            return cmd_run(args, out, err)
        if args.command == "show":
            return cmd_show(Path(args.dir), out)
        if args.command == "check":
            return cmd_check(args, out)
        if args.outer_steps < 0:
            raise UsageError(f"--outer-steps must be >= 0, got {args.outer_steps}")
        return cmd_demo(args.outer_steps, args.seed, out)
    except (UsageError, ConfigError, CheckpointError) as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except RunStopped as e:
        err.print(f"[bold red]stopped:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return EXIT_STOPPED
    except RankLost as e:
        err.print(f"[bold red]lost a rank:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return EXIT_LOST
    except Interrupted as e:
        err.print(f"[yellow]{escape(str(e))}[/]", highlight=False, soft_wrap=True)
        return EXIT_INTERRUPTED


def cmd_list(out: Console) -> int:
    from .run.recipe import recipes

    table = Table(title="metaopt recipes")
    for col in ("recipe", "description", "presets"):
        table.add_column(col)
    for name, r in sorted(recipes().items()):
        table.add_row(name, r.description, ", ".join(r.presets) or "-")
    out.print(table)
    return 0


def cmd_run(args: argparse.Namespace, out: Console, err: Console) -> int:
    """``metaopt run``: :func:`metaopt.run.launch` with a progress bar and a closing line on rank 0."""
    from .run.launch import launch, ranks

    kw = dict(preset=args.preset, config=args.config, overrides=args.set, out=args.out, device=args.device,
              seed=args.seed, resume=args.resume, timeout=args.timeout,
              log=lambda m: err.print(m, highlight=False, soft_wrap=True, markup=False))
    rank, size = ranks()
    if rank != 0:  # the other ranks keep quiet: rank 0 shows the progress and the result
        launch(args.recipe, **kw)
        return 0
    with _Progress(out) as progress:
        st = launch(args.recipe, progress=progress, **kw)
    final = st.evals[-1] if st.evals else {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k != "step")
    where = args.out or Path("runs") / args.recipe
    out.print(f"done: {st.step} outer steps in {st.seconds:.1f} s{f' on {size} ranks' if size > 1 else ''}; "
              f"{shown}; results in {where}/", highlight=False, soft_wrap=True)
    return 0


class _Progress:
    """A rich progress bar with the live outer loss on a terminal (started at the first step); plain
    log lines otherwise."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar: Any = None

    def __enter__(self) -> Any:
        def update(st: Any, row: dict[str, Any], total: int) -> None:
            if self.bar is None and self.console.is_terminal:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.bar = Progress(TextColumn("[bold]outer"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=self.console)
                self.bar.start()
                self.task = self.bar.add_task("outer", total=total, completed=st.step - 1, loss="-")
            if self.bar is not None:
                self.bar.update(self.task, completed=st.step, loss=f"{row['loss']:.4f}")
            elif st.step % max(1, total // 20) == 0 or st.step == total:
                self.console.print(f"outer step {st.step}/{total}  loss {row['loss']:.4f}", highlight=False)

        return update

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def cmd_check(args: argparse.Namespace, out: Console) -> int:
    import torch

    from .hypergrad import check
    from .run.launch import load_objective
    from .run.recipe import get

    if (args.recipe is None) == (args.objective is None):
        raise UsageError("metaopt check: give a RECIPE or --objective MODULE:FUNCTION (one of them)")
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # finite differences need float64; set before the problem is built
    if args.recipe is not None:
        recipe = get(args.recipe)
        if recipe.check is None:
            raise UsageError(f"recipe {args.recipe!r} ships no check instance")
        title = f"recipe {args.recipe}"
        objective, optimizer, hyper, steps = recipe.check()
    else:
        title = args.objective
        objective, optimizer, hyper, steps = load_objective(args.objective)
    rows = check(objective, optimizer, hyper, steps)
    print_check(out, rows, f"hypergradient check: {title}, {steps} inner steps, float64")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def print_check(out: Console, rows: list[dict[str, Any]], title: str) -> None:
    """The rows of :func:`metaopt.hypergrad.check` as a table; why a method did not apply, below it."""
    table = Table(title=title)
    for col in ("method", "rel. err. vs FD", "cos to exact", "seconds", "stored"):
        table.add_column(col, justify="left" if col == "method" else "right")
    notes = []
    for r in rows:
        if "error" in r:
            table.add_row(r["method"], "[red]n/a[/]", "-", "-", "-")
            notes.append(f"{r['method']}: {r['error']}")
        else:
            table.add_row(r["method"], f"{r['rel_error']:.1e}", f"{r['cosine']:.6f}", f"{r['seconds']:.3f}",
                          f"{r['peak_bytes'] / 1024:,.0f} KiB")
    out.print(table)
    for note in notes:
        out.print(note, highlight=False, soft_wrap=True, markup=False)


def cmd_demo(outer_steps: int, seed: int, out: Console) -> int:
    import torch

    from .hypergrad import check
    from .recipes.demo import demo_methods, demo_problem, distil

    torch.set_num_threads(1)
    obj, opt, hyper, n = demo_problem(seed)
    rows = check(obj, opt, hyper, n, methods=demo_methods(n), seed=seed + 1)
    print_check(out, rows, f"dF/dh, moons distillation: 2-layer MLP x 3, n = {n} SGD steps, float64")
    before, after = distil(outer_steps, seed)
    out.print(f"distilled {outer_steps} outer steps: 80 synthetic points, {n} inner steps; test accuracy of fresh "
              f"models trained on them: {before:.3f} -> [bold]{after:.3f}[/bold]")
    return 0


def cmd_show(run_dir: Path, out: Console) -> int:
    from .run.launch import read_run

    info = read_run(run_dir)
    table = Table(title=f"run {run_dir}")
    table.add_column("item")
    table.add_column("value", justify="right")
    if info.status == "finished":
        rows = [("status", "finished"), ("recipe", info.recipe), ("outer steps", str(info.steps)),
                ("seconds", f"{info.seconds:.1f}"), ("final outer loss", f"{info.loss:.6g}")]
        rows += [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in info.final.items()]
    else:
        rows = [("status", "interrupted (continue with --resume)" if info.steps else "not started"),
                ("outer steps", f"{info.steps} of {'?' if info.total is None else info.total}")]
        rows += [("last outer loss", f"{info.loss:.6g}")] if info.steps else []
    for row in rows:
        table.add_row(*row)
    out.print(table)
    if info.report:  # the recipe's own tables (e.g. distill)
        from rich.markdown import Markdown

        out.print(Markdown(info.report))
    for f in info.figures:
        out.print(f"figure: {f}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
