"""Helpers for the tests that kill a running ``metaopt run`` and resume it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def steps_logged(path: Path) -> int:
    """Outer steps written to a run's ``metrics.jsonl`` so far (0 before the file exists)."""
    if not path.is_file():
        return 0
    return sum(1 for x in path.read_text().splitlines() if x.startswith('{"step"'))


def wait_for_steps(proc: subprocess.Popen, out: Path, steps: int, timeout: float) -> None:
    """Poll until the run writing into ``out`` has logged ``steps`` outer steps, it ended, or
    ``timeout`` seconds passed (the caller asserts which)."""
    deadline = time.time() + timeout
    while steps_logged(out / "metrics.jsonl") < steps and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
