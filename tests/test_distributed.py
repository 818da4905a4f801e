"""Multi-process runs with torch.distributed (gloo, 2 processes on localhost, started by torchrun):
the all-reduced hypergradient equals the single-process one, ensemble- and restart-parallel runs
write the single process's results, and a lost rank stops the run naming it."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from metaopt import hypergradient, optim
from metaopt.run import checkpoint
from metaopt.run.distributed import World, block, deal

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(*args, timeout=300, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT, **kw)


def metaopt(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "metaopt", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)


def test_deal_and_block_cover_every_item_once():
    for n in (1, 5, 8):
        for size in (1, 2, 3):
            assert sorted(i for r in range(size) for i in deal(n, r, size)) == list(range(n))
            blocks = [list(block(n, r, size)) for r in range(size)]
            assert sum(blocks, []) == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert World().all_reduce_sum({"a": torch.ones(2)})["a"].tolist() == [1.0, 1.0]
    assert World().map(lambda x: x * 2, [1, 2]) == [2, 4]


def test_to_device_reaches_into_dataclasses_and_named_tuples():
    from typing import NamedTuple

    from metaopt.recipes.distill.evaluate import Curves
    from metaopt.run.distributed import to_device

    class Pair(NamedTuple):
        a: torch.Tensor
        b: int

    x = torch.ones(2, dtype=torch.float64)
    moved = to_device({"c": Curves({"m": x}, {"m": x}, {"m": {"w": x}}), "p": Pair(x, 3), "l": [x, (x,)]}, "meta")
    assert moved["c"].params["m"]["w"].device.type == "meta" and moved["c"].accuracy["m"].is_meta
    assert isinstance(moved["p"], Pair) and moved["p"].a.is_meta and moved["p"].b == 3
    assert moved["l"][1][0].is_meta and x.device.type == "cpu"


def test_shares_of_an_ensemble_add_up_to_the_whole():
    """Any split of the members (within and across distillations) gives the whole loss and
    hypergradient, because every share draws the whole problem's random numbers."""
    from metaopt.hypergrad import Full
    from metaopt.models import MLP
    from metaopt.recipes.distill.data import moons
    from metaopt.recipes.distill.objective import Distillation
    from metaopt.recipes.hpo.data import table
    from metaopt.recipes.hpo.objective import LearnedSchedule

    data, models = moons(), {"1-layer": MLP([2, 1], "tanh"), "2-layer": MLP([2, 6, 1], "tanh")}

    def problem(hold=None):
        return Distillation(data, models, {"2-layer": ["2-layer"] * 2, "all": ["1-layer", "2-layer"]}, restarts=2,
                            steps_per_epoch=3, epochs=2, per_class=2, batch=16, labels="soft", dtype=torch.float64,
                            hold=hold)

    split = table("breast_cancer", (0.5, 0.25, 0.25), 0)
    schedules = lambda hold=None: LearnedSchedule(split, [8], 5, 6, 32, hold=hold)  # noqa: E731
    for make, opt, parts in [
        (problem, optim.momentum(momentum=0.9), [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (problem, optim.momentum(momentum=0.9), [[0, 2, 5], [1, 3, 4, 6, 7]]),
        (schedules, optim.momentum(momentum=0.5), [[0, 1], [2, 3, 4]]),
    ]:
        whole = make()
        hyper = (whole.init_hyper(torch.Generator().manual_seed(0), lr=0.2) if isinstance(whole, Distillation)
                 else whole.init_hyper(0.05, 0.5))
        ref = hypergradient(whole, opt, hyper, whole.steps, method=Full(), generator=torch.Generator().manual_seed(1))
        got = [hypergradient(make(p), opt, hyper, whole.steps, method=Full(),
                             generator=torch.Generator().manual_seed(1))
               for p in parts]
        assert abs(sum(float(r.loss) for r in got) - float(ref.loss)) < 1e-12
        for k, g in ref.grads.items():
            assert float(g.abs().max()) > 0
            torch.testing.assert_close(sum(r.grads[k] for r in got), g, rtol=1e-10, atol=1e-14)


def test_all_reduced_hypergradient_equals_the_single_process_one(tmp_path):
    out = tmp_path / "grads.json"
    res = torchrun(str(ROOT / "tests" / "dist_hypergrad.py"), str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert 0 < got["held"] < got["members"]  # rank 0 held only part of the ensemble
    from metaopt.models import MLP
    from metaopt.recipes.distill.data import moons
    from metaopt.recipes.distill.objective import Distillation

    whole = Distillation(moons(), {"1-layer": MLP([2, 1], "tanh"), "2-layer": MLP([2, 6, 1], "tanh")},
                         {"2-layer": ["2-layer"] * 3, "all": ["1-layer", "2-layer"]}, restarts=2, steps_per_epoch=3,
                         epochs=2, per_class=2, batch=16, labels="soft", dtype=torch.float64)
    hyper = whole.init_hyper(torch.Generator().manual_seed(0), lr=0.2)
    ref = hypergradient(whole, optim.momentum(momentum=0.9), hyper, whole.steps, method="full",
                        generator=torch.Generator().manual_seed(1))
    assert abs(got["loss"][0] - float(ref.loss)) < 1e-6 * abs(float(ref.loss))
    for k, g in ref.grads.items():
        mine = torch.tensor(got[k], dtype=torch.float64)
        assert float((mine - g).norm() / g.norm()) < 1e-6, k


def test_a_busy_rank_is_waited_for_a_stuck_or_failed_one_is_named():
    """Liveness, not a fixed timeout: a trial three timeouts long (Python at work) is waited for; a
    rank blocked in one call longer than the timeout, or one that raised, is named by the other."""
    script, t = str(ROOT / "tests" / "dist_liveness.py"), "2"
    busy = torchrun(script, "busy", t, timeout=120)
    assert busy.returncode == 0, busy.stdout + busy.stderr[-3000:]
    assert busy.stdout.count("got [0, 1]") == 2
    t0 = time.time()
    stuck = torchrun(script, "stuck", t, timeout=120)
    assert stuck.returncode != 0 and time.time() - t0 < 60
    assert "rank 0 stopped" in stuck.stdout and "lost rank 1 (no heartbeat: dead, stopped or stuck" in stuck.stdout
    failed = torchrun(script, "fail", t, timeout=120)
    assert failed.returncode != 0
    assert "lost rank 1 failed: ValueError: trial 1 diverged" in failed.stdout, failed.stdout


def _run_dir_results(run):
    m = json.loads((run / "metrics.json").read_text())
    return [r["loss"] for r in m["history"]], m["evals"], m.get("results")


def test_ensemble_parallel_run_matches_one_process_and_resumes(tmp_path):
    """The demo recipe (one distillation, its members split over 2 ranks): the same outer losses and
    evaluations as one process; a run stopped half-way and resumed on 2 ranks ends the same."""
    args = ["run", "demo", "--preset", "smoke", "--set", "outer.steps=12", "--set", "outer.eval_every=6",
            "--set", "outer.checkpoint_every=3", "--timeout", "60"]
    one = metaopt(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("-m", "metaopt", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "each computes its share of the ensemble" in two.stderr
    loss1, ev1, _ = _run_dir_results(tmp_path / "one")
    loss2, ev2, _ = _run_dir_results(tmp_path / "two")
    assert len(loss1) == 12
    assert max(abs(a - b) for a, b in zip(loss1, loss2)) < 1e-4  # float32: only the summation order differs
    assert [e["step"] for e in ev1] == [e["step"] for e in ev2]
    assert max(abs(a["test_accuracy"] - b["test_accuracy"]) for a, b in zip(ev1, ev2)) < 1e-3
    # stop at step 6 (a run of 6 steps), then resume it to 12 on 2 ranks
    short = [a if a != "outer.steps=12" else "outer.steps=6" for a in args]
    assert torchrun("-m", "metaopt", *short, "--out", str(tmp_path / "half")).returncode == 0
    cfg = (tmp_path / "half" / "config.toml").read_text().replace("steps = 6", "steps = 12", 1)
    (tmp_path / "half" / "config.toml").write_text(cfg)
    blob = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=False)
    blob["config"]["outer"]["steps"] = 12  # the same run, now asked for 12 steps
    torch.save(blob, tmp_path / "half" / "checkpoint.pt")
    shutil.copytree(tmp_path / "half", tmp_path / "half-on-one")
    res = torchrun("-m", "metaopt", *args, "--out", str(tmp_path / "half"), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming demo at outer step 6 of 12" in res.stderr
    loss3, _, _ = _run_dir_results(tmp_path / "half")
    assert max(abs(a - b) for a, b in zip(loss1, loss3)) < 1e-4
    # the state does not depend on the world size: the 2-rank checkpoint resumes in one process too
    res = metaopt(*args, "--out", str(tmp_path / "half-on-one"), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    loss4, _, _ = _run_dir_results(tmp_path / "half-on-one")
    assert max(abs(a - b) for a, b in zip(loss1, loss4)) < 1e-4


def _tables(run):
    text = (run / "summary.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [ln for ln in lines if "seconds" not in ln]


def test_restart_parallel_smoke_writes_the_same_table(tmp_path):
    """The structure recipe's seeds and sweep points dealt to 2 ranks: the same tables as one process."""
    args = ["run", "structure", "--preset", "smoke", "--set", "structure.seeds=3", "--set",
            "structure.sweep_prior=[0.1, 1.0, 10.0]", "--timeout", "60"]
    one = metaopt(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("-m", "metaopt", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    t1, t2 = _tables(tmp_path / "one"), _tables(tmp_path / "two")
    assert len(t1) > 8 and t1 == t2
    r1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["results"]
    r2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["results"]
    assert [p["value"] for p in r2["sweep_prior"]] == [0.1, 1.0, 10.0]
    assert r1["seeds"]["picks"] == r2["seeds"]["picks"]
    for a, b in zip(r1["sweep_prior"], r2["sweep_prior"]):
        assert abs(a["elbo"] - b["elbo"]) <= 1e-9 * abs(a["elbo"])
    assert not (tmp_path / "two" / "figures").exists() or any((tmp_path / "two" / "figures").iterdir())


def test_distillation_on_two_ranks_gives_the_one_process_table(tmp_path):
    """The distill recipe: architecture groups on the ranks (ensemble-parallel), the report's parts
    dealt to them (restart-parallel); every row but the multi-architecture one (members on both
    ranks) identical, figures written from the gathered results."""
    args = ["run", "distill", "--preset", "smoke", "--set", "outer.steps=6", "--set", "outer.eval_every=3",
            "--set", "distill.compile=false", "--set", "eval.epochs=4", "--timeout", "60"]
    one = metaopt(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("-m", "metaopt", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["results"]
    r2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["results"]
    assert r2["ranks"] == 2 and r1["full_data"] == r2["full_data"] and r1["random_real"] == r2["random_real"]
    for strategy, rows in r1["table"].items():
        for row, cells in rows.items():
            for arch, cell in cells.items():
                other = r2["table"][strategy][row][arch]["mean"]
                assert abs(cell["mean"] - other) <= (0.02 if row == "all" else 0.0), (strategy, row, arch)
    figures = json.loads((tmp_path / "two" / "metrics.json").read_text())["figures"]
    assert "figures/decision_boundaries.png" in figures and (tmp_path / "two" / "figures" / "curves.png").exists()


def _rank_pid(rank, marker):
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env, cmd = (d / "environ").read_bytes().split(b"\0"), (d / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and marker.encode() in cmd and b"torch.distributed.run" not in cmd:
            return int(d.name)
    return None


@pytest.mark.skipif(not pathlib.Path("/proc/self/environ").exists(), reason="finds the rank's process in /proc")
@pytest.mark.parametrize("how, victim", [("killed", 1), ("hung", 1), ("killed", 0)])
def test_a_lost_rank_stops_the_run_naming_it(tmp_path, how, victim):
    """A rank killed (SIGKILL) or hung (SIGSTOP) mid-run: the other stops within the timeout with a
    message naming it, the run exits non-zero, and the last checkpoint loads."""
    out, timeout = tmp_path / "run", 5
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "metaopt",
           "run", "demo", "--preset", "smoke", "--out", str(out), "--set", "outer.steps=100000",
           "--set", "outer.checkpoint_every=5", "--set", "outer.eval_every=1000", "--timeout", str(timeout)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").exists()
                                              and len((out / "metrics.jsonl").read_text().splitlines()) >= 12):
            time.sleep(0.1)
        pid = _rank_pid(victim, str(out))
        assert pid is not None, f"rank {victim} not found"
        t0 = time.time()
        os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        lines = []
        for line in proc.stdout:  # rank 0's message arrives before torchrun tears the rest down
            lines.append(line)
            if "lost a rank" in line:
                elapsed = time.time() - t0
                break
        else:
            pytest.fail("no 'lost a rank' message:\n" + "".join(lines[-40:]))
        assert elapsed < timeout + 10, elapsed
        assert f"lost rank {victim} (no heartbeat: dead, stopped or stuck" in line, line
        assert "--resume" in line
        if how == "killed":
            proc.communicate(timeout=60)
            assert proc.returncode != 0
    finally:  # the workers run in sessions of their own: a stopped rank must be killed by its pid
        for rank in (0, 1):
            left = _rank_pid(rank, str(out))
            if left is not None:
                os.kill(left, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    state = checkpoint.load(out / "checkpoint.pt", "demo", json.loads(json.dumps(
        torch.load(out / "checkpoint.pt", weights_only=False)["config"])))
    assert state["step"] >= 10 and state["step"] % 5 == 0


def test_single_process_flags_and_errors(tmp_path):
    res = metaopt("run", "demo", "--preset", "smoke", "--timeout", "0", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "--timeout = 0 must be > 0" in res.stderr
    res = torchrun("-m", "metaopt", "run", "demo", "--preset", "smoke", "--set", "inner.members=1",
                   "--out", str(tmp_path / "r2"))
    assert res.returncode != 0 and "2 ranks for inner.members = 1" in res.stderr


