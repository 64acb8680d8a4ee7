r"""``piwae``: the IWAE gradient for the model, the MIWAE gradient for the guide.

Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh, "Tighter Variational Bounds are Not
Necessarily Better" (2018). With M * K reparameterized draws ``z_{m,k}`` and log-weights
``log w_{m,k}``, per data point the decoder (model parameters theta) ascends the tight
bound of all draws and the encoder (guide parameters phi) the MIWAE bound, whose
gradient keeps its signal-to-noise ratio as K grows:

.. math::
    \hat\nabla_\theta = \nabla_\theta L_{MK}
        = \sum_{m,k} \tilde w_{m,k}\, \nabla_\theta \log p_\theta(x, z_{m,k}), \qquad
    \hat\nabla_\phi = \nabla_\phi\, \mathrm{MIWAE}(M, K),

with ``w~`` normalized over all M * K draws. One surrogate gives both without knowing
which parameter is whose: MIWAE's surrogate plus ``sum (w~ - w~^(m) / M) log p_theta(x,
z)`` at the draws detached from the guide (one more run of the model), whose gradient is
the difference of the two decoder gradients and which has none for the guide. A
parameter shared by model and guide receives both contributions. The value is the bound
the decoder ascends, L_{MK} of the draws (``iwae`` with M * K particles, same noise).

Counts as in :mod:`~pyro_vae.objectives.miwae`: ``num_particles`` is K, the option
``outer`` is M, and the built estimator's ``num_particles`` is M * K.
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyro_vae.compat import values_trace
from pyro_vae.objectives.importance import log_mean_exp
from pyro_vae.objectives.miwae import MultipleIWAE
from pyro_vae.objectives.traces import log_weights, sample_sites, site_total, trace_log_density


class PartiallyIWAE(MultipleIWAE):
    """PIWAE(M, K) (see the module's docstring)."""

    estimator = "piwae"

    def value_and_surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        log_w, scale = log_weights(model_trace, guide_trace, self.num_particles)
        value = log_mean_exp(log_w.detach())
        surrogate = self.bound(log_w)
        if not torch.is_grad_enabled():
            return value, surrogate, scale
        # the model's density at the same draws, cut from the guide: theta alone
        draws = {site["name"]: site["value"].detach() for site in sample_sites(guide_trace)}
        plate = self._plate(model, guide, args, kwargs)
        replayed = poutine.replay(plate(model), trace=values_trace(draws))
        decoder_trace = prune_subsample_sites(poutine.trace(replayed).get_trace(*args, **kwargs))
        decoder_trace.compute_log_prob()
        log_p = site_total(trace_log_density(decoder_trace, scale, self.num_particles))
        tight = torch.softmax(log_w.detach(), 0)
        grouped = torch.softmax(self.groups(log_w.detach()), 1) / self.outer
        correction = tight - grouped.reshape(tight.shape)
        return value, surrogate + (correction * log_p).sum(0), scale


def piwae(
    num_particles: int, *, max_plate_nesting: float | None = None, outer: int = 8
) -> PartiallyIWAE:
    """``piwae``: decoder by L_{MK}, encoder by MIWAE(M = outer, K = num_particles)."""
    return PartiallyIWAE(num_particles, outer, max_plate_nesting)
