"""The documentation site builds: ``mkdocs build --strict`` fails on a broken link or anchor, a page
missing from the nav, an unresolved API object or a docstring that does not match its signature."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed: pip install -e '.[docs]' (the test extra has it)")
def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    site = tmp_path / "site"
    for page in ("index.html", "getting-started/index.html", "tutorials/maml/index.html", "api/hypergrad/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api/hypergrad/index.html").read_text(encoding="utf-8")
    assert 'id="metaopt.hypergrad.hypergradient"' in api and ":class:" not in api
    maml = (site / "tutorials/maml/index.html").read_text(encoding="utf-8")
    assert "SineMAML" in maml and "--8&lt;--" not in maml  # the objective's code is included from examples/
