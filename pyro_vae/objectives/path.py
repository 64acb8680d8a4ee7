"""Sticking the landing (Roeder et al., 2017): the ELBO's gradient without the score term
of the guide, whose expectation is zero."""

from __future__ import annotations

from pyro_vae.objectives.traces import (
    ParticleELBO,
    guide_log_prob_detached,
    log_weights,
    sample_sites,
    site_log_density,
)


class StickingTheLandingELBO(ParticleELBO):
    r"""The ELBO with the path-derivative ("sticking the landing") gradient.

    Value: the ELBO averaged over K particles, exactly as ``Trace_ELBO``. Gradient:
    ``1/K sum_k grad [log p(x, z_k) - log q_{stop_grad(phi)}(z_k | x)]``, the
    reparameterised gradient with the score term ``-grad_phi log q_phi(z)`` dropped
    (Roeder, Wu & Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient
    Estimators for Variational Inference", 2017). The dropped term has expectation
    zero, so the estimator is unbiased; its variance vanishes when q is the exact
    posterior, where ``log p(x, z) - log q(z|x)`` is constant in z.
    """

    estimator = "stl"

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        log_w, scale = log_weights(model_trace, guide_trace, self.num_particles)
        log_q = log_w.new_zeros(())
        for site in sample_sites(guide_trace):
            log_q = log_q + site_log_density(site, scale, self.num_particles)
        # log q with its parameters detached, at the same z, on the same per-data-point
        # footing as log_w: the model's data scale multiplies all of it once, afterwards
        log_q_stl = guide_log_prob_detached(
            guide, guide_trace, args, kwargs, self.num_particles, scale, self.max_plate_nesting
        )
        path_log_w = log_w + log_q - log_q_stl
        return log_w.detach().mean(0), path_log_w.mean(0), scale


def stl(num_particles: int, *, max_plate_nesting: float | None = None) -> StickingTheLandingELBO:
    """``stl``: the ELBO with the path-derivative gradient."""
    return StickingTheLandingELBO(num_particles, max_plate_nesting)
