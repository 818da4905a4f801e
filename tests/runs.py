"""Helpers for the tests that kill a running ``metaopt run`` and resume it."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch


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


def final_state(out: Path) -> dict:
    """The state in a run directory's ``checkpoint.pt``."""
    return torch.load(out / "checkpoint.pt", weights_only=False)["state"]


def untimed(rows: list) -> list:
    """Rows without their wall-clock fields (everything else must match bit for bit)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def assert_same_run(ref: Path, out: Path) -> None:
    """The run directories ``ref`` and ``out`` end in the same state, bit for bit: hyperparameters,
    meta-optimizer state, history, evaluations, the run's generator and every ``metrics.jsonl`` line
    (wall-clock seconds aside)."""
    a, b = final_state(ref), final_state(out)
    assert a["step"] == b["step"]
    for k in a["hyper"]:
        assert torch.equal(a["hyper"][k], b["hyper"][k]), k
    for slot in a["meta_state"]:
        for k in a["meta_state"][slot]:
            assert torch.equal(a["meta_state"][slot][k], b["meta_state"][slot][k]), (slot, k)
    assert untimed(a["history"]) == untimed(b["history"]) and a["evals"] == b["evals"]
    assert torch.equal(a["generator_state"], b["generator_state"])
    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, out)]
    assert untimed(lines[0]) == untimed(lines[1])


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]] | None:
    """Everything under ``root``: relative path -> (bytes, or None for a folder; mode), ``root`` itself as
    ``"."``; ``None`` when ``root`` does not exist."""
    if not root.exists():
        return None
    found = {".": (None, root.stat().st_mode)}
    for p in sorted(root.rglob("*")):
        found[str(p.relative_to(root))] = (None if p.is_dir() else p.read_bytes(), p.stat().st_mode)
    return found
