"""The bilevel problems of the ``hpo`` recipe, each a :class:`metaopt.MetaObjective`.

* :class:`L2LogReg` — logistic regression with L2 penalties ``exp(log_lam)`` (one, one per feature or
  one per weight), for ``C`` candidate hyperparameter settings at once (search baselines and dense
  validation curves are the same objective with more candidates);
* :class:`LearnedSchedule` — an MLP ensemble trained with one learning rate (and momentum) per inner
  step (Maclaurin et al. 2015);
* :class:`HyperCleaning` — one weight ``sigmoid(logit_i)`` per training example (Franceschi et al. 2017);
* :class:`Evidence` — the variational evidence bound of a linear-Gaussian model with ARD precisions,
  whose exact value (the log evidence) is known in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ...ensemble import Ensemble
from ...models import MLP, classification_loss, correct, hard_targets
from ...objective import MetaObjective
from ...optim import schedule
from .data import Regression, Split

Penalty = Literal["single", "per_feature", "per_weight"]


class L2LogReg(MetaObjective):
    """Logistic regression (binary: one logit; otherwise softmax) with penalty ``1/2 sum lam * w^2``.

    ``C`` candidates are trained at once, each with its own slice of ``hyper["log_lam"]``:
    ``[C]`` (``single``), ``[C, d]`` (``per_feature``, shared by the classes) or ``[C, d, K]``
    (``per_weight``). Params: ``w [C, d, K]``, ``b [C, K]`` (biases unpenalised), started at zero.
    The inner loss sums the candidates' mean training losses (each candidate's gradient is its own)
    and so does the outer loss on the validation set. The inner step size is ``1 / (L_data + max lam)``
    per candidate, below the inverse Lipschitz constant of the inner gradient, so any penalty converges.
    """

    def __init__(self, data: Split, penalty: Penalty = "per_feature", candidates: int = 1,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> None:
        if penalty not in ("single", "per_feature", "per_weight"):
            raise ValueError(f"penalty = {penalty!r}: use 'single', 'per_feature' or 'per_weight'")
        self.data = data.to(device, dtype)
        self.penalty, self.C, self.dtype, self.device = penalty, candidates, dtype, device
        self.K = 1 if data.classes == 2 else data.classes
        self.d = data.features
        X = self.data.X
        curvature = 0.25 if self.K == 1 else 0.5  # bound on the Hessian of the per-sample loss in the logits
        self.L_data = float(torch.linalg.matrix_norm(X, ord=2) ** 2) / X.shape[0] * curvature
        self._y = {s: hard_targets(getattr(self.data, f"y{s}"), self.K, dtype) for s in ("", "_val", "_test")}

    def hyper_shape(self, candidates: int | None = None) -> tuple[int, ...]:
        C = self.C if candidates is None else candidates
        return {"single": (C,), "per_feature": (C, self.d), "per_weight": (C, self.d, self.K)}[self.penalty]

    def init_hyper(self, log_lam: float) -> dict[str, Tensor]:
        return {"log_lam": torch.full(self.hyper_shape(), float(log_lam), dtype=self.dtype, device=self.device)}

    def lam(self, hyper: Mapping[str, Tensor]) -> Tensor:
        """The penalties broadcast to ``[C, d, K]``."""
        ll = hyper["log_lam"]
        if ll.shape != self.hyper_shape():
            raise ValueError(f"hyper['log_lam'] has shape {tuple(ll.shape)}; a {self.penalty} penalty for "
                             f"{self.C} candidate(s) needs {self.hyper_shape()}")
        lam = ll.exp()
        shape = {"single": (self.C, 1, 1), "per_feature": (self.C, self.d, 1), "per_weight": lam.shape}
        return lam.reshape(shape[self.penalty])

    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        z = lambda *s: torch.zeros(s, dtype=self.dtype, device=self.device)  # noqa: E731
        return {"w": z(self.C, self.d, self.K), "b": z(self.C, self.K)}

    def logits(self, params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        """``[C, N, K]``."""
        return torch.matmul(X, params["w"]) + params["b"].unsqueeze(1)

    def losses(self, params: Mapping[str, Tensor], split: str = "") -> Tensor:
        """Mean loss ``[C]`` of every candidate on ``split``: ``""`` (train), ``"_val"`` or ``"_test"``."""
        z = self.logits(params, getattr(self.data, f"X{split}"))
        y = self._y[split]
        C, N = z.shape[:2]
        return classification_loss(z.reshape(C * N, -1), y.repeat((C,) + (1,) * (y.dim() - 1))).reshape(C, N).mean(1)

    def accuracy(self, params: Mapping[str, Tensor], split: str = "_test") -> Tensor:
        z = self.logits(params, getattr(self.data, f"X{split}"))
        return correct(z, getattr(self.data, f"y{split}")).to(self.dtype).mean(1)

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: Any, batch: Any) -> Tensor:
        return self.losses(params).sum() + 0.5 * (self.lam(hyper) * params["w"] ** 2).sum()

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        return self.losses(params, "_val").sum()

    def hparams(self, hyper: Mapping[str, Tensor]) -> dict[str, Any]:
        # a smooth upper bound of max(lam) (the 8-norm, via logsumexp in log space): max itself has
        # no derivative where penalties tie, as they all do at the start
        lam_bound = (torch.logsumexp(8 * hyper["log_lam"].reshape(self.C, -1), dim=1) / 8).exp()
        return {"lr": 1.0 / (self.L_data + lam_bound)}


class LearnedSchedule(MetaObjective):
    """``members`` MLPs trained for ``steps`` momentum-SGD steps on random minibatches, with one
    learning rate ``exp(log_lr[k])`` per step and, optionally, one momentum ``sigmoid(logit_mom[k])``
    (Maclaurin et al. 2015). Every hypergradient draws fresh initialisations (Xavier) and batches,
    so the schedule is learned for the architecture, not for one set of weights. Outer loss: the
    members' mean validation cross-entropy after the last step.

    ``hold``: train only these members (one rank's share of a multi-process run): the random draws
    are all ``members``' and the outer loss is this share's terms of their mean, so the shares'
    hypergradients add up to the whole ensemble's.
    """

    def __init__(self, data: Split, hidden: list[int], members: int, steps: int, batch: int,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                 hold: list[int] | None = None) -> None:
        self.data = data.to(device, dtype)
        self.K = 1 if data.classes == 2 else data.classes
        mlp = MLP([data.features, *hidden, self.K], "relu")
        self.members = members
        self._all = Ensemble(mlp, members, init="xavier")
        self.hold = None if hold is None or len(hold) == members else torch.tensor(hold)
        self.held = list(range(members)) if hold is None else [int(i) for i in hold]
        self._config = {"data": data, "hidden": hidden, "members": members, "steps": steps, "batch": batch,
                        "dtype": dtype, "device": device}
        self.ens = self._all if self.hold is None else Ensemble(mlp, len(hold), init="xavier")
        self.steps, self.batch, self.dtype, self.device = steps, batch, dtype, device
        self._y = {s: hard_targets(getattr(self.data, f"y{s}"), self.K, dtype) for s in ("", "_val", "_test")}

    def ensemble_size(self) -> int:
        """The members this objective trains (all of them, or its ``hold``)."""
        return len(self.held)

    def share(self, members: Sequence[int]) -> LearnedSchedule:
        """Only ``members`` of this objective's (indices into its own, see :meth:`ensemble_size`)."""
        return LearnedSchedule(**self._config, hold=[self.held[i] for i in members])

    def init_hyper(self, lr: float, momentum: float | None) -> dict[str, Tensor]:
        """``{"log_lr": [steps]}`` and, with a ``momentum`` to learn, ``{"logit_mom": [steps]}``."""
        t = lambda v: torch.full((self.steps,), v, dtype=self.dtype, device=self.device)  # noqa: E731
        hyper = {"log_lr": t(math.log(lr))}
        if momentum is not None:
            hyper["logit_mom"] = t(math.log(momentum / (1 - momentum)))
        return hyper

    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        params = self._all.init_params(generator, dtype=self.dtype, device=self.device)
        return params if self.hold is None else {k: v[self.hold.to(v.device)] for k, v in params.items()}

    def inner_batch(self, k: int, generator: torch.Generator) -> Tensor:
        n = self.data.X.shape[0]
        return torch.randint(0, n, (min(self.batch, n),), generator=generator).to(self.device)

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: Any, batch: Tensor) -> Tensor:
        return self.ens.losses(params, self.data.X[batch], self._y[""][batch], classification_loss).sum()

    def split_losses(self, params: Mapping[str, Tensor], split: str) -> Tensor:
        """``[m]`` mean loss of every member on ``split`` (``"_val"`` or ``"_test"``)."""
        return self.ens.losses(params, getattr(self.data, f"X{split}"), self._y[split], classification_loss)

    def accuracy(self, params: Mapping[str, Tensor], split: str = "_test") -> Tensor:
        pred = self.ens(params, getattr(self.data, f"X{split}"))
        return correct(pred, getattr(self.data, f"y{split}")).to(self.dtype).mean(1)

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        losses = self.split_losses(params, "_val")
        return losses.mean() if self.hold is None else losses.sum() / self.members

    def hparams(self, hyper: Mapping[str, Tensor]) -> dict[str, Any]:
        hp: dict[str, Any] = {"lr": schedule.table(hyper["log_lr"], positive="exp")}
        if "logit_mom" in hyper:
            hp["momentum"] = schedule.table(hyper["logit_mom"], positive="sigmoid")
        return hp


class HyperCleaning(MetaObjective):
    """Data hyper-cleaning (Franceschi et al. 2017): softmax regression trained on noisy labels with
    one weight ``sigmoid(logit_i)`` per training example, ``steps`` full-batch gradient steps; the
    outer loss is the cross-entropy on a clean validation set. ``C`` independent cleanings (each its
    own ``logit [C, N]``) may run at once.

    Inner loss per cleaning: ``mean_i sigmoid(logit_i) * CE_i + 1/2 l2 ||W||^2``; step size
    ``1 / (L_data + l2)`` (weights are at most 1, so this bounds the curvature).
    """

    def __init__(self, data: Split, y_noisy: Tensor, l2: float = 1e-3, candidates: int = 1,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> None:
        self.data = data.to(device, dtype)
        self.y_noisy = y_noisy.to(device)
        self.K, self.d, self.C, self.l2 = data.classes, data.features, candidates, l2
        self.dtype, self.device = dtype, device
        X = self.data.X
        self.lr = 1.0 / (float(torch.linalg.matrix_norm(X, ord=2) ** 2) / X.shape[0] * 0.5 + l2)

    def init_hyper(self, weight: float = 0.5) -> dict[str, Tensor]:
        logit = math.log(weight / (1 - weight))
        return {"logit": torch.full((self.C, self.data.X.shape[0]), logit, dtype=self.dtype, device=self.device)}

    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        z = lambda *s: torch.zeros(s, dtype=self.dtype, device=self.device)  # noqa: E731
        return {"w": z(self.C, self.d, self.K), "b": z(self.C, self.K)}

    def per_example(self, params: Mapping[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
        """``[C, N]`` cross-entropies."""
        z = torch.matmul(X, params["w"]) + params["b"].unsqueeze(1)
        C, N = z.shape[:2]
        return classification_loss(z.reshape(C * N, -1), y.repeat(C)).reshape(C, N)

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: Any, batch: Any) -> Tensor:
        ce = self.per_example(params, self.data.X, self.y_noisy)
        return (torch.sigmoid(hyper["logit"]) * ce).mean(1).sum() + 0.5 * self.l2 * (params["w"] ** 2).sum()

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        return self.per_example(params, self.data.X_val, self.data.y_val).mean(1).sum()

    def accuracy(self, params: Mapping[str, Tensor], split: str = "_test") -> Tensor:
        z = torch.matmul(getattr(self.data, f"X{split}"), params["w"]) + params["b"].unsqueeze(1)
        return correct(z, getattr(self.data, f"y{split}")).to(self.dtype).mean(1)

    def hparams(self, hyper: Mapping[str, Tensor]) -> dict[str, Any]:
        return {"lr": self.lr}


class Evidence(MetaObjective):
    """Evidence maximisation for Bayesian linear regression ``y = Phi w + N(0, 1/beta)`` with the prior
    ``w ~ N(0, diag(alpha)^-1)``: hyper ``log_alpha`` (``[d]``, ARD, or ``[1]``, shared) and
    ``log_beta [1]``; inner params the variational posterior ``q(w) = N(mu, S S^T)`` with ``S``
    lower triangular (its diagonal through ``exp``), a family that holds the exact posterior.

    Inner and outer loss are both ``-ELBO / N`` in closed form (the expected log-likelihood and the
    Gaussian KL are analytic, no sampling), i.e. ``c_train = c_prior = c_reg = 1``: at the inner
    optimum ``q`` is the posterior, ``ELBO = log p(y | alpha, beta)``, and the hypergradient must be
    the analytic gradient of the log evidence (:meth:`log_evidence`, :meth:`mackay_gradient`).
    """

    def __init__(self, reg: Regression, ard: bool = True, step: float = 0.5,
                 device: torch.device | str = "cpu") -> None:
        self.Phi, self.y = reg.Phi.to(device), reg.y.to(device)
        self.N, self.d = self.Phi.shape
        self.ard, self.step, self.device = ard, step, device
        self.phi_norm2 = float(torch.linalg.matrix_norm(self.Phi, ord=2) ** 2)

    def init_hyper(self, alpha: float, beta: float) -> dict[str, Tensor]:
        t = lambda v, n: torch.full((n,), math.log(v), dtype=torch.float64, device=self.device)  # noqa: E731
        return {"log_alpha": t(alpha, self.d if self.ard else 1), "log_beta": t(beta, 1)}

    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """``q = `` the prior: ``mu = 0``, ``S = diag(alpha)^-1/2`` (through ``hyper``, so the unrolled
        hypergradient differentiates the start too). Started there, a pruned coefficient (huge
        ``alpha``) is already where it belongs; from ``S = I`` its variance would take ~alpha steps."""
        return {"mu": torch.zeros(self.d, dtype=torch.float64, device=self.device),
                "S": torch.diag_embed(-0.5 * hyper["log_alpha"].expand(self.d))}

    @staticmethod
    def cholesky(S_raw: Tensor) -> Tensor:
        return torch.tril(S_raw, -1) + torch.diag_embed(torch.diagonal(S_raw).exp())

    def elbo(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor]) -> Tensor:
        """``E_q log p(y | w, beta) - KL(q || p(w | alpha))``, exactly."""
        alpha = hyper["log_alpha"].exp().expand(self.d)
        log_beta = hyper["log_beta"][0]
        mu, S = params["mu"], self.cholesky(params["S"])
        resid = self.y - self.Phi @ mu
        expected_sq = (resid**2).sum() + ((self.Phi @ S) ** 2).sum()  # E_q ||y - Phi w||^2
        loglik = 0.5 * self.N * (log_beta - math.log(2 * math.pi)) - 0.5 * log_beta.exp() * expected_sq
        var = (S**2).sum(1)  # diag(S S^T)
        logdet_q = 2 * torch.diagonal(params["S"]).sum()
        kl = 0.5 * ((alpha * (var + mu**2)).sum() - self.d - torch.log(alpha).sum() - logdet_q)
        return loglik - kl

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: Any, batch: Any) -> Tensor:
        return -self.elbo(params, hyper) / self.N

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        return -self.elbo(params, hyper) / self.N

    def hparams(self, hyper: Mapping[str, Tensor]) -> dict[str, Any]:
        """Row-wise preconditioned steps: coefficient ``i`` (``mu_i`` and row ``i`` of ``S``) moves with
        ``step * N / (beta ||Phi||^2 + alpha_i)``, the inverse of a bound on its curvature, so the inner
        problem stays well conditioned however large the pruned precisions grow."""
        alpha = hyper["log_alpha"].exp().expand(self.d)
        rate = self.step * self.N / (hyper["log_beta"][0].exp() * self.phi_norm2 + alpha)
        return {"lr": {"mu": rate, "S": rate}}

    # -- the closed forms ------------------------------------------------------------------------

    def log_evidence(self, hyper: Mapping[str, Tensor]) -> Tensor:
        """``log N(y | 0, I / beta + Phi diag(alpha)^-1 Phi^T)``, differentiable in ``hyper``, in the
        weight-space form (Bishop 2006, eq. 3.86, with ARD): ``sum log(alpha) / 2 + N log(beta) / 2
        - beta ||y - Phi m||^2 / 2 - m^T diag(alpha) m / 2 - log|P| / 2 - N log(2 pi) / 2`` with the
        posterior precision ``P = beta Phi^T Phi + diag(alpha)`` and mean ``m`` (a d x d Cholesky:
        stable when precisions grow without bound, as ARD's pruned ones do)."""
        alpha = hyper["log_alpha"].exp().expand(self.d)
        log_beta = hyper["log_beta"][0]
        beta = log_beta.exp()
        P = beta * self.Phi.T @ self.Phi + torch.diag(alpha)
        chol = torch.linalg.cholesky(P)
        m = beta * torch.cholesky_solve((self.Phi.T @ self.y).unsqueeze(1), chol).squeeze(1)
        fit = beta * ((self.y - self.Phi @ m) ** 2).sum() + (alpha * m**2).sum()
        logdet = 2 * torch.log(torch.diagonal(chol)).sum()
        log_alpha = hyper["log_alpha"].expand(self.d)
        return 0.5 * (log_alpha.sum() + self.N * log_beta - fit - logdet - self.N * math.log(2 * math.pi))

    def posterior(self, hyper: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The exact posterior ``(mean [d], covariance [d, d])``."""
        alpha = hyper["log_alpha"].exp().expand(self.d)
        beta = hyper["log_beta"][0].exp()
        chol = torch.linalg.cholesky(beta * self.Phi.T @ self.Phi + torch.diag(alpha))
        cov = torch.cholesky_inverse(chol)
        return beta * torch.cholesky_solve((self.Phi.T @ self.y).unsqueeze(1), chol).squeeze(1), cov

    def mackay_gradient(self, hyper: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """MacKay (1992)'s gradient of the log evidence in the log-parametrisation:
        ``d/dlog alpha_i = (1 - alpha_i (Sigma_ii + m_i^2)) / 2`` (summed for a shared alpha) and
        ``d/dlog beta = (N - beta (||y - Phi m||^2 + tr(Phi Sigma Phi^T))) / 2``."""
        alpha = hyper["log_alpha"].exp().expand(self.d)
        beta = hyper["log_beta"][0].exp()
        m, cov = self.posterior(hyper)
        g_alpha = 0.5 * (1 - alpha * (torch.diagonal(cov) + m**2))
        resid = self.y - self.Phi @ m
        g_beta = 0.5 * (self.N - beta * ((resid**2).sum() + torch.trace(self.Phi @ cov @ self.Phi.T)))
        return {"log_alpha": g_alpha if self.ard else g_alpha.sum(0, keepdim=True), "log_beta": g_beta.reshape(1)}
