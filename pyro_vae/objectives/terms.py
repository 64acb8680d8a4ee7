"""An ELBO's two terms per data point, the tutorial's loss, and importance weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.distributions import kl_divergence

from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import PyroModel, as_batch, check_protocol, model_sites
from pyro_vae.objectives.registry import check_estimator_fits
from pyro_vae.objectives.traces import (
    Site,
    per_datapoint,
    sample_sites,
    site_total,
    vectorized_traces,
)

if TYPE_CHECKING:
    from pyro_vae.models.vae import VAE


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


def elbo_terms(
    vae: PyroModel, x: torch.Tensor, kl: str = "analytic", num_samples: int = 1
) -> ElboTerms:
    """ELBO per data point, split into expected log-likelihood and KL.

    ``kl="analytic"`` uses closed-form ``KL(q(z|x) || p(z))`` per latent site (as
    ``TraceMeanField_ELBO`` does; for a hierarchical model the conditional prior's KL is
    averaged over the samples of its parents); ``kl="mc"`` uses ``log q(z|x) - log p(z)``
    at the same samples (as ``Trace_ELBO``). The expected log-likelihood is averaged over
    ``num_samples`` draws of z in both cases. Works for any model of the protocol
    (:mod:`pyro_vae.models.protocol`).
    """
    check_elbo_terms(vae, x, kl)
    return unchecked_elbo_terms(vae, x, kl, num_samples)


def check_elbo_terms(vae: PyroModel, x: torch.Tensor, kl: str) -> None:
    """The checks :func:`elbo_terms` makes before it computes: the protocol, ``kl``, and
    for ``kl="analytic"`` that the closed form is this model's KL. They trace the programs
    on two points of ``x`` (the closed-form check under Pyro's provenance tracking, about
    13 ms for the default VAE), and depend on the model, not on the data: a caller that
    scores many batches of one model checks once and computes each batch with
    :func:`unchecked_elbo_terms`."""
    check_protocol(vae)
    if kl not in ("analytic", "mc"):
        raise UserInputError(f"kl must be 'analytic' or 'mc', got {kl!r}")
    if kl == "analytic":
        check_estimator_fits("analytic", vae, x)
    model_sites(vae, as_batch(vae, x))  # the protocol's checks (a data plate at dim -1)


def unchecked_elbo_terms(
    vae: PyroModel, x: torch.Tensor, kl: str, num_samples: int = 1
) -> ElboTerms:
    """:func:`elbo_terms` without its checks, for a batch of a model that
    :func:`check_elbo_terms` has passed (the same numbers: the checks draw nothing from
    the random stream)."""
    x = as_batch(vae, x)
    model_trace, guide_trace = vectorized_traces(vae.model, vae.guide, x, num_samples)
    log_likelihood: torch.Tensor | float = 0.0
    kl_by_site: dict[str, torch.Tensor] = {}
    for site in sample_sites(model_trace):
        log_p = per_datapoint(site, site["fn"].log_prob(site["value"]), num_samples)
        if site["is_observed"]:
            log_likelihood = log_likelihood + log_p
            continue
        guide_site: Site = guide_trace.nodes[site["name"]]
        if kl == "analytic":
            kl_site = kl_divergence(guide_site["fn"], site["fn"])
            kl_site = kl_site.expand(log_p.shape)
        else:
            kl_site = guide_site["fn"].log_prob(guide_site["value"]) - log_p
        kl_by_site[site["name"]] = kl_site.mean(0)
    expected_log_likelihood = site_total(log_likelihood).mean(0)
    total_kl = sum(kl_by_site.values(), torch.zeros_like(expected_log_likelihood))
    return ElboTerms(
        elbo=expected_log_likelihood - total_kl,
        expected_log_likelihood=expected_log_likelihood,
        kl=total_kl,
        kl_by_site=kl_by_site,
    )


# --------------------------------------------------------------------- the seed's eq. 43
def tutorial_loss(
    vae: VAE, x: torch.Tensor, noise: torch.Tensor, kl: str = "analytic"
) -> torch.Tensor:
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
    x = as_batch(vae, x)
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
def log_importance_weights(vae: PyroModel, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``log p(x, z_k) - log q(z_k | x)`` for ``num_samples`` draws, ``(K, batch)``.

    Unscaled (no mini-batch or annealing scale): the weights of the model as defined.
    """
    check_protocol(vae)
    model_trace, guide_trace = vectorized_traces(vae.model, vae.guide, x, num_samples)
    log_w: torch.Tensor | float = 0.0
    for site in sample_sites(model_trace):
        log_w = log_w + per_datapoint(site, site["fn"].log_prob(site["value"]), num_samples)
    for site in sample_sites(guide_trace):
        log_w = log_w - per_datapoint(site, site["fn"].log_prob(site["value"]), num_samples)
    return site_total(log_w)
