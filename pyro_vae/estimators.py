"""ELBO estimators: Pyro's where they are right, small subclasses where they are not.

Conventions (DESIGN.md): every bound is in nats; ``elbo`` is higher-is-better and the
quantity minimised is ``loss = -elbo``. Pyro's ``loss`` methods return the loss of the
whole (scaled) data set; divide by the number of data points for nats per data point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from .errors import UserInputError
from .model import DATA_PLATE

#: Estimator names accepted by :func:`make_elbo`.
ESTIMATORS = ("mc", "analytic", "iwae", "renyi")
PARTICLE_PLATE = "num_particles_vectorized"


def make_elbo(
    name: str,
    num_particles: int = 1,
    *,
    alpha: float = 0.5,
    max_plate_nesting: int = 1,
) -> ELBO:
    """Build the estimator ``name`` with ``num_particles`` samples per data point.

    - ``"mc"``: :class:`pyro.infer.Trace_ELBO`, Monte Carlo KL, particles vectorized.
    - ``"analytic"``: :class:`pyro.infer.TraceMeanField_ELBO`, closed-form KL.
    - ``"iwae"``: importance-weighted bound L_K (Burda et al., 2016), per data point.
    - ``"renyi"``: Renyi bound of order ``alpha`` (Li & Turner, 2016), per data point.
    """
    if not isinstance(num_particles, int) or num_particles < 1:
        raise UserInputError(
            f"the number of particles must be an integer >= 1, got {num_particles}"
        )
    vectorize = num_particles > 1
    if name == "mc":
        return Trace_ELBO(
            num_particles=num_particles,
            vectorize_particles=vectorize,
            max_plate_nesting=max_plate_nesting,
        )
    if name == "analytic":
        return TraceMeanField_ELBO(
            num_particles=num_particles,
            vectorize_particles=vectorize,
            max_plate_nesting=max_plate_nesting,
        )
    if name == "iwae":
        return ImportanceWeightedELBO(num_particles, alpha=0.0, max_plate_nesting=max_plate_nesting)
    if name == "renyi":
        if alpha == 1:
            raise UserInputError("renyi with alpha = 1 is the ELBO: use --estimator mc")
        return ImportanceWeightedELBO(
            num_particles, alpha=alpha, max_plate_nesting=max_plate_nesting
        )
    raise UserInputError(f"unknown estimator {name!r}: choose one of {', '.join(ESTIMATORS)}")


# --------------------------------------------------------------------- shared plumbing
def particle_plate(num_particles: int, max_plate_nesting: int = 1) -> pyro.plate:
    """The outermost plate over particles, left of every model plate."""
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))


def _data_scale(trace: poutine.Trace) -> float:
    """``num_data / batch`` of the data plate (1 when the plate is not subsampled)."""
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            if frame.name == DATA_PLATE and frame.full_size is not None:
                return frame.full_size / frame.size
    return 1.0


def per_datapoint(site: dict, value: torch.Tensor, num_particles: int) -> torch.Tensor:
    """Check that ``value`` (a site's log-density) is ``(particles, batch)`` and return it."""
    in_data_plate = any(frame.name == DATA_PLATE for frame in site["cond_indep_stack"])
    if not in_data_plate or value.dim() != 2 or value.shape[0] != num_particles:
        raise UserInputError(
            f"site {site['name']!r} has a log-density of shape {tuple(value.shape)}, not "
            f"(particles, batch): per-data-point bounds need every sample site inside the "
            f"{DATA_PLATE!r} plate with its event dimensions declared (.to_event)"
        )
    return value


def sample_sites(trace: poutine.Trace) -> list[dict]:
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


# --------------------------------------------------------------------- IWAE and Renyi
class ImportanceWeightedELBO(ELBO):
    r"""Importance-weighted (alpha = 0) and Renyi bounds, per data point.

    With log-weights ``log w_k = log p(x, z_k) - log q(z_k | x)`` for K draws from the
    guide, the bound for each data point is

    .. math::
        L_{\alpha} = \frac{1}{1-\alpha} \log \frac{1}{K} \sum_k w_k^{1-\alpha},

    which for alpha = 0 is the IWAE bound L_K (Burda, Grosse & Salakhutdinov,
    "Importance Weighted Autoencoders", 2016) and for K = 1 is the ELBO. The log-sum-exp
    runs over particles separately for each data point, and the mini-batch scale
    ``num_data / batch`` multiplies the bound *after* it; scaling the log-weights before
    the log-sum-exp, as :class:`pyro.infer.RenyiELBO` does under a subsampled plate,
    gives a different, wrong objective. Site scales other than the data scale (KL
    warm-up) temper their log-densities inside the weight.

    The gradient is the reparameterised gradient of this bound; subclasses change it
    (DReG) by overriding :meth:`surrogate_bound`.
    """

    def __init__(self, num_particles: int = 5, alpha: float = 0.0, max_plate_nesting: int = 1):
        if alpha == 1:
            raise ValueError("alpha = 1 is the ELBO: use Trace_ELBO")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.alpha = float(alpha)

    def _get_trace(self, model, guide, args, kwargs):
        plate = particle_plate(self.num_particles, self.max_plate_nesting)
        return get_importance_trace(
            "flat", self.max_plate_nesting + 1, plate(model), plate(guide), args, kwargs
        )

    def log_weights(
        self, model_trace: poutine.Trace, guide_trace: poutine.Trace
    ) -> tuple[torch.Tensor, float]:
        """Per-particle, per-data-point log-weights ``(K, batch)`` and the data scale."""
        data_scale = _data_scale(model_trace)
        log_w = 0.0
        for site in sample_sites(model_trace):
            log_w = log_w + per_datapoint(site, site["log_prob"], self.num_particles)
        for site in sample_sites(guide_trace):
            if not site["fn"].has_rsample:
                raise UserInputError(
                    f"guide site {site['name']!r} is not reparameterizable; "
                    f"importance-weighted bounds here need a reparameterized guide"
                )
            log_w = log_w - per_datapoint(site, site["log_prob"], self.num_particles)
        return log_w / data_scale, data_scale

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """The bound per data point from log-weights ``(K, batch)``."""
        scaled = (1.0 - self.alpha) * log_w
        return (torch.logsumexp(scaled, 0) - math.log(self.num_particles)) / (1.0 - self.alpha)

    def surrogate_bound(
        self, model_trace: poutine.Trace, guide_trace: poutine.Trace, log_w: torch.Tensor
    ) -> torch.Tensor:
        """Per-data-point tensor whose gradient is the estimator's (default: the bound's)."""
        return self.bound(log_w)

    def _elbo_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = next(self._get_traces(model, guide, args, kwargs))
        log_w, data_scale = self.log_weights(model_trace, guide_trace)
        elbo = data_scale * self.bound(log_w.detach()).sum()
        surrogate = data_scale * self.surrogate_bound(model_trace, guide_trace, log_w).sum()
        return elbo, surrogate

    def _get_traces(self, model, guide, args, kwargs):
        yield self._get_trace(model, guide, args, kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """-bound of the data set (scaled mini-batch), as a float."""
        with torch.no_grad():
            elbo, _ = self._elbo_and_surrogate(model, guide, args, kwargs)
        return -elbo.item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-bound, differentiable with the estimator's gradient."""
        elbo, surrogate = self._elbo_and_surrogate(model, guide, args, kwargs)
        return -(elbo + (surrogate - surrogate.detach()))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        elbo, surrogate = self._elbo_and_surrogate(model, guide, args, kwargs)
        if surrogate.requires_grad:
            (-surrogate).backward()
        return -elbo.item()


# --------------------------------------------------------------------- ELBO, term by term
@dataclass
class ElboTerms:
    """The ELBO of each data point and its two terms, in nats (higher ELBO is better).

    ``elbo = expected_log_likelihood - kl``; ``kl_by_site`` splits ``kl`` by latent site.
    """

    elbo: torch.Tensor
    expected_log_likelihood: torch.Tensor
    kl: torch.Tensor
    kl_by_site: dict[str, torch.Tensor]


def vectorized_traces(
    model: Callable, guide: Callable, x: torch.Tensor, num_samples: int, **kwargs
) -> tuple[poutine.Trace, poutine.Trace]:
    """Run the guide with ``num_samples`` vectorized draws and the model replayed on them."""
    plate = particle_plate(num_samples)
    guide_trace = poutine.trace(plate(guide)).get_trace(x, **kwargs)
    model_trace = poutine.trace(poutine.replay(plate(model), trace=guide_trace)).get_trace(
        x, **kwargs
    )
    return model_trace, guide_trace


def elbo_terms(vae, x: torch.Tensor, kl: str = "analytic", num_samples: int = 1) -> ElboTerms:
    """ELBO per data point, split into expected log-likelihood and KL.

    ``kl="analytic"`` uses closed-form ``KL(q(z|x) || p(z))`` per latent site (as
    ``TraceMeanField_ELBO`` does; for a hierarchical model the conditional prior's KL is
    averaged over the samples of its parents); ``kl="mc"`` uses ``log q(z|x) - log p(z)``
    at the same samples (as ``Trace_ELBO``). The expected log-likelihood is averaged over
    ``num_samples`` draws of z in both cases. Works for any model/guide pair whose
    sites live in the ``"data"`` plate with observed sites and latent sites named alike.
    """
    if kl not in ("analytic", "mc"):
        raise UserInputError(f"kl must be 'analytic' or 'mc', got {kl!r}")
    x = vae.flatten(x)
    model_trace, guide_trace = vectorized_traces(vae.model, vae.guide, x, num_samples)
    log_likelihood = 0.0
    kl_by_site: dict[str, torch.Tensor] = {}
    for site in sample_sites(model_trace):
        log_p = per_datapoint(site, site["fn"].log_prob(site["value"]), num_samples)
        if site["is_observed"]:
            log_likelihood = log_likelihood + log_p
            continue
        guide_site = guide_trace.nodes[site["name"]]
        if kl == "analytic":
            kl_site = kl_divergence(guide_site["fn"], site["fn"])
            kl_site = kl_site.expand(log_p.shape)
        else:
            kl_site = guide_site["fn"].log_prob(guide_site["value"]) - log_p
        kl_by_site[site["name"]] = kl_site.mean(0)
    expected_log_likelihood = log_likelihood.mean(0)
    total_kl = sum(kl_by_site.values())
    return ElboTerms(
        elbo=expected_log_likelihood - total_kl,
        expected_log_likelihood=expected_log_likelihood,
        kl=total_kl,
        kl_by_site=kl_by_site,
    )


# --------------------------------------------------------------------- the seed's eq. 43
def tutorial_loss(vae, x: torch.Tensor, noise: torch.Tensor, kl: str = "analytic") -> torch.Tensor:
    r"""The seed tutorial's VAE loss in plain torch, per data point (nats, lower is better).

    ``kl="analytic"`` is its closed-form loss, eq. 43 (with the general-prior KL derived
    just before its eq. 40):

    .. math::
        \mathcal{L} = -\sum_j \Big[\log\frac{\sigma_{q,j}}{\sigma_{p,j}}
            - \frac{\sigma_{q,j}^2 + (\mu_{q,j} - \mu_{p,j})^2}{2\sigma_{p,j}^2}
            + \frac{1}{2}\Big] - \frac{1}{L}\sum_{l=1}^{L} \log p(x | z^{(l)}),
        \qquad z^{(l)} = \mu_q + \sigma_q \epsilon^{(l)};

    ``kl="mc"`` is its eq. 26 estimated at the same draws,
    ``-1/L sum_l [log p(x|z_l) + log p(z_l) - log q(z_l|x)]``.
    (Odaibo, "Tutorial: Deriving the Standard Variational Autoencoder (VAE) Loss
    Function", 2019.) ``noise`` holds the L draws of epsilon, ``(L, batch, latent_dim)``.
    This is the independent reference the Pyro estimators are tested against: no Pyro
    and no ``torch.distributions`` KL.
    """
    x = vae.flatten(x)
    q_loc, q_scale = vae.encoder(x)
    p_loc, p_scale = vae.prior_loc, vae.prior_scale
    z = q_loc + q_scale * noise
    reconstruction = vae.likelihood(vae.decoder(z)).log_prob(x).sum(-1).mean(0)
    if kl == "analytic":
        neg_kl = (
            torch.log(q_scale / p_scale)
            - (q_scale**2 + (q_loc - p_loc) ** 2) / (2 * p_scale**2)
            + 0.5
        ).sum(-1)
    elif kl == "mc":
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        log_p = (-0.5 * ((z - p_loc) / p_scale) ** 2 - torch.log(p_scale) - half_log_2pi).sum(-1)
        log_q = (-0.5 * noise**2 - torch.log(q_scale) - half_log_2pi).sum(-1)
        neg_kl = (log_p - log_q).mean(0)
    else:
        raise UserInputError(f"kl must be 'analytic' or 'mc', got {kl!r}")
    return -(neg_kl + reconstruction)


# --------------------------------------------------------------------- log-weights
def log_importance_weights(vae, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``log p(x, z_k) - log q(z_k | x)`` for ``num_samples`` draws, ``(K, batch)``.

    Unscaled (no mini-batch or annealing scale): the weights of the model as defined.
    """
    model_trace, guide_trace = vectorized_traces(vae.model, vae.guide, x, num_samples)
    log_w = 0.0
    for site in sample_sites(model_trace):
        log_w = log_w + per_datapoint(site, site["fn"].log_prob(site["value"]), num_samples)
    for site in sample_sites(guide_trace):
        log_w = log_w - per_datapoint(site, site["fn"].log_prob(site["value"]), num_samples)
    return log_w
