"""The run directory is a transaction: a refused or failed start leaves it byte for byte as it was
(or absent), one run at a time holds its lock, a killed write's temporary file is removed by the
next start, a signal mid-run resumes bit for bit, and files honour the umask."""

import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from runs import assert_same_run, final_state, snapshot, steps_logged, wait_for_steps

from metaopt.cli import main
from metaopt.run import CheckpointError, ConfigError, Interrupted, launch, read_run
from metaopt.run.recipe import get
from metaopt.run.rundir import LOCK, RunDir

# the demo's smoke preset made cheap (~13 ms an outer step): one inner epoch, one evaluation init
SMOKE = ["run", "demo", "--preset", "smoke", "--set", "inner.epochs=1", "--set", "inner.eval_inits=1"]
STEPS = 150
LONG = [*SMOKE, "--set", f"outer.steps={STEPS}", "--set", "outer.checkpoint_every=5", "--set", "outer.eval_every=50"]


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "metaopt", *args], capture_output=True, text=True, timeout=timeout)


def start(*args, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metaopt", *args], stdout=subprocess.DEVNULL, stderr=stderr,
                            text=True)


def run_here(capsys, *args) -> tuple[int, str]:
    """``metaopt ARGS`` in this process (fast: no interpreter start): exit code, stderr."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return " ".join(err.split())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted LONG run, started together with a twin into the same ``--out``: the one
    that gets the lock runs, the other is refused. ``(out, [(pid, exit code, stderr)] of both)``."""
    out = tmp_path_factory.mktemp("reference") / "run"
    procs = [start(*LONG, "--out", str(out)) for _ in range(2)]
    ends = [(p.pid, p.communicate(timeout=120)[1]) for p in procs]
    return out, [(pid, p.returncode, err) for (pid, err), p in zip(ends, procs)]


def test_a_second_run_into_a_locked_out_is_refused_naming_the_holder(reference):
    out, ends = reference
    (won,) = [e for e in ends if e[1] == 0]
    (lost,) = [e for e in ends if e[1] != 0]
    assert lost[1] == 2, lost[2]
    assert (f"--out {str(out)!r} is in use by another metaopt run (pid {won[0]}" in one_line(lost[2])
            and "wait for it to end or choose another --out" in lost[2])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "step" in r] == list(range(1, STEPS + 1))  # one run's lines, once each
    assert [r["eval"]["step"] for r in rows if "eval" in r] == [50, 100, 150]
    assert final_state(out)["step"] == STEPS and not (out / LOCK).exists()  # released at the end


def _finished(tmp_path: Path, capsys) -> Path:
    """A finished 3-step run, plus what killed runs leave: a stale lock file and a temporary file."""
    out = tmp_path / "run"
    code, err = run_here(capsys, *SMOKE, "--set", "outer.steps=3", "--out", out)
    assert code == 0, err
    (out / LOCK).write_text('{"pid": 999999999, "host": "gone", "started": 0}')
    (out / ".checkpoint.pt.k1ll3d_x.tmp").write_bytes(b"half a checkpoint")
    return out


def test_a_refused_start_leaves_the_run_directory_byte_for_byte(tmp_path, capsys):
    out = _finished(tmp_path, capsys)
    before = snapshot(out)
    refused = [
        ((*SMOKE, "--set", "outer.steps=4", "--resume"), "the config differs from the checkpoint's in ['outer']"),
        (("run", "hpo", "--preset", "smoke", "--resume"), "belongs to recipe 'demo', not 'hpo'"),
        ((*SMOKE, "--set", "outer.steps=3"), "already holds a run; continue it with --resume"),
        ((*SMOKE, "--set", "outer.steps=-1", "--resume"), "outer.steps = -1 must be >= 1"),
    ]
    for args, message in refused:
        code, err = run_here(capsys, *args, "--out", out)
        assert code == 2 and message in one_line(err), (args, err)
        assert snapshot(out) == before, args  # config.toml, the stale files, their modes: all as they were
    # held by another run (here: this process), a resume is refused naming it and `show` still reads it
    held = RunDir(out).open(resume=True)
    try:
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
        code, err = run_here(capsys, *SMOKE, "--set", "outer.steps=3", "--resume", "--out", out)
        assert code == 2 and f"is in use by another metaopt run (pid {os.getpid()}" in one_line(err)
        code, _ = run_here(capsys, "show", out)
        assert code == 0
    finally:
        held.close()
    assert snapshot(out) == before  # the lock file found there got its bytes back


def test_a_failed_resume_into_a_new_directory_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    code, err = run_here(capsys, *SMOKE, "--resume", "--out", out)
    assert code == 2 and f"--resume: no checkpoint at {str(out / 'checkpoint.pt')!r}" in one_line(err)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir(mode=0o750)
    before = snapshot(tmp_path)
    code, err = run_here(capsys, *SMOKE, "--resume", "--out", tmp_path / "empty")
    assert code == 2 and "no checkpoint at" in err and snapshot(tmp_path) == before  # no lock file left


def test_a_build_that_raises_leaves_nothing(tmp_path, capsys):
    def build(cfg, device):
        raise RuntimeError("the data set is not there")

    broken = dataclasses.replace(get("demo"), build=build)
    out = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(RuntimeError, match="the data set is not there"):
        launch(broken, preset="smoke", out=out)
    assert list(tmp_path.iterdir()) == []  # the run folder and the parents it made are gone
    run = _finished(tmp_path, capsys)  # a compatible resume whose build fails: the run is untouched
    before = snapshot(run)
    with pytest.raises(RuntimeError, match="the data set is not there"):
        launch(broken, preset="smoke", overrides=["inner.epochs=1", "inner.eval_inits=1", "outer.steps=3"], out=run,
               resume=True)
    assert snapshot(run) == before
    with pytest.raises(CheckpointError, match="config differs"):  # and it is still the run it was
        launch("demo", preset="smoke", overrides=["outer.steps=3"], out=run, resume=True)


def test_a_signal_while_the_run_starts_undoes_the_start(tmp_path):
    """SIGTERM during build (before the runner handles signals): Interrupted, and nothing left."""
    def build(cfg, device):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the start")

    def unhandled(signum, frame):
        raise AssertionError("launch let SIGTERM through")

    old = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(Interrupted, match=r"interrupted \(SIGTERM\) before the run started; --out .* is as it was"):
            launch(dataclasses.replace(get("demo"), build=build), preset="smoke", out=tmp_path / "new" / "run")
        assert signal.getsignal(signal.SIGTERM) is unhandled  # given back
    finally:
        signal.signal(signal.SIGTERM, old)
    assert list(tmp_path.iterdir()) == []


def test_sigkill_during_a_checkpoint_write_leaves_a_tmp_the_resume_removes(tmp_path, reference):
    """The process kills itself in the second checkpoint's write, the temporary file written and
    fsynced but not renamed (deterministic: os.replace is wrapped)."""
    out = tmp_path / "run"
    script = ("import os, signal, sys\n"
              "from metaopt.cli import main\n"
              "replace, seen = os.replace, []\n"
              "def dying(src, dst):\n"
              "    seen.append(str(dst).endswith('checkpoint.pt'))\n"
              "    if seen[-1] and sum(seen) == 2:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return replace(src, dst)\n"
              "os.replace = dying\n"
              "sys.exit(main(sys.argv[1:]))\n")
    killed = subprocess.run([sys.executable, "-c", script, *LONG, "--out", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (tmp,) = [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert tmp.name.startswith(".checkpoint.pt.") and tmp.stat().st_size > 10_000  # the whole new checkpoint
    assert final_state(out)["step"] == 5 and steps_logged(out / "metrics.jsonl") == 10  # the first one stands
    resumed = cli(*LONG, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"removed 1 temporary file(s) a killed write left: {tmp.name}" in resumed.stderr
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")] and not (out / LOCK).exists()
    assert_same_run(reference[0], out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_mid_run_then_resume_ends_bit_for_bit(sig, tmp_path, reference):
    out = tmp_path / "run"
    proc = start(*LONG, "--out", str(out))
    wait_for_steps(proc, out, 40, 120)
    at = steps_logged(out / "metrics.jsonl")
    assert proc.poll() is None and 0 < at < STEPS, "the run ended before the signal"
    assert read_run(out).status == "running" and read_run(out).pid == proc.pid  # show: read-only, no lock
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    done = steps_logged(out / "metrics.jsonl")
    assert at <= done < STEPS  # it landed between the first step and the last
    if sig == signal.SIGTERM:  # stops after the step, checkpoints, releases the lock
        assert proc.returncode == 130 and "continue with --resume" in err
        assert final_state(out)["step"] == done and not (out / LOCK).exists()
    else:  # no goodbye: the last checkpoint stands, the lock file stays, its flock died with the process
        assert proc.returncode == -signal.SIGKILL
        assert final_state(out)["step"] <= done and (out / LOCK).exists()
        assert read_run(out).status == "interrupted"  # the lock file names a dead process
    resumed = cli(*LONG, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not (out / LOCK).exists()
    assert_same_run(reference[0], out)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_honour_the_umask(umask, file_mode, dir_mode, tmp_path):
    out = tmp_path / "parent" / "run"
    old = os.umask(umask)
    try:
        launch("demo", preset="smoke", overrides=["outer.steps=2", "inner.epochs=1", "inner.eval_inits=1"], out=out)
    finally:
        os.umask(old)
    found = {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in (tmp_path / "parent").rglob("*")}
    files = {p for p in found if (tmp_path / p).is_file()}
    assert {"config.toml", "checkpoint.pt", "metrics.jsonl", "metrics.json", "summary.md",
            "figures/outer_loss.png"} <= {str(p.relative_to("parent/run")) for p in files}
    assert {p: found[p] for p in files} == {p: file_mode for p in files}
    assert {p: m for p, m in found.items() if p not in files} == {Path("parent/run"): dir_mode,
                                                                 Path("parent/run/figures"): dir_mode}
    assert (tmp_path / "parent").stat().st_mode & 0o777 == dir_mode


def test_a_lock_file_removed_under_a_waiting_opener_is_not_trusted(tmp_path, monkeypatch):
    """The unlink race: a run that opened the lock file just before its holder removed it locks a
    removed file; it must see that and lock the file the path names now (else two runs would run)."""
    out = tmp_path / "run"
    out.mkdir()
    first = RunDir(out).open()
    flock, locked = fcntl.flock, []

    def late(fd, op):  # the holder lets go between the second run's open and its flock
        if not locked:
            first.close()
        locked.append((out / LOCK).exists())  # whether the file it is about to lock is still the path's
        return flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", late)
    second = RunDir(out).open()
    monkeypatch.undo()
    try:
        assert locked == [False, True]  # it locked the removed file, saw so, and locked the new one
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=f"in use by another metaopt run \\(pid {os.getpid()}"):
            RunDir(out).open()
    finally:
        second.close()
    assert list(out.iterdir()) == []  # nothing committed: the lock file went, the folder stays (not made here)
