"""The tutorials' command-line step: ``metaopt check --objective`` on the MAML example, from the
repository root, as docs/tutorials/check.md shows it (tests/test_docs.py runs the pages' Python)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_metaopt_check_on_the_maml_example(tmp_path):
    rows_path = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, "-m", "metaopt", "check", "--objective", "examples.maml_sine:check_problem",
                          "--json", str(rows_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "examples.maml_sine:check_problem" in res.stdout
    rows = {r["method"]: r for r in json.loads(rows_path.read_text())}
    for name in ("full", "checkpointed"):
        assert rows[name]["rel_error"] < 1e-8, rows[name]  # float64 against finite differences
        assert rows[name]["cosine"] > 1 - 1e-10
    assert rows["truncated (K=1)"]["cosine"] < 1e-6  # h is the initialisation: truncation cannot see it
    assert "not applicable" in rows["implicit (cg)"]["error"]
