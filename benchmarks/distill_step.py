"""Seconds per outer step of the distillation seed paper, metaopt vs higher vs torchopt vs hand-written.

The outer step (Medvedev & D'yakonov 2020): moons data, 40 inner steps x 5 epochs = 200 inner SGD steps
on 4 synthetic points per class per step, one learnable learning rate per inner step (softplus),
outer loss on a real batch of 64, the hypergradient w.r.t. the synthetic points and the rates, and an
Adam step on them. Members: m = 3 (one restart), or m = 30 (10 restarts x 3 members, each restart with
its own synthetic data and rates). Fresh Xavier initialisations every outer step.

Every implementation runs in this one process, round-robin, so machine noise hits all alike; the
median of ``--reps`` timed steps after ``--warmup`` is reported with the ratios to metaopt. Memory is
the peak resident-memory growth during one outer step (Linux VmHWM, reset after a warm-up step),
measured in a fresh process per implementation and configuration.

    python benchmarks/distill_step.py --json bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from unittest import mock

import peers
import torch
import torch.nn.functional as F
from torch import nn

import metaopt
from metaopt import optim
from metaopt.hypergrad import inner as hypergrad_inner
from metaopt.models import MLP
from metaopt.recipes.demo import MoonsDistillation
from metaopt.recipes.distill.objective import loss_fn as bce

ARCHS = {"1-layer": [2, 1], "2-layer": [2, 10, 1], "4-layer": [2, 10, 10, 10, 1]}
S, EPOCHS, PER_CLASS, BATCH, PER_RESTART = 40, 5, 4, 64, 3
N = S * EPOCHS


class Setup:
    """Data and hyperparameters shared by every implementation (float32, as in real use); metaopt's
    objective is the demo's ``MoonsDistillation``, which draws its real batch from the generator."""

    def __init__(self, sizes: list[int], restarts: int, seed: int = 0) -> None:
        self.objective = MoonsDistillation(
            sizes, restarts=restarts, members=PER_RESTART, steps_per_epoch=S, epochs=EPOCHS, per_class=PER_CLASS,
            batch=BATCH,
        )
        data = self.objective.data
        self.X, self.Y = data.X, data.y.to(data.X.dtype).unsqueeze(1)
        self.sizes, self.R = sizes, restarts
        self.m = restarts * PER_RESTART
        self.hyper0 = self.objective.init_hyper(torch.Generator().manual_seed(seed), lr=0.02)
        self.y_syn = self.objective.targets(self.hyper0)[0, 0]  # [P, 1]
        self.gen = torch.Generator().manual_seed(seed + 1)

    def batch(self) -> torch.Tensor:
        return torch.randperm(self.X.shape[0], generator=self.gen)[:BATCH]


# ---- metaopt -----------------------------------------------------------------------------------


def make_metaopt(
    st: Setup, compile: bool = False, method: str = "full", block: int | None = None
) -> Callable[[], float]:
    obj = st.objective
    inner, meta = optim.sgd(), optim.adam(lr=0.01)
    hyper = {k: v.clone() for k, v in st.hyper0.items()}
    state = meta.init(hyper)
    t = [0]

    def step() -> float:
        nonlocal hyper, state
        res = metaopt.hypergradient(obj, inner, hyper, N, method=method, generator=st.gen, compile=compile,
                                    compile_block=block)
        hyper, state = meta.update(res.grads, state, hyper, step=t[0])
        t[0] += 1
        return float(res.loss)

    return step


def make_metaopt_asserts(st: Setup) -> Callable[[], float]:
    """``metaopt-compiled`` with inductor's per-call size asserts kept, as before
    ``metaopt.hypergrad.inner.NO_SIZE_ASSERTS``: the A/B of that option in one process. The blocks
    take their inductor options when first compiled, in the first step."""
    step, first = make_metaopt(st, compile=True), [True]

    def asserted() -> float:
        if first[0]:
            first[0] = False
            with mock.patch.object(hypergrad_inner, "NO_SIZE_ASSERTS", {}):
                return step()
        return step()

    return asserted


# ---- peers: a Python loop over the members, one nn.Module each -------------------------------


def _members(st: Setup) -> list[nn.Module]:
    return [MLP(st.sizes) for _ in range(st.m)]


def _xavier(model: nn.Module) -> None:
    for layer in model.layers:
        nn.init.xavier_uniform_(layer.weight, generator=None)
        nn.init.zeros_(layer.bias)


def _leaves(st: Setup) -> tuple[torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    x = st.hyper0["x"].clone().requires_grad_()
    raw = st.hyper0["lr"].clone().requires_grad_()
    return x, raw, torch.optim.Adam([x, raw], lr=0.01)


def _member_loop(st: Setup, train: Callable[..., torch.Tensor]) -> Callable[[], float]:
    """The peers' outer step: for each member (a fresh Xavier draw of its own module),
    ``train(model, r, x, raw, real)`` runs the 200 inner steps on restart r's data and returns the
    trained model's outputs on the real batch; each member's outer loss is backpropagated at once
    (freeing its graph), then Adam on h."""
    models = _members(st)
    x, raw, meta = _leaves(st)

    def step() -> float:
        meta.zero_grad()
        b = st.batch()
        total = 0.0
        for j, model in enumerate(models):
            _xavier(model)
            r = j // PER_RESTART
            out = train(model, r, x, raw, st.X[b])
            outer = F.binary_cross_entropy_with_logits(out, st.Y[b]) / st.m
            outer.backward()
            total += float(outer.detach())
        meta.step()
        return total

    return step


def _peer(st: Setup, run: Callable[..., torch.Tensor]) -> Callable[[], float]:
    """A peer's outer step: ``run`` (:data:`peers.RUNS`) trains each member on its restart's
    synthetic points with the per-step rates and returns its outputs on the real batch."""

    def train(model, r, x, raw, real):
        return run(model, dict(model.named_parameters()), N,
                   lambda k, f, p: F.binary_cross_entropy_with_logits(f(x[r, k % S]), st.y_syn),
                   lambda k: F.softplus(raw[k, r]), lambda f: f(real))

    return _member_loop(st, train)


def make_higher(st: Setup) -> Callable[[], float]:
    """higher: ``innerloop_ctx`` per member, the rate through ``override``."""
    return _peer(st, peers.run_higher)


def make_torchopt(st: Setup) -> Callable[[], float]:
    """torchopt's functional API per member: ``torchopt.sgd(lr=1.0)``, the rate applied to its update."""
    return _peer(st, peers.run_torchopt)


def make_loop(st: Setup) -> Callable[[], float]:
    """Hand-written: a Python loop over the members, autograd.grad(create_graph=True) per step."""
    return _peer(st, peers.run_loop)


class BmmMLP(MLP):
    """The MLP with a batched matmul in every layer, as hand-written code has it: the hand-written
    baselines keep it under ``torch.compile`` too, where ``MLP.forward_batched`` computes tiny layers
    as a fused product and sum (metaopt's own choice for its compiled path)."""

    def forward_batched(self, params, x, per_member):
        x = x if per_member else x.unsqueeze(0).expand(params["layers.0.weight"].shape[0], *x.shape)
        for i in range(len(self.layers)):
            w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            if i < len(self.layers) - 1:
                x = self._hidden(x)
        return x


def _make_stacked(st: Setup, batched: bool, compiled: bool = False) -> Callable[[], float]:
    """Hand-written, stacked params and one autograd graph for the whole run. The inner step is
    eager (``autograd.grad(create_graph=True)``) or, with ``compiled``, loss + ``torch.func.grad`` +
    update under ``torch.compile``, the per-step data and rate selected outside it."""
    ens = metaopt.Ensemble(BmmMLP(st.sizes), st.m, init="xavier", batched=batched)
    x, raw, meta = _leaves(st)
    y_syn = st.y_syn.expand(st.m, -1, -1)

    def sgd(params, grads, lr):
        return {n: p - lr.reshape((-1,) + (1,) * (p.dim() - 1)) * grads[n] for n, p in params.items()}

    def eager_step(params, xs, lr):
        loss = ens.losses(params, xs, y_syn, bce, per_member=True).sum()
        return sgd(params, dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True))), lr)

    def functional_step(params, xs, lr):
        return sgd(params, torch.func.grad(lambda p: ens.losses(p, xs, y_syn, bce, per_member=True).sum())(params), lr)

    inner_step = torch.compile(functional_step) if compiled else eager_step

    def step() -> float:
        meta.zero_grad()
        b = st.batch()
        params = {k: v.requires_grad_() for k, v in ens.init_params(st.gen).items()}
        for k in range(N):
            xs = x[:, k % S].repeat_interleave(PER_RESTART, 0)
            params = inner_step(params, xs, F.softplus(raw[k]).repeat_interleave(PER_RESTART))
        outer = ens.losses(params, st.X[b], st.Y[b], bce).mean()
        outer.backward()
        meta.step()
        return float(outer.detach())

    return step


def make_compiled(st: Setup) -> Callable[[], float]:
    """Hand-written: hand-batched MLP, the inner step under torch.compile."""
    return _make_stacked(st, batched=True, compiled=True)


def make_vmap(st: Setup) -> Callable[[], float]:
    """Hand-written: stacked params, vmap(functional_call), one autograd graph for the whole run."""
    return _make_stacked(st, batched=False)


def make_batched(st: Setup) -> Callable[[], float]:
    """Hand-written: stacked params, hand-batched baddbmm MLP, one autograd graph for the whole run."""
    return _make_stacked(st, batched=True)


IMPLS = {
    "metaopt": make_metaopt,
    "metaopt-compiled": lambda st: make_metaopt(st, compile=True),
    "metaopt-compiled-ckpt": lambda st: make_metaopt(st, compile=True, method="checkpointed"),
    "metaopt-compiled-step": lambda st: make_metaopt(st, compile=True, block=1),
    "metaopt-compiled-2": lambda st: make_metaopt(st, compile=True, block=2),
    "metaopt-compiled-5": lambda st: make_metaopt(st, compile=True, block=5),
    "metaopt-compiled-asserts": make_metaopt_asserts,
    "higher": make_higher,
    "torchopt": make_torchopt,
    "hand-loop": make_loop,
    "hand-vmap": make_vmap,
    "hand-batched": make_batched,
    "hand-compiled": make_compiled,
}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and a measured step would
    reuse it unseen), then reset the peak-RSS mark (VmHWM)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed memory may then hide part of the peak (see docs/benchmarks.md)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe_memory(impl: str, arch: str, m: int) -> float:
    """Peak resident-memory growth (MB) during one outer step, after one warm-up step, in this process."""
    step = IMPLS[impl](Setup(ARCHS[arch], m // PER_RESTART))
    step()
    if not _reset_peak():
        return float("nan")
    base = _rss_kb("VmRSS")
    step()
    return (_rss_kb("VmHWM") - base) / 1024


def memory_rows(rows: list[dict], threads: int) -> None:
    """Fill ``peak_mb`` of each row from a fresh process per (impl, arch, m): in one process, memory
    freed by one implementation would hide the next one's peak."""
    import subprocess
    import sys

    for r in rows:
        out = subprocess.run(
            [sys.executable, __file__, "--probe", r["impl"], r["arch"], str(r["m"]), "--threads", str(threads)],
            capture_output=True, text=True, check=True,
        )
        r["peak_mb"] = float(out.stdout.strip().splitlines()[-1])


def bench(impls: list[str], archs: list[str], members: list[int], warmup: int, reps: int) -> list[dict]:
    rows = []
    for arch in archs:
        for m in members:
            steps = {name: IMPLS[name](Setup(ARCHS[arch], m // PER_RESTART)) for name in impls}
            times: dict[str, list[float]] = {n: [] for n in impls}
            for rep in range(warmup + reps):
                for name, fn in steps.items():  # round-robin
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    if rep >= warmup:
                        times[name].append(dt)
            for name in impls:
                rows.append(
                    {
                        "impl": name,
                        "arch": arch,
                        "n": N,
                        "m": m,
                        "sec_per_step": statistics.median(times[name]),
                        "peak_mb": float("nan"),
                    }
                )
                print(f"{arch:8s} m={m:3d} {name:21s} {rows[-1]['sec_per_step']:.4f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table; ratios are each row's time over metaopt's eager and compiled rows."""

    def ref(r: dict, impl: str) -> float:
        hit = [x for x in rows if x["impl"] == impl and x["arch"] == r["arch"] and x["m"] == r["m"]]
        return hit[0]["sec_per_step"] if hit else float("nan")

    out = [
        "| arch | m | impl | s / outer step | peak MB | / metaopt | / metaopt-compiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["sec_per_step"]
        out.append(
            f"| {r['arch']} | {r['m']} | {r['impl']} | {t:.4f} | {r['peak_mb']:.1f} | "
            f"{t / ref(r, 'metaopt'):.2f}x | {t / ref(r, 'metaopt-compiled'):.2f}x |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--members", nargs="+", type=int, default=[3, 30], help="multiples of 3")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for tiny models)")
    ap.add_argument("--json", help="write rows {impl, arch, n, m, sec_per_step, peak_mb} here")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-process memory probes")
    ap.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        torch.set_num_threads(args.threads)
        print(probe_memory(args.probe[0], args.probe[1], int(args.probe[2])))
        return
    if any(m % PER_RESTART for m in args.members):
        ap.error(f"--members must be multiples of {PER_RESTART}")
    torch.set_num_threads(args.threads)
    rows = bench(args.impl, args.arch, args.members, args.warmup, args.reps)
    if not args.no_memory:
        memory_rows(rows, args.threads)
    print()
    print(f"torch {torch.__version__}, {args.threads} thread(s), n = {N} inner steps, median of {args.reps}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
