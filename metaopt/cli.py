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
import difflib
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


def resolve_config(recipe: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Defaults <- preset <- --config file <- --set overrides <- --seed, validated into the dataclass."""
    from .run.config import from_dict, load_toml, merge, parse_override, to_dict

    data: dict[str, Any] = {}
    if args.preset:
        if args.preset not in recipe.presets:
            hint = _close(args.preset, recipe.presets)
            raise UsageError(f"recipe {recipe.name!r} has no preset {args.preset!r}{hint}")
        data = merge(data, dict(recipe.presets[args.preset]))
    if args.config:
        data = merge(data, load_toml(args.config))
    for text in args.set:
        data = merge(data, parse_override(text, recipe.config))
    if args.seed is not None:
        data["seed"] = args.seed
    cfg = from_dict(recipe.config, data)
    return cfg, to_dict(cfg)


def _close(name: str, options: Any) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; choose one of {', '.join(sorted(options)) or '(none)'}"


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out or Path("runs") / args.recipe)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        why = e.strerror or e
        raise UsageError(f"cannot write to --out {str(out)!r}: {why}; choose a writable directory") from None
    if not args.resume and (out / "checkpoint.pt").exists():
        raise UsageError(f"{str(out)!r} already holds a run; continue it with --resume, or choose another --out")
    return out


def cmd_run(args: argparse.Namespace, out: Console, err: Console) -> int:
    import torch

    from .run.distributed import World
    from .run.recipe import recipes

    found = recipes()
    if args.recipe not in found:
        raise UsageError(f"unknown recipe {args.recipe!r}{_close(args.recipe, found)} (see metaopt list)")
    recipe = found[args.recipe]
    cfg, cfg_dict = resolve_config(recipe, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if args.timeout <= 0:
        raise UsageError(f"--timeout = {args.timeout:g} must be > 0 seconds")
    try:
        world = World.init(args.device, args.timeout)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from .run.distributed import RankLost
    from .run.runner import Interrupted

    try:
        return _run(args, recipe, cfg, cfg_dict, world, out, err)
    except (RankLost, Interrupted):
        raise  # every rank knows already
    except BaseException as e:  # tell the other ranks why this one stops, so they can say so
        world.fail(f"{type(e).__name__}: {e}")
        raise
    finally:
        world.close()


def _run(args: argparse.Namespace, recipe: Any, cfg: Any, cfg_dict: dict[str, Any], world: Any, out: Console,
         err: Console) -> int:
    from .run.runner import Runner

    problem = None
    if world.main:  # one rank checks the run directory; all of them stop on its verdict
        try:
            outdir = _out_dir(args)
        except UsageError as e:
            problem = str(e)
    problem = world.broadcast(problem, what="checking --out")
    if problem is not None:
        raise UsageError(problem)
    outdir = Path(args.out or Path("runs") / args.recipe)
    task = recipe.build(cfg, world.device)
    log = lambda m: err.print(m, highlight=False, soft_wrap=True, markup=False)
    runner = Runner(recipe, cfg, cfg_dict, task, outdir, log=log, world=world)
    if not world.main:  # the other ranks keep quiet: rank 0 shows the progress and the result
        runner.run(resume=args.resume)
        return 0
    with _Progress(out, cfg.outer.steps) as progress:
        st = runner.run(resume=args.resume, progress=progress)
    final = st.evals[-1] if st.evals else {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k != "step")
    ranks = f" on {world.size} ranks" if world.size > 1 else ""
    out.print(f"done: {st.step} outer steps in {st.seconds:.1f} s{ranks}; {shown}; results in {outdir}/",
              highlight=False, soft_wrap=True)
    return 0


class _Progress:
    """A rich progress bar with the live outer loss on a terminal; plain log lines otherwise."""

    def __init__(self, console: Console, total: int) -> None:
        self.console, self.total = console, total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]outer"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task("outer", total=self.total, loss="-")
        every = max(1, self.total // 20)

        def update(st: Any, row: dict[str, Any]) -> None:
            if self.bar is not None:
                self.bar.update(self.task, completed=st.step, loss=f"{row['loss']:.4f}")
            elif st.step % every == 0 or st.step == self.total:
                self.console.print(f"outer step {st.step}/{self.total}  loss {row['loss']:.4f}", highlight=False)

        return update

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def _load_objective(spec: str) -> Any:
    """``FUNCTION()`` of ``MODULE``, found like ``python -m`` finds modules: the current directory first."""
    import importlib
    import os

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise UsageError(f"--objective {spec!r}: use MODULE:FUNCTION, e.g. my_package.problems:ridge")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the installed `metaopt` script lacks it
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--objective {spec!r}: {e}") from None
    return factory()


def cmd_check(args: argparse.Namespace, out: Console) -> int:
    import torch

    from .hypergrad import check
    from .run.recipe import recipes

    if (args.recipe is None) == (args.objective is None):
        raise UsageError("metaopt check: give a RECIPE or --objective MODULE:FUNCTION (one of them)")
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # finite differences need float64; set before the problem is built
    if args.recipe is not None:
        found = recipes()
        if args.recipe not in found:
            raise UsageError(f"unknown recipe {args.recipe!r}{_close(args.recipe, found)} (see metaopt list)")
        if found[args.recipe].check is None:
            raise UsageError(f"recipe {args.recipe!r} ships no check instance")
        title = f"recipe {args.recipe}"
        objective, optimizer, hyper, steps = found[args.recipe].check()
    else:
        title = args.objective
        objective, optimizer, hyper, steps = _load_objective(args.objective)
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
    from .run.config import load_toml

    if not (run_dir / "config.toml").is_file():
        raise UsageError(f"{str(run_dir)!r} is not a metaopt run directory (no config.toml)")
    table = Table(title=f"run {run_dir}")
    table.add_column("item")
    table.add_column("value", justify="right")
    done = run_dir / "metrics.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        table.add_row("status", "finished")
        table.add_row("recipe", summary["recipe"])
        table.add_row("outer steps", str(summary["steps"]))
        table.add_row("seconds", f"{summary['seconds']:.1f}")
        table.add_row("final outer loss", f"{summary['final_loss']:.6g}")
        for k, v in summary["final"].items():
            table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
        figures = summary.get("figures", [])
    else:
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] if (
            run_dir / "metrics.jsonl").is_file() else []
        steps = [r for r in rows if "step" in r]
        total = load_toml(run_dir / "config.toml").get("outer", {}).get("steps", "?")
        table.add_row("status", "interrupted (continue with --resume)" if steps else "not started")
        table.add_row("outer steps", f"{steps[-1]['step'] if steps else 0} of {total}")
        if steps:
            table.add_row("last outer loss", f"{steps[-1]['loss']:.6g}")
        figures = []
    out.print(table)
    md = run_dir / "summary.md"
    if done.is_file() and "results" in summary and md.is_file():  # the recipe's own tables (e.g. distill)
        text = md.read_text(encoding="utf-8")
        start = text.find("\n## ")
        if start >= 0:
            from rich.markdown import Markdown

            out.print(Markdown(text[start + 1:]))
    for f in figures:
        out.print(f"figure: {run_dir / f}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
