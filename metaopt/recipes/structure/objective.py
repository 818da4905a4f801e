"""Variational structure selection as a bilevel :class:`metaopt.MetaObjective` (Bakhteev & Strijov).

Model: a :class:`~.graph.StructureGraph`. Prior: weights ``W ~ N(0, A^-1)`` (diagonal precision ``A``,
one value per weight tensor or per weight), structure weights ``gamma_e ~ Concrete(m_e, c_temp)``
per edge. Variational posterior (the inner parameters ``theta``): ``q(W) = N(mu, diag sigma^2)``
(``sigma = exp(rho)``) and ``q(gamma_e) = Concrete(alpha_e, q_temp)``, sampled by reparameterisation
from noise drawn before the inner run (so every recomputation of the reverse sweep sees it).

    inner   L(theta; h) = E_q log p(y | X, W, Gamma) - c_reg KL(q || p)                    (maximised)
    outer   Q(h)        = c_train E_q log p - c_prior KL(q || p) - c_comb sum_{p' in P} KL(q(Gamma) || p')
                          [+ log p(A^-1) for an inverse-gamma hyperprior]

with ``h = (log A, m)``. The Gaussian KL is closed form; the Concrete KL is a Monte Carlo estimate
with the Concrete density (in log space, :class:`torch.distributions.relaxed_categorical.ExpRelaxedCategorical`,
stable near the vertices). Both losses are returned negated and divided by the number of training
points ``N``. ``c_comb`` enters with the sign written above (the slides' formula): positive values
pull ``q(Gamma)`` *towards* the distributions in ``P``, negative ones push it away.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

from ...objective import MetaObjective
from .graph import StructureGraph


@dataclass
class Coefficients:
    """The trade-off coefficients of the inner and outer objectives (all 1 and ``comb = 0``:
    evidence maximisation)."""

    train: float = 1.0  # c_train: outer weight of the expected log-likelihood
    reg: float = 1.0  # c_reg: inner weight of KL(q || p)
    prior: float = 1.0  # c_prior: outer weight of KL(q || p)
    comb: float = 0.0  # c_comb: outer weight of sum_{p' in P} KL(q(Gamma) || p')
    temp: float = 1.0  # c_temp: temperature of the structure prior
    q_temp: float | None = None  # temperature of q(Gamma) (None: c_temp)

    @property
    def posterior_temp(self) -> float:
        return self.temp if self.q_temp is None else self.q_temp


def gaussian_kl(mu: Tensor, rho: Tensor, log_precision: Tensor) -> Tensor:
    """``KL(N(mu, exp(2 rho)) || N(0, exp(-log_precision)))`` summed over elements, in closed form
    (``log_precision`` broadcasts against ``mu``)."""
    A = log_precision.exp()
    return 0.5 * (A * ((2 * rho).exp() + mu**2) - 1 - log_precision - 2 * rho).sum()


def concrete_sample(logits: Tensor, temperature: float, uniform: Tensor) -> Tensor:
    """Reparameterised Concrete sample in log space ``log gamma [S, K]`` from ``uniform [S, K]``
    noise in (0, 1): ``log softmax((logits + G) / temperature)``, ``G = -log(-log u)`` (the
    parametrisation of :class:`~torch.distributions.RelaxedOneHotCategorical`)."""
    gumbel = -torch.log(-torch.log(uniform))
    return torch.log_softmax((logits + gumbel) / temperature, dim=-1)


def concrete_log_prob(log_gamma: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """Log density of the Concrete distribution in log space at ``log_gamma [S, K]``: ``[S]``."""
    t = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    return ExpRelaxedCategorical(t, logits=logits, validate_args=False).log_prob(log_gamma)


class StructureSelection(MetaObjective):
    """The bilevel structure-selection problem on data ``X [N, d]``, ``y [N]``.

    Args:
        graph: the network of candidate basis functions.
        likelihood: ``"gaussian"`` (regression, fixed ``noise_std``) or ``"categorical"`` (``y`` class
            indices, the output node's width = classes).
        samples: Monte Carlo samples ``S`` of ``(W, Gamma)`` per evaluation.
        batch: training points per inner step (``None``: all; the expected log-likelihood is scaled
            to the whole training set).
        coef: the coefficients ``c_*``.
        avoid: the set ``P``, structure distributions as ``{edge name: logits [K]}`` (at ``c_temp``).
        precision: ``"per_tensor"`` (one ``A`` per weight tensor) or ``"per_weight"`` (full diagonal).
        scale_by_gamma: the thesis's prior scaled by the structure: variance ``gamma_h / A`` for the
            weights of basis function ``h``, so an unselected function's weights are pulled to 0.
        invgamma: ``(a, b)`` of an inverse-gamma hyperprior on every ``A^-1`` (``None``: flat).
        common_noise: draw the same noise for every inner step and for the outer loss (common random
            numbers: ``L`` and ``Q`` are then deterministic functions, as implicit methods and the
            single-level identity need); otherwise fresh noise per step, a fixed-seed draw per call.
    """

    def __init__(
        self, graph: StructureGraph, X: Tensor, y: Tensor, likelihood: Literal["gaussian", "categorical"] = "gaussian",
        noise_std: float = 0.1, samples: int = 4, batch: int | None = None,
        coef: Coefficients | None = None, avoid: Sequence[Mapping[str, Tensor]] = (),
        precision: Literal["per_tensor", "per_weight"] = "per_tensor", scale_by_gamma: bool = False,
        invgamma: tuple[float, float] | None = None, common_noise: bool = False, init_std: float = 1e-2,
        dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
    ) -> None:
        if likelihood not in ("gaussian", "categorical"):
            raise ValueError(f"likelihood = {likelihood!r}: use 'gaussian' or 'categorical'")
        if precision not in ("per_tensor", "per_weight"):
            raise ValueError(f"precision = {precision!r}: use 'per_tensor' or 'per_weight'")
        if likelihood == "gaussian" and graph.widths[-1] != 1:
            raise ValueError(f"a gaussian likelihood needs one output (the graph's last width is {graph.widths[-1]})")
        self.graph, self.likelihood, self.noise_std = graph, likelihood, noise_std
        self.X, self.y = X.to(device, dtype), y.to(device)
        if likelihood == "gaussian":
            self.y = self.y.to(dtype)
        self.N = X.shape[0]
        self.S, self.batch, self.coef = samples, batch, coef or Coefficients()
        self.avoid = [dict(p) for p in avoid]
        self.precision, self.scale_by_gamma, self.invgamma = precision, scale_by_gamma, invgamma
        self.common_noise, self.init_std, self.dtype, self.device = common_noise, init_std, dtype, device
        self.shapes = graph.weight_shapes()

    # -- hyperparameters and parameters -----------------------------------------------------------

    def init_hyper(self, precision: float = 1.0) -> dict[str, Tensor]:
        """``log A`` (``"logA.<weight>"``) at ``precision`` and prior locations ``m`` (``"m.<edge>"``) at 0."""
        h: dict[str, Tensor] = {}
        for name, shape in self.shapes.items():
            s = () if self.precision == "per_tensor" else shape
            h[f"logA.{name}"] = torch.full(s, math.log(precision), dtype=self.dtype, device=self.device)
        for e in self.graph.edges:
            h[f"m.{e.name}"] = torch.zeros(len(e.basis), dtype=self.dtype, device=self.device)
        return h

    def init_params(self, hyper: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """``mu`` Glorot-like (``N(0, 1 / fan_in)``, biases 0), ``rho = log(init_std)``, ``alpha = 0``."""
        p: dict[str, Tensor] = {}
        for name, shape in self.shapes.items():
            if name.split(".")[-1].startswith("W"):
                std = 1.0 / math.sqrt(shape[0])
                p[f"mu.{name}"] = (torch.randn(shape, generator=generator, dtype=self.dtype) * std).to(self.device)
            else:
                p[f"mu.{name}"] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            p[f"rho.{name}"] = torch.full(shape, math.log(self.init_std), dtype=self.dtype, device=self.device)
        for e in self.graph.edges:
            p[f"alpha.{e.name}"] = torch.zeros(len(e.basis), dtype=self.dtype, device=self.device)
        return p

    def noise(self, generator: torch.Generator, samples: int | None = None) -> dict[str, Tensor]:
        """``eps.<weight> [S, *shape]`` standard normal and ``u.<edge> [S, K]`` uniform in (0, 1)
        (``S = samples``, by default the objective's own)."""
        S = samples or self.S
        out = {f"eps.{n}": torch.randn((S, *s), generator=generator, dtype=self.dtype).to(self.device)
               for n, s in self.shapes.items()}
        for e in self.graph.edges:
            u = torch.rand((S, len(e.basis)), generator=generator, dtype=self.dtype)
            out[f"u.{e.name}"] = u.clamp(1e-12, 1 - 1e-12).to(self.device)
        return out

    def _draw(self, generator: torch.Generator) -> dict[str, Any]:
        batch: dict[str, Any] = {"noise": self.noise(torch.Generator().manual_seed(0) if self.common_noise
                                                     else generator)}
        if self.batch is not None and self.batch < self.N:  # minibatches stay random under common noise
            batch["idx"] = torch.randperm(self.N, generator=generator)[: self.batch].to(self.device)
        return batch

    def inner_batch(self, k: int, generator: torch.Generator) -> dict[str, Any]:
        return self._draw(generator)

    def outer_batch(self, generator: torch.Generator) -> dict[str, Any]:
        return {"noise": self._draw(generator)["noise"]}  # the outer loss sees all training points

    # -- the pieces of the objectives -------------------------------------------------------------

    def sample(
        self, params: Mapping[str, Tensor], noise: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Reparameterised ``W [S, *shape]`` and ``log gamma [S, K]`` per edge."""
        W = {n: params[f"mu.{n}"] + params[f"rho.{n}"].exp() * noise[f"eps.{n}"] for n in self.shapes}
        t = self.coef.posterior_temp
        log_gamma = {e.name: concrete_sample(params[f"alpha.{e.name}"], t, noise[f"u.{e.name}"])
                     for e in self.graph.edges}
        return W, log_gamma

    def expected_loglik(self, params: Mapping[str, Tensor], noise: Mapping[str, Tensor],
                        idx: Tensor | None = None) -> Tensor:
        """Monte Carlo ``E_q log p(y | X, W, Gamma)`` over the whole training set (a minibatch ``idx``
        is scaled by ``N / B``)."""
        W, log_gamma = self.sample(params, noise)
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        out = self.graph.forward(W, {k: v.exp() for k, v in log_gamma.items()}, X)  # [S, B, out]
        return self.log_likelihood(out, y).mean(0).sum() * (self.N / X.shape[0])

    def log_likelihood(self, out: Tensor, y: Tensor) -> Tensor:
        """``[S, B]`` log p(y | outputs) for the graph's outputs ``out [S, B, widths[-1]]``."""
        if self.likelihood == "gaussian":
            var = self.noise_std**2
            return -0.5 * ((y - out[..., 0]) ** 2 / var + math.log(2 * math.pi * var))
        S, B, C = out.shape
        return -F.cross_entropy(out.reshape(S * B, C), y.repeat(S), reduction="none").reshape(S, B)

    def kl_weights(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor],
                   log_gamma: Mapping[str, Tensor] | None = None) -> Tensor:
        """``KL(q(W) || p(W | A))``: closed form; with ``scale_by_gamma`` the prior variance of basis
        ``h``'s weights is ``gamma_h / A``, averaged over the samples of ``gamma``."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for n in self.shapes:
            logA = hyper[f"logA.{n}"]
            if self.scale_by_gamma:
                edge, h = n.split(".")[:2]
                # variance gamma_h / A; log gamma clamped at -20 so near-vertex samples keep a finite KL
                lg = log_gamma[edge][:, int(h)].clamp_min(-20.0)
                logA = logA - lg.reshape(-1, *([1] * len(self.shapes[n])))  # [S, *shape]
                kl = torch.stack([gaussian_kl(params[f"mu.{n}"], params[f"rho.{n}"], la) for la in logA]).mean()
            else:
                kl = gaussian_kl(params[f"mu.{n}"], params[f"rho.{n}"], logA)
            total = total + kl
        return total

    def kl_structure(self, params: Mapping[str, Tensor], log_gamma: Mapping[str, Tensor],
                     prior: Mapping[str, Tensor], prior_temp: float) -> Tensor:
        """Monte Carlo ``KL(q(Gamma) || Concrete(prior, prior_temp))`` from the samples ``log_gamma``."""
        t = self.coef.posterior_temp
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for e in self.graph.edges:
            z = log_gamma[e.name]
            lq = concrete_log_prob(z, params[f"alpha.{e.name}"], t)
            lp = concrete_log_prob(z, prior[e.name], prior_temp)
            total = total + (lq - lp).mean()
        return total

    def kl(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], noise: Mapping[str, Tensor]) -> Tensor:
        """``KL(q(W, Gamma) || p(W, Gamma | A, m))`` (q factorises: the two KLs add)."""
        _, log_gamma = self.sample(params, noise)
        m = {e.name: hyper[f"m.{e.name}"] for e in self.graph.edges}
        return self.kl_weights(params, hyper, log_gamma) + self.kl_structure(params, log_gamma, m, self.coef.temp)

    def hyperprior(self, hyper: Mapping[str, Tensor]) -> Tensor:
        """``sum log p(log A)`` for ``A^-1 ~ InvGamma(a, b)`` (with the Jacobian of ``log A``); 0 if flat."""
        if self.invgamma is None:
            return torch.zeros((), dtype=self.dtype, device=self.device)
        a, b = self.invgamma
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for n in self.shapes:
            log_v = -hyper[f"logA.{n}"]  # log of the variance A^-1
            total = total + (a * math.log(b) - math.lgamma(a) - a * log_v - b * torch.exp(-log_v)).sum()
        return total

    # -- MetaObjective ----------------------------------------------------------------------------

    def inner_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], k: Any, batch: Any) -> Tensor:
        noise = batch["noise"]
        ll = self.expected_loglik(params, noise, batch.get("idx"))
        return -(ll - self.coef.reg * self.kl(params, hyper, noise)) / self.N

    def outer_loss(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor], batch: Any) -> Tensor:
        noise = batch["noise"]
        c = self.coef
        q = c.train * self.expected_loglik(params, noise) - c.prior * self.kl(params, hyper, noise)
        if c.comb and self.avoid:
            _, log_gamma = self.sample(params, noise)
            q = q - c.comb * sum(self.kl_structure(params, log_gamma, p, c.temp) for p in self.avoid)
        return -(q + self.hyperprior(hyper)) / self.N

    # -- reported quantities ----------------------------------------------------------------------

    def structure_probs(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``softmax(alpha_e)`` per edge: the probability that a sample's argmax picks each basis
        function (the Gumbel-max property of the Concrete distribution)."""
        return {e.name: torch.softmax(params[f"alpha.{e.name}"].detach(), -1) for e in self.graph.edges}

    def selected(self, params: Mapping[str, Tensor]) -> dict[str, str]:
        """The most probable basis function of every edge."""
        probs = self.structure_probs(params)
        return {e.name: e.basis[int(probs[e.name].argmax())] for e in self.graph.edges}

    def structural_entropy(self, params: Mapping[str, Tensor]) -> float:
        """``C_struct``: the entropy of the distribution over discrete structures that ``q(Gamma)``
        induces (a sample's argmax per edge, ``Categorical(softmax(alpha_e))``), summed over edges; 0
        when every edge's ``q`` has collapsed onto one vertex. (The Concrete's own differential
        entropy goes to minus infinity as its temperature goes to 0, so it is not the measure.)"""
        total = 0.0
        for e in self.graph.edges:
            logp = torch.log_softmax(params[f"alpha.{e.name}"].detach(), -1)
            total += float(-(logp.exp() * logp).sum())
        return total

    def parametric_complexity(self, params: Mapping[str, Tensor], hyper: Mapping[str, Tensor]) -> float:
        """``C_param`` at the given prior: ``KL(q(W) || p(W | A))`` (closed form, without ``scale_by_gamma``)."""
        with torch.no_grad():
            return float(sum(gaussian_kl(params[f"mu.{n}"], params[f"rho.{n}"], hyper[f"logA.{n}"])
                             for n in self.shapes))


def structure_logits(probs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Concrete locations (logits) of structure distributions given as probabilities (for ``avoid``)."""
    return {k: torch.log(v.clamp_min(1e-12)) for k, v in probs.items()}
