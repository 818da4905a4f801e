"""`metaopt check` in Python and from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from test_implicit import LOG_LAM, Ridge

from metaopt import hypergrad as hg
from metaopt import optim


def ridge_problem():
    """A user's problem for `metaopt check --objective test_check:ridge_problem`."""
    return Ridge(), optim.momentum(lr=0.1, momentum=0.5), {"log_lam": LOG_LAM.clone()}, 200


def test_check_reports_every_method_against_finite_differences():
    rows = {r["method"]: r for r in hg.check(*ridge_problem())}
    exact = ["full", "checkpointed", "forward", "reversible", "implicit (cg)", "implicit (neumann)"]
    for name in exact:
        assert rows[name]["rel_error"] < 1e-8, (name, rows[name])
        assert rows[name]["cosine"] > 1 - 1e-10
    assert rows["drmad"]["rel_error"] > 1e-4  # an approximation, reported as such
    assert rows["checkpointed"]["peak_bytes"] < rows["full"]["peak_bytes"]
    assert all(r["seconds"] > 0 for r in rows.values())


def test_check_cli_on_a_recipe_and_on_a_user_objective(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, "-m", "metaopt", "check", "demo", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(rows["full"]) >= {"method", "rel_error", "cosine", "seconds", "peak_bytes"}
    for name in ("full", "checkpointed", "forward", "reversible"):
        assert rows[name]["rel_error"] < 1e-8
    assert "not applicable" in rows["implicit (cg)"]["error"]  # distillation has no inner optimum
    here = str(Path(__file__).parent)
    user = subprocess.run([sys.executable, "-m", "metaopt", "check", "--objective", "test_check:ridge_problem"],
                          capture_output=True, text=True, timeout=300, cwd=here)
    assert user.returncode == 0, user.stderr
    assert "implicit (cg)" in user.stdout
    bad = subprocess.run([sys.executable, "-m", "metaopt", "check", "--objective", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "use MODULE:FUNCTION" in bad.stderr
    neither = subprocess.run([sys.executable, "-m", "metaopt", "check"], capture_output=True, text=True)
    assert neither.returncode == 2 and "give a RECIPE or --objective" in neither.stderr
    assert torch.isfinite(torch.tensor(rows["full"]["rel_error"]))
