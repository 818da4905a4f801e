"""Seconds per outer step of betty's own hello-world problem, betty-ml 0.2.1 vs metaopt.

The workload is ``betty/test_install.py``: L2-regularised logistic regression on 500 training points
in 20 dimensions, one learnable penalty per weight. One outer step = reset the weights to zero, 100
full-batch SGD steps (lr 0.1), the implicit hypergradient by 3 conjugate-gradient iterations on the
inner Hessian, and an SGD step (lr 1, momentum 0.9) on the penalties, clamped at 1e-8. Both run in
this process, float32, one thread, alternating ``--reps`` times; the median seconds per outer step
are reported (betty: one ``Engine.run()`` of ``--outer`` outer steps, divided by ``--outer``).

betty-ml 0.2.1 declares Python < 3.11, and its iterative (unrolled) problems need the deprecated
``functorch.make_functional_with_buffers``; its implicit problems run on torch 2.13 and Python 3.11
when installed past the marker, in a separate virtualenv::

    python3 -m venv /tmp/bettyvenv && . /tmp/bettyvenv/bin/activate
    pip install torch==2.13.0 numpy && pip install --no-deps --ignore-requires-python betty-ml==0.2.1
    PYTHONPATH=. python benchmarks/betty_implicit.py --json benchmarks/results/betty_implicit.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim

N, D, INNER_STEPS, CG_ITERS = 1000, 20, 100, 3


def data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    rng = np.random.RandomState(seed)
    w_gt = rng.randn(D)
    x = rng.randn(N, D)
    y = ((x @ w_gt + 0.1 * rng.randn(N)) > 0).astype(float)
    t = [torch.from_numpy(a).float() for a in (x[: N // 2], y[: N // 2], x[N // 2:], y[N // 2:])]
    return tuple(t)


def penalised(w: torch.Tensor, lam: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """betty's inner loss: BCE + 0.5 w^T diag(lam) w."""
    return F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (w * lam * w).sum()


def run_betty(outer: int, split: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """Seconds per outer step and the final validation loss."""
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    x_train, y_train, x_val, y_val = split

    class ChildNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(D))

    class ParentNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(D))

        def forward(self) -> torch.Tensor:
            return self.w

    class Parent(ImplicitProblem):
        def training_step(self, batch):
            return F.binary_cross_entropy_with_logits(batch[0] @ self.inner.module.w, batch[1])

        def configure_train_data_loader(self):
            return [(x_val, y_val)]

        def configure_module(self):
            return ParentNet()

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=1, momentum=0.9)

        def param_callback(self) -> None:
            for p in self.trainable_parameters():
                p.data.clamp_(min=1e-8)

    class Child(ImplicitProblem):
        def training_step(self, batch):
            return penalised(self.module.w, self.outer(), batch[0], batch[1])

        def configure_train_data_loader(self):
            return [(x_train, y_train)]

        def configure_module(self):
            return ChildNet()

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=0.1)

        def on_inner_loop_start(self) -> None:
            self.module.w.data.zero_()

    parent = Parent(name="outer", config=Config(log_step=-1, first_order=True, retain_graph=True))
    child = Child(name="inner", config=Config(type="cg", cg_iterations=CG_ITERS, cg_alpha=0.1,
                                              unroll_steps=INNER_STEPS))
    engine = Engine(config=EngineConfig(train_iters=INNER_STEPS * outer), problems=[parent, child],
                    dependencies={"l2u": {child: [parent]}, "u2l": {parent: [child]}})
    t0 = time.perf_counter()
    engine.run()
    seconds = (time.perf_counter() - t0) / outer
    with torch.no_grad():
        val = float(F.binary_cross_entropy_with_logits(x_val @ child.module.w, y_val))
    return seconds, val


class L2LogReg(metaopt.MetaObjective):
    """The same problem as a MetaObjective: hyper = {"lam": [D]}."""

    def __init__(self, split: tuple[torch.Tensor, ...]) -> None:
        self.x, self.y, self.xv, self.yv = split

    def init_params(self, hyper, generator):
        return {"w": torch.zeros(D)}

    def inner_loss(self, params, hyper, k, batch):
        return penalised(params["w"], hyper["lam"], self.x, self.y)

    def outer_loss(self, params, hyper, batch):
        return F.binary_cross_entropy_with_logits(self.xv @ params["w"], self.yv)


def run_metaopt(outer: int, split: tuple[torch.Tensor, ...], scale: float = 1.0) -> tuple[float, float]:
    """Seconds per outer step and the final validation loss; ``scale`` multiplies the hypergradient."""
    objective = L2LogReg(split)
    inner = optim.sgd(lr=0.1)
    method = hg.Implicit("cg", tol=0.0, maxiter=CG_ITERS)
    lam = torch.ones(D, requires_grad=True)
    meta = torch.optim.SGD([lam], lr=1, momentum=0.9)
    t0 = time.perf_counter()
    for _ in range(outer):
        res = metaopt.hypergradient(objective, inner, {"lam": lam}, INNER_STEPS, method=method)
        lam.grad = scale * res.grads["lam"]
        meta.step()
        with torch.no_grad():
            lam.clamp_(min=1e-8)
    seconds = (time.perf_counter() - t0) / outer
    return seconds, float(res.loss)


def first_hypergradients(split: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """The hypergradient of the first outer step (at lam = 1): betty's CG(3), metaopt's CG(3), and
    the exact one (CG to 1e-10; the full unroll agrees), as norms and cosines to the exact one."""
    from betty.problems import ImplicitProblem

    seen: list[torch.Tensor] = []
    step = ImplicitProblem.optimizer_step

    def spy(self, *a, **kw):
        if self.name == "outer" and not seen:
            seen.append(self.module.w.grad.detach().clone())
        return step(self, *a, **kw)

    ImplicitProblem.optimizer_step = spy
    try:
        run_betty(1, split)
    finally:
        ImplicitProblem.optimizer_step = step
    objective, inner, lam = L2LogReg(split), optim.sgd(lr=0.1), {"lam": torch.ones(D)}

    def grad(method: object) -> torch.Tensor:
        return metaopt.hypergradient(objective, inner, lam, INNER_STEPS, method=method).grads["lam"]

    exact = grad(hg.Implicit("cg", tol=1e-10, maxiter=100))
    out = {"exact_norm": float(exact.norm())}
    for name, g in (("betty_cg3", seen[0]), ("metaopt_cg3", grad(hg.Implicit("cg", tol=0.0, maxiter=CG_ITERS))),
                    ("metaopt_full_unroll", grad(hg.Full()))):
        out[f"{name}_norm_ratio"] = float(g.norm() / exact.norm())
        out[f"{name}_cosine"] = float(F.cosine_similarity(g, exact, dim=0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outer", type=int, default=20, help="outer steps per timed run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)  # betty logs every problem at INFO
    import betty

    split = data()
    times: dict[str, list[float]] = {"betty": [], "metaopt": []}
    finals: dict[str, float] = {}
    run_betty(2, split), run_metaopt(2, split)  # warm-up
    for _ in range(args.reps):
        for name, fn in (("betty", run_betty), ("metaopt", run_metaopt)):
            s, finals[name] = fn(args.outer, split)
            times[name].append(s)
    rows = [{"impl": name, "seconds_per_outer_step": statistics.median(t), "final_val_loss": finals[name]}
            for name, t in times.items()]
    base = rows[1]["seconds_per_outer_step"]
    print(f"betty {betty.__version__ if hasattr(betty, '__version__') else '0.2.1'}, torch {torch.__version__}, "
          f"{args.outer} outer steps x {INNER_STEPS} inner SGD steps + CG({CG_ITERS}), median of {args.reps}")
    for r in rows:
        r["ratio_to_metaopt"] = r["seconds_per_outer_step"] / base
        print(f"{r['impl']:8s} {r['seconds_per_outer_step'] * 1e3:8.2f} ms / outer step  "
              f"{r['ratio_to_metaopt']:5.2f}x  validation loss after {args.outer} steps {r['final_val_loss']:.4f}")
    first = first_hypergradients(split)
    print("first outer step's hypergradient, norm / exact and cosine to exact:",
          ", ".join(f"{k} {first[k + '_norm_ratio']:.3f} / {first[k + '_cosine']:.5f}"
                    for k in ("betty_cg3", "metaopt_cg3", "metaopt_full_unroll")))
    ratio = first["betty_cg3_norm_ratio"]
    _, scaled = run_metaopt(args.outer, split, scale=ratio)
    print(f"metaopt with its hypergradient multiplied by {ratio:.2f}: validation loss after {args.outer} steps "
          f"{scaled:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"outer": args.outer, "reps": args.reps, "threads": args.threads, "torch": torch.__version__,
                       "rows": rows, "first_hypergradient": first, "metaopt_scaled_val_loss": scaled}, f, indent=1)


if __name__ == "__main__":
    main()
