"""betty's three-level "learning by ignoring" example, betty-ml 0.2.1 vs metaopt, at CPU scale.

betty's ``examples/learning_by_ignoring`` (Learning by Ignoring, Zhang et al.; the three-level
example of the betty paper, Choe et al. ICLR 2023) has three problems:

    pretrain   theta_p  mean_i sigmoid(r_phi(x_i)) * CE(theta_p; source_i)          (level 1)
    finetune   theta_f  CE(theta_f; target train) + lam * ||theta_f - theta_p||^2   (level 2)
    reweight   phi      CE(theta_f; target validation) + lam * ||theta_f - theta_p||^2  (level 3)

with ``u2l = {reweight: [pretrain]}``, ``l2u = {pretrain: [finetune, reweight], finetune: [reweight]}``
and ``Config(type="darts")`` everywhere, one step per level per iteration (``unroll_steps=1``), warm
started. The ``||.||^2`` runs over every layer but the last (betty's ``"fc"`` exclusion). Here the
ResNets on Office-Home become 8 -> 16 -> 3 tanh networks and the data are synthetic: the target
task's labels come from one linear teacher; the source points with ``x_0 > 0.43`` (84 of 300) are
labelled by a second teacher, so pretraining on them transfers badly. ``r_phi`` is linear.
Full batches, plain SGD (lr 0.1) on ``theta_p`` and ``theta_f``, Adam (lr 0.01, betas 0.5, 0.999)
on ``phi``, as in betty's example.

betty's hypergradient for ``phi`` sums its two paths (through ``finetune``, and directly through the
regulariser) with ``darts`` at each hop: a central finite difference (radius ``darts_alpha``) of
``-(d2 L_lower / d upper d w) v``, i.e. the implicit function theorem with every inverse Hessian
replaced by the identity, at the current (just stepped) parameters. metaopt computes the same quantity
without finite differences: ``pretrain`` as a MetaObjective whose outer loss is ``finetune``'s
``hypergradient(..., create_graph=True)`` loss, both levels ``Implicit`` with an identity linear
solver (``identity_solve`` below). The same nesting with ``Full()`` at both levels is the exact
derivative of the one-step objective, which five-point finite differences check.

Both run in this process, one thread, alternating ``--reps`` times; the median seconds per iteration
(one step of each level) are reported, and the top-level objective after ``--iters`` iterations.
betty-ml 0.2.1 declares Python < 3.11 (install it past the marker, as in ``betty_implicit.py``)::

    python3 -m venv /tmp/bettyvenv && . /tmp/bettyvenv/bin/activate
    pip install torch==2.13.0 numpy && pip install -e . && \
        pip install --no-deps --ignore-requires-python betty-ml==0.2.1
    python benchmarks/betty_multilevel.py --json benchmarks/results/betty_multilevel.json

Without betty the metaopt side and its checks still run (``--no-betty``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

import metaopt
from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.hypergrad.solvers import SolveInfo

D, HIDDEN, C = 8, 16, 3
N_SOURCE, N_TRAIN, N_VAL = 300, 30, 100
LAM, LR_PRE, LR_FINE = 0.01, 0.1, 0.1
ADAM = {"lr": 0.01, "betas": (0.5, 0.999)}


def net() -> torch.nn.Module:
    """The pretrain/finetune network: [N, D] -> [N, C] logits."""
    return torch.nn.Sequential(torch.nn.Linear(D, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, C))


def setup(dtype: torch.dtype, seed: int = 0) -> dict:
    """Data (source, target train, target validation) and the initial networks, all in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    teacher, other = torch.randn(D, C, generator=g), torch.randn(D, C, generator=g)

    def labelled(n: int, shifted: bool) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, D, generator=g)
        y = (x @ teacher).argmax(1)
        if shifted:
            y = torch.where(x[:, 0] > 0.43, (x @ other).argmax(1), y)
        return x.to(dtype), y

    torch.manual_seed(seed)
    nets = {"pretrain": net(), "finetune": net(), "reweight": torch.nn.Linear(D, 1)}
    return {"source": labelled(N_SOURCE, True), "train": labelled(N_TRAIN, False), "val": labelled(N_VAL, False),
            "nets": {k: m.to(dtype) for k, m in nets.items()}}


def mlp(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``net()`` as a function of its parameters (``named_parameters`` names): [N, D] -> [N, C]."""
    h = torch.tanh(x @ params["0.weight"].T + params["0.bias"])
    return h @ params["2.weight"].T + params["2.bias"]


def params_of(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def regulariser(theta_f: Mapping[str, Tensor], theta_p: Mapping[str, Tensor]) -> Tensor:
    """``LAM * ||theta_f - theta_p||^2`` over every layer but the last (betty's ``"fc"`` exclusion)."""
    return LAM * sum(((theta_f[k] - theta_p[k]) ** 2).sum() for k in theta_f if not k.startswith("2."))


def pretrain_loss(theta_p: Mapping[str, Tensor], phi: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """``mean_i sigmoid(r_phi(x_i)) CE_i``; ``phi`` = ``{"weight": [1, D], "bias": [1]}``."""
    weight = torch.sigmoid(x @ phi["weight"].T + phi["bias"]).squeeze(-1)
    return (F.cross_entropy(mlp(theta_p, x), y, reduction="none") * weight).mean()


def level_loss(theta_f: Mapping[str, Tensor], theta_p: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """finetune's (on the target training set) and reweight's (on the validation set) loss."""
    return F.cross_entropy(mlp(theta_f, x), y) + regulariser(theta_f, theta_p)


# ---------------------------------------------------------------------------------------------- metaopt


def identity_solve(matvec, b: Tensor, **_: object) -> tuple[Tensor, SolveInfo]:
    """``H^-1 b ~ b``: betty's ``darts`` without its finite difference (a :data:`Solver`)."""
    return b.clone(), SolveInfo(0, 0, float("nan"), False)


class Finetune(metaopt.MetaObjective):
    """Level 2 given level 1: params ``theta_f``, hyper ``theta_p``; outer loss = reweight's loss."""

    def __init__(self, data: dict) -> None:
        self.data = data

    def init_params(self, hyper, generator):
        raise ValueError("Finetune: pass params0 (the current theta_f; the problem is warm-started)")

    def inner_loss(self, params, hyper, k, batch):
        return level_loss(params, hyper, *self.data["train"])

    def outer_loss(self, params, hyper, batch):
        return level_loss(params, hyper, *self.data["val"])


class Pretrain(metaopt.MetaObjective):
    """Level 1 given level 3: params ``theta_p``, hyper ``phi``. Its outer loss is level 2's, after
    ``steps`` finetuning steps from ``theta_f`` at this ``theta_p``, differentiable in ``theta_p``.
    ``finetuned`` keeps the last call's finetuned ``theta_f`` (the hypergradient calls ``outer_loss``
    once, at the final ``theta_p``), so an iteration need not repeat level 2's step."""

    def __init__(self, data: dict, method: hg.Method, theta_f: dict[str, Tensor], steps: int = 1) -> None:
        self.data, self.finetune, self.method, self.theta_f, self.steps = data, Finetune(data), method, theta_f, steps
        self.finetuned: dict[str, Tensor] = {}

    def init_params(self, hyper, generator):
        raise ValueError("Pretrain: pass params0 (the current theta_p; the problem is warm-started)")

    def inner_loss(self, params, hyper, k, batch):
        return pretrain_loss(params, hyper, *self.data["source"])

    def outer_loss(self, params, hyper, batch):
        res = metaopt.hypergradient(self.finetune, optim.sgd(lr=LR_FINE), params, self.steps, method=self.method,
                                    params0=self.theta_f, create_graph=True)
        self.finetuned = {k: p.detach() for k, p in res.params.items()}
        return res.loss


def darts_like() -> hg.Method:
    return hg.Implicit(identity_solve)


def metaopt_step(data: dict, state: dict, method: hg.Method, steps: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
    """One iteration at ``state = {"theta_p", "theta_f", "phi"}``: reweight's loss after one step of
    each lower level, and its hypergradient w.r.t. ``phi``; moves ``theta_p`` and ``theta_f``."""
    pre = Pretrain(data, method, state["theta_f"], steps)
    res = metaopt.hypergradient(pre, optim.sgd(lr=LR_PRE), state["phi"], steps, method=method,
                                params0=state["theta_p"])
    state["theta_p"] = res.params
    state["theta_f"] = pre.finetuned
    return res.loss, res.grads


def initial_state(data: dict) -> dict:
    return {name: params_of(data["nets"][key]) for name, key in
            (("theta_p", "pretrain"), ("theta_f", "finetune"), ("phi", "reweight"))}


def top_objective(data: dict, state: dict) -> float:
    return float(level_loss(state["theta_f"], state["theta_p"], *data["val"]))


def run_metaopt(data: dict, iters: int, learn: bool = True,
                method: hg.Method | None = None) -> tuple[float, float, dict[str, Tensor]]:
    """Seconds per iteration, reweight's loss after ``iters`` iterations and the final ``phi``
    (``learn=False``: ``phi`` held at its initial value, the baseline without reweighting), with
    ``method`` at both levels (default: the darts-like identity solve)."""
    state = initial_state(data)
    phi = {k: p.requires_grad_() for k, p in state["phi"].items()}
    adam = torch.optim.Adam(list(phi.values()), **ADAM)
    method = method or darts_like()
    t0 = time.perf_counter()
    for _ in range(iters):
        state["phi"] = {k: p.detach() for k, p in phi.items()}
        _, grads = metaopt_step(data, state, method)
        for k, p in phi.items():
            p.grad = grads[k]
        if learn:
            adam.step()
    seconds = (time.perf_counter() - t0) / iters
    return seconds, top_objective(data, state), {k: p.detach() for k, p in phi.items()}


# ------------------------------------------------------------------------------------------------ betty


def run_betty(data: dict, iters: int, darts_alpha: float = 0.01,
              spy: list | None = None) -> tuple[float, float, dict[str, Tensor]]:
    """betty's example at this scale: seconds per iteration, reweight's loss after ``iters``
    iterations and the final ``phi``. ``spy`` collects reweight's gradient at each of its steps."""
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    nets = copy.deepcopy(data["nets"])

    class Pretraining(ImplicitProblem):
        def training_step(self, batch):
            theta_p = dict(self.module.named_parameters())
            phi = dict(self.reweight.module.named_parameters())
            return pretrain_loss(theta_p, phi, *batch)

        def configure_train_data_loader(self):
            return [data["source"]]

        def configure_module(self):
            return nets["pretrain"]

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=LR_PRE)

    class Finetuning(ImplicitProblem):
        def training_step(self, batch):
            return level_loss(dict(self.module.named_parameters()),
                              dict(self.pretrain.module.named_parameters()), *batch)

        def configure_train_data_loader(self):
            return [data["train"]]

        def configure_module(self):
            return nets["finetune"]

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=LR_FINE)

    class Reweighting(ImplicitProblem):
        def training_step(self, batch):
            return level_loss(dict(self.finetune.module.named_parameters()),
                              dict(self.pretrain.module.named_parameters()), *batch)

        def configure_train_data_loader(self):
            return [data["val"]]

        def configure_module(self):
            return nets["reweight"]

        def configure_optimizer(self):
            return torch.optim.Adam(self.module.parameters(), **ADAM)

        def optimizer_step(self, *args, **kwargs):
            if spy is not None:
                spy.append({k: p.grad.detach().clone() for k, p in self.module.named_parameters()})
            return super().optimizer_step(*args, **kwargs)

    reweight = Reweighting(name="reweight", config=Config(type="darts", retain_graph=True, darts_alpha=darts_alpha))
    finetune = Finetuning(name="finetune", config=Config(type="darts", unroll_steps=1, allow_unused=False,
                                                         darts_alpha=darts_alpha))
    pretrain = Pretraining(name="pretrain", config=Config(type="darts", unroll_steps=1, allow_unused=False,
                                                          darts_alpha=darts_alpha))
    engine = Engine(config=EngineConfig(train_iters=iters, roll_back=False), problems=[reweight, finetune, pretrain],
                    dependencies={"u2l": {reweight: [pretrain]},
                                  "l2u": {pretrain: [finetune, reweight], finetune: [reweight]}})
    t0 = time.perf_counter()
    engine.run()
    seconds = (time.perf_counter() - t0) / iters
    state = {"theta_p": params_of(pretrain.module), "theta_f": params_of(finetune.module)}
    return seconds, top_objective(data, state), params_of(reweight.module)


def lower_call_ms(data: dict, reps: int = 5, calls: int = 20) -> dict[str, float]:
    """Median ms of one finetune-level ``hypergradient`` with the identity solve, with and without
    ``create_graph`` (the nested call pays for the differentiable rebuild on top of the plain one)."""
    state, fine = initial_state(data), Finetune(data)
    out = {}
    for create_graph in (False, True):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(calls):
                metaopt.hypergradient(fine, optim.sgd(lr=LR_FINE), state["theta_p"], 1, method=darts_like(),
                                      params0=state["theta_f"], create_graph=create_graph)
            times.append((time.perf_counter() - t0) / calls * 1e3)
        out[f"create_graph={create_graph}"] = statistics.median(times)
    return out


def source_weights(data: dict, phi: Mapping[str, Tensor]) -> dict[str, float]:
    """Mean ``sigmoid(r_phi(x))`` over the source points labelled by the second teacher, and the rest."""
    x = data["source"][0]
    w = torch.sigmoid(x @ phi["weight"].T + phi["bias"]).squeeze(-1)
    shifted = x[:, 0] > 0.43
    return {"shifted": float(w[shifted].mean()), "clean": float(w[~shifted].mean())}


# ----------------------------------------------------------------------------------------------- checks


def flat(g: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([g[k].reshape(-1) for k in ("weight", "bias")])


def compare(g: Mapping[str, Tensor], ref: Mapping[str, Tensor]) -> dict[str, float]:
    a, b = flat(g), flat(ref)
    return {"rel_err": float((a - b).norm() / b.norm()), "norm_ratio": float(a.norm() / b.norm()),
            "cosine": float(F.cosine_similarity(a, b, dim=0))}


def checks(with_betty: bool) -> dict:
    """First iteration's hypergradient in float64 at identical initial values: betty's darts (two
    radii) against metaopt's identity-solver Implicit; metaopt's Full (exact one-step derivative)
    against five-point finite differences; the darts-like quantities against Full; Neumann(1, alpha 1)
    against the identity solve."""
    data = setup(torch.float64)
    out: dict = {}
    _, darts = metaopt_step(data, initial_state(data), darts_like())
    loss, exact = metaopt_step(data, initial_state(data), hg.Full())
    state0 = initial_state(data)
    v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(1), dtype=t.dtype)
         for k, t in state0["phi"].items()}

    def F3(e: float) -> float:
        state = initial_state(data)
        state["phi"] = {k: state0["phi"][k] + e * v[k] for k in v}
        pre = Pretrain(data, hg.Full(), state["theta_f"])
        return float(metaopt.hypergradient(pre, optim.sgd(lr=LR_PRE), state["phi"], 1, method=hg.Full(),
                                           params0=state["theta_p"]).loss)

    eps = 1e-3
    fd = (8 * (F3(eps) - F3(-eps)) - (F3(2 * eps) - F3(-2 * eps))) / (12 * eps)
    ours = float(sum((exact[k] * v[k]).sum() for k in v))
    out["full_vs_fd"] = {"directional": ours, "fd": fd, "rel_err": abs(ours - fd) / abs(fd)}
    out["metaopt_darts_like_vs_full"] = compare(darts, exact)
    # Neumann with one iteration and alpha = 1 is the identity too, but the create_graph rebuild
    # does not pass alpha on to attach_root (it estimates its own by power iteration)
    _, neumann = metaopt_step(data, initial_state(data), hg.Implicit("neumann", tol=0.0, maxiter=1, alpha=1.0))
    out["metaopt_neumann1_vs_darts_like"] = compare(neumann, darts)
    out["first_loss"] = float(loss)
    if with_betty:
        for alpha in (0.01, 1e-5):
            seen: list = []
            run_betty(setup(torch.float64), 1, darts_alpha=alpha, spy=seen)
            out[f"betty_darts_{alpha:g}_vs_metaopt_darts_like"] = compare(seen[0], darts)
            out[f"betty_darts_{alpha:g}_vs_full"] = compare(seen[0], exact)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200, help="iterations (one step of each level) per timed run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-betty", action="store_true", help="run the metaopt side and its checks only")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)  # betty logs every problem at INFO
    with_betty = not args.no_betty
    if with_betty:
        import betty  # noqa: F401  (fail early when it is missing)

    first = checks(with_betty)
    print("first iteration, float64, dF3/dphi:")
    fd = first["full_vs_fd"]
    print(f"  metaopt Full (exact one-step) vs 5-point FD: {fd['directional']:.10f} vs {fd['fd']:.10f}, "
          f"relative error {fd['rel_err']:.1e}")
    for key, row in first.items():
        if isinstance(row, dict) and "cosine" in row:
            print(f"  {key}: relative error {row['rel_err']:.2e}, norm ratio {row['norm_ratio']:.4f}, "
                  f"cosine {row['cosine']:.6f}")

    data = setup(torch.float32)
    runs = {"metaopt": run_metaopt} | ({"betty": run_betty} if with_betty else {}) | {
        "metaopt_full": lambda data, iters: run_metaopt(data, iters, method=hg.Full())}
    times: dict[str, list[float]] = {name: [] for name in runs}
    finals: dict[str, tuple[float, dict[str, Tensor]]] = {}
    for fn in runs.values():
        fn(data, 3)  # warm-up
    for _ in range(args.reps):
        for name, fn in runs.items():
            s, *finals[name] = fn(data, args.iters)
            times[name].append(s)
    initial = top_objective(data, initial_state(data))
    _, fixed, phi0 = run_metaopt(data, args.iters, learn=False)
    base = statistics.median(times["metaopt"])
    rows = [{"impl": name, "seconds_per_iteration": statistics.median(t),
             "ratio_to_metaopt": statistics.median(t) / base, "final_objective": finals[name][0],
             "source_weights": source_weights(data, finals[name][1])} for name, t in times.items()]
    print(f"torch {torch.__version__}, float32, {args.threads} thread(s), {args.iters} iterations, median of "
          f"{args.reps}; reweight's objective at the start {initial:.4f}")
    for r in rows:
        w = r["source_weights"]
        print(f"  {r['impl']:12s} {r['seconds_per_iteration'] * 1e3:7.2f} ms / iteration  {r['ratio_to_metaopt']:5.2f}x"
              f"  objective after {args.iters} iterations {r['final_objective']:.6f}; mean source weight "
              f"{w['shifted']:.3f} (second teacher's labels) vs {w['clean']:.3f} (clean)")
    lower = lower_call_ms(data)
    w0 = source_weights(data, phi0)
    print(f"  phi held at its initial value (no reweighting): objective {fixed:.6f}; mean source weight "
          f"{w0['shifted']:.3f} vs {w0['clean']:.3f}")
    print("  one finetune-level hypergradient with the identity solve: "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in lower.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"iters": args.iters, "reps": args.reps, "threads": args.threads, "torch": torch.__version__,
                       "initial_objective": initial, "rows": rows,
                       "fixed_phi": {"final_objective": fixed, "source_weights": w0},
                       "lower_call_ms": lower, "first_hypergradient": first}, f, indent=1)


if __name__ == "__main__":
    main()
