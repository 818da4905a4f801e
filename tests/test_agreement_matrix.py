"""The agreement matrix (issue 21): every registered method x optimizer x kind of hyperparameter x
module kind x dtype agrees with its method's reference, refuses before computing with a one-line
error, or is documented as not applicable (the cells, references and tolerances: ``tests/matrix.py``).

The default run samples ``matrix.SAMPLES_PER_METHOD`` cells per registered method with a fixed seed
(every optimizer and every kind of hyperparameter once per method); ``METAOPT_FULL_MATRIX=1`` runs
every cell (``pytest -m matrix`` selects the matrix's tests). ``tools/agreement_table.py`` runs the
whole matrix and writes its table into docs/choosing-a-method.md; the last test here checks that
table against the cells this run measured.
"""

from __future__ import annotations

import os
from pathlib import Path

import matrix as M
import pytest
import torch

from metaopt import hypergrad as hg

FULL = os.environ.get("METAOPT_FULL_MATRIX") == "1"
CELLS = M.all_cells() if FULL else M.sampled_cells()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "choosing-a-method.md"


def describe(out: M.Outcome) -> str:
    e = M.expect(out.cell)
    got = f"{out.status}" + (f" (rel. error {out.error:.3g}, tolerance {out.tol:g})" if out.error is not None else "")
    return (f"{out.cell.id}: {got}; allowed: {', '.join(sorted(e.allowed))}" + (f" ({e.why})" if e.why else "")
            + (f"; {out.message}" if out.message else ""))


@pytest.mark.matrix
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_cell_agrees_with_its_reference_or_refuses(cell):
    out = M.run_cell(cell)
    assert out.passed, describe(out)


@pytest.mark.matrix
def test_the_sample_covers_every_method_optimizer_kind_module_and_dtype():
    """Each registered method with an applicable cell is sampled under every optimizer and every
    kind of hyperparameter, and the sample as a whole spans every module kind and dtype; methods
    left out have no applicable cell at all (their reason is in the table)."""
    cells = M.sampled_cells()
    for name in hg.registered():
        mine = [c for c in cells if c.method == name]
        if not mine:
            assert not any(M.expect(c).applicable for c in M.all_cells() if c.method == name), name
            continue
        assert len(mine) == M.SAMPLES_PER_METHOD, name
        assert {c.optimizer for c in mine} == set(M.OPTIMIZERS) and {c.hyper for c in mine} == set(M.HYPERS), name
        assert all(M.expect(c).applicable for c in mine), name
    assert {c.module for c in cells} == set(M.MODULES)
    assert {c.dtype for c in cells} == set(M.DTYPES)
    assert cells == M.sampled_cells()  # a fixed seed: the same cells every run


@pytest.mark.matrix
@pytest.mark.parametrize("optimizer,kind,module", [("sgd", "learn_decay", "mlp"), ("adamw", "per_param", "conv"),
                                                   ("nesterov", "schedule", "conv"), ("adam", "const_decay", "mlp")])
def test_the_stationary_reference_is_the_derivative_of_the_re_solved_problem(optimizer, kind, module):
    """The stationary reference (IFT at the Newton-solved fixed point) against five-point
    differences of ``F`` with the fixed point re-solved at each ``h``: the reference is not the
    method's own arithmetic restated."""
    ref = M.stationary_reference(optimizer, kind, module)
    assert ref.grads.norm() > 0
    assert M.stationary_fd_error(optimizer, kind, module) < 1e-8


@pytest.mark.matrix
def test_the_references_are_not_vacuous():
    """Off its own problem a reference disagrees: the full unroll of another optimizer, the
    stationary point without the decay, the float64 reference against a perturbed problem."""
    a = M.full_reference("sgd", "learn_decay", "mlp")
    b = M.full_reference("momentum", "learn_decay", "mlp")
    assert M.rel_error(a, b) > 100 * M.RTOL_FLOAT32
    with_decay = M.stationary_reference("sgd", "const_decay", "mlp").grads
    without = M.stationary_reference("sgd", "none", "mlp").grads
    assert M.rel_error(with_decay, without) > 100 * M.RTOL_STATIONARY_FLOAT32  # 3e-2


@pytest.mark.matrix
def test_expected_refusals_match_what_methods_say_of_themselves():
    """Where a method's own ``skip_reason`` rules an optimizer out, the matrix allows a refusal (or
    calls the cell not applicable), and where the matrix demands agreement, ``skip_reason`` does not
    object; reversible learning's refusals are exactly the optimizers it says it cannot reverse."""
    for name in hg.registered():
        method = M.make_method(name)
        for opt in M.OPTIMIZERS:
            for kind in M.HYPERS:
                cell = M.Cell(name, opt, kind, "mlp", "float64")
                why = method.skip_reason(M.make_optimizer(opt, kind), 4)
                allowed = M.expect(cell).allowed
                if why is not None:
                    assert "refuses" in allowed or not allowed, (cell.id, why)
                if allowed == M.AGREE:
                    assert why is None, (cell.id, why)
                if name == "reversible":
                    assert (why is not None) == (allowed == M.REFUSE), (cell.id, why)


def test_the_table_helpers_round_trip():
    """``render`` and ``parse``/``documented`` agree on every kind of entry."""
    cells = [M.Cell("full", "sgd", h, "mlp", d) for h in M.HYPERS for d in M.DTYPES]
    outs = []
    for c in cells:
        if c.hyper == "per_param":
            outs.append(M.Outcome(c, "refuses", message="no per-parameter rates, use one of x"))
        elif c.hyper == "schedule" and c.dtype == "float32":
            outs.append(M.Outcome(c, "fails", error=0.25))
        else:
            outs.append(M.Outcome(c, "agrees", error=2.1e-12 if c.dtype == "float64" else 3.3e-7))
    table = M.parse(M.render(outs))
    text = table[("mlp", "full", "sgd")]
    for o in outs:
        status, bound = M.documented(text, o.cell)
        assert status == o.status, (o.cell.id, text)
        if status == "agrees":
            assert o.error <= bound <= 10 * o.error
    assert M.up(2.1e-12) == "3e-12" and M.up(9.5e-7) == "1e-6" and M.up(1e-3) == "1e-3"


def test_the_docs_table_lists_every_method_and_optimizer_and_matches_the_measured_cells():
    """docs/choosing-a-method.md's matrix has a row for every registered method and a column for
    every optimizer in every module's table, and for each cell this run measured it says what the
    cell did: the same status and, for an agreeing cell, an error bound at most 10x off (the
    table is regenerated by ``python tools/agreement_table.py``)."""
    table = M.parse(DOCS.read_text())
    expected = {(mod, m, o) for mod in M.MODULES for m in hg.registered() for o in M.OPTIMIZERS}
    assert set(table) == expected, "rerun tools/agreement_table.py: the registry or the optimizers changed"
    stale = []
    for cell in CELLS:
        out = M.run_cell(cell)
        status, bound = M.documented(table[(cell.module, cell.method, cell.optimizer)], cell)
        measured = {"error": "fails"}.get(out.status, out.status)
        if status != measured:
            stale.append(f"{cell.id}: docs say {status}, measured {out.status}")
        elif status == "agrees" and out.error > 10 * max(bound, 1e-16):
            stale.append(f"{cell.id}: docs say <= {bound:g}, measured {out.error:.3g}")
    assert not stale, "docs/choosing-a-method.md is stale (python tools/agreement_table.py):\n" + "\n".join(stale)


def test_float32_cells_run_in_float32():
    """A float32 cell's problem, params and hyperparameters are float32 (not a float64 run relabelled)."""
    obj, _, h = M.setup(M.Cell("full", "adam", "per_param", "conv", "float32"))
    params = obj.init_params(h, torch.Generator().manual_seed(0))
    assert {t.dtype for t in [*params.values(), *h.values(), obj.x, obj.y]} == {torch.float32}
