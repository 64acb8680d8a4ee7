"""Your own model and your own estimator, named by import path in every tool.

Put this file's folder on ``PYTHONPATH`` and name its objects by ``module:name``::

    PYTHONPATH=examples pyro-vae train --model own_code:conv_vae --model-option width=16 \\
        --estimator own_code:BETA_ELBO --estimator-option beta=2.0 --epochs 3 --out runs/own
    PYTHONPATH=examples pyro-vae evaluate runs/own
    PYTHONPATH=examples pyro-vae compare --model own_code:conv_vae \\
        --estimators mc,own_code:BETA_ELBO,pyro.infer:RenyiELBO --out runs/own-compare

The run folder's ``config.json`` records both import paths, so that ``evaluate``,
``sample``, ``diagnose``, ``--resume``, ``sweep`` and Ray workers rebuild them.

- :func:`conv_vae`: a model factory. It takes the data's shape (``(C, H, W)`` for
  images; the data reach the programs flattened, ``(batch, C*H*W)``) and keyword
  options, and returns an ``nn.Module`` with ``model(x)`` and ``guide(x)``: here a VAE
  whose encoder and decoder have three convolutional layers each.
- :data:`BETA_ELBO`: an estimator spec (:class:`pyro_vae.Estimator`) with a typed option:
  the beta-VAE objective ``E_q[log p(x|z)] - beta KL(q(z|x) || p(z))`` (Higgins et al.,
  2017), with a Monte Carlo KL. It is the ELBO at ``beta = 1`` and not a lower bound on
  log p(x) for ``beta < 1``; the spec says ``is_bound=False`` so that no report treats
  its value as one.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae import Estimator, Option
from pyro_vae.objectives.traces import ParticleELBO, data_scale, sample_sites, site_log_density


def _flat(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Leading dimensions (samples, batch) folded into one, for the convolutions."""
    return x.reshape(-1, *shape)


class ConvVAE(nn.Module):
    """Three stride-1/2/2 convolutions each way, a diagonal Gaussian q(z|x), a N(0, I)
    prior and a Bernoulli likelihood per pixel."""

    def __init__(self, data_shape: tuple[int, ...], latent: int = 8, width: int = 16) -> None:
        super().__init__()
        channels, height, wide = data_shape
        if height % 4 or wide % 4:
            raise ValueError(f"conv_vae needs images whose sides divide by 4, got {data_shape}")
        self.data_shape, self.latent = tuple(data_shape), latent
        self.grid = (2 * width, height // 4, wide // 4)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(math.prod(self.grid), 2 * latent),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent, math.prod(self.grid)),
            nn.Unflatten(1, self.grid),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Flatten(),
        )

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.latent), 1.0).expand([x.shape[0], self.latent])
            z = pyro.sample("z", prior.to_event(1))
            logits = self.decoder(z.reshape(-1, self.latent)).reshape(*z.shape[:-1], -1)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(_flat(x, self.data_shape)).chunk(2, -1)
            scale = nn.functional.softplus(raw) + 1e-4
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def conv_vae(data_shape: tuple[int, ...], latent: int = 8, width: int = 16) -> ConvVAE:
    """The model factory ``own_code:conv_vae``: a :class:`ConvVAE` for ``data_shape``."""
    if len(data_shape) != 3:
        raise ValueError(f"conv_vae needs image data (C, H, W), got shape {data_shape}")
    return ConvVAE(tuple(data_shape), latent, width)


class BetaELBO(ParticleELBO):
    """``E_q[log p(x|z)] - beta (log q(z|x) - log p(z))`` per data point, K particles
    averaged: the beta-VAE objective with a Monte Carlo KL."""

    estimator = "beta_elbo"

    def __init__(self, num_particles: int = 1, max_plate_nesting=None, beta: float = 1.0):
        super().__init__(num_particles, max_plate_nesting)
        self.beta = beta

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        scale = data_scale(model_trace)
        objective: torch.Tensor | float = 0.0
        for site in sample_sites(model_trace):
            weight = 1.0 if site.get("is_observed") else self.beta
            objective = objective + weight * site_log_density(site, scale, self.num_particles)
        for site in sample_sites(guide_trace):
            objective = objective - self.beta * site_log_density(site, scale, self.num_particles)
        objective = torch.as_tensor(objective).mean(0)  # (K, batch) -> (batch,)
        return objective.detach(), objective, scale


def beta_elbo(num_particles: int, *, max_plate_nesting=None, beta: float = 1.0) -> BetaELBO:
    """The builder :data:`BETA_ELBO` names."""
    return BetaELBO(num_particles, max_plate_nesting, beta)


#: the estimator ``own_code:BETA_ELBO``: its builder, typed option, and what it claims
BETA_ELBO = Estimator(
    name="beta_elbo",
    summary="the beta-VAE objective E[log p(x|z)] - beta KL (Higgins et al., 2017)",
    builder=beta_elbo,
    options=(Option("beta", float, 1.0, "the KL's weight; 1 is the ELBO", minimum=0.0),),
    is_bound=False,
    capture="differentiable_loss",
    reference="Higgins et al. (2017), beta-VAE",
)

__all__ = ["BETA_ELBO", "BetaELBO", "ConvVAE", "beta_elbo", "conv_vae"]
