"""The `metaopt` command line and the shared runner, end to end in subprocesses."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import steps_logged, wait_for_steps

SMOKE = ["run", "demo", "--preset", "smoke"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "metaopt", *args], capture_output=True, text=True, timeout=timeout)


def test_list_run_show(tmp_path):
    listed = cli("list")
    assert listed.returncode == 0 and "demo" in listed.stdout and "smoke" in listed.stdout
    out = tmp_path / "run"
    ran = cli(*SMOKE, "--out", str(out))
    assert ran.returncode == 0, ran.stderr
    for name in ("config.toml", "metrics.jsonl", "metrics.json", "checkpoint.pt", "summary.md",
                 "figures/outer_loss.png", "figures/distilled.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 60 and len(summary["history"]) == 60
    assert summary["final"]["test_accuracy"] > 0.7  # distilled points train fresh models
    assert "seed = 0" in (out / "config.toml").read_text()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "step" in r] == list(range(1, 61))
    shown = cli("show", str(out))
    assert shown.returncode == 0 and "finished" in shown.stdout and "test_accuracy" in shown.stdout
    assert "outer_loss.png" in shown.stdout
    again = cli(*SMOKE, "--out", str(out))
    assert again.returncode == 2 and "already holds a run" in again.stderr


BAD = [
    (["run", "demox"], "unknown recipe 'demox'; did you mean 'demo'?"),
    ([*SMOKE, "--set", "outer.stpes=3"], "did you mean 'steps'?"),
    ([*SMOKE, "--set", "outer.steps=abc"], "outer.steps = 'abc' must be an integer"),
    ([*SMOKE, "--set", "outer.steps=-1"], "outer.steps = -1 must be >= 1"),
    ([*SMOKE, "--set", "method.name=reversed"],
     "method.name = 'reversed' is not a hypergradient method; use one of full"),
    ([*SMOKE, "--set", "inner.method=full"],
     'inner.method is gone: the hypergradient method is the [method] table now: write [method] name = "full"'),
    ([*SMOKE, "--set", "steps"], "use key=value"),
    (["run", "demo", "--preset", "smok"], "no preset 'smok'; did you mean 'smoke'?"),
    (["run", "demo", "--config", "/nonexistent/cfg.toml"], "config file '/nonexistent/cfg.toml' does not exist"),
    ([*SMOKE, "--out", "/proc/metaopt-run"], "cannot write to --out '/proc/metaopt-run'"),
    ([*SMOKE, "--device", "cuda"], "CUDA is not available"),
    (["show", "/nonexistent"], "is not a metaopt run directory"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[-2:]) for a, _ in BAD])
def test_bad_input_exits_2_with_a_message(args, message, tmp_path):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "--out" not in args and args[0] == "run":
        args = [*args, "--out", str(tmp_path / "r")]
    res = cli(*args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in " ".join(res.stderr.split()), res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 2


def test_bad_toml_and_unknown_table(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[outer\nsteps = 3\n")
    res = cli("run", "demo", "--config", str(cfg), "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "is not valid TOML" in res.stderr
    cfg.write_text("[outr]\nsteps = 3\n")
    res = cli("run", "demo", "--config", str(cfg), "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "unknown setting 'outr'; did you mean 'outer'?" in res.stderr


def _final_state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)["state"]


LONG = [*SMOKE, "--set", "outer.steps=240", "--set", "outer.checkpoint_every=5", "--set", "outer.eval_every=40"]


def test_killed_run_resumes_bit_for_bit(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert cli(*LONG, "--out", str(ref)).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "metaopt", *LONG, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_steps(proc, out, 23, 120)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = steps_logged(out / "metrics.jsonl")
    assert 0 < _final_state(out)["step"] < 240 and killed_at < 240
    resumed = cli(*LONG, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _final_state(ref), _final_state(out)
    assert a["step"] == b["step"] == 240
    for k in a["hyper"]:
        assert torch.equal(a["hyper"][k], b["hyper"][k]), k
    for slot in a["meta_state"]:
        for k in a["meta_state"][slot]:
            assert torch.equal(a["meta_state"][slot][k], b["meta_state"][slot][k])
    assert _untimed(a["history"]) == _untimed(b["history"]) and a["evals"] == b["evals"]
    assert torch.equal(a["generator_state"], b["generator_state"])
    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, out)]
    assert _untimed(lines[0]) == _untimed(lines[1])


def _untimed(rows: list) -> list:
    """Rows without their wall-clock fields (everything else must match bit for bit)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_sigterm_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "metaopt", *LONG, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, out, 7, 120)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "continue with --resume" in err
    state = _final_state(out)
    assert state["step"] == steps_logged(out / "metrics.jsonl") < 240
    shown = cli("show", str(out))
    assert "interrupted" in shown.stdout
    assert cli(*LONG, "--out", str(out), "--resume").returncode == 0
    assert _final_state(out)["step"] == 240


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    out = tmp_path / "r"
    assert cli(*SMOKE, "--set", "outer.steps=5", "--out", str(out)).returncode == 0
    other = cli(*SMOKE, "--set", "outer.steps=7", "--out", str(out), "--resume")
    assert other.returncode == 2 and "config differs from the checkpoint's in ['outer']" in other.stderr
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    bad = cli(*SMOKE, "--set", "outer.steps=5", "--out", str(out), "--resume")
    assert bad.returncode == 2 and "is corrupt or not a checkpoint" in bad.stderr
    none = cli(*SMOKE, "--out", str(tmp_path / "empty"), "--resume")
    assert none.returncode == 2 and "no checkpoint at" in none.stderr


def test_launch_from_python_is_metaopt_run(tmp_path):
    from metaopt.run import ConfigError, launch, read_run
    from metaopt.run.launch import resolve_config
    from metaopt.run.recipe import get

    args = ["--set", "outer.steps=6", "--set", "outer.eval_every=3", "--set", "inner.eval_inits=2"]
    overrides = args[1::2]
    logs, seen = [], []
    st = launch("demo", preset="smoke", overrides=overrides, out=tmp_path / "py", log=logs.append,
                progress=lambda state, row, total: seen.append((state.step, total)))
    assert st.step == 6 and seen == [(i, 6) for i in range(1, 7)]
    info = read_run(tmp_path / "py")
    assert info.status == "finished" and info.recipe == "demo" and info.steps == info.total == 6
    assert info.final["step"] == 6 and 0 <= info.final["test_accuracy"] <= 1 and len(info.history) == 6
    assert {f.name for f in info.figures} == {"outer_loss.png", "distilled.png"}
    assert all(f.is_file() for f in info.figures)
    assert info.config["outer"]["steps"] == 6 and info.results is None and info.report == ""
    ran = cli(*SMOKE, *args, "--out", str(tmp_path / "cli"))
    assert ran.returncode == 0, ran.stderr
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("py", "cli"))
    assert _untimed(a["history"]) == _untimed(b["history"]) and a["evals"] == b["evals"] and a["final"] == b["final"]
    assert (tmp_path / "py" / "config.toml").read_text() == (tmp_path / "cli" / "config.toml").read_text()
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        launch(get("demo"), preset="smoke", out=tmp_path / "py")
    with pytest.raises(ConfigError, match="unknown recipe 'demox'; did you mean 'demo'"):
        launch("demox")
    cfg, cfg_dict = resolve_config(get("demo"), preset="smoke", config={"outer": {"steps": 7}}, overrides=["seed=3"],
                                   seed=5)
    assert cfg.outer.steps == 7 and cfg.seed == 5 and cfg_dict["outer"]["meta_lr"] == 0.05
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.toml").write_text("[outer]\nsteps = 9\n")
    fresh = read_run(tmp_path / "fresh")
    assert (fresh.status, fresh.steps, fresh.total, fresh.loss) == ("not started", 0, 9, None)
