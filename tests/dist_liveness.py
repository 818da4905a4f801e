"""Run under ``torchrun`` with 2 ranks: ``MODE TIMEOUT``. Rank 1's trial of a ``World.map`` is
``busy`` (Python work for 3 timeouts: it must be waited for), ``stuck`` (blocked in one call: it
must be named) or ``fail`` (raises: rank 0 must quote its error). See test_distributed.py."""

import signal
import sys
import time

from metaopt.run.distributed import World

mode, timeout = sys.argv[1], float(sys.argv[2])
world = World.init("cpu", timeout=timeout)
if world.rank == 0:  # the observer outlives torchrun's SIGTERM, as metaopt's runner does, to report
    signal.signal(signal.SIGTERM, lambda *_: None)


def trial(i: int) -> int:
    if i == 1 and mode == "busy":
        t0 = time.time()
        while time.time() - t0 < 3 * timeout:
            sum(range(1000))
    if i == 1 and mode == "stuck":
        time.sleep(1000)
    if i == 1 and mode == "fail":
        raise ValueError("trial 1 diverged")
    return i * i


try:
    print(f"rank {world.rank} got {world.map(trial, [0, 1])}", flush=True)
except Exception as e:
    world.fail(f"{type(e).__name__}: {e}")
    print(f"rank {world.rank} stopped: {e}", flush=True)
    sys.exit(4)
world.close()
