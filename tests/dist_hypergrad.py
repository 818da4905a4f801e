"""Run under ``torchrun``: each rank's share of an ensemble's hypergradient, all-reduced; rank 0
writes the sum to the JSON file named by argv[1] (see test_distributed.py)."""

import json
import sys

import torch

from metaopt import hypergradient, optim
from metaopt.models import MLP
from metaopt.recipes.distill.data import moons
from metaopt.recipes.distill.objective import Distillation
from metaopt.run.distributed import World, block

torch.set_default_dtype(torch.float64)
world = World.init("cpu", timeout=60)
data = moons()
models = {"1-layer": MLP([2, 1], "tanh"), "2-layer": MLP([2, 6, 1], "tanh")}
rows = {"2-layer": ["2-layer"] * 3, "all": ["1-layer", "2-layer"]}


def problem(hold=None):
    return Distillation(data, models, rows, restarts=2, steps_per_epoch=3, epochs=2, per_class=2, batch=16,
                        labels="soft", dtype=torch.float64, hold=hold)


whole = problem()
hyper = whole.init_hyper(torch.Generator().manual_seed(0), lr=0.2)
share = problem(list(block(whole.members, world.rank, world.size)))  # members split, across distillations
res = hypergradient(share, optim.momentum(momentum=0.9), hyper, whole.steps, method="full",
                    generator=torch.Generator().manual_seed(1))
total = world.all_reduce_sum({"loss": res.loss.reshape(1), **res.grads})
if world.main:
    with open(sys.argv[1], "w") as f:
        json.dump({k: v.tolist() for k, v in total.items()} | {"members": share.members, "held": len(share.owner_all)},
                  f)
world.close()
