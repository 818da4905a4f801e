"""The ``hpo`` recipe's markdown summaries: one per task, of the results of its ``report`` (the
final protocol, which each task's module runs: :mod:`.l2`, :mod:`.schedule`, :mod:`.cleaning`,
:mod:`.evidence`)."""

from __future__ import annotations

from typing import Any

from ..report import md_table


def l2(results: dict[str, Any]) -> str:
    """Markdown of the L2 task: settings against searches, the dense curve, the methods side by side."""
    r = results
    lines = [f"## HPO: L2 logistic regression on {r['dataset']} ({r['penalty']}, {r['hyperparameters']} "
             f"hyperparameters)", "",
             f"Train / validation / test: {' / '.join(map(str, r['splits']))}. Every setting judged by "
             "retraining to convergence; search picks by validation loss.", ""]
    lines += md_table(["setting", "val loss", "val acc", "test loss", "test acc", "trainings"],
                      [[k, v["val_loss"], v["val_acc"], v["test_loss"], v["test_acc"],
                        v["trainings"]] for k, v in r["rows"].items()])
    if "curve" in r:
        c = r["curve"]
        lines += ["", f"Dense validation curve ({len(c['log_lam'])} values of one log lambda, spacing "
                  f"{c['spacing']:.3g}): minimum {c['min_val_loss']:.5g} at log lambda = "
                  f"{c['argmin_log_lam']:.3f}."]
        if "learned_log_lam" in c:
            lines.append(f"The hypergradient's single lambda: log lambda = {c['learned_log_lam']:.3f}, validation "
                         f"loss {c['learned_val_loss']:.5g}.")
    if "compare" in r:
        cm = r["compare"]
        lines += ["", f"Methods from the same start, {cm['outer_steps']} outer steps each (error: relative to "
                  "the converged implicit hypergradient at the start):", ""]
        rows = []
        for name, m in cm["methods"].items():
            if "error" in m:
                rows.append([name, m["rel_error"], m["cosine"], f"failed: {m['error']}"] + [""] * 8)
                continue
            rows.append([name, m["rel_error"], m["cosine"], m["seconds_per_hypergradient"], m["seconds"],
                         m["inner_steps"], m["matvecs"], f"{m['peak_bytes'] / 1024:.0f}", m["val_loss"],
                         m["val_acc"], m["test_loss"], m["test_acc"]])
        lines += md_table(["method", "rel. error", "cosine", "s / hypergradient", "total s", "inner steps",
                           "matvecs", "stored KiB", "final val loss", "val acc", "test loss", "test acc"], rows)
    return "\n".join(lines) + "\n"


def schedule(results: dict[str, Any]) -> str:
    """Markdown of the schedule task: learned against the best constant schedule."""
    r = results
    lines = [f"## HPO: learned schedule, MLP on {r['dataset']}, {r['steps']} inner steps", "",
             f"Mean ± std over {r['eval_inits']} fresh initialisations trained on one batch sequence (the same for "
             "every row).",
             ""]
    cell = lambda c: f"{c['mean']:.4f} ± {c['std']:.4f}"  # noqa: E731
    lines += md_table(["schedule", "val loss", "test loss", "test acc"],
                      [[k, cell(v["val_loss"]), cell(v["test_loss"]), cell(v["test_acc"])]
                       for k, v in r["rows"].items()])
    lines += ["", f"The learned schedule has the lower test loss on {100 * r['paired_test_loss_wins']:.0f}% of the "
              "initialisations (paired with the best constant rate).", ""]
    return "\n".join(lines)


def cleaning(results: dict[str, Any]) -> str:
    """Markdown of the hyper-cleaning task: flagged examples and accuracy against the baselines."""
    r = results
    lines = [f"## HPO: data hyper-cleaning on {r['dataset']}", "",
             f"{r['corrupted']} of {r['examples']} training labels replaced by a random other class; "
             f"flagged = weight < {r['threshold']}.", ""]
    lines += md_table(["training data", "val loss", "test acc", "precision", "recall", "F1", "trainings"],
                      [[k, v["val_loss"], v["test_acc"], v.get("precision", ""), v.get("recall", ""),
                        v.get("f1", ""), v["trainings"]] for k, v in r["rows"].items()])
    return "\n".join(lines) + "\n"


def evidence(results: dict[str, Any]) -> str:
    """Markdown of the evidence task: log evidence against search and L-BFGS, and the hypergradient identity."""
    r = results
    true = [i for i, c in enumerate(r["true_coef"]) if c != 0]
    lines = [f"## HPO: evidence maximisation, polynomial regression ({r['n']} points, {r['features']} Legendre "
             f"features, {'ARD' if r['ard'] else 'one shared precision'})", "",
             f"True non-zero coefficients: {true}; noise std {r['noise']} (beta = {1 / r['noise'] ** 2:.4g}).", ""]
    lines += md_table(["setting", "log evidence", "test RMSE", "beta", "kept coefficients", "trainings"],
                      [[k, v["log_evidence"], v["test_rmse"], v["beta"], v["kept"], v["trainings"]]
                       for k, v in r["rows"].items()])
    a, s, e = r["agreement"], r["identity_at_start"], r["identity_at_end"]
    lines += ["", f"Bilevel vs direct: log-evidence gap {a['log_evidence_gap']:.3g}, same kept coefficients: "
              f"{a['same_kept_coefficients']}, largest relative alpha gap among kept "
              f"{a['max_rel_alpha_gap_kept']:.3g}, relative beta gap {a['rel_beta_gap']:.3g}.", "",
              "Hypergradient against the closed-form evidence gradient (relative error; at the end, where the "
              "gradient is nearly zero, the absolute error's norm):", ""]
    lines += md_table(
        ["", "gradient norm", "implicit CG", "full unroll", "ELBO - log evidence (CG)", "MacKay's formula"],
        [["start", s["gradient_norm"], f"{s['implicit_cg_rel_error']:.2g}", f"{s['full_unroll_rel_error']:.2g}",
          f"{s['implicit_cg_elbo_minus_log_evidence']:.2g}", f"{s['mackay_rel_error']:.2g}"],
         ["end", e["gradient_norm"], f"{e['implicit_cg_abs_error']:.2g} (abs.)",
          f"{e['full_unroll_abs_error']:.2g} (abs.)", f"{e['implicit_cg_elbo_minus_log_evidence']:.2g}",
          f"{e['mackay_rel_error']:.2g}"]])
    lines.append("")
    return "\n".join(lines)
