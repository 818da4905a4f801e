"""``metaopt`` — run recipes from the command line.

    metaopt [--debug] [--version]
    metaopt list
    metaopt run RECIPE [--config FILE.toml] [--preset NAME] [--set key=value ...] [--out DIR]
                       [--device cpu|cuda] [--seed N] [--resume] [--timeout SECONDS]
    torchrun --nproc-per-node N -m metaopt run RECIPE ...     (several processes: docs/distributed.md)
    metaopt show DIR
    metaopt check RECIPE | --objective MODULE:FUNCTION [--json PATH]
    metaopt demo

Every failure is one line on stderr (``--debug`` adds the traceback) and an exit code: 2 for bad
input (arguments, config, an unwritable --out, a user's objective or plug-in code, naming its file and
line), 3 for a run that failed (its NaN guard stopped it, or an unexpected error, named with where it
came from), 4 for a multi-process run that lost a rank, 130 for an interrupt (Ctrl-C, SIGTERM: a run
saves a checkpoint first).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from rich.console import Console

# Only the standard library's lightest modules at import time: torch and rich are imported inside
# main(), so a Ctrl-C while they load is caught there (one line, exit 130) and --version is instant.

EXIT_USAGE, EXIT_STOPPED, EXIT_LOST, EXIT_INTERRUPTED = 2, 3, 4, 130
DEBUG_HINT = "; --debug shows the traceback"


class UsageError(Exception):
    """Bad command-line input: printed in one line, exit code 2."""


def _parser() -> Any:
    import argparse

    from . import __version__

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # argparse's own errors: one line, exit 2 (main prints it)
            raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    p = Parser(prog="metaopt", description="Hypergradients through training, for PyTorch.")
    p.add_argument("--version", action="version", version=f"metaopt {__version__}")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    debug = Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="recipes, their descriptions and presets", parents=[debug])
    run = sub.add_parser("run", help="run a recipe", parents=[debug])
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
    chk = sub.add_parser("check", help="every hypergradient method against finite differences", parents=[debug])
    chk.add_argument("recipe", nargs="?", help="a recipe's tiny instance (see metaopt list)")
    chk.add_argument("--objective", metavar="MODULE:FUNCTION",
                     help="your own problem: FUNCTION() returns (objective, optimizer, hyper, steps)")
    chk.add_argument("--json", metavar="PATH", help="also write the rows here")
    show = sub.add_parser("show", help="summary of a finished or interrupted run", parents=[debug])
    show.add_argument("dir")
    demo = sub.add_parser("demo", help="hypergradient table and a short moons distillation", parents=[debug])
    demo.add_argument("--outer-steps", type=int, default=30, help="distillation steps after the table")
    demo.add_argument("--seed", type=int, default=0)
    return p


def _tolerant_streams() -> None:
    """Characters the terminal's encoding lacks (a non-ASCII --out under LC_ALL=C) print escaped, not crash."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # replaced by a non-TextIOWrapper (pytest's capture)
            pass


def _say(kind: str, text: str, style: str = "1;31") -> None:
    """One line ``kind: text`` on stderr (``kind`` in colour on a terminal)."""
    line = " ".join(text.split())
    label = f"\x1b[{style}m{kind}:\x1b[0m" if sys.stderr.isatty() else f"{kind}:"
    print(f"{label} {line}" if kind else line, file=sys.stderr, flush=True)


def _loaded(module: str, *names: str) -> tuple[type, ...]:
    """The classes ``names`` of ``module`` if it was imported (an exception of them can only have been
    raised then): the handlers below never import torch."""
    mod = sys.modules.get(module)
    return tuple(getattr(mod, n) for n in names) if mod is not None else ()


def main(argv: list[str] | None = None) -> int:
    """The ``metaopt`` command: its exit code (0, or 2/3/4/130 with one line on stderr)."""
    import traceback
    import warnings

    _tolerant_streams()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # before the arguments are parsed (a Ctrl-C may come first)
    args: Any = None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_, **__: _say("warning", str(message), "1;33")
            args = _parser().parse_args(argv)
            debug = args.debug
            return _dispatch(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        _say("interrupted", "stopped by Ctrl-C", "33")
        return EXIT_INTERRUPTED
    except Exception as e:
        code, kind, text = _verdict(e, args)
        if debug:
            traceback.print_exc()
        elif code == EXIT_STOPPED and kind == "error":
            text += DEBUG_HINT
        _say(kind, text, "33" if code == EXIT_INTERRUPTED else "1;31")
        return code


def _verdict(e: Exception, args: Any) -> tuple[int, str, str]:
    """``(exit code, label, one-line message)`` for an exception that ended a command."""
    usage = (UsageError, *_loaded("metaopt.run.config", "ConfigError"),
             *_loaded("metaopt.run.usercode", "UserCodeError"), *_loaded("metaopt.run.checkpoint", "CheckpointError"))
    if isinstance(e, usage):
        return EXIT_USAGE, "error", str(e)
    if isinstance(e, _loaded("metaopt.run.meta", "RunStopped")):
        return EXIT_STOPPED, "stopped", str(e)
    if isinstance(e, _loaded("metaopt.run.distributed", "RankLost")):
        return EXIT_LOST, "lost a rank", str(e)
    if isinstance(e, _loaded("metaopt.run.runner", "Interrupted")):
        return EXIT_INTERRUPTED, "", str(e)
    what = {"run": "the run", "check": "the check", "demo": "the demo"}.get(getattr(args, "command", None),
                                                                         "metaopt")
    usercode = sys.modules.get("metaopt.run.usercode")  # not imported here: that would import torch
    if usercode is None:
        return EXIT_STOPPED, "error", f"{what} failed: {type(e).__name__}: {e}"
    where = usercode.origin(e)
    return EXIT_STOPPED, "error", f"{what} failed: {usercode.describe(e)}{f' (at {where})' if where else ''}"


def _dispatch(args: Any) -> int:
    from pathlib import Path

    from rich.console import Console

    out, err = Console(), Console(stderr=True)
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
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed = {args.seed} must be in [0, 2**63)")
    return cmd_demo(args.outer_steps, args.seed, out)


def _plugin(recipe: Any) -> tuple[str, list[Any]] | None:
    """``(who, where its code lives)`` of a recipe from a plug-in (its errors are the user's: exit 2),
    ``None`` for a built-in one."""
    from .run.usercode import module_roots

    module = getattr(recipe.build, "__module__", None) or type(recipe.build).__module__
    if module.split(".")[0] == __package__:
        return None
    return f"recipe plug-in {recipe.name!r}", module_roots(module)


def cmd_list(out: Console) -> int:
    """``metaopt list``: every recipe (a broken plug-in is a warning, and left out)."""
    from rich.table import Table

    from .run.config import ConfigError
    from .run.recipe import recipes

    table = Table(title="metaopt recipes")
    for col in ("recipe", "description", "presets"):
        table.add_column(col)
    for name, r in sorted(recipes().items()):
        try:
            presets = ", ".join(r.presets) or "-"
        except ConfigError as e:  # a plug-in's unreadable preset files: that recipe's problem only
            _say("warning", f"recipe {name!r}: {e}", "1;33")
            presets = "(unreadable)"
        table.add_row(name, r.description, presets)
    out.print(table)
    return 0


def cmd_run(args: argparse.Namespace, out: Console, err: Console) -> int:
    """``metaopt run``: :func:`metaopt.run.launch` with a progress bar and a closing line on rank 0; a
    plug-in recipe's exceptions name its file and line (exit 2)."""
    from pathlib import Path

    from .run.launch import launch, ranks
    from .run.recipe import get
    from .run.usercode import run_user_code

    recipe = get(args.recipe)
    plugin = _plugin(recipe)
    kw = dict(preset=args.preset, config=args.config, overrides=args.set, out=args.out, device=args.device,
              seed=args.seed, resume=args.resume, timeout=args.timeout,
              log=lambda m: err.print(m, highlight=False, soft_wrap=True, markup=False))

    def go(**more: Any) -> Any:
        return launch(recipe, **kw, **more) if plugin is None else run_user_code(*plugin, launch, recipe, **kw,
                                                                                 **more)

    rank, size = ranks()
    if rank != 0:  # the other ranks keep quiet: rank 0 shows the progress and the result
        go()
        return 0
    with _Progress(out) as progress:
        st = go(progress=progress)
    where = args.out or Path("runs") / args.recipe
    shown = "; ".join(filter(None, [_metrics(st.evals[-1] if st.evals else {}, None)]))
    out.print(f"done: {st.step} outer steps in {st.seconds:.1f} s{f' on {size} ranks' if size > 1 else ''}; "
              f"{shown + '; ' if shown else ''}results in {where}/", highlight=False, soft_wrap=True, markup=False)
    return 0


def _metrics(ev: dict[str, Any], first: int | None = 1) -> str:
    """``"test_accuracy 0.912"``: the numbers of an evaluation row (its ``first`` ones; all: None)."""
    items = [f"{k} {v:.4g}" for k, v in ev.items()
             if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)]
    return ", ".join(items[:first])


def _clock(seconds: float | None) -> str:
    """``"0:01:20"`` (``"-:--:--"`` when unknown)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(step: int, total: int, loss: float, metric: str, elapsed: float, eta: float | None) -> str:
    """The progress as one log line (when the output is not a terminal):
    ``"outer step 12/60  loss 0.1234  test_accuracy 0.912  elapsed 0:00:05  eta 0:00:20"``."""
    parts = [f"outer step {step}/{total}", f"loss {loss:.4f}", metric, f"elapsed {_clock(elapsed)}",
             f"eta {_clock(eta)}"]
    return "  ".join(p for p in parts if p)


class _Progress:
    """Progress of the outer loop: on a terminal a rich bar (started at the first step) with the live
    outer loss, the last evaluated metric, the elapsed time and the ETA; plain log lines otherwise."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar: Any = None

    def __enter__(self) -> Any:
        import time

        start: dict[str, float] = {}

        def update(st: Any, row: dict[str, Any], total: int) -> None:
            now = time.monotonic()
            if not start:  # a resumed run starts counting at its first step here
                start.update(t=now - row.get("seconds", 0.0), step=st.step - 1)
            elapsed, done = now - start["t"], st.step - start["step"]
            eta = elapsed / done * (total - st.step) if done > 0 else None
            metric = _metrics(st.evals[-1]) if st.evals else ""
            if self.bar is None and self.console.is_terminal:
                import rich.progress as rp

                text = rp.TextColumn
                self.bar = rp.Progress(text("[bold]outer"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                       text("loss {task.fields[loss]}"), text("{task.fields[metric]}"), text("elapsed"),
                                       rp.TimeElapsedColumn(), text("eta"), rp.TimeRemainingColumn(),
                                       console=self.console)
                self.bar.start()
                self.task = self.bar.add_task("outer", total=total, completed=st.step - 1, loss="-", metric="")
            if self.bar is not None:
                self.bar.update(self.task, completed=st.step, loss=f"{row['loss']:.4f}", metric=metric)
            elif st.step % max(1, total // 20) == 0 or st.step == total:
                self.console.print(progress_line(st.step, total, row["loss"], metric, elapsed, eta), highlight=False,
                                   markup=False)

        return update

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def _json_target(path: str) -> Path:
    """``--json PATH``, checked writable before the check runs (a directory or an unwritable place is
    a :class:`UsageError`); nothing is left behind by the probe."""
    from pathlib import Path

    target = Path(path)
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
        if not existed:
            target.unlink()
    except OSError as e:
        why = "it is a directory" if target.is_dir() else (e.strerror or str(e)).lower()
        raise UsageError(f"--json {path!r}: cannot write there ({why}); give a file path, e.g. check.json") from None
    return target


def cmd_check(args: argparse.Namespace, out: Console) -> int:
    """``metaopt check``: every method against finite differences on a recipe's tiny instance or on
    the user's ``--objective``, whose failures name the file and line in the user's code (exit 2)."""
    import json

    import torch

    from .hypergrad import check
    from .run.recipe import get
    from .run.usercode import UserCodeError, load_objective, module_roots, run_user_code

    if (args.recipe is None) == (args.objective is None):
        raise UsageError("metaopt check: give a RECIPE or --objective MODULE:FUNCTION (one of them)")
    target = _json_target(args.json) if args.json else None
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # finite differences need float64; set before the problem is built
    try:
        if args.recipe is not None:
            recipe = get(args.recipe)
            if recipe.check is None:
                raise UsageError(f"recipe {args.recipe!r} ships no check instance")
            title, plugin = f"recipe {args.recipe}", _plugin(recipe)
            instance = recipe.check if plugin is None else lambda: run_user_code(*plugin, recipe.check)
            objective, optimizer, hyper, steps = instance()
            rows = check(objective, optimizer, hyper, steps) if plugin is None else \
                run_user_code(*plugin, check, objective, optimizer, hyper, steps)
        else:
            title = args.objective
            objective, optimizer, hyper, steps = load_objective(args.objective)
            roots = module_roots(args.objective.partition(":")[0])
            try:
                rows = run_user_code("your objective", roots, check, objective, optimizer, hyper, steps)
            except UserCodeError as e:
                if "dtype" not in str(e.exc):
                    raise
                raise UsageError(f"{e}; metaopt check computes in float64: make your data float64") from e
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    print_check(out, rows, f"hypergradient check: {title}, {steps} inner steps, float64")
    if target is not None:
        try:
            target.write_text(json.dumps(rows, indent=1))
        except OSError as e:
            raise UsageError(f"--json {args.json!r}: cannot write there ({e.strerror or e})") from None
    return 0


def print_check(out: Console, rows: list[dict[str, Any]], title: str) -> None:
    """The rows of :func:`metaopt.hypergrad.check` as a table; why a method did not apply, below it."""
    from rich.table import Table

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
    """``metaopt show``: what the run's machine-readable files hold; of a damaged run, what can be read,
    and one line on stderr naming what could not (exit 2 only when nothing could be read)."""
    from rich.table import Table

    from .run.show import read_run

    info = read_run(run_dir)
    if not info.useful:
        raise UsageError(f"nothing readable in run directory {str(run_dir)!r}: {'; '.join(info.problems)}")

    def num(x: Any, fmt: str) -> str:
        return "?" if x is None else format(x, fmt)

    table = Table(title=f"run {run_dir}")
    table.add_column("item")
    table.add_column("value", justify="right")
    of = f" of {'?' if info.total is None else info.total}"
    if info.status == "finished":
        rows = [("status", "finished"), ("recipe", info.recipe or "?"), ("outer steps", str(info.steps)),
                ("seconds", num(info.seconds, ".1f")), ("final outer loss", num(info.loss, ".6g"))]
    else:
        status = (f"running (pid {info.pid})" if info.status == "running" else
                  "interrupted (continue with --resume)" if info.steps else "not started")
        rows = [("status", status),
                ("outer steps", f"{info.steps}{of}")]
        rows += [("last outer loss", num(info.loss, ".6g"))] if info.steps else []
    rows += [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in info.final.items()]
    for row in rows:
        table.add_row(*row)
    out.print(table)
    if info.report:  # the recipe's own tables (e.g. distill), stored as markdown in metrics.json
        from rich.markdown import Markdown

        out.print(Markdown(info.report))
    for f in info.figures:
        out.print(f"figure: {f}", highlight=False, markup=False)
    if info.problems:
        _say("warning", f"could not read all of {str(run_dir)!r}: {'; '.join(info.problems)}", "1;33")
    return 0


if __name__ == "__main__":
    sys.exit(main())
