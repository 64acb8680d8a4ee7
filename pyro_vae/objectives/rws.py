r"""``rws``: reweighted wake-sleep (wake-wake), per data point and under mini-batches.

Bornschein & Bengio, "Reweighted Wake-Sleep" (2015); Le, Kosiorek, Siddharth, Teh &
Wood, "Revisiting Reweighted Wake-Sleep for Models with Stochastic Control Flow" (2019),
whose "wake-wake" form this is. With K draws ``z_k ~ q_phi(z|x)`` carrying no gradient
(any guide: :class:`~pyro_vae.objectives.traces.DetachedDraws`) and normalized weights
``w~_k = w_k / sum_j w_j`` of ``log w_k = log p_theta(x, z_k) - log q_phi(z_k|x)``, per
data point:

- wake-theta (the model): ``sum_k w~_k grad_theta log p_theta(x, z_k)``, the IWAE
  gradient of L_K for the decoder (the same as ``iwae``'s for the same noise);
- wake-phi (the guide): ``sum_k w~_k grad_phi log q_phi(z_k|x)``, a self-normalized
  importance-sampling estimate of ``-grad_phi KL(p(z|x) || q_phi(z|x))``.

The guide does not ascend L_K: the value reported is L_K of the same draws (a lower
bound, the model's objective). Each data point has its own weights, and the mini-batch
scale ``num_data / batch`` multiplies both gradients once, afterwards: Pyro's
:class:`pyro.infer.ReweightedWakeSleep` normalizes over the whole batch and refuses
mini-batches. Under KL warm-up the weights are tempered; ``log q`` in the wake-phi term
is not (the draws came from q). With one particle ``w~ = 1`` and the wake-phi gradient
has expectation zero: the guide learns nothing; use several.
"""

from __future__ import annotations

import torch

from pyro_vae.objectives.importance import log_mean_exp
from pyro_vae.objectives.traces import ParticleELBO, log_densities, score_log_density


class ReweightedWakeSleepELBO(ParticleELBO):
    """Wake-theta and wake-phi gradients, value L_K (see the module's docstring)."""

    estimator = "rws"
    detached_draws = True

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        log_p, log_q, scale = log_densities(model_trace, guide_trace, self.num_particles)
        log_w = (log_p - log_q).detach()
        weights = torch.softmax(log_w, 0)
        score = score_log_density(guide_trace, self.num_particles)
        return log_mean_exp(log_w), (weights * (log_p + score)).sum(0), scale


def rws(num_particles: int, *, max_plate_nesting: float | None = None) -> ReweightedWakeSleepELBO:
    """``rws``: reweighted wake-sleep, wake-theta and wake-phi."""
    return ReweightedWakeSleepELBO(num_particles, max_plate_nesting)
