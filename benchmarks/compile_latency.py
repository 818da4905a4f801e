"""Compile latency of the seed workload: seconds of the first compiled outer step, cold and warm cache.

For each architecture and compiled block length, three fresh processes: the first starts with nothing
cached (a new ``TORCHINDUCTOR_CACHE_DIR``, and a new ``TMPDIR``, where inductor precompiles its C++
header once per machine and user: dynamo traces, inductor precompiles the header, generates and
compiles C++); the second with an empty inductor cache but that header kept (the usual cold start:
any earlier compile on the machine made it); the third finds the first's compiled kernels and graphs
(warm: dynamo traces again, the FX-graph and AOTAutograd caches skip code generation and the C++
compiler). Each process reports the seconds of its first ``hypergradient(..., compile=True)`` (the
compile included) and the median of the next few (the steady state).

    python benchmarks/compile_latency.py --json benchmarks/results/compile_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ARCHS = {"1-layer": [2, 1], "2-layer": [2, 10, 1], "4-layer": [2, 10, 10, 10, 1]}

CHILD = """
import statistics, sys, time, torch, metaopt
from metaopt import optim
from metaopt.recipes.demo import MoonsDistillation
torch.set_num_threads(1)
sizes, block, reps = eval(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
obj = MoonsDistillation(sizes, restarts=1, members=3, steps_per_epoch=40, epochs=5)
hyper, opt, gen = obj.init_hyper(torch.Generator().manual_seed(0), lr=0.02), optim.sgd(), torch.Generator()
times = []
for _ in range(1 + reps):
    t0 = time.perf_counter()
    metaopt.hypergradient(obj, opt, hyper, obj.steps, generator=gen, compile=True, compile_block=block or None)
    times.append(time.perf_counter() - t0)
print(times[0], statistics.median(times[1:]))
"""


def first_step(sizes: list[int], block: int, cache: str, tmp: str, reps: int) -> tuple[float, float]:
    # inductor keeps its precompiled C++ header under the temporary directory, not under the cache
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TMPDIR": tmp}
    out = subprocess.run([sys.executable, "-c", CHILD, repr(sizes), str(block), str(reps)], env=env,
                         capture_output=True, text=True, check=True)
    first, steady = out.stdout.split()[-2:]
    return float(first), float(steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--block", nargs="+", type=int, default=[0, 1, 5],
                    help="compile_block values (0: the default, metaopt.hypergrad.inner.default_block)")
    ap.add_argument("--reps", type=int, default=3, help="steady-state steps after the first")
    ap.add_argument("--json", help="write rows {arch, block, cold_s, header_s, warm_s, steady_s} here")
    args = ap.parse_args()
    rows = []
    print("| arch | compile_block | first step, nothing cached (s) | cold cache, header precompiled (s) "
          "| warm cache (s) | later steps (s) |")
    print("|---|---|---|---|---|---|")
    for arch in args.arch:
        for block in args.block:
            with tempfile.TemporaryDirectory() as tmp:
                cache, other = os.path.join(tmp, "cache"), os.path.join(tmp, "other")
                cold, _ = first_step(ARCHS[arch], block, cache, tmp, args.reps)  # builds the header too
                header, _ = first_step(ARCHS[arch], block, other, tmp, args.reps)  # empty cache, header kept
                warm, steady = first_step(ARCHS[arch], block, cache, tmp, args.reps)
            rows.append({"arch": arch, "block": block, "cold_s": cold, "header_s": header, "warm_s": warm,
                         "steady_s": steady})
            print(f"| {arch} | {block} | {cold:.1f} | {header:.1f} | {warm:.1f} | {steady:.4f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
