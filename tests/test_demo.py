import subprocess
import sys


def test_demo_prints_the_hypergradient_table():
    out = subprocess.run(
        [sys.executable, "-m", "metaopt", "demo", "--outer-steps", "2"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    for name in ("full unroll", "checkpointed", "forward mode", "test accuracy"):
        assert name in out.stdout
    cmd = [sys.executable, "-m", "metaopt", "demo", "--outer-steps", "-1"]
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and "--outer-steps must be >= 0" in bad.stderr
