"""The torch.optim face against torch.optim itself, in one process: ``step()`` alone and a whole
training step (forward, backward, step), per class, interleaved repeats, medians and ratios.

    python benchmarks/optim_face.py [--width 256] [--reps 7] [--iters 50] [--json out.json]

The model is an MLP 64-W-W-10 on a batch of 128 (float32, one thread); torch.optim runs with
``foreach=False`` (its per-parameter loop, the comparison the face's per-parameter update is).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from metaopt import optim

KWARGS = {"SGD": {"lr": 0.01, "momentum": 0.9}, "Adam": {"lr": 1e-3}, "AdamW": {"lr": 1e-3},
          "RMSprop": {"lr": 1e-3}, "Adagrad": {"lr": 1e-2}, "Adamax": {"lr": 2e-3}, "NAdam": {"lr": 2e-3},
          "RAdam": {"lr": 1e-3}}


def net(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def timed(fn, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = torch.randn(128, 64), torch.randn(128, 10)
    rows = []
    for name, kw in KWARGS.items():
        pair = {}
        for who, cls, extra in (("metaopt", getattr(optim, name), {}),
                                ("torch", getattr(torch.optim, name), {"foreach": False})):
            model = net(args.width)
            opt = cls(model.parameters(), **kw, **extra)

            def whole(model=model, opt=opt) -> None:
                opt.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
                opt.step()

            whole()
            pair[who] = (opt, whole)
        times = {(who, what): [] for who in pair for what in ("step", "whole")}
        for _ in range(args.reps):
            for who, (opt, whole) in pair.items():
                times[(who, "step")].append(timed(opt.step, args.iters))
                times[(who, "whole")].append(timed(whole, args.iters))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"class": name, **{f"{who}_{what}_ms": 1e3 * t for (who, what), t in med.items()},
               "step_ratio": med[("metaopt", "step")] / med[("torch", "step")],
               "whole_ratio": med[("metaopt", "whole")] / med[("torch", "whole")]}
        rows.append(row)
        print(f"{name:8s} step {row['metaopt_step_ms']:.3f} / {row['torch_step_ms']:.3f} ms = {row['step_ratio']:.2f}x"
              f"   whole {row['metaopt_whole_ms']:.3f} / {row['torch_whole_ms']:.3f} ms = {row['whole_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"width": args.width, "reps": args.reps, "iters": args.iters, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
