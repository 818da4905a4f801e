"""An out-of-tree recipe (``recipes/plugin-example``), installed as its own package: ``metaopt list``
shows it and ``metaopt run`` runs its preset, found through the ``metaopt.recipes`` entry point."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "recipes" / "plugin-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The plug-in installed offline into a temporary folder (a copy of it is built, so the
    checkout stays clean); the environment that puts that folder on the path."""
    tmp = tmp_path_factory.mktemp("plugin")
    source, target = tmp / "src", tmp / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "--target", str(target), str(source)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])]))
    yield env
    shutil.rmtree(tmp, ignore_errors=True)


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "metaopt", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_plugin_is_listed_with_its_presets(installed):
    listed = cli(installed, "list")
    assert listed.returncode == 0, listed.stderr
    assert "ridge" in listed.stdout and "plug-in example" in listed.stdout
    assert "smoke, noisy" in listed.stdout  # its own TOML presets, shipped inside its package


def test_plugin_runs_its_preset(installed, tmp_path):
    out = tmp_path / "run"
    ran = cli(installed, "run", "ridge", "--preset", "smoke", "--out", str(out))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == "ridge" and metrics["steps"] == 20
    assert metrics["final"]["val_mse"] < metrics["evals"][0]["val_mse"]  # the tuned penalty helps


def test_without_the_plugin_it_is_not_there():
    listed = cli(dict(os.environ), "list")
    assert listed.returncode == 0 and "ridge" not in listed.stdout
