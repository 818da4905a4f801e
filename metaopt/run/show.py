"""What ``metaopt show`` does, from Python: :func:`read_run` reads a run directory back from its
machine-readable files (``config.toml``, ``metrics.json``, ``metrics.jsonl``; never the markdown
summary), and reads what it can of a damaged one, saying what it could not in ``RunInfo.problems``.

    from metaopt.run import read_run

    info = read_run("runs/demo")  # status, steps, final metrics, the recipe's results, figures
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError
from .rundir import LOCK, holder

__all__ = ["RunInfo", "read_run"]

RUN_FILES = ("config.toml", "metrics.json", "metrics.jsonl", "checkpoint.pt")


@dataclass
class RunInfo:
    """A run directory as :func:`read_run` finds it (what ``metaopt show`` prints)."""

    dir: Path
    status: str  # "finished", "running", "interrupted" or "not started"
    steps: int  # outer steps done
    total: int | None  # outer.steps of its config (None if the config lacks it)
    loss: float | None  # the final outer loss (finished) or the last one logged
    config: dict[str, Any] = field(default_factory=dict)  # config.toml
    recipe: str | None = None  # finished runs: the recipe's name
    seconds: float | None = None  # finished runs: the outer loop's seconds
    final: dict[str, Any] = field(default_factory=dict)  # finished runs: the last evaluation
    results: dict[str, Any] | None = None  # the recipe's report (metrics.json "results"), if any
    report: str = ""  # the recipe's own tables as markdown (metrics.json "report"), if any
    figures: list[Path] = field(default_factory=list)  # finished runs: figure paths (under ``dir``)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per outer step so far
    problems: list[str] = field(default_factory=list)  # what could not be read, one phrase per file
    pid: int | None = None  # a running run: the process that holds the directory's lock

    @property
    def useful(self) -> bool:
        """Whether anything was read: a config, a step, or a finished run's summary."""
        return bool(self.config or self.steps or self.recipe or self.history)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _read_config(path: Path, problems: list[str]) -> dict[str, Any]:
    if not path.is_file():
        problems.append("config.toml is missing")
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        problems.append(f"config.toml is unreadable ({' '.join(str(e).split())})")
        return {}


def _read_summary(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """metrics.json as a dict, or None (missing, unreadable, or not a JSON object)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problems.append(f"metrics.json is unreadable ({' '.join(str(e).split())})")
        return None
    if not isinstance(data, dict):
        problems.append(f"metrics.json holds a {type(data).__name__}, not a run's summary")
        return None
    return data


def _read_jsonl(path: Path, problems: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(step rows, eval rows)`` of metrics.jsonl; unreadable lines (a half-written last line, garbage) skipped."""
    if not path.is_file():
        return [], []
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        problems.append(f"metrics.jsonl is unreadable ({e.strerror or e})")
        return [], []
    steps, evals, bad = [], [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad.append(i)
            continue
        if isinstance(row, dict) and isinstance(row.get("eval"), dict):
            evals.append(row["eval"])
        elif isinstance(row, dict) and isinstance(row.get("step"), int) and _number(row.get("loss")):
            steps.append(row)
        else:
            bad.append(i)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        problems.append(f"metrics.jsonl: {len(bad)} unreadable line{'s' * (len(bad) > 1)} skipped (line {shown})")
    return steps, evals


def read_run(dir: str | Path) -> RunInfo:
    """Read the run directory ``dir`` of a finished (``metrics.json``) or interrupted (``metrics.jsonl``
    so far) run. What is damaged (an unreadable or truncated file, missing fields, garbage lines) is
    skipped and named in ``problems``; a directory with none of a run's files is a :class:`ConfigError`."""
    run_dir = Path(dir)
    if not run_dir.is_dir() or not any((run_dir / f).exists() for f in RUN_FILES):
        raise ConfigError(f"{str(run_dir)!r} is not a metaopt run directory (no config.toml or metrics)")
    problems: list[str] = []
    config = _read_config(run_dir / "config.toml", problems)
    outer = config.get("outer")
    total = outer.get("steps") if isinstance(outer, dict) else None
    if config and not isinstance(total, int):
        problems.append("config.toml lacks outer.steps")
        total = None
    summary = _read_summary(run_dir / "metrics.json", problems)
    rows, evals = _read_jsonl(run_dir / "metrics.jsonl", problems)
    if summary is not None:
        return _finished(run_dir, summary, config, total, rows, evals, problems)
    last = rows[-1] if rows else None
    pid = running(run_dir)
    status = "running" if pid is not None else "interrupted" if rows else "not started"
    return RunInfo(run_dir, status, last["step"] if last else 0, total,
                   last["loss"] if last else None, config, final=evals[-1] if evals else {}, history=rows,
                   problems=problems, pid=pid)


def running(run_dir: Path) -> int | None:
    """The pid of the run holding ``run_dir`` now (its lock file names a live process on this host),
    else ``None``; read-only: the lock itself is not probed, so a starting run is never disturbed.
    A killed run's lock file names a dead process."""
    if not (run_dir / LOCK).exists():
        return None
    info = holder(run_dir)
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("host") not in (None, socket.gethostname()):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return pid
    return pid


def _finished(run_dir: Path, summary: dict[str, Any], config: dict[str, Any], total: int | None,
              rows: list[dict[str, Any]], evals: list[dict[str, Any]], problems: list[str]) -> RunInfo:
    """A finished run from metrics.json, field by field: a missing or mistyped field is a problem, and
    the history and last evaluation come from metrics.jsonl where metrics.json lacks them."""
    def of(kind: type) -> Any:
        return lambda x: isinstance(x, kind) and not isinstance(x, bool)

    kinds = {"recipe": of(str), "steps": of(int), "seconds": _number, "final_loss": _number, "final": of(dict),
             "history": of(list), "results": of(dict), "report": of(str), "figures": of(list)}
    got: dict[str, Any] = {}
    missing = []
    for key, ok in kinds.items():
        value = summary.get(key)
        if ok(value):
            got[key] = value
        elif key not in ("results", "report") and not (key == "final_loss" and value is None and "steps" in got):
            missing.append(key)
    if missing:
        problems.append(f"metrics.json lacks {', '.join(missing)}")
    history = [r for r in got.get("history", rows) if isinstance(r, dict) and _number(r.get("loss"))]
    loss = got.get("final_loss", history[-1]["loss"] if history else None)
    steps = got.get("steps", history[-1].get("step", len(history)) if history else 0)
    final = got.get("final", evals[-1] if evals else {})
    figures = [run_dir / f for f in got.get("figures", []) if isinstance(f, str)]
    return RunInfo(run_dir, "finished", steps if isinstance(steps, int) else 0, total, loss, config,
                   recipe=got.get("recipe"), seconds=got.get("seconds"), final=final, results=got.get("results"),
                   report=got.get("report", ""), figures=figures, history=history, problems=problems)
