"""A killed run resumed with ``--resume`` ends bit for bit where an uninterrupted one does, for every
recipe's smoke preset and every stateful method: the runner checkpoints the method's state (HOAG's
tolerance schedule and warm starts, random truncation's generator) with the rest.

The kill is simulated in-process (the run stops between two checkpoints, its task and runner are
then built afresh from the config, as a new process would); one hpo run is killed for real with
SIGKILL."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import wait_for_steps

import metaopt.hypergrad as hg
from metaopt.run import Runner, Task
from metaopt.run.launch import resolve_config
from metaopt.run.recipe import get

QUICK = ["outer.steps=4", "outer.checkpoint_every=2", "outer.eval_every=3"]
DISTILL = ["distill.compile=false", "distill.restarts=1", "distill.rows=[\"1-layer\", \"all\"]",
           "distill.archs=[\"1-layer\", \"2-layer\"]", "eval.inits=1", "eval.epochs=2", "eval.strategies=[\"raw\"]",
           "eval.baseline_epochs=1", "eval.baseline_inits=1", "eval.baseline_optimizers=[\"adam\"]",
           "eval.random_real_runs=1", "eval.random_real_lrs=[0.1]", "eval.quick_inits=1"]
HPO = ["l2.compare=[\"full\"]", "l2.greedy=false", "l2.eval_steps=50", "l2.eval_rounds=2"]
CASES = {
    # every recipe's smoke preset (shortened), its default method (demo's: tests/test_cli.py, with SIGKILL)
    "distill": ("distill", [*QUICK, *DISTILL]),
    "hpo/hoag": ("hpo", [*QUICK, *HPO]),
    "structure": ("structure", [*QUICK, "structure.sweep_prior=[]"]),
    # random truncation (a generator as state) in every recipe
    "demo/random_truncated": ("demo", [*QUICK, "inner.eval_inits=1", "method.name=random_truncated",
                                       "method.window=4"]),
    "distill/random_truncated": ("distill", [*QUICK, *DISTILL, "method.name=random_truncated", "method.window=5"]),
    "hpo/random_truncated": ("hpo", [*QUICK, *HPO, "method.name=random_truncated", "method.window=10"]),
    "structure/random_truncated": ("structure", [*QUICK, "structure.sweep_prior=[]", "method.name=random_truncated",
                                                 "method.window=5"]),
}


class Killed(Exception):
    """Raised by the test's hook to stop a run between checkpoints, as a kill would."""


def run(recipe: str, overrides: list[str], out: Path, *, stop_at: int | None = None, resume: bool = False):
    """One run in-process: a freshly built task and runner; ``stop_at``: die after that outer step
    (before its checkpoint is written, as a SIGKILL between two checkpoints would)."""
    r = get(recipe)
    cfg, cfg_dict = resolve_config(r, preset="smoke", overrides=overrides)
    runner = Runner(r, cfg, cfg_dict, r.build(cfg, torch.device("cpu")), out, log=lambda msg: None)

    def progress(st, row, total):
        if st.step == stop_at:
            raise Killed

    return runner.run(resume=resume, progress=progress)


def untimed(x):
    """``x`` without wall-clock fields (everything else must match bit for bit); metrics.json's "report"
    is the markdown of "results" (compared) with their timings in it."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items()
                if not (k in ("seconds", "elapsed", "curve", "figures", "report") or k.endswith("seconds")
                        or k.startswith("seconds_"))}
    if isinstance(x, list):
        return [untimed(v) for v in x]
    return x


def assert_same(a, b, path="state"):
    """Nested dicts/lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def final(out: Path) -> tuple[dict, dict]:
    state = torch.load(out / "checkpoint.pt", weights_only=False)["state"]
    return state, untimed(json.loads((out / "metrics.json").read_text()))


@pytest.mark.parametrize("case", list(CASES))
def test_killed_and_resumed_equals_uninterrupted(case, tmp_path):
    recipe, overrides = CASES[case]
    run(recipe, overrides, tmp_path / "ref")
    with pytest.raises(Killed):
        run(recipe, overrides, tmp_path / "killed", stop_at=3)  # last checkpoint: step 2
    saved = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["state"]
    assert saved["step"] == 2
    run(recipe, overrides, tmp_path / "killed", resume=True)
    (a, ma), (b, mb) = final(tmp_path / "ref"), final(tmp_path / "killed")
    for key in ("hyper", "meta_state", "generator_state", "task_state", "evals", "step", "updates"):
        assert_same(a[key], b[key], key)
    assert untimed(a["history"]) == untimed(b["history"])
    assert ma == mb  # metrics.json: the history, evaluations and the recipe's whole report
    if "/" in case:  # a stateful method: its state is in the checkpoint, and it moved
        assert a["task_state"]["method"] and saved["task_state"]["method"]


def test_resume_needs_the_method_state(tmp_path, monkeypatch):
    """The control: a resumed run that drops the method's state (as the runner did before) draws
    other end points than the uninterrupted run, so the test above can fail."""
    recipe, overrides = CASES["hpo/random_truncated"]
    overrides = [*overrides, "l2.compare=[]"]
    ref = run(recipe, overrides, tmp_path / "ref")
    with pytest.raises(Killed):
        run(recipe, overrides, tmp_path / "killed", stop_at=3)
    monkeypatch.setattr(Task, "load_state_dict", lambda self, state: None)
    resumed = run(recipe, overrides, tmp_path / "killed", resume=True)
    assert not all(torch.equal(ref.hyper[k], resumed.hyper[k]) for k in ref.hyper)


def test_hoag_state_round_trips():
    """HOAG's state is its call count, warm-start params and adjoint; a fresh HOAG given it continues
    exactly (the same next hypergradient)."""
    import metaopt

    class Ridge(metaopt.MetaObjective):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.X, self.Xv = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g,
                                                                                            dtype=torch.float64)
            self.y, self.yv = self.X.sum(1), self.Xv.sum(1)

        def init_params(self, hyper, generator):
            return {"w": torch.zeros(4, dtype=torch.float64)}

        def inner_loss(self, params, hyper, k, batch):
            return ((self.X @ params["w"] - self.y) ** 2).mean() + (hyper["log_lam"].exp() * params["w"] ** 2).sum()

        def outer_loss(self, params, hyper, batch):
            return ((self.Xv @ params["w"] - self.yv) ** 2).mean()

    obj, opt, steps = Ridge(), metaopt.optim.sgd(lr=0.2), 20
    hyper = {"log_lam": torch.tensor([-2.0, -1.0, 0.0, -3.0], dtype=torch.float64)}
    a = hg.HOAG(min_tol=1e-8)
    for _ in range(2):
        hg.hypergradient(obj, opt, hyper, steps, method=a)
    state = a.state_dict()
    assert state["t"] == 2 and state["params"] is not None and state["adjoint"] is not None
    b = hg.HOAG(min_tol=1e-8)
    b.load_state_dict(state)
    ra, rb = (hg.hypergradient(obj, opt, hyper, steps, method=m) for m in (a, b))
    assert all(torch.equal(ra.grads[k], rb.grads[k]) for k in ra.grads)
    assert a.t == b.t == 3
    with pytest.raises(ValueError, match="method 'full' is stateless"):
        hg.Full().load_state_dict({"t": 1})


def test_sigkilled_hpo_smoke_resumes_bit_for_bit(tmp_path):
    """hpo's default method is HOAG (stateful): the smoke preset, killed with SIGKILL mid-run."""
    args = [sys.executable, "-m", "metaopt", "run", "hpo", "--preset", "smoke", "--set", "outer.steps=12",
            "--set", "outer.checkpoint_every=2", "--set", "l2.compare=[]", "--set", "l2.greedy=false",
            "--set", "l2.eval_steps=50", "--set", "l2.eval_rounds=2"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    done = subprocess.run([*args, "--out", str(ref)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_steps(proc, out, 5, 300)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = torch.load(out / "checkpoint.pt", weights_only=False)["state"]
    assert 0 < killed["step"] < 12 and killed["task_state"]["method"]["t"] == killed["step"]
    resumed = subprocess.run([*args, "--out", str(out), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    (a, ma), (b, mb) = final(ref), final(out)
    for key in ("hyper", "meta_state", "generator_state", "task_state", "evals"):
        assert_same(a[key], b[key], key)
    assert ma == mb
