"""Run the whole agreement matrix (tests/matrix.py) and write its table into docs/choosing-a-method.md.

    python tools/agreement_table.py            # every cell, 2 processes; rewrites the docs section
    python tools/agreement_table.py --jobs 8   # more processes
    python tools/agreement_table.py --check    # exit 1 if the docs section differs (nothing written)
    python tools/agreement_table.py --failing  # also print every cell that fails, with its numbers
    python tools/agreement_table.py --save cells.json   # keep the outcomes; --load cells.json renders them again

The section sits between the marker comments ``matrix.START`` and ``matrix.END`` at the end of the
page (appended the first time). Cells are run in groups that share a reference (same optimizer,
kind of hyperparameter and module), one group per task, in float64 default dtype and one thread per
process, as the tests run them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import matrix as M  # noqa: E402
import torch  # noqa: E402

DOCS = ROOT / "docs" / "choosing-a-method.md"
HEADING = "## The agreement matrix"
INTRO = f"""{HEADING}

Every registered method, under every optimizer (`sgd`, `momentum`, `nesterov`, `adam`, `adamw`),
five kinds of hyperparameter (**none**: a learnable learning rate and inner L2 penalty, no weight
decay; **const**: plus a constant weight decay; **learn**: the weight decay learnable too, given
through `hparams`; **per-param**: a learning rate and a decay per parameter, as dicts; **sched**: a
learnable per-step learning-rate table, `schedule.table`), four module kinds and both float dtypes,
{M.STEPS} inner steps on {M.SAMPLES} points. Each cell is compared with its method's reference:
the full unroll for the unrolled methods (`full` itself against five-point central differences);
for the implicit methods and HOAG, the implicit function theorem at the optimizer's fixed point,
solved by Newton's method and checked against finite differences of the re-solved problem. The test
is `tests/test_agreement_matrix.py` (cells and references in `tests/matrix.py`; it samples
{M.SAMPLES_PER_METHOD} cells per method, `METAOPT_FULL_MATRIX=1` runs them all), and this section is
written by `python tools/agreement_table.py`.

An entry reads: **✓ a / b**: agrees in every kind of hyperparameter listed nowhere else in the
entry, with the largest relative error `‖g − g_ref‖ / ‖g_ref‖` measured in float64 (a) and float32
(b), rounded up; **refuses (Rk)**: raises a one-line `ValueError`/`TypeError` before the first inner
step (the message below), for the kinds listed; **n/a (Nk)**: not applicable (why below);
**✗ kind/dtype: e**: a failing cell, a silently wrong hypergradient (relative error e) or an error.
Tolerances (the test's): {M.RTOL_EXACT:g} for the exact unrolled methods against `full` in float64,
{M.RTOL_FD:g} for `full` against finite differences, {M.RTOL_STATIONARY:g} for the implicit methods
(inner and linear tolerance 1e-12), {M.RTOL_FLOAT32:g} for float32 cells against the float64
reference ({M.RTOL_STATIONARY_FLOAT32:g} for the implicit ones). The zero-order `es` and `pes` are
Monte Carlo estimates compared with `full`: within {M.SMOOTHED_K:g} of their own standard errors
(`‖g − g_ref‖ <= {M.SMOOTHED_K:g} ‖se‖`, at most {M.RTOL_SMOOTHED_MAX:g} relative), so their entries
are statistical errors (a fixed seed: reproducible), not round-off.
"""


def run_group(cells: list[M.Cell]) -> list[M.Outcome]:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    out = []
    for cell in cells:
        try:
            out.append(M.run_cell(cell))
        except Exception as exc:  # noqa: BLE001 (a reference that could not be built: shown as an error)
            out.append(M.Outcome(cell, "error", message=f"reference: {type(exc).__name__}: {exc}"[:300]))
    return out


def section(outcomes: list[M.Outcome]) -> str:
    return INTRO + "\n" + M.render(outcomes) + "\n"


def write(text: str, new: str) -> str:
    """``text`` with its agreement-matrix section (from the heading to the end marker) replaced by
    ``new``, or ``new`` appended."""
    if M.START in text and M.END in text:
        start = text.rfind(HEADING, 0, text.index(M.START))
        start = text.index(M.START) if start < 0 else start
        return text[:start] + new.rstrip("\n") + text[text.index(M.END) + len(M.END):]
    return text.rstrip("\n") + "\n\n" + new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="compare with the docs instead of writing them")
    parser.add_argument("--failing", action="store_true", help="print the failing cells")
    parser.add_argument("--save", type=Path, help="write the outcomes to this JSON file")
    parser.add_argument("--load", type=Path, help="render the outcomes of this JSON file instead of running")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.load:
        outcomes = [M.Outcome(M.Cell(**r["cell"]), r["status"], r["error"], r["message"], r["tol"])
                    for r in json.loads(args.load.read_text())]
    else:
        groups: dict[tuple[str, str, str], list[M.Cell]] = {}
        for cell in M.all_cells():
            groups.setdefault((cell.optimizer, cell.hyper, cell.module), []).append(cell)
        with Pool(args.jobs) as pool:
            outcomes = [o for part in pool.imap_unordered(run_group, list(groups.values())) for o in part]
    if args.save:
        rows = [{"cell": vars(o.cell), "status": o.status, "error": o.error, "message": o.message, "tol": o.tol}
                for o in outcomes]
        args.save.write_text(json.dumps(rows))
    order = {c: i for i, c in enumerate(M.all_cells())}
    outcomes.sort(key=lambda o: order[o.cell])
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    print(f"{len(outcomes)} cells in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if args.failing:
        for o in outcomes:
            if not o.passed:
                err = f" rel. error {o.error:.3g}" if o.error is not None else ""
                print(f"FAIL {o.cell.id}: {o.status}{err} {o.message}")
    text = DOCS.read_text()
    new = write(text, section(outcomes))
    if args.check:
        if new != text:
            print("docs/choosing-a-method.md: the agreement matrix is stale (run tools/agreement_table.py)")
            return 1
        return 0
    DOCS.write_text(new)
    print(f"wrote {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
