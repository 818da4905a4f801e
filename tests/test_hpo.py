"""The hyperparameter-optimisation recipe: data, objectives against finite differences and closed
forms, the single-lambda brute-force agreement, hyper-cleaning, the CLI run and its errors."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from metaopt import hypergrad as hg
from metaopt import optim
from metaopt.data import stratified_split
from metaopt.recipes.hpo import data as hd
from metaopt.recipes.hpo.cleaning import CleaningTask, flag_scores
from metaopt.recipes.hpo.config import Config
from metaopt.recipes.hpo.evidence import EvidenceTask
from metaopt.recipes.hpo.l2 import L2Task
from metaopt.recipes.hpo.objective import Evidence, HyperCleaning, L2LogReg, LearnedSchedule
from metaopt.run.config import ConfigError, from_dict
from metaopt.run.meta import descend

pytest.importorskip("sklearn")


def cfg(**tables):
    return from_dict(Config, tables)


def test_stratified_split_is_a_stratified_partition():
    y = np.repeat(np.arange(3), [50, 30, 20])
    parts = stratified_split(y, (0.5, 0.25, 0.25), random_state=0)
    both = np.concatenate(parts)
    assert sorted(both.tolist()) == list(range(100))
    for p, f in zip(parts, (0.5, 0.25, 0.25)):
        for c, n in zip(range(3), (50, 30, 20)):
            assert abs((y[p] == c).sum() - f * n) <= 1
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(y, (0.5, 0.4))


def test_corrupt_replaces_the_fraction_with_other_classes():
    y = torch.arange(200) % 10
    noisy, flip = hd.corrupt(y, 10, 0.5, torch.Generator().manual_seed(0))
    assert int(flip.sum()) == 100
    assert bool((noisy[flip] != y[flip]).all()) and bool((noisy[~flip] == y[~flip]).all())
    assert flag_scores(flip, flip) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "flagged": 100}


def test_sigmoid_tables_round_trip():
    from metaopt.optim import schedule

    m = torch.tensor([0.5, 0.9, 0.99])
    torch.testing.assert_close(schedule.positive(schedule.inverse_positive(m, "sigmoid"), "sigmoid"), m)
    with pytest.raises(ValueError, match="must be < 1"):
        schedule.inverse_positive(torch.tensor([1.0]), "sigmoid")


def _fd_check(obj, opt, hyper, steps, methods):
    rows = hg.check(obj, opt, hyper, steps, methods=methods)
    for r in rows:
        assert "error" not in r, r
        assert r["rel_error"] < 1e-6, r


def test_objectives_hypergradients_match_finite_differences():
    bc = hd.table("breast_cancer")
    small = hd.Split(bc.name, bc.X[:60], bc.y[:60], bc.X_val[:40], bc.y_val[:40], bc.X_test, bc.y_test, 2)
    logreg = L2LogReg(small, "per_feature", candidates=2)
    h = logreg.init_hyper(-2.0)
    h["log_lam"] = h["log_lam"] + 0.3 * torch.randn(h["log_lam"].shape, generator=torch.Generator().manual_seed(0))
    _fd_check(logreg, optim.momentum(momentum=0.9), h, 30, {"full": hg.Full(), "checkpointed": hg.Checkpointed()})

    dg = hd.table("digits")
    sub = hd.Split(dg.name, dg.X[:80], dg.y[:80], dg.X_val[:50], dg.y_val[:50], dg.X_test, dg.y_test, 10)
    per_weight = L2LogReg(sub, "per_weight")
    _fd_check(per_weight, optim.momentum(momentum=0.9), per_weight.init_hyper(-1.0), 20, {"full": hg.Full()})

    noisy, _ = hd.corrupt(sub.y, 10, 0.5, torch.Generator().manual_seed(1))
    clean = HyperCleaning(sub, noisy, l2=1e-2)
    hc = clean.init_hyper(0.5)
    hc["logit"] = hc["logit"] + torch.randn(hc["logit"].shape, generator=torch.Generator().manual_seed(2))
    _fd_check(clean, optim.momentum(momentum=0.9), hc, 20, {"full": hg.Full(), "truncated=n": hg.Truncated(20)})

    sched = LearnedSchedule(sub, [8], members=2, steps=12, batch=32)
    hs = sched.init_hyper(0.1, 0.8)
    _fd_check(sched, optim.momentum(momentum=0.8), hs, 12, {"full": hg.Full(), "checkpointed": hg.Checkpointed(4)})


def test_candidates_are_independent():
    """C candidates in one objective get exactly the hypergradients they get alone."""
    bc = hd.table("breast_cancer")
    many = L2LogReg(bc, "per_feature", candidates=3)
    h = {"log_lam": torch.linspace(-4, -1, 3).unsqueeze(1).expand(3, bc.features).contiguous()}
    for method in (hg.Full(), hg.Implicit("cg", tol=1e-12, inner_tol=1e-12)):
        joint = hg.hypergradient(many, optim.momentum(momentum=0.9), h, 40, method=method).grads["log_lam"]
        for c in range(3):
            alone = hg.hypergradient(L2LogReg(bc, "per_feature"), optim.momentum(momentum=0.9),
                                     {"log_lam": h["log_lam"][c:c + 1]}, 40, method=method).grads["log_lam"]
            torch.testing.assert_close(joint[c:c + 1], alone, rtol=1e-7, atol=1e-12)


def test_single_lambda_lands_at_the_brute_force_minimum():
    c = cfg(hpo={"task": "l2", "dataset": "breast_cancer", "steps": 100},
            l2={"penalty": "single", "init": -3.0, "low": -8.0, "high": -5.0})
    task = L2Task(c, torch.device("cpu"))
    curve = task.curve(31)  # spacing 0.1 in log lambda
    run = descend(task.make_hypergrad("hoag"), task.hyper, 100, 0.1, torch.Generator())
    learned = float(run.hyper["log_lam"][0])
    val = float(task.judge(run.hyper["log_lam"])["val_loss"][0])
    assert abs(learned - curve["argmin_log_lam"]) <= curve["spacing"], (learned, curve["argmin_log_lam"])
    assert val <= curve["min_val_loss"] + 1e-5
    assert curve["val_loss"][0] > curve["min_val_loss"] + 1e-3  # an interior minimum, not the box edge


def test_hyper_cleaning_separates_clean_from_corrupted():
    c = cfg(hpo={"task": "cleaning", "dataset": "digits", "steps": 60}, method={"name": "full"})
    task = CleaningTask(c, torch.device("cpu"))
    run = descend(lambda h, g: task.hypergradient(task.objective, h, g), task.hyper, 60, 0.1, torch.Generator())
    w = torch.sigmoid(run.hyper["logit"][0])
    scores = flag_scores(w < 0.5, task.corrupted)
    assert scores["f1"] > 0.8, scores
    assert float(w[~task.corrupted].mean()) > float(w[task.corrupted].mean()) + 0.3
    judged = task.judge(torch.stack([run.hyper["logit"][0], torch.zeros_like(run.hyper["logit"][0])]))
    assert float(judged["test_acc"][0]) > float(judged["test_acc"][1]) + 0.1  # beats uniform weights


@pytest.mark.parametrize("ard", [True, False])
def test_evidence_hypergradient_is_the_closed_form_gradient(ard):
    reg = hd.polynomial(30, 10, 6, [0.5, -1.0, 0.0, 0.8], 0.3, 0)
    obj = Evidence(reg, ard=ard)
    h = obj.init_hyper(0.5, 3.0)
    g = torch.Generator().manual_seed(0)
    h["log_alpha"] = h["log_alpha"] + 0.5 * torch.randn(h["log_alpha"].shape, generator=g)
    opt = optim.momentum(momentum=0.9)  # Evidence.hparams sets the (preconditioned) step sizes
    hh = {k: v.clone().requires_grad_() for k, v in h.items()}
    cov = torch.eye(obj.N) / hh["log_beta"].exp() + (obj.Phi / hh["log_alpha"].exp()) @ obj.Phi.T
    marginal = torch.distributions.MultivariateNormal(torch.zeros(obj.N), cov).log_prob(obj.y)  # the N x N form
    torch.testing.assert_close(obj.log_evidence(hh), marginal, rtol=1e-12, atol=1e-10)
    closed = torch.autograd.grad(obj.log_evidence(hh), list(hh.values()))
    closed = {k: -g / obj.N for k, g in zip(h, closed)}
    mackay = obj.mackay_gradient(h)
    for method in (hg.Implicit("cg", tol=1e-12, inner_tol=1e-12), hg.Full()):
        res = hg.hypergradient(obj, opt, h, 1000, method=method)
        assert abs(float(-res.loss * obj.N - obj.log_evidence(h))) < 1e-8  # ELBO at q* = log evidence
        for k in h:
            torch.testing.assert_close(res.grads[k], closed[k], rtol=1e-7, atol=1e-10)
            torch.testing.assert_close(-mackay[k] / obj.N, closed[k], rtol=1e-10, atol=1e-13)


def test_evidence_optimum_matches_the_direct_optimisation():
    c = cfg(hpo={"task": "evidence", "steps": 200}, method={"name": "hoag"}, evidence={"ard": False, "n": 30})
    task = EvidenceTask(c, torch.device("cpu"))
    run = descend(lambda h, g: task.hypergradient(task.objective, h, g), task.hyper, 200, 0.1, torch.Generator())
    direct, _ = task.direct()
    for k in ("log_alpha", "log_beta"):
        assert abs(float(run.hyper[k] - direct[k])) < 1e-3, (k, run.hyper[k], direct[k])
    assert abs(task.log_evidence(run.hyper) - task.log_evidence(direct)) < 1e-6


def test_bad_settings_name_their_field():
    cases = [
        ({"method": {"name": "reversible"}}, "method.name = 'reversible' needs a fixed momentum"),
        ({"hpo": {"task": "schedule"}, "method": "cg"}, "method.name = 'cg' is implicit"),
        ({"hpo": {"method": "cg"}}, 'hpo.method is gone: the [method] table now: write [method] name = "cg"'),
        ({"hpo": {"tol": 1e-8}}, "hpo.tol is gone: a field of its method's [method] table now: method.tol"),
        ({"method": {"name": "hoag", "k": 3}}, "method.k is not a setting of method 'hoag'"),
        ({"hpo": {"split": [0.5, 0.5]}}, "hpo.split"),
        ({"hpo": {"dataset": "mnist"}}, "hpo.dataset = 'mnist' is not allowed"),
        ({"l2": {"compare": ["hoag", "bogus"]}}, "l2.compare[1].name = 'bogus' is not a hypergradient method"),
        ({"l2": {"compare": ["full", {"name": "truncated"}]}}, "l2.compare[1].k is required by method 'truncated'"),
        ({"hpo": {"steps": 5}}, "l2.compare[5].k = 10 needs 1 <= k <= steps = 5"),
        ({"l2": {"low": 1.0, "high": 0.0}}, "l2.low = 1.0 must be below"),
        ({"cleaning": {"noise": 1.5}}, "cleaning.noise = 1.5"),
        ({"hpo": {"steps": 0}}, "hpo.steps = 0 must be >= 1"),
    ]
    for tables, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            cfg(**tables)
    with pytest.raises(ConfigError, match="evidence.coef has 5 entries"):
        EvidenceTask(cfg(hpo={"task": "evidence"}, evidence={"degree": 3, "coef": [1.0, 0, 0, 0, 1.0]}), "cpu")


def test_every_registered_method_runs_on_the_l2_task():
    """The recipe's methods are the package's name table: every registered method (reversible
    learning aside: it needs a constant momentum, not the task's learned step size), made from the
    [hpo] settings, runs on the per-feature L2 task; an unknown name is a config error."""
    bc = hd.table("breast_cancer")
    obj = L2LogReg(bc, "per_feature")
    s = hg.Settings(truncate=5, window=5, tol=1e-6, max_rounds=20, solve_iters=100, chunk_size=64)
    for name in hg.names():
        method = hg.as_method(name, 40, s)
        if method.skip_reason(optim.momentum(momentum=0.9), 30) or name == "reversible":
            continue
        res = hg.hypergradient(obj, optim.momentum(momentum=0.9), obj.init_hyper(-2.0), 40, method=method,
                               generator=torch.Generator())
        assert res.grads["log_lam"].shape == (1, bc.features) and torch.isfinite(res.grads["log_lam"]).all(), name
    with pytest.raises(ConfigError, match="method.name = 'bogus' is not a hypergradient method; use one of full"):
        cfg(method={"name": "bogus"})


def test_smoke_end_to_end(tmp_path):
    out = tmp_path / "run"
    ran = subprocess.run([sys.executable, "-m", "metaopt", "run", "hpo", "--preset", "smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads((out / "metrics.json").read_text())
    res = summary["results"]
    rows = res["rows"]
    learned = rows["hypergradient (hoag, 10 outer steps)"]
    assert learned["val_loss"] < rows["initial"]["val_loss"] - 0.01
    assert {"initial", "grid search, one lambda (10 points)", "random search, per_feature (10 samples)",
            "greedy T1-T2 (online)"} <= set(rows)
    methods = res["compare"]["methods"]
    assert set(methods) == {"hoag", "cg", "full", "truncated"}
    assert methods["cg"]["rel_error"] < 1e-4 and all(math.isfinite(m["val_loss"]) for m in methods.values())
    md = (out / "summary.md").read_text()
    assert "## HPO: L2 logistic regression on breast_cancer" in md and "| greedy T1-T2 (online) |" in md
    for fig in ("outer_loss.png", "methods.png", "penalties.png"):
        assert (out / "figures" / fig).is_file(), fig
    listed = subprocess.run([sys.executable, "-m", "metaopt", "list"], capture_output=True, text=True, timeout=120)
    assert "hpo" in listed.stdout and "cleaning" in listed.stdout


def test_train_to_tolerance_and_from_params0():
    bc = hd.table("breast_cancer")
    obj = L2LogReg(bc, "per_feature")
    h, opt = obj.init_hyper(-4.0), optim.momentum(momentum=0.9)

    def grad_norm(p):
        w = {k: v.clone().requires_grad_() for k, v in p.items()}
        g = torch.autograd.grad(obj.inner_loss(w, h, 0, None), list(w.values()))
        return float(torch.sqrt(sum((x**2).sum() for x in g)))

    short = hg.train(obj, opt, h, 50)
    assert grad_norm(short) > 1e-4
    done = hg.train(obj, opt, h, 50, tol=1e-10)
    assert grad_norm(done) <= 1e-10
    again = hg.train(obj, opt, h, 50, params0=done)  # a converged start stays converged
    torch.testing.assert_close(again["w"], done["w"], rtol=0, atol=1e-9)
    # at most 2 rounds of 50; the optimizer state carries over, so (full batch, constant rate) it is 100 steps
    capped = hg.train(obj, opt, h, 50, tol=1e-30, max_rounds=2)
    torch.testing.assert_close(capped["w"], hg.train(obj, opt, h, 100)["w"], rtol=1e-12, atol=1e-14)


def test_schedule_task_distributes_its_members_as_share_objectives():
    """distribute(world) returns the rank's share (the runner hands it to hypergradient); the shares'
    hypergradients add up to the whole one's."""
    from metaopt.recipes.hpo.schedule import ScheduleTask
    from metaopt.run import World

    c = cfg(hpo={"task": "schedule", "dataset": "digits", "steps": 4}, method="full",
            schedule={"hidden": [8], "members": 3, "batch": 32})
    whole = ScheduleTask(c, torch.device("cpu"))
    ref = whole.hypergradient(whole.objective, whole.hyper, torch.Generator().manual_seed(0))
    total = None
    for rank in range(2):
        task = ScheduleTask(c, torch.device("cpu"))
        world = World(rank, 2)
        share = task.distribute(world)
        assert share is not None and share is not task.objective and task.world is world
        res = task.hypergradient(share, task.hyper, torch.Generator().manual_seed(0))
        total = res.grads if total is None else {k: total[k] + v for k, v in res.grads.items()}
    for k in ref.grads:
        torch.testing.assert_close(total[k], ref.grads[k], rtol=1e-5, atol=1e-7)
    l2 = L2Task(cfg(hpo={"task": "l2", "dataset": "breast_cancer", "steps": 5}, l2={"compare": ["full"]}),
                torch.device("cpu"))
    assert l2.distribute(World(1, 2)) is None and l2.world.rank == 1  # one model: replicated
