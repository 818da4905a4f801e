"""Run N generated bad inputs through the real ``metaopt`` command (one subprocess each) and count
what the suite's in-process fuzz test (tests/test_fuzz_cli.py) cannot see: tracebacks, exit codes
other than 2, more than one line on stderr, and changed run directories.

    python tools/fuzz_cli.py --n 200 --jobs 4 [--seed 0] [--against DIR]

``--against DIR`` runs the command from DIR (``python -m metaopt`` imports the metaopt found
there first: a worktree of an older commit gives the before/after figures).

The inputs are drawn by the test's own Hypothesis strategies, so they come from the config schema.
Prints a table of outcomes and every failure; exits 1 if any.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import hypothesis  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from runs import snapshot  # noqa: E402
from test_fuzz_cli import Bad, bad_argument, bad_setting, malformed, not_utf8, unknown_key  # noqa: E402


def draw(n: int, seed: int) -> list[tuple[Bad, str]]:
    """``n`` (bad input, run directory kind) pairs, reproducibly."""
    found: list[tuple[Bad, str]] = []

    @settings(max_examples=n, database=None, deadline=None)
    @given(bad=st.one_of(bad_setting(), bad_setting(), unknown_key(), malformed(), not_utf8(), bad_argument()),
           where=st.sampled_from(["absent", "finished", "finished+resume"]))
    def collect(bad: Bad, where: str) -> None:
        if len(found) < n:
            found.append((bad, where))

    hypothesis.seed(seed)(collect)()
    return found


def one(i: int, bad: Bad, where: str, finished: Path, scratch: Path, cwd: Path | None, limit: float
        ) -> tuple[str, str]:
    """Run one input; ``(outcome, detail)``."""
    work = scratch / f"x{i}"
    work.mkdir()
    argv, out, name = bad.prepare(where, finished, work)
    before = snapshot(out)
    try:
        res = subprocess.run([sys.executable, "-m", "metaopt", *argv], capture_output=True, text=True,
                             timeout=limit, cwd=cwd)
    except subprocess.TimeoutExpired:  # the bad value was accepted and a run started
        return f"accepted: still running after {limit:g} s", str(argv)
    err = res.stderr.strip()
    if "Traceback" in err:
        return "traceback", f"{argv}: {err[-400:]}"
    if snapshot(out) != before:
        return "directory changed", str(argv)
    if res.returncode != 2:
        return f"exit {res.returncode}", f"{argv}: {err}"
    if len(err.splitlines()) != 1:
        return "not one line", f"{argv}: {err}"
    if name not in err:
        return "does not name it", f"{argv}: {err}"
    return "exit 2, one line, untouched", ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=float, default=60.0, help="seconds before an input counts as accepted")
    p.add_argument("--against", type=Path, help="run the command from this folder (another checkout)")
    args = p.parse_args()
    inputs = draw(args.n, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        finished = scratch / "finished"
        subprocess.run([sys.executable, "-m", "metaopt", "run", "demo", "--preset", "smoke", "--set", "outer.steps=2",
                        "--out", str(finished)], check=True, capture_output=True, cwd=args.against)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda t: one(t[0], *t[1], finished, scratch, args.against, args.limit),
                                    enumerate(inputs)))
    counts = Counter(r for r, _ in results)
    print(f"{len(results)} generated bad inputs through `python -m metaopt` ({args.against or 'this checkout'}):")
    for outcome, n in counts.most_common():
        print(f"  {n:4d}  {outcome}")
    failures = [d for r, d in results if d]
    for d in failures:
        print("FAIL", d)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
