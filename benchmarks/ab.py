"""A/B timing of two revisions of metaopt, interleaved: is a change slower?

Checks out ``--base`` (default ``HEAD~1``) into a temporary git worktree, then runs
``benchmarks/distill_step.py --no-memory`` (each revision's own copy, its own package on
``PYTHONPATH``) alternately for the base and the working tree, ``--rounds`` times, each in a fresh
process, so machine noise hits both alike. Reports, per configuration, the median over rounds of
each revision's per-round median and the ratio new / base (> 1: the change is slower).

    python benchmarks/ab.py --base 1d3762c --rounds 4 --impl metaopt metaopt-compiled --members 3 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tree: Path, args: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    where = subprocess.run([sys.executable, "-c", "import metaopt; print(metaopt.__file__)"], env=env, cwd=tree,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: imports metaopt from {where}, not from the tree")
    cmd = [sys.executable, str(tree / "benchmarks" / "distill_step.py"), "--no-memory", "--json", str(out), *args]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD~1", help="the revision to compare the working tree with")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", help="write rows {impl, arch, m, base, new, ratio} here")
    args, rest = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=ROOT, check=True)
        try:
            times: dict[tuple, dict[str, list[float]]] = {}
            for r in range(args.rounds):
                for label, tree in (("base", base), ("new", ROOT)):
                    for row in run(tree, rest, Path(tmp) / f"{label}{r}.json"):
                        key = (row["impl"], row["arch"], row["m"])
                        times.setdefault(key, {"base": [], "new": []})[label].append(row["sec_per_step"])
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    rows = []
    print(f"| impl | arch | m | base s/step | new s/step | new / base |  (median of {args.rounds} interleaved rounds)")
    print("|---|---|---|---|---|---|")
    for (impl, arch, m), t in times.items():
        b, n = statistics.median(t["base"]), statistics.median(t["new"])
        rows.append({"impl": impl, "arch": arch, "m": m, "base": b, "new": n, "ratio": n / b})
        print(f"| {impl} | {arch} | {m} | {b:.4f} | {n:.4f} | {n / b:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
