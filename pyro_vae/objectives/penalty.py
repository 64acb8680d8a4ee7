"""The penalty objective: a regularized reconstruction loss that is not a bound."""

from __future__ import annotations

import torch

from pyro_vae.errors import UserInputError
from pyro_vae.objectives.traces import (
    ParticleELBO,
    data_scale,
    per_datapoint,
    relative_scale,
    sample_sites,
    site_log_density,
    site_total,
)


class PenaltyObjective(ParticleELBO):
    r"""The seed question's ad-hoc objective: reconstruction minus a quadratic penalty.

    .. math::
        \tilde{L} = E_q[\log p(x|z)] - \sum_j \big(\mu_j^2 + (\sigma_j - 1)^2\big)

    with (mu, sigma) the guide's location and scale at each latent site, in place of
    ``KL(q(z|x) || p(z))``. It pulls q towards N(0, 1) as the KL does, but it is **not a
    lower bound** on log p(x): the KL grows like ``-log sigma`` as sigma -> 0 while this
    penalty stays below 1 per dimension, so a sharp q makes it exceed log p(x). Provided
    to measure exactly that (``pyro-vae compare``), not to train models one trusts.
    """

    estimator = "penalty"

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        scale = data_scale(model_trace)
        objective: torch.Tensor | float = 0.0
        for site in sample_sites(model_trace):
            if site["is_observed"]:
                objective = objective + site_log_density(site, scale, self.num_particles)
        for site in sample_sites(guide_trace):
            normal = site["fn"]
            while isinstance(normal, torch.distributions.Independent):
                normal = normal.base_dist
            if not isinstance(normal, torch.distributions.Normal):
                raise UserInputError(
                    f"the penalty needs Normal guide sites; {site['name']!r} is a "
                    f"{type(normal).__name__}"
                )
            penalty = (normal.loc.pow(2) + (normal.scale - 1).pow(2)).sum(-1)
            relative = relative_scale(site, scale)  # KL warm-up scales the penalty too
            objective = objective - per_datapoint(site, penalty * relative, self.num_particles)
        objective = site_total(objective)
        return objective.detach().mean(0), objective.mean(0), scale


def penalty(num_particles: int, *, max_plate_nesting: float | None = None) -> PenaltyObjective:
    """``penalty``: the objective that is not a bound."""
    return PenaltyObjective(num_particles, max_plate_nesting)
