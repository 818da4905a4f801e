"""Peak memory of the trajectory policies on a larger inner problem: a digits MLP 64-256-256-10
trained for n = 1000 momentum-SGD steps (momentum 0.9, minibatches of 64), hypergradient w.r.t. one
learning rate per step and a per-parameter weight decay.

For each method it reports metaopt's metered trajectory bytes (``HypergradResult.peak_bytes``) and
the growth of the process's peak resident memory during the call, each method in a fresh process
(so freed memory from one method cannot hide another's peak), plus the time and the hypergradient's
agreement with the full unroll.

    python benchmarks/memory.py --json memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from digits_hpo import DigitsSchedule, hyper_for

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim

METHODS = {
    "full": hg.Full(),
    "checkpointed": hg.Checkpointed(),  # every = ceil(sqrt(n))
    "truncated-100": hg.Truncated(100),
    "reversible": hg.Reversible(),
    "drmad": hg.DrMAD(),
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def probe(method: str, steps: int) -> dict:
    """One method in this (fresh) process: peak RSS growth during the call."""
    torch.set_num_threads(1)
    obj = DigitsSchedule(steps)
    hyper = hyper_for(obj)
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so the peak below is this call's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    gen = torch.Generator().manual_seed(1)
    res = metaopt.hypergradient(obj, optim.momentum(momentum=0.9), hyper, steps, method=METHODS[method], generator=gen)
    peak = _status_kb("VmHWM") - base
    grads = torch.cat([g.reshape(-1) for g in res.grads.values()])
    return {
        "method": method,
        "n": steps,
        "trajectory_mb": res.peak_bytes / 2**20,
        "rss_peak_mb": peak / 1024,
        "seconds": res.seconds,
        "loss": float(res.loss),
        "grads": grads.tolist(),
        "buffer_bytes_per_step": res.extras.get("buffer_bytes", 0) / steps,
        "buffer_bits_per_element_step": res.extras.get("buffer_bits_per_element_step", 0.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--json")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.steps)))
        return
    rows = []
    for method in METHODS:
        out = subprocess.run(
            [sys.executable, __file__, "--probe", method, "--steps", str(args.steps)],
            capture_output=True, text=True, check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = torch.tensor(rows[0]["grads"])
    print(f"digits MLP 64-256-256-10, n = {args.steps} momentum-SGD steps, batch 64, float32, 1 thread")
    print("| method | trajectory MB | peak RSS growth MB | vs full (trajectory) | s | max rel. diff to full |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        g = torch.tensor(r.pop("grads"))
        diff = float((g - full).abs().max() / full.abs().max())
        r["max_rel_diff_to_full"] = diff
        print(
            f"| {r['method']} | {r['trajectory_mb']:.1f} | {r['rss_peak_mb']:.1f} | "
            f"{r['trajectory_mb'] / rows[0]['trajectory_mb']:.3f} | {r['seconds']:.1f} | {diff:.1e} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
