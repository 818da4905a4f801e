"""Do two revisions give the same results? Runs ``metaopt run RECIPE --preset NAME [--set ...]`` on
the working tree and on ``--base`` (a temporary git worktree, its own package on ``PYTHONPATH``) and
compares the ``metrics.json`` files with every timing removed (keys named ``seconds``, ``elapsed``,
``*_seconds``, ``seconds_per_*`` and the curves of wall time). A refactor must print ``same`` for every run.

    python tools/same_results.py --base 1d3762c "distill smoke" "hpo smoke" "structure smoke --set outer.steps=3"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("seconds", "elapsed", "curve", "report_seconds", "wall")


def timing(key: str) -> bool:
    return key in TIMING or key.endswith("_seconds") or key.startswith("seconds_") or key == "figures"


def strip(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if not timing(k)}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where ``a`` and ``b`` differ (NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def run(tree: Path, spec: str, out: Path, pythonpath: bool) -> dict:
    """One run on ``tree``: its package first on ``PYTHONPATH`` (the base), or the installed one (the
    working tree, installed editable: its entry points and package data are the installed ones)."""
    recipe, preset, *rest = shlex.split(spec)
    env = {**os.environ, "PYTHONPATH": str(tree)} if pythonpath else dict(os.environ)
    cmd = [sys.executable, "-m", "metaopt", "run", recipe, "--preset", preset, "--out", str(out), *rest]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the revision to compare the working tree with")
    ap.add_argument("runs", nargs="+", help='"RECIPE PRESET [--set key=value ...]"')
    args = ap.parse_args()
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=ROOT, check=True)
        try:
            for i, spec in enumerate(args.runs):
                old = strip(run(base, spec, Path(tmp) / f"old{i}", True))
                new = strip(run(ROOT, spec, Path(tmp) / f"new{i}", False))
                found = diff(old, new)
                bad += bool(found)
                print(f"{spec}: " + ("same" if not found else f"{len(found)} differences, e.g. {found[:3]}"),
                      flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
